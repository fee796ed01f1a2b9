"""A procedurally generated, captioned image world for the embedded tiny SDXL model.

One object (shape, colour, size, position on a 3x3 grid) on a flat background, 64x64 RGB.
A caption fixes the image up to small jitter (centre +-1.5 px, size +-7 %, colour +-8/255),
so a few-step sampler has one sharp answer to find.  Captions are plain English drawn from
several templates with synonyms; a fixed ~10 % of the attribute combinations is held out and
never rendered for training.

Nothing is stored on disk: images are rendered on the fly with vectorised torch ops.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import torch

IMAGE_SIZE = 64

# Geometry.  Small objects are 8 px half-extent: at the VAE's 4x downsampling that is still
# a 4x4-latent footprint (the throwaway probe showed 5 px objects were lost by the VAE).
SIZES = {"small": 8.0, "large": 13.0}
GRID = (19.0, 32.0, 45.0)  # centre coordinates of the 3x3 grid (rows and columns)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CENTER_JITTER = 1.5
SIZE_JITTER = 0.07
COLOR_JITTER = 8.0 / 255.0
BG_JITTER = 5.0 / 255.0

SHAPES = ("circle", "square", "triangle")
# Object colours, chosen far apart in RGB and far from every background.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
ATTRIBUTE_NAMES = ("shape", "color", "size", "position", "background")

# Synonyms used in captions, and recognised by the parser.
SHAPE_WORDS = {"circle": ["circle", "disk", "disc"], "square": ["square", "box"], "triangle": ["triangle"]}
COLOR_WORDS = {
    "red": ["red"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "cyan": ["cyan", "turquoise"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
BG_WORDS = {"black": ["black"], "white": ["white"], "gray": ["gray", "grey"]}
ROW_WORDS = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}
COL_WORDS = {"left": ["left"], "right": ["right"]}
CENTER_WORDS = ["center", "centre", "middle"]


@dataclass(frozen=True, order=True)
class Attributes:
    shape: str
    color: str
    size: str
    row: int  # 0 top, 1 middle, 2 bottom
    col: int  # 0 left, 1 center, 2 right
    background: str

    @property
    def position(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "center"
        if self.row == 1:
            return COLS[self.col]
        if self.col == 1:
            return ROWS[self.row]
        return f"{ROWS[self.row]} {COLS[self.col]}"

    def as_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": self.position,
            "background": self.background,
        }


def all_combinations() -> list[Attributes]:
    return [
        Attributes(s, c, z, r, k, b)
        for s, c, z, r, k, b in itertools.product(
            SHAPES, COLORS, SIZES, range(3), range(3), BACKGROUNDS
        )
    ]


HELDOUT_FRACTION = 0.10
SPLIT_SEED = 20241126


def _split() -> tuple[list[Attributes], list[Attributes]]:
    combos = all_combinations()
    rng = random.Random(SPLIT_SEED)
    order = list(range(len(combos)))
    rng.shuffle(order)
    n_held = int(round(HELDOUT_FRACTION * len(combos)))
    held = sorted(combos[i] for i in order[:n_held])
    train = sorted(combos[i] for i in order[n_held:])
    return train, held


TRAIN_COMBOS, HELDOUT_COMBOS = _split()
_HELDOUT_SET = frozenset(HELDOUT_COMBOS)


def is_heldout(attrs: Attributes) -> bool:
    return attrs in _HELDOUT_SET


# ----------------------------------------------------------------------------- captions

def _position_phrase(row: int, col: int, rng: random.Random) -> str:
    if (row, col) == (1, 1):
        return rng.choice(["in the center", "in the middle", "at the center", "in the centre"])
    if row == 1:
        h = COLS[col]
        return rng.choice([f"on the {h}", f"at the {h}", f"on the {h} side", f"at the middle {h}"])
    v = rng.choice(ROW_WORDS[ROWS[row]])
    if col == 1:
        return rng.choice([f"at the {v}", f"at the {v} center", f"in the {v} middle"])
    h = COLS[col]
    return rng.choice([f"in the {v} {h} corner", f"at the {v} {h}", f"in the {v} {h}"])


TEMPLATES = (
    "a {size} {color} {shape} {pos} on a {bg} background",
    "{size} {color} {shape} {pos}, {bg} background",
    "a {color} {shape}, {size}, {pos} of a {bg} image",
    "there is a {size} {color} {shape} {pos}; the background is {bg}",
    "a {bg} background with a {size} {color} {shape} {pos}",
    "a picture of a {size} {color} {shape} {pos} against {bg}",
)


def caption(attrs: Attributes, rng: random.Random | None = None, template: int | None = None) -> str:
    """A plain-English caption for ``attrs``; synonyms and template drawn from ``rng``."""
    rng = rng or random.Random(0)
    t = TEMPLATES[rng.randrange(len(TEMPLATES)) if template is None else template]
    return t.format(
        size=rng.choice(SIZE_WORDS[attrs.size]),
        color=rng.choice(COLOR_WORDS[attrs.color]),
        shape=rng.choice(SHAPE_WORDS[attrs.shape]),
        pos=_position_phrase(attrs.row, attrs.col, rng),
        bg=rng.choice(BG_WORDS[attrs.background]),
    )


def _lookup(table: dict[str, list[str]]) -> dict[str, str]:
    return {w: k for k, ws in table.items() for w in ws}


_SHAPE_OF = _lookup(SHAPE_WORDS)
_COLOR_OF = _lookup(COLOR_WORDS)
_SIZE_OF = _lookup(SIZE_WORDS)
_BG_OF = _lookup(BG_WORDS)
_ROW_OF = _lookup(ROW_WORDS)
_COL_OF = _lookup(COL_WORDS)


def _why_not(text: str) -> tuple[Attributes | None, str]:
    words = re.findall(r"[a-z]+", text.lower())
    found = {}
    problems = []
    for name, table in (("shape", _SHAPE_OF), ("color", _COLOR_OF), ("size", _SIZE_OF), ("background", _BG_OF)):
        vals = {table[w] for w in words if w in table}
        if len(vals) == 1:
            found[name] = vals.pop()
        elif not vals:
            problems.append(f"no {name} word")
        else:
            problems.append(f"several {name} words ({', '.join(sorted(vals))})")
    rows = {_ROW_OF[w] for w in words if w in _ROW_OF}
    cols = {_COL_OF[w] for w in words if w in _COL_OF}
    has_center = any(w in CENTER_WORDS for w in words)
    if len(rows) > 1 or len(cols) > 1:
        problems.append("contradictory position words")
    elif not rows and not cols and not has_center:
        problems.append("no position words")
    if problems:
        return None, "; ".join(problems)
    row = ROWS.index(rows.pop()) if rows else 1
    col = COLS.index(cols.pop()) if cols else 1
    return Attributes(found["shape"], found["color"], found["size"], row, col, found["background"]), ""


def parse_caption(text: str) -> Attributes | None:
    """Attributes named by a caption of this world, or None when ``text`` is not one (each of
    shape, colour, size, background must be named exactly once, and a position given)."""
    return _why_not(text)[0]


def parse_caption_or_raise(text: str) -> Attributes:
    attrs, why = _why_not(text)
    if attrs is None:
        raise ValueError(
            f"not a caption of the tiny-sdxl world ({why}): {text!r}. Expected e.g. "
            f"'a small red circle in the top left corner on a black background' "
            f"(shapes {', '.join(SHAPES)}; colours {', '.join(COLORS)}; sizes small/large; "
            f"backgrounds {', '.join(BACKGROUNDS)}; positions top/middle/bottom x left/center/right)"
        )
    return attrs


def _sample(combos: list[Attributes], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    order = list(combos)
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(order)  # cycle through every combination before repeating one
        out.extend(caption(a, rng) for a in order[: n - len(out)])
    return out


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of held-out attribute combinations (never rendered for training)."""
    return _sample(HELDOUT_COMBOS, n, seed)


