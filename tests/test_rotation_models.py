"""Rotations on real weights (SmolLM2-135M, marked `model`) and on the Llama config model.

Invariance bar (issue 5): the `hadamard` recipe leaves the logits unchanged to a relative error
of 1e-4 in float32, offline and online (measured here: ~2e-6; float32 rounding of the rotated
weights and of the extra FWHT is all that moves). Accuracy floor for hadamard-w8a8 against w8a8 on
1 x 64 tokens: measured +8 to +10 dB; the floor below asks for +5 dB.
"""
from __future__ import annotations

import os

import pytest
import torch

from qhl_testing import compile_run

from qhl.metrics import sqnr_db


def _compile_run(model, inputs, recipe, **knobs):
    out, be = compile_run(model, inputs, recipe, **knobs)
    return out, be.graphs[-1].layers


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# Each SmolLM2 compile costs ~30-90 s on a 2-core machine: the suite runs the offline invariance
# check; the online one and the w8a8 comparison (two more compiles each) run with QHL_RUN_SLOW=1,
# and benchmarks/hadamard_fidelity.py measures all of them on 4 x 512 tokens.
SLOW = pytest.mark.skipif(not os.environ.get("QHL_RUN_SLOW"), reason="more SmolLM2 compiles; QHL_RUN_SLOW=1")


@pytest.mark.model
@pytest.mark.parametrize("rotation", ["offline", pytest.param("online", marks=SLOW)])
def test_smollm2_hadamard_recipe_keeps_logits(smollm2, rotation):
    model, ids, ref = smollm2
    out, layers = _compile_run(model, (ids,), "hadamard", rotation=rotation)
    assert _rel(out.logits, ref) <= 1e-4
    rotated = [i for i in layers if i.rotation]
    assert len(rotated) >= 210  # every decoder linear (+ lm_head offline)
    if rotation == "offline":
        assert all(i.rotation.startswith("offline Q=D*H576") for i in rotated)


@pytest.mark.model
@SLOW
def test_smollm2_hadamard_w8a8_beats_w8a8(smollm2):
    model, ids, ref = smollm2
    plain, _ = _compile_run(model, (ids,), "w8a8")
    rotated, layers = _compile_run(model, (ids,), "hadamard-w8a8")
    assert sqnr_db(ref, rotated.logits) >= sqnr_db(ref, plain.logits) + 5.0
    assert {i.form for i in layers if i.weight is not None and "lm_head" not in i.path} == {"w8a8"}


def test_llama_config_model_offline_rotation_is_invariant():
    from qhl.models import config_model

    model, inputs = config_model("llama")
    model.config.use_cache = False
    with torch.no_grad():
        ref = model(*inputs).logits
    out, layers = _compile_run(model, inputs, "hadamard", rotation="offline")
    assert _rel(out.logits, ref) <= 1e-5
    assert any(i.rotation and "(output)" in i.rotation for i in layers)
