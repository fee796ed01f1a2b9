"""The fake-quant formula in float32: what every int8 kernel must reproduce (tests),
and the reference a backend is measured against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import QMAX_U8, QMIN_U8


def linear_reference(x, x_scale, x_zp, w_q, w_scale, bias=None):
    """The fake-quant formula in float32 (what every kernel must reproduce)."""
    xq = torch.clamp(torch.round(x.float() / x_scale) + x_zp, QMIN_U8, QMAX_U8)
    xd = (xq - x_zp) * x_scale
    wd = w_q.float() * w_scale.float().view(-1, 1)
    y = F.linear(xd, wd, None if bias is None else bias.float())
    return y.to(x.dtype)


def conv2d_reference(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0,
                     dilation=1, groups=1):
    xq = torch.clamp(torch.round(x.float() / x_scale) + x_zp, QMIN_U8, QMAX_U8)
    xd = (xq - x_zp) * x_scale
    wd = w_q.float() * w_scale.float().view(-1, 1, 1, 1)
    y = F.conv2d(xd, wd, None if bias is None else bias.float(), stride, padding, dilation, groups)
    return y.to(x.dtype)
