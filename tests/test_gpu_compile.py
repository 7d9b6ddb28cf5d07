"""Every Triton kernel qhl launches compiles for real GPUs (sm_80 and sm_90), with no GPU here.

The kernel tests run under TRITON_INTERPRET=1, which accepts programs the NVIDIA backend rejects
(block sizes under tl.dot's minimums, shapes a layout cannot take). test_triton_kernels.py compiles
the templated w8a8 / w8a16 / w4a16 kernels ahead of time; this file does the same for the kernels
written once (w4a8/w4a4 GEMM, FWHT and fused FWHT + quantize, GraLoRA forward and backward, block
low-rank) and for the rendered prologues they launch.

How: a fresh process without the interpreter calls each op's Triton wrapper on small CPU tensors
with the launches intercepted (the device check allows CPU, nothing runs). Each intercepted launch
(the kernel, its arguments, its constexprs, num_warps) is then compiled to a cubin with
triton.compile, so the programs compiled are exactly those the wrappers would launch on a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)  # A100 (mma.sync) and H100 (wgmma) lower tl.dot differently
_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8", "uint8": "u8",
          "int32": "i32", "int64": "i64"}


def _launch_all() -> None:
    """Call every fixed-kernel wrapper once per interesting variant (inside the subprocess)."""
    import torch

    from qhl.codegen import quant
    from qhl.codegen.triton import gralora, hadamard, lowrank, w4ax
    from qhl.codegen.triton.per_token_quant import per_token_quant_bits

    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(4, 128, dtype=dtype)
        packed, scale = quant.quantize_int4_per_channel(torch.randn(48, 128))
        per_token_quant_bits(x, 4)
        w4ax.w4ax_linear_triton(x, packed, scale, torch.randn(48, dtype=dtype), -1, 8)
        w4ax.w4ax_linear_triton(x, packed, scale, None, -1, 4)
    for n, block in ((576, 0), (4096, 0), (1536, 128)):
        hadamard.hadamard_triton(torch.randn(3, n), block)
        hadamard.hadamard_triton(torch.randn(3, n, dtype=torch.float16), block, True)
        hadamard.hadamard_quantize_triton(torch.randn(3, n), block, 4)
    # SmolLM2's sizes too (K = 576, N = 1536), where the block choices differ
    x = torch.randn(2, 576, dtype=torch.float16)
    packed, scale = quant.quantize_int4_per_channel(torch.randn(1536, 576))
    w4ax.w4ax_linear_triton(x, packed, scale, None, -1, 8)
    # GraLoRA: a small case, and SmolLM2's q_proj (576 -> 576) at k = 4, r = 32, hybrid 8
    for k, r, d_in, d_out, hr, dt in ((2, 8, 64, 48, 4, torch.float32), (4, 32, 576, 576, 8, torch.bfloat16)):
        x, w, b = (torch.randn(3, d_in, dtype=dt), torch.randn(d_out, d_in, dtype=dt), torch.randn(d_out, dtype=dt))
        la, lb = torch.randn(k, d_in // k, r, dtype=dt), torch.randn(k, r, d_out // k, dtype=dt)
        ha, hb = torch.randn(hr, d_in, dtype=dt), torch.randn(d_out, hr, dtype=dt)
        gralora.gralora_linear_triton(x, w, b, la, lb, ha, hb, 0.7)
        gralora.gralora_linear_triton(x, w, None, la, lb, None, None, 0.7, torch.randn(3, d_in, dtype=dt))
        p4, s4, z4 = quant.quantize_int4_groupwise(torch.randn(d_out, d_in), 32, False)
        gralora.gralora_w4a16_linear_triton(x, p4, s4, z4, 32, b, la, lb, ha, hb, 0.5)
        gralora.gralora_backward_triton(torch.randn(3, d_out, dtype=dt), x, w, la, lb, ha, hb, 0.7, False,
                                        (True, True, True, True, True, False))
    ranks = [21, 0, 3, 16]  # k = 2, R = 40; one block of rank 0
    u, v = torch.randn(40, 40), torch.randn(40, 48)
    lowrank.blocklr_linear_triton(torch.randn(3, 96), u, v, ranks, torch.randn(80))
    pl, sl, zl = quant.quantize_int4_groupwise(torch.randn(48, 128), 32, False)
    lowrank.lr_w4a16_linear_triton(torch.randn(5, 128), torch.randn(48, 18), torch.randn(18, 128),
                                   pl, sl, zl, 32, torch.randn(48))


def _capture_and_compile() -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from qhl.codegen.triton import emit

    launches = []

    def getitem(self, grid):
        return lambda *args, **kwargs: launches.append((self, args, kwargs))

    JITFunction.__getitem__ = getitem
    emit.check_device = lambda op, **tensors: next(t.device for t in tensors.values() if t is not None)
    _launch_all()
    assert launches, "no kernel launch was intercepted"
    seen = set()
    for fn, args, kwargs in launches:
        num_warps = kwargs.pop("num_warps", 4)
        signature, constexprs = {}, {}
        for i, param in enumerate(fn.params):
            value = args[i] if i < len(args) else kwargs[param.name]
            if param.is_constexpr or value is None:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _TYPES[str(value.dtype).replace("torch.", "")]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
            else:
                signature[param.name] = "fp32"
        key = (fn.__name__, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        source = ASTSource(fn, signature, constexprs=constexprs)
        for arch in ARCHS:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            assert compiled.asm["cubin"], (fn.__name__, arch)
    names = sorted({fn.__name__ for fn, _, _ in launches})
    print(f"compiled {len(seen)} launches of {len(names)} kernels for sm_{ARCHS}: {', '.join(names)}")


def test_fixed_kernels_compile_for_gpus():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as e:  # noqa: BLE001  (no NVIDIA backend or ptxas in this triton build)
        pytest.skip(f"Triton's NVIDIA toolchain is unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, "--compile-for-gpus"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # every kernel family the wrappers launch was compiled
    for name in ("w4ax_gemm_kernel", "hadamard_kernel", "gemm_lowrank_kernel", "block_project_regroup_kernel",
                 "batched_tn_kernel", "blocklr_kernel", "qhl_per_token_quant_k128_q7_fp16", "qhl_w4a16_k64"):
        assert name in done.stdout, (name, done.stdout[-2000:])


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-gpus"]:
    _capture_and_compile()
