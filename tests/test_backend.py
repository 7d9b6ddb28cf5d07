"""The torch.compile door: the entry point, recipes and options, fidelity against the fake-quant
spec, dynamic shapes, training, float64, and verify mode."""
from __future__ import annotations

import logging
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from qhl_testing import MLP, fake_quant_module

import qhl
import qhl.passes
from qhl.graph import aten
from qhl.metrics import sqnr_db

REPO = pathlib.Path(__file__).resolve().parents[1]


def _compile(model, recipe="w8a8", **knobs):
    be = qhl.backend(recipe, **knobs)
    return torch.compile(model, backend=be), be


def _forms(graph) -> list[str | None]:
    return [info.form for info in graph.layers]


# --- the entry point ------------------------------------------------------------------------------

_ENTRY_POINT_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import torch
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(name)s %(message)s")
    for noisy in ("torch", "torchao", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    assert "qhl" not in sys.modules, "qhl was imported before torch.compile"
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = m(x)
        out8 = torch.compile(m, backend="qhl")(x)
        print("QHL_LOADED_BY_ENTRY_POINT", "qhl" in sys.modules)
        torch._dynamo.reset()
        out4 = torch.compile(m, backend="qhl", options={"recipe": "w4a16", "group_size": 64})(x)
    from qhl.metrics import sqnr_db
    print("SQNR_W8A8", sqnr_db(ref, out8))
    print("SQNR_W4A16", sqnr_db(ref, out4))
    """
)


def test_entry_point_in_fresh_process_without_importing_qhl(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _ENTRY_POINT_SCRIPT],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "QHL_LOADED_BY_ENTRY_POINT True" in out
    # the backend's summary log: both Linear layers rewritten, with the recipe's form
    assert "2 rewritten ['w8a8']" in out, out
    assert "2 rewritten ['w4a16']" in out, out
    s8 = float(out.split("SQNR_W8A8 ")[1].split()[0])
    s4 = float(out.split("SQNR_W4A16 ")[1].split()[0])
    # quantized (not exact float), at the fidelity each recipe gives here (measured 41.7 / 21.0 dB)
    assert 30 < s8 < 50, s8
    assert 10 < s4 < 25 and s4 < s8, s4


def test_backend_object_picks_recipe_and_exposes_layers():
    model = MLP(head=True).eval()
    x = torch.randn(2, 8, 64)
    compiled, be = _compile(model, "w4a16", group_size=64)
    assert be.recipe == qhl.recipe("w4a16", group_size=64)
    with torch.no_grad():
        compiled(x)
    assert len(be.graphs) == 1 and be.graphs[-1].kind == "inference"
    layers = be.graphs[-1].layers
    assert [i.path for i in layers] == ["fc1", "fc2", "lm_head"]
    assert _forms(be.graphs[-1]) == ["w4a16", "w4a16", None]
    assert layers[0].knobs["group_size"] == 64
    assert layers[2].reason == "in the recipe's skip list ('lm_head')"
    # The recipe's passes, then the codegen passes (nothing to fuse here, no w8a8 to lower, and 16
    # tokens are more than w4a16_codes_gemv's 8).
    codegen = (["fuse_sibling_linears", "float_codes_gemm", "w4a16_codes_gemv"] if be.graphs[-1].codegen == "inductor"
               else ["fuse_sibling_linears"])
    assert [p.name for p in be.graphs[-1].passes] == [*qhl.recipe("w4a16").passes, *codegen]
    assert not any(p.changed for p in be.graphs[-1].passes[len(qhl.recipe("w4a16").passes):])
    ops = [n.target for n in be.graphs[-1].gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qhl.w4a16_linear.default) == 2


def test_options_dict_recipe_through_registered_name():
    model = MLP().eval()
    x = torch.randn(3, 64)
    spec = qhl.recipe("w8a16", skip=("fc2",)).to_dict()
    with torch.no_grad():
        out = torch.compile(model, backend="qhl", options={"recipe": spec})(x)
        ref = model(x)
    assert 35 < sqnr_db(ref, out) < 70


@pytest.mark.parametrize("form", ["w8a8", "w8a16", "w4a16"])
def test_compiled_matches_fake_quant_reference(form):
    """Each rewritten layer computes its spec: compiled vs eager SQNR equals the fake-quant eager
    model's SQNR within 0.5 dB, and compiled vs fake-quant differs only by float32 noise."""
    model = MLP(head=True).eval()
    x = torch.randn(4, 16, 64)
    knobs = {"group_size": 32} if form == "w4a16" else {}
    compiled, be = _compile(model, form, **knobs)
    reference = fake_quant_module(model, form, group_size=32)
    with torch.no_grad():
        ref, out, fq = model(x), compiled(x), reference(x)
    assert _forms(be.graphs[-1]) == [form, form, None]
    s_compiled, s_fq = sqnr_db(ref, out), sqnr_db(ref, fq)
    assert abs(s_compiled - s_fq) < 0.5, (s_compiled, s_fq)
    # measured: 140 / 133 / 133 dB (w8a8 / w8a16 / w4a16); vs float: 40.8 / 46.2 / 21.4 dB
    assert sqnr_db(fq, out) > 100, (sqnr_db(fq, out), s_fq)


def test_half_precision_models():
    for dtype in (torch.float16, torch.bfloat16):
        torch._dynamo.reset()
        model = MLP(dtype=dtype).eval()
        x = torch.randn(2, 5, 64, dtype=dtype)
        compiled, be = _compile(model, "w8a8")
        with torch.no_grad():
            out, ref = compiled(x), model(x)
        assert out.dtype == dtype
        assert _forms(be.graphs[-1]) == ["w8a8", "w8a8"]
        assert sqnr_db(ref, out) > 25


def test_shape_changes_do_not_recompile_per_size():
    model = MLP().eval()
    compiled, be = _compile(model, "w8a8")
    with torch.no_grad():
        for batch in (2, 3, 5):
            for seq in (4, 8, 16, 24):
                x = torch.randn(batch, seq, 64)
                out = compiled(x)
                assert out.shape == (batch, seq, 32)
                assert sqnr_db(model(x), out) > 30
    # first call static, then at most one recompile per dimension (Dynamo marks it dynamic)
    assert 1 <= len(be.graphs) <= 3, [g.layers[0].x_shape for g in be.graphs]
    for g in be.graphs:
        assert _forms(g) == ["w8a8", "w8a8"]
    assert any(not isinstance(s, int) for s in be.graphs[-1].layers[0].x_shape)


# --- training -------------------------------------------------------------------------------------


def test_training_step_with_frozen_base_weights():
    """Frozen weights: the forward graph's Linear layers are rewritten; grads flow to x and biases,
    and an optimizer step updates the biases."""
    model = MLP().train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    ref_model = MLP().train()
    ref_model.load_state_dict(model.state_dict())
    compiled, be = _compile(model, "w8a8")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 5, 64, requires_grad=True)
    target = torch.randn(2, 5, 32)

    loss = torch.nn.functional.mse_loss(compiled(x), target)
    loss.backward()
    kinds = [g.kind for g in be.graphs]
    assert kinds == ["forward", "backward"]
    fwd = be.graphs[0]
    assert _forms(fwd) == ["w8a8", "w8a8"]

    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.mse_loss(ref_model(x_ref), target).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the quantized forward moves the gradient only by quantization noise
    assert sqnr_db(x_ref.grad, x.grad) > 25
    assert sqnr_db(ref_model.fc1.bias.grad, model.fc1.bias.grad) > 25
    assert sqnr_db(ref_model.fc2.bias.grad, model.fc2.bias.grad) > 25
    assert model.fc1.weight.grad is None

    before = model.fc2.bias.detach().clone()
    opt.step()
    assert not torch.equal(before, model.fc2.bias)
    # a second step reuses the compiled graphs
    opt.zero_grad()
    torch.nn.functional.mse_loss(compiled(x), target).backward()
    assert len(be.graphs) == 2


