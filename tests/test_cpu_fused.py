"""The CPU codegen of the int8 GEMM forms: the fused prologue/epilogue (codegen/cpu_fused.py), each
GEMM formulation (codegen/w8a8.py), and whole-graph Inductor for the torch.compile door
(runtime/inductor_cpu.py), each held to the spec."""
from __future__ import annotations

import logging
import platform

import pytest
import torch

import qhl
from qhl.codegen import cpu_fused, cpu_onednn, quant, w8a8

pytestmark = pytest.mark.skipif(not cpu_fused.enabled(), reason=f"no Inductor here: {cpu_fused.disable_reason()}")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _tied_rows(m: int, k: int, qmax: int) -> torch.Tensor:
    """Rows whose quotients x / s land exactly on k + 0.5 (round half to even decides them), a
    zero row, and a row with one huge outlier."""
    torch.manual_seed(m * 31 + qmax)
    x = torch.randn(m, k) * 3
    s = x[0].abs().amax() / qmax
    x[0, :32] = (torch.arange(32) - 16 + 0.5) * s
    if m > 2:
        x[1] = 0
        x[2, 5] = 1e6
    return x


@pytest.mark.parametrize("m", [1, 2, 7, 300])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fused_prologue_is_the_per_token_quantizer_bit_for_bit(m, bits, dtype):
    """Codes and scales equal quant.quantize_per_token_bits exactly (ties, zero rows, outliers),
    as int8 and as the uint8 q + 128 of the u8 formulation."""
    qmax = (1 << (bits - 1)) - 1
    x = _tied_rows(m, 256, qmax).to(dtype)
    q_ref, s_ref = quant.quantize_per_token_bits(x, bits)
    q, s = cpu_fused.per_token_codes(x, qmax, 0)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref) and torch.equal(s, s_ref)
    qu, su = cpu_fused.per_token_codes(x, qmax, 128)
    assert qu.dtype == torch.uint8 and torch.equal(su, s_ref)
    assert torch.equal(qu.to(torch.int16) - 128, q_ref.to(torch.int16))


@pytest.mark.parametrize("plan", ["u8", "onednn", "cols", "s8", "rows", "u8_rows", "f32"])
@pytest.mark.parametrize("m", [1, 3, 64, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_every_gemm_formulation_computes_the_spec(plan, m, bias, monkeypatch):
    """Each formulation int8_linear_cpu can choose gives the fake-quant reference (float64) to
    float32 accumulation noise (1e-6 relative: the int32 sums are exact, only the float32 scale
    products round), for any token count."""
    monkeypatch.setattr(w8a8, "_cpu_plan", lambda *shape: plan)
    w, x = torch.randn(96, 512), torch.randn(m, 512)
    b = torch.randn(96) if bias else None
    wq, ws = quant.quantize_int8_per_channel(w)
    out = w8a8.int8_linear_cpu(x, wq, ws, b, torch.float32)
    assert out.shape == (m, 96) and out.dtype == torch.float32
    assert _rel_err(out, quant.fake_quant_w8a8_linear(x, w, b)) < 1e-6


@pytest.mark.parametrize("m", [1, 64, 300])
def test_float_plan_without_a_fast_int8_gemm(m, int8_gemm):
    """Where PyTorch has no fast int8 GEMM (x86 with AVX2 alone), every token count takes 'f32': a
    float32 GEMM over the integer codes against float32 codes cached once per weight (on large
    weights at 1-4 tokens the bit-mask GEMV instead, tested below). Its products are exact and its
    sums float32's: on these sizes it gives the int8 plans' result bit for bit,
    and it stays within float32 accumulation noise of them in general (2e-7)."""
    torch.manual_seed(m)
    w, x, b = torch.randn(96, 512), torch.randn(m, 512), torch.randn(96)
    x[:, 3] *= 40
    wq, ws = quant.quantize_int8_per_channel(w)
    int8_gemm("int8")
    assert w8a8._cpu_plan(m, 96, 512) != "f32"
    want = w8a8.int8_linear_cpu(x, wq, ws, b, torch.float32)
    int8_gemm("float")
    assert w8a8._cpu_plan(m, 96, 512) == "f32" and not cpu_onednn.int8_gemm_is_fast()
    got = w8a8.int8_linear_cpu(x, wq, ws, b, torch.float32)
    assert _rel_err(got, want) < 2e-7
    # (a weight this small takes the float32 GEMM at 1 token too: int8_bits_gemv_worthwhile)
    assert w8a8.float_codes.get(wq) is not None and w8a8.float_codes(wq).dtype == torch.float32
    assert _rel_err(w8a8.int8_gemm_cpu(quant.quantize_per_token(x)[0], wq, ws),
                    torch._int_mm(quant.quantize_per_token(x)[0], wq.t()).float() * ws) < 2e-7  # eager face


def test_int8_gemm_detection_and_override(int8_gemm):
    """x86 without AVX-512, VNNI or AMX has no fast int8 GEMM; QHL_CPU_INT8_GEMM overrides, and
    the choice is part of the Inductor cache key (a graph decomposed for one plan is never served
    to the other)."""
    from qhl.runtime import inductor_cpu

    int8_gemm("")
    probes = [torch.cpu._is_avx512_supported(), torch.cpu._is_vnni_supported(), torch.cpu._is_amx_tile_supported()]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert cpu_onednn.int8_gemm_is_fast() == any(probes)
    keys = {}
    for mode in ("int8", "float"):
        int8_gemm(mode)
        keys[mode] = inductor_cpu._decomposition_fingerprint()
    assert keys["int8"] != keys["float"]


@pytest.mark.parametrize("m", [1, 4])
def test_few_tokens_take_the_u8_gemv_only_where_vnni_keeps_it_exact(m, int8_gemm):
    """Without AMX, 1-4 tokens run one GEMV per token: u8 x s8 (17-21% faster, measured on an AMD
    EPYC Zen 5) only on an x86 CPU with VNNI, where its int32 sums are exact, and with a torch
    whose _int_mm takes uint8 (2.11's does not); s8 elsewhere."""
    int8_gemm("int8")
    plan = w8a8._cpu_plan(m, 4096, 4096)
    if cpu_onednn.cpu_has_amx():  # u8, or the prepacked / transposed GEMM (QHL_CPU_PREPACK)
        assert plan not in ("rows", "u8_rows")
    else:
        vnni_u8 = cpu_onednn.x86_has_int8_vnni() and cpu_onednn.u8_int_mm_supported()
        assert plan == ("u8_rows" if vnni_u8 else "rows")


def test_u8_compensation_follows_an_in_place_weight_change(monkeypatch):
    """The u8 formulation's cached 128 * sum_k Wq[n, k] is dropped when the int8 weight changes in
    place, so the next call is the new weight's product, not a stale one."""
    monkeypatch.setattr(w8a8, "_cpu_plan", lambda *shape: "u8")
    w, x = torch.randn(64, 256), torch.randn(1, 256)
    wq, ws = quant.quantize_int8_per_channel(w)
    first = w8a8.int8_linear_cpu(x, wq, ws, None, torch.float32)
    assert torch.equal(w8a8._u8_compensation.get(wq), wq.sum(1, dtype=torch.int32) * 128)
    w2 = torch.randn(64, 256)
    wq2, ws2 = quant.quantize_int8_per_channel(w2)
    wq.copy_(wq2)
    second = w8a8.int8_linear_cpu(x, wq, ws2, None, torch.float32)
    assert _rel_err(second, quant.fake_quant_w8a8_linear(x, w2, None)) < 1e-6
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (3, 100, 37), (64, 576, 1536), (2, 1024, 1024), (1, 2048, 2048),
                                   (5, 1100, 1001), (300, 512, 512)])
