"""What every benchmark result records about where it was measured: the machine, the library
versions, the load on the cores, and a fingerprint of the qhl sources measured."""
from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import platform
from typing import Any

import torch

import qhl

__all__ = ["qhl_sources", "machine"]


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
                load_avg_1m=round(os.getloadavg()[0], 2))