def test_training_with_trainable_weights_quantizes_forward_and_repacks_after_each_step():
    """Trainable weights are rewritten too: the forward runs w8a8 on the current weights (the
    packed copy is refreshed when an optimizer step changes a weight in place), and the backward
    is the float backward (straight-through), so every parameter gets its gradient."""
    model = MLP().train()
    ref_model = MLP().train()
    ref_model.load_state_dict(model.state_dict())
    compiled, be = _compile(model, "w8a8")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 64)
    compiled(x).square().mean().backward()
    ref_model(x).square().mean().backward()
    fwd = next(g for g in be.graphs if g.kind == "forward")
    assert _forms(fwd) == ["w8a8", "w8a8"]
    # float gradients through the quantized forward: they move only by quantization noise
    assert sqnr_db(ref_model.fc1.weight.grad, model.fc1.weight.grad) > 20
    opt.step()
    assert not torch.equal(model.fc1.weight, ref_model.fc1.weight)
    # the next forward quantizes the UPDATED weights: it equals the fake-quant reference of the
    # new weights to float32 noise (a stale packed weight would sit near 40 dB here, not > 100)
    out = compiled(x)  # same grad mode as before: the same compiled graphs run
    with torch.no_grad():
        fresh = fake_quant_module(model, "w8a8")(x)
    assert sqnr_db(fresh, out) > 100
    assert len(be.graphs) == 2  # no recompilation: the re-pack is a guard, not a new graph


# --- float64 --------------------------------------------------------------------------------------


