"""qhl.codegen: every qhl:: op and its faces, found by the form's name.

    codegen/<form>.py          the torch.library op: spec (CPU), fake, grad, CUDA dispatch
    codegen/triton/<form>.py   the Triton kernel family (kernel face) and its codegen template
    codegen/onnx/<form>.py     the ONNX translation (onnx face)

Importing this package registers the qhl:: ops (and nothing else).
"""
from qhl.codegen import per_token_quant, w4a16, w8a8, w8a16  # noqa: F401  (registers the ops)
from qhl.codegen import gralora  # noqa: F401,E402  (registers qhl::gralora_*)
from qhl.codegen import w4ax  # noqa: F401,E402  (registers qhl::w4a8_linear, qhl::w4a4_linear)
from qhl.codegen import blocklr, lr_w4a16  # noqa: F401,E402  (registers qhl::blocklr_linear, qhl::lr_w4a16_linear)
from qhl.codegen import w8a8_tensor  # noqa: F401,E402  (registers qhl::w8a8_tensor_linear)
from qhl.codegen import hadamard  # noqa: F401,E402  (registers qhl::hadamard, qhl::hadamard_quantize_per_token)

__all__ = ["per_token_quant", "w8a8", "w8a16", "w4a16", "gralora"]
