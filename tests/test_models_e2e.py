"""End to end: real weights (SmolLM2-135M, all-MiniLM-L6-v2; marked `model`) compiled with each
preset, and tiny transformers config models (llama, bert, gpt2) through both doors.

SQNR floors were measured on the CI machine (torch 2.13 CPU) and set a few dB below; the measured
value is stated next to each floor.
"""
from __future__ import annotations

import math

import pytest
import torch
from qhl_testing import compile_run, fake_quant_module

import qhl
from qhl.metrics import sqnr_db

RECIPES = {
    # name: (recipe knobs, SmolLM2 logits SQNR floor, MiniLM hidden-state SQNR floor)
    # SmolLM2 (1 x 64 news tokens) measured: w8a8 19.5 dB, w8a16 30.3 dB, w4a16 g64 5.9 dB
    # MiniLM (4 padded sentences) measured:   w8a8 20.3 dB, w8a16 27.7 dB, w4a16 g64 10.0 dB
    # (round-to-nearest int4 on every layer is a big hit: SmolLM2 perplexity goes 33 -> 72.)
    "w8a8": ({}, 17.0, 18.0),
    "w8a16": ({}, 27.0, 25.0),
    # SmolLM2's K=576 is not a multiple of the default group size 128: g=64 rewrites every layer.
    "w4a16": ({"group_size": 64}, 4.5, 8.0),
}


_compile_run = compile_run  # (out, backend) of torch.compile(model, backend=qhl.backend(recipe))


def _layers(be):
    """Layers with a weight (Linear/Conv1D), deduplicated by path, from the inference graphs."""
    rows = {}
    for g in be.graphs:
        for info in g.layers:
            if info.weight is not None:
                rows.setdefault(info.path, info)
    return rows


# --- SmolLM2-135M (real weights) -------------------------------------------------------------------


# The `smollm2` fixture (model, 1 x 64 news tokens, float32 logits) is in conftest.py.


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_smollm2(smollm2, recipe):
    model, ids, ref = smollm2
    knobs, floor, _ = RECIPES[recipe]
    out, be = _compile_run(model, (ids,), recipe, **knobs)
    s = sqnr_db(ref, out.logits)
    print(f"SmolLM2 {recipe}: logits SQNR {s:.2f} dB")
    assert math.isfinite(s) and s > floor, s
    layers = _layers(be)
    rewritten = [p for p, i in layers.items() if i.form]
    assert len(rewritten) == 210  # 30 blocks x (q, k, v, o, gate, up, down)
    assert all(i.form == recipe for i in layers.values() if i.form)
    assert layers["model.layers.0.self_attn.q_proj"].form == recipe
    assert layers["model.layers.29.mlp.down_proj"].form == recipe
    assert layers["lm_head"].form is None
    assert layers["lm_head"].reason == "in the recipe's skip list ('lm_head')"
    assert set(layers) == set(rewritten) | {"lm_head"}


# --- all-MiniLM-L6-v2 (real weights) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from qhl.models import load_minilm, sentiment_sentences

    model, tok = load_minilm()
    batch = tok(sentiment_sentences(4), padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = model(*inputs).last_hidden_state
    return model, inputs, ref


@pytest.mark.model
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_minilm(minilm, recipe):
    model, inputs, ref = minilm
    knobs, _, floor = RECIPES[recipe]
    out, be = _compile_run(model, inputs, recipe, **knobs)
    s = sqnr_db(ref, out.last_hidden_state)
    print(f"MiniLM {recipe}: last_hidden_state SQNR {s:.2f} dB")
    assert math.isfinite(s) and s > floor, s
    layers = _layers(be)
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense)
    # + pooler.dense: every Linear of a BertModel is a rewritable matmul (no lm_head, no skip).
    assert len(layers) == 37
    assert all(i.form == recipe for i in layers.values()), {p: i.reason for p, i in layers.items() if not i.form}
    assert "encoder.layer.5.output.dense" in layers and "pooler.dense" in layers


