"""quantize(pipe, plan, calibration): the UNet becomes the quantized one, in place.

    pipe = mixdq.load_pipeline()
    mixdq.quantize(pipe, plan, calibration=mixdq.Calibration.default(pipe))
    image = pipe("a red circle").images[0]

Steps: validate the plan, compute the BOS embedding from the pipeline's own
text encoders, swap each planned layer for a packed quantized one (the float
weight is dropped), then calibrate activation ranges sequentially.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .calibrate import Calibration, observing, run_pipeline
from .errors import PlanError
from .memory import MB, model_nbytes, prepacked_extra_nbytes, stored_nbytes
from .plan import FLOAT_BITS, LayerBits, Plan
from .quant import (QuantLayer, kernels, layer_spec, prepack, quantizable_layers, quantized_layers, replace_layers,
                    shortcut_splits)
from .quant.quantizers import ActRange


@dataclass
class QuantReport:
    plan: Plan
    float_bytes: int
    quantized_bytes: int                              # what the plan stores (= layer_costs)
    kernel: dict
    seconds_quantize: float
    seconds_calibrate: float
    bos_aware: bool
    calibration: dict | None = None
    counts: dict = field(default_factory=dict)
    int8_layers: int = 0                              # layers running the integer kernels
    backends: dict = field(default_factory=dict)      # backend -> how many layers it runs
    held_bytes: int = 0                               # what the UNet holds: + prepacked int8 copies
    notes: list[str] = field(default_factory=list)    # what the user should know about speed

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes

    def _held(self) -> str:
        extra = self.held_bytes - self.quantized_bytes
        return f"; held with prepacked copies: {self.held_bytes / MB:.2f} MB" if extra > 0 else ""

    def __str__(self) -> str:
        return (f"UNet {self.float_bytes / MB:.2f} MB -> {self.quantized_bytes / MB:.2f} MB "
                f"({self.ratio:.3f}x{self._held()}), {self.plan.summary()}, "
                f"backends: {', '.join(f'{k} {v}' for k, v in sorted(self.backends.items()))}, "
                f"quantize {self.seconds_quantize:.2f}s + calibrate {self.seconds_calibrate:.2f}s"
                + "".join(f"\nnote: {n}" for n in self.notes))


def bos_embedding(pipe) -> torch.Tensor:
    """Token 0 of the text embedding the UNet sees: the same for every prompt.

    CLIP is causal, so the BOS position attends only to itself; one encode of
    any prompt gives it.  For SDXL it is both encoders' states concatenated.
    """
    with torch.no_grad():
        out = pipe.encode_prompt(prompt="", device=pipe.unet.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    return out[0][0, 0].detach().clone()


def quantize(pipe, plan: Plan, calibration: Calibration | None = None,
             ranges: dict[str, list[ActRange]] | None = None, *, bos_aware: bool = True,
             kernel: str | None = None, int8_safe: bool = True, progress: bool = True,
             callback=None) -> QuantReport:
    """Quantize pipe.unet per `plan`, in place.

    Activation ranges come from `ranges` when given, else from running
    `calibration` (needed whenever the plan quantizes an activation).
    `kernel` overrides the W8A8 path ('int_mm' or 'dequant').
    `int8_safe`: where a W8A8 layer's int8 backend would saturate on 8-bit weight
    codes (oneDNN / FBGEMM on CPUs without VNNI, see `wide_int8_layers`), the layer is
    quantized as W7A8 (same bytes, exact int8 kernels) and the report says so; False
    keeps it W8A8, on the exact float path, no faster than float there.
    Prepacked backends get their int8 copies here, layer by layer (quant.prepack).
    """
    unet = pipe.unet
    if quantized_layers(unet):
        raise PlanError("this UNet is already quantized; load the float model again to re-quantize")
    plan.validate(quantizable_layers(unet))
    needs_acts = any(b.act != FLOAT_BITS for b in plan.values())
    if needs_acts and calibration is None and ranges is None:
        raise PlanError("the plan quantizes activations: pass calibration=mixdq.Calibration.default(pipe) "
                        "or precomputed ranges=")
    chosen = kernels.select_kernel(unet.device, override=kernel)
    plan, wide = int8_safe_plan(plan, chosen, unet, int8_safe)
    float_bytes = model_nbytes(unet)
    t0 = time.perf_counter()
    bos = bos_embedding(pipe) if bos_aware else None
    originals = replace_layers(unet, plan, ranges=ranges, bos_embedding=bos)
    del originals  # the float weights go here
    gc.collect()
    _rehome_tensors(unet)
    layers = quantized_layers(unet)
    for layer in layers.values():
        layer.kernel = chosen
    t1 = time.perf_counter()
    if needs_acts and ranges is None:
        with observing(unet, "quantize"):
            run_pipeline(pipe, calibration, progress=progress, callback=callback)
    prepack(unet)
    t2 = time.perf_counter()
    unet.mixdq_meta = {
        "bos_aware": bos_aware,
        "kernel": chosen,
        "calibration": calibration.to_dict() if calibration is not None else None,
    }
    counts, backends = {}, {}
    for layer in layers.values():
        counts[str(layer.bits)] = counts.get(str(layer.bits), 0) + 1
        backends[layer.backend] = backends.get(layer.backend, 0) + 1
    on_int = [name for name, layer in layers.items() if layer._int_path()]
    notes = []
    if wide and int8_safe:
        notes.append(f"{len(wide)} W8A8 layers were quantized as W7A8 (same bytes, exact on the int8 "
                     f"kernels): {SATURATION_REASON} int8_safe=False (`--keep-w8`) keeps them W8A8, on "
                     "the float path, no faster than float.")
    elif wide:
        notes.append(f"{len(wide)} W8A8 layers run the exact float path, no faster than float: "
                     f"{SATURATION_REASON} int8_safe=True (the default: drop `--keep-w8`) quantizes them "
                     "as W7A8, exact on the int8 kernels; MIXDQ_INT8_SATURATE=allow runs W8 there at a "
                     "small error.")
    extra = prepacked_extra_nbytes(unet)
    if extra:
        low = sum(1 for layer in layers.values() if layer.backend in kernels.PREPACKED and layer.weight_bits < 5)
        notes.append(f"{low} 2-4-bit layers run on {'/'.join(sorted(set(backends) & set(kernels.PREPACKED)))}, "
                     f"which has no low-bit kernels: they hold int8 copies, {extra / MB:.2f} MB more than "
                     "the plan's packed codes (exports stay packed).")
    return QuantReport(plan=plan, float_bytes=float_bytes, quantized_bytes=stored_nbytes(unet),
                       held_bytes=model_nbytes(unet),
                       kernel=kernels.kernel_report(unet.device) | {"kernel": chosen},
                       seconds_quantize=t1 - t0, seconds_calibrate=t2 - t1, bos_aware=bos_aware,
                       calibration=unet.mixdq_meta["calibration"], counts=counts,
                       int8_layers=len(on_int), backends=backends, notes=notes)


WIDE_INT8 = LayerBits(8, 8)
SATURATION_REASON = ("the int8 backend chosen on this CPU (no VNNI) saturates on 8-bit weight "
                     "codes (7-bit ones cannot overflow it: kernels.SATURATION_FREE_CODE).")


def _layer_op(name: str, module: nn.Module, splits: dict) -> str:
    """The layer type kernels.layer_backend decides for, of a float or quantized layer."""
    if isinstance(module, QuantLayer):
        return module.op
    return "linear" if isinstance(module, nn.Linear) else "split" if name in splits else "conv"


def wide_int8_layers(plan: Plan, kernel: str, unet: nn.Module) -> list[str]:
    """The plan's W8A8 layers that would run the float path on `unet`'s device only
    because their int8 backend saturates on 8-bit codes (kernels.saturates), where
    W7A8 codes would run that backend exactly."""
    if kernel != "int_mm":
        return []
    layers, splits = quantizable_layers(unet), shortcut_splits(unet)
    device = next(iter(unet.parameters()), next(iter(unet.buffers()), torch.empty(0))).device
    wide = []
    for name, bits in plan.items():
        if bits != WIDE_INT8:
            continue
        module = layers[name]
        op, shape, groups = _layer_op(name, module, splits), layer_spec(module)[0], getattr(module, "groups", 1)
        if (kernels.layer_backend(op, 8, 8, device, kernel, shape, groups) == "float"
                and kernels.layer_backend(op, 7, 8, device, kernel, shape, groups) != "float"):
            wide.append(name)
    return wide


def int8_safe_plan(plan: Plan, kernel: str, unet: nn.Module, int8_safe: bool = True) -> tuple[Plan, list[str]]:
    """(the plan quantize builds, the plan's wide_int8_layers): with int8_safe those
    layers become W7A8, which their int8 backend runs exactly in the same bytes."""
    wide = wide_int8_layers(plan, kernel, unet)
    if wide and int8_safe:
        plan = Plan({**plan, **{name: LayerBits(7, 8) for name in wide}},
                    meta=plan.meta | {"int8_safe": {"layers": len(wide), "from": "W8A8", "to": "W7A8"}})
    return plan, wide


def _rehome_tensors(unet) -> None:
    """Give every tensor of the UNet its own fresh allocation.

    Weights loaded by diffusers can be views into a file buffer at any
    alignment, and BLAS picks a different code path (so rounds differently) for
    unaligned data.  An exported model is loaded into fresh allocations; doing
    the same here is what makes a reloaded model generate bit-identical images.
    """
    with torch.no_grad():
        for tensor in list(unet.parameters()) + list(unet.buffers()):
            if tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def current_plan(unet) -> Plan:
    """The plan a (possibly) quantized UNet runs: read off its layers."""
    return Plan({name: layer.bits for name, layer in quantized_layers(unet).items()})
