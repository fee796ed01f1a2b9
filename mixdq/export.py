"""save_quantized / load_quantized: a quantized pipeline as a folder.

    out/
      mixdq.json            format, dtype, kernel (the exporter's: load picks its own),
                            BOS flag, calibration, checksums
      plan.json             the Plan (layer -> bits)
      model_index.json      the diffusers pipeline index
      unet/config.json      the UNet architecture
      unet/mixdq_unet.safetensors   packed weights, scales, activation params, float rest
      text_encoder*/ tokenizer*/ vae/ scheduler/   as diffusers writes them
      mixdq_defaults.json   the few-step generation settings

Writing goes to a hidden sibling folder that is renamed into place at the end,
so a failure never leaves a half-written export.  Loading builds the UNet on
the meta device (no float weights are ever materialised) and checks every
tensor name, shape and checksum before use.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import ExportError, SlowPathWarning
from .loading import DEFAULTS_FILE, default_device, generation_defaults
from .plan import Plan
from .quant import (QuantConv2d, QuantLinear, is_bos_layer, kernels, prepack, quantizable_layers, quantized_layers,
                    shortcut_splits)
from .quantize import QuantState, current_plan, fit_plan_to_device

FORMAT = "mixdq-export/1"
UNET_FILE = "unet/mixdq_unet.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_quantized(pipe, folder, overwrite: bool = False) -> Path:
    """Write a quantized pipeline to `folder` atomically; return its path."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser().resolve()
    if not quantized_layers(pipe.unet):
        raise ExportError("this pipeline is not quantized: run mixdq.quantize(pipe, plan, ...) first")
    if folder.exists() and not overwrite:
        raise ExportError(f"{folder} already exists: choose a new folder or pass overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, component in pipe.components.items():
            if component is None or name == "unet":
                continue
            if hasattr(component, "save_pretrained"):
                component.save_pretrained(tmp / name)
        pipe.save_config(tmp)
        (tmp / "unet").mkdir()
        pipe.unet.save_config(tmp / "unet")
        state = {k: v.detach().contiguous().cpu() for k, v in pipe.unet.state_dict().items()}
        save_file(state, str(tmp / UNET_FILE), metadata={"format": FORMAT})
        plan = current_plan(pipe.unet)
        plan.save(tmp / "plan.json")
        (tmp / DEFAULTS_FILE).write_text(json.dumps(generation_defaults(pipe), indent=1))
        quant_state = getattr(pipe.unet, "mixdq_state", None)
        meta = quant_state.to_dict() if quant_state is not None else {}
        meta.update(format=FORMAT, pipeline_class=type(pipe).__name__,
                    dtype=str(pipe.unet.dtype).replace("torch.", ""),
                    unet_sha256=_sha256(tmp / UNET_FILE),
                    unet_bytes=sum(t.nbytes for t in state.values()))
        (tmp / "mixdq.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():  # overwrite: swap in the new folder, then drop the old one
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ExportError):
            raise
        if isinstance(e, Exception):
            raise ExportError(f"could not write {folder}: {e}") from e
        raise
    prepack(pipe.unet)  # state_dict gave prepacked layers their codes back: drop them again
    return folder


def _read_meta(folder: Path) -> dict:
    path = folder / "mixdq.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not a mixdq export (no mixdq.json); "
                          "export one with mixdq.save_quantized(pipe, folder)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is corrupted ({e}); export the model again") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{folder} has format {meta.get('format')!r}; this mixdq reads {FORMAT!r}")
    return meta