def train_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of training-split combinations."""
    return _sample(TRAIN_COMBOS, n, seed)


# ---------------------------------------------------------------------------- rendering

def shape_coverage(shape: str | list[str], cx, cy, r, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1], shape (B, size, size).

    ``r`` is the half-extent; coverage = clamp(0.5 - signed distance) gives a one-pixel
    linear edge ramp.  The triangle points up and its *centroid* sits at (cx, cy), so the
    checker's centroid-based position test works for every shape.
    """
    cx = torch.as_tensor(cx, dtype=torch.float32).reshape(-1, 1, 1)
    cy = torch.as_tensor(cy, dtype=torch.float32).reshape(-1, 1, 1)
    r = torch.as_tensor(r, dtype=torch.float32).reshape(-1, 1, 1)
    b = max(cx.shape[0], cy.shape[0], r.shape[0])
    shapes = [shape] * b if isinstance(shape, str) else list(shape)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    x = coords.reshape(1, 1, size) - cx
    y = coords.reshape(1, size, 1) - cy
    d_circle = torch.sqrt(x * x + y * y) - r
    d_square = torch.maximum(x.abs(), y.abs()) - r
    # Isosceles triangle, vertices (0,-a), (+-b, a/2) with a = b = 1.1 r (centroid at 0).
    a = 1.1 * r
    bb = 1.1 * r
    # Edge normals: bottom edge y = a/2; sides through (0,-a) and (+-bb, a/2).
    ln = torch.sqrt(bb * bb + (1.5 * a) ** 2)
    n_x, n_y = 1.5 * a / ln, bb / ln  # outward normal of the right edge is (n_x, -n_y)...
    # signed distance to the right edge: ((x, y) - (0, -a)) . (1.5a, -bb)/ln (outward, right side)
    d_right = (x * n_x + (y + a) * (-n_y))
    d_left = (-x * n_x + (y + a) * (-n_y))
    d_bottom = y - a / 2
    d_tri = torch.maximum(torch.maximum(d_right, d_left), d_bottom)
    kind = torch.tensor([SHAPES.index(s) for s in shapes]).reshape(-1, 1, 1)
    d = torch.where(kind == 0, d_circle, torch.where(kind == 1, d_square, d_tri))
    return (0.5 - d).clamp(0.0, 1.0)


