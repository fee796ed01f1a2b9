"""MixDQ in the browser: pick a UNet memory budget, quantize, compare with the float model.

    python app.py                          # the embedded model, http://127.0.0.1:7860
    python app.py --model PATH_OR_HUB_ID --port 8000 --host 0.0.0.0
    MIXDQ_HOST=... MIXDQ_PORT=... python app.py

A thin layer: every number shown comes from the library (`mixdq`, `mixdq.allocate`,
`mixdq.measure`), so the app shows what the command line does.  `build_app(pipe or source)`
returns the gr.Blocks for tests and embedding.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()   # start-up is reported from here, imports included

import argparse
import html
import math
import os
import shutil
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

# Offline by construction: no analytics calls, and the local server reachable past any proxy
# (gradio's launch() checks its own URL).  Must happen before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_no_proxy = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
for _host in ("127.0.0.1", "localhost"):
    if _host not in _no_proxy:
        _no_proxy.append(_host)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(_no_proxy)

import gradio as gr  # noqa: E402
import torch  # noqa: E402

import mixdq  # noqa: E402
from mixdq import measure  # noqa: E402
from mixdq.allocate import Allocator, pareto  # noqa: E402
from mixdq.errors import BudgetError, MixDQError  # noqa: E402
from mixdq.memory import MB  # noqa: E402
from mixdq.sensitivity import sensitivity as compute_sensitivity  # noqa: E402

TITLE = "MixDQ · mixed-precision quantization of few-step diffusion"
DISPLAY_PX = 256     # tiny images are shown enlarged (nearest neighbour) so pixels stay honest
PARETO_BUDGETS = 8   # budgets swept for the size-vs-quality curve (x the allocator's ratios)
PARETO_RATIOS = (0.6, 1.0, None)
CONTENT_COLOR, QUALITY_COLOR = "#e4572e", "#2e86ab"


def _fmt_mb(x: float) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f} MB" if x >= 1000 else f"{x:.3f} MB" if x < 10 else f"{x:.2f} MB"


class Session:
    """What the app holds between clicks: the float model, its costs, sensitivity, the current
    quantized model.  One lock: clicks are queued, and the two models never change under a
    running generation."""

    def __init__(self, pipe, *, sensitivity=None, calibration=None, workdir=None, presets_dir=None):
        self.lock = threading.RLock()
        self.float_pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.source = (getattr(pipe, "_mixdq_source", None) or {}).get("source", "?")
        self.defaults = mixdq.generation_defaults(pipe)
        self.costs = mixdq.layer_costs(pipe.unet)
        self.float_mb = self.costs.float_mb()
        self.n_layers = len(mixdq.quantizable_layers(pipe.unet))
        self.embedded = measure.is_embedded(pipe)
        self.calibration = calibration or measure.default_calibration(pipe)
        self.presets = measure.presets(pipe.unet, presets_dir)
        # sens_source ("given", "shipped", "cached", "measured" or "none") lets the header say
        # which, and sens_note why a shipped table of this model was not taken
        if sensitivity is not None:
            self.sens, self.sens_source, self.sens_note = sensitivity, "given", None
        else:
            found = measure.find_sensitivity(pipe, self.calibration, presets_dir=presets_dir)
            self.sens, self.sens_source, self.sens_note = found.table, found.source, found.shipped_note
        self.allocator = Allocator(self.sens, self.costs) if self.sens is not None else None
        self.pareto_points = None      # [(size_mb, predicted loss)] of the family, once computed
        self.quant_pipe = None
        self.quant_plan = None
        self.quant_request = None      # the plan quant_plan was built from (reuse check)
        self.quant_label = None        # how the current quantized model was made
        self.quant_note = ""           # measured quantization time, or "reused"
        self.last = None               # the latest measurement (dict from measure.compare)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mixdq-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    # ---- budget
    def budget_range(self) -> tuple[float, float]:
        """The feasible UNet sizes: the allocator's exact range once sensitivity is known; before,
        the same candidate bit-widths' byte counts with activations at their widest."""
        if self.allocator is not None:
            return self.allocator.feasible_range_mb()
        return measure.budget_bounds(self.costs)

    def slider_spec(self) -> dict:
        lo, hi = self.budget_range()
        step = 10 ** math.floor(math.log10(max(hi - lo, 1e-3) / 1000)) if hi > lo else 0.001
        step = max(step, 0.001)
        decimals = max(0, -int(round(math.log10(step))))
        lo_r = math.ceil(lo / step) * step     # rounded inward: both ends stay feasible
        hi_r = math.floor(hi / step) * step
        return {"minimum": round(lo_r, decimals), "maximum": round(hi_r, decimals), "step": step}

    def preset_value(self, preset) -> float:
        """The slider value of a preset: its exact size rounded *up* to the slider's step (so the
        budget it shows is never below the plan), within the slider's range."""
        spec = self.slider_spec()
        step = spec["step"]
        decimals = max(0, -int(round(math.log10(step))))
        value = round(math.ceil(preset.size_mb / step - 1e-9) * step, decimals)
        return min(max(value, spec["minimum"]), spec["maximum"])

    def default_budget(self) -> float:
        spec = self.slider_spec()
        if self.presets:
            return self.preset_value(self.presets[len(self.presets) // 2])
        decimals = max(0, -int(round(math.log10(spec["step"]))))
        return round((spec["minimum"] + spec["maximum"]) / 2, decimals)

    def matching_preset(self, budget):
        """The preset a budget selects: the one whose button gives this slider value."""
        for p in self.presets:
            if abs(self.preset_value(p) - budget) < 1e-9 * max(1.0, budget):
                return p
        return None

    def budget_info(self, budget) -> str:
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            return "Enter a budget in MB."
        lo, hi = self.budget_range()
        float_bits = measure.dtype_bits(self.float_pipe.unet)
        bits = measure.equivalent_bits(budget, self.float_mb, float_bits)
        parts = [f"**{_fmt_mb(budget)}** of UNet memory = **{budget / self.float_mb:.1%}** of float "
                 f"({_fmt_mb(self.float_mb)}) ≈ **{bits:.2f} average bits** (float: {float_bits})"]
        preset = self.matching_preset(budget)
        if preset is not None:
            text = f"matches preset **{preset.name}**: plan ready, no allocation needed"
            st = preset.stats or {}
            measured = [f"SSIM {st['ssim']:.4f}" if isinstance(st.get("ssim"), (int, float)) else None,
                        f"PSNR {st['psnr']:.2f} dB" if isinstance(st.get("psnr"), (int, float)) else None,
                        f"prompt match {st['alignment']:.0%}" if isinstance(st.get("alignment"), (int, float))
                        else None]
            measured = [m for m in measured if m]
            if measured:
                n = (st.get("eval") or {}).get("prompts")
                text += f" (measured when shipped{f' on {n} prompts' if n else ''}: {', '.join(measured)})"
            parts.append(text)
        elif self.allocator is None:
            parts.append("needs the one-time sensitivity analysis (minutes on a CPU, then cached; "
                         "`python -m mixdq sensitivity` does the same): pick a preset for an instant plan")
            if self.sens_note:
                parts.append(self.sens_note)
        if budget < lo - 5e-4 or budget > hi + 5e-4:
            parts.append(f"⚠ outside the feasible range {_fmt_mb(lo)} – {_fmt_mb(hi)}")
        return " · ".join(parts)

    # ---- the flow: allocate -> quantize -> generate & measure
    def plan_for(self, budget: float, progress) -> tuple[object, str, object]:
        """(plan, how it was chosen, Allocation or None)."""
        preset = self.matching_preset(budget)
        if preset is not None:
            progress(0.05, desc=f"allocate: preset {preset.name}")
            return preset.plan, f"preset **{preset.name}**", None
        if self.allocator is None:
            gr.Warning("Measuring layer sensitivity once for this model (cached afterwards): this takes a "
                       "while on a CPU. Presets are instant.")
            progress(0.0, desc="sensitivity: measuring every layer once (cached for next time)")
            self.sens = compute_sensitivity(self.float_pipe, self.calibration, progress=True)
            self.sens_source = "measured"
            self.allocator = Allocator(self.sens, self.costs)
        lo, hi = self.allocator.feasible_range_mb()
        note = ""
        if budget > hi:
            # Before sensitivity was known the slider's top was an upper bound on the widest plan;
            # a budget above the widest plan means "the widest plan".
            budget, note = hi, " (the widest plan)"
        progress(0.05, desc=f"allocate: integer program for {_fmt_mb(budget)}")
        alloc = self.allocator.solve(budget)
        return alloc.plan, f"allocated for **{_fmt_mb(budget)}**{note} (ILP, {alloc.solve_s:.2f} s)", alloc

    def quantized(self, plan, label, progress):
        if self.quant_pipe is not None and self.quant_request == plan and self.quant_label != "imported":
            progress(0.3, desc="quantize: this plan is already quantized")
            self.quant_note = "already quantized (reused)"
            return
        self.quant_pipe = self.quant_plan = None     # drop the old copy before making a new one
        progress(0.1, desc="quantize: copying the float UNet")
        _, q = measure.pair(self.float_pipe)

        def calib(done, total):
            progress(0.1 + 0.25 * done / max(total, 1), desc=f"quantize: calibrating activations {done}/{total}")

        report = mixdq.quantize(q, plan, self.calibration, progress=False, callback=calib)
        # the plan asked for, and the one quantize built (W8A8 -> W7A8 on CPUs without VNNI)
        self.quant_pipe, self.quant_request, self.quant_plan, self.quant_label = q, plan, report.plan, label
        self.quant_note = (f"quantized in {report.seconds_quantize:.2f} s + calibrated in "
                           f"{report.seconds_calibrate:.2f} s ({len(self.calibration.prompts)} prompts)"
                           + "".join(f"; {n}" for n in report.notes))

    def pareto_curve(self, progress):
        if self.allocator is None:
            return None
        if self.pareto_points is None:
            lo, hi = self.allocator.feasible_range_mb()
            budgets = [lo + (hi - lo) * i / (PARETO_BUDGETS - 1) for i in range(PARETO_BUDGETS)]
            jobs = [(min(max(b, lo), hi), k) for b in budgets for k in PARETO_RATIOS]
            allocs, seen = [], set()
            for i, (b, k) in enumerate(jobs):
                progress(0.92 + 0.07 * i / len(jobs), desc=f"Pareto curve: plan {i + 1}/{len(jobs)} (once)")
                a = self.allocator.solve(b, k)
                key = tuple(sorted((n, bits.weight, bits.act) for n, bits in a.plan.items()))
                if key not in seen:          # the same plan from several (budget, ratio) pairs
                    seen.add(key)
                    allocs.append(a)
            self.family_allocs = allocs
            self.pareto_points = [(a.size_mb, a.predicted["total"]) for a in pareto(allocs)]
            self.family_points = [(a.size_mb, a.predicted["total"]) for a in allocs]
        return self.pareto_points

    def front_with(self, alloc):
        """The Pareto front of the swept family plus the plan just chosen (so the chosen plan,
        which is optimal for its own budget, is drawn on the front it belongs to)."""
        front = self.pareto_curve(lambda *a, **k: None)
        if front is None or alloc is None:
            return front
        return [(a.size_mb, a.predicted["total"]) for a in pareto(list(self.family_allocs) + [alloc])]

    def predicted_loss(self, plan) -> float | None:
        """The allocator's predicted loss for any plan (the y axis of the Pareto chart)."""
        a = self.allocator
        if a is None:
            return None
        total = 0.0
        for n in a.layers:
            w = plan[n].weight if n in plan else 16
            if w not in a.wvalues[n]:
                return None
            total += -a.wvalues[n][w]
        return total


# ------------------------------------------------------------------------------------------
# Presentation (pure functions of library data).
# ------------------------------------------------------------------------------------------
def _enlarge(image):
    from PIL import Image

    if image is None:
        return None
    factor = max(1, DISPLAY_PX // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def stats_markdown(s: dict, session: Session, how: str) -> str:
    def checks_cell(c):
        if c is None:
            return "–"
        bad = [k for k, ok in c.items() if not ok]
        return f"{sum(c.values())}/{len(c)} ✓" + (f" (✗ {', '.join(bad)})" if bad else "")

    ms = s["step_ms"]
    speed = s["speedup"]
    psnr_text = "∞" if math.isinf(s["psnr"]) else f"{s['psnr']:.2f} dB"
    rows = [
        "| measured now | float | quantized | quantized vs float |",
        "|---|---:|---:|---:|",
        f"| UNet weight memory | {_fmt_mb(s['unet_float_mb'])} | {_fmt_mb(s['unet_quant_mb'])} | "
        f"**{s['unet_ratio']:.3f}×** ({1 / s['unet_ratio']:.2f}× smaller) |",
        f"| UNet latency per step | {ms['float']:.1f} ms | {ms['quantized']:.1f} ms | "
        + (f"{speed:.2f}× faster |" if speed >= 1 else f"{1 / speed:.2f}× slower |"),
        f"| Peak process memory while generating | {_fmt_mb(s['peak_mb']['float'])} | "
        f"{_fmt_mb(s['peak_mb']['quantized'])} | {s['peak_mb']['quantized'] - s['peak_mb']['float']:+.1f} MB |",
    ]
    if s.get("peak_gpu_mb"):
        g = s["peak_gpu_mb"]
        rows.append(f"| Peak GPU memory while generating | {_fmt_mb(g['float'])} | {_fmt_mb(g['quantized'])} | "
                    f"{g['quantized'] / g['float']:.3f}× |")
    rows += [
        f"| SSIM to the float image | 1 | {s['ssim']:.4f} | |",
        f"| PSNR to the float image | ∞ | {psnr_text} | |",
    ]
    if s.get("checks"):
        rows.append(f"| Matches the prompt (attribute checker) | {checks_cell(s['checks']['float'])} | "
                    f"{checks_cell(s['checks']['quantized'])} | |")
    elif session.embedded:
        rows.append("| Matches the prompt (attribute checker) | – | – | not a caption of the model's world |")
    plan = session.quant_plan
    foot = (f"\n\nPlan: {how} · {plan.summary() if plan is not None else ''} · {session.quant_note} · "
            f"W8A8 kernel `{s.get('kernel')}` · "
            f"{s['settings']['num_inference_steps']} step(s), seed {s['seed']}, "
            f"{s['settings']['width']}×{s['settings']['height']} px.  Latency: median of "
            f"{len(s['step_ms_all']['float'])} interleaved UNet calls on the same inputs; peak memory: "
            f"{s['peak_method']} (the process holds both models).")
    if speed < 1:
        foot += ("  Why slower: this model's matmuls are tiny (tens of microseconds), so the fixed cost "
                 "per quantized layer (quantizing its input, the int8 epilogue, more operator calls) "
                 "outweighs the integer arithmetic it saves; at the real SDXL size the same kernels are "
                 "faster than float (measured in bench/RESULTS.md).")
    return "\n".join(rows) + foot


def plan_chart_svg(rows: list[dict], title: str) -> str:
    """Bits per layer, bars in UNet order grouped by block; colour = content vs quality group,
    bar height = weight bits, the dark tick = activation bits; 16 = kept float."""
    if not rows:
        return "<p>No quantizable layers.</p>"
    n = len(rows)
    w, h, left, top, bottom = 760, 280, 36, 44, 70
    bw = (w - left - 10) / n
    scale = (h - top - bottom) / 16

    def y(bits):
        return h - bottom - bits * scale

    parts = [f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{html.escape(title)}" '
             'xmlns="http://www.w3.org/2000/svg" style="font:11px sans-serif">']
    for b in (2, 4, 8, 16):
        parts.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(b):.1f}" y2="{y(b):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y(b) + 4:.1f}" text-anchor="end" fill="#666">{b}</text>')
    start = 0
    for i, r in enumerate(rows):
        x = left + i * bw
        color = CONTENT_COLOR if r["group"] == "content" else QUALITY_COLOR
        opacity = "0.35" if r["weight_bits"] == 16 else "1"
        tip = html.escape(f"{r['layer']}: W{r['weight_bits']}A{r['act_bits']} ({r['group']}, {r['params']:,} params)")
        parts.append(f'<rect x="{x:.2f}" y="{y(r["weight_bits"]):.1f}" width="{max(bw - 0.6, 0.4):.2f}" '
                     f'height="{r["weight_bits"] * scale:.1f}" fill="{color}" fill-opacity="{opacity}">'
                     f'<title>{tip}</title></rect>')
        parts.append(f'<rect x="{x:.2f}" y="{y(r["act_bits"]) - 1:.1f}" width="{max(bw - 0.6, 0.4):.2f}" '
                     'height="2" fill="#222"/>')
        if i == n - 1 or rows[i + 1]["block"] != r["block"]:
            x0, x1 = left + start * bw, left + (i + 1) * bw
            parts.append(f'<line x1="{x1:.1f}" x2="{x1:.1f}" y1="{top}" y2="{h - bottom + 4}" stroke="#999" '
                         'stroke-dasharray="2,2"/>')
            label = r["block"].replace("_blocks.", " ").replace("_block", "")
            parts.append(f'<text transform="translate({(x0 + x1) / 2:.1f},{h - bottom + 10}) rotate(40)" '
                         f'fill="#444">{html.escape(label)}</text>')
            start = i + 1
    parts.append(f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>'
                 f'<rect x="{left}" y="21" width="10" height="10" fill="{CONTENT_COLOR}"/>'
                 f'<text x="{left + 14}" y="30">content layers (attn2, ff): weight bits</text>'
                 f'<rect x="{left + 250}" y="21" width="10" height="10" fill="{QUALITY_COLOR}"/>'
                 f'<text x="{left + 264}" y="30">quality layers: weight bits</text>'
                 f'<rect x="{left + 440}" y="25" width="10" height="2" fill="#222"/>'
                 f'<text x="{left + 454}" y="30">activation bits</text>'
                 f'<rect x="{left + 560}" y="21" width="10" height="10" fill="{QUALITY_COLOR}" fill-opacity="0.35"/>'
                 f'<text x="{left + 574}" y="30">kept float (16)</text></svg>')
    return "".join(parts)


def pareto_svg(front, family, chosen, presets) -> str:
    """Predicted loss vs UNet size for the allocator's plan family; the front as a line, the
    chosen plan as a ring; presets as diamonds."""
    if not front:
        return ('<p style="color:#666">The Pareto curve needs the layer sensitivity: it appears after '
                'the first allocation.</p>')
    pts = list(family or []) + list(front) + ([chosen] if chosen and chosen[1] is not None else []) + \
        [p for p in presets if p[1] is not None]
    xs = [p[0] for p in pts]
    x0, x1 = min(xs), max(xs)
    positive = [p[1] for p in pts if p[1] > 0]
    # Losses span decades (2-bit plans vs nearly float ones): a log axis, float (0) on its floor.
    floor = min(positive) / 2 if positive else 1e-6
    top_v = max(positive) if positive else 1.0

    def ty(v):
        return math.log10(max(v, floor))

    y0, y1 = ty(floor), ty(top_v) if top_v > floor else ty(floor) + 1
    w, h, left, top, bottom, right = 760, 260, 56, 28, 36, 16

    def px(x):
        return left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)

    def py(v):
        return h - bottom - (ty(v) - y0) / ((y1 - y0) or 1) * (h - top - bottom)

    parts = [f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="Pareto curve" '
             'xmlns="http://www.w3.org/2000/svg" style="font:11px sans-serif">',
             f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" stroke="#888"/>',
             f'<line x1="{left}" x2="{left}" y1="{top}" y2="{h - bottom}" stroke="#888"/>']
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = 10 ** (y0 + (y1 - y0) * i / 4)
        parts.append(f'<text x="{px(xv):.1f}" y="{h - bottom + 14}" text-anchor="middle" fill="#666">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 4}" y="{py(yv) + 4:.1f}" text-anchor="end" fill="#666">{yv:.1e}</text>')
    for x, v in family or []:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2.5" fill="#bbb"/>')
    line = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in sorted(front))
    parts.append(f'<polyline points="{line}" fill="none" stroke="{QUALITY_COLOR}" stroke-width="2"/>')
    for x, v in front:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{QUALITY_COLOR}"/>')
    for (x, v), name in zip([p[:2] for p in presets], [p[2] for p in presets]):
        if v is None:
            continue
        parts.append(f'<path d="M{px(x):.1f},{py(v) - 6:.1f} l6,6 l-6,6 l-6,-6 z" fill="#8a5cf6">'
                     f'<title>preset {html.escape(name)}</title></path>')
    if chosen and chosen[1] is not None:
        cx, cy = px(chosen[0]), py(chosen[1])
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="8" fill="none" stroke="{CONTENT_COLOR}" '
                     f'stroke-width="3"/><text x="{cx + 11:.1f}" y="{cy - 8:.1f}" fill="{CONTENT_COLOR}" '
                     f'font-weight="bold">this plan ({chosen[0]:.3g} MB)</text>')
    parts.append(f'<text x="{left}" y="14" font-weight="bold">Size vs predicted loss (allocator family, '
                 f'Pareto front in blue)</text>'
                 f'<text x="{w - right}" y="{h - 4}" text-anchor="end" fill="#444">UNet MB</text>'
                 f'<text transform="translate(12,{(top + h - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle" '
                 'fill="#444">predicted loss (log)</text></svg>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# The app.
# ------------------------------------------------------------------------------------------
def _friendly(fn):
    """Library errors become a clear message in the UI (the outputs keep their last values)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (MixDQError, ValueError) as e:
            raise gr.Error(str(e), title=type(e).__name__) from None
        except Exception as e:  # noqa: BLE001 - the app must survive anything and say what happened
            traceback.print_exc()
            raise gr.Error(f"{type(e).__name__}: {e}", title="Unexpected error (details in the terminal)") from None
    return wrapper


CSS = """
#mixdq-title h1 {margin-bottom: 0}
#budget-info {min-height: 3.2em}
#status {min-height: 4.5em}
.mixdq-img img {image-rendering: pixelated}
#run-btn {font-size: 1.1em}
"""


def preset_label(name: str) -> str:
    """mixdq-w4a8-size -> "W4A8 size" (the shipped presets spend a uniform plan's memory)."""
    import re

    m = re.fullmatch(r"mixdq-w(\d+)a(\d+)-size", name)
    return f"W{m.group(1)}A{m.group(2)} size" if m else name


SENSITIVITY_LABELS = {"shipped": "shipped ✓", "cached": "cached ✓", "measured": "measured ✓ (cached)",
                      "given": "given ✓"}


def header_markdown(session: Session) -> str:
    pipe = session.float_pipe
    name = "tiny-sdxl (embedded)" if session.embedded else html.escape(str(session.source))
    sens = SENSITIVITY_LABELS.get(session.sens_source) if session.allocator else None
    if sens is None:
        sens = "not yet measured" + (" (the shipped table is another calibration's)" if session.sens_note else "")
    return (f"# {TITLE}\n"
            f"Model **{name}** · UNet {_fmt_mb(session.float_mb)} in {str(pipe.unet.dtype).replace('torch.', '')} · "
            f"{session.n_layers} quantizable layers · {len(session.presets)} preset(s) · "
            f"sensitivity {sens} · "
            f"device {pipe.unet.device.type}")


def example_prompts(session: Session, n: int = 5) -> list[str]:
    if session.embedded:
        from mixdq import zoo

        return zoo.heldout_prompts(n)
    return list(session.calibration.prompts[:n])


def build_app(model=None, *, sensitivity=None, calibration=None, workdir=None, presets_dir=None) -> gr.Blocks:
    """The Gradio app for a pipeline (or any source `mixdq.load_pipeline` accepts).

    sensitivity / calibration / presets_dir override what the CLI would use (tests pass a
    synthetic table and a short calibration); workdir holds exports and imports."""
    pipe = model if hasattr(model, "unet") else mixdq.load_pipeline(model)
    session = Session(pipe, sensitivity=sensitivity, calibration=calibration, workdir=workdir,
                      presets_dir=presets_dir)
    spec = session.slider_spec()
    steps_default = int(session.defaults["num_inference_steps"])

    with gr.Blocks(title="MixDQ") as demo:
        demo.mixdq_session = session
        header = gr.Markdown(header_markdown(session), elem_id="mixdq-title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                budget = gr.Slider(label="UNet memory budget (MB)", value=session.default_budget(),
                                   elem_id="budget", interactive=True, **spec)
                budget_info = gr.Markdown(session.budget_info(session.default_budget()), elem_id="budget-info")
                if session.presets:
                    with gr.Row():
                        preset_buttons = []
                        for p in session.presets:
                            btn = gr.Button(f"{preset_label(p.name)} · {_fmt_mb(p.size_mb)}", size="sm",
                                            elem_id=f"preset-{p.name}")
                            preset_buttons.append((btn, p))
                else:
                    preset_buttons = []
                    gr.Markdown("<small>No presets ship for this model: every budget goes through the "
                                "allocator.</small>")
                prompt = gr.Textbox(label="Prompt", value=example_prompts(session, 1)[0], lines=2,
                                    elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Number(label=f"Steps (model default {steps_default})", value=steps_default,
                                      precision=0, elem_id="steps")
                run = gr.Button("Quantize & generate", variant="primary", elem_id="run-btn")
                gr.Examples([[p] for p in example_prompts(session)], inputs=[prompt], label="Example prompts")
                with gr.Accordion("Export / load a quantized model", open=False):
                    export_btn = gr.Button("Export quantized model (.zip)", elem_id="export-btn")
                    export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
                    upload = gr.File(label="Load an exported .zip", file_types=[".zip"], elem_id="upload")
                    load_btn = gr.Button("Load & generate", elem_id="load-btn")
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Choose a budget and press **Quantize & generate**.", elem_id="status")
                with gr.Row():
                    # PNG, not gradio's default WebP: lossy compression would add its own differences
                    float_img = gr.Image(label="Float", type="pil", format="png", interactive=False,
                                         elem_id="float-img", elem_classes="mixdq-img", buttons=["download"])
                    quant_img = gr.Image(label="Quantized", type="pil", format="png", interactive=False,
                                         elem_id="quant-img",
                                         elem_classes="mixdq-img", buttons=["download"])
                with gr.Tabs():
                    with gr.Tab("Slider overlay"):
                        overlay = gr.ImageSlider(label="float ◀ ▶ quantized (drag)", type="pil", format="png",
                                                 interactive=False, elem_id="overlay",
                                                 elem_classes="mixdq-img", max_height=300)
                    with gr.Tab("Difference map"):
                        diff_img = gr.Image(label="|quantized − float|, amplified", type="pil", format="png",
                                            interactive=False, elem_id="diff-img", elem_classes="mixdq-img",
                                            height=300)
                stats = gr.Markdown(elem_id="stats")
        with gr.Row():
            chart = gr.HTML(elem_id="plan-chart")
            pareto_chart = gr.HTML(elem_id="pareto-chart")
        with gr.Accordion("All measured numbers (JSON)", open=False):
            raw = gr.JSON(elem_id="raw")

        outputs = [float_img, quant_img, overlay, diff_img, stats, chart, pareto_chart, raw, status, budget,
                   budget_info, header]

        def preset_points():
            return [(p.size_mb, session.predicted_loss(p.plan), p.name) for p in session.presets]

        def results(s, how, alloc, progress, budget_now):
            session.pareto_curve(progress)
            front = session.front_with(alloc)
            chosen = None
            if session.quant_plan is not None:
                size = session.costs.total_mb(session.quant_plan) if session.quant_label != "imported" \
                    else s["unet_quant_mb"]
                chosen = (size, alloc.predicted["total"] if alloc else session.predicted_loss(session.quant_plan))
            rows = measure.plan_chart_data(session.quant_plan, session.quant_pipe.unet)
            diff, gain = measure.difference_map(s["float_image"], s["quant_image"])
            raw_numbers = {k: v for k, v in s.items() if not k.endswith("_image")}
            raw_numbers.update(plan=session.quant_plan.summary(), how=how, quantization=session.quant_note,
                               diff_gain=gain,
                               float_mb_total_layer_costs=session.float_mb,
                               plan_mb_layer_costs=session.costs.total_mb(session.quant_plan)
                               if session.quant_label != "imported" else None)
            f_big, q_big = _enlarge(s["float_image"]), _enlarge(s["quant_image"])
            done = (f"**Done** · {how} → quantized UNet {_fmt_mb(s['unet_quant_mb'])} "
                    f"({s['unet_ratio']:.3f}× of float), SSIM {s['ssim']:.4f}")
            diff_shown = gr.update(value=_enlarge(diff), label=f"|quantized − float| × {gain:.0f} "
                                   f"(white = largest difference, {255 / gain:.0f}/255)")
            return (f_big, q_big, (f_big, q_big), diff_shown, stats_markdown(s, session, how),
                    plan_chart_svg(rows, f"Bits per layer: {session.quant_plan.summary()}"),
                    pareto_svg(front, getattr(session, "family_points", None), chosen, preset_points()),
                    raw_numbers, done, gr.update(**session.slider_spec()),
                    session.budget_info(budget_now) if budget_now is not None else gr.update(),
                    header_markdown(session))

        @_friendly
        def on_generate(budget_mb, prompt_text, seed_v, steps_v, progress=gr.Progress(track_tqdm=True)):
            # Validate everything before any long stage, so a typo costs nothing.
            measure.check_request(prompt_text, seed_v, steps_v)
            if budget_mb is None or not isinstance(budget_mb, (int, float)) or math.isnan(budget_mb):
                raise BudgetError("enter a budget in MB")
            with session.lock:
                lo, hi = session.budget_range()
                if budget_mb < lo - 5e-4 or (budget_mb > hi + 5e-4):
                    if session.allocator is not None:
                        session.allocator.check_budget(float(budget_mb))   # the library's message
                    raise BudgetError(f"no plan fits {budget_mb:g} MB: feasible budgets are "
                                      f"{lo:.3f} .. {hi:.3f} MB for this model")
                t0 = time.perf_counter()
                plan, how, alloc = session.plan_for(float(budget_mb), progress)
                session.quantized(plan, how, progress)
                s = measure.compare(session.float_pipe, session.quant_pipe, prompt_text, seed_v, steps_v,
                                    progress=lambda f, d: progress(0.4 + 0.5 * f, desc=f"generate: {d}"))
                session.last = s
                out = results(s, how, alloc, progress, budget_mb)
                progress(1.0, desc=f"done in {time.perf_counter() - t0:.1f} s")
                return out

        @_friendly
        def on_export(progress=gr.Progress()):
            with session.lock:
                if session.quant_pipe is None:
                    raise gr.Error("Nothing to export yet: press Quantize & generate first.", title="No model")
                progress(0.2, desc="export: writing the quantized model")
                size = session.costs.total_mb(session.quant_plan) if session.quant_label != "imported" \
                    else measure.model_nbytes(session.quant_pipe.unet) / MB
                name = f"mixdq-{size:.3f}MB-{time.strftime('%Y%m%d-%H%M%S')}.zip"
                path = mixdq.export_archive(session.quant_pipe, session.workdir / "exports" / name,
                                              embedded=session.embedded)
                gr.Info(f"Exported {path.name} ({path.stat().st_size / MB:.2f} MB)")
                return str(path)

        @_friendly
        def on_load(file, prompt_text, seed_v, steps_v, progress=gr.Progress()):
            if file is None:
                raise gr.Error("Choose an exported .zip first.", title="No file")
            measure.check_request(prompt_text, seed_v, steps_v)
            path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
            with session.lock:
                progress(0.05, desc="load: unpacking and verifying the archive")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", mixdq.SlowPathWarning)
                    loaded = mixdq.import_archive(path, dest=session.workdir / "imports",
                                                    device=session.float_pipe.unet.device)
                if not measure.same_architecture(session.float_pipe, loaded):
                    raise gr.Error("This export was made from a different model than the one the app runs, so "
                                   "there is no float image to compare with. Start the app with "
                                   "`--model PATH_OF_THE_EXPORT` to generate with it alone.",
                                   title="Different model")
                session.quant_pipe, session.quant_plan = loaded, mixdq.current_plan(loaded.unet)
                session.quant_label = "imported"
                session.quant_note = "loaded from an export" + "".join(
                    f"; {w.message}" for w in caught if issubclass(w.category, mixdq.SlowPathWarning))
                how = f"loaded from **{html.escape(Path(path).name)}**"
                s = measure.compare(session.float_pipe, loaded, prompt_text, seed_v, steps_v,
                                    progress=lambda f, d: progress(0.2 + 0.7 * f, desc=f"generate: {d}"))
                session.last = s
                return results(s, how, None, progress, None)

        @_friendly
        def on_page_load():
            # A known sensitivity (shipped or cached) draws the Pareto chart from the start.  It
            # is solved here, once, after the page shows (about 3 s of ILPs on the embedded
            # model), not while the app starts.
            with session.lock:
                front = session.pareto_curve(lambda *a, **k: None)
                return pareto_svg(front, getattr(session, "family_points", None), None, preset_points())

        demo.load(on_page_load, outputs=pareto_chart, api_name=False, concurrency_id="model",
                  concurrency_limit=1, show_progress="hidden")
        budget.change(session.budget_info, inputs=budget, outputs=budget_info, show_progress="hidden",
                      queue=False)
        for btn, p in preset_buttons:
            btn.click(lambda p=p: session.preset_value(p), outputs=budget, queue=False)
        # One model, one queue: generate, export and load never run at the same time.
        # The progress bar lives in the status box: the slider, images and charts stay readable.
        run.click(on_generate, inputs=[budget, prompt, seed, steps], outputs=outputs, api_name="generate",
                  concurrency_id="model", concurrency_limit=1, show_progress_on=[status])
        prompt.submit(on_generate, inputs=[budget, prompt, seed, steps], outputs=outputs,
                      concurrency_id="model", concurrency_limit=1, api_name=False, show_progress_on=[status])
        export_btn.click(on_export, outputs=export_file, api_name="export", concurrency_id="model",
                         concurrency_limit=1)
        load_btn.click(on_load, inputs=[upload, prompt, seed, steps], outputs=outputs, api_name="load",
                       concurrency_id="model", concurrency_limit=1, show_progress_on=[status])
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch(demo: gr.Blocks, host: str, port: int | None, **kw):
    """Launch with the app's look; allowed_paths lets the browser download exports."""
    session = demo.mixdq_session
    return demo.launch(server_name=host, server_port=port, css=CSS, theme=gr.themes.Default(),
                       allowed_paths=[str(session.workdir)], show_error=True, **kw)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="any source mixdq.load_pipeline accepts: a diffusers folder, a mixdq export "
                             "folder, or a hub id in the local cache (default: the embedded model)")
    parser.add_argument("--host", default=os.environ.get("MIXDQ_HOST", "127.0.0.1"),
                        help="interface to serve on (env MIXDQ_HOST; default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MIXDQ_PORT", "7860")),
                        help="port (env MIXDQ_PORT; default 7860)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the embedded model, whose tiny matmuls "
                             "only lose to OpenMP barriers with more; torch's default otherwise)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None or args.model is None:
        torch.set_num_threads(max(1, args.threads or 1))
    try:
        pipe = mixdq.load_pipeline(args.model)
        if mixdq.current_plan(pipe.unet):
            print(f"error: {args.model} is a mixdq export (already quantized), but the app compares a float "
                  "model with its quantized copy: start it on the float model the export came from and "
                  "open the export with 'Export / load > Load & generate', or generate with "
                  f"`python -m mixdq generate --model {args.model}`", file=sys.stderr)
            return 2
        demo = build_app(pipe)
    except MixDQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(demo, args.host, args.port, prevent_thread_lock=True, quiet=True)
    print(f"MixDQ app ready in {time.perf_counter() - _T_START:.1f} s: http://{args.host}:{args.port}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(demo.mixdq_session.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
