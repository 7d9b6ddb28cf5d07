"""qhl::gralora_linear, qhl::gralora_w4a16_linear — a frozen base matmul plus a GraLoRA adapter.

GraLoRA (techniques.md section 3) splits the weight into a k x k grid of sub-blocks. With
T tokens, k blocks, R = GraLoRA rank (R % k == 0), in/k = I, out/k = O, R/k = c:

    x_adapter [T, in] viewed [T, k, I]             (x_adapter = x unless dropout was applied)
    h[t, n, :]  = x_adapter[t, n-block] @ A[n]                A: lora_a [k, I, R]      -> [T, k, R]
    g[t, j, n*c:(n+1)*c] = h[t, n, j*c:(j+1)*c]    regroup rank chunks by output block -> [T, k, R]
    z[t, j-block] = g[t, j, :] @ B[j]                         B: lora_b [k, R, O]      -> [T, out]
    u = x_adapter @ hybrid_a.T                                hybrid_a [hr, in]        -> [T, hr]
    y = x @ W.T + b + scaling * (z + u @ hybrid_b.T)          hybrid_b [out, hr], W [out, in]

This is peft's einsum forward (`GraloraLayer`/`Linear.forward`), re-derived here, for any number
of leading dims of x (peft stops at 3-D: we flatten). LoRA is k = 1: lora_a = lora_A.weight.T[None],
lora_b = lora_B.weight.T[None], and the above reduces to x A^T B^T. peft's scaling is
alpha / (r + hybrid_r); it is an input here.

Merged form (rank <= c per block, rank(dW) up to k R): block (output j, input n) of the update is
    dW[j-block, n-block] = scaling * (A[n][:, j*c:(j+1)*c] @ B[j][n*c:(n+1)*c, :]).T     [O, I]
plus scaling * hybrid_b @ hybrid_a (gralora_delta_weight).

Dropout: peft applies it to the adapter path only; the caller passes the dropped input as
x_adapter. (peft's hybrid branch calls its dropout module a second time, so in training it sees
another mask than the GraLoRA branch; here both branches read the one x_adapter. In eval mode,
or with dropout 0, the two agree.)

Faces:
  spec    this file: batched matmuls over the k blocks (CPU and any device). When the base
          output and the adapters share a dtype, the blocks' products are added into the base
          output in place, with the scaling applied to g [k, T, R] (cheaper than to [T, out]);
  fake    shape [..., out], dtype of x;
  kernel  codegen/triton/gralora.py (CUDA): the base GEMM with the block low-rank branch as its
          epilogue;
  grad    explicit, block by block, no dense dW (on CUDA the Triton backward kernels of
          codegen/triton/gralora.py, elsewhere the batched matmuls of adapter_backward). With
          s = scaling and dy viewed [T, k, O]:
              dB[j]   = s * g[:, j]^T @ dy[:, j]                          [R, O]
              dh      = s * (dy[:, j] @ B[j]^T), regrouped back           [T, k, R]
              dA[n]   = x_adapter[:, n-block]^T @ dh[:, n]                [I, R]
              dx_adapter = dh[:, n] @ A[n]^T (per block) + s * dy @ hybrid_b @ hybrid_a
              dhybrid_b = s * dy^T @ u,  dhybrid_a = (s * dy @ hybrid_b)^T @ x_adapter
              dx = dy @ W (+ dx_adapter when x_adapter is None),  db = sum dy
          Saved for the backward: x_adapter (or x), the adapters and the frozen base. g and u
          are recomputed (the op returns y only): that repeats the adapter's first projection
          (2 T in (R + hr) flops) instead of keeping k R + hr floats per token. The base weight
          is frozen (grad None), as is `scaling`.
  onnx    codegen/onnx/gralora.py: MatMul base + batched MatMul adapter.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from qhl.codegen import quant
from qhl.errors import UnsupportedError

__all__ = [
    "gralora_linear",
    "gralora_w4a16_linear",
    "gralora_linear_spec",
    "gralora_w4a16_linear_spec",
    "gralora_adapter_spec",
    "adapter_backward",
    "gralora_delta_weight",
    "check_gralora_shapes",
]


def check_gralora_shapes(
    in_features: int,
    out_features: int,
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
) -> Optional[str]:
    """None when the adapter tensors fit a [out, in] layer, else the reason (a string)."""
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        return f"lora_a/lora_b must be 3-D [k, in/k, R] / [k, R, out/k], got {tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
    k, i_blk, r = lora_a.shape
    if k <= 0 or r % k != 0:
        return f"rank R={r} is not divisible by k={k}"
    if in_features % k != 0 or out_features % k != 0:
        return f"in={in_features} and out={out_features} must be divisible by k={k}"
    if i_blk * k != in_features:
        return f"lora_a is {tuple(lora_a.shape)}, expected [{k}, {in_features // k}, R]"
    if tuple(lora_b.shape) != (k, r, out_features // k):
        return f"lora_b is {tuple(lora_b.shape)}, expected [{k}, {r}, {out_features // k}]"
    if (hybrid_a is None) != (hybrid_b is None):
        return "hybrid_a and hybrid_b must be given together"
    if hybrid_a is not None:
        hr = hybrid_a.shape[0]
        if tuple(hybrid_a.shape) != (hr, in_features) or tuple(hybrid_b.shape) != (
            out_features,
            hr,
        ):
            return (
                f"hybrid_a {tuple(hybrid_a.shape)} / hybrid_b {tuple(hybrid_b.shape)} "
                f"do not fit [hr, {in_features}] / [{out_features}, hr]"
            )
    return None


def _check(in_features, out_features, lora_a, lora_b, hybrid_a, hybrid_b) -> None:
    reason = check_gralora_shapes(in_features, out_features, lora_a, lora_b, hybrid_a, hybrid_b)
    if reason is not None:
        raise UnsupportedError(f"gralora: {reason}")


# --- the block low-rank pieces (shared by the spec, the backward and the tests) -------------------


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """torch.bmm, through a 2-D mm for one block (LoRA, k = 1): mm takes transposed operands
    (lora_A.weight.T) natively, where bmm over a strided batch measured ~2x slower on CPU."""
    if a.shape[0] == 1:
        return torch.mm(a[0], b[0]).unsqueeze(0)
    return torch.bmm(a, b)


def _regroup(h: Tensor, k: int) -> Tensor:
    """[k(a), T, R] -> [k(b), T, R]: chunk b of row a goes to chunk a of row b (an involution)."""
    _, t, r = h.shape
    return h.view(k, t, k, r // k).permute(2, 1, 0, 3).reshape(k, t, r)


def _block_down(x2: Tensor, lora_a: Tensor) -> Tensor:
    """x2 [T, in] -> g [k(out block j), T, R]: the per-block projection, regrouped."""
    k, i_blk, _ = lora_a.shape
    xb = x2.view(-1, k, i_blk).transpose(0, 1)  # [k, T, I]
    return _regroup(_bmm(xb, lora_a), k)


def _block_up(g: Tensor, lora_b: Tensor) -> Tensor:
    """g [k, T, R] -> z [T, out]: output block j = g[j] @ B[j]."""
    z = _bmm(g, lora_b)  # [k, T, O]
    return z.transpose(0, 1).reshape(g.shape[1], -1)


def gralora_adapter_spec(
    x_adapter: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
) -> Tensor:
    """The adapter path alone: scaling * (gralora(x) + x hybrid_a^T hybrid_b^T), in lora_a's dtype,
    shape [..., out]."""
    in_features = x_adapter.shape[-1]
    x2 = x_adapter.reshape(-1, in_features).to(lora_a.dtype)
    z = _block_up(_block_down(x2, lora_a), lora_b)
    if hybrid_a is not None:
        z = z + (x2 @ hybrid_a.t().to(x2.dtype)) @ hybrid_b.t().to(x2.dtype)
    return (z * scaling).reshape(*x_adapter.shape[:-1], z.shape[-1])


def gralora_delta_weight(
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
) -> Tensor:
    """The merged update dW [out, in] (peft's get_delta_weight): W + dW gives the same layer."""
    k, i_blk, r = lora_a.shape
    o_blk = lora_b.shape[2]
    c = r // k
    # A[n][:, j*c:(j+1)*c] -> a[j, n] [I, c];  B[j][n*c:(n+1)*c, :] -> b[j, n] [c, O]
    a = lora_a.view(k, i_blk, k, c).permute(2, 0, 1, 3)  # [j, n, I, c]
    b = lora_b.view(k, k, c, o_blk)  # [j, n, c, O]
    blocks = torch.matmul(a, b)  # [j, n, I, O]: the transposed block (j, n)
    dw = blocks.permute(0, 3, 1, 2).reshape(k * o_blk, k * i_blk)  # [j, O, n, I] -> [out, in]
    if hybrid_a is not None:
        dw = dw + hybrid_b.to(dw.dtype) @ hybrid_a.to(dw.dtype)
    return dw * scaling


# --- spec faces -----------------------------------------------------------------------------------


def _combine(
    base: Tensor, x: Tensor, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b, scaling
) -> Tensor:
    """base [..., out] (a fresh tensor) + the adapter of x_adapter (or x), in x's dtype."""
    xa = x if x_adapter is None else x_adapter
    if base.dtype != lora_a.dtype or xa.dtype != lora_a.dtype:
        delta = gralora_adapter_spec(xa, lora_a, lora_b, hybrid_a, hybrid_b, scaling)
        return (base + delta.to(base.dtype)).to(x.dtype)
    # one dtype: add each output block's low-rank product into the base output in place, with the
    # scaling applied to g [k, T, R] (small) rather than to a [T, out] product
    k = lora_a.shape[0]
    in_features, out_features = xa.shape[-1], base.shape[-1]
    x2 = xa.reshape(-1, in_features)
    y = base.reshape(-1, out_features)
    t = y.shape[0]
    g = _block_down(x2, lora_a).mul_(scaling)
    y.view(t, k, -1).transpose(0, 1).add_(_bmm(g, lora_b))
    if hybrid_a is not None:
        y.addmm_(x2 @ hybrid_a.t(), hybrid_b.t(), alpha=scaling)
    return y.reshape(base.shape).to(x.dtype)


def gralora_linear_spec(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
    x_adapter: Optional[Tensor] = None,
) -> Tensor:
    """Spec face of qhl::gralora_linear (see the module docstring)."""
    out_features, in_features = weight.shape
    _check(in_features, out_features, lora_a, lora_b, hybrid_a, hybrid_b)
    xb = x if x.dtype == weight.dtype else x.to(weight.dtype)
    base = F.linear(xb, weight, None if bias is None else bias.to(weight.dtype))
    return _combine(base, x, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b, scaling)


def gralora_w4a16_linear_spec(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    group_size: int,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
    x_adapter: Optional[Tensor] = None,
) -> Tensor:
    """Spec face of qhl::gralora_w4a16_linear: the w4a16_linear base plus the adapter."""
    from qhl.codegen.w4a16 import w4a16_linear_spec

    out_features, in_features = w_packed.shape[0], w_packed.shape[1] * 2
    _check(in_features, out_features, lora_a, lora_b, hybrid_a, hybrid_b)
    base = w4a16_linear_spec(x, w_packed, w_scale, w_zero, group_size, bias)
    return _combine(base, x, x_adapter, lora_a, lora_b, hybrid_a, hybrid_b, scaling)


# --- the ops ---------------------------------------------------------------------------------------
# Each op's default face is its spec function itself: custom_op infers the op's schema from the
# spec's signature, so the two cannot drift apart. The fake and CUDA faces below serve both ops.
# They take the op's arguments in schema order: the base's (x, its weight tensors, bias), then
# the adapter's (lora_a, lora_b, hybrid_a, hybrid_b, scaling, x_adapter). The dispatcher leaves out
# a trailing x_adapter that is None, hence *args rather than a fixed count.

gralora_linear = torch.library.custom_op("qhl::gralora_linear", mutates_args=())(
    gralora_linear_spec
)
gralora_w4a16_linear = torch.library.custom_op("qhl::gralora_w4a16_linear", mutates_args=())(
    gralora_w4a16_linear_spec
)


def _n_base_args(spec) -> int:
    """How many of the op's arguments come before lora_a (3 for gralora, 6 for gralora_w4a16)."""
    return list(inspect.signature(spec).parameters).index("lora_a")


def _fake(x: Tensor, weight: Tensor, *args) -> Tensor:
    """Fake face of both ops: [..., out] in x's dtype; out = rows of weight (or of w_packed)."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _cuda_face(spec, triton_name: str):
    """The CUDA kernel face of the op whose spec is `spec`: the Triton kernels (the function
    `triton_name` of codegen/triton/gralora.py) when they take the adapter's ranks, else the spec
    (plain torch ops, which run on CUDA too)."""
    n_base = _n_base_args(spec)

    def kernel(*args):
        from qhl.codegen.triton import gralora as triton_gralora

        lora_a, hybrid_a = args[n_base], args[n_base + 2]
        if not triton_gralora.supports(lora_a, hybrid_a):
            return spec(*args)
        return getattr(triton_gralora, triton_name)(*args)

    return kernel


gralora_linear.register_fake(_fake)
gralora_w4a16_linear.register_fake(_fake)
gralora_linear.register_kernel("cuda")(_cuda_face(gralora_linear_spec, "gralora_linear_triton"))
gralora_w4a16_linear.register_kernel("cuda")(
    _cuda_face(gralora_w4a16_linear_spec, "gralora_w4a16_linear_triton")
)


# --- grad face ---------------------------------------------------------------------------------------


def adapter_backward(
    grad: Tensor,
    x_adapter: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    hybrid_a: Optional[Tensor],
    hybrid_b: Optional[Tensor],
    scaling: float,
    need: tuple[bool, bool, bool, bool, bool],
    dx_into: Optional[Tensor] = None,
):
    """Gradients of scaling * adapter(x_adapter) given dy [..., out], block by block.

    need = (d x_adapter, d lora_a, d lora_b, d hybrid_a, d hybrid_b). Returns the five gradients
    (None where not needed); d x_adapter is [T, in] in lora_a's dtype, accumulated into dx_into
    ([T, in], that dtype) when given. The scaling is applied to the small tensors (dh, du, dB,
    dhybrid_b), never to a [T, out] copy of dy."""
    need_x, need_a, need_b, need_ha, need_hb = need
    k, i_blk, r = lora_a.shape
    in_features = k * i_blk
    dt = lora_a.dtype
    x2 = x_adapter.reshape(-1, in_features).to(dt)
    dy = grad.reshape(-1, grad.shape[-1]).to(dt)  # [T, out]
    t = dy.shape[0]
    dyb = dy.view(t, k, -1).transpose(0, 1)  # [k, T, O]
    dx = dx_into
    da = db = dha = dhb = None
    if need_b:
        g = _block_down(x2, lora_a)  # recomputed: the op returns y only
        db = _bmm(g.transpose(1, 2), dyb).mul_(scaling)  # [k, R, O]
    if need_x or need_a:
        dh = _regroup(_bmm(dyb, lora_b.transpose(1, 2)), k).mul_(scaling)  # [k(n), T, R]
        if need_a:
            xb = x2.view(t, k, i_blk).transpose(0, 1)  # [k, T, I]
            da = _bmm(xb.transpose(1, 2), dh)  # [k, I, R]
        if need_x:
            dxb = _bmm(dh, lora_a.transpose(1, 2))  # [k, T, I]
            if dx is None:
                dx = dxb.transpose(0, 1).reshape(t, in_features)
            else:
                dx.view(t, k, i_blk).transpose(0, 1).add_(dxb)
    if hybrid_a is not None and (need_x or need_ha or need_hb):
        ha, hb = hybrid_a.to(dt), hybrid_b.to(dt)
        du = torch.mm(dy, hb).mul_(scaling)  # [T, hr]
        if need_hb:
            dhb = torch.mm(dy.t(), x2 @ ha.t()).mul_(scaling)  # [out, hr]
        if need_ha:
            dha = du.t() @ x2  # [hr, in]
        if need_x:
            dx.addmm_(du, ha)
    return dx, da, db, dha, dhb


def _saved_adapter(ctx):
    """(x_adapter or x, lora_a, lora_b, hybrid_a, hybrid_b) as saved; the hybrids None when the op
    had none (they are saved as empty tensors then)."""
    x_adapter, lora_a, lora_b, hybrid_a, hybrid_b = ctx.saved_tensors[:5]
    if not ctx.has_hybrid:
        hybrid_a = hybrid_b = None
    return x_adapter, lora_a, lora_b, hybrid_a, hybrid_b


def _bias_grad(ctx, grad: Tensor) -> Optional[Tensor]:
    if not ctx.need_bias:
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)


def _grads_common(ctx, grad: Tensor, dx_base: Optional[Tensor]):
    x_adapter, lora_a, lora_b, hybrid_a, hybrid_b = _saved_adapter(ctx)
    need_x, need_a, need_b, need_ha, need_hb, need_xa = ctx.needs
    adapter_x_grad = need_xa if ctx.separate_adapter_input else need_x
    # accumulate the adapter's dx into the base's in place when both are x's (same dtype)
    into = None
    if adapter_x_grad and not ctx.separate_adapter_input and dx_base.dtype == lora_a.dtype:
        into = dx_base
    dxa, da, db, dha, dhb = adapter_backward(
        grad,
        x_adapter,
        lora_a,
        lora_b,
        hybrid_a,
        hybrid_b,
        ctx.scaling,
        (adapter_x_grad, need_a, need_b, need_ha, need_hb),
        dx_into=into,
    )
    shape = ctx.x_shape
    grad_x = grad_xa = None
    if ctx.separate_adapter_input:
        if need_xa:
            grad_xa = dxa.reshape(shape).to(ctx.xa_dtype)
        if need_x:
            grad_x = dx_base.reshape(shape).to(ctx.x_dtype)
    elif need_x:
        dx = dxa if into is not None else dx_base + dxa.to(dx_base.dtype)
        grad_x = dx.reshape(shape).to(ctx.x_dtype)
    da = None if da is None else da.to(lora_a.dtype)
    db = None if db is None else db.to(lora_b.dtype)
    dha = None if dha is None else dha.to(hybrid_a.dtype)
    dhb = None if dhb is None else dhb.to(hybrid_b.dtype)
    return grad_x, _bias_grad(ctx, grad), da, db, dha, dhb, grad_xa


def _save_common(ctx, inputs) -> list[Tensor]:
    """Keeps on ctx what the backward of either op needs; returns the adapter tensors to save.

    inputs: all of the op's arguments (defaults filled in), in schema order. Both ops end with
    bias and then the adapter's six (lora_a, lora_b, hybrid_a, hybrid_b, scaling, x_adapter).
    needs_input_grad is indexed from the front: custom_op's may hold an entry past the inputs."""
    at = len(inputs) - 6  # where the adapter's arguments start
    x, bias = inputs[0], inputs[at - 1]
    lora_a, lora_b, hybrid_a, hybrid_b, scaling, x_adapter = inputs[at:]
    n = ctx.needs_input_grad
    has_h = hybrid_a is not None
    ctx.separate_adapter_input = x_adapter is not None
    ctx.has_hybrid = has_h
    ctx.scaling = scaling
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.xa_dtype = (x if x_adapter is None else x_adapter).dtype
    # (x, lora_a, lora_b, hybrid_a, hybrid_b, x_adapter); no hybrid gradients without hybrids
    ctx.needs = (n[0], n[at], n[at + 1], n[at + 2] and has_h, n[at + 3] and has_h, n[at + 5])
    ctx.need_bias = bias is not None and n[at - 1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    empty = lora_a.new_empty(0)
    return [
        x if x_adapter is None else x_adapter,
        lora_a,
        lora_b,
        hybrid_a if hybrid_a is not None else empty,
        hybrid_b if hybrid_b is not None else empty,
    ]


def _triton_supports(ctx) -> bool:
    from qhl.codegen.triton.gralora import supports

    _, lora_a, _, hybrid_a, _ = _saved_adapter(ctx)
    return supports(lora_a, hybrid_a)


def _backward_cuda(ctx, grad: Tensor, weight: Optional[Tensor]):
    """The grad face on CUDA: the Triton backward kernels (codegen/triton/gralora.py)."""
    from qhl.codegen.triton.gralora import gralora_backward_triton

    x_adapter, lora_a, lora_b, hybrid_a, hybrid_b = _saved_adapter(ctx)
    dx, dxa, da, db, dha, dhb = gralora_backward_triton(
        grad,
        x_adapter,
        weight,
        lora_a,
        lora_b,
        hybrid_a,
        hybrid_b,
        ctx.scaling,
        ctx.separate_adapter_input,
        ctx.needs,
    )
    gx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
    gxa = None if dxa is None else dxa.reshape(ctx.x_shape).to(ctx.xa_dtype)
    return gx, _bias_grad(ctx, grad), da, db, dha, dhb, gxa


def _grads(ctx, grad: Tensor, weight: Optional[Tensor]):
    """(dx, dbias, dA, dB, dhybrid_a, dhybrid_b, dx_adapter) of either op. weight: the frozen
    base [out, in] (dequantized for gralora_w4a16); it may be None when x needs no gradient."""
    if grad.is_cuda and _triton_supports(ctx):
        return _backward_cuda(ctx, grad, weight)
    dx_base = None
    if ctx.needs[0]:
        dx_base = grad.reshape(-1, grad.shape[-1]).to(weight.dtype) @ weight
    return _grads_common(ctx, grad, dx_base)


def _setup_context(ctx, inputs, output) -> None:
    weight = inputs[1]
    ctx.save_for_backward(*_save_common(ctx, inputs), weight)


def _backward(ctx, grad: Tensor):
    gx, gb, da, db, dha, dhb, gxa = _grads(ctx, grad, ctx.saved_tensors[5])
    return gx, None, gb, da, db, dha, dhb, None, gxa


gralora_linear.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_w4(ctx, inputs, output) -> None:
    packed, scale, zero, group_size = inputs[1:5]
    ctx.group_size = group_size
    ctx.save_for_backward(*_save_common(ctx, inputs), packed, scale, zero)


def _backward_w4(ctx, grad: Tensor):
    w = None
    if ctx.needs[0]:  # the base's dx needs the weight; it is dequantized only then
        packed, scale, zero = ctx.saved_tensors[5:8]
        w = quant.dequantize_int4_groupwise(packed, scale, zero, ctx.group_size)
    gx, gb, da, db, dha, dhb, gxa = _grads(ctx, grad, w)
    return gx, None, None, None, None, gb, da, db, dha, dhb, None, gxa


gralora_w4a16_linear.register_autograd(_backward_w4, setup_context=_setup_context_w4)
