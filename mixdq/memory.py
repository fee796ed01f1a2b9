"""Bytes a UNet holds, measured and predicted.

`model_nbytes` measures: the sum of every parameter's and buffer's nbytes.  On
the prepacked int8 backends (oneDNN, FBGEMM: CPUs without VNNI) a layer's codes
move into the backend's prepacked copy (layers.QuantLayer._release_codes); such
codes count at one byte per weight, the copy's codes: for 2-4-bit layers twice
or four times their packed size, since those backends have no low-bit kernels
(`prepacked_extra_nbytes`; the copy's block padding is not counted).
`layer_costs` predicts, per layer and weight bit-width, the bytes the layer
will hold once quantized; `quantize` then makes the prediction true (tested).
1 MB = 1e6 bytes throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from .plan import WEIGHT_BITS, LayerBits, Plan
from .quant import QuantLayer, is_bos_layer, layer_spec, quantizable_layers, quantized_nbytes, shortcut_splits
from .quant.backends.common import held_nbytes

MB = 1_000_000


def model_nbytes(module: nn.Module) -> int:
    """Bytes the module holds now: its tensors, and what prepacked int8 copies hold
    beyond the codes they replace (prepacked_extra_nbytes)."""
    return stored_nbytes(module) + prepacked_extra_nbytes(module)


def stored_nbytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (each tensor counted once): what an export
    stores, and what `layer_costs` predicts for a plan, on any machine."""
    seen = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def prepacked_extra_nbytes(module: nn.Module) -> int:
    """Bytes the prepacked int8 copies hold beyond the packed codes they replace:
    one byte per weight of 2-4-bit layers instead of their packed size (0 elsewhere,
    and for int_mm's patch-order copies, packed as the layer packs)."""
    return sum(held_nbytes(m._held_prepacked, math.prod(m.weight_shape)) - m.weight_packed.nbytes
               for m in module.modules() if isinstance(m, QuantLayer) and m._held_prepacked is not None)


@dataclass
class LayerCosts:
    fixed_bytes: int                      # everything outside the quantizable layers
    bytes: dict[str, dict[int, int]]      # layer -> weight bits -> bytes (act quantized)
    float_bytes: dict[str, int]           # layer left untouched (W16A16)
    weight_numel: dict[str, int]

    def layer_bytes(self, name: str, bits: LayerBits) -> int:
        return self.float_bytes[name] if bits.is_float else self.bytes[name][bits.weight]

    def total_bytes(self, plan: Plan) -> int:
        return self.fixed_bytes + sum(
            self.layer_bytes(n, plan[n]) if n in plan else self.float_bytes[n]
            for n in self.float_bytes)

    def total_mb(self, plan: Plan) -> float:
        return self.total_bytes(plan) / MB

    def float_mb(self) -> float:
        return (self.fixed_bytes + sum(self.float_bytes.values())) / MB


def layer_costs(unet: nn.Module) -> LayerCosts:
    """Exact bytes of each quantizable layer at each weight bit-width."""
    layers = quantizable_layers(unet)
    splits = shortcut_splits(unet)
    costs, floats, numel = {}, {}, {}
    layer_bytes = 0
    for name, module in layers.items():
        shape, has_bias, dtype = layer_spec(module)
        kw = dict(parts=2 if splits.get(name) else 1,
                  bos=isinstance(module, nn.Linear) and is_bos_layer(name) or getattr(module, "bos_aware", False))
        costs[name] = {w: quantized_nbytes(shape, has_bias, LayerBits(w, 8), dtype, **kw) for w in WEIGHT_BITS}
        floats[name] = quantized_nbytes(shape, has_bias, LayerBits(16, 16), dtype)
        numel[name] = 1
        for d in shape:
            numel[name] *= d
        layer_bytes += model_nbytes(module)
    fixed = model_nbytes(unet) - layer_bytes
    return LayerCosts(fixed_bytes=fixed, bytes=costs, float_bytes=floats, weight_numel=numel)


def equivalent_bits(size_mb: float, float_mb: float, float_bits: int = 32) -> float:
    """The bit-width a uniformly quantized UNet of `size_mb` would have: float bits scaled by
    size / float size (32 on CPU, 16 for a float16 model; scales and kept-float parts count)."""
    return float_bits * size_mb / float_mb


def dtype_bits(unet) -> int:
    import torch

    return torch.finfo(unet.dtype).bits
