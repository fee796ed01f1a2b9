"""The activations of a quantized UNet stay channels_last on the CPU.

oneDNN's int8 convs read and write channels_last (NHWC) memory, and the `int_mm` convs
take their patches from it.  diffusers' 2-d transformers end with
`.permute(0, 3, 1, 2).contiguous()`, which turns the activations back to NCHW: from
there on the residual adds mix the two layouts, and every conv downstream transposes
its input again (oneDNN inside `qconv2d_pointwise`; a byte transpose over 4096 pixels
is slow).  Without that `.contiguous()` the transformer's output is the (N, H, W, C)
memory its projection wrote, channels_last already, and the layout flows from conv to
conv.  Same values either way; only where float sums round (GroupNorm's order over a
channels_last tensor) can the last bit differ.

The UNet's input is made channels_last too (a pre-hook: 4 channels, a cheap copy), so
that convs running float kernels, which keep their input's layout, do not start the
down path in NCHW and mix the two layouts again where the skips are concatenated.

`quantize` and loading an export install this on CPU UNets; calls on another device
keep diffusers' own path, and so does the float model a quantized one is compared with.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_2d import Transformer2DModel


class ChannelsLastTransformer2D(Transformer2DModel):
    """A Transformer2DModel whose output on the CPU is left in the (N, H, W, C) memory
    its projection wrote; on other devices, diffusers' own.  Installed on existing
    blocks by class (keep_channels_last), so the UNet still pickles and copies."""

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if hidden_states.device.type != "cpu":
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height,
                                                             width, inner_dim)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim)
            hidden_states = hidden_states.permute(0, 3, 1, 2)
        else:
            hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual


def _sample_channels_last(unet, args, kwargs):
    """Forward pre-hook: the UNet's `sample` (first argument) in channels_last memory."""
    sample = kwargs.get("sample", args[0] if args else None)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.device.type != "cpu":
        return None
    sample = sample.contiguous(memory_format=torch.channels_last)
    if "sample" in kwargs:
        return args, {**kwargs, "sample": sample}
    return (sample, *args[1:]), kwargs


def keep_channels_last(unet: nn.Module, on: bool = True) -> int:
    """`unet` with its activations kept channels_last on the CPU (on: its input made so,
    each 2-d transformer a ChannelsLastTransformer2D) or as diffusers made it; returns
    how many transformers now keep channels_last."""
    for key, hook in list(unet._forward_pre_hooks.items()):
        if hook is _sample_channels_last:
            del unet._forward_pre_hooks[key]
            unet._forward_pre_hooks_with_kwargs.pop(key, None)
    if on:
        unet.register_forward_pre_hook(_sample_channels_last, with_kwargs=True)
    return swap_class(unet, Transformer2DModel, ChannelsLastTransformer2D, on)


def swap_class(root: nn.Module, base: type, replacement: type, on: bool) -> int:
    """Every module of `root` whose class is exactly `base` or `replacement` (not another
    subclass's override) made a `replacement` (on) or a `base`; returns how many are now
    `replacement`.  A class swap keeps the module's state, so the model still pickles."""
    n = 0
    for module in root.modules():
        if type(module) in (base, replacement):
            module.__class__ = replacement if on else base
            n += on
    return n


def channels_last_kept(unet: nn.Module) -> bool:
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    return (_sample_channels_last in unet._forward_pre_hooks.values()
            and all(isinstance(b, ChannelsLastTransformer2D) for b in blocks))
