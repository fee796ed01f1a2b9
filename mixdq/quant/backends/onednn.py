"""onednn: `onednn::qlinear_pointwise` / `qconv2d_pointwise` (uint8 x int8, fused
epilogue, float output) on a prepacked weight.

The prepack is a second copy of the weight (about the int8 size) while it is made;
the layer then keeps only it.  Chosen for codes held one per byte where it measures
clearly faster than `int_mm` (machine.pick_backends: AVX2-only CPUs, where `int_mm`
is slower than float32; AMX Xeons, where its fused call beats `int_mm`'s separate
passes), for 2-4-bit codes too where `int_mm` is slower than float32, or when forced.  Without VNNI
its u8 x s8 products saturate on 8-bit codes (machine.saturates).
"""
from __future__ import annotations

import torch

from . import prepacked
from .common import (Bound, _cache_name, _codes, _pair, _prepacked, _scalar, _versions, cached, codes_of,
                     prepack_shape, prepacked_for, quantize_act, register_read_back)

NAME = "onednn"
PREPACKED = True


def supports(op: str, device, weight_shape=(), groups: int = 1) -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.onednn, "qlinear_pointwise")


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return prepacked.run_linear(NAME, layer, x, layer.bias, 0)


def linear_add(layer, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(layer, x), summed into residual's float32 memory by oneDNN's sum
    post-op (no output tensor, no pass of its own); returns residual."""
    return linear_onednn(x, layer.act_scale[0], layer.act_zero_point[0], layer._codes_arg(), layer.weight_scale,
                         layer.bias, key=layer.weight_packed, into=residual)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.split:
        return prepacked.run_split_conv(NAME, layer, x)
    args = dict(stride=1, padding=0, dilation=1, groups=1) | layer.conv_args
    if torch.compiler.is_compiling():
        return torch.ops.mixdq.onednn_conv2d(x, layer.weight_packed, layer.weight_bits, list(layer.weight_shape),
                                             layer.weight_scale, layer.bias, layer.act_scale[0],
                                             layer.act_zero_point[0], list(_pair(args["stride"])),
                                             list(_pair(args["padding"])), list(_pair(args["dilation"])),
                                             args["groups"])
    return conv2d_onednn(x, layer.act_scale[0], layer.act_zero_point[0], layer._codes_arg(), layer.weight_scale,
                         layer.bias, key=layer.weight_packed, **args)


def _onednn_w_zp(n, device):
    return torch.zeros(n, dtype=torch.long, device=device)


def linear_onednn(x, x_scale, x_zp, w_q, w_scale, bias=None, key=None, part=-1, into=None):
    """onednn::qlinear_pointwise on a cached prepacked weight (an extra weight copy).
    part >= 0: w_q is one input slice of a split conv's weight, cached apart.
    into: a dense float32 tensor of the output's shape that the output is added to, in
    place (the sum post-op); returned."""
    return _qlinear(x, _linear_args(x_scale, x_zp, w_q, w_scale, bias, key, part), into)


def _linear_args(x_scale, x_zp, w_q, w_scale, bias, key, part):
    """What qlinear_pointwise takes beside the input: the prepacked copy (made here the
    first time), the activation scale and zero point, the weight's scales and zero points."""
    key = w_q if key is None else key
    n = w_scale.shape[0]
    packed = _prepacked(key, _cache_name("onednn_lin", part), lambda: _versions(key),
                        lambda: torch.ops.onednn.qlinear_prepack(_codes(w_q).contiguous(), None))
    wz = cached(key, "onednn_wz", (), lambda: _onednn_w_zp(n, w_scale.device))
    return (_scalar(x_scale), int(round(_scalar(x_zp))), packed, w_scale.float().contiguous(), wz,
            None if bias is None else bias.float())


def _qlinear(x, args, into=None):
    s, z, packed, ws, wz, bias = args
    shape = x.shape
    n = ws.shape[0]
    xq = quantize_act(x.reshape(-1, shape[-1]).float(), s, z, signed=False)
    if into is not None:
        torch.ops.onednn.qlinear_pointwise.binary(
            xq, s, z, packed, ws, wz, into.view(-1, n), bias, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
        return into
    y = torch.ops.onednn.qlinear_pointwise(xq, s, z, packed, ws, wz, bias, 1.0, 0, torch.float32, "none", [], "")
    return y.to(x.dtype).reshape(*shape[:-1], n)


def conv2d_onednn(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1,
                  groups=1, key=None):
    """onednn::qconv2d_pointwise on a cached prepacked weight (an extra weight copy), made
    for the shape of the first input it runs (common.prepack_shape)."""
    key = w_q if key is None else key
    return _qconv(x, _conv_args(x_scale, x_zp, w_q, w_scale, bias, stride, padding, dilation, groups, key,
                                prepack_shape(key, "onednn_conv", x)))


def _conv_args(x_scale, x_zp, w_q, w_scale, bias, stride, padding, dilation, groups, key, shape):
    """What qconv2d_pointwise takes beside the input; the prepacked copy made here for
    input `shape` (None: any) where there is none."""
    stride, padding, dilation = map(lambda v: list(_pair(v)), (stride, padding, dilation))
    s, z = _scalar(x_scale), int(round(_scalar(x_zp)))
    ws = w_scale.float().contiguous()
    packed = _prepacked(key, "onednn_conv", lambda: _versions(key, w_scale) + (s, z, shape),
                        lambda: torch.ops.onednn.qconv_prepack(_codes(w_q).contiguous(), ws, s, z, stride, padding,
                                                               dilation, groups, None if shape is None else list(shape)))
    wz = cached(key, "onednn_wz", (), lambda: _onednn_w_zp(ws.shape[0], ws.device))
    return s, z, packed, ws, wz, None if bias is None else bias.float(), stride, padding, dilation, groups


def _qconv(x, args):
    s, z, packed, ws, wz, bias, stride, padding, dilation, groups = args
    xq = quantize_act(x.float(), s, z, signed=False)
    y = torch.ops.onednn.qconv2d_pointwise(xq, s, z, packed, ws, wz, bias, stride, padding, dilation, groups,
                                           1.0, 0, torch.float32, "none", [], "")
    return y.to(x.dtype)


def bind(layer) -> Bound | None:
    """The layer's call with its prepacked copy resolved (common.Bound); for a conv only
    once its copy is made for the input shape it met (a refit may be due before)."""
    if layer.op == "linear":
        args = _linear_args(layer.act_scale[0], layer.act_zero_point[0], layer._codes_arg(), layer.weight_scale,
                            layer.bias, layer.weight_packed, -1)
        return Bound(lambda x: _qlinear(x, args), lambda x, residual: _qlinear(x, args, residual))
    shape = prepacked_for(layer.weight_packed, "onednn_conv")
    if layer.op != "conv" or shape is None:
        return None
    args = _conv_args(layer.act_scale[0], layer.act_zero_point[0], layer._codes_arg(), layer.weight_scale,
                      layer.bias, key=layer.weight_packed, shape=shape,
                      **(dict(stride=1, padding=0, dilation=1, groups=1) | layer.conv_args))
    return Bound(lambda x: _qconv(x, args))


register_read_back("onednn_lin", lambda packed: packed.to_dense().t())
register_read_back("onednn_conv", lambda packed: packed.to_dense())
prepacked.LINEAR[NAME] = linear_onednn


# torch.compile: the prepack cannot be traced, so a traced graph calls the whole
# eager kernel (prepacked copy cached as in eager calls) as one op of known shape
@torch.library.custom_op("mixdq::onednn_conv2d", mutates_args=())
def onednn_conv2d(x: torch.Tensor, packed: torch.Tensor, bits: int, shape: list[int], w_scale: torch.Tensor,
                  bias: torch.Tensor | None, x_scale: torch.Tensor, x_zp: torch.Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """conv2d_onednn on a layer's packed buffer, in channels_last memory (oneDNN's own
    output layout, so a no-op): the strides the fake promises, which the traced ops
    downstream bake in (int_mm's patch extraction is an as_strided view)."""
    y = conv2d_onednn(x, x_scale, x_zp, lambda: codes_of(packed, bits, shape), w_scale, bias,
                      stride, padding, dilation, groups, key=packed)
    return y.contiguous(memory_format=torch.channels_last)


@onednn_conv2d.register_fake
def _(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, stride, padding, dilation, groups):
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty(x.shape[0], shape[0], *size).contiguous(memory_format=torch.channels_last)
