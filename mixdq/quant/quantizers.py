"""The arithmetic of MixDQ quantization, in plain torch.

Weights: symmetric, per output channel, scale = absmax / (2^(b-1) - 1).
Activations: asymmetric, per tensor, static range [min(0, lo), max(0, hi)]
collected during calibration, scale = (hi - lo) / (2^b - 1).

These functions are the reference that every kernel is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A scale is never allowed below this: an all-zero channel would otherwise
# divide by zero.  Clamped per channel, never for the whole tensor (the
# reference implementation reset *every* channel when one was tiny).
SCALE_EPS = 1e-8


def weight_qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale (float32, shape [out_channels])."""
    w = weight.detach().reshape(weight.shape[0], -1)
    # max |w| as max(max w, -min w): two reductions, no |w| copy of the whole weight
    absmax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()).float()
    return (absmax / weight_qrange(bits)[1]).clamp_min(SCALE_EPS)


# Codes are made a block of rows at a time through one reused float32 buffer of
# this many elements: whole-weight float temporaries (the quotient, its rounding)
# are fresh pages for every layer, and faulting them in costs more than the
# arithmetic (several times, on SDXL's large weights).
_QUANT_BLOCK = 1 << 18


def quantize_weight(weight: torch.Tensor, bits: int, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (integer codes as int8, same shape as weight; float32 scale per channel).
    out: an int8 tensor of weight's numel to write the codes into (returned)."""
    scale = weight_scale(weight, bits)
    qmin, qmax = weight_qrange(bits)
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.dtype == torch.float64:  # the quotient is float32, as from weight.float() / scale
        w = w.float()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device) if out is None else out.view(w.shape)
    rows = max(1, _QUANT_BLOCK // max(1, w.shape[1])) if w.device.type == "cpu" else w.shape[0]
    buf = torch.empty(min(rows, w.shape[0]), w.shape[1], device=w.device)
    for i in range(0, w.shape[0], rows):
        part = buf[:min(rows, w.shape[0] - i)]
        torch.div(w[i:i + rows], scale[i:i + rows, None], out=part).round_().clamp_(qmin, qmax)
        q[i:i + rows].copy_(part)
    return q.view(weight.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.to(torch.float32) * scale.view(shape)).to(dtype)


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    q, scale = quantize_weight(weight, bits)
    return dequantize_weight(q, scale, weight.dtype)


@dataclass
class ActRange:
    """Running [lo, hi] of a tensor over calibration batches (lo <= 0 <= hi)."""

    lo: float = 0.0
    hi: float = 0.0
    batches: int = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))
        self.batches += 1

    def merged(self, other: "ActRange") -> "ActRange":
        return ActRange(min(self.lo, other.lo), max(self.hi, other.hi), self.batches + other.batches)

    def to_list(self) -> list:
        return [self.lo, self.hi, self.batches]

    @classmethod
    def from_list(cls, v) -> "ActRange":
        return cls(float(v[0]), float(v[1]), int(v[2]))


def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, zero_point) of an asymmetric unsigned b-bit quantizer covering [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2 ** bits - 1
    scale = max((hi - lo) / qmax, SCALE_EPS)
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zero_point


def quantize_act(x: torch.Tensor, scale, zero_point, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^b - 1], returned in x's float dtype (exact for b <= 8).
    One new tensor, then in place: on these activation sizes the allocations of
    the out-of-place chain cost more than the arithmetic."""
    return torch.div(x, scale).round_().add_(zero_point).clamp_(0, 2 ** bits - 1)


def fake_quantize_act(x: torch.Tensor, scale, zero_point, bits: int) -> torch.Tensor:
    return quantize_act(x, scale, zero_point, bits).sub_(zero_point).mul_(scale)

