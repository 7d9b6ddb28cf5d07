"""qhl.inspect and its Report: layer rows, per-layer SQNR, renderings (text, HTML, JSON), pass
records, kernel sources, and the `qhl inspect` command line."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from qhl_testing import MLP

import qhl
from qhl.codegen import quant
from qhl.metrics import sqnr_db

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlp_report():
    torch.manual_seed(0)
    model = MLP(head=True).eval()
    x = torch.randn(2, 8, 64)
    return model, x, qhl.inspect(model, (x,), recipe="w8a8")


def test_layer_rows(mlp_report):
    _, _, report = mlp_report
    assert isinstance(report, qhl.Report)
    assert report.model_name == "MLP" and report.recipe == qhl.recipe("w8a8")
    rows = {r.path: r for r in report.layers}
    assert list(rows) == ["fc1", "fc2", "lm_head"]
    assert [r.form for r in report.layers] == ["w8a8", "w8a8", None]
    assert [r.path for r in report.rewritten] == ["fc1", "fc2"]
    for path in ("fc1", "fc2"):
        assert rows[path].reason is None
        assert math.isfinite(rows[path].sqnr_db) and 30 < rows[path].sqnr_db < 60
    assert rows["lm_head"].sqnr_db is None
    assert rows["lm_head"].reason == "in the recipe's skip list ('lm_head')"
    assert (rows["fc1"].in_features, rows["fc1"].out_features, rows["fc1"].op) == (64, 128, "linear")
    assert rows["fc1"].x_shape == (2, 8, 64)
    assert rows["fc1"].weight_bytes_before == 128 * 64 * 4
    assert rows["fc1"].weight_bytes_after == 128 * 64 + 128 * 4
    before, after = report.weight_bytes
    assert after < 0.3 * before
    assert math.isfinite(report.output_sqnr_db) and 25 < report.output_sqnr_db < 60


def test_layer_sqnr_matches_an_independent_computation(mlp_report):
    """Each layer's SQNR is its own error: its output vs float32 F.linear on the same input."""
    model, x, report = mlp_report
    rows = {r.path: r for r in report.layers}
    w1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    w2, b2 = model.fc2.weight.detach(), model.fc2.bias.detach()
    y1 = quant.fake_quant_w8a8_linear(x, w1, b1).float()
    assert abs(rows["fc1"].sqnr_db - sqnr_db(torch.nn.functional.linear(x, w1, b1), y1)) < 0.5
    h = torch.relu(y1)  # fc2's input in the rewritten graph is the quantized fc1's output
    y2 = quant.fake_quant_w8a8_linear(h, w2, b2)
    assert abs(rows["fc2"].sqnr_db - sqnr_db(torch.nn.functional.linear(h, w2, b2), y2)) < 0.5


def test_str_contains_the_table(mlp_report):
    _, _, report = mlp_report
    text = str(report)
    assert "qhl report: MLP, recipe 'w8a8'" in text
    assert "matmuls found: 3, rewritten: 2, left as they were: 1" in text
    assert "left float, by reason:\n       1 x in the recipe's skip list ('lm_head')" in text
    header = next(line for line in text.splitlines() if line.startswith("path"))
    for column in ("op", "K->N", "form", "SQNR", "bytes before->after", "reason"):
        assert column in header
    fc1 = next(line for line in text.splitlines() if line.startswith("fc1 "))
    assert "64->128" in fc1 and "w8a8" in fc1 and " dB" in fc1
    lm_head = next(line for line in text.splitlines() if line.startswith("lm_head"))
    assert "float" in lm_head and "skip list" in lm_head
    for name in qhl.recipe("w8a8").passes:
        assert name in text


def test_to_html_is_self_contained(mlp_report, tmp_path):
    _, _, report = mlp_report
    path = tmp_path / "report.html"
    page = report.to_html(str(path))
    assert path.read_text(encoding="utf-8") == page
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    for p in ("fc1", "fc2", "lm_head"):
        assert f"<td>{p}</td>" in page
    assert "skip list" in page and "quantize_linear" in page


def test_to_json_parses(mlp_report):
    _, _, report = mlp_report
    d = json.loads(report.to_json())
    assert d["model"] == "MLP"
    assert qhl.Recipe.from_dict(d["recipe"]) == report.recipe
    assert [layer["path"] for layer in d["layers"]] == ["fc1", "fc2", "lm_head"]
    assert d["layers"][0]["form"] == "w8a8" and isinstance(d["layers"][0]["sqnr_db"], float)
    assert d["layers"][2]["reason"] == "in the recipe's skip list ('lm_head')"
    assert [p["name"] for p in d["passes"]] == list(report.recipe.passes)
    assert d["weight_bytes_after"] < d["weight_bytes_before"]