# --- transformers config models through both doors -------------------------------------------------

CONFIG = {
    # kind: (number of Linear/Conv1D layers rewritten, paths that must be there, left-float paths)
    "llama": (14, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], ["lm_head"]),
    "bert": (13, ["encoder.layer.0.attention.self.query", "pooler.dense"], []),
    "gpt2": (
        8,
        ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
         "transformer.h.1.mlp.c_proj"],
        ["lm_head"],
    ),
}


def _first(out):
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0]


@pytest.mark.parametrize("kind", list(CONFIG))
@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_config_model_compile_matches_fake_quant(kind, recipe):
    """torch.compile door: module paths, layer counts, and the compiled output against the eager
    fake-quant model of the same recipe (GPT-2 exercises the Conv1D [K, N] weights)."""
    from qhl.models import config_model

    model, inputs = config_model(kind)  # as returned: use_cache on for the causal LMs
    knobs = {"group_size": 32} if recipe == "w4a16" else {}
    out, be = _compile_run(model, inputs, recipe, **knobs)
    reference = fake_quant_module(model, recipe, group_size=32)
    with torch.no_grad():
        ref, fq = _first(model(*inputs)), _first(reference(*inputs))
    out = _first(out)
    n, present, left_float = CONFIG[kind]
    layers = _layers(be)
    assert sum(1 for i in layers.values() if i.form == recipe) == n, sorted(layers)
    for p in present:
        assert layers[p].form == recipe, p
    for p in left_float:
        assert layers[p].form is None and layers[p].reason == "in the recipe's skip list ('lm_head')"
    s_compiled, s_fq = sqnr_db(ref, out), sqnr_db(ref, fq)
    print(f"{kind} {recipe}: compiled {s_compiled:.2f} dB, fake-quant {s_fq:.2f} dB, "
          f"compiled vs fake-quant {sqnr_db(fq, out):.1f} dB")
    assert abs(s_compiled - s_fq) < 0.5, (s_compiled, s_fq)
    # measured 128-146 dB: the compiled layers compute the spec up to float32 rounding
    assert sqnr_db(fq, out) > 100


@pytest.mark.parametrize("kind", list(CONFIG))
def test_config_model_both_doors_agree(kind):
    """torch.compile and qhl.inspect find and rewrite the same layers, with similar fidelity."""
    from qhl.models import config_model

    model, inputs = config_model(kind)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the export door cannot return a DynamicCache
    out, be = _compile_run(model, inputs, "w8a16")
    report = qhl.inspect(model, inputs, recipe="w8a16")
    compile_paths = [p for p, i in _layers(be).items() if i.form]
    inspect_paths = list(dict.fromkeys(r.path for r in report.rewritten))
    assert compile_paths == inspect_paths
    with torch.no_grad():
        ref = _first(model(*inputs))
    assert abs(sqnr_db(ref, _first(out)) - report.output_sqnr_db) < 1.0


def test_generate_with_kv_cache_matches_fake_quant():
    """`model.generate` with a compiled forward (the usual way to serve an LM): prefill, then
    1-token decode steps against a growing KV cache. Greedy tokens equal the eager fake-quant
    model's, and the cache's growing length costs one recompile (dynamic), not one per token."""
    from qhl.models import config_model

    model, (ids,) = config_model("llama")
    ids = ids[:1]
    reference = fake_quant_module(model, "w8a8")
    be = qhl.backend("w8a8")
    model.forward = torch.compile(model.forward, backend=be)
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()
    # prefill (16 tokens), decode with the cache at length 16, decode with a dynamic length
    assert len(be.graphs) <= 3, [g.codegen for g in be.graphs]
    for g in be.graphs:
        forms = {i.path: i.form for i in g.layers if i.weight is not None}
        assert forms["model.layers.0.self_attn.q_proj"] == "w8a8" and forms["lm_head"] is None
