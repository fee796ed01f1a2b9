"""Which INT8 kernel runs W8A8 layers on this device: one small dispatch.

The machines differ (see README): on an EPYC with AVX-512 VNNI `torch._int_mm`
is several times faster than float32 matmul, on an AVX2-only EPYC it is 30-100x
slower while FBGEMM's prepacked int8 linear is about 2x faster than float32.
So the choice is measured once per machine (a ~1 s micro-benchmark, cached on
disk) instead of assumed.  Override with MIXDQ_KERNEL=int_mm|dequant or
`select_kernel(device, override=...)`.

Two levels:
  layer kernel (`select_kernel`, what `layer.kernel` holds)
    int_mm   activations quantized to 8 bits, an integer GEMM / conv against
             the integer weight codes, epilogue s_a * s_w * (acc - z * sum(W)) + b.
    dequant  weights dequantized on the fly, activations fake-quantized, float
             matmul: the reference, and the path every non-8-bit layer takes.
  int8 backend (`linear_backend` / `conv_backend`: which implementation of the
  int_mm path runs, per layer type; see int8_ops.py for each)
    int_mm   torch._int_mm (+ NHWC im2col for convs); no extra memory.
    onednn   oneDNN qlinear / qconv on a prepacked weight copy.
    fbgemm   FBGEMM's float-in/float-out int8 linear on a prepacked copy.
  `consts`: (scale, effective bias) from int8_ops.epilogue_consts, held by
  the caller (e.g. as layer buffers) so that a compiled graph reads them
  instead of recomputing sum_k W per call (the cache is invisible to tracing).
  `key`: the tensor that owns the codes (the layer's packed buffer), under
  which per-weight constants are cached; defaults to weight_q's storage owner.
  The prepacked backends hold a second copy of each 8-bit weight, so they are
  chosen only where the copy-free int_mm is slower than float32 (AVX2-only
  CPUs); MIXDQ_INT8_BACKEND=int_mm|onednn|fbgemm|reference forces one, or
  one per layer type: MIXDQ_INT8_BACKEND=linear=fbgemm,conv=onednn.
  CUDA: int_mm for linears (torch.compile fuses the activation quantization
  and the epilogue into neighbouring kernels); convs keep cuDNN in the model
  dtype on weights dequantized per call (no int8 conv in torch on CUDA).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from . import int8_ops
from .quantizers import fake_quantize_act

KERNELS = ("int_mm", "dequant")
BACKENDS = ("int_mm", "onednn", "fbgemm", "reference")
# bump when _measure_cpu measures something new, so cached choices are redone
_MEASURE_VERSION = 3


def cache_dir() -> Path:
    return Path(os.environ.get("MIXDQ_CACHE", Path.home() / ".cache" / "mixdq"))


def cpu_name() -> str:
    """The CPU model, for every report that states which machine measured it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_id() -> str:
    return f"{cpu_name()}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}"


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
# Without VNNI, x86 int8 GEMMs (FBGEMM, oneDNN) multiply unsigned 8-bit activations
# by signed 8-bit weights with vpmaddubsw, which adds adjacent products into a
# *saturating* int16: 255 * (|w1| + |w2|) must stay <= 32767, true for every pair
# only while |w| <= 64.  Weight codes of <= 7 bits (|w| <= 63) are always exact;
# 8-bit codes (up to 127) are not (measured: 1 % relative error per layer, UNet
# output error 0.14 vs 0.09 with VNNI).  PyTorch's answer is 7-bit activations
# (reduce_range); ours is 7-bit weights: on such CPUs `quantize` stores a plan's
# W8A8 layers as W7A8 (int8_safe), and 8-bit codes that reach them anyway (an
# export, int8_safe=False) run the exact float path unless MIXDQ_INT8_SATURATE=allow
# trades that error for the int8 speed.
SATURATION_FREE_CODE = 64


