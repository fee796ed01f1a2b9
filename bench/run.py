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
5. OpenVINO FP32 / NNCF INT8 (--variants openvino-fp32 openvino-int8): converted
   to IR before step 4, compiled once the torch models are gone (their weights and
   OpenVINO's copy do not fit together beside an SDXL-size UNet in 24 GiB); NNCF
   quantizes the IR in a process of its own before the first mixdq variant is
   rebuilt, and each OpenVINO variant is timed in rounds taking turns with it.

Results: `<out>/results-<device>.json` and `<out>/RESULTS.md` (all result JSONs
found in <out>, CPU and GPU, are rendered together).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import (FLOAT_ATTENTION, KEEP_W8, ON, MiB, bench_bos, build_variant, environment, fix_malloc_threshold,
                     make_plans, observe_ranges, peak_bytes, reset_peak, rss_bytes, split_variant, trim)
from . import openvino_variants
from .openvino_variants import VARIANTS as OPENVINO_VARIANTS  # the tool a CPU user would pick instead

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


STEP_TIMING = ("the second of two steps in a row (the first, on a trimmed heap, reads the peak): "
               "steady state, as a pipeline's next step")


def step_once(model, inputs, device):
    """One UNet step: seconds, peak bytes above the start (CPU: VmHWM; CUDA: allocator).

    On the CPU the step runs twice.  The first starts on a heap handed back to the
    system (trim), so its peak above the start is all the memory the step touches;
    the second is timed, on the heap the first left, as a pipeline's next step runs.
    Timing the first would charge torch's variants a page fault per page of every
    temporary they allocate afresh (tens of thousands per SDXL step), which OpenVINO's
    compiled model, holding its buffers from one call to the next, never pays."""
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
    with torch.inference_mode():
        out = model(**inputs).sample
    peak = peak_bytes() if ok else None
    t = time.perf_counter()
    with torch.inference_mode():
        model(**inputs)
    dt = time.perf_counter() - t
    return dt, (None if peak is None or base is None else peak - base), out


def interleaved(models: dict, inputs, device, reps: int, warmup: int = 1, log=print) -> dict:
    """Timed rounds after `warmup` ones, the models interleaved in each (step_once: on
    the CPU a step for the memory, then the timed one).  Peaks are kept apart: the
    timed rounds' (steady state) and the first step's, which also makes whatever a
    model builds once (the int8 backends' prepacked weights)."""
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
    ov_variants = [v for v in variants if v in OPENVINO_VARIANTS]

    def quantized(unet, v):
        base, backend = split_variant(v)
        return build_variant(unet, plans[v], ranges, int8_safe=not base.endswith(KEEP_W8),
                             bos=bench_bos(inputs), backend=backend,
                             attention="float" if base.endswith(FLOAT_ATTENTION) else None)

    built = {}
    info = {}
    for v in plans:
        built[v], info[v] = quantized(unet, v)
        log(f"  {v}: {info[v]['plan']} -> {info[v]['weight_bytes'] / MiB:.0f} MiB, "
            f"quantized in {info[v]['quantize_s']:.1f} s")
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
    f32_out = timing["float32"]["out"]
    # `layers` holds the UNet's modules: kept, it would keep their weights past `del unet`
    del built, timing, layers
    trim()
    if ov_variants:  # converted while the float32 UNet is here, compiled once it is gone
        ov_folder = openvino_variants.ir_folder()
        ir_path, convert_s = openvino_variants.convert(unet, inputs, ov_folder.name)
        log(f"  OpenVINO IR saved in {convert_s:.1f} s")

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
    if ov_variants:
        # the first mixdq variant takes turns with OpenVINO's, so the two are compared in
        # the same rounds; rebuilt from the same seed, its float UNet gone once it is built
        irs = {"openvino-fp32": ir_path}
        if "openvino-int8" in ov_variants:  # before the partner is rebuilt: NNCF needs the room
            try:
                irs["openvino-int8"], quantize_s = openvino_variants.quantize(ir_path, inputs)
                log(f"  openvino-int8: NNCF quantized the IR in {quantize_s:.1f} s")
            except RuntimeError as e:  # the rounds so far are kept; the report says why it is missing
                out["not_timed"] = {"openvino-int8": str(e)}
                log(f"  openvino-int8 not timed: {e}")
        partner = next(iter(plans), None)
        partner_model = None
        if partner:
            unet = build_unet(name, dtype=torch.float32, device=device)
            partner_model, _ = quantized(unet, partner)
            del unet
        for v in (v for v in ov_variants if v in irs):
            out["variants"][v] = _time_openvino(v, irs[v], inputs, reps, partner, partner_model, f32_out, log)
            out["variants"][v]["convert_s"] = convert_s
            if v == "openvino-int8":
                out["variants"][v]["quantize_s"] = quantize_s
        del partner_model
        ov_folder.cleanup()
        trim()
    return out


def _time_openvino(variant, ir_path, inputs, reps, partner, partner_model, f32_out, log) -> dict:
    """One OpenVINO variant built from the saved IR and timed in rounds of its own, taking
    turns with `partner` (a mixdq variant, rebuilt the same) where there is one."""
    trim()
    rss_before = rss_bytes()
    step, info = openvino_variants.build(ir_path, inputs, torch.get_num_threads())
    trim()
    # what building and compiling added: OpenVINO holds its own copy of the weights
    info["weight_bytes"] = rss_bytes() - rss_before if rss_before is not None else 0
    log(f"  {variant}: compiled in {info['compile_s']:.1f} s")
    models = {variant: step} | ({partner: partner_model} if partner else {})
    timing = interleaved(models, inputs, "cpu", reps, log=log)
    t = timing[variant]
    info.update(step_s=t["median_s"], step_times_s=t["times"], peak_step_bytes=t["peak_step_bytes"],
                peak_first_step_bytes=t["first_peak"], rel_err_vs_float32=_rel_err(t["out"], f32_out),
                timed_after="float32 and quantized rounds" + (f", beside {partner}" if partner else ""))
    if partner:
        info["beside"] = {partner: timing[partner]["median_s"]}
    return info


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
VARIANTS = (DEFAULT_VARIANTS + ("W7A8",) + tuple(v + suffix for suffix in (KEEP_W8, FLOAT_ATTENTION)
                                                 for v in ("W8A8", "W5A8", "W4A8")) + OPENVINO_VARIANTS)


def variant_arg(v: str) -> str:
    """A --variants item: one of VARIANTS, or a quantized one with its int8 backend
    forced, VARIANT@BACKEND (W8A8@onednn), to compare backends in one run."""
    from mixdq.quant.kernels import BACKENDS

    base, backend = split_variant(v)
    if base not in VARIANTS or (ON in v and (base in OPENVINO_VARIANTS or backend not in BACKENDS)):
        raise argparse.ArgumentTypeError(
            f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}, or a quantized one with "
            f"{ON}BACKEND ({', '.join(BACKENDS)}), e.g. W8A8{ON}onednn")
    return v


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
    result = {"env": {**environment(device, argv), "allocator": alloc_info or {},
                      "step_timing": STEP_TIMING if device == "cpu" else "one step per round"},
              "models": [], "kernels": None,
              "notes": {"peak_step": "peak resident set during one step of a timed round (after the warm-up) "
                                     "above the resident set at its start (CPU: VmHWM, the step on a trimmed "
                                     "heap before the timed one); add weight_bytes for the step's total (the "
                                     "larger of this and the first step's). first step: the warm-up round's, "
                                     "which also makes the int8 backends' prepacked weights",
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
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), type=variant_arg,
                        metavar="VARIANT", help=f"{', '.join(VARIANTS)}; VARIANT{ON}BACKEND forces the int8 "
                        f"backend (W8A8{ON}onednn)")
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
