"""load_pipeline(source): the first step of the flow.

A source is one of
  None / "embedded"     the small model shipped in assets/tiny-sdxl (offline)
  a local folder        a diffusers pipeline folder, or a folder written by
                        `mixdq.save_quantized` (then it loads quantized)
  a hub id              e.g. "stabilityai/sdxl-turbo", taken from the local
                        Hugging Face cache first, downloaded only if allowed
  + lora=...            an LCM-LoRA (hub id or folder) fused into the UNet,
                        with the LCM scheduler
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .defaults import EMBEDDED, KNOWN_DEFAULTS, LCM_DEFAULTS, META_FILE, default_device, default_dtype
from .errors import ModelNotFoundError


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pipeline(source: str | os.PathLike | None = None, *, lora: str | None = None,
                  device=None, dtype: torch.dtype | None = None, kernel: str | None = None,
                  int8_safe: bool = True):
    """Load a text-to-image pipeline, ready to quantize, or a mixdq export
    (`kernel`, `int8_safe`: as in load_quantized, for exports; a float model is
    fitted to the device when it is quantized)."""
    from diffusers import DiffusionPipeline

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if source is None or str(source) in ("embedded", "default"):
        if not (EMBEDDED / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the embedded model is missing from {EMBEDDED}: restore it from git "
                "(`git checkout -- assets/`) or retrain it with `python -m mixdq.zoo.train_tiny`")
        source = EMBEDDED
    path = Path(os.path.expanduser(str(source)))
    if (path / META_FILE).is_file():
        from .export import load_quantized
        return load_quantized(path, device=device, kernel=kernel, int8_safe=int8_safe)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json) "
                "nor a mixdq export (no mixdq.json)")
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
        kind = "local"
    elif HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        pipe = _from_hub(str(source), dtype)
        kind = "hub"
    else:
        raise ModelNotFoundError(
            f"model source {str(source)!r} is neither a local folder nor a hub id like "
            "'stabilityai/sdxl-turbo'; check the path")
    # A hub pipeline's name_or_path is a cache snapshot folder: remember its id's settings now.
    pipe._mixdq_defaults = dict(KNOWN_DEFAULTS.get(str(source), {}))
    if lora is not None:
        _fuse_lcm_lora(pipe, lora)
        pipe._mixdq_defaults.update(LCM_DEFAULTS)
    pipe.to(device)
    pipe._mixdq_source = {"source": str(source), "kind": kind, "lora": lora}
    return pipe


def _from_hub(repo_id: str, dtype, **kw):
    from diffusers import DiffusionPipeline

    variant = "fp16" if dtype == torch.float16 else None
    try:  # the local cache first: no network needed, no waiting on time-outs
        return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, local_files_only=True, **kw)
    except Exception as cached_error:  # noqa: BLE001 - diffusers raises many kinds here
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise _not_found(repo_id, cached_error) from None
    try:
        try:
            return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, variant=variant, **kw)
        except ValueError:  # no fp16 variant published
            return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001
        raise _not_found(repo_id, e) from None


def _not_found(repo_id: str, error: Exception) -> ModelNotFoundError:
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return ModelNotFoundError(
        f"could not load {repo_id!r}: it is not in the local Hugging Face cache ({cache}/hub) and "
        f"the hub could not be reached ({type(error).__name__}). On a machine with network run "
        f"`huggingface-cli download {repo_id}` and copy the cache here, or pass the local folder "
        "of a diffusers pipeline instead.")


def _fuse_lcm_lora(pipe, lora: str) -> None:
    """Fuse an LCM-LoRA into the UNet (so its weights get quantized) and switch to LCM."""
    from diffusers import LCMScheduler

    try:
        pipe.load_lora_weights(lora)
    except ImportError as e:
        raise ModelNotFoundError(f"loading a LoRA needs the `peft` package: pip install peft ({e})")
    except Exception as e:  # noqa: BLE001
        if Path(lora).exists():
            raise
        raise _not_found(lora, e) from None
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
