"""Measure a quantized pipeline against its float original: the numbers the app shows.

    float_pipe, quant_pipe = mixdq.measure.pair(pipe)       # shared encoders/VAE, own UNet
    mixdq.quantize(quant_pipe, plan, calibration)
    stats = mixdq.measure.compare(float_pipe, quant_pipe, "a red circle", seed=0)

`compare` generates the same prompt and seed with both pipelines and measures, in that one
call: UNet weight bytes of each (counted tensor by tensor), peak process memory while each
generates, UNet latency per step (the same inputs replayed on both UNets, interleaved, median),
SSIM and PSNR of the quantized image against the float one (`mixdq.metrics`), and for captions
of the embedded model's world whether each image shows what the caption says (`mixdq.zoo`).

Also here, so the command line and the app share them: the default calibration and sensitivity
the CLI would use (`default_calibration`; `find_sensitivity`: shipped for this model and
calibration, else cached, and `load_sensitivity`, else measured), the shipped presets
(`presets`) and the bits-per-layer chart data (`plan_chart_data`).  A quantized model as one
zip archive: `mixdq.export_archive` / `mixdq.import_archive` (export.py).
"""
from __future__ import annotations

import importlib
import copy
import json
import math
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .defaults import is_embedded
from .errors import MixDQError
from .memory import MB, model_nbytes
from .resources import shipped

MAX_STEPS = 50          # few-step models: more than this is a typo, and minutes of CPU
MAX_SEED = 2**63 - 1    # torch.Generator.manual_seed takes any int64 >= 0
PRESETS_DIR = shipped("presets")


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
def pair(pipe):
    """(float_pipe, copy) sharing text encoders, tokenizers, VAE and scheduler config; the copy
    owns a deep copy of the UNet, ready for `mixdq.quantize` (which works in place)."""
    twin = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
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


# ------------------------------------------------------------------------------------------
# Calibration, sensitivity, presets: what the CLI would use.
# ------------------------------------------------------------------------------------------
def default_calibration(pipe):
    """The calibration `python -m mixdq ...` uses with no calibration flags (same cache key,
    so sensitivity computed by either is reused by the other)."""
    import argparse

    from .sensitivity import add_calibration_args, calibration_from_args

    parser = argparse.ArgumentParser()
    add_calibration_args(parser)
    return calibration_from_args(pipe, parser.parse_args([]))


@dataclass
class SensitivityLookup:
    """What `find_sensitivity` found: the table or None, where it came from ("shipped",
    "cached" or "none"), and one line for the user saying so.  For "none": `shipped_note` says
    why the shipped table measured for this model does not apply (if there is one),
    `shipped_flags` the command-line flags that would select its calibration, and `todo` how
    many evaluations the analysis still has to run."""
    table: object | None          # mixdq.sensitivity.Sensitivity
    source: str
    message: str
    shipped_note: str | None = None
    shipped_flags: str | None = None
    todo: int | None = None


def _calibration_fields(prompts, seed, settings, dtype=None, device_type=None) -> dict:
    out = {"prompts": prompts, "seed": seed, "steps": settings.get("num_inference_steps"),
           "guidance": settings.get("guidance_scale"), "height": settings.get("height"),
           "width": settings.get("width"), "dtype": dtype, "device": device_type}
    return {k: v for k, v in out.items() if v is not None}


_CALIBRATION_FLAGS = {"prompts": "--prompts", "seed": "--seed", "steps": "--steps", "guidance": "--guidance",
                      "height": "--resolution", "width": "--resolution", "device": "--device"}