def vnni() -> bool:
    """Whether this CPU's int8 dot products accumulate straight into int32 (VNNI / AMX).
    Honours an emulated older CPU: ONEDNN_MAX_CPU_ISA=AVX2 (or below) counts as none."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2"):
        return False
    return bool(cpu_flags() & VNNI_FLAGS)


_WIDE_CODES_OK: bool | None = None  # last decision, readable while torch.compile traces


def int8_exact(weight_bits: int, device: torch.device) -> bool:
    """Whether the integer kernels reproduce the fake-quant reference for weight
    codes of `weight_bits` on `device` (see SATURATION_FREE_CODE); called per forward."""
    global _WIDE_CODES_OK
    if device.type != "cpu" or (1 << (weight_bits - 1)) - 1 <= SATURATION_FREE_CODE:
        return True
    if torch.compiler.is_compiling():
        return True if _WIDE_CODES_OK is None else _WIDE_CODES_OK
    _WIDE_CODES_OK = vnni() or os.environ.get("MIXDQ_INT8_SATURATE") == "allow"
    return _WIDE_CODES_OK


def cpu_capability() -> dict:
    """What RESULTS.md records next to every CPU figure."""
    flags = cpu_flags()
    return {"cpu": _cpu_id().split("|")[0], "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_int8": "amx_int8" in flags,
            "avx2": "avx2" in flags, "threads": torch.get_num_threads(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def _time(fn, repeat=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _measure_cpu() -> dict:
    """Time each int8 backend (activation quantization and epilogue included)
    against float32, for a linear and a 3x3 conv of SDXL's 640-channel stage.

    Shapes are kept small enough for ~1 s in all; the backends' relative speed
    is what matters, and it is a property of the instruction set (VNNI or not),
    not of the exact shape.
    """
    torch.manual_seed(0)
    m, k, n = 1024, 640, 640
    x = torch.randn(m, k)
    w = torch.randn(n, k) / k ** 0.5
    ws = w.abs().amax(1) / 127
    wq = torch.round(w / ws[:, None]).to(torch.int8)
    b = torch.zeros(n)
    xs, xz = 8.0 / 255, 128
    lin = {"float32": lambda: F.linear(x, w, b)}
    for be in ("int_mm", "fbgemm", "onednn"):
        lin[be] = (lambda f=int8_ops.LINEAR_BACKENDS[be]: f(x, xs, xz, wq, ws, b))
    c, h = 320, 32
    xc = torch.randn(1, c, h, h)
    wc = torch.randn(c, c, 3, 3) / (9 * c) ** 0.5
    wcs = wc.abs().amax((1, 2, 3)) / 127
    wcq = torch.round(wc / wcs[:, None, None, None]).to(torch.int8)
    conv = {"float32": lambda: F.conv2d(xc, wc, None, 1, 1)}
    for be in ("int_mm", "onednn"):
        conv[be] = (lambda f=int8_ops.CONV_BACKENDS[be]: f(xc, xs, xz, wcq, wcs, None, 1, 1))

    def run(fns):
        out = {}
        for name, fn in fns.items():
            try:
                out[name] = _time(fn, repeat=3)
            except (RuntimeError, NotImplementedError):  # backend missing in this build
                out[name] = float("inf")
        return out

    with torch.inference_mode():
        t_lin, t_conv = run(lin), run(conv)
    int8_ops.clear_cache()

    def pick(times):
        # copy-free int_mm whenever it beats float32; a prepacked backend only
        # where int_mm loses and the prepacked one wins; else float (dequant)
        if times["int_mm"] < times["float32"]:
            return "int_mm"
        rest = {k: v for k, v in times.items() if k not in ("float32", "int_mm")}
        best = min(rest, key=rest.get)
        return best if rest[best] < times["float32"] else None

    lb, cb = pick(t_lin), pick(t_conv)
    return {"float32_s": t_lin["float32"], "int_mm_s": t_lin["int_mm"],
            "linear_s": t_lin, "conv_s": t_conv,
            "linear_backend": lb or "reference", "conv_backend": cb or "reference",
            "kernel": "int_mm" if lb else "dequant", "version": _MEASURE_VERSION,
            "reason": "measured: no VNNI, fastest of float32 / int_mm / prepacked backends"}


def _choose_cpu() -> dict:
    """VNNI (AVX-512 VNNI, AVX-VNNI or AMX): int_mm everywhere, without measuring.

    On these CPUs `_int_mm` was measured 2.8-3.7x faster than float32 per layer
    type, quantization and epilogue included (bench/RESULTS.md); a 1 s
    micro-benchmark on a shared 2-core machine is noisier than that margin (it once ranked float32 first under load), so the
    instruction set decides.  Elsewhere the micro-benchmark does.
    """
    if vnni():
        return {"kernel": "int_mm", "linear_backend": "int_mm", "conv_backend": "int_mm",
                "version": _MEASURE_VERSION, "reason": "VNNI: " + ", ".join(sorted(cpu_flags() & VNNI_FLAGS))}
    return _measure_cpu()


def _cached_choice(key: str, choose) -> dict:
    """choose() once per machine key, remembered in ~/.cache/mixdq/kernels.json."""
    path = cache_dir() / "kernels.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if table.get(key, {}).get("version") != _MEASURE_VERSION:
        table[key] = choose()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs a re-measure next time
    return table[key]


@lru_cache(maxsize=None)
def _cpu_choice() -> dict:
    return _cached_choice(_cpu_id(), _choose_cpu)


def _measure_cuda(index: int) -> dict:
    """int8 GEMM vs dequantize-then-float16 GEMM on the GPU, both from packed weights.

    On an H100 `torch._int_mm` dispatches to Ampere (sm80) int8 kernels and the
    whole W8A8 UNet step ran at 0.69-0.76x of float16 (bench/analysis.md), so
    the compute capability alone does not decide: the faster path is measured.
    Shape: SDXL's most common linear (1280 -> 1280) over 4096 tokens.
    """
    dev = torch.device("cuda", index)
    torch.manual_seed(0)
    m, k, n = 4096, 1280, 1280
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    wq = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    ws = torch.rand(n, device=dev) * 1e-2
    xs = torch.tensor([8.0 / 255], device=dev)
    xz = torch.tensor([128.0], device=dev)

    def int_path():
        return int8_ops.linear_int_mm(x, xs, xz, wq, ws, None)

    def dequant_path():
        return F.linear(fake_quantize_act(x, xs, xz, 8).half(), wq.half() * ws[:, None].half())

    def cuda_time(fn, repeat=20):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / repeat / 1e3

    with torch.inference_mode():
        try:
            t_int = cuda_time(int_path)
        except RuntimeError:
            t_int = float("inf")
        t_deq = cuda_time(dequant_path)
    int8_ops.clear_cache()
    return {"int_mm_s": t_int, "dequant_s": t_deq, "version": _MEASURE_VERSION,
            "kernel": "int_mm" if t_int < t_deq else "dequant",
            "reason": "measured: int8 GEMM vs dequantize + float16 GEMM"}


@lru_cache(maxsize=None)
def _cuda_choice(index: int) -> dict:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:  # no int8 tensor-core GEMM behind torch._int_mm
        return {"kernel": "dequant", "reason": f"sm{major}{minor}: no int8 GEMM"}
    key = f"cuda|{torch.cuda.get_device_name(index)}|torch {torch.__version__}"
    return _cached_choice(key, lambda: _measure_cuda(index))


def select_kernel(device: torch.device | str = "cpu", override: str | None = None) -> str:
    """The W8A8 path for `device`: 'int_mm' or 'dequant'."""
    choice = override or os.environ.get("MIXDQ_KERNEL")
    if choice:
        if choice not in KERNELS:
            raise ValueError(f"unknown kernel {choice!r}; choose one of {KERNELS}")
        return choice
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_choice(device.index if device.index is not None else torch.cuda.current_device())["kernel"]
    if device.type == "cpu":
        return _cpu_choice()["kernel"]
    return "dequant"


def kernel_report(device="cpu") -> dict:
    """What the dispatch decided and why, for logs, the app and RESULTS.md."""
    device = torch.device(device)
    report = {"device": str(device), "kernel": select_kernel(device)}
    if device.type == "cpu":
        report["cpu"] = _cpu_id()
        report.update({k: v for k, v in _cpu_choice().items() if k not in ("kernel", "version")})
        report["linear_backend"] = linear_backend(device)
        report["conv_backend"] = conv_backend(device)
        report["cpu_flags"] = cpu_capability()
    elif device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        report.update({k: v for k, v in _cuda_choice(index).items() if k not in ("kernel", "version")})
    return report


def _backend_override(layer_type: str) -> str | None:
    """MIXDQ_INT8_BACKEND: one backend for both layer types ('onednn'), or one per
    type ('linear=fbgemm,conv=onednn'); unset or 'auto': the measured choice."""
    return _parse_backend_override(os.environ.get("MIXDQ_INT8_BACKEND") or "auto").get(layer_type)


@lru_cache(maxsize=8)
def _parse_backend_override(choice: str) -> dict:
    """{layer type: forced backend} for one MIXDQ_INT8_BACKEND value (read on every
    layer call, so parsed once per value)."""
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


_CHOICE_SEEN: dict | None = None  # last CPU choice, readable while torch.compile traces


def _cpu_choice_traceable() -> dict:
    """_cpu_choice() outside tracing; inside, the choice already made (dynamo
    cannot trace file reads), or int_mm's if none was made yet."""
    global _CHOICE_SEEN
    if torch.compiler.is_compiling():
        return _CHOICE_SEEN or {"linear_backend": "int_mm", "conv_backend": "int_mm"}
    _CHOICE_SEEN = _cpu_choice()
    return _CHOICE_SEEN


