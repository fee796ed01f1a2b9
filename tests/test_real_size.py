"""Byte counts at the real SDXL-Turbo / SD-Turbo size, from the published configs.

Built on the meta device: shapes only, no weights, so it runs in a second.
"""
import pytest
import torch

import mixdq
from mixdq import Plan

configs = pytest.importorskip("bench.configs")


def _meta_unet(name):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(configs.config(name)).to(torch.float16)


def test_sdxl_turbo_layer_list_and_packed_bytes():
    unet = _meta_unet("sdxl-turbo")
    layers = mixdq.quantizable_layers(unet)
    costs = mixdq.layer_costs(unet)
    assert len(layers) == 794  # as the MixDQ paper counts them
    assert sum(costs.weight_numel.values()) == 2_565_880_320
    fp16 = costs.float_mb()
    ratio = {w: costs.total_mb(Plan.uniform(layers, w, 8)) / fp16 for w in (8, 4, 2)}
    assert ratio[8] <= 0.52 and ratio[4] <= 0.30 and ratio[2] <= 0.15
    assert ratio[2] < ratio[4] < ratio[8]
    # 5/6-bit codes use the int8 container, 3-bit the 4-bit one (documented in packing.py)
    assert costs.total_mb(Plan.uniform(layers, 5, 8)) == costs.total_mb(Plan.uniform(layers, 8, 8))


def test_sd_turbo_layer_list():
    unet = _meta_unet("sd-turbo")
    costs = mixdq.layer_costs(unet)
    assert len(costs.float_bytes) == 282
    assert costs.total_mb(Plan.uniform(costs.float_bytes, 8, 8)) / costs.float_mb() <= 0.52
