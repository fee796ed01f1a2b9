"""The attention products of a quantized UNet in bfloat16, where this CPU runs them faster.

MixDQ quantizes the UNet's linears and convs; the products inside attention
(softmax(Q K^T) V) have no weights and stay in float.  Once the layers run int8, on a
float32 UNet on the CPU those products are the largest cost left (at SD-Turbo's 64x64
latents one self-attention attends over 4096 tokens).  CPUs with bfloat16 matrix units
(AMX-BF16) run them about twice as fast in bfloat16; elsewhere bfloat16 is slower
than float32.  So it is measured, once per machine with the int8 backends
(machine.pick_attention), and applied by `quantize` and by loading an export:

  MIXDQ_ATTENTION=auto|bfloat16|float    the measured choice (default), or forced

Only the product changes precision: Q, K and V come from their (quantized)
projections in float32 and are rounded to bfloat16 for scaled_dot_product_attention,
whose output returns to float32 before the output projection.  The processor that
does it (CpuAttention) runs every CPU attention of a quantized UNet, in float32 where
bfloat16 is not the choice, so that the output projection can add its result to the
transformer block's residual stream (fusion.py).  The float model a quantized one is
compared with keeps diffusers' own processors.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import machine
from .layers import QuantLinear, add_into

CHOICES = ("auto", "bfloat16", "float")


def forced_attention() -> str | None:
    """MIXDQ_ATTENTION, validated: 'bfloat16' or 'float', or None for the measured choice."""
    forced = os.environ.get("MIXDQ_ATTENTION", "auto").strip().lower() or "auto"
    if forced not in CHOICES:
        raise ValueError(f"MIXDQ_ATTENTION={forced!r}: choose one of {CHOICES} "
                         "(auto: what this machine measured faster)")
    return None if forced == "auto" else forced


def attention_choice(device) -> str:
    """'bfloat16' or 'float' (the UNet's own dtype) for a quantized UNet on `device`:
    on the CPU MIXDQ_ATTENTION, else its measured choice; other devices keep float
    whatever is forced (a GPU UNet runs in float16 or bfloat16 already, and
    diffusers keeps their processors)."""
    forced = forced_attention()
    if torch.device(device).type != "cpu":
        return "float"
    return forced or machine.cpu_choice().get("attention", "float")


class CpuAttention:
    """The diffusers attention processor of a quantized UNet on the CPU: the scaled dot
    product of float32 attention computed in `dtype` (bfloat16 where this machine
    measured it faster; float32 runs the very ops of diffusers' processor), and, given
    the transformer block's `residual` (fusion.ResidualTransformerBlock), the output
    projection summed into it (QuantLinear's `residual`).  It takes the calls of the
    UNet's transformer blocks (3-d hidden states, no mask, no group or spatial norm);
    any other call, and any call not on float32 CPU tensors, goes to the processor it
    replaced, unchanged, its output then added to `residual`."""

    def __init__(self, replaced, dtype: torch.dtype = torch.bfloat16):
        self.replaced, self.dtype = replaced, dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, residual=None, **kwargs):
        if (args or kwargs or attention_mask is not None or hidden_states.ndim != 3
                or attn.spatial_norm is not None or attn.group_norm is not None
                or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"):
            out = self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            return out if residual is None else add_into(residual, out)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = (attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross
                       else encoder_hidden_states)
        batch, heads = hidden_states.shape[0], attn.heads

        def by_head(t):  # (batch, tokens, heads * d) -> (batch, heads, tokens, d)
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = by_head(attn.to_q(hidden_states)), by_head(attn.to_k(context)), by_head(attn.to_v(context))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        # the default scale, 1/sqrt(d), as diffusers' processor uses
        out = F.scaled_dot_product_attention(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype))
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(hidden_states.dtype)
        proj, dropout = attn.to_out
        if (residual is not None and isinstance(proj, QuantLinear) and not attn.residual_connection
                and attn.rescale_output_factor == 1 and not (dropout.training and dropout.p)):
            return proj(out, residual=residual)
        out = dropout(proj(out))
        if attn.residual_connection:
            out = out + hidden_states
        if attn.rescale_output_factor != 1:  # x / 1 is x: diffusers divides anyway, a pass over the output
            out = out / attn.rescale_output_factor
        return out if residual is None else add_into(residual, out)


def _attentions(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def set_attention(unet: nn.Module, choice: str | None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Every attention of `unet` on CpuAttention, its product in `dtype` ('bfloat16') or
    in float32 ('float'), or (None) back on the processors diffusers gave it.  Returns
    how many compute their product in `dtype`."""
    n = 0
    for attn in _attentions(unet):
        proc = attn.processor
        own = proc.replaced if isinstance(proc, CpuAttention) else proc
        if choice is None:
            attn.set_processor(own)
            continue
        attn.set_processor(CpuAttention(own, dtype if choice == "bfloat16" else torch.float32))
        n += choice == "bfloat16"
    return n


def use_measured_attention(unet: nn.Module, device) -> str:
    """Apply attention_choice(device) to a quantized UNet (off the CPU: diffusers'
    processors); returns the choice."""
    choice = attention_choice(device)
    set_attention(unet, choice if torch.device(device).type == "cpu" else None)
    return choice


def attention_in_use(unet: nn.Module) -> str:
    """'bfloat16' if the UNet's attentions compute their product in bfloat16, else 'float'."""
    procs = [a.processor for a in _attentions(unet)]
    return ("bfloat16" if procs and all(isinstance(p, CpuAttention) and p.dtype == torch.bfloat16 for p in procs)
            else "float")
