"""GPU benchmark: float16 vs W8A8 (fused Triton kernels) for one UNet, one run.

    python -m bench.gpu --out $OUT                             # on a CUDA machine (point 5 of #17)
    python -m bench.gpu --out $OUT --configs 512,1 --dry-run       # every stage once: a crash costs seconds
    python -m bench.gpu --model tiny-sdxl --device cpu --dry-run ...   # the same code path, for tests

Variants (--variants): float16; W8A8-linears (int8 linears, float16 convs); W8A8
(linears and convs in int8); FP8 (linears and convs on e4m3 tensor cores); W4A8
(weights only, for memory).  The int8 variants run --int8-backend (CUDA default:
triton, mixdq/quant/backends/triton_cuda.py; 'auto': the library's measured choice),
FP8 runs triton_fp8.  Every variant's output is checked against float16
(relative L2 error), and each timed row is also written as a RESULTS-gpu.md row
with the GPU, driver, torch and triton versions.

Stages, cheapest and most informative first; each appends to results-gpu.json
as soon as it is measured (a time limit can stop the run without losing what
was measured), and `--budget-s` skips stages that would not fit:

  1. weights: float16 vs W8A8 vs mixed ~W4A8, bytes held (and allocator delta).
  2. eager step, 512 px batch 1: median ms, peak allocator bytes.
  3. CUDA graph of the whole eager step (launch overhead removed; separate
     quantization ops remain): each config.
  4. regional torch.compile (diffusers' compile_repeated_blocks: the
     BasicTransformerBlocks, which hold 700 of SDXL's 743 linears; inductor
     fuses the activation quantization into LayerNorm / GELU and the epilogue
     into the residual add) + a CUDA graph of the whole step: each config.
     Both sides are compiled the same way.

W8A8 here: every Linear in int8 (activations static per-tensor asymmetric,
weights per-channel symmetric) through the library's QuantLinear and
its int_mm backend (mixdq/quant/backends/int_mm.py); convs hold int8 weights and run cuDNN in float16 on
weights dequantized per call (torch has no CUDA int8 conv).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

MiB = 1 << 20


def _log(*a):
    print(*a, flush=True)


def _time_fn(fn, device, warmup=3, iters=20):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts), ts
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), ts


class Graphed:
    """The whole UNet step captured in one CUDA graph with static inputs."""

    def __init__(self, unet, inputs):
        self.inputs = inputs
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):  # warm-up: caches filled, kernels chosen, no allocation in capture
                unet(**inputs)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = unet(**inputs).sample

    def __call__(self):
        self.graph.replay()
        return self.out


def _profile(fn, top=12) -> dict:
    """CUDA kernel time of one call, by kernel name, and by category."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, t / 1e3, e.count))
    rows.sort(key=lambda r: -r[1])

    def cat(name):
        n = name.lower()
        if "imma" in n or "i8" in n or "int8" in n or "s8" in n:
            return "int8 gemm"
        if "gemm" in n or "sm90" in n or "cutlass" in n or "xmma" in n or "nvjet" in n:
            return "float gemm"
        if "conv" in n or "cudnn" in n or "implicit" in n:
            return "conv"
        if "flash" in n or "fmha" in n or "attention" in n:
            return "attention"
        if n.startswith("triton") or "fused" in n:
            return "triton (fused elementwise/norm/quant)"
        return "other"

    cats: dict = {}
    for k, t, c in rows:
        d = cats.setdefault(cat(k), [0.0, 0])
        d[0] += t
        d[1] += c
    return {"total_ms": sum(r[1] for r in rows),
            "by_category": {k: {"ms": v[0], "calls": v[1]} for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])},
            "top": [{"kernel": k[:120], "ms": t, "calls": c} for k, t, c in rows[:top]]}


VARIANTS = ("float16", "W8A8-linears", "W8A8", "FP8", "W4A8")
TIMED = ("float16", "W8A8-linears", "W8A8", "FP8")  # W4A8: memory only (its <8-bit layers dequantize)


