"""Measure a quantized pipeline against its float original: the numbers the app shows.

    float_pipe, quant_pipe = mixdq.measure.pair(pipe)       # shared encoders/VAE, own UNet
    mixdq.quantize(quant_pipe, plan, calibration)
    stats = mixdq.measure.compare(float_pipe, quant_pipe, "a red circle", seed=0)

`compare` generates the same prompt and seed with both pipelines and measures, in that one
call: UNet weight bytes of each (counted tensor by tensor), peak process memory while each
generates, UNet latency per step (the same inputs replayed on both UNets, interleaved, median),
SSIM and PSNR of the quantized image against the float one (`mixdq.metrics`), and for captions
of the embedded model's world whether each image shows what the caption says (`mixdq.zoo`).

The sensitivity table the CLI and the app use is found by `tables.py`, the shipped presets
by `presets.py`; a quantized model as one zip archive: `mixdq.export_archive` /
`mixdq.import_archive` (export.py).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .defaults import is_embedded
from .errors import MixDQError
from .memory import MB, model_nbytes

MAX_STEPS = 50          # few-step models: more than this is a typo, and minutes of CPU
MAX_SEED = 2**63 - 1    # torch.Generator.manual_seed takes any int64 >= 0


class InputError(MixDQError, ValueError):
    """A generation request the library refuses (empty prompt, absurd steps or seed)."""


# ------------------------------------------------------------------------------------------
# Input checks (the app and the CLI show these messages as they are).
# ------------------------------------------------------------------------------------------
def check_request(prompt, seed, steps) -> tuple[str, int, int]:
    """Validate and normalise (prompt, seed, steps); raise InputError naming the fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty: describe the image to generate")
    try:
        seed_f = float(seed)
    except (TypeError, ValueError):
        raise InputError(f"seed must be a whole number, got {seed!r}") from None
    if not math.isfinite(seed_f) or seed_f != int(seed_f) or not 0 <= int(seed_f) <= MAX_SEED:
        raise InputError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    try:
        steps_f = float(steps)
    except (TypeError, ValueError):
        raise InputError(f"steps must be a whole number, got {steps!r}") from None
    if not math.isfinite(steps_f) or steps_f != int(steps_f) or not 1 <= int(steps_f) <= MAX_STEPS:
        raise InputError(f"steps must be a whole number from 1 to {MAX_STEPS} (few-step models use "
                         f"1-4), got {steps!r}")
    return prompt.strip(), int(seed_f), int(steps_f)


# ------------------------------------------------------------------------------------------
# Pipelines side by side.
# ------------------------------------------------------------------------------------------
def shared_copy(unet):
    """A copy of `unet` whose tensors are new objects over the same storage.  Quantizing
    the copy replaces its layers, so the pair holds the float weights once (an SDXL-size
    float32 UNet is 10 GiB); new Parameter objects, so casting, moving or re-allocating
    one side (`tensor.data = ...`) leaves the other alone.  Neither side writes into its
    weights in place."""
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in unet.parameters()}
    memo.update({id(b): b.detach() for b in unet.buffers()})
    return copy.deepcopy(unet, memo)


def pair(pipe):
    """(float_pipe, copy) sharing text encoders, tokenizers, VAE and scheduler config; the copy
    owns its UNet (its tensors over the float UNet's storage, see shared_copy), ready for
    `mixdq.quantize` (which works in place)."""
    twin = type(pipe)(**{**pipe.components, "unet": shared_copy(pipe.unet),
                         "scheduler": copy.deepcopy(pipe.scheduler)})
    for attr in ("_mixdq_source", "_mixdq_defaults"):
        if hasattr(pipe, attr):
            setattr(twin, attr, copy.deepcopy(getattr(pipe, attr)))
    # generation_defaults reads the model folder's few-step settings through the config
    twin.register_to_config(_name_or_path=getattr(pipe, "name_or_path", None)
                            or pipe.config.get("_name_or_path"))
    twin.set_progress_bar_config(disable=True)
    return pipe, twin


def same_architecture(a, b) -> bool:
    """Whether two UNets share one architecture (so their images are comparable)."""
    ca, cb = dict(a.unet.config), dict(b.unet.config)
    for c in (ca, cb):
        for k in [k for k in c if k.startswith("_")]:
            c.pop(k)
    return json.dumps(ca, sort_keys=True, default=str) == json.dumps(cb, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------
# Peak memory and step latency.
# ------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return kb * 1024 / MB if kb is not None else None


@contextmanager
def peak_memory():
    """Peak resident memory of this process (MB) while the block runs: yields a dict whose
    "peak_mb" is filled on exit, and "method" says how it was measured.

    Linux keeps a high-water mark (VmHWM) that writing "5" to /proc/self/clear_refs resets, so
    the peak is exact and costs nothing.  Where that is not allowed, a thread samples VmRSS
    every 2 ms (may miss a shorter spike)."""
    out: dict = {"peak_mb": None, "method": None}
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    stop = threading.Event()
    samples = [current_rss_mb() or 0.0]

    def sample():
        while not stop.wait(0.002):
            v = current_rss_mb()
            if v is not None:
                samples.append(v)

    thread = None
    if not reset:
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    try:
        yield out
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        samples.append(current_rss_mb() or 0.0)
        hwm = _status_kb("VmHWM") if reset else None
        if hwm is not None:
            out.update(peak_mb=hwm * 1024 / MB, method="VmHWM")
        else:
            out.update(peak_mb=max(samples), method="VmRSS sampled every 2 ms")


class _FirstCall:
    """Keeps the inputs of the UNet's first call (to replay them for timing)."""

    def __init__(self, unet):
        self.args = self.kwargs = None
        self.handle = unet.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, _m, args, kwargs):
        if self.args is None:
            self.args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.kwargs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                           for k, v in kwargs.items()}

    def remove(self):
        self.handle.remove()


