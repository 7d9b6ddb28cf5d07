"""Recipes: presets, knobs, validation messages, JSON round trips, layer selection rules."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qhl
from qhl.recipes import DEFAULT_SKIP, GROUP_SIZES, KNOBS, LayerOverride, Recipe


def test_presets_listed():
    names = qhl.recipes()
    assert {"w8a8", "w8a16", "w4a16"} <= set(names)
    assert names == sorted(names)
    for name in ("w8a8", "w8a16", "w4a16"):
        r = qhl.recipe(name)
        assert isinstance(r, Recipe) and r.name == name and r.form == name
        assert r.passes == ("canonicalize_matmuls", "select_layers", "quantize_linear")
        assert r.description


def test_default_recipe_is_w8a8():
    assert qhl.recipe().name == "w8a8"


def test_recipe_with_knob_is_frozen():
    r = qhl.recipe("w4a16", group_size=64)
    assert r.group_size == 64 and r.form == "w4a16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.group_size = 32  # type: ignore[misc]
    # the preset itself is unchanged
    assert qhl.recipe("w4a16").group_size == 128
    # a Recipe can be the base of another
    r2 = qhl.recipe(r, symmetric=False)
    assert (r2.group_size, r2.symmetric, r2.name) == (64, False, "w4a16")


def test_json_round_trip():
    r = qhl.recipe("w4a16", group_size=64, symmetric=False, skip=["lm_head"], include="model.*", verify=True)
    text = r.to_json()
    assert json.loads(text)["group_size"] == 64
    back = Recipe.from_json(text)
    assert back == r
    assert back.skip == ("lm_head",) and back.include == ("model.*",)
    assert isinstance(back.passes, tuple)


def test_json_round_trip_with_overrides():
    r = qhl.recipe(
        "w8a8",
        overrides=[
            LayerOverride("model.layers.0.*", keep_float=True),
            {"glob": "*.down_proj", "form": "w4a16", "group_size": 32, "symmetric": False},
        ],
    )
    assert all(isinstance(o, LayerOverride) for o in r.overrides)
    back = Recipe.from_json(r.to_json())
    assert back == r
    assert back.overrides[1] == LayerOverride("*.down_proj", form="w4a16", group_size=32, symmetric=False)
    assert Recipe.from_dict(json.loads(r.to_json(indent=None))) == r


def test_unknown_recipe_name_lists_valid_names():
    with pytest.raises(qhl.RecipeError) as e:
        qhl.recipe("w3a7")
    assert isinstance(e.value, ValueError) and isinstance(e.value, qhl.QhlError)
    msg = str(e.value)
    assert "'w3a7'" in msg
    for name in qhl.recipes():
        assert name in msg


def test_unknown_knob_lists_valid_knobs():
    with pytest.raises(qhl.RecipeError) as e:
        qhl.recipe("w8a8", group_sise=64)
    msg = str(e.value)
    assert "group_sise" in msg
    for knob in KNOBS:
        assert knob in msg


def test_knobs_cannot_change_form_or_passes():
    with pytest.raises(qhl.RecipeError):
        qhl.recipe("w8a8", form="w4a16")
    with pytest.raises(qhl.RecipeError):
        qhl.recipe("w8a8", passes=("quantize_linear",))


@pytest.mark.parametrize("bad", [48, 0, 256])
def test_bad_group_size_lists_valid_sizes(bad):
    with pytest.raises(qhl.RecipeError) as e:
        qhl.recipe("w4a16", group_size=bad)
    msg = str(e.value)
    assert str(bad) in msg
    for g in GROUP_SIZES:
        assert str(g) in msg
    assert list(GROUP_SIZES) == [32, 64, 128]


def test_bad_override_values():
    with pytest.raises(qhl.RecipeError, match="group_size=48"):
        qhl.recipe("w8a8", overrides=[LayerOverride("fc*", group_size=48)])
    with pytest.raises(qhl.RecipeError, match="unknown form 'int3'"):
        qhl.recipe("w8a8", overrides=[{"glob": "fc*", "form": "int3"}])


def test_from_dict_rejects_unknown_fields_and_versions():
    d = qhl.recipe("w8a8").to_dict()
    with pytest.raises(qhl.RecipeError, match="unknown recipe field"):
        Recipe.from_dict({**d, "bits": 8})
    with pytest.raises(qhl.RecipeError, match="version 99"):
        Recipe.from_dict({**d, "version": 99})
    with pytest.raises(qhl.RecipeError, match="unknown pass"):
        Recipe.from_dict({**d, "passes": ["canonicalize_matmuls", "fuse_everything"]})


def test_default_skip_keeps_lm_head_and_embeddings_float():
    r = qhl.recipe("w8a8")
    assert r.skip == DEFAULT_SKIP
    for path in ("lm_head", "model.lm_head", "model.embed_tokens", "embeddings.word_embeddings", "wte_embed"):
        knobs, reason = r.layer_knobs(path)
        assert knobs is None and "skip list" in reason, path
    for path in ("model.layers.0.self_attn.q_proj", "transformer.h.0.mlp.c_fc", "encoder.layer.0.output.dense"):
        knobs, reason = r.layer_knobs(path)
        assert reason is None and knobs == {"form": "w8a8", "group_size": 128, "symmetric": True, "weight_clip": "none"}


def test_layer_knobs_order_overrides_skip_include():
    r = qhl.recipe(
        "w4a16",
        include=("model.*", "lm_head"),
        overrides=[LayerOverride("model.layers.0.*", keep_float=True), LayerOverride("lm_head", form="w8a16")],
    )
    assert r.layer_knobs("model.layers.0.mlp.up_proj") == (None, "override 'model.layers.0.*' keeps this layer float")
    # an override wins over the skip list
    assert r.layer_knobs("lm_head")[0] == {"form": "w8a16", "group_size": 128, "symmetric": True, "weight_clip": "grid"}
    assert r.layer_knobs("pooler.dense") == (None, "not matched by the recipe's include globs ['model.*', 'lm_head']")
    assert r.layer_knobs("model.layers.1.mlp.up_proj")[0]["form"] == "w4a16"


def test_float_recipe_has_no_form():
    r = qhl.recipe("float")
    assert r.form is None and "quantize_linear" not in r.passes
    assert r.layer_knobs("fc1") == (None, "the recipe has no matmul form")


@pytest.mark.parametrize("k, g, sizes, advice", [
    (576, 128, None, "group_size=64 (or 32) divides K"),
    (96, 64, None, "group_size=32 divides K"),
    (100, 64, None, "any supported group size (32, 64, 128), so it stays float"),
    (576, 128, (32, 64, 96, 128, 192, 256), "group_size=192 (or 96, 64, 32) divides K"),
])
def test_group_size_advice_names_the_sizes_that_fit(k, g, sizes, advice):
    """A layer whose K no group of the recipe's size tiles is declined with the supported sizes
    that would tile it, largest first (SmolLM2's 576 under the w4a16 preset's 128)."""
    from qhl.recipes import GROUP_SIZES, group_size_advice

    text = group_size_advice(k, g, sizes or GROUP_SIZES)
    assert text.startswith(f"in_features K={k} is not divisible by ") and advice in text


def test_group_size_auto_picks_the_largest_size_that_divides_each_layer():
    """group_size="auto": per layer, the largest of 32/64/128 that divides its in_features (SmolLM2:
    g64 on the 576-wide layers, g128 on down_proj's 1536); the report's table shows it; a K no
    size divides is declined with the advice; the recipe round-trips through JSON; a form
    without "auto" (lr-w4a16) and an unknown value are RecipeErrors naming the valid ones."""
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.Linear(128, 100), torch.nn.Linear(100, 8))
    report = qhl.inspect(model, (torch.randn(2, 96),), recipe="w4a16", group_size="auto")
    rows = {r.path: r for r in report.layers}
    assert (rows["0"].form, rows["0"].group_size) == ("w4a16", 32)
    assert (rows["1"].form, rows["1"].group_size) == ("w4a16", 128)
    assert rows["2"].form is None and rows["2"].reason == (
        "in_features K=100 is not divisible by any supported group size (32, 64, 128), so it stays float")
    table = str(report)
    assert "w4a16 g32" in table and "w4a16 g128" in table
    assert "<td>w4a16 g32</td>" in report.to_html()
    r = qhl.recipe("w4a16", group_size="auto", overrides=[{"glob": "1", "group_size": 64}])
    assert Recipe.from_json(r.to_json()) == r
    assert qhl.inspect(model, (torch.randn(2, 96),), recipe=r).layers[1].group_size == 64
    with pytest.raises(qhl.RecipeError, match="'auto'"):
        qhl.recipe("w4a16", group_size=48)
    with pytest.raises(qhl.RecipeError, match="not supported by lr-w4a16"):
        qhl.recipe("lr-w4a16", group_size="auto")
