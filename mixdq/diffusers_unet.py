"""QuantizedUNet2DConditionModel: the UNet of a mixdq export, loadable the diffusers way.

    unet/
      config.json              the architecture, as diffusers writes it (no folder names)
      mixdq.json               format, dtype, BOS flag, kernel (the exporter's: loading picks
                               its own), calibration, checksum and bytes of the weights
      plan.json                the Plan (layer -> bits)
      mixdq_unet.safetensors   packed weights, scales, activation params, float rest

The folder holds all the UNet needs, so it loads alone, as a drop-in for any pipeline of
its architecture:

    import mixdq
    from diffusers import StableDiffusionXLPipeline
    unet = mixdq.QuantizedUNet2DConditionModel.from_pretrained("out/my-model", subfolder="unet")
    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/sdxl-turbo", unet=unet)

and an export's model_index.json names this class, so `DiffusionPipeline.from_pretrained(export)`
builds it once mixdq is imported (diffusers resolves a library outside its own only from the
modules already imported: importing one because a repository names it would run its code).

Loading builds the UNet on the meta device (no float weights are ever materialised), checks
every tensor name, shape and the checksum, then fits it to its device as quantize would:
this machine's kernel (kernels.select_kernel), W8A8 -> W7A8 where the int8 backend saturates
(fit_plan_to_device), prepacked int8 copies.  It loads where mixdq.load_quantized would (the
GPU if there is one) unless told `device=`; moving it (`.to()`, as `pipe.to(...)` does) picks
the new device's kernel.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
# ModelMixin: diffusers' loader finds a component's load method by looking its base
# classes up in the library model_index.json names (mixdq.__getattr__ hands it this one)
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401

from .errors import ExportError, SlowPathWarning
from .defaults import META_FILE, default_device
from .plan import Plan
from .quant import (QuantConv2d, QuantLinear, is_bos_layer, kernels, prepare, quantizable_layers, quantized_layers,
                    shortcut_splits)
from .quantization import QuantState, _device_of, adjust_to_device, current_plan, fit_plan_to_device

FORMAT = "mixdq-export/2"
OLD_FORMAT = "mixdq-export/1"   # the UNet's mixdq.json and plan.json lay at the export's root
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "mixdq_unet.safetensors"
CLASS_NAME = "QuantizedUNet2DConditionModel"
# model_index.json's entry: the package, not the module, so that moving the class inside
# mixdq does not break the exports already written
MODEL_INDEX_ENTRY = ["mixdq", CLASS_NAME]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Where diffusers' and transformers' loaders record the folder a config was read from: on
# this machine, so never written into an export.
FOLDER_KEYS = ("_name_or_path", "name_or_path")


def write_json(path: Path, data: dict) -> None:
    """As diffusers and transformers write their configs (so a rewritten one diffs
    cleanly), without FOLDER_KEYS."""
    data = {k: v for k, v in data.items() if k not in FOLDER_KEYS}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_meta(folder: Path) -> dict:
    """`folder`/mixdq.json, of a format this mixdq reads."""
    path = folder / META_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not a mixdq export (no {META_FILE}); "
                          "export one with mixdq.save_quantized(pipe, folder)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is corrupted ({e}); export the model again") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path} is corrupted (not a JSON object); export the model again")
    if meta.get("format") not in (FORMAT, OLD_FORMAT):
        raise ExportError(f"{folder} has format {meta.get('format')!r}; this mixdq reads {FORMAT!r} and "
                          f"{OLD_FORMAT!r}: load it with the mixdq that wrote it, or export it again")
    return meta


def _unet_files(unet_dir: Path) -> tuple[dict, Path]:
    """(the UNet's mixdq.json, its plan.json's path), in either layout."""
    if (unet_dir / "config.json").is_file():  # a UNet's folder, not an export's root
        if (unet_dir / META_FILE).is_file():
            return read_meta(unet_dir), unet_dir / PLAN_FILE
        root = unet_dir.parent
        meta = read_meta(root) if (root / META_FILE).is_file() else {}
        if meta.get("format") == OLD_FORMAT:
            return meta, root / PLAN_FILE
    raise ExportError(f"{unet_dir} is not the UNet folder of a mixdq export (no config.json and {META_FILE}); "
                      "pass the export's folder with subfolder='unet', or export one with mixdq.save_quantized")


def save_unet(unet, folder: Path) -> dict:
    """Write a quantized UNet (any UNet2DConditionModel with mixdq's layers) to `folder`;
    return what its mixdq.json says."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(unet.to_json_string())  # diffusers' own serialisation of the config
    write_json(folder / "config.json", config | {"_class_name": CLASS_NAME})
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    finally:
        prepare(unet)  # state_dict gave prepacked layers their codes back: drop them again
    current_plan(unet).save(folder / PLAN_FILE)
    quant_state = getattr(unet, "mixdq_state", None)
    meta = quant_state.to_dict() if quant_state is not None else {}
    meta.update(format=FORMAT, dtype=str(unet.dtype).replace("torch.", ""),
                unet_sha256=_sha256(folder / WEIGHTS_FILE), unet_bytes=sum(t.nbytes for t in state.values()))
    write_json(folder / META_FILE, meta)
    return meta


def _one_device(device, device_map) -> torch.device:
    """The device to load onto: `device`, else diffusers' device_map when it names one,
    else mixdq's default (where it will run: the plan is fitted to it there)."""
    if device is None and isinstance(device_map, dict) and set(device_map) == {""}:
        device = device_map[""]   # what DiffusionPipeline.from_pretrained passes a component
    elif device is None:
        device = device_map
    if device is None:
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ExportError(f"device_map={device_map!r}: a mixdq UNet loads whole onto one device; pass "
                          "device_map=None and move it with .to(device), or name one device ('cuda', 'cpu')"
                          ) from None


class QuantizedUNet2DConditionModel(UNet2DConditionModel):
    """A UNet2DConditionModel whose Linear and Conv2d layers are mixdq's quantized ones,
    loaded from an export (see the module docstring).  Use it wherever a
    UNet2DConditionModel goes."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, *, device=None,
                        kernel: str | None = None, verify: bool = True, int8_safe: bool = True,
                        dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None,
                        device_map=None, **_diffusers_loading_kwargs) -> "QuantizedUNet2DConditionModel":
        """Load the UNet folder of a mixdq export (`subfolder`: "unet" under the export).

        device: where it runs (default: the GPU if there is one, else the CPU, as
        mixdq.load_quantized; the plan is fitted to it there, and .to() moving it picks
        the new device's kernel).  kernel, verify, int8_safe: as in mixdq.load_quantized.  dtype is
        the export's (it holds quantized codes of that dtype): another one is refused.
        diffusers' other loading options (low_cpu_mem_usage, variant, ...) have nothing
        to choose here and are ignored."""
        folder = Path(pretrained_model_name_or_path).expanduser()
        folder = folder / subfolder if subfolder else folder
        if not folder.is_dir():
            raise ExportError(f"{folder} is not a folder: a mixdq UNet loads from a local export "
                              "(download a shared one first, e.g. `huggingface-cli download REPO --local-dir DIR`)")
        meta, plan_path = _unet_files(folder)
        stored = getattr(torch, meta.get("dtype", "float32"))
        asked = dtype or torch_dtype
        if asked is not None and asked != stored:
            raise ExportError(f"{folder} holds a {stored} quantized UNet and cannot be loaded as {asked}: "
                              f"load it without dtype (or with {stored}), or quantize a {asked} pipeline "
                              "and export that")
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ExportError(f"{weights} is missing; the export is incomplete, export it again")
        if verify and meta.get("unet_sha256") and _sha256(weights) != meta["unet_sha256"]:
            raise ExportError(f"{weights} does not match its checksum in {META_FILE}: the file is "
                              "corrupted or was changed; export the model again")
        try:
            plan = Plan.load(plan_path)
        except Exception as e:
            raise ExportError(f"{plan_path}: {e}") from None
        device = _one_device(device, device_map)
        unet = cls._skeleton(folder, plan, stored, meta.get("bos_aware", True))
        unet._load_weights(weights, device)
        unet.eval()
        unet.mixdq_state = QuantState.from_dict(meta)
        unet._mixdq_load = {"kernel": kernel, "int8_safe": int8_safe, "source": str(folder)}
        unet._fit_plan(unet._use_this_devices_kernel())
        prepare(unet)  # now, layer by layer: the first call then neither prepacks nor holds two copies
        adjust_to_device(unet, device)
        return unet

    @classmethod
    def _skeleton(cls, folder: Path, plan: Plan, dtype, bos_aware: bool):
        """The UNet on the meta device, quantized layers in place."""
        config = cls.load_config(folder)
        with torch.device("meta"):
            # nn.Module.to: diffusers' own .to() warns about fp32-kept modules (none here)
            unet = torch.nn.Module.to(cls.from_config(config), dtype)
        layers = quantizable_layers(unet)
        try:
            plan.validate(layers)
        except Exception as e:
            raise ExportError(f"plan.json does not match {folder / 'config.json'}: {e}") from None
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

    def _load_weights(self, weights: Path, device: torch.device) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            # clone: fresh, aligned allocations rather than views into the file
            # buffer, so BLAS takes the same code path (and rounding) as before saving
            state = {k: v.clone() for k, v in load_file(str(weights), device=str(device)).items()}
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{weights} cannot be read ({e}); export the model again") from None
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or bad_shape:
            raise ExportError(
                f"{weights} does not match the plan and config beside it (missing: {missing[:3]}, "
                f"unexpected: {unexpected[:3]}, wrong shape: {bad_shape[:3]}); export the model again")
        self.load_state_dict(state, strict=True, assign=True)
        leftover = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if leftover:
            raise ExportError(f"tensors not in the export: {leftover[:3]}")

    def _use_this_devices_kernel(self) -> str:
        """The kernel quantize would pick on the UNet's device (the export may come from a
        GPU, dequant, or a VNNI CPU, int_mm, and run on anything), or the one asked for."""
        chosen = kernels.select_kernel(_device_of(self), override=self._mixdq_load["kernel"])
        for layer in quantized_layers(self).values():
            layer.kernel = chosen
        self.mixdq_state.kernel = chosen
        self._mixdq_load["device"] = _device_of(self)
        return chosen

    def _fit_plan(self, kernel: str) -> None:
        """The plan as this device runs it (quantization.fit_plan_to_device), once, where it is
        loaded: a move never re-rounds codes (a GPU model offloaded to a CPU whose int8
        kernels saturate would lose a bit of every W8A8 layer on its way)."""
        int8_safe, layers = self._mixdq_load["int8_safe"], quantized_layers(self)
        plan = current_plan(self)
        fitted, notes = fit_plan_to_device(plan, self, kernel, int8_safe)
        for name, bits in fitted.items():
            if bits != plan[name]:  # no float weights here: re-round the codes
                layers[name].requantize_weight(bits.weight)
        self.mixdq_state.fitted = dict(fitted.meta.get("fitted", {}))
        if not int8_safe:
            for note in notes:
                warnings.warn(f"{self._mixdq_load['source']}: {note}", SlowPathWarning, stacklevel=3)

    def to(self, *args, **kwargs):
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if (memory_format is None and dtype in (None, self.dtype)
                and (device is None or torch.empty(0, device=device).device == _device_of(self))):
            # already there: nn.Module.to would still give prepacked layers their codes
            # back (QuantLayer._apply), and the next call would prepack them again
            return self
        return super().to(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        load = self.__dict__.get("_mixdq_load")
        if load is not None and _device_of(self) != load["device"]:  # moved (not the skeleton being built)
            self._use_this_devices_kernel()
        return out

    def save_pretrained(self, save_directory, **_diffusers_saving_kwargs) -> None:
        """Write this UNet as an export's unet/ folder (what pipe.save_pretrained calls);
        diffusers' options (safe_serialization, variant, ...) have nothing to choose here."""
        if _diffusers_saving_kwargs.get("push_to_hub"):
            raise ExportError("a mixdq UNet is not pushed from here: save it, then upload the folder "
                              "(`huggingface-cli upload REPO FOLDER`)")
        save_unet(self, Path(save_directory))
