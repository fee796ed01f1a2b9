"""Text-alignment metric for the tiny-sdxl world: read an image, say per attribute whether it
matches its caption.

Pixel analysis, no learned model (so it is exact on rendered images and cannot be fooled
the way a learned classifier can):
  background: median colour of the 2-px border ring -> nearest background colour;
  object colour: mean of the pixels most different from the background -> nearest colour;
  soft mask: each pixel's projection on the background->object colour segment (linear in
    the pixels, so blur keeps its sum and centroid);
  position: mask centroid -> nearest grid cell;
  shape: soft IoU of the (lightly blurred) mask against each ideal shape fitted to the same
    centroid and area, best wins (a fill-ratio test fails under blur);
  size: the fitted half-extent of the winning shape against the small/large midpoint.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import world

_BG = np.array(list(world.BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = list(world.BACKGROUNDS)
_FG = np.array(list(world.COLORS.values()), dtype=np.float32)
_FG_NAMES = list(world.COLORS)
# area = K * r^2 for half-extent r
_AREA_K = {"circle": math.pi, "square": 4.0, "triangle": 1.5 * 1.1 * 1.1}
_SIZE_SPLIT = math.sqrt(world.SIZES["small"] * world.SIZES["large"])
_MIN_CONTRAST = 40.0  # in 0-255 units: below this there is no visible object


def _blur(a: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable gaussian blur of (B, H, W)."""
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    x = a.unsqueeze(1)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (3, 3, 0, 0), mode="replicate"), k.reshape(1, 1, 1, 7))
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, 3, 3), mode="replicate"), k.reshape(1, 1, 7, 1))
    return x.squeeze(1)


def _as_array(image) -> np.ndarray:
    """PIL image / uint8 array / float tensor -> float32 (64, 64, 3) in 0-255."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] == 3:
            t = t.permute(1, 2, 0)
        image = Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        image = image.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def analyse(image) -> dict:
    """What the image shows: background, colour, shape, size, row, col (None where no object
    is visible), plus the raw measurements."""
    img = _as_array(image)
    h, w, _ = img.shape
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    background = _BG_NAMES[int(np.argmin(((_BG - bg) ** 2).sum(1)))]
    diff = img - bg
    dist = np.sqrt((diff**2).sum(-1))
    out = {"background": background, "color": None, "shape": None, "size": None, "row": None, "col": None}
    peak = np.percentile(dist, 99.5)
    if peak < _MIN_CONTRAST:
        return out
    core = dist >= 0.8 * peak
    fg = img[core].mean(0)
    out["color"] = _FG_NAMES[int(np.argmin(((_FG - fg) ** 2).sum(1)))]
    seg = fg - bg
    alpha = np.clip((diff @ seg) / max(float(seg @ seg), 1e-6), 0.0, 1.0)
    area = float(alpha.sum())
    if area < 4.0:
        return out
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx = float((alpha * xs).sum() / area)
    cy = float((alpha * ys).sum() / area)
    out["col"] = int(np.argmin([abs(cx - g) for g in world.GRID]))
    out["row"] = int(np.argmin([abs(cy - g) for g in world.GRID]))
    rs = [math.sqrt(area / _AREA_K[s]) for s in world.SHAPES]
    ideal = world.shape_coverage(list(world.SHAPES), [cx] * 3, [cy] * 3, rs)
    a = torch.from_numpy(alpha).unsqueeze(0)
    # Blur both sides: generated edges are soft, and blurring the ideal masks the same way
    # makes the IoU compare shapes, not edge sharpness.
    ideal_b, a_b = _blur(ideal), _blur(a)
    iou = (torch.minimum(ideal_b, a_b).sum((1, 2)) / torch.maximum(ideal_b, a_b).sum((1, 2))).tolist()
    k = int(np.argmax(iou))
    out["shape"] = world.SHAPES[k]
    out["size"] = "small" if rs[k] < _SIZE_SPLIT else "large"
    out.update(centroid=(cx, cy), area=area, iou=dict(zip(world.SHAPES, iou)), fg_rgb=fg.tolist(), bg_rgb=bg.tolist())
    return out


def check(image, caption: str) -> dict[str, bool]:
    """Per attribute (shape, color, size, position, background): does ``image`` match?"""
    want = world.parse_caption_or_raise(caption)
    got = analyse(image)
    return {
        "shape": got["shape"] == want.shape,
        "color": got["color"] == want.color,
        "size": got["size"] == want.size,
        "position": (got["row"], got["col"]) == (want.row, want.col),
        "background": got["background"] == want.background,
    }


def alignment(images, captions) -> dict:
    """Accuracy per attribute and for all attributes together over (image, caption) pairs."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("alignment() needs at least one image")
    results = [check(im, c) for im, c in zip(images, captions)]
    n = len(results)
    per = {a: sum(r[a] for r in results) / n for a in world.ATTRIBUTE_NAMES}
    return {"per_attribute": per, "all": sum(all(r.values()) for r in results) / n, "n": n}
