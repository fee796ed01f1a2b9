"""triton_fp8: the triton backend's kernel in FP8 e4m3 mode, for GPUs with FP8 tensor
cores (compute capability 8.9 and up: Ada, Hopper, Blackwell).

Activations: e4m3 with one scale per tensor (per input slice for the split shortcut
conv), s8 = max(z, 255 - z) * s / 448, the calibrated uint8 range's larger side
mapped onto e4m3's largest value; weights: the layer's integer codes rounded to e4m3
(exact up to |16|, then 3 mantissa bits), with the layer's per-channel scale; float32
accumulation, the same fused epilogue.  Not the W8A8 fake-quant function: e4m3 keeps
3 mantissa bits where int8 keeps a uniform grid, so it is never picked by measurement,
only when asked for (MIXDQ_INT8_BACKEND=triton_fp8, or bench.gpu's FP8 variant), and
checked against float16 like any other quantization.
"""
from __future__ import annotations

import functools

import torch

from . import triton_cuda

NAME = "triton_fp8"
PREPACKED = False
NEVER_SATURATES = True  # no integer accumulation


def supports(op: str, device, weight_shape=(), groups: int = 1) -> bool:
    """FP8 tensor cores (sm89+) on CUDA, or the interpreter on the CPU."""
    if not triton_cuda.supports(op, device, weight_shape, groups):
        return False
    device = torch.device(device)
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return triton_cuda.layer_linear(layer, x, fp8=True)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    return triton_cuda.layer_conv2d(layer, x, fp8=True)


linear_fp8 = functools.partial(triton_cuda.linear_triton, fp8=True)
conv2d_fp8 = functools.partial(triton_cuda.conv2d_triton, fp8=True)