def test_pass_records_have_before_and_after(mlp_report):
    _, _, report = mlp_report
    assert [p.name for p in report.passes] == ["canonicalize_matmuls", "select_layers", "quantize_linear"]
    for p in report.passes:
        assert "def forward" in p.before and "def forward" in p.after
        assert p.seconds >= 0
    quantize = report.passes[-1]
    assert quantize.changed and quantize.stats == {"rewritten": 2, "declined": 0}
    assert "torch.ops.qhl.w8a8_linear.default" not in quantize.before
    assert quantize.after.count("torch.ops.qhl.w8a8_linear.default") == 2
    assert report.passes[1].before == report.passes[1].after  # select_layers is bookkeeping


def test_pass_notes_are_shown_in_text_json_and_html(mlp_report, tmp_path):
    # Notes are what a pass declined that the layer table does not show (fuse_sibling_linears'
    # reasons); the module's report is shared, so the note goes on a copy.
    _, _, report = mlp_report
    note = "fc2 stays unfused: its op or arguments differ"
    noted = dataclasses.replace(report, passes=[dataclasses.replace(report.passes[0], notes=[note])] + report.passes[1:])
    assert f"      - {note}" in str(noted) and f"- {note}" not in str(report)
    assert json.loads(noted.to_json())["passes"][0]["notes"] == [note]
    noted.to_html(tmp_path / "r.html")
    assert note in (tmp_path / "r.html").read_text()


def test_graph_module_is_runnable(mlp_report):
    model, x, report = mlp_report
    with torch.no_grad():
        out = report.graph_module(x)
    assert sqnr_db(model(x), out) == pytest.approx(report.output_sqnr_db, abs=1e-6)


def test_kernel_sources_attached_for_rewritten_layers(mlp_report):
    _, _, report = mlp_report
    sources = report.kernel_sources()
    assert set(sources) == {"fc1", "fc2"}
    for row in report.rewritten:
        assert isinstance(row.kernel_source, str) and "triton" in row.kernel_source
        assert "@triton.jit" in row.kernel_source
        assert row.kernel_name
    assert report.layers[2].kernel_source is None


GRALORA_KERNELS = {"_dot_k_loop", "block_project_regroup_kernel", "gemm_lowrank_kernel"}
FWHT_KERNELS = {"_fwht_tile", "hadamard_kernel"}


def _jit_functions(source: str) -> set[str]:
    """Names of the @triton.jit functions in a kernel source (which must parse as Python)."""
    import ast

    return {
        f.name for f in ast.parse(source).body
        if isinstance(f, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in f.decorator_list)
    }


@pytest.mark.parametrize(
    "recipe, adapter, expected",
    [
        ("w4a8", None, {"qhl_per_token_quant_k", "w4ax_gemm_kernel"}),  # rendered prologue, fixed GEMM
        # the fused Hadamard prologue replaces the plain per-token quantize kernel
        ("hadamard-w4a4", None, FWHT_KERNELS | {"w4ax_gemm_kernel"}),
        # w8a8 is templated: its rendered kernels, after the separate online FWHT
        ("hadamard-w8a8", None, FWHT_KERNELS | {"qhl_w8a8_k"}),
        ("blocklr", None, {"blocklr_kernel"}),
        ("lr-w4a16", None, {"blocklr_kernel", "qhl_w4a16_k"}),
        ("gralora", "gralora", GRALORA_KERNELS),
        ("lora", "lora", GRALORA_KERNELS),
        ("gralora-w4a16", "gralora", GRALORA_KERNELS | {"qhl_w4a16_k"}),
    ],
)
def test_every_form_shows_the_kernels_it_launches(recipe, adapter, expected):
    """Forms with fixed (not templated) kernels show the @triton.jit functions they launch."""
    torch.manual_seed(0)
    model = MLP().eval()
    if adapter:
        model = qhl.prepare(model, adapter, r=4, k=1 if adapter == "lora" else 2, include=["fc1", "fc2"])
    report = qhl.inspect(model, (torch.randn(2, 8, 64),), recipe=recipe)
    assert [r.path for r in report.rewritten] == ["fc1", "fc2"]
    for row in report.rewritten:
        names = _jit_functions(row.kernel_source)
        # rendered kernels carry their specialisation in the name (qhl_w8a8_k64_n128_...)
        found = {n for n in expected if n in names or any(m.startswith(n) for m in names)}
        assert found == expected, (row.path, sorted(names))
        assert row.kernel_name and row.kernel_name in row.kernel_source
        assert f"K={row.in_features}" in row.kernel_source or f"K = {row.in_features}" in row.kernel_source


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16"])
def test_weight_only_recipes(recipe):
    model = MLP(head=True).eval()
    x = torch.randn(2, 4, 64)
    report = qhl.inspect(model, x, recipe=recipe, group_size=64) if recipe == "w4a16" else qhl.inspect(model, x, recipe)
    assert [r.form for r in report.layers] == [recipe, recipe, None]
    floor = 40 if recipe == "w8a16" else 15
    assert all(r.sqnr_db > floor for r in report.rewritten)