def test_int8_mm_scaled_is_int_mm_times_the_weight_scale_bit_for_bit(m, k, n):
    """qhl::int8_mm_scaled (oneDNN's GEMM on a prepacked weight where the CPU has AMX and the
    shape is worth it, _int_mm elsewhere) equals float32(_int_mm(q, Wq^T)) * s_w exactly: exact
    int32 sums, one rounding, so the w8a8 epilogue after it is the spec's. Odd K and N included
    (no block-size assumptions); the last four shapes take the prepacked GEMM on a CPU with AMX."""
    torch.manual_seed(m + k + n)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ws = torch.rand(n) * 0.01
    y = torch.ops.qhl.int8_mm_scaled(q, wq, ws)
    assert y.dtype == torch.float32 and y.shape == (m, n) and y.is_contiguous()
    assert torch.equal(y, torch._int_mm(q, wq.t()).float() * ws)


def test_int8_mm_scaled_fake_face_gives_shape_and_dtype():
    """The fake face (what Inductor traces the extern call with): [M, N] float32, dynamic M kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(7, 96, dtype=torch.int8)
        y = torch.ops.qhl.int8_mm_scaled(q, torch.empty(40, 96, dtype=torch.int8), torch.empty(40))
    assert y.shape == (7, 40) and y.dtype == torch.float32


@pytest.mark.skipif(not cpu_onednn.available(), reason="oneDNN's prepacked int8 GEMM is used only on CPUs with AMX")
def test_prepacked_weight_is_packed_once_and_follows_an_in_place_change(monkeypatch):
    """The prepacked copy is made on the first call for a weight and reused after; when the int8
    weight changes in place it is packed again, so no call runs on a stale copy."""
    packs = []
    derive = cpu_onednn._prepacked._derive
    monkeypatch.setattr(cpu_onednn._prepacked, "_derive", lambda w: packs.append(1) or derive(w))
    w, x = torch.randn(1024, 1024), torch.randn(5, 1024)
    wq, ws = quant.quantize_int8_per_channel(w)
    for _ in range(3):
        first = torch.ops.qhl.int8_mm_scaled(quant.quantize_per_token(x)[0], wq, ws)
    assert len(packs) == 1
    wq2, ws2 = quant.quantize_int8_per_channel(torch.randn(1024, 1024))
    wq.copy_(wq2)
    second = torch.ops.qhl.int8_mm_scaled(quant.quantize_per_token(x)[0], wq, ws2)
    assert len(packs) == 2
    assert torch.equal(second, torch._int_mm(quant.quantize_per_token(x)[0], wq2.t()).float() * ws2)
    assert not torch.equal(first, second)


def test_prepacked_gemm_only_where_it_was_measured_faster():
    """Not for small weights at few tokens (a fixed ~30 us per call) nor small weights at 1 token
    (1-3 ms on some shapes); yes for 2^20-value weights at 2+ tokens and for much work per call."""
    if not cpu_onednn.available():
        assert not cpu_onednn.worthwhile(64, 4096, 4096)
        return
    assert cpu_onednn.worthwhile(2, 1024, 1024) and cpu_onednn.worthwhile(1, 4096, 4096)
    assert not cpu_onednn.worthwhile(1, 192, 576) and not cpu_onednn.worthwhile(1, 1024, 1024)
    assert not cpu_onednn.worthwhile(32, 576, 576) and cpu_onednn.worthwhile(512, 576, 576)
    assert w8a8._cpu_plan(1, 4096, 4096) == "u8" and w8a8._cpu_plan(8, 192, 576) == "cols"
    assert w8a8._cpu_plan(8, 4096, 4096) == "onednn"


def test_prepack_off_switch_keeps_the_same_result(monkeypatch):
    """QHL_CPU_PREPACK=0 (for the memory of the prepacked copies) turns the oneDNN GEMM off: the
    plan falls back to the transposed _int_mm and the op's value is unchanged."""
    wq = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)
    q, ws = torch.randint(-127, 128, (9, 1024), dtype=torch.int8), torch.rand(1024)
    on = torch.ops.qhl.int8_mm_scaled(q, wq, ws)
    monkeypatch.setenv(cpu_onednn.ENV_FLAG, "0")
    cpu_onednn.available.cache_clear()
    try:
        assert not cpu_onednn.available()
        assert w8a8._cpu_plan(64, 4096, 4096) != "onednn"
        assert torch.equal(torch.ops.qhl.int8_mm_scaled(q, wq, ws), on)
    finally:
        monkeypatch.delenv(cpu_onednn.ENV_FLAG)
        cpu_onednn.available.cache_clear()