def variant_backends(variant: str, int8_backend: str | None) -> str | None:
    """MIXDQ_INT8_BACKEND while `variant` is quantized (None: the library's choice)."""
    if variant == "FP8":
        return "linear=triton_fp8,conv=triton_fp8"
    if int8_backend in (None, "auto") or variant not in ("W8A8", "W8A8-linears"):
        return None
    return f"linear={int8_backend},conv={int8_backend}" if variant == "W8A8" else f"linear={int8_backend},conv=float"


def _plans(layers: dict, variants) -> dict:
    from mixdq import Plan

    from .common import make_plans

    linears = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear)]
    out = {}
    for v in variants:
        if v == "W8A8-linears":
            out[v] = Plan({n: (8, 8) for n in linears})
        elif v in ("W8A8", "FP8"):
            out[v] = Plan({n: (8, 8) for n in layers})
        elif v != "float16":
            out[v] = make_plans(layers, [v])[v]
    return out


def build_variants(unet, ranges, bos, variants, m: dict, device, kernel="int_mm", int8_backend=None,
                   hold_epilogue=False, log=_log) -> dict:
    """{variant: quantized clone sharing the float model's other tensors}; bytes, backends
    and build times into m."""
    from mixdq import model_nbytes, quantize_unet
    from mixdq.measure import shared_copy
    from mixdq.quant import hold_epilogue as hold, quantizable_layers
    from .common import forced_backend

    out = {}
    for name, plan in _plans(quantizable_layers(unet), variants).items():
        a1, t = _alloc(device), time.perf_counter()
        clone = shared_copy(unet)
        with torch.no_grad(), forced_backend(variant_backends(name, int8_backend)):
            report = quantize_unet(clone, plan, ranges, bos=bos, kernel=None if kernel == "auto" else kernel)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if hold_epilogue:  # epilogue constants as buffers the compiled graph reads
            m.setdefault("epilogue_held_layers", {})[name] = hold(clone)
        m["weights"][name] = model_nbytes(clone)
        m["alloc_delta"][name] = _alloc(device) - a1
        m.setdefault("quantize_s", {})[name] = time.perf_counter() - t
        m.setdefault("backends", {})[name] = report.backends
        out[name] = clone
        log(f"{name}: {m['weights'][name] / MiB:.0f} MiB ({plan.summary()}), backends {report.backends}")
    return out


