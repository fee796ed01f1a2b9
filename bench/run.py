"""Memory and speed of quantized UNets at the published sizes, measured in one run.

    python -m mixdq bench                      # the full CPU run (SDXL-Turbo, SD-Turbo, SD1.5)
    python -m bench.run --models sdxl-turbo --reps 3
    python -m bench.run --models tiny-sdxl --px 128 --out /tmp/b   # seconds; what the tests run

What one run does, per model (random weights: memory and speed do not depend
on weight values; the architecture is the published config, bench/configs.py):

1. Build the float32 UNet.  One float step with input hooks gives each
   quantizable layer a real activation range ("calibration": 1 step, timed).
2. Build each quantized variant (W8A8, mixed ~W5A8, mixed ~W4A8, W4A16) from
   the float model with `mixdq.quant.replace_layers`.  Variants share the float
   model's unquantized tensors (norms, biases of float layers), so the process
   holds one float model plus the quantized layers, never a second float copy.
   Quantization time is measured per variant (calibration excluded; the
   calibration step's time is reported next to it).
3. Time one UNet step of every model interleaved, round after round (float32,
   W8A8, ..., float32, W8A8, ...), median per model: ratios taken this way hold
   on a shared, noisy machine.  Peak memory of each step is the process's
   high-water mark (VmHWM, reset before each step via /proc/self/clear_refs)
   above the resident set at the step's start.
4. Convert the float model to bfloat16 (weight bytes = float16's), time it too
   (a strong CPU baseline on AVX-512 BF16 machines), and record its bytes.

Results: `<out>/results-<device>.json` and `<out>/RESULTS.md` (all result JSONs
found in <out>, CPU and GPU, are rendered together).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .openvino_variants import VARIANTS as OPENVINO_VARIANTS  # the tool a CPU user would pick instead

HERE = Path(__file__).resolve().parent
MB = 1_000_000
MiB = 1 << 20


# ---------------------------------------------------------------------------
# process memory
# ---------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def fix_malloc_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation >= nbytes by mmap and return it to the OS on free.

    glibc raises its mmap threshold after frees (up to 32 MiB), after which freed
    tensors stay in the heap and count in the resident set: peaks read from
    VmHWM then include memory no tensor holds.  Fixing the threshold makes
    the resident set follow live tensors; small allocations are unaffected.
    """
    try:
        import ctypes
        M_MMAP_THRESHOLD = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except Exception:
        return False


def trim():
    gc.collect()
    try:  # give freed heap pages back so RSS deltas mean something
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


