"""What the benchmark scripts share: what every result records about where it was measured (the
machine, the library versions, the load on the cores, a fingerprint of the qhl sources measured),
round-robin timing, cosine / SQNR on numpy outputs, and writing a result as JSON + Markdown."""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import qhl

__all__ = ["qhl_sources", "machine", "round_robin_ms", "round_robin", "rotated", "cosine", "sqnr", "json_safe",
           "write_results"]


def qhl_sources() -> dict[str, str]:
    """A fingerprint of the qhl code measured: qhl changes often, and numbers belong to a version."""
    root = pathlib.Path(qhl.__file__).resolve().parent.parent
    files = sorted(p for d in ("compiler", "passes", "codegen", "runtime") for p in (root / d).rglob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    newest = max(files, key=lambda p: p.stat().st_mtime)
    mtime = datetime.datetime.fromtimestamp(newest.stat().st_mtime, datetime.timezone.utc)
    stamp = mtime.strftime("%Y-%m-%d %H:%M:%S UTC")
    return dict(sha256=digest, newest_file=str(newest.relative_to(root)), newest_mtime=stamp)


def machine(*packages: str) -> dict[str, Any]:
    """The machine and versions; `packages` adds the named modules' __version__ (e.g. "torchao")."""
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {name: __import__(name).__version__ for name in packages}
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                **versions, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                qhl=qhl_sources(),
                # PyTorch's CPU allocator backs buffers >= 2 MiB with transparent huge pages when this
                # is set (read once, at the first allocation): it changes large-M timings
                thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
                load_avg_1m=round(os.getloadavg()[0], 2))


def round_robin_ms(fns: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Each call's wall time in ms, `reps` per function, after `warmup` untimed calls of each.

    One call of each function in turn, rather than all reps of one then all of the next, so that a
    noisy neighbour on a shared box slows every variant alike and their ratio stays meaningful; the
    order rotates every repetition (see `rotated`).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name in rotated(list(fns), rep):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def rotated(names: list[str], rep: int) -> list[str]:
    """The round-robin order of repetition `rep`: `names` rotated by `rep`, with the order of
    the others shuffled (seeded by `rep`, so a run is repeatable). The variant that runs right
    after another's large working set pays for the caches that one evicted (measured with eager
    float32 before a 4 x 4096^2 int8 stack at 512 tokens: about 2 ms of 30). A plain rotation
    keeps the cyclic order, so a variant would sit right after the same neighbour in all but
    one of every len(names) repetitions; here each goes first equally often, and the places and
    neighbours of the rest change at random."""
    if not names:
        return []
    k = rep % len(names)
    first, rest = names[k], names[:k] + names[k + 1:]
    random.Random(rep).shuffle(rest)
    return [first] + rest


def round_robin(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """`round_robin_ms` summarised per function: median_ms, min_ms and the number of runs."""
    times = round_robin_ms(fns, reps, warmup)
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t), "runs": len(t)} for n, t in times.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `out` against `ref` in dB, in float64 (inf when equal)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    err = float(np.sum((ref - out) ** 2))
    return math.inf if err == 0 else 10 * math.log10(float(np.sum(ref**2)) / err)


def json_safe(v: Any, drop_private: bool = False) -> Any:
    """v with string keys, lists for tuples, and None for inf/nan (JSON has neither). With
    drop_private, dict keys starting with "_" (tensors kept for checks only) are left out."""
    if isinstance(v, dict):
        return {str(k): json_safe(x, drop_private) for k, x in v.items()
                if not (drop_private and str(k).startswith("_"))}
    if isinstance(v, (list, tuple)):
        return [json_safe(x, drop_private) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_results(out: pathlib.Path, res: dict[str, Any], to_markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write `res` to out.json and to_markdown(res) to out.md (any suffix of `out` is replaced),
    print the Markdown and return it. The JSON is written first, so a failing table keeps it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    md = to_markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return md
