"""Published UNet architectures, by hub id: their configs, parameter counts and identity.

Memory does not depend on weight values, so a published architecture is enough to plan a
quantization: `meta_unet(model_id)` builds the UNet on the meta device (shapes only, no
memory, about a second), `mixdq.layer_costs(meta_unet(...))` gives every layer's exact bytes,
and `activation_numel` its input-activation sizes from one meta-device forward.

The configs are the `unet/config.json` files of the published checkpoints, with keys that
equal the diffusers defaults left out.  `meta_unet` checks the parameter count against the
published checkpoint's, so a typo here cannot go unseen (the benchmarks build the same
configs, bench/configs.py).

`architecture_hash` is the identity of an architecture: a table measured by someone else for
a published model (presets/sdxl-turbo/sensitivity.json) is matched to a pipeline by it and by
the hub id, since nobody but the measuring machine could reproduce a weight fingerprint.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from typing import Mapping

import torch
import torch.nn as nn

from .sensitivity_analysis import _identity_config

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

UNET_CONFIGS = {
    "stabilityai/sdxl-turbo": SDXL_TURBO,
    "stabilityai/sd-turbo": SD_TURBO,
    "runwayml/stable-diffusion-v1-5": SD15,
}

# Parameter counts of the published checkpoints' UNets (state_dict numel).
EXPECTED_PARAMS = {
    "stabilityai/sdxl-turbo": 2_567_463_684,
    "stabilityai/sd-turbo": 865_910_724,
    "runwayml/stable-diffusion-v1-5": 859_520_964,
}

# CLIP's sequence length: the text input every one of these UNets is conditioned on.
TEXT_LEN = 77

# Config entries that published checkpoints spell in more than one way for the same model:
# SDXL's config.json writes "upcast_attention": null, which diffusers reads as False (its
# default).  Normalised before hashing so both spellings are one architecture.
_NONE_MEANS_DEFAULT = frozenset({"upcast_attention"})


def known_models() -> list[str]:
    return sorted(UNET_CONFIGS)


def unet_config(model_id: str) -> dict:
    """The published UNet config of `model_id` (a copy)."""
    try:
        return copy.deepcopy(UNET_CONFIGS[model_id])
    except KeyError:
        raise ValueError(f"no published architecture known for {model_id!r}; known: "
                         f"{', '.join(known_models())}") from None


def expected_params(model_id: str) -> int | None:
    return EXPECTED_PARAMS.get(model_id)


def build_meta(config: dict, expected: int | None = None, name: str = "this config"):
    """A UNet2DConditionModel of `config` on the meta device (float32), checked against the
    `expected` parameter count of the published checkpoint when one is known."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    n = sum(p.numel() for p in unet.parameters())
    if expected is not None and n != expected:
        raise AssertionError(f"{name}: built {n} parameters, the published checkpoint has {expected}")
    return unet


def meta_unet(model_id: str, dtype: torch.dtype | None = None):
    """The published UNet of `model_id` on the meta device: every layer with its true shape
    and dtype, no memory.  dtype: default the one `mixdq.load_pipeline` would load it in on
    this machine (float16 with CUDA, else float32), so its byte counts are the loaded model's."""
    from .defaults import default_device, default_dtype

    unet = build_meta(unet_config(model_id), expected_params(model_id), model_id)
    dtype = dtype or default_dtype(default_device())
    if dtype != torch.float32:
        # nn.Module.to, not ModelMixin.to: the latter warns about float32-kept modules, which
        # a meta-device copy has no use for
        nn.Module.to(unet, dtype)
    return unet.eval().requires_grad_(False)


def _diffusers_class(obj) -> type:
    import diffusers

    if isinstance(obj, nn.Module):
        # a subclass (mixdq's quantized UNet) has its diffusers base's architecture
        for cls in type(obj).__mro__:
            if cls.__module__.startswith("diffusers."):
                return cls
        return type(obj)
    name = dict(obj).get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"unknown diffusers class {name!r} in the config")
    return cls


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


def architecture_config(unet_or_config) -> dict:
    """What defines an architecture: the diffusers class and the config entries that differ
    from that class's defaults (the identity config: no paths, no loader metadata).  A
    config.json that writes every default and one that writes none are the same architecture,
    as are a model built from a published config and the same model loaded from the hub."""
    cls = _diffusers_class(unet_or_config)
    cfg = getattr(unet_or_config, "config", unet_or_config)
    cfg = {k: v for k, v in _identity_config(cfg).items() if k != "_class_name"}
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    out = {}
    for k, v in sorted(cfg.items()):
        v = _jsonable(v)
        if v is None and k in _NONE_MEANS_DEFAULT:
            continue
        if k in defaults and v == _jsonable(defaults[k]):
            continue
        out[k] = v
    return {"class": cls.__name__, "config": out}


def architecture_hash(unet_or_config) -> str:
    """sha256 of `architecture_config`: equal for every copy of one architecture, whatever
    its weights, dtype, device or the folder it came from."""
    text = json.dumps(architecture_config(unet_or_config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def published_model_for(unet) -> str | None:
    """The hub id whose published architecture this UNet has, if one is known."""
    h = architecture_hash(unet)
    for model_id in known_models():
        if architecture_hash(UNET_CONFIGS[model_id]) == h:
            return model_id
    return None


def sample_inputs(unet, batch: int = 1) -> dict:
    """One denoising step's UNet inputs (as the pipeline passes them) at the model's default
    size: latents of the config's sample_size (SDXL-Turbo: 64, i.e. 512 px), CLIP's 77 tokens,
    SDXL's pooled text embedding and size/crop ids.  On the UNet's device and in its dtype,
    so they work on the meta device too; the values mean nothing."""
    cfg = unet.config
    p = next(unet.parameters())
    kw = dict(device=p.device, dtype=p.dtype)
    side = cfg.sample_size
    inputs = dict(sample=torch.zeros(batch, cfg.in_channels, side, side, **kw),
                  timestep=torch.tensor(999, device=p.device),
                  encoder_hidden_states=torch.zeros(batch, TEXT_LEN, cfg.cross_attention_dim, **kw))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, **kw),
                                       "time_ids": torch.zeros(batch, 6, **kw)}
    elif cfg.addition_embed_type is not None:
        raise ValueError(f"no sample inputs for addition_embed_type {cfg.addition_embed_type!r}")
    return inputs


@torch.no_grad()
def activation_numel(unet, layers: Mapping[str, nn.Module] | None = None) -> dict[str, int]:
    """Input-activation elements per UNet sample of every quantizable layer, at the model's
    default size, from one forward of `sample_inputs` (on the meta device: shapes only, no
    memory).  The same count, by the same hooks, as `mixdq.sensitivity` records from the
    float pipeline (Sensitivity.act_numel)."""
    from .quant import quantizable_layers
    from .sensitivity_analysis import record_act_numel

    layers = dict(layers) if layers is not None else quantizable_layers(unet)
    numel: dict[str, int] = {}
    handles = record_act_numel(layers, numel)
    try:
        unet(**sample_inputs(unet))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in numel]
    if missing:
        raise RuntimeError(f"{len(missing)} layers were not called in the forward (first: {missing[0]})")
    return {n: numel[n] for n in layers}