def test_eager_fallback_when_the_fused_path_is_off(monkeypatch):
    """QHL_CPU_FUSED=0 turns the fused path off (enabled() says why) and the CPU face gives the
    same result through its eager formulations."""
    w, x, b = torch.randn(48, 128), torch.randn(5, 128), torch.randn(48)
    wq, ws = quant.quantize_int8_per_channel(w)
    fused = qhl.codegen.w8a8.w8a8_linear(x, wq, ws, b)
    monkeypatch.setenv(cpu_fused.ENV_FLAG, "0")
    assert not cpu_fused.enabled() and cpu_fused.disable_reason() == "QHL_CPU_FUSED=0"
    eager = qhl.codegen.w8a8.w8a8_linear(x, wq, ws, b)
    torch.testing.assert_close(eager, fused, rtol=1e-6, atol=1e-6)


def test_a_failing_compile_falls_back_to_the_same_math(monkeypatch, caplog):
    """If Inductor cannot compile (a broken toolchain), the call still returns the right codes,
    the path turns off, and the reason is logged once."""
    def broken(name):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_fused, "_compiled", broken)
    monkeypatch.setattr(cpu_fused, "_disabled", None)
    x = torch.randn(4, 64)
    with caplog.at_level(logging.WARNING, logger="qhl.codegen.cpu_fused"):
        q, s = cpu_fused.per_token_codes(x, 127)
    assert torch.equal(q, quant.quantize_per_token(x)[0])
    assert "no compiler" in cpu_fused.disable_reason() and "no compiler" in caplog.text
    assert not cpu_fused.enabled()


def test_recompile_limit_runs_eagerly_and_keeps_the_fused_path(monkeypatch, caplog):
    """Dynamo's recompile limit is not a broken toolchain: a process that runs many shapes reaches
    it. The call runs the same math eagerly and logs once; the function's compiled graphs keep
    serving (the "eager_on_recompile" stance, no failing compile per call); the fused path (and with
    it the torch.compile door's whole-graph Inductor path) stays on."""
    import types

    # a fresh code object: Dynamo keeps its graphs per code object, and the real prologue's
    # already hold other tests' graphs
    fresh = types.FunctionType(cpu_fused._prologue.__code__.replace(), cpu_fused._prologue.__globals__)
    compiled = torch.compile(fresh, dynamic=True, fullgraph=True)
    monkeypatch.setattr(cpu_fused, "_compiled", lambda name: compiled)
    monkeypatch.setattr(cpu_fused, "_disabled", None)
    monkeypatch.setattr(cpu_fused, "_at_recompile_limit", set())
    x = torch.randn(4, 64)
    with caplog.at_level(logging.WARNING, logger="qhl.codegen.cpu_fused"), torch._dynamo.config.patch(recompile_limit=1):
        for offset in (0, 128, 128, 0):  # uint8 codes (a bool argument, specialised) need a second graph
            q, s = cpu_fused.per_token_codes(x, 127, offset)
            want = quant.quantize_per_token(x)
            assert torch.equal(q, (want[0].to(torch.int16) + offset).to(q.dtype)) and torch.equal(s, want[1])
    assert cpu_fused.enabled() and "prologue" in cpu_fused._at_recompile_limit
    assert caplog.text.count("recompile limit") == 1


# --- whole-graph Inductor (the torch.compile door on CPU) ---------------------------------------


def _stack(width: int = 128, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]).eval()


def _spec_and_inductor(model: torch.nn.Module, x: torch.Tensor, recipe: str, **knobs):
    """(op-by-op output, Inductor output, Inductor's generated source, the Inductor backend) of one
    static-shape compile of `model` under `recipe` each way."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=qhl.backend(recipe, cpu_codegen="spec", **knobs), dynamic=False)(x)
    torch._dynamo.reset()
    be = qhl.backend(recipe, **knobs)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend=be, dynamic=False), x)
    return ref, out, "\n".join(codes), be


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rewritten graph run op by op (cpu_codegen="spec"): what Inductor must reproduce."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=qhl.backend("w8a8", cpu_codegen="spec"))(x)


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_inductor_graph_equals_the_op_by_op_graph(tokens):
    """An inference graph compiled whole by Inductor (the default on CPU) gives the op-by-op
    graph's result: the same codes, so only float32 rounding of the epilogue differs (1e-5)."""
    model, x = _stack(), torch.randn(tokens, 128)
    ref = _reference(model, x)
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    assert [g.codegen for g in be.graphs] == ["inductor"]
    assert be.graphs[0].codegen_reason is None
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(out, model(x)) < 0.05  # and it is still the model (w8a8's error, ~30 dB)


def test_inductor_graph_fuses_the_prologue_and_epilogue_around_the_int8_gemm(monkeypatch, int8_gemm):
    """The w8a8 layers are lowered to aten (their decomposition): the compiled code calls the
    int8 GEMM directly (oneDNN's prepacked one where the CPU has AMX, else _int_mm), with no
    qhl::w8a8_linear call left, and the weights are prepacked once, not per call."""
    from torch._inductor.utils import run_and_get_code

    int8_gemm("int8")

    packs = []
    derive = cpu_onednn._prepacked._derive
    monkeypatch.setattr(cpu_onednn._prepacked, "_derive", lambda w: packs.append(1) or derive(w))
    model, x = _stack(1024), torch.randn(16, 1024)  # 2^20-value weights: the prepacked GEMM's sizes
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qhl.backend("w8a8"))
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, x)
        compiled(x)
        compiled(x)
    source = "\n".join(codes)
    gemm = "torch.ops.qhl.int8_mm_scaled.default(" if cpu_onednn.available() else "_int_mm("
    assert source.count(gemm) == 3
    assert len(packs) == (3 if cpu_onednn.available() else 0)
    assert "qhl.w8a8_linear" not in source.replace("Original ATen: [qhl.w8a8_linear]", "")


