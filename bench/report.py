"""Render bench results (results-cpu*.json, results-gpu*.json) as RESULTS.md.

Every figure in RESULTS.md comes from those JSON files, which `bench.run` (CPU)
and `bench.gpu` (CUDA) write; `analysis.md` beside them, if present, is the
hand-written closing note (targets met / missed, why, what would close them)
and is appended as is.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

MiB = 1 << 20


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _env_lines(env: dict) -> list[str]:
    cpu = env.get("cpu", {})
    lines = [f"- date (UTC): {env.get('date_utc')}; git commit: {env.get('git_commit')}",
             f"- command: `{env.get('command')}`",
             f"- versions: python {env.get('python')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
             f"transformers {env.get('transformers')}"]
    if env.get("gpu"):
        lines.append(f"- device: **{env['gpu']}** (CUDA {env.get('cuda')})")
    else:
        flags = [k for k in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "avx2") if cpu.get(k)]
        lines.append(f"- device: **CPU {cpu.get('cpu')}**, torch capability **{cpu.get('capability')}**, "
                     f"flags: {', '.join(flags)}; torch threads: {env.get('threads')}")
        if env.get("loadavg_start"):
            la = env["loadavg_start"]
            lb = env.get("loadavg_end")
            lines.append(f"- machine load (1/5/15-min load average) at start {tuple(round(x, 1) for x in la)}"
                         + (f", at end {tuple(round(x, 1) for x in lb)}" if lb else "")
                         + " (shared machine: other processes ran meanwhile)")
        al = env.get("allocator") or {}
        if al.get("malloc_mmap_threshold"):
            lines.append(f"- allocator: glibc mmap threshold fixed at {al['malloc_mmap_threshold']} bytes "
                         f"(mallopt {'ok' if al.get('mallopt_ok') else 'FAILED'}): resident-set peaks follow live tensors")
        else:
            lines.append("- allocator: glibc defaults (its mmap threshold rises after frees, so freed tensors can "
                         "stay resident: step peaks read from VmHWM are upper bounds)")
        lines.append("- timed CPU steps: " + (env.get("step_timing") or "each on a heap just trimmed (its temporaries "
                                                               "fault their pages in afresh; runs before 33)"))
        if env.get("emulation"):
            lines.append("- **emulated instruction set** (fresh process, every kernel library capped): "
                         + ", ".join(f"{k}={v}" for k, v in env["emulation"].items()))
        if env.get("kernel_dispatch"):
            kd = env["kernel_dispatch"]
            lines.append(f"- int8 dispatch: layer kernel `{kd.get('kernel')}`, linear backend "
                         f"`{kd.get('linear_backend')}`, conv backend `{kd.get('conv_backend')}`"
                         + (f" (2-4-bit codes: `{kd['packed_linear_backend']}` / `{kd['packed_conv_backend']}`)"
                            if "packed_linear_backend" in kd else "") + f" ({kd.get('reason')})")
    return lines


def _model_table(m: dict) -> list[str]:
    v, r = m["variants"], m["ratios"]
    lines = [f"### {m['model']}: {m['params']:,} parameters, {m['px']} px, batch {m['batch']}, {m['device']}",
             "",
             f"Built in {m['build_s']:.1f} s; calibration (one float32 step with range hooks) "
             f"{m['calibration_step_s']:.1f} s; {m['layers']['quantizable']} quantizable layers "
             f"({m['layers']['linear']} linear, {m['layers']['conv']} conv).",
             "",
             "| variant | plan | weights MiB | vs float16 | RSS delta MiB | step s (median) | speed-up vs float32 "
             "| step peak above start MiB | first step peak above start MiB | step peak total MiB | peak vs half "
             "| quantize s | rel. err vs float32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, d in v.items():
        rr = r.get(k, {})
        lines.append(
            f"| {k} | {d.get('plan', '-') if k not in ('float32', 'bfloat16', 'float16') else '-'} "
            f"| {d['weight_bytes'] / MiB:.0f} | {rr.get('weights_vs_float16', 0):.3f}x "
            f"| {_f(d.get('rss_delta_bytes') and d['rss_delta_bytes'] / MiB, '{:.0f}')} "
            f"| {_f(d.get('step_s'), '{:.2f}')} | {_f(rr.get('speedup_vs_float32'), '{:.2f}x')} "
            f"| {_f(d.get('peak_step_bytes') and d['peak_step_bytes'] / MiB, '{:.0f}')} "
            f"| {_f(d.get('peak_first_step_bytes') and d['peak_first_step_bytes'] / MiB, '{:.0f}')} "
            f"| {_f(rr.get('step_peak_total_bytes') and rr['step_peak_total_bytes'] / MiB, '{:.0f}')} "
            f"| {_f(rr.get('step_peak_total_vs_half'), '{:.2f}x')} "
            f"| {_f(d.get('quantize_s'), '{:.1f}')} | {_f(d.get('rel_err_vs_float32'), '{:.3f}')} |")
    lines.append("")
    times = {k: d.get("step_times_s") for k, d in v.items() if d.get("step_times_s")}
    if times:
        lines.append("Individual timed steps (s): " + "; ".join(
            f"{k} " + ", ".join(f"{t:.2f}" for t in ts) for k, ts in times.items()))
        lines.append("")
    apart = [f"{k} after {d['timed_after']}" + "".join(f" ({p}'s median in these rounds {s:.2f} s)"
                                                       for p, s in d.get("beside", {}).items())
             for k, d in v.items() if d.get("timed_after") and d.get("step_s")]
    if apart:
        lines += ["Timed in rounds of their own: " + "; ".join(apart) + ".", ""]
    if any(k.startswith("openvino-") for k in v):
        lines += ["OpenVINO's weights MiB is what building and compiling added to the resident set: its "
                  "IR is memory-mapped and the first inference makes the compiled weight layouts, so its "
                  "weights show up in the first step's peak; compare the step peak totals.", ""]
    for k, why in m.get("not_timed", {}).items():
        lines += [f"Not timed: {k}: {why}", ""]
    in_bf16 = [k for k, d in v.items() if d.get("attention") == "bfloat16"]
    if in_bf16:
        lines += ["Attention products in bfloat16 (the machine's measured choice, or forced): "
                  + ", ".join(in_bf16), ""]
    return lines


def _gpu_section(g: dict) -> list[str]:
    lines = [f"## GPU: {g.get('label', '')}".rstrip(": "), ""] + _env_lines(g["env"])
    if g.get("command"):
        lines.append(f"- command on the device machine: `{g['command']}`")
    lines.append("")
    for m in g.get("models", []):
        lines += [f"### {m['model']} on {g['env'].get('gpu')}: weights and memory", "",
                  "| variant | weights MiB | vs float16 |", "|---|---|---|"]
        f16 = m["weights"].get("float16")
        for k, b in m["weights"].items():
            lines.append(f"| {k} | {b / MiB:.0f} | {b / f16:.3f}x |")
        lines.append("")
        lines += ["| config | variant | mode | step ms (median) | peak MiB | speed-up vs float16 same mode |",
                  "|---|---|---|---|---|---|"]
        for row in m.get("timings", []):
            lines.append(f"| {row['config']} | {row['variant']} | {row['mode']} | {_f(row.get('ms'), '{:.2f}')} "
                         f"| {_f(row.get('peak_bytes') and row['peak_bytes'] / MiB, '{:.0f}')} "
                         f"| {_f(row.get('speedup_vs_float16'), '{:.2f}x')} |")
        lines.append("")
        if m.get("rel_err_W8A8_vs_float16") is not None:
            lines.append(f"- W8A8 output vs float16, relative error (random weights, 1 step): "
                         f"{m['rel_err_W8A8_vs_float16']:.3f}")
        if m.get("step_peak_total_bytes"):
            lines.append("- eager step peak (weights + allocator peak above them), MiB: " + ", ".join(
                f"{k} {v / MiB:.0f}" for k, v in m["step_peak_total_bytes"].items()))
        for note in m.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
        for name, p in (m.get("profile") or {}).items():
            lines += [f"Kernel profile, {name}, {m.get('profile_config')}: {p['total_ms']:.2f} ms of CUDA kernels", "",
                      "| kernel | ms | calls |", "|---|---|---|"]
            lines += [f"| `{t['kernel'][:90]}` | {t['ms']:.2f} | {t['calls']} |" for t in p["top"][:8]]
            lines.append("")
    return lines


def _kernels_section(k: dict, title: str) -> list[str]:
    from .kernels import table

    env = k.get("env", {})
    return [f"### {title}", "",
            f"capability {env.get('capability')}, ONEDNN_MAX_CPU_ISA={env.get('ONEDNN_MAX_CPU_ISA')}, "
            f"threads {env.get('threads')}; median ms per call, activation quantization and epilogue "
            "included, variants interleaved.", "", table(k), ""]


def _run_order(result: dict) -> tuple:
    """By run number ("run 10" after "run 9"), then label and date."""
    label = result.get("label") or ""
    m = re.match(r"run (\d+)", label)
    return (int(m.group(1)) if m else -1, label, result["env"].get("date_utc") or "")


def _cpu_section(cpu: dict) -> list[str]:
    lines = [f"## CPU: {cpu.get('label', '')}".rstrip(": "), ""] + _env_lines(cpu["env"]) + [""]
    for k, v in cpu.get("notes", {}).items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    for m in cpu.get("models", []):
        lines += _model_table(m)
    if cpu.get("kernels"):
        lines += _kernels_section(cpu["kernels"], "Per layer type: float32 vs bfloat16 vs int8 backends")
    for extra in cpu.get("kernels_extra", []):
        if "rows" in extra["result"]:
            lines += _kernels_section(extra["result"], extra["title"])
        else:
            lines += [f"### {extra['title']}", "", f"failed: {extra['result'].get('error')}", ""]
    return lines


def write_results_md(out_dir) -> Path:
    """RESULTS.md: the runs on real machines; EMULATED.md: the runs that emulated another
    CPU on this one (no measurement of that CPU; bench/analysis.md discusses them)."""
    out_dir = Path(out_dir)
    runs = sorted((json.loads(p.read_text()) for p in out_dir.glob("results-cpu*.json")), key=_run_order)
    gpus = sorted((json.loads(p.read_text()) for p in out_dir.glob("results-gpu*.json")), key=_run_order)
    lines = ["# mixdq benchmark results", "",
             "Generated by `bench/report.py` from the JSON files beside it; every figure is a measurement "
             "from one process run (ratios within that run). Random weights, published UNet architectures "
             "(bench/configs.py): memory and speed do not depend on weight values. Only runs on real "
             "machines are here, each with its CPU or GPU; runs that emulated another CPU are in "
             "[EMULATED.md](EMULATED.md), and [analysis.md](analysis.md) discusses both.", ""]
    emulated = ["# mixdq benchmark runs that emulated another CPU", "",
                "Generated by `bench/report.py`. **Emulated, not measured on such a CPU**: each ran on the "
                "machine named in its section with the kernel libraries capped to an older instruction set "
                "(`python -m bench.run --emulate ...`). The same memory system and clocks, and "
                "`torch._int_mm` keeps its speed under the caps: these ratios have misjudged a real "
                "AVX2-only EPYC (bench/analysis.md). Real runs are in [RESULTS.md](RESULTS.md).", ""]
    for cpu in runs:
        (emulated if cpu["env"].get("emulation") else lines).extend(_cpu_section(cpu))
    for gpu in gpus:
        lines += _gpu_section(gpu)
    (out_dir / "EMULATED.md").write_text("\n".join(emulated) + "\n")
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path
