"""Calibration: activation ranges from running the pipeline on real prompts.

Ranges are taken at the model's own step count, resolution and guidance, with
a fixed seed per prompt, because that is where the quantized model will run.

Two ways to observe:
  `observing(unet, "quantize")`  quantized layers record their input range and
      quantize with it as they go, so each layer is calibrated on what its
      (already quantized) upstream layers really produce.  `quantize` uses this.
  `float_ranges(pipe, calibration)`  ranges of the float model for every
      layer at once, through the same layer code (BOS token excluded, shortcut
      slices apart).  Sensitivity analysis uses this; `observe_float_ranges`
      does the same for a bare UNet and any way of running it (the benchmarks).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .defaults import generation_defaults, model_dir
from .resources import shipped
from .plan import LayerBits, Plan
from .quant import quantizable_layers, quantized_layers, replace_layers, restore_layers
from .quant.quantizers import ActRange


def shipped_prompts_file(pipe) -> Path:
    """The model folder's calibration_prompts.txt, else the generic list."""
    folder = model_dir(pipe)
    path = folder / "calibration_prompts.txt" if folder else None
    return path if path and path.is_file() else shipped("assets", "calibration_prompts.txt")


def _read_prompts(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text().splitlines() if p.strip()]


def shipped_prompts(pipe) -> list[str]:
    return _read_prompts(shipped_prompts_file(pipe))


DEFAULT_PROMPTS = 32


@dataclass
class Calibration:
    """What to run the pipeline on. None means the model's own default."""

    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 8

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("calibration needs at least one prompt")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    @classmethod
    def default(cls, pipe, n: int | None = None, **kw) -> "Calibration":
        """The prompt list shipped with the model (or the generic one), first n (default: 32,
        or all if fewer), other fields their defaults: what the CLI uses with no flags."""
        path = shipped_prompts_file(pipe)
        prompts = _read_prompts(path)
        n = min(DEFAULT_PROMPTS, len(prompts)) if n is None else n
        if n > len(prompts):
            raise ValueError(f"{path} holds {len(prompts)} prompts; asked for {n}")
        return cls(prompts=prompts[:n], **kw)

    def settings(self, pipe) -> dict:
        """Generation settings with the model defaults filled in."""
        out = generation_defaults(pipe)
        for key in ("num_inference_steps", "guidance_scale", "height", "width"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def run_pipeline(pipe, calibration: Calibration, output_type: str = "latent",
                 progress: bool = True, desc: str = "calibrating", callback=None):
    """Run the pipeline over the calibration prompts, batch by batch.

    Each prompt i gets its own generator seeded with seed + i, so results do not
    depend on the batch size.  Returns the list of per-batch outputs.
    """
    settings = calibration.settings(pipe)
    prompts = calibration.prompts
    bs = calibration.batch_size
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    batches = range(0, len(prompts), bs)
    for k, start in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
        chunk = prompts[start:start + bs]
        gens = [torch.Generator("cpu").manual_seed(calibration.seed + start + i)
                for i in range(len(chunk))]
        with torch.inference_mode():
            outputs.append(pipe(prompt=chunk, generator=gens, output_type=output_type, **settings))
        if callback is not None:
            callback(k + 1, len(batches))
    return outputs


@contextlib.contextmanager
def observing(unet, mode: str = "quantize"):
    """Record activation ranges of the quantized layers while the block runs.

    On exit the ranges are frozen into the layers' scales and zero points.
    """
    if mode not in ("quantize", "float"):
        raise ValueError("mode must be 'quantize' or 'float'")
    layers = quantized_layers(unet)
    for layer in layers.values():
        layer.start_observing(mode)
    try:
        yield layers
    finally:
        for layer in layers.values():
            layer.stop_observing()


def bos_embedding(pipe) -> torch.Tensor:
    """Token 0 of the text embedding the UNet sees: the same for every prompt.

    CLIP is causal, so the BOS position attends only to itself; one encode of
    any prompt gives it.  For SDXL it is both encoders' states concatenated.
    """
    with torch.no_grad():
        out = pipe.encode_prompt(prompt="", device=pipe.unet.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    return out[0][0, 0].detach().clone()


def observe_float_ranges(unet, run, bos: torch.Tensor | None = None) -> dict[str, list[ActRange]]:
    """Activation ranges of the float `unet` for every quantizable layer while `run()`
    runs it, through the quantized layers' own code kept in float (so BOS-aware K/V,
    given the BOS embedding, and the shortcut slices are observed as they will run)."""
    names = list(quantizable_layers(unet))
    plan = Plan({n: LayerBits(16, 16) for n in names})
    originals = replace_layers(unet, plan, bos_embedding=bos, include_float=True)
    try:
        with observing(unet, "float") as layers:
            run()
            return {n: list(layer.ranges) for n, layer in layers.items()}
    finally:
        restore_layers(unet, originals)


def float_ranges(pipe, calibration: Calibration, bos: torch.Tensor | None = None, progress=True
                 ) -> dict[str, list[ActRange]]:
    """Activation ranges of the float model for every quantizable layer (bos: the
    pipeline's BOS embedding, computed when not given)."""
    return observe_float_ranges(
        pipe.unet, lambda: run_pipeline(pipe, calibration, progress=progress, desc="float ranges"),
        bos if bos is not None else bos_embedding(pipe))
