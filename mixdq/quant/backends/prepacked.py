"""What the prepacked backends (onednn, fbgemm) share: running a layer's codes (or one
input slice of them, for the split shortcut conv) through their linear kernel, and
the custom op that torch.compile traces instead (the prepack cannot be traced)."""
from __future__ import annotations

import torch

from .common import _codes, codes_of

LINEAR: dict = {}  # backend name -> its linear kernel (each backend registers its own)


def run_linear(backend: str, layer, x, bias, slot: int, lo: int = 0, hi: int | None = None, part: int = -1):
    """The layer's codes [:, lo:hi] on `backend` (part >= 0: one slice of a split conv,
    with its own prepacked copy).  Eager calls pass the layer's codes or their
    unpacking method, so a prepacked copy is unpacked only when it is made."""
    hi = layer.weight_shape[1] if hi is None else hi
    xs, xz = layer.act_scale[slot], layer.act_zero_point[slot]
    if torch.compiler.is_compiling():
        return torch.ops.mixdq.prepacked_linear(backend, x, layer.weight_packed, layer.weight_bits,
                                                list(layer.weight_shape), lo, hi, part,
                                                layer.weight_scale, bias, xs, xz)
    codes = layer._codes_arg()
    if part >= 0:
        whole, rows = codes, layer.weight_shape[0]
        codes = lambda: _codes(whole).reshape(rows, -1)[:, lo:hi]  # noqa: E731
    return LINEAR[backend](x, xs, xz, codes, layer.weight_scale, bias, key=layer.weight_packed, part=part)


def run_split_conv(backend: str, layer, x):
    """The up-block shortcut conv over concat(hidden, skip), each slice with its own
    activation range: a 1x1 conv is a linear over pixels, so two linears, summed."""
    c = layer.weight_shape[1]
    y = None
    for i, (lo, hi) in enumerate(((0, layer.split), (layer.split, c))):
        xi = x[:, lo:hi].permute(0, 2, 3, 1)  # NHWC
        yi = run_linear(backend, layer, xi, layer.bias if i == 0 else None, i, lo, hi, part=i)
        y = yi if y is None else y.add_(yi)
    return y.permute(0, 3, 1, 2)


@torch.library.custom_op("mixdq::prepacked_linear", mutates_args=())
def prepacked_linear(backend: str, x: torch.Tensor, packed: torch.Tensor, bits: int, shape: list[int],
                     lo: int, hi: int, part: int, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     x_scale: torch.Tensor, x_zp: torch.Tensor) -> torch.Tensor:
    """LINEAR[backend] on codes [:, lo:hi] of a layer's packed buffer."""
    def codes():
        return codes_of(packed, bits, shape).reshape(shape[0], -1)[:, lo:hi]

    return LINEAR[backend](x, x_scale, x_zp, codes, w_scale, bias, key=packed, part=part)


@prepacked_linear.register_fake
def _(backend, x, packed, bits, shape, lo, hi, part, w_scale, bias, x_scale, x_zp):
    return x.new_empty(*x.shape[:-1], shape[0])