def test_one_token_w8a8_is_an_int8_gemm_inside_the_inductor_graph(int8_gemm):
    """Without AMX, one token's GEMV is one s8 _int_mm call that Inductor makes an extern kernel
    between its fused loops, rather than an opaque call to the op's CPU face per layer (SmolLM2's
    decode step 25.0 -> 14.5 ms on an AMD EPYC Zen 5); the value is still the spec's."""
    from torch._inductor.utils import run_and_get_code

    int8_gemm("int8")
    if cpu_onednn.cpu_has_amx():
        pytest.skip("with AMX one token takes the u8 GEMV with its cached compensation (an op call)")
    model, x = _stack(256), torch.randn(1, 256)
    ref = _reference(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qhl.backend("w8a8"), dynamic=False)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
    source = "\n".join(codes)
    assert source.count("_int_mm(") == 3
    assert "qhl.w8a8_linear" not in source.replace("Original ATen: [qhl.w8a8_linear]", "")
    assert _rel_err(out, ref) < 1e-5


def test_inductor_graph_lowers_w8a8_to_a_float_gemm_where_int8_gemms_are_slow(int8_gemm):
    """Without a fast int8 GEMM, at 5+ tokens, the float_codes_gemm pass writes each w8a8 layer's
    'f32' plan into the graph (per-token codes, a float32 GEMM against the float32 codes, the
    dequantize): no call of the op is left, Inductor fuses the rest, and the result is the int8
    plans' to float32 accumulation noise."""
    from torch._inductor.utils import run_and_get_code

    model, x = _stack(256), torch.randn(16, 256)
    int8_gemm("int8")
    want = _reference(model, x)
    int8_gemm("float")
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend=be), x)
    source = "\n".join(codes)
    assert [g.codegen for g in be.graphs] == ["inductor"]
    assert "torch.ops.qhl.w8a8_linear.default(" not in source and "_int_mm(" not in source
    assert source.count("extern_kernels.mm(") == 3
    [record] = [p for p in be.graphs[0].passes if p.name == "float_codes_gemm"]
    assert record.stats == {"lowered": 3, "kept": 0}
    assert _rel_err(out, want) < 1e-6


def test_dynamic_token_count_picks_the_gemm_per_call():
    """Compiled with a dynamic token count, a large-weight layer calls qhl::int8_mm_scaled, which
    picks its GEMM per call: every token count equals the op-by-op graph. (1 token gets a graph of
    its own: Dynamo specializes sizes 0 and 1.)"""
    model = _stack(1024, 2)
    xs = [torch.randn(tokens, 1024) for tokens in (8, 200, 3, 1)]
    refs = [_reference(model, x) for x in xs]
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        outs = [compiled(x) for x in xs]
    assert len(be.graphs) == 2 and {g.codegen for g in be.graphs} == {"inductor"}
    for out, ref in zip(outs, refs):
        assert _rel_err(out, ref) < 1e-5


def test_inductor_graph_sees_weights_changed_in_place():
    """The packed weights are passed to the compiled code by reference: a weight updated in place
    is re-packed before the next call (runtime/packed.py) and the result follows it."""
    model, x = _stack(64, 2), torch.randn(8, 64)
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        compiled(x)
        model[0].weight.mul_(-2.0)
        out = compiled(x)
    assert be.graphs[0].codegen == "inductor"
    assert _rel_err(out, _reference(model, x)) < 1e-5


def test_inductor_caches_serve_the_same_graph_again(int8_gemm):
    """The decomposition table qhl hands Inductor can be keyed, so Inductor's compiled-code caches
    work: the same graph compiled again (a new backend after a Dynamo reset, as a second process
    would) is a cache hit with the same result, and a graph with other shapes is not. (With the
    int8 plans, so that w8a8 is decomposed into the graph rather than calling its CPU face, whose
    own fused kernels would count hits of their own.)"""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    int8_gemm("int8")

    model, x = _stack(64, 2), torch.randn(8, 64)
    outs, hits = [], []
    with fresh_cache(), torch.no_grad():
        for inp in (x, x, torch.randn(3, 64)):
            torch._dynamo.reset()
            before = counters["inductor"]["fxgraph_cache_hit"]
            be = qhl.backend("w8a8")
            outs.append(torch.compile(model, backend=be, dynamic=False)(inp))
            assert be.graphs[0].codegen == "inductor"
            hits.append(counters["inductor"]["fxgraph_cache_hit"] - before)
    assert hits == [0, 1, 0]
    assert torch.equal(outs[0], outs[1])


def test_decomposition_table_pickles_as_its_lowered_ops():
    """What the caches key on: the lowered qhl ops and a fingerprint of their code, round-tripping
    through pickle; an op without a decomposition is refused by name."""
    import pickle

    from qhl.runtime.inductor_cpu import DecompositionTable

    table = DecompositionTable(("qhl.w8a8_linear.default",))
    assert torch.ops.qhl.w8a8_linear.default in table and torch.ops.qhl.w8a16_linear.default not in table
    again = pickle.loads(pickle.dumps(table))
    assert again.lowered == table.lowered and again.keys() == table.keys()
    assert pickle.dumps(table) != pickle.dumps(DecompositionTable(()))
    with pytest.raises(ValueError, match="no CPU decomposition for \\['qhl.nope'\\]"):
        DecompositionTable(("qhl.nope",))


def test_training_and_spec_graphs_stay_graph_modules():
    """Training graphs, and cpu_codegen="spec", run the GraphModule, and say why."""
    model, x = _stack(64, 2), torch.randn(8, 64)
    torch._dynamo.reset()
    be = qhl.backend("w8a8", cpu_codegen="spec")
    with torch.no_grad():
        torch.compile(model, backend=be)(x)
    assert be.graphs[0].codegen == "graph" and be.graphs[0].codegen_reason == "cpu_codegen='spec'"
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    model.train()
    torch.compile(model, backend=be)(x.requires_grad_()).sum().backward()
    assert {g.kind: g.codegen for g in be.graphs} == {"forward": "graph", "backward": "graph"}
    assert "training" in be.graphs[0].codegen_reason


