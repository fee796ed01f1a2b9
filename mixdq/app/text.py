"""The Markdown the app shows: the header, the line under the budget slider, the stats table.
Pure functions of what the Session and the library hold."""
from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mixdq import memory

if TYPE_CHECKING:
    from .state import QuantizedModel, Session

TITLE = "MixDQ · mixed-precision quantization of few-step diffusion"
SENSITIVITY_LABELS = {"shipped": "shipped ✓", "cached": "cached ✓", "measured": "measured ✓ (cached)",
                      "given": "given ✓", "published": "published ✓"}
# (stats key, label, format) of a preset's numbers measured when it was shipped
PRESET_STATS = (("ssim", "SSIM", "{:.4f}"), ("psnr", "PSNR", "{:.2f} dB"), ("alignment", "prompt match", "{:.0%}"))


def fmt_mb(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f} MB" if x >= 1000 else f"{x:.3f} MB" if x < 10 else f"{x:.2f} MB"


def preset_label(name: str) -> str:
    """mixdq-w4a8-size -> "W4A8 size" (the shipped presets spend a uniform plan's memory)."""
    m = re.fullmatch(r"mixdq-w(\d+)a(\d+)-size", name)
    return f"W{m.group(1)}A{m.group(2)} size" if m else name


def header_markdown(session: Session) -> str:
    pipe = session.float_pipe
    name = "tiny-sdxl (embedded)" if session.embedded else html.escape(str(session.source))
    sens = SENSITIVITY_LABELS.get(session.sens_source) if session.allocator else None
    if sens and session.sens_source == "published":
        # measured elsewhere: say by whom, and that a fine-tune needs its own measurement
        sens += f" ({html.escape(session.sens_message or '')})"
    elif sens and session.sens_source == "shipped" and session.sens_measured_as:
        # another dtype or device than this one: the scores hold up to float rounding
        sens += f" (measured on {html.escape(session.sens_measured_as)})"
    if sens is None:
        sens = "not yet measured" + (" (the shipped table is another calibration's)" if session.sens_note else "")
    return (f"# {TITLE}\n"
            f"Model **{name}** · UNet {fmt_mb(session.float_mb)} in {str(pipe.unet.dtype).replace('torch.', '')} · "
            f"{session.n_layers} quantizable layers · {len(session.presets)} preset(s) · "
            f"sensitivity {sens} · "
            f"device {pipe.unet.device.type}")


def _preset_line(preset) -> str:
    text = f"matches preset **{preset.name}**: plan ready, no allocation needed"
    st = preset.stats or {}
    measured = [f"{label} {fmt.format(st[key])}" for key, label, fmt in PRESET_STATS
                if isinstance(st.get(key), (int, float))]
    if measured:
        n = (st.get("eval") or {}).get("prompts")
        text += f" (measured when shipped{f' on {n} prompts' if n else ''}: {', '.join(measured)})"
    return text


def budget_markdown(session: Session, budget) -> str:
    """The line under the slider: the budget as a share of float and as average bits, and
    what pressing the button will do for it."""
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        return "Enter a budget in MB."
    float_bits = memory.dtype_bits(session.float_pipe.unet)
    bits = memory.equivalent_bits(budget, session.float_mb, float_bits)
    parts = [f"**{fmt_mb(budget)}** of UNet memory = **{budget / session.float_mb:.1%}** of float "
             f"({fmt_mb(session.float_mb)}) ≈ **{bits:.2f} average bits** (float: {float_bits})"]
    preset = session.matching_preset(budget)
    if preset is not None:
        parts.append(_preset_line(preset))
    elif session.allocator is None:
        parts.append("needs the one-time sensitivity analysis (minutes on a CPU, then cached; "
                     "`python -m mixdq sensitivity` does the same): pick a preset for an instant plan")
        if session.sens_note:
            parts.append(session.sens_note)
    if not session.in_range(budget):
        lo, hi = session.budget_range()
        parts.append(f"⚠ outside the feasible range {fmt_mb(lo)} – {fmt_mb(hi)}")
    return " · ".join(parts)