def linear_backend(device: torch.device | str = "cpu") -> str:
    """Which int8 implementation runs an int_mm-kernel linear on `device`."""
    if torch.device(device).type == "cuda":
        # no environment lookups while torch.compile traces the layer
        if torch.compiler.is_compiling():
            return "int_mm"
        return "reference" if _backend_override("linear") == "reference" else "int_mm"
    forced = None if torch.compiler.is_compiling() else _backend_override("linear")
    return forced or _cpu_choice_traceable().get("linear_backend", "int_mm")


def conv_backend(device: torch.device | str = "cpu") -> str:
    """Which int8 implementation runs an int_mm-kernel conv on `device`.

    'reference' means: dequantized weights in the float dtype, fake-quantized
    activations (no int8 conv that beats float here, or none at all: CUDA).
    """
    if torch.device(device).type == "cuda":
        if torch.compiler.is_compiling():
            return "reference"
        return "int_mm" if _backend_override("conv") == "int_mm" else "reference"
    forced = None if torch.compiler.is_compiling() else _backend_override("conv")
    if forced in ("fbgemm",):  # FBGEMM has no float-output int8 conv
        forced = None
    return forced or _cpu_choice_traceable().get("conv_backend", "int_mm")


def int8_linear(x: torch.Tensor, act_scale: torch.Tensor, act_zero_point: torch.Tensor,
                weight_q, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, key: torch.Tensor | None = None,
                consts: tuple | None = None) -> torch.Tensor:
    """y = s_a * s_w * (Xq - z) Wq^T + b on integer kernels (see int8_ops).

    weight_q: (N, K) int8 codes of any bit width <= 8, or a zero-argument
    callable returning them (called only by the backends that need them on
    this call; the prepacked ones need them once).  Activation codes live
    in [0, 255]; the int_mm backend shifts codes and zero point by 128 into
    int8 without changing (Xq - z).  Per-weight constants (the zero-point
    correction folded into the bias, prepacked copies) are cached by the tensor
    owning the codes and recomputed when it or the activation range changes.
    """
    be = linear_backend(x.device)
    if be == "int_mm" and not int8_ops.int_mm_ok(x.numel() // x.shape[-1], x.shape[-1], weight_scale.shape[0], x.device):
        be = "reference"
    if be == "reference":
        return int8_ops.linear_reference(x, act_scale, act_zero_point, int8_ops._codes(weight_q), weight_scale, bias)
    if be == "int_mm":
        return int8_ops.linear_int_mm(x, act_scale, act_zero_point, int8_ops._codes(weight_q), weight_scale, bias,
                                      key=key, consts=consts)
    return int8_ops.LINEAR_BACKENDS[be](x, act_scale, act_zero_point, weight_q, weight_scale, bias, key=key)


def conv_usable(x: torch.Tensor, weight_shape: tuple, groups: int = 1) -> bool:
    """Whether int8_conv2d has an integer kernel for this call (else: dequant path)."""
    if groups != 1 or conv_backend(x.device) == "reference":
        return False
    if x.device.type == "cuda":
        k = math.prod(weight_shape[1:])
        return k % 8 == 0 and weight_shape[0] % 8 == 0
    return True


def int8_conv2d(x: torch.Tensor, act_scale: torch.Tensor, act_zero_point: torch.Tensor,
                weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                stride=1, padding=0, dilation=1, groups=1, split: int = 0,
                key: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized conv2d on integer kernels (weight_q: codes or a callable, as in
    int8_linear).  split > 0: input channels [:split]
    and [split:] carry their own activation scale / zero point (act_scale[0/1]);
    only 1x1 stride-1 convs (the up-block shortcut) are split in these UNets."""
    be = conv_backend(x.device)
    if be != "onednn" or split or groups != 1:
        weight_q = int8_ops._codes(weight_q)  # only oneDNN's prepacked copy can go without
    if split:
        k = tuple(weight_q.shape[2:])
        if k != (1, 1) or int8_ops._pair(stride) != (1, 1) or int8_ops._pair(padding) != (0, 0):
            raise ValueError("split activation ranges are supported for 1x1 stride-1 convs only")
        return int8_ops.split_conv1x1_int_mm(x, act_scale, act_zero_point, split, weight_q, weight_scale, bias,
                                             key=key)
    if be == "reference" or groups != 1:
        return int8_ops.conv2d_reference(x, act_scale[0], act_zero_point[0], weight_q, weight_scale, bias,
                                         stride, padding, dilation, groups)
    return int8_ops.CONV_BACKENDS[be](x, act_scale[0], act_zero_point[0], weight_q, weight_scale, bias,
                                      stride, padding, dilation, groups, key=key)
