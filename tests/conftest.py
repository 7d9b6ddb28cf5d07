"""Test setup: offline, Triton interpreter on CPU, seeds, a clean Dynamo per test, shared helpers.

The environment variables are set before anything imports triton: TRITON_INTERPRET is read when
a kernel is decorated, not when it launches.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qhl_testing import make_graph  # noqa: E402

# Tests in this suite measure against float64 references; keep CPU threads fixed so timings and
# reductions are reproducible on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled frames and recompile counters do not leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def graph():
    """`graph(fn_or_module, *inputs, door="aot"|"export", training=False)` -> ATen GraphModule."""
    return make_graph


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR in dB of `out` against `ref` (qhl.metrics.sqnr_db: float64, inf when exact)."""
    from qhl.metrics import sqnr_db

    return sqnr_db(ref, out)


@pytest.fixture(name="sqnr")
def sqnr_fixture():
    return sqnr


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (real weights, KV cache off), 1 x 64 news tokens, and its float32 logits.
    Session-scoped: loading it costs ~15 s, and several test files use it."""
    from qhl.models import load_smollm2, news_corpus_tokens

    model, tok = load_smollm2()
    model.config.use_cache = False
    ids = news_corpus_tokens(tok, n_seqs=1, seq_len=64)
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


@pytest.fixture
def int8_gemm(monkeypatch):
    """int8_gemm("int8" | "float"): force cpu_onednn.int8_gemm_is_fast() for this test, so that
    each CPU plan is tested on every machine (restored afterwards)."""
    from qhl.codegen import cpu_onednn

    def force(mode: str) -> None:
        monkeypatch.setenv(cpu_onednn.INT8_GEMM_FLAG, mode)
        cpu_onednn.int8_gemm_is_fast.cache_clear()

    yield force
    monkeypatch.delenv(cpu_onednn.INT8_GEMM_FLAG, raising=False)
    cpu_onednn.int8_gemm_is_fast.cache_clear()