def test_inductor_failure_falls_back_to_the_graph_module(monkeypatch, caplog):
    """If Inductor fails on a graph, the backend runs the GraphModule (same result) and the
    compiled graph's record says why."""
    from qhl.runtime import inductor_cpu

    def broken(gm, inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(inductor_cpu, "compile_inference_graph", broken)
    model, x = _stack(64, 2), torch.randn(8, 64)
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    with caplog.at_level(logging.WARNING, logger="qhl.compile_backend"), torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    assert be.graphs[0].codegen == "graph" and "boom" in be.graphs[0].codegen_reason
    assert "boom" in caplog.text
    assert _rel_err(out, _reference(model, x)) < 1e-6


class _ScaledByFloat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.proj(x) * scale + torch.nn.functional.silu(x) * scale**0.5


def test_dynamic_float_input_restarts_dynamo_rather_than_running_op_by_op():
    """With dynamic=True a Python float argument is symbolic, and Inductor's pass that turns such
    floats into tensors may ask Dynamo to trace the frame again (TensorifyScalarRestartAnalysis).
    That request passes through the backend (it used to be caught as an Inductor failure, and
    SmolLM2 then decoded op by op at 0.76x eager instead of 2.6x): every graph runs on Inductor,
    with the op-by-op graph's result."""
    torch.manual_seed(0)
    model, x = _ScaledByFloat().eval(), torch.randn(8, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=qhl.backend("w8a8", cpu_codegen="spec"), dynamic=True)(x, 0.5)
    torch._dynamo.reset()
    be = qhl.backend("w8a8")
    with torch.no_grad():
        out = torch.compile(model, backend=be, dynamic=True)(x, 0.5)
    assert be.graphs and all(g.codegen == "inductor" for g in be.graphs), [g.codegen_reason for g in be.graphs]
    assert _rel_err(out, ref) < 1e-5


def test_unknown_cpu_codegen_is_a_recipe_error():
    with pytest.raises(qhl.RecipeError, match="cpu_codegen='tvm'; valid: \\['inductor', 'spec'\\]"):
        qhl.recipe("w8a8", cpu_codegen="tvm")


@pytest.mark.parametrize("tokens", [1, 2, 16, 17])
@pytest.mark.parametrize("mode", ["int8", "float"])
def test_w8a16_is_lowered_to_a_gemv_at_few_tokens(tokens, mode, int8_gemm):
    """With a fast int8 GEMM (mode "int8"), w8a16 at 1 to w8a16.gemv_max_tokens() tokens (1 with
    AMX, 16 without) becomes Inductor's int8 GEMV (no qhl::w8a16_linear call in the compiled code);
    above, its decomposition declines and the op stays a call to its CPU face. With AVX2 alone
    (mode "float") 1-4 tokens become the bit-mask GEMV (the next test covers it). All equal the
    op-by-op graph to float32 rounding."""
    from torch._inductor.utils import run_and_get_code

    from qhl.codegen import w8a16

    int8_gemm(mode)
    lowered = tokens <= (w8a16.gemv_max_tokens() if mode == "int8" else cpu_fused.BITS_GEMV_MAX_TOKENS)

    model, x = _stack(), torch.randn(tokens, 128)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=qhl.backend("w8a16", cpu_codegen="spec"))(x)
    torch._dynamo.reset()
    be = qhl.backend("w8a16")
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend=be), x)
    assert be.graphs[0].codegen == "inductor"
    calls = "\n".join(codes).count("torch.ops.qhl.w8a16_linear.default(")
    assert calls == (0 if lowered else 3)
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("recipe", ["w8a8", "w8a16", "w4a16", "w4a8", "w4a4", "hadamard-w4a8"])
def test_avx2_few_token_layers_are_lowered_into_the_inductor_graph(recipe, int8_gemm):
    """On a CPU with AVX2 alone (mode "float"), at a static 1-4 tokens, each form's decomposition
    puts the bit-mask GEMV into Inductor's graph: no call of the layer's qhl op is left in the
    compiled code (each such call cost ~250-500 us of dispatch and Dynamo overhead, which made
    SmolLM2's decode slower than eager; hadamard-w4a8's rotate-and-quantize prologue is in the
    graph too, as the rotation's GEMMs and the quantizer), and the result is the op-by-op
    graph's to float32 rounding (hadamard-w4a8's bit for bit). At 5 tokens, and for w4a16 with
    a group of 32, the weight-only ops stay calls to their CPU faces; the int8-GEMM forms' are
    lowered by float_codes_gemm."""
    int8_gemm("float")
    form = recipe.removeprefix("hadamard-")
    model = _stack(256, 2)
    for tokens, group in ((1, 64), (3, 64), (5, 64), (1, 32)):
        if group == 32 and form != "w4a16":
            continue
        knobs = {"group_size": group} if form == "w4a16" else {}
        ref, out, source, be = _spec_and_inductor(model, torch.randn(tokens, 256), recipe, **knobs)
        assert [g.codegen for g in be.graphs] == ["inductor"]
        calls = source.count(f"torch.ops.qhl.{form}_linear.default(")
        lowered = (tokens <= cpu_fused.BITS_GEMV_MAX_TOKENS and group == 64) or form in ("w8a8", "w4a8", "w4a4")
        assert calls == (0 if lowered else 2), (tokens, group)
        if recipe.startswith("hadamard-") and calls == 0:
            assert "torch.ops.qhl.hadamard_quantize_per_token" not in source
            assert torch.equal(out, ref), tokens
        assert _rel_err(out, ref) < 1e-5, (tokens, group)


@pytest.mark.parametrize("recipe, tokens, plan", [("hadamard-w8a8", 1, "int8"), ("hadamard-w8a8", 7, "int8"),
                                                  ("hadamard-w8a8", 7, "float"), ("hadamard-w4a8", 1, "int8"),
                                                  ("hadamard-w4a8", 7, "float")])
