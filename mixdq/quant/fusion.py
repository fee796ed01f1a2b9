"""A quantized UNet's transformer blocks add their attention and feed-forward outputs
to the residual stream inside the output projections, on the CPU.

Each of a transformer block's three sublayers ends `hidden_states = out + hidden_states`:
a pass that reads two float32 tensors of the block's activations and writes a third,
after the output projection has just written `out`.  oneDNN's int8 linear can add its
result to an existing tensor as it writes it (its sum post-op), so the projection's
output lands in the residual stream directly: `QuantLinear(x, residual=h)`.  The other
backends sum in place (`layers.add_into`), which spares the new tensor.  The block's
input is never written: the first sum goes into the self-attention's new output, the
cross-attention and the feed-forward then add theirs to that tensor.  Same values as
diffusers' block (float addition commutes), up to how oneDNN rounds its sum.

ResidualTransformerBlock is diffusers' BasicTransformerBlock in the one configuration
the SD / SDXL UNets use (layer norms, self- then cross-attention, a feed-forward, no
chunking, no positional embedding), calling the attentions with the residual
(attention.CpuAttention takes it); any other configuration or call (autograd on, a
device other than the CPU, extra attention kwargs) runs diffusers' own forward.
`quantize` and loading an export install it on CPU UNets, beside the attention
processors it relies on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import BasicTransformerBlock

from .attention import CpuAttention
from .layers import QuantLinear, add_into
from .layout import swap_class


class ResidualTransformerBlock(BasicTransformerBlock):
    """A BasicTransformerBlock whose sublayers' outputs are summed into the residual
    stream by their last linear (see the module doc).  Installed on existing blocks by
    class (fuse_residuals), so the UNet still pickles and copies."""

    def _fused(self, hidden_states, cross_attention_kwargs, added_cond_kwargs) -> bool:
        return (hidden_states.device.type == "cpu" and hidden_states.ndim == 3 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not cross_attention_kwargs and not added_cond_kwargs
                and self.norm_type == "layer_norm" and not self.only_cross_attention and self.pos_embed is None
                and self._chunk_size is None and self.attn2 is not None
                and isinstance(self.attn1.processor, CpuAttention) and isinstance(self.attn2.processor, CpuAttention))

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        if not self._fused(hidden_states, cross_attention_kwargs, added_cond_kwargs):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        # the block's input is its caller's (a hook may hold it): the self-attention's output,
        # new, takes the first sum; the next two go into that tensor
        h = add_into(self.attn1(self.norm1(hidden_states), attention_mask=attention_mask), hidden_states)
        h = self.attn2(self.norm2(h), encoder_hidden_states=encoder_hidden_states,
                       attention_mask=encoder_attention_mask, residual=h)
        x = self.norm3(h)
        *inner, last = self.ff.net
        for module in inner:
            x = module(x)
        return last(x, residual=h) if isinstance(last, QuantLinear) else add_into(h, last(x))


def fuse_residuals(unet: nn.Module, on: bool = True) -> int:
    """`unet`'s transformer blocks as ResidualTransformerBlock (on) or as diffusers made
    them; returns how many now fuse their residual sums."""
    return swap_class(unet, BasicTransformerBlock, ResidualTransformerBlock, on)


def residuals_fused(unet: nn.Module) -> bool:
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    return bool(blocks) and all(isinstance(b, ResidualTransformerBlock) for b in blocks)
