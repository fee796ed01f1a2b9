"""Published UNet configurations of the models the benchmarks measure.

Memory and speed do not depend on weight values, so the benchmarks build these
architectures with random weights (no hub access here).  The dictionaries are the
`unet/config.json` files of the published checkpoints, with keys that equal the
diffusers defaults left out.  Parameter counts are checked by `expected_params`
(tests/test_bench.py builds the small config only; `bench.run` asserts the count
for the real ones before it measures anything, so a typo here cannot go unseen).
"""
from __future__ import annotations

import copy

# stabilityai/sdxl-turbo unet/config.json (= SDXL base 1.0 UNet; turbo only changes
# sample_size to 64, i.e. 512 px).
SDXL_TURBO = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

# stabilityai/sd-turbo unet/config.json (= SD 2.1 UNet at 512 px).
SD_TURBO = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

# runwayml/stable-diffusion-v1-5 unet/config.json (1x1-conv proj_in/proj_out).
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    use_linear_projection=False,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

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
EXPECTED_PARAMS = {
    "sdxl-turbo": 2_567_463_684,
    "sd-turbo": 865_910_724,
    "sd15": 859_520_964,
}

# Text-encoder sequence length and pooled size the UNet is conditioned on.
TEXT_LEN = 77
POOLED_DIM = {"sdxl-turbo": 1280, "tiny-sdxl": 64}


def config(name: str) -> dict:
    try:
        return copy.deepcopy(MODELS[name])
    except KeyError:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}") from None


def expected_params(name: str) -> int | None:
    return EXPECTED_PARAMS.get(name)
