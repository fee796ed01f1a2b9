"""Build the benchmarked UNets with random weights, fast and without a float copy.

`torch.nn.Module` default initialisation (kaiming_uniform through Python loops) of the
2.6 G-parameter SDXL UNet takes minutes on two cores; building on the meta device and
filling each tensor once with a scaled normal takes seconds and keeps activations in a
sane range (no inf/NaN, no denormals, both of which would change kernel speed).
"""
from __future__ import annotations

import math

import torch

from .configs import POOLED_DIM, TEXT_LEN, config, expected_params


def _fill_(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    if t.dim() >= 2:  # linear / conv weight: unit-variance outputs
        fan_in = t[0].numel()
        t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    elif name.endswith("weight"):  # norm scales
        t.fill_(1.0)
    else:  # biases
        t.normal_(0.0, 0.02, generator=gen)


def build_unet(name: str, dtype=torch.float32, device="cpu", seed: int = 0, materialize: bool = True):
    """The published UNet architecture `name` (see bench.configs) with random weights.

    materialize=False returns it on the meta device (no memory), for counting or for
    building quantized variants layer by layer.
    """
    from mixdq.architectures import build_meta

    unet = build_meta(config(name), expected_params(name), name)
    if not materialize:
        return unet
    unet = unet.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            # fill in float32 then cast: normal_ on float16 CPU tensors is slow
            if p.dtype != torch.float32:
                p.data = p.data.float()
            _fill_(pname, p.data, gen)
        for bname, b in unet.named_buffers():
            if b.is_floating_point():
                b.zero_()
    unet = unet.to(dtype).eval().requires_grad_(False)
    return unet


def unet_inputs(name: str, unet, batch: int = 1, px: int = 512, dtype=torch.float32, device="cpu", seed: int = 1):
    """One denoising step's inputs at `px` pixels (latents are px/8)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cfg = unet.config
    side = px // 8
    sample = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    ehs = torch.randn(batch, TEXT_LEN, cfg.cross_attention_dim, generator=g)
    kw = dict(sample=sample.to(device, dtype), timestep=torch.tensor(999, device=device),
              encoder_hidden_states=ehs.to(device, dtype))
    if cfg.addition_embed_type == "text_time":
        pooled = POOLED_DIM.get(name, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=dtype, device=device),
        }
    return kw