def _shipped_mismatch(meta: dict, key: str, inputs: dict, name: str) -> tuple[str, str | None]:
    """Why a shipped table measured for this model does not fit this calibration (field by
    field, as far as its meta records them), and the flags that would select its calibration."""
    theirs = _calibration_fields(meta.get("prompts"), meta.get("seed"), meta.get("settings") or {},
                                 meta.get("dtype"), meta.get("device_type"))
    yours = _calibration_fields(len(inputs["prompts"]), inputs["seed"], inputs["settings"],
                                inputs["dtype"], inputs["device_type"])
    diff = [k for k in theirs if theirs[k] != yours.get(k)]
    if diff:
        how = "with " + ", ".join(f"{k} {theirs[k]} (yours {yours.get(k)})" for k in diff)
        flags = dict.fromkeys(f"{_CALIBRATION_FLAGS[k]} {theirs[k]}" for k in diff if k in _CALIBRATION_FLAGS)
        flags = " ".join(flags) or None
    elif meta.get("key"):  # the key also covers the prompts' text and the sensitivity code's version
        how = (f"with other calibration prompts or another version of the sensitivity code "
               f"(cache key {meta['key']}, yours {key})")
        flags = None
    else:
        how, flags = "with a calibration it does not record (no cache key in its meta)", None
    return f"the shipped {name} was measured for this model {how}", flags


def find_sensitivity(pipe, calibration=None, presets_dir=None) -> SensitivityLookup:
    """The sensitivity table for this model and calibration, without measuring anything: the
    shipped one in presets/ if it was measured for exactly these (the same cache key), else a
    complete one in the on-disk cache, else none (`message` says why, and what is cached)."""
    S = importlib.import_module("mixdq.sensitivity")  # the module: mixdq.sensitivity is also the verb
    from .quant import quantizable_layers

    calibration = calibration or default_calibration(pipe)
    key, inputs = S.cache_key(pipe, calibration)
    note = flags = None
    for path in sorted(Path(presets_dir or PRESETS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(data, dict) and data.get("format") == "mixdq-sensitivity/1"):
            continue
        meta = data.get("meta") or {}
        if str(meta.get("model", "")) != inputs["model"][:16]:
            continue   # another model's table says nothing about this one
        try:
            name = str(path.resolve().relative_to(PRESETS_DIR.parent))
        except ValueError:
            name = str(path)
        # Scores measured on other prompts, seed, steps or size answer another question: only
        # the exact cache key (model and calibration) counts.
        if meta.get("key") == key:
            return SensitivityLookup(S.Sensitivity.from_dict(data), "shipped",
                                     f"shipped {name}, measured for this model and calibration")
        note, flags = _shipped_mismatch(meta, key, inputs, name)
    folder = S.cache_root() / key
    prefix = f"{note}; " if note else ""
    try:
        names = list(quantizable_layers(pipe.unet))
        groups = {n: S.layer_group(n) for n in names}
        wbits = S._candidates(None, S.DEFAULT_WEIGHT_BITS)
        abits = S._candidates(None, S.DEFAULT_ACT_BITS)
        jobs = list(S._jobs(names, groups, wbits, abits))
        done = S._read_results(folder) if folder.is_dir() else {}
        todo = sum(1 for job in jobs if not all(m in done.get(job, {}) for m in S.metrics_for(groups[job[0]])))
    except (AttributeError, OSError, ValueError, KeyError):  # cache layout changed: recompute
        return SensitivityLookup(None, "none", f"{prefix}the cache in {folder} is unreadable", note, flags)
    if todo or not (folder / "model.json").is_file():
        have = "nothing" if todo == len(jobs) else f"{len(jobs) - todo} of {len(jobs)} evaluations"
        return SensitivityLookup(None, "none", f"{prefix}{have} cached in {folder}", note, flags, todo)
    return SensitivityLookup(S.sensitivity(pipe, calibration, progress=False), "cached",
                             f"cached in {folder}")


def cached_sensitivity(pipe, calibration=None, presets_dir=None):
    """The sensitivity table if it is shipped in presets/ for this exact model and calibration
    or already complete on disk, else None.  Never starts the (long) analysis itself."""
    return find_sensitivity(pipe, calibration, presets_dir).table


def load_sensitivity(pipe, calibration=None, presets_dir=None, log=None):
    """`find_sensitivity`, else the analysis (resuming what is cached).  `log` (default: print
    to stderr) gets one line saying which.  The command line takes its table from here, so it
    finds what the app finds."""
    import sys

    S = importlib.import_module("mixdq.sensitivity")
    log = log or (lambda text: print(text, file=sys.stderr))
    calibration = calibration or default_calibration(pipe)
    found = find_sensitivity(pipe, calibration, presets_dir)
    if found.table is not None:
        log(f"sensitivity: {found.message}")
        return found.table
    hint = f"; {found.shipped_flags} would use the shipped table instead" if found.shipped_flags else ""
    log(f"sensitivity: {found.message}: measuring {found.todo or 'the missing'} evaluations, every layer at "
        f"every candidate bit-width, once (resumable, then cached){hint}")
    return S.sensitivity(pipe, calibration)


@dataclass
class Preset:
    name: str
    plan: object                  # mixdq.Plan
    size_mb: float                # layer_costs(unet).total_mb(plan): what quantize will store
    stats: dict = field(default_factory=dict)   # presets/NAME.stats.json, measured when shipped


def presets(unet, folder: Path | None = None) -> list[Preset]:
    """The shipped plans (presets/NAME.json, numbers in NAME.stats.json) that fit this UNet,
    smallest first.  Plans for other models are skipped."""
    from .memory import layer_costs
    from .plan import Plan
    from .quant import quantizable_layers

    folder = Path(folder or PRESETS_DIR)
    names = list(quantizable_layers(unet))
    costs = None
    out = []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".stats.json"):
            continue
        try:
            plan = Plan.load(path)
            plan.validate(names)
        except MixDQError:
            continue
        costs = costs or layer_costs(unet)
        stats_path = path.with_name(path.stem + ".stats.json")
        try:
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        except ValueError:
            stats = {}
        out.append(Preset(path.stem, plan, costs.total_mb(plan), stats))
    return sorted(out, key=lambda p: p.size_mb)


