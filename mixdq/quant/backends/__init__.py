"""The int8 backends, one file each.

Each module says what it is (NAME, PREPACKED: runs on a prepacked int8 copy of the
codes), where it applies (`supports(op, device, weight_shape, groups)`, op one of
'linear', 'conv', 'split': the up-block shortcut conv with two activation ranges),
and how it runs a quantized layer (`linear(layer, x)`, `conv2d(layer, x)`), beside
its raw kernels.  `kernels.layer_backend` picks one per layer; layers hold its name
(`layer.backend`), 'float' for none: their own dequantize + float op path.

  int_mm     torch._int_mm, no second copy (int_mm.py; its CPU convs hold their codes in
             patch order instead of the buffer's, same bytes)
  onednn     oneDNN qlinear / qconv on a prepacked copy (onednn.py)
  fbgemm     FBGEMM's float-in/float-out int8 linear on a prepacked copy (fbgemm.py)
  triton     fused Triton W8A8 kernels for CUDA, linears and convs (triton_cuda.py;
             on CPU tensors the same kernels in Triton's interpreter)
  triton_fp8 the same kernels on FP8 e4m3 tensor cores (triton_fp8.py; never measured
             into use: only when forced)
  reference  the fake-quant formula every kernel reproduces (reference.py; tests)
"""
from __future__ import annotations

from . import fbgemm, int_mm, onednn, triton_cuda, triton_fp8
from .reference import conv2d_reference, linear_reference

REGISTRY = {m.NAME: m for m in (int_mm, onednn, fbgemm, triton_cuda, triton_fp8)}
PREPACKED = tuple(name for name, m in REGISTRY.items() if m.PREPACKED)
# the raw kernels, as the measurement and the tests call them: f(x, s_a, z_a, codes, s_w, bias, ...),
# each computing the fake-quant reference's function (FP8's is another: triton_fp8.linear_fp8 /
# conv2d_fp8); triton's only where triton is installed (CPU tensors: its interpreter)
LINEAR_KERNELS = {"int_mm": int_mm.linear_int_mm, "onednn": onednn.linear_onednn, "fbgemm": fbgemm.linear_fbgemm}
CONV_KERNELS = {"int_mm": int_mm.conv2d_int_mm, "onednn": onednn.conv2d_onednn}
if triton_cuda.available():
    LINEAR_KERNELS["triton"] = triton_cuda.linear_triton
    CONV_KERNELS["triton"] = triton_cuda.conv2d_triton

__all__ = ["REGISTRY", "PREPACKED", "LINEAR_KERNELS", "CONV_KERNELS", "linear_reference", "conv2d_reference",
           "int_mm", "onednn", "fbgemm", "triton_cuda", "triton_fp8"]


def conv_codes_as_held(backend: str, codes, bits: int):
    """Conv codes in the form a layer on `backend` holds them (int_mm: patch order), to
    time that backend's raw conv kernel as the layers run it."""
    return int_mm.TapMajorCodes(codes, bits) if backend == "int_mm" else codes
