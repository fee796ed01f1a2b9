"""fbgemm: `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`, one op, float
in, float out, on a prepacked weight: linears (and split shortcut convs, two linears
over pixels) only; FBGEMM has no float-output int8 conv.  1.75x float32 on SDXL's
linears on an AVX2-only EPYC; without VNNI it saturates on 8-bit codes.
"""
from __future__ import annotations

import torch

from . import prepacked
from .common import Bound, _cache_name, _codes, _prepacked, _scalar, _versions, register_read_back

NAME = "fbgemm"
PREPACKED = True


def supports(op: str, device, weight_shape=(), groups: int = 1) -> bool:
    return (op != "conv" and torch.device(device).type == "cpu"
            and "fbgemm" in torch.backends.quantized.supported_engines)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return prepacked.run_linear(NAME, layer, x, layer.bias, 0)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    return prepacked.run_split_conv(NAME, layer, x)  # supports() admits split convs only


def linear_fbgemm(x, x_scale, x_zp, w_q, w_scale, bias=None, key=None, part=-1):
    """quantized::linear_with_input_q_dq_qweight_dq_output_fp32 (FBGEMM; AVX2 path);
    part as in linear_onednn."""
    return _qlinear(x, _linear_args(x_scale, x_zp, w_q, w_scale, bias, key, part))


def _linear_args(x_scale, x_zp, w_q, w_scale, bias, key, part):
    """The activation scale and zero point, and the prepacked copy (made here the first time)."""
    key = w_q if key is None else key

    def make():
        qw = torch._make_per_channel_quantized_tensor(
            _codes(w_q).contiguous(), w_scale.double(), torch.zeros(w_scale.shape[0], dtype=torch.long), 0)
        with _engine("fbgemm"):
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())

    packed = _prepacked(key, _cache_name("fbgemm_lin", part), lambda: _versions(key, w_scale, bias), make)
    return _scalar(x_scale), int(round(_scalar(x_zp))), packed, w_scale.shape[0]


def _qlinear(x, args):
    s, z, packed, n = args
    shape = x.shape
    with _engine("fbgemm"):
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x.reshape(-1, shape[-1]).float().contiguous(), s, z, packed)
    return y.to(x.dtype).reshape(*shape[:-1], n)


def bind(layer) -> Bound | None:
    """The layer's call with its prepacked copy resolved (common.Bound); linears only."""
    if layer.op != "linear":
        return None
    args = _linear_args(layer.act_scale[0], layer.act_zero_point[0], layer._codes_arg(), layer.weight_scale,
                        layer.bias, layer.weight_packed, -1)
    return Bound(lambda x: _qlinear(x, args))


class _engine:
    """Temporarily select a quantized engine (fbgemm / onednn / x86)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = torch.backends.quantized.engine
        if self.name != self.old and self.name in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        if torch.backends.quantized.engine != self.old:
            torch.backends.quantized.engine = self.old


register_read_back("fbgemm_lin", lambda packed: torch.ops.quantized.linear_unpack(packed)[0].int_repr())
prepacked.LINEAR[NAME] = linear_fbgemm
