"""Which implementation runs each quantized layer on this device: one dispatch,
resolved once per layer (when it is quantized, loaded or moved), never per call.

Two levels:
  kernel   (`select_kernel`, `layer.kernel`): whether a layer may use int8 kernels
    int_mm   yes (the name of the int8 path; the backend below says which kernel)
    dequant  no: weights dequantized on the fly, activations fake-quantized,
             float matmul (the reference)
  backend  (`layer_backend`, `layer.backend`): what runs the layer, one of
    BACKENDS: the int8 backends of `backends/` (int_mm, onednn, fbgemm, triton,
    triton_fp8), or
    float: the dequant path (activations other than 8 bits, no int8 backend
    faster than float32 here, or codes a backend cannot run exactly)

The CPU's and the GPU's choice per layer type is measured once (machine.py; on the
CPU apart for 2-4-bit codes, which a prepacked copy would widen to a byte per weight;
on CUDA: triton, int_mm or float16 per layer type, triton_fp8 only when forced); the split up-block
shortcut convs (1x1 over concat(hidden, skip), two activation ranges) are two GEMMs
over pixels: they take the linear backend.

Overrides, read when a layer's backend is resolved:
  MIXDQ_KERNEL=int_mm|dequant            the kernel (`quantize(kernel=...)`)
  MIXDQ_INT8_BACKEND=onednn              one backend for every layer type, or one per
  MIXDQ_INT8_BACKEND=linear=fbgemm,conv=onednn   type (auto: the measured choice)
  MIXDQ_INT8_SATURATE=allow              run 8-bit codes on saturating kernels anyway
  MIXDQ_CPU=avx2|avx512_vnni             decide for that CPU kind (machine.py)
  MIXDQ_ATTENTION=bfloat16|float         the attention products' dtype (attention.py)
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import machine
from .backends import PREPACKED, REGISTRY
from .packing import codes_per_byte

KERNELS = ("int_mm", "dequant")
BACKENDS = tuple(REGISTRY) + ("float",)


def select_kernel(device: torch.device | str = "cpu", override: str | None = None) -> str:
    """Whether layers on `device` use int8 kernels ('int_mm') or not ('dequant')."""
    choice = override or os.environ.get("MIXDQ_KERNEL")
    if choice:
        if choice not in KERNELS:
            raise ValueError(f"unknown kernel {choice!r}; choose one of {KERNELS}")
        return choice
    device = torch.device(device)
    if device.type == "cuda":
        return machine.cuda_choice(device)["kernel"]
    if device.type == "cpu":
        choice = machine.cpu_choice()
        return "dequant" if choice["linear_backend"] == choice["conv_backend"] == "float" else "int_mm"
    return "dequant"


# ---------------------------------------------------------------------------
# per-layer resolution
# ---------------------------------------------------------------------------
def _backend_override(layer_type: str) -> str | None:
    """MIXDQ_INT8_BACKEND: one backend for both layer types ('onednn'), or one per
    type ('linear=fbgemm,conv=onednn'); unset or 'auto': the measured choice."""
    return _parse_backend_override(os.environ.get("MIXDQ_INT8_BACKEND") or "auto").get(layer_type)


@lru_cache(maxsize=8)
def _parse_backend_override(choice: str) -> dict:
    """{layer type: forced backend} for one MIXDQ_INT8_BACKEND value."""
    if choice == "auto":
        return {}
    items = choice.split(",")
    per_type = dict(item.split("=", 1) for item in items if "=" in item)
    if not per_type:
        per_type = {"linear": choice, "conv": choice}
    elif set(per_type) - {"linear", "conv"} or len(per_type) != len(items):
        raise ValueError(f"MIXDQ_INT8_BACKEND={choice!r}: write one backend or "
                         "'linear=BACKEND,conv=BACKEND'")
    for forced in per_type.values():
        if forced not in BACKENDS + ("auto",):
            raise ValueError(f"unknown MIXDQ_INT8_BACKEND {forced!r}; choose one of {BACKENDS} or auto")
    return {k: v for k, v in per_type.items() if v != "auto"}


def _wide(weight_bits: int) -> bool:
    """Codes that saturating kernels cannot run exactly (8-bit: |w| up to 127)."""
    return (1 << (weight_bits - 1)) - 1 > machine.SATURATION_FREE_CODE


def layer_backend(op: str, weight_bits: int, act_bits: int, device, kernel: str = "int_mm",
                  weight_shape: tuple = (), groups: int = 1) -> str:
    """What runs a layer of type `op` ('linear', 'conv', or 'split': the shortcut conv
    with two activation ranges) with these bits on `device`: one of BACKENDS.

    The forced backend for the layer's type, else this machine's choice for it: on the
    CPU the measured one for codes of this width (machine.pick_backends; a split 1x1
    conv is two GEMMs over pixels: the linear one),
    on CUDA the GPU's measured one (triton, int_mm, or float: cuDNN / cuBLAS in
    float16 on dequantized weights).  `float` where the backend does not support
    the layer, or saturates on its codes."""
    if kernel != "int_mm" or act_bits != 8 or weight_bits > 8:
        return "float"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return "float"
    kind = "linear" if op == "linear" or (op == "split" and device.type == "cpu") else "conv"

    def supported(backend):
        return backend == "float" or REGISTRY[backend].supports(op, device, weight_shape, groups)

    if device.type == "cuda":
        choice = machine.cuda_choice(device)
        default = choice.get(f"{kind}_backend", "int_mm" if kind == "linear" else "float")
    else:  # packed 2-4-bit codes have their own choice: prepacked copies cost them memory
        default = machine.cpu_choice()[f"packed_{kind}_backend" if codes_per_byte(weight_bits) > 1
                                       else f"{kind}_backend"]
    forced = _backend_override(kind)
    backend = forced if forced and supported(forced) else default  # e.g. FBGEMM forced: it has no conv
    if not supported(backend):
        return "float"
    if _wide(weight_bits) and machine.saturates(backend, kind) and not machine.saturation_allowed():
        return "float"
    return backend


def kernel_report(device="cpu") -> dict:
    """What the dispatch decided and why, for logs, the app and RESULTS.md."""
    device = torch.device(device)
    report = {"device": str(device), "kernel": select_kernel(device)}
    if device.type == "cpu":
        report["cpu"] = machine.cpu_id()
        report.update({k: v for k, v in machine.cpu_choice().items() if k not in ("version",)})
        for kind in ("linear", "conv"):
            report[f"{kind}_backend"] = layer_backend(kind, 7, 8, device)
            report[f"packed_{kind}_backend"] = layer_backend(kind, 4, 8, device)
        report["saturating"] = [be for be in PREPACKED if machine.saturates(be)]
        report["cpu_flags"] = machine.cpu_capability()
    elif device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report.update({k: v for k, v in machine.cuda_choice(device).items() if k not in ("kernel", "version")})
    return report


# ---------------------------------------------------------------------------
# running a layer on its backend
# ---------------------------------------------------------------------------
_RAN: list | None = None  # (layer, backend) per call while `recording()`


class recording:
    """with kernels.recording() as ran: ... -- every quantized layer call appends
    (layer, backend that ran it), for tests and debugging (eager calls only)."""

    def __enter__(self):
        global _RAN
        self.outer, _RAN = _RAN, []
        return _RAN

    def __exit__(self, *exc):
        global _RAN
        _RAN = self.outer


def note_ran(layer, backend: str) -> None:
    if _RAN is not None and not torch.compiler.is_compiling():
        _RAN.append((layer, backend))