def equivalent_bits(size_mb: float, float_mb: float, float_bits: int = 32) -> float:
    """The bit-width a uniformly quantized UNet of `size_mb` would have: float bits scaled by
    size / float size (32 on CPU, 16 for a float16 model; scales and kept-float parts count)."""
    return float_bits * size_mb / float_mb


def dtype_bits(unet) -> int:
    import torch

    return torch.finfo(unet.dtype).bits


# ------------------------------------------------------------------------------------------
# Looking inside a plan.
# ------------------------------------------------------------------------------------------
_INPUT = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "class_embedding",
          "encoder_hid_proj")


def block_of(name: str) -> str:
    """The UNet block a layer belongs to, as the chart groups them: input (conv_in and the
    time/size embeddings), down_blocks.i, mid_block, up_blocks.i, output (norm and conv_out)."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    if parts[0] in _INPUT:
        return "input"
    if parts[0] == "mid_block":
        return "mid_block"
    return "output"


def _block_order(block: str) -> tuple:
    """Data-flow order (diffusers registers up_blocks before mid_block)."""
    kind, _, idx = block.partition(".")
    rank = {"input": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3, "output": 4}[kind]
    return rank, int(idx) if idx else 0


def plan_chart_data(plan, unet) -> list[dict]:
    """One row per quantizable layer, blocks in data-flow order (layers in the UNet's own
    order inside a block): block, group (content or quality), weight and activation bits
    (16 = kept float), parameter count."""
    from .plan import FLOAT_BITS
    from .quant import layer_spec, quantizable_layers
    from .sensitivity import layer_group

    rows = []
    for name, module in quantizable_layers(unet).items():
        bits = plan.get(name)
        shape, _, _ = layer_spec(module)
        rows.append({"layer": name, "block": block_of(name), "group": layer_group(name),
                     "weight_bits": bits.weight if bits else FLOAT_BITS,
                     "act_bits": bits.act if bits else FLOAT_BITS,
                     "params": math.prod(shape)})
    return sorted(rows, key=lambda r: _block_order(r["block"]))   # stable: keeps order inside a block
