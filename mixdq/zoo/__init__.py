"""The embedded default model ("tiny-sdxl"): a small SDXL-architecture text-to-image model
trained from scratch on a procedural world, shipped in ``assets/tiny-sdxl`` so the project
shows real generation offline.  See ``docs/zoo.md``.
"""
from __future__ import annotations

from ..resources import shipped
from .world import Attributes, heldout_prompts, parse_caption, train_prompts
from .checker import alignment, check

ASSET_DIR = shipped("assets", "tiny-sdxl")

__all__ = [
    "ASSET_DIR",
    "Attributes",
    "alignment",
    "check",
    "heldout_prompts",
    "parse_caption",
    "train_prompts",
]