# ---------------------------------------------------------------------------
# environment record
# ---------------------------------------------------------------------------
def environment(device: str, argv=None, prog: str = "python -m bench.run") -> dict:
    from mixdq.quant import kernels, machine

    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": prog + " " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": machine.cpu_capability(),
    }
    for mod in ("diffusers", "transformers", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()

        env["git_commit"] = git("rev-parse", "--short", "HEAD")
        if env["git_commit"] and git("status", "--porcelain", "--untracked-files=no"):
            env["git_commit"] += " + uncommitted changes"  # what ran is not exactly that commit
    except Exception:
        env["git_commit"] = None
    try:
        env["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["kernel_dispatch"] = {k: v for k, v in kernels.kernel_report("cpu").items()
                                  if k in ("kernel", "linear_backend", "conv_backend", "reason")}
    return env


# ---------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------
def _sensitive(name: str) -> bool:
    """Layers MixDQ's search keeps at 8 bits almost always: the text-facing
    cross-attention K/V, the first / last convs, the embeddings, the shortcuts."""
    return (name.endswith(("attn2.to_k", "attn2.to_v")) or name in ("conv_in", "conv_out")
            or name.startswith(("time_embedding", "add_embedding")) or "conv_shortcut" in name)


def mixed_plan(layers: dict, target_bits: float, low: int, act: int = 8, lowest: int | None = None):
    """A deterministic mixed plan with parameter-weighted mean weight bits ~target.

    Sensitive layers stay at 8 bits; the largest remaining layers drop to `low`
    bits until the mean reaches the target; if it cannot (the 8-bit layers keep
    it above), the largest low-bit layers drop further to `lowest`.
    Stands in for a searched plan: memory and speed depend on how many weights
    sit at which width, not on which exact layers.
    """
    from mixdq import Plan

    numel = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(numel.values())
    bits = {n: 8 for n in layers}

    def mean():
        return sum(bits[n] * numel[n] for n in layers) / total

    order = sorted((n for n in layers if not _sensitive(n)), key=lambda n: -numel[n])
    for n in order:
        if mean() <= target_bits:
            break
        bits[n] = low
    if lowest is not None:
        for n in order:
            if mean() <= target_bits:
                break
            if bits[n] == low:
                bits[n] = lowest
    plan = Plan({n: (b, act) for n, b in bits.items()},
                meta={"mean_weight_bits": round(mean(), 3), "kind": f"mixed ~W{target_bits:g}A{act}"})
    return plan


KEEP_W8 = "-keep-w8"  # variant suffix: quantize(int8_safe=False): W8A8 layers stay 8-bit everywhere


def make_plans(layers: dict, variants) -> dict:
    from mixdq import Plan

    names = list(layers)
    out = {}
    for v in variants:
        if v == "W8A8":
            out[v] = Plan.uniform(names, 8, 8, meta={"mean_weight_bits": 8})
        elif v == "W5A8":
            out[v] = mixed_plan(layers, 5.0, 4)
        elif v == "W4A8":
            out[v] = mixed_plan(layers, 4.0, 4, lowest=2)
        elif v == "W7A8":  # 7-bit codes: exact on the int8 kernels of CPUs without VNNI
            out[v] = Plan.uniform(names, 7, 8, meta={"mean_weight_bits": 7})
        elif v == "W4A16":
            out[v] = Plan.uniform(names, 4, 16, meta={"mean_weight_bits": 4})
        elif v.endswith(KEEP_W8):
            base = v.removesuffix(KEEP_W8)
            out[v] = make_plans(layers, [base])[base]
        else:
            raise ValueError(f"unknown variant {v!r}")
    return out


# ---------------------------------------------------------------------------
# building variants without a second float copy
# ---------------------------------------------------------------------------
def shared_clone(unet):
    """A structural copy of `unet` whose tensors are the very same objects."""
    memo = {id(t): t for t in list(unet.parameters()) + list(unet.buffers())}
    return copy.deepcopy(unet, memo)


def observe_ranges(unet, inputs) -> tuple[dict, float, torch.Tensor]:
    """One float step observed by the library (calibrate.observe_float_ranges): each
    quantizable layer's activation ranges, the step's seconds and output.  Token 0
    of the text input stands in for CLIP's BOS (bench_bos)."""
    from mixdq.calibrate import observe_float_ranges

    step = {}

    def run():
        t = time.perf_counter()
        with torch.inference_mode():
            step["out"] = unet(**inputs).sample
        step["s"] = time.perf_counter() - t

    ranges = observe_float_ranges(unet, run, bos=bench_bos(inputs))
    return ranges, step["s"], step["out"]


def bench_bos(inputs) -> torch.Tensor:
    """The BOS embedding BOS-aware K/V keep exact: token 0 of the step's text input
    (random here; a pipeline's is its encoders' BOS state, the same for every prompt)."""
    return inputs["encoder_hidden_states"][0, 0].detach().clone()


def build_variant(unet, plan, ranges, int8_safe: bool = True, bos=None, kernel=None):
    """The quantized variant as `mixdq.quantize` makes it (mixdq.quantize_unet: W8A8
    layers as W7A8 where their int8 backend saturates on 8-bit codes, prepacked
    copies made layer by layer), sharing the float model's unquantized tensors."""
    from mixdq import model_nbytes, quantize_unet

    trim()
    rss0 = rss_bytes()
    t = time.perf_counter()
    clone = shared_clone(unet)
    with torch.no_grad():
        report = quantize_unet(clone, plan, ranges, bos=bos, kernel=kernel, int8_safe=int8_safe)
    dt = time.perf_counter() - t
    trim()
    rss1 = rss_bytes()
    # bytes this variant holds on its own: its quantized layers (the rest is
    # shared with the float model, counted in its float bytes), prepacked copies
    # included; stored_bytes: what the plan stores (= layer_costs, exports)
    return clone, {
        "plan": report.plan.summary(), "mean_weight_bits": plan.meta.get("mean_weight_bits"),
        "quantize_s": dt, "weight_bytes": model_nbytes(clone), "stored_bytes": report.quantized_bytes,
        "rss_delta_bytes": None if rss0 is None else rss1 - rss0,
        "kernel": report.kernel["kernel"], "routed_int8_layers": report.int8_layers, "backends": report.backends,
        "w8a8_as_w7a8_layers": report.plan.meta.get("fitted", {}).get("layers", 0),
    }


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def step_once(model, inputs, device):
    """One UNet step: seconds, peak bytes above the start (CPU: VmHWM; CUDA: allocator)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs).sample
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, torch.cuda.max_memory_allocated() - base, out
    trim()
    base = rss_bytes()
    ok = reset_peak()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model(**inputs).sample
    dt = time.perf_counter() - t
    peak = peak_bytes() if ok else None
    return dt, (None if peak is None or base is None else peak - base), out


def interleaved(models: dict, inputs, device, reps: int, warmup: int = 1, log=print) -> dict:
    """Timed rounds after `warmup` ones, the models interleaved in each.  Peaks are
    kept apart: the timed steps' (steady state) and the first step's, which also
    makes whatever a model builds once (the int8 backends' prepacked weights)."""
    res = {k: {"times": [], "peak": [], "first_peak": None, "out": None} for k in models}
    for r in range(warmup + reps):
        for k, m in models.items():
            dt, peak, out = step_once(m, inputs, device)
            if r >= warmup:
                res[k]["times"].append(dt)
                res[k]["peak"].append(peak)
            elif r == 0:
                res[k]["first_peak"] = peak
            if res[k]["out"] is None:
                res[k]["out"] = out.float().cpu()
            log(f"  round {r}{' (warm-up)' if r < warmup else ''} {k}: {dt:.3f} s")
    for k, v in res.items():
        v["median_s"] = statistics.median(v["times"]) if v["times"] else None
        peaks = [p for p in v["peak"] if p is not None]
        v["peak_step_bytes"] = max(peaks) if peaks else None
    return res


def _rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ---------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------
def bench_model(name: str, variants, reps: int, px: int, batch: int, device: str,
                log=print, time_bfloat16: bool = True) -> dict:
    from mixdq import model_nbytes, quantizable_layers

    from .models import build_unet, unet_inputs

    trim()
    rss0 = rss_bytes()
    t = time.perf_counter()
    unet = build_unet(name, dtype=torch.float32, device=device)
    t_build = time.perf_counter() - t
    trim()
    f32_bytes = model_nbytes(unet)
    rss_f32 = None if rss0 is None else rss_bytes() - rss0
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"{name}: {n_params:,} params, float32 {f32_bytes / MiB:.0f} MiB, built in {t_build:.1f} s")
    inputs = unet_inputs(name, unet, batch=batch, px=px, device=device)

    ranges, t_cal, ref_out = observe_ranges(unet, inputs)
    log(f"  calibration step (float32, hooks): {t_cal:.1f} s")
    layers = quantizable_layers(unet)
    plans = make_plans(layers, [v for v in variants if v not in OPENVINO_VARIANTS])
    built = {}
    info = {}
    for v, plan in plans.items():
        model, meta = build_variant(unet, plan, ranges, int8_safe=not v.endswith(KEEP_W8), bos=bench_bos(inputs))
        built[v] = model
        info[v] = meta
        log(f"  {v}: {meta['plan']} -> {meta['weight_bytes'] / MiB:.0f} MiB, quantized in {meta['quantize_s']:.1f} s")
    for v in (v for v in variants if v in OPENVINO_VARIANTS):
        from . import openvino_variants

        trim()
        rss_before = rss_bytes()
        built[v], info[v] = openvino_variants.build(unet, inputs, v, torch.get_num_threads())
        trim()
        # what converting and compiling added: OpenVINO holds its own copy of the weights
        info[v]["weight_bytes"] = rss_bytes() - rss_before if rss_before is not None else 0
        log(f"  {v}: converted in {info[v]['convert_s']:.1f} s, compiled in {info[v]['compile_s']:.1f} s")

    timing = interleaved({"float32": unet, **built}, inputs, device, reps, log=log)
    out = {"model": name, "params": n_params, "px": px, "batch": batch, "device": device,
           "build_s": t_build, "calibration_step_s": t_cal,
           "layers": {"quantizable": len(layers),
                      "linear": sum(1 for m in layers.values() if isinstance(m, torch.nn.Linear)),
                      "conv": sum(1 for m in layers.values() if isinstance(m, torch.nn.Conv2d))},
           "variants": {}}
    out["variants"]["float32"] = {"weight_bytes": f32_bytes, "rss_delta_bytes": rss_f32,
                                  "step_s": timing["float32"]["median_s"],
                                  "step_times_s": timing["float32"]["times"],
                                  "peak_step_bytes": timing["float32"]["peak_step_bytes"],
                                  "peak_first_step_bytes": timing["float32"]["first_peak"]}
    for v in built:
        out["variants"][v] = {**info[v], "step_s": timing[v]["median_s"],
                              "step_times_s": timing[v]["times"],
                              "peak_step_bytes": timing[v]["peak_step_bytes"],
                              "peak_first_step_bytes": timing[v]["first_peak"],
                              "rel_err_vs_float32": _rel_err(timing[v]["out"], timing["float32"]["out"])}
    del built, timing
    trim()

    # bfloat16 / float16 weights: the same module converted in place
    rss_before = rss_bytes()
    unet.to(torch.bfloat16)
    trim()
    bf16_bytes = model_nbytes(unet)
    rss_after = rss_bytes()
    out["variants"]["bfloat16"] = {"weight_bytes": bf16_bytes,
                                   "rss_delta_bytes": None if rss_before is None else rss_after - rss_before}
    if time_bfloat16:
        bf_inputs = unet_inputs(name, unet, batch=batch, px=px, dtype=torch.bfloat16, device=device)
        tb = interleaved({"bfloat16": unet}, bf_inputs, device, reps, log=log)["bfloat16"]
        out["variants"]["bfloat16"].update(
            step_s=tb["median_s"], step_times_s=tb["times"], peak_step_bytes=tb["peak_step_bytes"],
            peak_first_step_bytes=tb["first_peak"],
            rel_err_vs_float32=_rel_err(tb["out"], ref_out.float().cpu()),
            timed_after="float32 and quantized rounds (not interleaved)")
    out["variants"]["float16"] = {"weight_bytes": bf16_bytes,
                                  "note": "same bytes as bfloat16 (2 per parameter); not timed on CPU"}
    del unet
    trim()
    return out


def ratios(model_result: dict) -> dict:
    """Weights vs float16, step speed-up vs float32, and each step's peak total
    (weights + the larger increment of a timed step and the first step) vs
    bfloat16's, which stands in for float16 on the CPU (same weight bytes,
    2-byte activations)."""
    v = model_result["variants"]
    f16 = v["float16"]["weight_bytes"]
    f32_t = v["float32"].get("step_s")

    def step_total(d):  # weights + the larger peak of the timed steps and the first step
        peaks = [d[k] for k in ("peak_step_bytes", "peak_first_step_bytes") if d.get(k) is not None]
        return d["weight_bytes"] + max(peaks) if peaks else None

    half_total = step_total(v["bfloat16"]) if "bfloat16" in v else None
    r = {}
    for k, d in v.items():
        e = {"weights_vs_float16": d["weight_bytes"] / f16}
        if f32_t and d.get("step_s"):
            e["speedup_vs_float32"] = f32_t / d["step_s"]
        total = step_total(d)
        if total is not None:
            e["step_peak_total_bytes"] = total
            if half_total:
                e["step_peak_total_vs_half"] = total / half_total
        r[k] = e
    return r


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
DEFAULT_MODELS = ("sdxl-turbo", "sd-turbo", "sd15")
DEFAULT_VARIANTS = ("W8A8", "W5A8", "W4A8", "W4A16")
VARIANTS = DEFAULT_VARIANTS + ("W7A8",) + tuple(v + KEEP_W8 for v in ("W8A8", "W5A8", "W4A8")) + OPENVINO_VARIANTS


def run(models=DEFAULT_MODELS, variants=DEFAULT_VARIANTS, reps: int = 3, px: int = 512, batch: int = 1,
        device: str = "cpu", out_dir: str | Path = HERE, threads: int | None = None,
        kernels_table: bool = True, small_kernels: bool = False,
        reps_small_models: int | None = None, argv=None, log=print,
        malloc_threshold: int | None = None, label: str | None = None, time_bfloat16: bool = True,
        torchao: bool = False) -> dict:
    """Measure; write <out_dir>/results-<device>.json (results-cpu-<isa>-emulated.json
    inside an emulation) and <out_dir>/RESULTS.md; return the dict.  torchao: its
    W8A8 recipe joins the kernel table."""
    threads_before = torch.get_num_threads()
    mallopt_ok = fix_malloc_threshold(malloc_threshold) if malloc_threshold else False
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(models, variants, reps, px, batch, device, out_dir, kernels_table,
                    small_kernels, reps_small_models, argv, log, label, time_bfloat16,
                    {"malloc_mmap_threshold": malloc_threshold, "mallopt_ok": mallopt_ok}, torchao)
    finally:
        torch.set_num_threads(threads_before)


# Capping an older CPU's instruction sets on this one: every library that picks
# kernels by instruction set is capped before it initialises (so: a fresh process),
# and mixdq decides for that kind (MIXDQ_CPU).  CI runs the kernel tests so too.
CPU_CAPS = {
    "avx2": {
        "MIXDQ_CPU": "avx2",                     # mixdq's own decisions
        "ATEN_CPU_CAPABILITY": "avx2",           # torch's own vectorised kernels
        "ONEDNN_MAX_CPU_ISA": "AVX2",            # oneDNN (bf16/int8 matmul, convs; torch._int_mm)
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",    # FBGEMM's int8 linear
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",       # MKL (float32 GEMM)
    },
}
# torch._int_mm's speed does not follow these caps (here it stays fast; on a real
# AVX2-only EPYC it ran 30-100x slower than float32, world notes), so an emulated
# benchmark puts the integer layers on the backends the dispatch measures there
EMULATIONS = {"avx2": CPU_CAPS["avx2"] | {"MIXDQ_INT8_BACKEND": "linear=fbgemm,conv=onednn"}}


def run_emulated(isa: str, argv: list[str], out_dir: Path, log=print) -> dict:
    """Run `python -m bench.run argv` again in a process capped to `isa`; its
    results go to <out>/results-cpu-<isa>-emulated.json."""
    env = dict(os.environ, **EMULATIONS[isa], MIXDQ_EMULATED=isa,
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log(f"re-running in a process capped to {isa}: " + " ".join(f"{k}={v}" for k, v in EMULATIONS[isa].items()))
    subprocess.run([sys.executable, "-m", "bench.run", *argv], env=env, check=True)
    return json.loads((Path(out_dir) / f"results-cpu-{isa}-emulated.json").read_text())


def _run(models, variants, reps, px, batch, device, out_dir, kernels_table, small_kernels,
         reps_small_models, argv, log, label=None, time_bfloat16=True, alloc_info=None, torchao=False):
    torch.set_flush_denormal(True)  # random weights must not hit denormal slow paths
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"env": {**environment(device, argv), "allocator": alloc_info or {}}, "models": [], "kernels": None,
              "notes": {"peak_step": "peak resident set during one timed step (after the warm-up) above "
                                     "the resident set at its start (CPU: VmHWM); add weight_bytes for the "
                                     "step's total (the larger of this and the first step's). first step: the "
                                     "warm-up step's, which also makes the int8 backends' prepacked weights",
                        "quantize_s": "replace_layers time, calibration excluded; calibration_step_s "
                                      "is the one float step that collected the activation ranges",
                        "routed": "routed_int8_layers: layers on the integer kernels (8-bit "
                                  "activations, 2-8-bit weights; convs included)"}}
    emulated = os.environ.get("MIXDQ_EMULATED")
    if emulated:
        result["env"]["emulation"] = {k: os.environ.get(k) for k in EMULATIONS[emulated]}
        result["notes"]["emulation"] = (
            f"an {emulated}-only CPU emulated on this one (instruction sets capped per library, see "
            "env.emulation); same memory system and clocks, so ratios approximate, not measure, such a machine")
    if label:
        result["label"] = label
    tag = "gpu" if device != "cpu" else f"cpu-{emulated}-emulated" if emulated else "cpu"
    t0 = time.perf_counter()
    if kernels_table and device == "cpu":
        from . import kernels as kbench
        log("per-layer kernel comparison ...")
        result["kernels"] = kbench.compare(small=small_kernels, torchao=torchao)
        log(kbench.table(result["kernels"]))
    for i, name in enumerate(models):
        r = reps if i == 0 or reps_small_models is None else reps_small_models
        res = bench_model(name, variants, r, px, batch, device, log=log, time_bfloat16=time_bfloat16)
        res["ratios"] = ratios(res)
        result["models"].append(res)
        result["elapsed_s"] = time.perf_counter() - t0
        _write(result, out_dir, tag)  # after each model: a crash keeps what was measured
    try:
        result["env"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    result["elapsed_s"] = time.perf_counter() - t0
    _write(result, out_dir, tag)
    return result


def _write(result, out_dir: Path, tag: str):
    from .report import write_results_md

    path = out_dir / f"results-{tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    os.replace(tmp, path)
    write_results_md(out_dir)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ---------------------------------------------------------------------------
# CLI (the lead wires these into `python -m mixdq bench`)
# ---------------------------------------------------------------------------
def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS),
                        help="bench.configs names: sdxl-turbo sd-turbo sd15 tiny-sdxl (none: the kernel "
                             "table only)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--reps", type=int, default=3, help="timed steps per model (after 1 warm-up)")
    parser.add_argument("--reps-small-models", type=int, default=None,
                        help="timed steps for the models after the first (default: --reps)")
    parser.add_argument("--px", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(HERE), help="folder for results-*.json and RESULTS.md")
    parser.add_argument("--no-kernels-table", action="store_true")
    parser.add_argument("--small-kernels", action="store_true", help="tiny shapes in the kernel table")
    parser.add_argument("--torchao", action="store_true",
                        help="time torchao's W8A8 recipe in the kernel table too (needs torchao installed)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="fix glibc's mmap threshold (bytes) so RSS peaks follow live tensors")
    parser.add_argument("--emulate", choices=sorted(EMULATIONS),
                        help="run in a fresh process with every kernel library capped to this instruction set")
    parser.add_argument("--label", help="title of this run in RESULTS.md")
    parser.add_argument("--no-bfloat16-step", action="store_true",
                        help="record bfloat16 weights but do not time its step (without AVX-512 BF16 "
                             "it runs on slow fallbacks: minutes per SDXL step; implied by --emulate)")
    return parser


def run_bench(args: argparse.Namespace, argv=None) -> dict:
    if str(args.device).startswith("cuda"):
        # the GPU benchmark: float16 vs W8A8 (int8 linears), eager / CUDA graph / compiled
        from . import gpu
        return gpu.run(model=(args.models or DEFAULT_MODELS)[0], device=args.device, out_dir=args.out)
    if args.emulate and os.environ.get("MIXDQ_EMULATED") != args.emulate:
        return run_emulated(args.emulate, sys.argv[1:] if argv is None else argv, Path(args.out))
    return run(models=args.models, variants=args.variants, reps=args.reps, px=args.px,
               batch=args.batch, device=args.device, out_dir=args.out, threads=args.threads,
               kernels_table=not args.no_kernels_table,
               small_kernels=args.small_kernels, reps_small_models=args.reps_small_models,
               argv=argv, malloc_threshold=args.malloc_mmap_threshold, label=args.label,
               # the caps also take AVX-512 BF16 away: an emulated SDXL bfloat16 step ran > 10 min
               time_bfloat16=not (args.no_bfloat16_step or os.environ.get("MIXDQ_EMULATED")),
               torchao=args.torchao)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = add_bench_args(argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0]))
    args = p.parse_args(argv)
    return run_bench(args, argv=argv)


if __name__ == "__main__":
    main()