@torch.inference_mode()
def step_latency(unets: dict, args, kwargs, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds per UNet forward, for each UNet on the same inputs, interleaved round by round
    (so background load hits both alike); one untimed warm-up call each first."""
    times = {k: [] for k in unets}
    cuda = any(next(u.parameters()).is_cuda for u in unets.values())

    def sync():
        if cuda:   # GPU kernels run asynchronously: time to completion, not to launch
            torch.cuda.synchronize()

    for unet in unets.values():
        unet(*args, **kwargs)
    for _ in range(repeats):
        for k, unet in unets.items():
            sync()
            t0 = time.perf_counter()
            unet(*args, **kwargs)
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


@contextmanager
def peak_gpu_memory(device):
    """Peak CUDA memory allocated by torch (MB) while the block runs; None off CUDA."""
    out = {"peak_mb": None}
    device = torch.device(device)
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        torch.cuda.synchronize(device)
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / MB


# ------------------------------------------------------------------------------------------
# The comparison.
# ------------------------------------------------------------------------------------------
def prompt_check(image, prompt: str) -> dict[str, bool] | None:
    """Per attribute, does the image match the prompt?  None when the prompt is not a caption
    of the embedded model's world (the checker only knows that world)."""
    from . import zoo

    if zoo.parse_caption(prompt) is None:
        return None
    return zoo.check(image, prompt)


def generate(pipe, prompt: str, seed: int, settings: dict):
    """One image, seeded on the CPU generator (the same noise on any device)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return pipe(prompt=prompt, generator=gen, **settings).images[0]


def compare(float_pipe, quant_pipe, prompt: str, seed: int = 0, steps: int | None = None, *,
            check: bool | None = None, timing_repeats: int = 5, progress=None) -> dict:
    """Generate `prompt` with both pipelines (same seed and settings) and measure everything.

    check: run the embedded model's attribute checker (default: when the float model is the
    embedded one and the prompt is one of its captions).  progress(fraction, text) is called
    between stages when given.  Returns a plain dict (see the module doc)."""
    from .defaults import generation_defaults
    from .metrics import images_to_tensor, psnr, ssim

    def say(frac, text):
        if progress is not None:
            progress(frac, text)

    settings = generation_defaults(float_pipe)
    prompt, seed, steps = check_request(prompt, seed, settings["num_inference_steps"] if steps is None else steps)
    settings["num_inference_steps"] = steps

    say(0.0, "generating with the float model")
    recorder = _FirstCall(float_pipe.unet)
    device = float_pipe.unet.device
    try:
        with peak_memory() as mem_f, peak_gpu_memory(device) as gpu_f:
            t0 = time.perf_counter()
            float_image = generate(float_pipe, prompt, seed, settings)
            float_s = time.perf_counter() - t0
    finally:
        recorder.remove()
    say(0.35, "generating with the quantized model")
    with peak_memory() as mem_q, peak_gpu_memory(quant_pipe.unet.device) as gpu_q:
        t0 = time.perf_counter()
        quant_image = generate(quant_pipe, prompt, seed, settings)
        quant_s = time.perf_counter() - t0
    say(0.7, f"timing the UNets ({timing_repeats} interleaved steps each)")
    times = step_latency({"float": float_pipe.unet, "quantized": quant_pipe.unet},
                         recorder.args, recorder.kwargs, repeats=timing_repeats)
    say(0.9, "comparing images")
    a, b = images_to_tensor([float_image]), images_to_tensor([quant_image])
    ssim_v, psnr_v = float(ssim(b, a)), float(psnr(b, a))
    if check is None:
        check = is_embedded(float_pipe)
    checks = None
    if check:
        cf, cq = prompt_check(float_image, prompt), prompt_check(quant_image, prompt)
        if cf is not None:
            checks = {"float": cf, "quantized": cq}
    float_bytes, quant_bytes = model_nbytes(float_pipe.unet), model_nbytes(quant_pipe.unet)
    step_f, step_q = statistics.median(times["float"]), statistics.median(times["quantized"])
    say(1.0, "done")
    return {
        "prompt": prompt, "seed": seed, "settings": settings,
        "float_image": float_image, "quant_image": quant_image,
        "unet_float_mb": float_bytes / MB, "unet_quant_mb": quant_bytes / MB,
        "unet_ratio": quant_bytes / float_bytes,
        "peak_mb": {"float": mem_f["peak_mb"], "quantized": mem_q["peak_mb"]},
        "peak_method": mem_q["method"],
        "peak_gpu_mb": ({"float": gpu_f["peak_mb"], "quantized": gpu_q["peak_mb"]}
                        if gpu_q["peak_mb"] is not None else None),
        "step_ms": {"float": step_f * 1e3, "quantized": step_q * 1e3},
        "step_ms_all": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "speedup": step_f / step_q if step_q > 0 else float("nan"),
        "generate_s": {"float": float_s, "quantized": quant_s},
        "ssim": ssim_v, "psnr": psnr_v, "checks": checks,
        "kernel": getattr(getattr(quant_pipe.unet, "mixdq_state", None), "kernel", None),
    }


def difference_map(float_image, quant_image, gain: float | None = None):
    """|quantized - float| per pixel as an image, amplified so small errors are visible.
    gain=None scales the largest difference to full white.  Returns (PIL image, gain)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(float_image.convert("RGB"), dtype=np.float32)
    b = np.asarray(quant_image.convert("RGB"), dtype=np.float32)
    diff = np.abs(b - a).max(axis=2)
    if gain is None:
        gain = 255.0 / diff.max() if diff.max() > 0 else 1.0
    out = np.clip(diff * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L"), gain
