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
whose output returns to float32 before the output projection.  The float model a
quantized one is compared with keeps diffusers' own processors.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import machine

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
    BFloat16Attention passes their calls on unchanged)."""
    forced = forced_attention()
    if torch.device(device).type != "cpu":
        return "float"
    return forced or machine.cpu_choice().get("attention", "float")


class BFloat16Attention:
    """A diffusers attention processor that computes the scaled dot product of float32
    attention in bfloat16.  It takes the calls of the UNet's transformer blocks (3-d
    hidden states, no mask, no group or spatial norm); any other call, and any call
    not on float32 CPU tensors, goes to the processor it replaced, unchanged.
    `dtype` is there for tests: float32 runs what diffusers' processor runs."""

    def __init__(self, replaced, dtype: torch.dtype = torch.bfloat16):
        self.replaced, self.dtype = replaced, dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (args or kwargs or attention_mask is not None or hidden_states.ndim != 3
                or attn.spatial_norm is not None or attn.group_norm is not None
                or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"):
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
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
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _attentions(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def set_attention(unet: nn.Module, choice: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Every attention of `unet` with its product in `dtype` ('bfloat16'), or back on the
    processors diffusers gave it ('float').  Returns how many run BFloat16Attention."""
    n = 0
    for attn in _attentions(unet):
        proc = attn.processor
        own = proc.replaced if isinstance(proc, BFloat16Attention) else proc
        attn.set_processor(BFloat16Attention(own, dtype) if choice == "bfloat16" else own)
        n += choice == "bfloat16"
    return n


def use_measured_attention(unet: nn.Module, device) -> str:
    """Apply attention_choice(device) to a quantized UNet; returns the choice."""
    choice = attention_choice(device)
    set_attention(unet, choice)
    return choice


def attention_in_use(unet: nn.Module) -> str:
    """'bfloat16' if the UNet's attentions run BFloat16Attention, else 'float'."""
    procs = [a.processor for a in _attentions(unet)]
    return "bfloat16" if procs and all(isinstance(p, BFloat16Attention) for p in procs) else "float"
