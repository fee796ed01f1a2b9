"""The app's two SVG charts, drawn from library data: bits per layer of a plan
(`plan_chart_data`) and the allocator's plans as size vs predicted loss."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from mixdq.plan import FLOAT_BITS
from mixdq.quant import layer_spec, quantizable_layers
from mixdq.sensitivity_analysis import layer_group

CONTENT_COLOR, QUALITY_COLOR, PRESET_COLOR = "#e4572e", "#2e86ab", "#8a5cf6"
SVG_OPEN = ('<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{label}" '
            'xmlns="http://www.w3.org/2000/svg" style="font:11px sans-serif">')


# ------------------------------------------------------------------------------------------
# Bits per layer.
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
    rows = []
    for name, module in quantizable_layers(unet).items():
        bits = plan.get(name)
        shape, _, _ = layer_spec(module)
        rows.append({"layer": name, "block": block_of(name), "group": layer_group(name),
                     "weight_bits": bits.weight if bits else FLOAT_BITS,
                     "act_bits": bits.act if bits else FLOAT_BITS,
                     "params": math.prod(shape)})
    return sorted(rows, key=lambda r: _block_order(r["block"]))   # stable: keeps order inside a block


def _plan_legend(left: int, title: str) -> str:
    return (f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>'
            f'<rect x="{left}" y="21" width="10" height="10" fill="{CONTENT_COLOR}"/>'
            f'<text x="{left + 14}" y="30">content layers (attn2, ff): weight bits</text>'
            f'<rect x="{left + 250}" y="21" width="10" height="10" fill="{QUALITY_COLOR}"/>'
            f'<text x="{left + 264}" y="30">quality layers: weight bits</text>'
            f'<rect x="{left + 440}" y="25" width="10" height="2" fill="#222"/>'
            f'<text x="{left + 454}" y="30">activation bits</text>'
            f'<rect x="{left + 560}" y="21" width="10" height="10" fill="{QUALITY_COLOR}" fill-opacity="0.35"/>'
            f'<text x="{left + 574}" y="30">kept float (16)</text></svg>')


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

    parts = [SVG_OPEN.format(w=w, h=h, label=html.escape(title))]
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
        if i == n - 1 or rows[i + 1]["block"] != r["block"]:    # the block ends here: its divider and name
            x0, x1 = left + start * bw, left + (i + 1) * bw
            parts.append(f'<line x1="{x1:.1f}" x2="{x1:.1f}" y1="{top}" y2="{h - bottom + 4}" stroke="#999" '
                         'stroke-dasharray="2,2"/>')
            label = r["block"].replace("_blocks.", " ").replace("_block", "")
            parts.append(f'<text transform="translate({(x0 + x1) / 2:.1f},{h - bottom + 10}) rotate(40)" '
                         f'fill="#444">{html.escape(label)}</text>')
            start = i + 1
    parts.append(_plan_legend(left, title))
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# Size vs predicted loss.
# ------------------------------------------------------------------------------------------
@dataclass
class ParetoPoints:
    """What the Pareto chart draws, each point (UNet MB, predicted loss): the allocator's
    swept family, its non-dominated front, the plan now shown and the shipped presets (a
    loss of None: the allocator has no prediction for that plan, so it is not drawn)."""
    front: list[tuple[float, float]]
    family: list[tuple[float, float]] = field(default_factory=list)
    chosen: tuple[float, float | None] | None = None
    presets: list[tuple[float, float | None, str]] = field(default_factory=list)

    def drawn(self) -> list[tuple[float, float]]:
        chosen = [self.chosen] if self.chosen and self.chosen[1] is not None else []
        return list(self.family) + list(self.front) + chosen + [p[:2] for p in self.presets if p[1] is not None]


class _Axes:
    """UNet MB on a linear x axis; the loss on a log y axis, since losses span decades (2-bit
    plans vs nearly float ones), with float (loss 0) on its floor."""
    w, h, left, top, bottom, right = 760, 260, 56, 28, 36, 16

    def __init__(self, pts: list[tuple[float, float]]):
        xs = [p[0] for p in pts]
        self.x0, self.x1 = min(xs), max(xs)
        positive = [p[1] for p in pts if p[1] > 0]
        self.floor = min(positive) / 2 if positive else 1e-6
        top_v = max(positive) if positive else 1.0
        self.y0 = self._ty(self.floor)
        self.y1 = self._ty(top_v) if top_v > self.floor else self.y0 + 1

    def _ty(self, v: float) -> float:
        return math.log10(max(v, self.floor))

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / ((self.x1 - self.x0) or 1) * (self.w - self.left - self.right)

    def py(self, v: float) -> float:
        return (self.h - self.bottom
                - (self._ty(v) - self.y0) / ((self.y1 - self.y0) or 1) * (self.h - self.top - self.bottom))

    def frame(self) -> list[str]:
        w, h, left, top, bottom, right = self.w, self.h, self.left, self.top, self.bottom, self.right
        parts = [f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" stroke="#888"/>',
                 f'<line x1="{left}" x2="{left}" y1="{top}" y2="{h - bottom}" stroke="#888"/>']
        for i in range(5):
            xv = self.x0 + (self.x1 - self.x0) * i / 4
            yv = 10 ** (self.y0 + (self.y1 - self.y0) * i / 4)
            parts.append(f'<text x="{self.px(xv):.1f}" y="{h - bottom + 14}" text-anchor="middle" '
                         f'fill="#666">{xv:.3g}</text>')
            parts.append(f'<text x="{left - 4}" y="{self.py(yv) + 4:.1f}" text-anchor="end" '
                         f'fill="#666">{yv:.1e}</text>')
        return parts

    def labels(self) -> str:
        return (f'<text x="{self.left}" y="14" font-weight="bold">Size vs predicted loss (allocator family, '
                f'Pareto front in blue)</text>'
                f'<text x="{self.w - self.right}" y="{self.h - 4}" text-anchor="end" fill="#444">UNet MB</text>'
                f'<text transform="translate(12,{(self.top + self.h - self.bottom) / 2:.0f}) rotate(-90)" '
                'text-anchor="middle" fill="#444">predicted loss (log)</text></svg>')


def pareto_svg(points: ParetoPoints | None) -> str:
    """Predicted loss vs UNet size for the allocator's plan family; the front as a line, the
    chosen plan as a ring; presets as diamonds."""
    if points is None or not points.front:
        return ('<p style="color:#666">The Pareto curve needs the layer sensitivity: it appears after '
                'the first allocation.</p>')
    ax = _Axes(points.drawn())
    px, py = ax.px, ax.py
    parts = [SVG_OPEN.format(w=ax.w, h=ax.h, label="Pareto curve"), *ax.frame()]
    for x, v in points.family:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2.5" fill="#bbb"/>')
    line = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in sorted(points.front))
    parts.append(f'<polyline points="{line}" fill="none" stroke="{QUALITY_COLOR}" stroke-width="2"/>')
    for x, v in points.front:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{QUALITY_COLOR}"/>')
    for x, v, name in points.presets:
        if v is not None:
            parts.append(f'<path d="M{px(x):.1f},{py(v) - 6:.1f} l6,6 l-6,6 l-6,-6 z" fill="{PRESET_COLOR}">'
                         f'<title>preset {html.escape(name)}</title></path>')
    if points.chosen and points.chosen[1] is not None:
        size, loss = points.chosen
        cx, cy = px(size), py(loss)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="8" fill="none" stroke="{CONTENT_COLOR}" '
                     f'stroke-width="3"/><text x="{cx + 11:.1f}" y="{cy - 8:.1f}" fill="{CONTENT_COLOR}" '
                     f'font-weight="bold">this plan ({size:.3g} MB)</text>')
    parts.append(ax.labels())
    return "".join(parts)
