"""Where the data mixdq ships is found: one function for the embedded model, the
calibration prompts and the presets, in a source checkout and in an installed package.

A checkout keeps them beside the package (assets/, presets/); `pip install .` packs
them into it as mixdq/_assets and mixdq/_presets (pyproject.toml maps the folders).
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = {"assets": "_assets", "presets": "_presets"}


def shipped(folder: str, *parts: str) -> Path:
    """The path of shipped data: shipped("assets", "tiny-sdxl"), shipped("presets")."""
    if folder not in _INSTALLED:
        raise ValueError(f"mixdq ships {sorted(_INSTALLED)}, not {folder!r}")
    installed = _PACKAGE / _INSTALLED[folder]
    base = installed if installed.is_dir() else _PACKAGE.parent / folder
    return base.joinpath(*parts)
