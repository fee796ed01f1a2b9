"""UNet configurations of the models the benchmarks measure, by short name.

Memory and speed do not depend on weight values, so the benchmarks build these
architectures with random weights (no hub access here).  The published ones (SDXL-Turbo,
SD-Turbo, SD1.5) are mixdq.architectures' (the `unet/config.json` files of the published
checkpoints, with keys that equal the diffusers defaults left out); the tiny ones are
for tests.  Parameter counts are checked by `expected_params` (tests/test_bench.py builds
the published ones on the meta device; `bench.run` asserts the count before it measures
anything, so a typo cannot go unseen).
"""
from __future__ import annotations

import copy

from mixdq import architectures

# The published architectures live in the library (mixdq/architectures.py: planning without
# the weights needs them too); the benchmarks name them short.
SDXL_TURBO = architectures.unet_config("stabilityai/sdxl-turbo")
SD_TURBO = architectures.unet_config("stabilityai/sd-turbo")
SD15 = architectures.unet_config("runwayml/stable-diffusion-v1-5")
HUB_IDS = {"sdxl-turbo": "stabilityai/sdxl-turbo", "sd-turbo": "stabilityai/sd-turbo",
           "sd15": "runwayml/stable-diffusion-v1-5"}

# A scaled-down SDXL (same block types, text_time conditioning, linear projections,
# two transformer depths) for tests: builds and steps in well under a second.
TINY_SDXL = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8,
    norm_num_groups=8,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

# A scaled-down SD1.5 (1x1-conv projections, no added conditioning) for tests.
TINY_SD15 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
    use_linear_projection=False,
    norm_num_groups=8,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

MODELS = {
    "sdxl-turbo": SDXL_TURBO,
    "sd-turbo": SD_TURBO,
    "sd15": SD15,
    "tiny-sdxl": TINY_SDXL,
    "tiny-sd15": TINY_SD15,
}

# Parameter counts of the published checkpoints (float32 state_dict numel).
EXPECTED_PARAMS = {name: architectures.expected_params(hub) for name, hub in HUB_IDS.items()}

# Text-encoder sequence length and pooled size the UNet is conditioned on.
TEXT_LEN = architectures.TEXT_LEN
POOLED_DIM = {"sdxl-turbo": 1280, "tiny-sdxl": 64}


def config(name: str) -> dict:
    try:
        return copy.deepcopy(MODELS[name])
    except KeyError:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}") from None


def expected_params(name: str) -> int | None:
    return EXPECTED_PARAMS.get(name)