def _empty_quantized_unet(folder: Path, plan: Plan, dtype, bos_aware: bool):
    """The UNet skeleton on the meta device, quantized layers in place."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(folder / "unet")
    with torch.device("meta"):
        # nn.Module.to: diffusers' own .to() warns about fp32-kept modules (none here)
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(config), dtype)
    layers = quantizable_layers(unet)
    try:
        plan.validate(layers)
    except Exception as e:
        raise ExportError(f"plan.json does not match unet/config.json: {e}") from None
    splits = shortcut_splits(unet)
    for name, bits in plan.quantized().items():
        m = layers[name]
        shape, has_bias = tuple(m.weight.shape), m.bias is not None
        if isinstance(m, torch.nn.Linear):
            new = QuantLinear(shape, has_bias, bits, dtype, "meta", bos=bos_aware and is_bos_layer(name))
        else:
            new = QuantConv2d(shape, has_bias, bits, dtype, "meta", split=splits.get(name, 0),
                              conv_args=QuantConv2d.conv_args_of(m))
        unet.set_submodule(name, new)
    return unet


def load_quantized(folder, device=None, kernel: str | None = None, verify: bool = True,
                   int8_safe: bool = True):
    """Rebuild a pipeline written by save_quantized, without any float UNet weights.
    The W8A8 path is this machine's (kernels.select_kernel), or `kernel`, and the
    plan is fitted to it as quantize fits it (quantize.fit_plan_to_device).

    Where a W8A8 layer's int8 backend saturates on 8-bit weight codes (oneDNN /
    FBGEMM without VNNI), int8_safe (the default, as for quantize) re-rounds its
    codes to 7 bits (QuantLayer.requantize_weight), which those kernels run
    exactly; the images then differ a little from the export's, and
    `unet.mixdq_state.fitted` says how many layers.  int8_safe=False keeps them,
    on the exact float path, no faster than float: a warning says so."""
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    meta = _read_meta(folder)
    device = torch.device(device) if device is not None else default_device()
    unet_path = folder / UNET_FILE
    if not unet_path.is_file():
        raise ExportError(f"{unet_path} is missing; the export is incomplete, export it again")
    if verify and meta.get("unet_sha256") and _sha256(unet_path) != meta["unet_sha256"]:
        raise ExportError(f"{unet_path} does not match its checksum in mixdq.json: the file is "
                          "corrupted or was changed; export the model again")
    try:
        plan = Plan.load(folder / "plan.json")
    except Exception as e:
        raise ExportError(f"{folder / 'plan.json'}: {e}") from None
    dtype = getattr(torch, meta.get("dtype", "float32"))
    unet = _empty_quantized_unet(folder, plan, dtype, meta.get("bos_aware", True))
    try:
        # clone: fresh, aligned allocations rather than views into the file
        # buffer, so BLAS takes the same code path (and rounding) as before saving
        state = {k: v.clone() for k, v in load_file(str(unet_path), device=str(device)).items()}
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{unet_path} cannot be read ({e}); export the model again") from None
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        raise ExportError(
            f"{unet_path} does not match the plan and config beside it (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}, wrong shape: {bad_shape[:3]}); export the model again")
    unet.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if leftover:
        raise ExportError(f"tensors not in the export: {leftover[:3]}")
    unet.to(device)
    # this machine's path, as quantize would pick it here: the export may come from a
    # GPU (dequant) or a VNNI CPU (int_mm) and be run on anything
    chosen = kernels.select_kernel(device, override=kernel)
    layers = quantized_layers(unet)
    for layer in layers.values():
        layer.kernel = chosen
    fitted, notes = fit_plan_to_device(plan, unet, chosen, int8_safe)
    for name, bits in fitted.items():
        if bits != plan[name]:  # no float weights here: re-round the export's codes
            layers[name].requantize_weight(bits.weight)
    state = QuantState.from_dict(meta)
    state.kernel, state.fitted = chosen, dict(fitted.meta.get("fitted", {}))
    unet.mixdq_state = state
    if not int8_safe:
        for note in notes:
            warnings.warn(f"{folder}: {note}", SlowPathWarning, stacklevel=2)
    pipe = DiffusionPipeline.from_pretrained(folder, unet=unet, dtype=dtype)
    pipe.to(device)
    prepack(pipe.unet)  # after .to(), which gives the layers their codes back
    pipe._mixdq_source = {"source": str(folder), "kind": "mixdq-export", "lora": None}
    return pipe