def _alloc(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


class Run:
    """One benchmark run's record (results-gpu.json), saved after every measurement."""

    def __init__(self, device, out_dir, budget_s, argv, model, dry_run=False):
        from .common import environment

        self.t0, self.budget_s, self.device, self.dry_run = time.perf_counter(), budget_s, device, dry_run
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        env = environment(str(device), argv, prog="python -m bench.gpu") | gpu_versions(device)
        self.res = {"env": env, "models": []}
        self.m = {"model": model, "weights": {}, "alloc_delta": {}, "timings": [], "notes": [], "stages_done": [],
                  "output_rel_err_vs_float16": {}}
        self.res["models"].append(self.m)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.m["elapsed_s"] = time.perf_counter() - self.t0
        (self.out_dir / "results-gpu.json").write_text(json.dumps(self.res, indent=1, default=str))

    def record(self, config, variant, mode, ms, ts, peak=None, log=_log) -> None:
        row = {"config": f"{config[0]}px b{config[1]}", "variant": variant, "mode": mode, "ms": ms,
               "times_ms": ts, "peak_bytes": peak}
        if self.dry_run:  # one untuned call proves the code path; it is no figure to quote
            self.m.setdefault("dry_run_calls", []).append(row)
            log(f"{row['config']} {variant} {mode}: ran (dry run, {ms:.2f} ms)")
            self.save()
            return
        base = [r for r in self.m["timings"] if r["config"] == row["config"] and r["mode"] == mode
                and r["variant"] == "float16"]
        if base and variant != "float16":
            row["speedup_vs_float16"] = base[0]["ms"] / ms
        self.m["timings"].append(row)
        log(f"{row['config']} {variant} {mode}: {ms:.2f} ms" +
            (f" ({row['speedup_vs_float16']:.2f}x)" if "speedup_vs_float16" in row else ""))
        self.save()
        self.append_row(row)

    def append_row(self, row) -> None:
        """One RESULTS-gpu.md table row per timing (header written once)."""
        path = self.out_dir / "RESULTS-gpu.md"
        env = self.res["env"]
        if not path.exists():
            path.write_text("| date | GPU | driver | torch | triton | model | config | variant | mode | ms | "
                            "vs float16 | rel. err vs float16 |\n" + "|---" * 12 + "|\n")
        err = self.m["output_rel_err_vs_float16"].get(f"{row['config']} {row['variant']}")
        cells = [env["date_utc"], env.get("gpu") or env["device"], env.get("driver") or "-", env["torch"],
                 env.get("triton") or "-", self.m["model"], row["config"], row["variant"], row["mode"],
                 f"{row['ms']:.2f}", f"{row['speedup_vs_float16']:.2f}x" if "speedup_vs_float16" in row else "-",
                 "-" if err is None else f"{err:.4f}"]
        with path.open("a") as f:
            f.write("| " + " | ".join(str(c) for c in cells) + " |\n")


def gpu_versions(device) -> dict:
    """The GPU, its driver and the kernel stack's versions, for every row."""
    out = {}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["capability"] = "sm%d%d" % torch.cuda.get_device_capability(device)
        try:
            import subprocess

            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out["driver"] = None
    return out


def _step(mod, inputs):
    def step():
        with torch.inference_mode():
            return mod(**inputs).sample
    return step


def check_outputs(run: Run, models: dict, inputs: dict, log=_log) -> None:
    """Each variant's step output against float16's, per config (relative L2 error)."""
    for c, inp in inputs.items():
        ref = _step(models["float16"], inp)().float()
        for name, mod in models.items():
            if name == "float16":
                continue
            out = _step(mod, inp)().float()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            run.m["output_rel_err_vs_float16"][f"{c[0]}px b{c[1]} {name}"] = err
            if name == "W8A8":
                run.m.setdefault("rel_err_W8A8_vs_float16", err)  # the first config's, as report.py reads it
            log(f"{c[0]}px b{c[1]} {name}: rel. error vs float16 {err:.4f}")
    run.save()


def time_eager(run: Run, models, inputs, configs, iters, log=_log, warmup=3) -> None:
    device = run.device
    for c in configs:
        for name, mod in models.items():
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            step = _step(mod, inputs[c])
            step()
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
            ms, ts = _time_fn(step, device, warmup=warmup, iters=iters)
            run.record(c, name, "eager", ms, ts, peak, log=log)
    run.m["stages_done"].append("eager")


def time_cudagraph(run: Run, models, inputs, configs, iters, log=_log, warmup=3) -> None:
    for c in configs:
        if run.left() < 30:
            run.m["notes"].append(f"skipped CUDA-graph eager at {c}: budget")
            break
        for name, mod in models.items():
            try:
                g = Graphed(mod, inputs[c])
                ms, ts = _time_fn(g, run.device, warmup=warmup, iters=iters)
                run.record(c, name, "eager+cudagraph", ms, ts, log=log)
                del g
            except Exception as e:  # noqa: BLE001 - record and go on
                run.m["notes"].append(f"cudagraph {name} {c} failed: {e!r}"[:300])
                run.save()
    run.m["stages_done"].append("cudagraph")


def _compile_setup(run: Run, inductor_mode, fuse_int_mm_mul) -> dict:
    from torch import _dynamo

    _dynamo.config.cache_size_limit = 64
    if hasattr(_dynamo.config, "recompile_limit"):
        _dynamo.config.recompile_limit = 64
    if fuse_int_mm_mul:
        # inductor's one-kernel Triton template for _int_mm(a, b) * scale (the int_mm backend)
        import torch._inductor.config as inductor_config
        inductor_config.force_fuse_int_mm_with_mul = True
    run.m["inductor"] = {"mode": inductor_mode, "force_fuse_int_mm_with_mul": fuse_int_mm_mul}
    return {"mode": inductor_mode} if inductor_mode else {}


def time_compiled(run: Run, models, inputs, configs, iters, inductor_mode=None, fuse_int_mm_mul=False,
                  log=_log, warmup=3) -> None:
    """Regional torch.compile (the repeated transformer blocks, fullgraph; the triton
    backend's layers are custom ops in them) + one CUDA graph of the whole step."""
    kw = _compile_setup(run, inductor_mode, fuse_int_mm_mul)
    for mod in models.values():
        mod.compile_repeated_blocks(fullgraph=True, dynamic=False, **kw)
    # checked before every model, not every config: each one compiles its blocks anew for
    # each shape, and four of them at one config can outlast the budget
    for c, (name, mod) in itertools.product(configs, models.items()):
        if run.left() < 90:
            run.m["notes"].append(f"skipped compiled runs from {name} at {c} on: budget ({run.left():.0f} s left)")
            run.save()
            break
        try:
            t = time.perf_counter()
            _step(mod, inputs[c])()  # compiles the blocks for this shape
            torch.cuda.synchronize()
            run.m.setdefault("compile_s", {})[f"{name} {c}"] = time.perf_counter() - t
            g = Graphed(mod, inputs[c])
            ms, ts = _time_fn(g, run.device, warmup=warmup, iters=iters)
            run.record(c, name, "compiled+cudagraph", ms, ts, log=log)
            del g
        except Exception as e:  # noqa: BLE001
            run.m["notes"].append(f"compiled {name} {c} failed: {e!r}"[:300])
            run.save()
    run.m["stages_done"].append("compiled")


def profile_variants(run: Run, models, inputs, config, log=_log) -> None:
    run.m["profile_config"] = f"{config[0]}px b{config[1]}, compiled, no CUDA graph"
    for name, mod in models.items():
        try:
            run.m.setdefault("profile", {})[name] = _profile(_step(mod, inputs[config]))
            log(f"profile {name}: " + json.dumps(run.m["profile"][name]["by_category"]))
        except Exception as e:  # noqa: BLE001
            run.m["notes"].append(f"profile {name} failed: {e!r}"[:300])
        run.save()


def prepare(model, device, configs, variants, kernel, int8_backend, hold_epilogue, run: Run, log=_log):
    """The float UNet, its inputs per config, and the quantized variants (ranges observed
    on the first config)."""
    from mixdq import model_nbytes

    from .common import bench_bos, observe_ranges
    from .models import build_unet, unet_inputs

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a0 = _alloc(device)
    unet = build_unet(model, dtype=torch.float32, device=device).to(dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    m = run.m
    m["weights"]["float16" if dtype == torch.float16 else "float32"] = model_nbytes(unet)
    if dtype != torch.float16:
        m["weights"]["float16"] = model_nbytes(unet) // 2
    m["alloc_delta"]["float"] = _alloc(device) - a0
    inputs = {c: unet_inputs(model, unet, batch=c[1], px=c[0], dtype=dtype, device=device) for c in configs}
    ranges, _, _ = observe_ranges(unet, inputs[configs[0]])
    built = build_variants(unet, ranges, bench_bos(inputs[configs[0]]), variants, m, device, kernel,
                           int8_backend, hold_epilogue, log)
    models = {"float16": unet} | {k: v for k, v in built.items() if k in TIMED}
    m["stages_done"].append("weights")
    run.save()
    return models, inputs


def run(model="sdxl-turbo", device="cuda", out_dir=".", budget_s=420.0, configs=None,
        compile_mode=True, iters=20, log=_log, stages=("eager", "cudagraph", "compiled"),
        hold_epilogue=False, compile_variants=None, profile_config=None, inductor_mode=None,
        fuse_int_mm_mul=False, kernel="int_mm", variants=None, int8_backend="default", dry_run=False):
    """The whole benchmark (see the module doc).  dry_run: build every variant, check its
    output against float16 on the first config, and run each stage's code there once (one
    call each, the compiled stage on one quantized variant), so that a real run's minutes
    are not lost to a crash; those calls go to m["dry_run_calls"], not to the timings."""
    from mixdq.quant import kernels

    device = torch.device(device)
    cuda = device.type == "cuda"
    configs = [tuple(c) for c in (configs or ([(512, 1), (1024, 1), (512, 4)] if cuda else [(128, 1)]))]
    variants = list(variants or (VARIANTS if cuda else ("float16", "W8A8-linears", "W8A8", "W4A8")))
    if int8_backend == "default":
        int8_backend = "triton" if cuda else None
    r = Run(device, out_dir, budget_s, sys.argv[1:], model, dry_run=dry_run)
    r.m.update(hold_epilogue=hold_epilogue, int8_backend=int8_backend, variants=variants)
    if int8_backend in ("triton", "auto"):  # where the triton layers quantize their activations
        from mixdq.quant.backends import triton_cuda

        r.m["triton_act_quant"] = {"eager": triton_cuda.act_quant_mode(False),
                                   "compiled": triton_cuda.act_quant_mode(True)}
    models, inputs = prepare(model, device, configs, variants, kernel, int8_backend, hold_epilogue, r, log)
    r.m["kernel"] = kernel if kernel != "auto" else kernels.kernel_report(device)
    check_outputs(r, models, inputs if not dry_run else {configs[0]: inputs[configs[0]]}, log)
    warmup = 3
    if dry_run:
        configs, iters, warmup = configs[:1], 1, 0
        # the triton backend's custom ops are what a compiled float16 UNet lacks
        compile_variants = compile_variants or [
            next((k for k in ("W8A8", "W8A8-linears", "FP8") if k in models), "float16")]
    if "eager" in stages:
        time_eager(r, models, inputs, configs[:1] if cuda else configs, iters, log, warmup)
    if cuda and "cudagraph" in stages:
        time_cudagraph(r, models, inputs, configs, iters, log, warmup)
    if cuda and compile_mode and "compiled" in stages:
        chosen = {k: v for k, v in models.items() if not compile_variants or k in compile_variants}
        time_compiled(r, chosen, inputs, configs, iters, inductor_mode, fuse_int_mm_mul, log, warmup)
        if profile_config and r.left() > 20:
            profile_variants(r, chosen, inputs, tuple(profile_config), log)
    r.save()
    return r.res


def _config(text: str) -> tuple[int, int]:
    try:
        px, batch = (int(v) for v in text.split("x" if "x" in text else ","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r}: write PX,BATCH, e.g. 512,1") from None
    if px % 64 or batch < 1:
        raise argparse.ArgumentTypeError(f"config {text!r}: pixels a multiple of 64, batch >= 1")
    return px, batch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu")
    p.add_argument("--model", default="sdxl-turbo")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--configs", type=_config, nargs="+", default=None,
                   help="PX,BATCH each (CUDA default: 512,1 1024,1 512,4)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--int8-backend", default="default", choices=["default", "triton", "int_mm", "auto"],
                   help="what the W8A8 variants run (default: triton on CUDA, the library's choice on CPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the variants, check outputs, and run each stage once on the first config "
                        "(the compiled one on one quantized variant); no timings recorded")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--stages", default="eager,cudagraph,compiled")
    p.add_argument("--hold-epilogue", action="store_true",
                   help="linears keep their epilogue constants as buffers (mixdq.quant.hold_epilogue)")
    p.add_argument("--compile-variants", default=None, help="comma list, e.g. float16,W8A8-linears")
    p.add_argument("--profile", default=None, type=_config, help="PX,BATCH: profile one compiled step per variant")
    p.add_argument("--kernel", default="int_mm", choices=["int_mm", "dequant", "auto"],
                   help="W8A8 layers' path: int8 kernels (default: what this benchmark is for), "
                        "dequantize + float16 GEMM, or the library's measured choice")
    p.add_argument("--inductor-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--fuse-int-mm-mul", action="store_true",
                   help="inductor.config.force_fuse_int_mm_with_mul (the int_mm backend's GEMM and scale in one)")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    run(model=a.model, device=a.device, out_dir=a.out, budget_s=a.budget_s, configs=a.configs,
        compile_mode=not a.no_compile, iters=a.iters, stages=tuple(a.stages.split(",")),
        hold_epilogue=a.hold_epilogue, compile_variants=a.compile_variants.split(",") if a.compile_variants else None,
        profile_config=a.profile, inductor_mode=a.inductor_mode, fuse_int_mm_mul=a.fuse_int_mm_mul,
        kernel=a.kernel, variants=a.variants, int8_backend=a.int8_backend, dry_run=a.dry_run)


if __name__ == "__main__":
    main()