def test_inspect_declines_with_reason_in_report():
    model = torch.nn.Sequential(torch.nn.Linear(96, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    report = qhl.inspect(model, (torch.randn(3, 96),), recipe="w4a16", group_size=64)
    rows = report.layers
    assert rows[0].form is None and rows[0].reason.startswith("in_features K=96 is not divisible by group_size=64")
    assert rows[1].form is None and "K=32" in rows[1].reason
    assert report.rewritten == [] and math.isinf(report.output_sqnr_db)
    assert "exact" in str(report)


# --- config models through the export door -------------------------------------------------------

CONFIG_LAYERS = {
    # kind: (a rewritten layer path, number of Linear/Conv1D layers, the row left float with why)
    "llama": ("model.layers.0.self_attn.q_proj", 14, "lm_head"),
    "bert": ("encoder.layer.0.attention.self.query", 13, None),
    "gpt2": ("transformer.h.0.attn.c_attn", 8, "lm_head"),
}


def _config_model(kind):
    from qhl.models import config_model

    model, inputs = config_model(kind)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a DynamicCache output cannot be exported (see test below)
    return model, inputs


@pytest.mark.parametrize("kind", list(CONFIG_LAYERS))
def test_inspect_config_models(kind):
    model, inputs = _config_model(kind)
    report = qhl.inspect(model, inputs, recipe="w8a8")
    rows = {}
    for r in report.layers:
        rows.setdefault(r.path, r)
    path, n_linear, skipped = CONFIG_LAYERS[kind]
    assert rows[path].form == "w8a8" and math.isfinite(rows[path].sqnr_db)
    assert len(report.rewritten) == n_linear
    for r in report.rewritten:
        assert math.isfinite(r.sqnr_db) and r.sqnr_db > 30, (r.path, r.sqnr_db)
        assert isinstance(r.kernel_source, str) and "triton" in r.kernel_source
    for r in report.layers:
        if r.form is None:
            assert r.reason, r.path
    if skipped:
        assert rows[skipped].form is None and rows[skipped].reason == "in the recipe's skip list ('lm_head')"
    attention = [r for r in report.layers if r.op in ("matmul", "bmm")]
    assert attention and all(r.form is None and "activation" in r.reason for r in attention)
    assert report.output_sqnr_db > 25
    assert path in str(report) and path in report.to_html()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_inspect_config_causal_lm_as_returned(kind):
    from qhl.models import config_model

    model, inputs = config_model(kind)
    report = qhl.inspect(model, inputs, recipe="w8a8")
    assert len(report.rewritten) == CONFIG_LAYERS[kind][1]


# --- command line ---------------------------------------------------------------------------------


def _cli(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "qhl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_inspect_writes_json_and_html(tmp_path):
    out_json, out_html = tmp_path / "out.json", tmp_path / "out.html"
    proc = _cli(
        "inspect", "tests.qhl_testing:mlp_factory", "--recipe", "w8a16",
        "--knob", 'skip=["fc2"]', "--json", str(out_json), "--html", str(out_html),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out_json.read_text())
    assert d["recipe"]["name"] == "w8a16" and d["recipe"]["skip"] == ["fc2"]
    assert [(r["path"], r["form"]) for r in d["layers"]] == [("fc1", "w8a16"), ("fc2", None), ("lm_head", "w8a16")]
    assert "fc1" in proc.stdout and "w8a16" in proc.stdout
    assert "https://" not in out_html.read_text()


def test_cli_unknown_recipe_exits_2_with_the_message(tmp_path):
    proc = _cli("inspect", "tests.qhl_testing:mlp_factory", "--recipe", "w3a7", "--json", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "RecipeError" in text and "unknown recipe 'w3a7'" in text
    for name in ("w8a8", "w8a16", "w4a16"):
        assert name in text
    assert not (tmp_path / "x.json").exists()


def test_cli_bad_factory_exits_2(tmp_path):
    proc = _cli("inspect", "tests.qhl_testing:no_such_factory")
    assert proc.returncode == 2
    assert "cannot load 'tests.qhl_testing:no_such_factory'" in proc.stdout + proc.stderr


def test_cli_recipes_lists_presets():
    proc = _cli("recipes")
    assert proc.returncode == 0
    for name in ("w8a8", "w8a16", "w4a16"):
        assert name in proc.stdout


def test_float_layers_are_summed_up_by_reason():
    """A reason many layers share is one line above the table, most frequent first (SmolLM2 under
    the w4a16 preset: 180 layers whose K=576 no group of 128 tiles), and in the backend's log."""
    from qhl.graph import float_reasons

    model = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 96), torch.nn.Linear(96, 128),
                                torch.nn.Linear(128, 8))
    report = qhl.inspect(model, (torch.randn(2, 96),), recipe="w4a16")
    reasons = float_reasons(report.layers)
    assert [n for n, _ in reasons] == [3]
    assert reasons[0][1].startswith("in_features K=96 is not divisible by group_size=128; group_size=32 divides K")
    assert f"   3 x {reasons[0][1]}" in str(report)
    assert float_reasons(qhl.inspect(model, (torch.randn(2, 96),), recipe="w8a8").layers) == []


# --- what a user meets first: CLI factories, the demo's knobs, a short layer repr ---------------------


def test_cli_factory_that_needs_arguments_exits_2_naming_them(caplog):
    from qhl.cli import main

    assert main(["inspect", "qhl.models:config_model"]) == 2
    text = caplog.text
    assert "qhl.models:config_model must be callable with no arguments" in text and "requires kind" in text
    assert "qhl.models:tiny_llama" in text  # and where a runnable one is


def test_cli_zero_argument_model_factories():
    from qhl.models import tiny_bert

    model, (ids,) = tiny_bert()
    assert not model.training and tuple(ids.shape) == (2, 16)


def test_demo_takes_knobs_and_checks_them_before_loading_the_model(monkeypatch):
    import qhl.models
    from qhl.cli import build_parser
    from qhl.demo import run_demo

    args = build_parser().parse_args(["demo", "--recipe", "w4a16", "--knob", "group_size=64"])
    assert dict(args.knob) == {"group_size": 64}

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr(qhl.models, "load_smollm2", no_load)
    with pytest.raises(qhl.RecipeError, match="group_size"):
        run_demo("w4a16", group_size=100)


def test_matmul_info_repr_is_one_line_without_tensors():
    model = MLP().eval()
    report = qhl.inspect(model, (torch.randn(2, 64),), recipe="w4a16", group_size=32)
    gm = report.graph_module
    from qhl.graph import matmul_infos

    text = repr(matmul_infos(gm)[0][1])
    assert text.startswith("MatmulInfo(fc1, ") and "w4a16 g32" in text and " dB" in text
    assert "\n" not in text and "tensor(" not in text and len(text) < 200


def test_report_without_matmuls_says_what_qhl_rewrites():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    text = str(qhl.inspect(model, (torch.randn(1, 3, 8, 8),), recipe="w8a8"))
    assert "matmuls found: 0" in text and "Convolutions and embeddings are not rewritten" in text


def test_onnx_ops_list_an_add_only_for_a_bias():
    """A row's onnx_ops are what its translation emits: w8a8's only Add is the bias."""
    from qhl.codegen.onnx import ops_for_form

    class NoBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 64, bias=False)
            self.b = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.b(self.a(x))

    rows = {r.path: r for r in qhl.inspect(NoBias().eval(), (torch.randn(2, 64),), recipe="w8a8").layers}
    assert "Add" not in rows["a"].onnx_ops and rows["a"].onnx_ops[-2:] == ["Cast", "Mul"]
    assert rows["b"].onnx_ops[-1] == "Add"
    assert "Add" in ops_for_form("lr-w4a16", has_bias=False)  # there Add also joins the two parts