def _checks_cell(c) -> str:
    if c is None:
        return "–"
    bad = [k for k, ok in c.items() if not ok]
    return f"{sum(c.values())}/{len(c)} ✓" + (f" (✗ {', '.join(bad)})" if bad else "")


def _stats_rows(s: dict, embedded: bool) -> list[str]:
    ms, speed = s["step_ms"], s["speedup"]
    psnr_text = "∞" if math.isinf(s["psnr"]) else f"{s['psnr']:.2f} dB"
    rows = [
        "| measured now | float | quantized | quantized vs float |",
        "|---|---:|---:|---:|",
        f"| UNet weight memory | {fmt_mb(s['unet_float_mb'])} | {fmt_mb(s['unet_quant_mb'])} | "
        f"**{s['unet_ratio']:.3f}×** ({1 / s['unet_ratio']:.2f}× smaller) |",
        f"| UNet latency per step | {ms['float']:.1f} ms | {ms['quantized']:.1f} ms | "
        + (f"{speed:.2f}× faster |" if speed >= 1 else f"{1 / speed:.2f}× slower |"),
        f"| Peak process memory while generating | {fmt_mb(s['peak_mb']['float'])} | "
        f"{fmt_mb(s['peak_mb']['quantized'])} | {s['peak_mb']['quantized'] - s['peak_mb']['float']:+.1f} MB |",
    ]
    if s.get("peak_gpu_mb"):
        g = s["peak_gpu_mb"]
        rows.append(f"| Peak GPU memory while generating | {fmt_mb(g['float'])} | {fmt_mb(g['quantized'])} | "
                    f"{g['quantized'] / g['float']:.3f}× |")
    rows += [
        f"| SSIM to the float image | 1 | {s['ssim']:.4f} | |",
        f"| PSNR to the float image | ∞ | {psnr_text} | |",
    ]
    if s.get("checks"):
        rows.append(f"| Matches the prompt (attribute checker) | {_checks_cell(s['checks']['float'])} | "
                    f"{_checks_cell(s['checks']['quantized'])} | |")
    elif embedded:
        rows.append("| Matches the prompt (attribute checker) | – | – | not a caption of the model's world |")
    return rows


def stats_markdown(s: dict, model: QuantizedModel, embedded: bool) -> str:
    """The table of one measurement (`measure.compare`'s dict) and, under it, how the quantized
    model was made and how each number was measured."""
    foot = (f"\n\nPlan: {model.how} · {model.plan.summary()} · {model.note} · "
            f"W8A8 kernel `{s.get('kernel')}` · "
            f"{s['settings']['num_inference_steps']} step(s), seed {s['seed']}, "
            f"{s['settings']['width']}×{s['settings']['height']} px.  Latency: median of "
            f"{len(s['step_ms_all']['float'])} interleaved UNet calls on the same inputs; peak memory: "
            f"{s['peak_method']} (the process holds both models).")
    if s["speedup"] < 1:
        foot += ("  Why slower: this model's matmuls are tiny (tens of microseconds), so the fixed cost "
                 "per quantized layer (quantizing its input, the int8 epilogue, more operator calls) "
                 "outweighs the integer arithmetic it saves; at the real SDXL size the same kernels are "
                 "faster than float (measured in bench/RESULTS.md).")
    return "\n".join(_stats_rows(s, embedded)) + foot


def loaded_from(path) -> str:
    return f"loaded from **{html.escape(Path(path).name)}**"


def done_markdown(s: dict, model: QuantizedModel) -> str:
    """The status line once a click has finished."""
    return (f"**Done** · {model.how} → quantized UNet {fmt_mb(s['unet_quant_mb'])} "
            f"({s['unet_ratio']:.3f}× of float), SSIM {s['ssim']:.4f}")
