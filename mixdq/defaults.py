"""What a loaded pipeline carries besides its weights: the model's few-step settings,
where it came from, the device and dtype it runs in.  Loading, calibration, export and
the app all ask here (and nothing here imports them back)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .resources import shipped

EMBEDDED = shipped("assets", "tiny-sdxl")
DEFAULTS_FILE = "mixdq_defaults.json"   # a model folder's few-step settings
META_FILE = "mixdq.json"                # what marks a mixdq export (and its UNet folder)

# Few-step settings of the models people quantize with MixDQ.
KNOWN_DEFAULTS = {
    "stabilityai/sdxl-turbo": dict(num_inference_steps=1, guidance_scale=0.0, height=512, width=512),
    "stabilityai/sd-turbo": dict(num_inference_steps=1, guidance_scale=0.0, height=512, width=512),
}
LCM_DEFAULTS = dict(num_inference_steps=4, guidance_scale=1.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """float16 on CUDA, float32 on CPU (CPU float16 matmul is slow everywhere here)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def model_dir(pipe) -> Path | None:
    """The local folder a pipeline came from, if any."""
    name = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if name and Path(name).is_dir():
        return Path(name)
    return None


def generation_defaults(pipe) -> dict:
    """The model's own few-step settings: steps, guidance, height, width."""
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size * vae_scale
    out = dict(num_inference_steps=1, guidance_scale=0.0, height=size, width=size)
    folder = model_dir(pipe)
    if folder and (folder / DEFAULTS_FILE).is_file():
        out.update(json.loads((folder / DEFAULTS_FILE).read_text()))
    out.update(getattr(pipe, "_mixdq_defaults", {}) or {})
    return out


def is_embedded(pipe) -> bool:
    """Whether the pipeline is the embedded model (or an export of it): its checker applies."""
    folder = model_dir(pipe)
    if folder is None:
        return False
    if folder.resolve() == EMBEDDED.resolve():
        return True
    meta = folder / META_FILE   # an export remembers that its model was the embedded one
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("embedded_model") is True
    except (OSError, ValueError):
        return False