def test_online_rotations_are_lowered_into_the_inductor_graph(recipe, tokens, plan, monkeypatch, int8_gemm):
    """The online rotations become the rotation's GEMMs and sums inside Inductor's graph at a
    static token count: hadamard-w8a8's qhl::hadamard before each layer (every CPU plan), and
    hadamard-w4a8's rotate-and-quantize prologue where its layer is lowered too (the bit-mask GEMV
    at 1-4 tokens without AMX; float_codes_gemm's plan at more tokens without a fast int8 GEMM).
    No call of a qhl op is left in the compiled code (each cost ~60-100 us of dispatch a layer at
    1 token), and the result is the op-by-op graph's to float32 rounding (the rotation itself is
    the spec's bit for bit: tests/test_hadamard.py)."""
    int8_gemm(plan)
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: False)
    ref, out, source, be = _spec_and_inductor(_stack(576, 2), torch.randn(tokens, 576), recipe)
    assert [g.codegen for g in be.graphs] == ["inductor"]
    assert "torch.ops.qhl.hadamard" not in source
    if recipe == "hadamard-w4a8":
        assert "torch.ops.qhl.w4a8_linear" not in source
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("m", [1, 4])
def test_in_graph_bits_formulations_equal_the_spec_bit_for_bit(m):
    """The aten forms the decompositions emit (cpu_fused.int8_bits_dot_graph, int4_bits_dot_graph;
    run eagerly here) take 1-4 tokens at once: on exact operands they equal the spec bit for bit,
    every int8 code and every nibble in every lane position; a weight they can't view declines."""
    n, k, g = 13, 256, 64
    x = torch.cat([_exact_operands(n, k, m + i)[0] for i in range(m)])
    codes8 = (torch.arange(n * k) % 256 - 128).to(torch.int8).view(n, k)
    assert torch.equal(cpu_fused.int8_bits_dot_graph(x, codes8), x @ codes8.float().t())
    codes4 = (torch.arange(n * k) * 7 % 16).to(torch.uint8).view(n, k)
    packed = quant.pack_int4(codes4)
    zero = (torch.arange(n * (k // g)) % 16).to(torch.uint8).view(n, k // g)
    scale = 2.0 ** torch.randint(-4, 2, (n, k // g)).float()
    ref = x @ quant.dequantize_int4_groupwise(packed, scale, zero, g).t()
    assert torch.equal(cpu_fused.int4_bits_dot_graph(x, packed, scale, zero, g), ref)
    assert cpu_fused.int4_bits_dot_graph(x, packed, scale, zero, 32) is None
    offset = torch.zeros(n * k + 1, dtype=torch.int8)[1:].view(n, k)  # storage offset 1
    assert cpu_fused.int8_bits_dot_graph(x, offset) is None


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4a16_one_token_gemv_on_cached_codes(symmetric, monkeypatch, int8_gemm):
    """At 1 token the w4a16 CPU face runs an Inductor GEMV over codes unpacked once per packed
    weight: the fake-quant reference to float32 rounding, the same as the tiled path, and a packed
    weight changed in place is unpacked again (not served stale from the cache). On a CPU with
    AVX2 alone (mode "float") it keeps the tiled path and caches nothing."""
    from qhl.codegen import w4a16

    int8_gemm("float")
    w0, x0 = torch.randn(24, 128), torch.randn(1, 128)
    p0, s0, z0 = quant.quantize_int4_groupwise(w0, 64, symmetric, "none")
    assert _rel_err(w4a16.w4a16_linear(x0, p0, s0, z0, 64, None),
                    quant.fake_quant_w4a16_linear(x0, w0, None, 64, symmetric, "none")) < 1e-6
    assert w4a16._unpacked.get(p0) is None
    int8_gemm("int8")

    clip = "grid" if symmetric else "none"
    w, x, b = torch.randn(40, 256), torch.randn(1, 256), torch.randn(40)
    packed, scale, zero = quant.quantize_int4_groupwise(w, 64, symmetric, clip)
    out = w4a16.w4a16_linear(x, packed, scale, zero, 64, b)
    assert w4a16._unpacked.get(packed) is not None
    assert _rel_err(out, quant.fake_quant_w4a16_linear(x, w, b, 64, symmetric, clip)) < 1e-6
    w2 = torch.randn(40, 256)
    p2, s2, z2 = quant.quantize_int4_groupwise(w2, 64, symmetric, clip)
    packed.copy_(p2)
    gemv = w4a16.w4a16_linear(x, packed, s2, z2, 64, b)
    assert _rel_err(gemv, quant.fake_quant_w4a16_linear(x, w2, b, 64, symmetric, clip)) < 1e-6
    monkeypatch.setattr(w4a16, "CPU_GEMV_CACHE", False)
    tiled = w4a16.w4a16_linear(x, packed, s2, z2, 64, b)
    assert _rel_err(tiled, gemv) < 1e-6


def _exact_operands(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, K] of small integers (zeros included): every product with a code and every partial sum
    is an integer under 2^24, so float32 computes them exactly in any order and a GEMV must equal
    the spec bit for bit: a wrong byte, nibble, sign extension or lane order shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (1, k), generator=g).float(), torch.randint(0, 1 << 30, (n,), generator=g)


@pytest.mark.parametrize("n,k", [(8, 32), (13, 36), (40, 520)])
def test_int8_bits_gemv_equals_the_spec_bit_for_bit(n, k):
    """cpu_fused.int8_gemv_bits (w8a16 at 1 token on AVX2 alone) reads int8 codes as int32 lanes:
    with exact operands it equals the spec exactly, for every code from -128 to 127 and K not a
    multiple of the vector width; with random floats it equals it to float32 summation order."""
    from qhl.codegen import w8a16

    x, _ = _exact_operands(n, k, n + k)
    codes = (torch.arange(n * k) % 256 - 128).to(torch.int8).view(n, k)
    scale = 2.0 ** torch.randint(-6, 3, (n,)).float()
    y = cpu_fused.int8_gemv_bits(x, codes, scale)
    assert torch.equal(y, w8a16._w8a16_linear_generic(x, codes, scale, None))
    xr, sr = torch.randn(1, k), torch.rand(n) + 0.1
    ref = (xr.double() @ codes.double().t()) * sr.double()
    assert _rel_err(cpu_fused.int8_gemv_bits(xr, codes, sr), ref) < 1e-6  # float32 sums of K terms


@pytest.mark.parametrize("g", [64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_bits_gemv_equals_the_spec_bit_for_bit(g, symmetric):
    """cpu_fused.int4_gemv_bits (w4a16 at 1 token on AVX2 alone) reads the packed weight as int32
    lanes of 8 codes: exact operands (every code 0-15 in every nibble position, zero points 0-15,
    power-of-2 scales, some negative as the "grid" preset makes) give the spec's result bit for bit,
    on the general graph and on the symmetric one."""
    n, k = 21, 2 * g
    x, _ = _exact_operands(n, k, g)
    codes = (torch.arange(n * k) * 7 % 16).to(torch.uint8).view(n, k)
    packed = quant.pack_int4(codes)
    zero = torch.full((n, k // g), 8, dtype=torch.uint8) if symmetric else \
        (torch.arange(n * (k // g)) % 16).to(torch.uint8).view(n, k // g)
    scale = 2.0 ** torch.randint(-4, 2, (n, k // g)).float() * torch.where(torch.rand(n, k // g) < 0.3, -1.0, 1.0)
    ref = x @ quant.dequantize_int4_groupwise(packed, scale, zero, g).t()
    assert torch.equal(cpu_fused.int4_gemv_bits(x, packed, scale, zero, g), ref)
    if symmetric:  # the graph that subtracts 8 in int32 instead of reading the zero points
        assert torch.equal(cpu_fused.int4_gemv_bits(x, packed, scale, zero, g, symmetric=True), ref)


def test_bits_gemvs_decline_what_their_lanes_cannot_tile():
    """A group under 64 codes, K off the int32 lanes, or a weight whose bytes are not 4-aligned
    views returns None (the caller keeps its tiled path), with the reason for the first two."""
    x = torch.randn(1, 64)
    packed, scale, zero = quant.quantize_int4_groupwise(torch.randn(8, 64), 32, True, "none")
    assert "group size 32 is not a multiple of 64" in cpu_fused.bits_gemv_decline(64, 32)
    assert cpu_fused.int4_gemv_bits(x, packed, scale, zero, 32) is None
    assert "K=66 is not a multiple of 4" in cpu_fused.bits_gemv_decline(66)
    assert cpu_fused.int8_gemv_bits(torch.randn(1, 66), torch.zeros(4, 66, dtype=torch.int8), torch.ones(4)) is None
    offset = torch.zeros(4 * 64 + 1, dtype=torch.int8)[1:].view(4, 64)  # storage offset 1
    assert cpu_fused.int8_gemv_bits(x, offset, torch.ones(4)) is None
    assert cpu_fused.bits_gemv_decline(64) is None and cpu_fused.bits_gemv_decline(256, 128) is None


def test_bits_gemvs_compile_once_per_inner_length():
    """Output rows and group counts are dynamic: ten layer shapes with one group size compile one
    graph (Dynamo's limit is 8 a function; past it, it would run eagerly). A single group would
    be a second graph (Dynamo specializes sizes of 1), so every shape here has two or more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for n in range(9, 19):
        w = torch.randn(n, 128 * (2 + n % 3))
        packed, scale, zero = quant.quantize_int4_groupwise(w, 128, True, "grid")
        x = torch.randn(1, w.shape[1])
        ref = quant.fake_quant_w4a16_linear(x, w, None, 128, True, "grid")
        assert _rel_err(cpu_fused.int4_gemv_bits(x, packed, scale, zero, 128, symmetric=True), ref) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("form", ["w8a16", "w4a16", "w8a8"])
def test_int8_faces_use_the_bits_gemv_at_few_tokens_on_avx2(form, monkeypatch, int8_gemm):
    """On a CPU with AVX2 alone (mode "float") the weight-only CPU faces and w8a8's 'f32' plan run
    the bit-mask GEMV once per token up to BITS_GEMV_MAX_TOKENS (4) tokens, and their other path
    above it, each equal to the fake-quant reference. The int8 ones take it only on weights of
    INT8_BITS_GEMV_MIN_WEIGHTS values or more."""
    from qhl.codegen import w4a16, w8a16

    int8_gemm("float")
    monkeypatch.setattr(cpu_fused, "INT8_BITS_GEMV_MIN_WEIGHTS", 24 * 256)  # these 24 x 256 weights
    name = "int4_gemv_bits" if form == "w4a16" else "int8_gemv_bits"
    calls = []
    real = getattr(cpu_fused, name)
    monkeypatch.setattr(cpu_fused, name, lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w, b = torch.randn(24, 256), torch.randn(24)
    for tokens in (1, 3, cpu_fused.BITS_GEMV_MAX_TOKENS + 1):
        x = torch.randn(tokens, 256)
        if form == "w4a16":
            p, s, z = quant.quantize_int4_groupwise(w, 64, True, "grid")
            out, ref = w4a16.w4a16_linear(x, p, s, z, 64, b), quant.fake_quant_w4a16_linear(x, w, b, 64, True, "grid")
        else:
            q, s = quant.quantize_int8_per_channel(w)
            op, fake = (w8a16.w8a16_linear, quant.fake_quant_w8a16_linear) if form == "w8a16" else \
                (w8a8.w8a8_linear, quant.fake_quant_w8a8_linear)
            out, ref = op(x, q, s, b), fake(x, w, b)
        assert out.shape == (tokens, 24) and _rel_err(out, ref) < 1e-6
    assert calls == [1, 3]
    if form != "w4a16":  # a smaller int8 weight keeps the float32 path (the GEMV's call costs more)
        monkeypatch.setattr(cpu_fused, "INT8_BITS_GEMV_MIN_WEIGHTS", 24 * 256 + 1)
        assert not cpu_fused.int8_bits_gemv_worthwhile(1, 24, 256)
        q, s = quant.quantize_int8_per_channel(w)
        (w8a16.w8a16_linear if form == "w8a16" else w8a8.w8a8_linear)(torch.randn(1, 256), q, s, b)
        assert calls == [1, 3]


def test_cached_code_gemv_compiles_once_per_k_and_group(int8_gemm):
    """The cached-code w4a16 GEMV (CPUs with a fast int8 GEMM) marks its output rows dynamic:
    ten output widths with one K and group size compile one graph, each still the spec's result."""
    from torch._dynamo.utils import counters

    from qhl.codegen import w4a16

    int8_gemm("int8")
    torch._dynamo.reset()
    counters.clear()
    for n in range(9, 19):
        w, x = torch.randn(n, 256), torch.randn(1, 256)
        packed, scale, zero = quant.quantize_int4_groupwise(w, 64, True, "grid")
        out = w4a16.w4a16_linear(x, packed, scale, zero, 64, None)
        assert _rel_err(out, quant.fake_quant_w4a16_linear(x, w, None, 64, True, "grid")) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1



def test_cached_code_gemv_serves_few_tokens(monkeypatch, int8_gemm):
    """With a fast int8 GEMM, w4a16 at 1 to GEMV_MAX_TOKENS (8) tokens runs the cached-code GEMV
    (a small decode batch), and the tiled path above. 2-8 tokens share one compiled graph (the
    token count is dynamic above 1). Every result is the fake-quant reference's."""
    from torch._dynamo.utils import counters

    from qhl.codegen import w4a16

    int8_gemm("int8")
    calls = []
    real = cpu_fused.int4_gemv
    monkeypatch.setattr(cpu_fused, "int4_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch._dynamo.reset()
    counters.clear()
    w, b = torch.randn(24, 256), torch.randn(24)
    packed, scale, zero = quant.quantize_int4_groupwise(w, 64, False)
    for tokens in (1, 2, 3, w4a16.GEMV_MAX_TOKENS, w4a16.GEMV_MAX_TOKENS + 1):
        x = torch.randn(tokens, 256)
        out = w4a16.w4a16_linear(x, packed, scale, zero, 64, b)
        assert _rel_err(out, quant.fake_quant_w4a16_linear(x, w, b, 64, False, "none")) < 1e-6
    assert calls == [1, 2, 3, w4a16.GEMV_MAX_TOKENS]
    assert counters["stats"]["unique_graphs"] == 2  # 1 token, and 2 to GEMV_MAX_TOKENS tokens


def test_w8a16_gemv_reads_a_realized_activation(int8_gemm):
    """The GEMV decomposition hands Inductor x as a buffer of its own (cpu_fused.realized), so the
    previous layer's epilogue is not recomputed once per output row inside the GEMV's loop (that
    made w8a16 at 1 token 2x slower on 4 x 4096^2 layers)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qhl.codegen import w8a16

    int8_gemm("int8")
    w = torch.randn(24, 64)
    q, s = quant.quantize_int8_per_channel(w)
    x, b = torch.randn(2, 64), torch.randn(24)
    gm = make_fx(lambda x: w8a16.w8a16_linear_decomposed(x, q, s, b))(x)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "prims.inductor_force_stride_order.default" in targets, targets
    assert _rel_err(gm(x), quant.fake_quant_w8a16_linear(x, w, b)) < 1e-6


@pytest.mark.parametrize("amx, group", [(False, 128), (True, 128), (False, 64)])
def test_w4a16_bits_gemv_is_lowered_with_a_fast_int8_gemm_for_large_groups(amx, group, monkeypatch, int8_gemm):
    """With a fast int8 GEMM and no AMX, w4a16 g128 at 1-4 tokens is the bit-mask GEMV inside
    Inductor's graph (faster than the face's cached-code GEMV and without its unpacked codes). With
    AMX, or with g64 (whose 8-lane groups measured slower there), it is the face's cached-code
    GEMV instead, written into the graph by w4a16_codes_gemv. No qhl::w4a16_linear call is left
    either way; all equal the op-by-op graph."""
    from qhl.codegen import w4a16
    from torch._inductor.utils import run_and_get_code

    int8_gemm("int8")
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: amx)
    model, x = _stack(256, 2), torch.randn(3, 256)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=qhl.backend("w4a16", group_size=group, cpu_codegen="spec"), dynamic=False)(x)
    torch._dynamo.reset()
    be = qhl.backend("w4a16", group_size=group)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend=be, dynamic=False), x)
    assert "\n".join(codes).count("torch.ops.qhl.w4a16_linear.default(") == 0
    bits = not amx and group >= w4a16.FAST_INT8_BITS_MIN_GROUP
    [record] = [p for p in be.graphs[0].passes if p.name == "w4a16_codes_gemv"]
    assert record.stats == {"lowered": 0 if bits else 2, "kept": 2 if bits else 0}
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("recipe", ["w4a8", "hadamard-w4a8"])
@pytest.mark.parametrize("amx", [False, True])
def test_w4ax_bits_gemv_is_lowered_with_a_fast_int8_gemm_unless_amx(recipe, amx, monkeypatch, int8_gemm):
    """With a fast int8 GEMM and no AMX, w4a8 at 1-4 tokens is the bit-mask GEMV inside Inductor's
    graph, as with AVX2 alone (no qhl::w4a8_linear call left; bit-identical to the face's int8 GEMV
    on cached codes and faster); with AMX it stays a call to the face."""
    int8_gemm("int8")
    monkeypatch.setattr(cpu_onednn, "cpu_has_amx", lambda: amx)
    ref, out, source, _ = _spec_and_inductor(_stack(256, 2), torch.randn(3, 256), recipe)
    calls = source.count("torch.ops.qhl.w4a8_linear.default(")
    assert calls == (2 if amx else 0)
    assert _rel_err(out, ref) < 1e-5
