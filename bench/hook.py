"""Benchmark-side routing of quantized layers through the integer kernels.

The library's layers (mixdq/quant/layers.py) now route every 8-bit-activation
layer with integer weights (linears and convs, 2-8 bits) through the int8
kernels themselves, so `route_int8` is now a no-op (it checks
`QuantConv2d.routes_int8_conv`), and with it gpu.py's `--hold-consts`: the
library layers do not read held epilogue constants.  The H100 figure measured
with it (0.76x at 512 px batch 4, bench/RESULTS.md) needs that moved into
QuantLinear (a buffer refreshed on set_ranges) before it can be reproduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mixdq.quant import kernels
from mixdq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from mixdq.quant.packing import unpack



def _int_path(layer: QuantLayer) -> bool:
    return (layer.kernel == "int_mm" and layer.weight_bits <= 8 and layer.act_bits == 8
            and layer.observing is None)


def _codes(layer: QuantLayer) -> torch.Tensor:
    return unpack(layer.weight_packed, layer.weight_bits, layer.weight_shape)


class RoutedQuantLinear(QuantLinear):
    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if _int_path(self):
            m, k, n = x.numel() // x.shape[-1], x.shape[-1], self.weight_shape[0]
            from mixdq.quant import int8_ops
            if int8_ops.int_mm_ok(m, k, n, x.device):
                consts = getattr(self, "_int8_scale", None)
                consts = None if consts is None else (self._int8_scale, self._int8_beff)
                return kernels.int8_linear(x, self.act_scale, self.act_zero_point, _codes(self),
                                           self.weight_scale, self.bias, key=self.weight_packed,
                                           consts=consts)
        return super()._linear(x)

    def hold_consts(self) -> None:
        """Keep the epilogue constants as (non-persistent) buffers: what a compiled
        graph should read (proposed for layers.py as a `weight_rowsum` buffer)."""
        from mixdq.quant import int8_ops
        if self.weight_bits > 8 or self.act_bits != 8:
            return
        with torch.no_grad():
            scale, beff = int8_ops.epilogue_consts(_codes(self).reshape(self.weight_shape[0], -1),
                                                   self.weight_scale, self.bias, self.act_scale, self.act_zero_point)
        self.register_buffer("_int8_scale", scale.clone(), persistent=False)
        self.register_buffer("_int8_beff", beff.clone(), persistent=False)


class RoutedQuantConv2d(QuantConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _int_path(self):
            codes = _codes(self)
            groups = self.conv_args.get("groups", 1)
            if kernels.conv_usable(x, codes, groups):
                return kernels.int8_conv2d(x, self.act_scale, self.act_zero_point, codes,
                                           self.weight_scale, self.bias, split=self.split,
                                           key=self.weight_packed, **self.conv_args)
        w = self.dequantized_weight(x.dtype)
        return F.conv2d(self._quantize_input(x, 1), w, self.bias, **self.conv_args)


def library_routes_everything() -> bool:
    return bool(getattr(QuantConv2d, "routes_int8_conv", False))


def route_int8(unet, hold_consts: bool = False) -> int:
    """Swap quantized layers' classes for the routed ones; returns how many changed.

    hold_consts: linears keep their epilogue constants as buffers (for
    torch.compile; ranges must be final).
    """
    if library_routes_everything():
        return 0
    n = 0
    for m in unet.modules():
        if type(m) is QuantLinear:
            m.__class__ = RoutedQuantLinear
            if hold_consts:
                m.hold_consts()
            n += 1
        elif type(m) is QuantConv2d:
            m.__class__ = RoutedQuantConv2d
            n += 1
    return n