def render(attrs: list[Attributes], generator: torch.Generator | None = None, jitter: bool = True) -> torch.Tensor:
    """Render a batch: float tensor (B, 3, 64, 64) in [0, 1]."""
    n = len(attrs)
    g = generator

    def u(*shape):
        return torch.rand(*shape, generator=g) * 2 - 1 if jitter else torch.zeros(*shape)

    cx = torch.tensor([GRID[a.col] for a in attrs]) + CENTER_JITTER * u(n)
    cy = torch.tensor([GRID[a.row] for a in attrs]) + CENTER_JITTER * u(n)
    r = torch.tensor([SIZES[a.size] for a in attrs]) * (1 + SIZE_JITTER * u(n))
    cov = shape_coverage([a.shape for a in attrs], cx, cy, r).unsqueeze(1)
    fg = torch.tensor([COLORS[a.color] for a in attrs], dtype=torch.float32) / 255.0
    bg = torch.tensor([BACKGROUNDS[a.background] for a in attrs], dtype=torch.float32) / 255.0
    fg = (fg + COLOR_JITTER * u(n, 3)).clamp(0, 1).reshape(n, 3, 1, 1)
    bg = (bg + BG_JITTER * u(n, 3)).clamp(0, 1).reshape(n, 3, 1, 1)
    return bg + cov * (fg - bg)


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def sample_batch(n: int, rng: random.Random, generator: torch.Generator | None = None, combos=None):
    """Training batch: (images in [0,1], captions, attributes) from the training split only."""
    combos = TRAIN_COMBOS if combos is None else combos
    attrs = [rng.choice(combos) for _ in range(n)]
    return render(attrs, generator), [caption(a, rng) for a in attrs], attrs
