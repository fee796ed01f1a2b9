"""GPU benchmark: float16 vs W8A8 (int8 `torch._int_mm` linears) for one UNet, one run.

    python -m bench.gpu --model sdxl-turbo --out $OUT        # on a CUDA machine
    python -m bench.gpu --model tiny-sdxl --device cpu ...    # the same code path, for tests

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


def run(model="sdxl-turbo", device="cuda", out_dir=".", budget_s=420.0, configs=None,
        compile_mode=True, iters=20, log=_log, stages=("eager", "cudagraph", "compiled"),
        hold_epilogue=False, compile_variants=None, profile_config=None, inductor_mode=None,
        fuse_int_mm_mul=False, kernel="int_mm"):
    from mixdq import Plan, model_nbytes, quantize_unet
    from mixdq.quant import hold_epilogue as hold, kernels, quantizable_layers

    from .models import build_unet, unet_inputs
    from .common import bench_bos, environment, make_plans, observe_ranges, shared_clone

    t_start = time.perf_counter()
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    configs = configs or ([(512, 1), (512, 4), (1024, 1)] if device.type == "cuda" else [(128, 1)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"env": environment(str(device), sys.argv[1:], prog="python -m bench.gpu"), "models": []}
    m = {"model": model, "weights": {}, "alloc_delta": {}, "timings": [], "notes": [], "stages_done": []}
    res["models"].append(m)

    def save():
        m["elapsed_s"] = time.perf_counter() - t_start
        (out_dir / "results-gpu.json").write_text(json.dumps(res, indent=1, default=str))

    def left():
        return budget_s - (time.perf_counter() - t_start)

    def alloc():
        return torch.cuda.memory_allocated() if device.type == "cuda" else 0

    # 1. weights
    a0 = alloc()
    unet = build_unet(model, dtype=torch.float32 if device.type != "cuda" else torch.float32, device=device)
    unet = unet.to(dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    m["weights"]["float16" if dtype == torch.float16 else "float32"] = model_nbytes(unet)
    if dtype != torch.float16:
        m["weights"]["float16"] = model_nbytes(unet) // 2
    m["alloc_delta"]["float"] = alloc() - a0
    inputs = {c: unet_inputs(model, unet, batch=c[1], px=c[0], dtype=dtype, device=device) for c in configs}
    ranges, t_cal, _ = observe_ranges(unet, inputs[configs[0]])
    layers = quantizable_layers(unet)
    linear_names = [n for n, l in layers.items() if isinstance(l, torch.nn.Linear)]
    plans = {"W8A8": Plan({n: (8, 8) for n in layers}),
             "W8A8-linears": Plan({n: (8, 8) for n in linear_names}),
             "W4A8": make_plans(layers, ["W4A8"])["W4A8"]}
    variants = {}
    for name, plan in plans.items():
        a1 = alloc()
        t = time.perf_counter()
        clone = shared_clone(unet)
        with torch.no_grad():
            quantize_unet(clone, plan, ranges, bos=bench_bos(inputs[configs[0]]),
                          kernel=None if kernel == "auto" else kernel)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if hold_epilogue:  # epilogue constants as buffers the compiled graph reads
            m.setdefault("epilogue_held_layers", {})[name] = hold(clone)
        m["weights"][name] = model_nbytes(clone)
        m["alloc_delta"][name] = alloc() - a1
        m.setdefault("quantize_s", {})[name] = time.perf_counter() - t
        variants[name] = clone
        log(f"{name}: {m['weights'][name] / MiB:.0f} MiB ({plan.summary()})")
    del variants["W4A8"]  # memory only; its <8-bit layers take the dequant path here
    m["stages_done"].append("weights")
    save()

    # W8A8-linears: int8 linears, float16 convs (no CUDA int8 conv in torch);
    # W8A8: convs too hold int8 weights, dequantized per call
    models = {"float16": unet, "W8A8-linears": variants["W8A8-linears"], "W8A8": variants["W8A8"]}
    ref_out = {}

    def record(config, variant, mode, ms, ts, peak=None):
        row = {"config": f"{config[0]}px b{config[1]}", "variant": variant, "mode": mode, "ms": ms,
               "times_ms": ts, "peak_bytes": peak}
        base = [r for r in m["timings"] if r["config"] == row["config"] and r["mode"] == mode
                and r["variant"] == "float16"]
        if base and variant != "float16":
            row["speedup_vs_float16"] = base[0]["ms"] / ms
        m["timings"].append(row)
        log(f"{row['config']} {variant} {mode}: {ms:.2f} ms" +
            (f" ({row['speedup_vs_float16']:.2f}x)" if "speedup_vs_float16" in row else ""))
        save()

    m["hold_epilogue"] = hold_epilogue
    m["kernel"] = kernel if kernel != "auto" else kernels.kernel_report(device)
    # 2. eager
    for c in (configs[:1] if device.type == "cuda" else configs) if "eager" in stages else []:
        for name, mod in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.inference_mode():
                out = mod(**inputs[c]).sample
            ref_out.setdefault(c, {})[name] = out.float()
            peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None

            def step(mod=mod, c=c):
                with torch.inference_mode():
                    return mod(**inputs[c]).sample
            ms, ts = _time_fn(step, device, iters=iters)
            record(c, name, "eager", ms, ts, peak)
            wkey = name if name in m["weights"] else next(iter(m["weights"]))
            m.setdefault("step_peak_total_bytes", {})[name] = m["weights"][wkey] + (peak or 0)
    if ref_out:
        o = ref_out[configs[0]]
        m["rel_err_W8A8_vs_float16"] = float((o["W8A8"] - o["float16"]).norm() / o["float16"].norm())
        m["stages_done"].append("eager")
    save()
    if device.type != "cuda":
        return res

    # 3. CUDA graphs of the eager step
    for c in configs if "cudagraph" in stages else []:
        if left() < 30:
            m["notes"].append(f"skipped CUDA-graph eager at {c}: budget")
            break
        for name, mod in models.items():
            try:
                g = Graphed(mod, inputs[c])
                ms, ts = _time_fn(g, device, iters=iters)
                record(c, name, "eager+cudagraph", ms, ts)
                del g
            except Exception as e:  # noqa: BLE001 - record and go on
                m["notes"].append(f"cudagraph {name} {c} failed: {e!r}"[:300])
                save()
    m["stages_done"].append("cudagraph")
    save()

    # 4. regional compile + CUDA graph
    if compile_variants:
        models = {k: v for k, v in models.items() if k in compile_variants}
    if compile_mode and "compiled" in stages:
        from torch import _dynamo
        _dynamo.config.cache_size_limit = 64
        if hasattr(_dynamo.config, "recompile_limit"):
            _dynamo.config.recompile_limit = 64
        if fuse_int_mm_mul:
            # inductor's one-kernel Triton template for _int_mm(a, b) * scale (as in
            # torchao's int8 recipes): the int32 accumulator never reaches memory
            import torch._inductor.config as inductor_config
            inductor_config.force_fuse_int_mm_with_mul = True
        m["inductor"] = {"mode": inductor_mode, "force_fuse_int_mm_with_mul": fuse_int_mm_mul}
        kw = {"mode": inductor_mode} if inductor_mode else {}
        order = [c for c in ((512, 4), (1024, 1), (512, 1)) if c in configs]
        for name, mod in models.items():
            mod.compile_repeated_blocks(fullgraph=True, dynamic=False, **kw)
        for c in order:
            if left() < 90:
                m["notes"].append(f"skipped compiled runs at {c}: budget ({left():.0f} s left)")
                save()
                break
            for name, mod in models.items():
                try:
                    t = time.perf_counter()
                    with torch.inference_mode():
                        mod(**inputs[c])  # compiles the blocks for this shape
                    torch.cuda.synchronize()
                    m.setdefault("compile_s", {})[f"{name} {c}"] = time.perf_counter() - t
                    g = Graphed(mod, inputs[c])
                    ms, ts = _time_fn(g, device, iters=iters)
                    record(c, name, "compiled+cudagraph", ms, ts)
                    del g
                except Exception as e:  # noqa: BLE001
                    m["notes"].append(f"compiled {name} {c} failed: {e!r}"[:300])
                    save()
        m["stages_done"].append("compiled")
        if profile_config and left() > 20:
            c = tuple(profile_config)
            m["profile_config"] = f"{c[0]}px b{c[1]}, compiled, no CUDA graph"
            for name, mod in models.items():
                try:
                    def step(mod=mod, c=c):
                        with torch.inference_mode():
                            return mod(**inputs[c]).sample
                    m.setdefault("profile", {})[name] = _profile(step)
                    log(f"profile {name}: " + json.dumps(m["profile"][name]["by_category"]))
                except Exception as e:  # noqa: BLE001
                    m["notes"].append(f"profile {name} failed: {e!r}"[:300])
                save()
    save()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu")
    p.add_argument("--model", default="sdxl-turbo")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--stages", default="eager,cudagraph,compiled")
    p.add_argument("--hold-epilogue", action="store_true",
                   help="linears keep their epilogue constants as buffers (mixdq.quant.hold_epilogue)")
    p.add_argument("--compile-variants", default=None, help="comma list, e.g. float16,W8A8-linears")
    p.add_argument("--profile", default=None, help="PX,BATCH: profile one compiled step per variant")
    p.add_argument("--kernel", default="int_mm", choices=["int_mm", "dequant", "auto"],
                   help="W8A8 layers' path: int8 GEMM (default: what this benchmark is for), "
                        "dequantize + float16 GEMM, or the library's measured choice")
    p.add_argument("--inductor-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs (Triton GEMM templates "
                        "tried against cuBLAS/CUTLASS; minutes more compile time)")
    p.add_argument("--fuse-int-mm-mul", action="store_true",
                   help="inductor.config.force_fuse_int_mm_with_mul: int8 GEMM and scale in one kernel")
    a = p.parse_args(argv)
    run(model=a.model, device=a.device, out_dir=a.out, budget_s=a.budget_s, compile_mode=not a.no_compile,
        iters=a.iters, stages=tuple(a.stages.split(",")), hold_epilogue=a.hold_epilogue,
        compile_variants=a.compile_variants.split(",") if a.compile_variants else None,
        profile_config=tuple(int(v) for v in a.profile.split(",")) if a.profile else None,
        inductor_mode=a.inductor_mode, fuse_int_mm_mul=a.fuse_int_mm_mul, kernel=a.kernel)


if __name__ == "__main__":
    main()