def test_float64_model_left_float_and_exact():
    model = MLP(dtype=torch.float64).eval()
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    compiled, be = _compile(model, "w8a8")
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert _forms(be.graphs[-1]) == [None, None]
    for info in be.graphs[-1].layers:
        assert info.reason == "torch.float64 matmul: only float32/float16/bfloat16 matmuls are rewritten"
    assert torch.equal(out, ref)


# --- verify mode ----------------------------------------------------------------------------------


def test_verify_mode_records_sqnr_per_pass():
    model = MLP().eval()
    compiled, be = _compile(model, qhl.recipe("w8a8", verify=True))
    with torch.no_grad():
        compiled(torch.randn(2, 6, 64))
    records = {p.name: p for p in be.graphs[-1].passes}
    assert math.isinf(records["canonicalize_matmuls"].verified_sqnr_db)
    assert math.isinf(records["select_layers"].verified_sqnr_db)
    assert 30 < records["quantize_linear"].verified_sqnr_db < 60


def _broken_canonicalize(gm):
    """canonicalize_matmuls, then scale the first output by 1.1: a 'lossless' pass that is not."""
    res = qhl.passes.canonicalize_matmuls(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first, *rest = out.args[0]
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(aten.mul.Tensor, (first, 1.1))
    out.args = ((scaled, *rest),)
    gm.recompile()
    return qhl.passes.PassResult(gm, True, res.stats)


def test_verify_mode_catches_a_broken_lossless_pass(monkeypatch):
    monkeypatch.setitem(qhl.passes.PASSES, "canonicalize_matmuls", _broken_canonicalize)
    model = MLP().eval()
    x = torch.randn(2, 6, 64)
    # the inspect door raises the VerificationError itself
    with pytest.raises(qhl.VerificationError, match="canonicalize_matmuls"):
        qhl.inspect(model, (x,), recipe="w8a8", verify=True)
    # the torch.compile door: Dynamo wraps backend errors in BackendCompilerFailed
    compiled, _ = _compile(model, qhl.recipe("w8a8", verify=True))
    with pytest.raises(Exception) as e, torch.no_grad():
        compiled(x)
    inner = getattr(e.value, "inner_exception", e.value)
    assert isinstance(inner, qhl.VerificationError), repr(e.value)
    assert "canonicalize_matmuls" in str(inner) and "80 dB" in str(inner)
    # without verify the broken pass goes through (that is what verify is for)
    torch._dynamo.reset()
    compiled, _ = _compile(model, "w8a8")
    with torch.no_grad():
        assert sqnr_db(model(x), compiled(x)) < 25


def test_eval_model_called_without_no_grad_is_rewritten():
    model = MLP().eval()
    x = torch.randn(2, 5, 64)
    compiled, be = _compile(model, "w8a8")
    compiled(x)  # plain inference call, as in most user code
    assert _forms(be.graphs[-1]) == ["w8a8", "w8a8"]


def test_autocast_bf16_layers_are_rewritten():
    model = MLP().eval()
    x = torch.randn(2, 5, 64)
    compiled, be = _compile(model, "w8a8")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    for info in be.graphs[-1].layers:
        assert info.reason != "no weight operand: both operands are activations", info.path
    assert _forms(be.graphs[-1]) == ["w8a8", "w8a8"]


def test_graph_summary_log_names_the_most_common_float_reason(caplog):
    """The backend's one-line summary per graph says why most of the layers it left float were
    left (the per-layer reasons are in backend.graphs[i].layers)."""
    model = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 128), torch.nn.Linear(128, 8)).eval()
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="qhl.compile_backend"), torch.no_grad():
        torch.compile(model, backend=qhl.backend("w4a16", cpu_codegen="spec"))(torch.randn(2, 96))
    assert "2 left as they were (most: 2 x in_features K=96 is not divisible by group_size=128;" in caplog.text


def test_grad_mode_compile_warns_once_that_inference_wants_no_grad(monkeypatch, caplog):
    """An eval model called with gradients on compiles a training graph (op by op on CPU): easy to
    miss, several times slower; the backend says so once per process."""
    import qhl.compile_backend as cb

    monkeypatch.setattr(cb, "_warned_training_graph", False)
    model = MLP().eval()
    compiled, be = _compile(model)
    x = torch.randn(2, 64)
    with caplog.at_level(logging.WARNING, logger="qhl"):
        compiled(x)
        compiled(torch.randn(3, 5, 64))  # another graph: no second warning
    assert [g.kind for g in be.graphs][0] == "forward"
    hits = [r for r in caplog.records if "grad mode is on" in r.getMessage()]
    assert len(hits) == 1 and "torch.no_grad()" in hits[0].getMessage()
    caplog.clear()
    cb._warned_training_graph = False  # an inference graph must not warn even when it could
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="qhl"):
        torch.compile(MLP().eval(), backend=qhl.backend("w8a8"))(x)
    assert not [r for r in caplog.records if "grad mode is on" in r.getMessage()]
