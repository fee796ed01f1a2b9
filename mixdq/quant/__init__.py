"""Layer-level quantization: find the layers, swap them, put them back.

`mixdq.quantize` (the verb) builds on these; sensitivity analysis uses
`replace_layers` / `restore_layers` directly to quantize one layer at a time.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import PlanError
from ..plan import LayerBits, Plan
from .layers import (QuantConv2d, QuantLayer, QuantLinear, hold_epilogue, prepare, quantized_nbytes, refit,
                     refit_after_steps)
from .quantizers import ActRange

__all__ = ["QuantLayer", "QuantLinear", "QuantConv2d", "ActRange", "quantizable_layers",
           "shortcut_splits", "is_bos_layer", "replace_layers", "restore_layers",
           "quantized_layers", "quantized_nbytes", "layer_spec", "hold_epilogue", "prepare",
           "refit", "refit_after_steps"]


def quantizable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d of the UNet (quantized or not), by qualified name."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, QuantLayer))}


def quantized_layers(unet: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, QuantLayer)}


def is_bos_layer(name: str) -> bool:
    """Cross-attention K/V projections: they see the text embedding, BOS included."""
    return name.endswith(("attn2.to_k", "attn2.to_v"))


def shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """Up-block shortcut convs see concat(hidden, skip): where the two slices meet.

    Resnet j of an up block gets the output of resnet j-1 (or, for j = 0, of the
    block before, the mid block for the first) concatenated with a skip.
    """
    splits = {}
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        return splits
    hidden = unet.config.block_out_channels[-1]
    for b, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            shortcut = getattr(resnet, "conv_shortcut", None)
            in_ch = resnet.conv1.in_channels
            if shortcut is not None and in_ch > hidden:
                splits[f"up_blocks.{b}.resnets.{j}.conv_shortcut"] = hidden
            hidden = resnet.conv2.out_channels  # upsamplers keep the channel count
    return splits


def layer_spec(module: nn.Module) -> tuple[tuple, bool, torch.dtype]:
    """(weight shape, has bias, float dtype) of a float or quantized layer."""
    if isinstance(module, QuantLayer):
        return module.weight_shape, module.bias is not None, module.dtype
    return tuple(module.weight.shape), module.bias is not None, module.weight.dtype


def _make(name: str, module: nn.Module, bits: LayerBits, split: int, bos_embedding):
    if isinstance(module, QuantLayer):
        raise PlanError(f"layer {name!r} is already quantized; load the float model to re-quantize")
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, bits, bos_embedding if is_bos_layer(name) else None)
    return QuantConv2d.from_float(module, bits, split=split)


def replace_layers(unet: nn.Module, plan: Plan, ranges: dict[str, list[ActRange]] | None = None,
                   bos_embedding: torch.Tensor | None = None,
                   include_float: bool = False) -> dict[str, nn.Module]:
    """Swap the planned layers for quantized ones; return the originals.

    W16A16 entries are skipped unless `include_float` (used to observe ranges of
    the float model through the very same code path).  `ranges`, when given,
    fixes the activation quantizers at once (no calibration run needed).
    """
    layers = quantizable_layers(unet)
    plan.validate(layers)
    splits = shortcut_splits(unet)
    originals = {}
    for name, bits in plan.items():
        if bits.is_float and not include_float:
            continue
        module = layers[name]
        new = _make(name, module, bits, splits.get(name, 0), bos_embedding)
        if ranges is not None and bits.act != 16:
            if name not in ranges:
                raise PlanError(f"no activation range for layer {name!r}: calibrate first")
            new.set_ranges(ranges[name])
        unet.set_submodule(name, new)
        originals[name] = module
    return originals


def restore_layers(unet: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        unet.set_submodule(name, module)
