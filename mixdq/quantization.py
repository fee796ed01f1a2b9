"""quantize(pipe, plan, calibration): the UNet becomes the quantized one, in place.

    pipe = mixdq.load_pipeline()
    mixdq.quantize(pipe, plan, calibration=mixdq.Calibration.default(pipe))
    image = pipe("a red circle").images[0]

The core is `quantize_unet(unet, plan, ranges, bos=...)`, which works on a bare
UNet (the benchmarks use it); `quantize(pipe, ...)` adds what a pipeline knows:
the BOS embedding from its own text encoders and a calibration run.

Steps: fit the plan to the device (`fit_plan_to_device`), swap each planned layer
for a packed quantized one (the float weight is dropped), calibrate activation
ranges sequentially (or take given ones), make the prepacked int8 copies where a
backend runs on them, and run the attention products in bfloat16 where this CPU
measured that faster (quant/attention.py).  What was done is kept in
`unet.mixdq_state` (QuantState), which an export saves.
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .calibrate import Calibration, bos_embedding, observing, run_pipeline
from .errors import PlanError
from .memory import MB, model_nbytes, prepacked_extra_nbytes, stored_nbytes
from .plan import FLOAT_BITS, LayerBits, Plan
from .quant import (QuantLayer, kernels, layer_spec, prepare, quantizable_layers, quantized_layers, refit_after_steps,
                    replace_layers, shortcut_splits)
from .quant.attention import forced_attention, use_measured_attention
from .quant.fusion import fuse_residuals
from .quant.layout import keep_channels_last
from .quant.backends import PREPACKED
from .quant.quantizers import ActRange

__all__ = ["QuantReport", "QuantState", "quantize", "quantize_unet", "fit_plan_to_device", "current_plan",
           "bos_embedding"]


@dataclass
class QuantState:
    """What quantization did to a UNet beyond the plan its layers hold (`unet.mixdq_state`).

    bos_aware    cross-attention K/V keep token 0 (CLIP's BOS) exact
    kernel       'int_mm' | 'dequant': what the layers' backends were resolved under
                 (an export's is the exporter's; loading resolves its own)
    calibration  the Calibration the ranges came from (None: ranges given)
    fitted       the plan's layers changed for this device by fit_plan_to_device
                 ({"layers": n, "from": "W8A8", "to": "W7A8"}), or {}
    """
    bos_aware: bool
    kernel: str
    calibration: dict | None = None
    fitted: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState":
        return cls(bos_aware=bool(d.get("bos_aware", True)), kernel=d.get("kernel") or "dequant",
                   calibration=d.get("calibration"), fitted=dict(d.get("fitted") or {}))


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
    notes: list[str] = field(default_factory=list)    # what the user should know about speed
    backends: dict = field(default_factory=dict)      # backend -> how many layers it runs
    held_bytes: int = 0                               # what the UNet holds: + prepacked int8 copies
    attention: str = "float"                          # the attention products' dtype: float | bfloat16

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes

    def _held(self) -> str:
        extra = self.held_bytes - self.quantized_bytes
        return f"; held with prepacked copies: {self.held_bytes / MB:.2f} MB" if extra > 0 else ""

    def kernel_times(self) -> str:
        """The measurement behind the backend choice, where the machine made one (a GPU: its
        `times_s` per layer type; a CPU: `linear_s` / `conv_s`, and `attention_s` for the
        attention's dtype), fastest first."""
        times = self.kernel.get("times_s") or {
            k[:-2]: self.kernel[k] for k in ("linear_s", "conv_s", "attention_s")
            if isinstance(self.kernel.get(k), dict)}
        return "; ".join(f"{kind}: " + ", ".join(f"{name} {t * 1e3:.3g} ms" for name, t in
                                                 sorted(paths.items(), key=lambda item: item[1]))
                         for kind, paths in times.items())

    def __str__(self) -> str:
        measured = self.kernel_times()
        return (f"UNet {self.float_bytes / MB:.2f} MB -> {self.quantized_bytes / MB:.2f} MB "
                f"({self.ratio:.3f}x{self._held()}), {self.plan.summary()}, "
                f"backends: {', '.join(f'{k} {v}' for k, v in sorted(self.backends.items()))}, "
                + ("attention in bfloat16, " if self.attention == "bfloat16" else "") +
                f"quantize {self.seconds_quantize:.2f}s + calibrate {self.seconds_calibrate:.2f}s"
                + (f"\nbackends measured here: {measured}" if measured else "")
                + "".join(f"\nnote: {n}" for n in self.notes))


def quantize(pipe, plan: Plan, calibration: Calibration | None = None,
             ranges: dict[str, list[ActRange]] | None = None, *, bos_aware: bool = True,
             kernel: str | None = None, int8_safe: bool = True, progress: bool = True,
             callback=None) -> QuantReport:
    """Quantize pipe.unet per `plan`, in place (see quantize_unet).

    Activation ranges come from `ranges` when given, else from running
    `calibration` (needed whenever the plan quantizes an activation).
    bos_aware: token 0 of the cross-attention K/V from the pipeline's own text
    encoders, exact.
    """
    if quantized_layers(pipe.unet):  # before encoding a prompt with it
        raise PlanError("this UNet is already quantized; load the float model again to re-quantize")
    needs_acts = any(b.act != FLOAT_BITS for b in plan.values())
    if needs_acts and calibration is None and ranges is None:
        raise PlanError("the plan quantizes activations: pass calibration=mixdq.Calibration.default(pipe) "
                        "or precomputed ranges=")
    run = None if not needs_acts or ranges is not None else (
        lambda: run_pipeline(pipe, calibration, progress=progress, callback=callback))
    return quantize_unet(pipe.unet, plan, ranges, bos=bos_embedding(pipe) if bos_aware else None,
                         kernel=kernel, int8_safe=int8_safe, run=run,
                         calibration=calibration.to_dict() if calibration is not None else None)


def quantize_unet(unet: nn.Module, plan: Plan, ranges: dict[str, list[ActRange]] | None = None, *,
                  bos: torch.Tensor | None = None, kernel: str | None = None, int8_safe: bool = True,
                  run: Callable[[], object] | None = None, calibration: dict | None = None) -> QuantReport:
    """Quantize a bare UNet per `plan`, in place: the core of `quantize`.

    ranges: activation ranges per layer (e.g. calibrate.observe_float_ranges), or
    None with `run`, a callable that runs the UNet on calibration inputs: layers
    are then calibrated sequentially, each on its quantized upstream's output.
    bos: the BOS embedding that BOS-aware K/V keep exact (None: not BOS-aware).
    kernel overrides the int8 choice ('int_mm' or 'dequant'); int8_safe as in
    fit_plan_to_device.  calibration: recorded in the state, nothing more.
    """
    if quantized_layers(unet):
        raise PlanError("this UNet is already quantized; load the float model again to re-quantize")
    plan.validate(quantizable_layers(unet))
    needs_acts = any(b.act != FLOAT_BITS for b in plan.values())
    if needs_acts and ranges is None and run is None:
        raise PlanError("the plan quantizes activations: pass ranges= or a calibration run=")
    device = _device_of(unet)
    chosen = kernels.select_kernel(device, override=kernel)
    plan, notes = fit_plan_to_device(plan, unet, chosen, int8_safe)
    float_bytes = model_nbytes(unet)
    t0 = time.perf_counter()
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
            run()
    prepare(unet)
    attention = adjust_to_device(unet, device)
    t2 = time.perf_counter()
    unet.mixdq_state = QuantState(bos_aware=bos is not None, kernel=chosen, calibration=calibration,
                                  fitted=dict(plan.meta.get("fitted", {})))
    counts, backends = {}, {}
    for layer in layers.values():
        counts[str(layer.bits)] = counts.get(str(layer.bits), 0) + 1
        backends[layer.backend] = backends.get(layer.backend, 0) + 1
    extra = prepacked_extra_nbytes(unet)
    if extra:
        low = sum(1 for layer in layers.values() if layer.backend in PREPACKED and layer.weight_bits < 5)
        notes.append(f"{low} 2-4-bit layers run on {'/'.join(sorted(set(backends) & set(PREPACKED)))}, "
                     f"which has no low-bit kernels: they hold int8 copies, {extra / MB:.2f} MB more than "
                     "the plan's packed codes (exports stay packed).")
    report = kernels.kernel_report(device) | {"kernel": chosen}
    if attention == "bfloat16":
        measured = report.get("attention_s") or {}
        why = ("MIXDQ_ATTENTION=bfloat16" if forced_attention() or not measured.get("bfloat16") else
               f"{measured['float32'] / measured['bfloat16']:.1f}x faster than float32 measured here")
        notes.append(f"attention products run in bfloat16 ({why}); MIXDQ_ATTENTION=float keeps them in float32.")
    return QuantReport(plan=plan, float_bytes=float_bytes, quantized_bytes=stored_nbytes(unet),
                       held_bytes=model_nbytes(unet), kernel=report, attention=attention,
                       seconds_quantize=t1 - t0, seconds_calibrate=t2 - t1, bos_aware=bos is not None,
                       calibration=calibration, counts=counts,
                       int8_layers=sum(1 for layer in layers.values() if layer._int_path()),
                       backends=backends, notes=notes)


def adjust_to_device(unet: nn.Module, device) -> str:
    """What a quantized UNet gets on `device`, quantized or loaded alike: its attention
    products' dtype (the measured choice, returned) and, on the CPU, activations kept
    channels_last, residual sums inside the output projections, and prepacked copies
    made again for the input shapes the first step met (layers.refit)."""
    attention = use_measured_attention(unet, device)
    on_cpu = torch.device(device).type == "cpu"
    keep_channels_last(unet, on_cpu)
    fuse_residuals(unet, on_cpu)
    refit_after_steps(unet, on_cpu)
    return attention


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# this plan on this device
# ---------------------------------------------------------------------------
WIDE_INT8 = LayerBits(8, 8)
SAFE_INT8 = LayerBits(7, 8)
SATURATION_REASON = ("the int8 backend chosen on this CPU (no VNNI) saturates on 8-bit weight "
                     "codes (7-bit ones cannot overflow it: machine.SATURATION_FREE_CODE).")


def _layer_op(name: str, module: nn.Module, splits: dict) -> str:
    """The layer type kernels.layer_backend decides for, of a float or quantized layer."""
    if isinstance(module, QuantLayer):
        return module.op
    return "linear" if isinstance(module, nn.Linear) else "split" if name in splits else "conv"


def wide_int8_layers(plan: Plan, kernel: str, unet: nn.Module) -> list[str]:
    """The plan's W8A8 layers that would run the float path on `unet`'s device only
    because their int8 backend saturates on 8-bit codes (machine.saturates), where
    W7A8 codes would run that backend exactly."""
    if kernel != "int_mm":
        return []
    layers, splits, device = quantizable_layers(unet), shortcut_splits(unet), _device_of(unet)
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


def fit_plan_to_device(plan: Plan, unet: nn.Module, kernel: str, int8_safe: bool = True) -> tuple[Plan, list[str]]:
    """(the plan as `unet`'s device runs it, what the user should know about that).

    The one adjustment today: a W8A8 layer whose int8 backend saturates on 8-bit
    codes (oneDNN / FBGEMM without VNNI) becomes W7A8 with int8_safe (same bytes,
    exact on those kernels, about one bit of weight precision less: what oneDNN
    asks for on such CPUs); without, it stays W8A8 on the exact float path.
    Quantizing and loading both call it (`unet`: float or quantized layers).
    """
    wide = wide_int8_layers(plan, kernel, unet)
    if not wide:
        return plan, []
    if not int8_safe:
        return plan, [f"{len(wide)} W8A8 layers run the exact float path, no faster than float: "
                      f"{SATURATION_REASON} int8_safe=True makes them W7A8, exact on the int8 kernels (an "
                      "export's codes are then re-rounded: images differ a little); MIXDQ_INT8_SATURATE=allow "
                      "runs W8 there at a small error."]
    fitted = {"layers": len(wide), "from": str(WIDE_INT8), "to": str(SAFE_INT8)}
    plan = Plan({**plan, **{name: SAFE_INT8 for name in wide}}, meta=plan.meta | {"fitted": fitted})
    return plan, [f"{len(wide)} W8A8 layers were quantized as W7A8 (same bytes, exact on the int8 kernels): "
                  f"{SATURATION_REASON} int8_safe=False (`--keep-w8`) keeps them W8A8, on the float path, "
                  "no faster than float."]


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
