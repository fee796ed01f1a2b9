"""The machine: which CPU kind mixdq decides for, what the int8 backends measure
here (once, cached on disk), and which of them saturate on 8-bit codes.

The machines differ (see README): on an EPYC with AVX-512 VNNI `torch._int_mm`
is several times faster than float32 matmul; on an AVX2-only EPYC it is 30-100x
slower, while oneDNN's and FBGEMM's prepacked int8 kernels are about 2x faster
than float32; on a Xeon with AMX oneDNN's are twice as fast as `torch._int_mm`.
So the choice is measured once per machine and thread count (a micro-benchmark of
well under a second, cached in ~/.cache/mixdq) and made by `pick_backends`; the same measurement
times attention in float32 and bfloat16 for `pick_attention` (attention.py).

MIXDQ_CPU=avx2|avx512_vnni makes the library decide for that kind of CPU instead
of the detected one (tests and CI use it to check one kind's decisions on the other).

Saturation.  Without VNNI, x86 u8 x s8 int8 kernels (oneDNN, FBGEMM) add pairs of
products in a saturating int16 (vpmaddubsw): 255 * (|w1| + |w2|) <= 32767 holds for
every pair only while |w| <= 64.  Weight codes of <= 7 bits (|w| <= 63) are exact;
8-bit codes (up to 127) are not.  `torch._int_mm` was exact on a real AVX2 EPYC
(slow, but exact), and saturates where oneDNN is capped to AVX2 on a VNNI host.
So `quantize` stores a plan's W8A8 layers that would run on a saturating backend
as W7A8 (quantization.fit_plan_to_device), and 8-bit codes that reach such a backend
anyway (an export kept 8-bit) run the float path.  What saturates is probed once
per process on the host's own kernels (`probe_saturates`), except that without
VNNI the prepacked backends are taken to saturate without asking.
"""
from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .backends import CONV_KERNELS, LINEAR_KERNELS, PREPACKED, REGISTRY, conv_codes_as_held
from .backends.int_mm import linear_int_mm
from .backends.onednn import conv2d_onednn
from .quantizers import fake_quantize_act

CPU_KINDS = ("avx2", "avx512_vnni")
# bump when _time_backends measures or pick_backends decides anew, so cached choices are redone
_MEASURE_VERSION = 9


def cache_dir() -> Path:
    return Path(os.environ.get("MIXDQ_CACHE", Path.home() / ".cache" / "mixdq"))


@lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model, for every report that states which machine measured it (read
    once: every layer's backend resolution asks for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def detected_cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo lists: what the host really has."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}

SATURATION_FREE_CODE = 64  # the largest |weight code| saturating u8 x s8 kernels run exactly


def pinned_cpu_kind() -> str | None:
    """MIXDQ_CPU, validated: the CPU kind to decide for instead of the detected one."""
    kind = os.environ.get("MIXDQ_CPU", "").strip().lower()
    if not kind:
        return None
    if kind not in CPU_KINDS:
        raise ValueError(f"MIXDQ_CPU={kind!r} is not a CPU kind mixdq knows; set one of {CPU_KINDS} "
                         "or unset it to use the detected CPU")
    return kind


def cpu_flags() -> frozenset[str]:
    """The flags the library decides by: the detected ones, or MIXDQ_CPU's kind."""
    flags, kind = detected_cpu_flags(), pinned_cpu_kind()
    if kind == "avx2":
        return frozenset(f for f in flags if f not in VNNI_FLAGS and not f.startswith(("avx512", "amx")))
    if kind == "avx512_vnni":
        return flags | {"avx2", "avx512f", "avx512_vnni"}
    return flags


def vnni() -> bool:
    """Whether this CPU's int8 dot products accumulate straight into int32 (VNNI / AMX)."""
    return bool(cpu_flags() & VNNI_FLAGS)


def cpu_kind() -> str:
    """The CPU kind the library decides for (MIXDQ_CPU, else the detected one)."""
    return pinned_cpu_kind() or ("avx512_vnni" if vnni() else "avx2")


def cpu_id() -> str:
    """What a measured choice is valid for: the CPU, the kind decided for, the
    instruction-set caps of the kernel libraries (an emulated older CPU) and torch's
    thread count (the backends scale differently with threads, so the ranking at one
    count says little about another)."""
    caps = ",".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS",
                                                     "ATEN_CPU_CAPABILITY") if os.environ.get(k))
    return (f"{cpu_name()}|{torch.backends.cpu.get_cpu_capability()}|{cpu_kind()}|{caps}"
            f"|torch {torch.__version__}|threads {torch.get_num_threads()}")


def cpu_capability() -> dict:
    """What RESULTS.md records next to every CPU figure."""
    flags = detected_cpu_flags()
    return {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_int8": "amx_int8" in flags,
            "avx2": "avx2" in flags, "threads": torch.get_num_threads(),
            "decided_for": cpu_kind(), "pinned": pinned_cpu_kind(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


# ---------------------------------------------------------------------------
# saturation: which backends run 8-bit weight codes exactly here
# ---------------------------------------------------------------------------
def saturates(backend: str, op: str = "linear") -> bool:
    """Whether `backend`'s int8 kernels lose precision on 8-bit weight codes here (see
    the module doc): the prepacked ones wherever the CPU (or MIXDQ_CPU) has no VNNI;
    any int8 backend whose one-off probe saturates (a capped oneDNN, which
    `torch._int_mm` also runs on, does on any CPU); float never."""
    if backend == "float" or getattr(REGISTRY.get(backend), "NEVER_SATURATES", False):
        return False
    if backend in PREPACKED and not vnni():
        return True
    return probe_saturates(backend, op)


@lru_cache(maxsize=None)
def probe_saturates(backend: str, op: str = "linear") -> bool:
    """What the host's kernels really do, whatever MIXDQ_CPU says: run the backend once
    on codes that overflow a saturating int16 pair sum (255 * 127 * 2 > 32767) and
    see whether it returns the exact sum."""
    if not built(backend, op):
        return True  # missing in this build: never chosen anyway
    k = 64
    w = torch.full((16, k), 127, dtype=torch.int8)
    ws = torch.ones(16)
    x = torch.full((16, k), 255.0)
    try:
        with torch.no_grad():
            if op == "conv" and backend == "onednn":
                y = conv2d_onednn(torch.full((1, k, 4, 4), 255.0), 1.0, 0, w.reshape(16, k, 1, 1), ws)
            else:
                y = LINEAR_KERNELS[backend](x, 1.0, 0, w, ws)
    except (RuntimeError, NotImplementedError):
        return True  # missing in this build: never chosen anyway
    return not torch.allclose(y.double(), torch.full_like(y.double(), 255.0 * 127 * k), rtol=1e-6)


def saturation_allowed() -> bool:
    return os.environ.get("MIXDQ_INT8_SATURATE") == "allow"


# ---------------------------------------------------------------------------
# the measured choice per machine
# ---------------------------------------------------------------------------
# The probes and measurements here leave the backends' caches alone: their own
# tensors' entries go with the tensors (weakly keyed), while clearing the caches
# would drop the prepacked copies of every layer already quantized (asked about
# saturation after quantize, the first step re-prepacked all of SDXL's).
def interleaved_times(fns: dict, rounds: int, budget_s: float | None = None) -> dict:
    """{name: seconds of each timed call}: one warm-up call of each fn (caches, prepacked
    weights), then `rounds` rounds in which the fns take turns (a burst of load on a
    shared machine slows them all, not one), or at least 3 once `budget_s` is spent.
    A fn that is None (missing from this torch build) or fails its warm-up gets no entry."""
    times = {}
    for name, fn in fns.items():
        if fn is None:
            continue
        try:
            fn()
            times[name] = []
        except (RuntimeError, NotImplementedError):
            pass
    end = None if budget_s is None else time.perf_counter() + budget_s
    for r in range(rounds):
        for name, runs in times.items():
            t = time.perf_counter()
            fns[name]()
            runs.append(time.perf_counter() - t)
        if end is not None and r >= 2 and time.perf_counter() > end:
            break
    return times


def _fastest(fns: dict, rounds: int = 7) -> dict:
    """Seconds of each fn's fastest call (interleaved_times); inf where it has none."""
    times = interleaved_times(fns, rounds)
    return {name: min(times[name]) if times.get(name) else float("inf") for name in fns}


def built(backend: str, op: str = "linear") -> bool:
    """Whether this torch build has `backend`'s CPU kernels for `op` (FBGEMM is x86-only,
    oneDNN's int8 ops come only with builds that include oneDNN: calling a missing one
    raises AttributeError, which the measurement must not meet)."""
    return REGISTRY[backend].supports(op, "cpu")


def _time_backends() -> dict:
    """Seconds per call of each int8 backend (activation quantization and epilogue
    included) and of float32, for a linear and a 3x3 conv of SDXL's 640-channel stage:
    {"linear_s": {...}, "conv_s": {...}}.

    Shapes are kept small enough for well under 1 s in all: the ranking follows the
    instruction set (VNNI, AMX or neither) far more than the shape, though not wholly
    (wider outputs favour the prepacked backends, 1x1 convs int_mm), so one common
    shape per layer type decides and PREPACK_MARGIN keeps a near tie copy-free.  The
    weight codes are 7-bit: what the saturating backends would run.
    """
    torch.manual_seed(0)
    m, k, n = 1024, 640, 640
    x = torch.randn(m, k)
    w = torch.randn(n, k) / k ** 0.5
    ws = w.abs().amax(1) / 63
    wq = torch.round(w / ws[:, None]).to(torch.int8)
    b = torch.zeros(n)
    xs, xz = 8.0 / 255, 128
    lin = {"float32": lambda: F.linear(x, w, b)}
    for be in ("int_mm", "fbgemm", "onednn"):
        lin[be] = (lambda f=LINEAR_KERNELS[be]: f(x, xs, xz, wq, ws, b)) if built(be, "linear") else None
    c, h = 320, 32
    xc = torch.randn(1, c, h, h)
    wc = torch.randn(c, c, 3, 3) / (9 * c) ** 0.5
    wcs = wc.abs().amax((1, 2, 3)) / 63
    wcq = torch.round(wc / wcs[:, None, None, None]).to(torch.int8)
    conv = {"float32": lambda: F.conv2d(xc, wc, None, 1, 1)}
    for be in ("int_mm", "onednn"):
        held = conv_codes_as_held(be, wcq, 8)
        conv[be] = (lambda f=CONV_KERNELS[be], w=held: f(xc, xs, xz, w, wcs, None, 1, 1)) if built(be, "conv") else None

    with torch.inference_mode():
        t_lin, t_conv = _fastest(lin), _fastest(conv)
    return {"linear_s": t_lin, "conv_s": t_conv}


# A prepacked backend (oneDNN, FBGEMM) replaces copy-free int_mm only where its layer
# call is at least this much faster: a prepack costs quantize time (it about doubles
# an SDXL-Turbo W8A8 quantization), and a gain on single layers shrinks over a whole
# step.  Over the float path any gain counts.
PREPACK_MARGIN = 1.25


def pick_backends(times: dict, vnni: bool) -> dict:
    """Each layer type's backend from measured `times` ({"linear_s": {name: s}, ...}):
    `{kind}_backend` for codes held one per byte (5-8 bits), `packed_{kind}_backend`
    for 2-4-bit codes packed several per byte.

    The copy-free choice first: int_mm on a VNNI CPU (AVX-512 VNNI, AVX-VNNI, AMX),
    where it is several times faster than float32 by instruction set (a noisy 1 s
    measurement once ranked float32 first under load, so it is not asked), elsewhere
    int_mm only where it measured faster than float32, else the float path.  Then a
    prepacked backend where it beats that choice (by PREPACK_MARGIN over int_mm).
    Packed codes keep the copy-free choice wherever it is int_mm: a prepacked backend
    would hold one byte per weight, two to four times what the plan stores; only where
    the copy-free choice is the float path do they take the prepacked one too."""
    out = {}
    for kind in ("linear", "conv"):
        t = times[f"{kind}_s"]
        copy_free = "int_mm" if vnni or t["int_mm"] < t["float32"] else "float"
        bar = t["int_mm"] / PREPACK_MARGIN if copy_free == "int_mm" else t["float32"]
        prepacked = {b: s for b, s in t.items() if b in PREPACKED and s < bar}
        out[f"{kind}_backend"] = min(prepacked, key=prepacked.get) if prepacked else copy_free
        out[f"packed_{kind}_backend"] = copy_free if copy_free == "int_mm" else out[f"{kind}_backend"]
    return out


def _time_attention() -> dict:
    """Seconds per call of a scaled dot product attention over 1024 tokens (SDXL's
    32x32 stage at 512 px; 5 heads of 64 to keep it short) in float32 and in bfloat16
    (the casts to and from float32 included: what attention.CpuAttention runs in bfloat16)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 1024, 64) for _ in range(3))
    with torch.inference_mode():
        return _fastest({
            "float32": lambda: F.scaled_dot_product_attention(q, k, v),
            "bfloat16": lambda: F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float(),
        }, rounds=5)


# bfloat16 attention only where it is this much faster: it rounds Q, K and V to 8
# mantissa bits, which is worth a clear gain only
ATTENTION_MARGIN = 1.25


def pick_attention(times: dict) -> str:
    """'bfloat16' where its measured attention is ATTENTION_MARGIN faster than float32, else 'float'."""
    return "bfloat16" if times["bfloat16"] * ATTENTION_MARGIN < times["float32"] else "float"


def _choose_cpu() -> dict:
    """This machine's measured choice (pick_backends over _time_backends, pick_attention
    over _time_attention)."""
    times = _time_backends()
    attention = _time_attention()
    flags = sorted(cpu_flags() & VNNI_FLAGS)
    return {**times, **pick_backends(times, bool(flags)), "attention_s": attention,
            "attention": pick_attention(attention), "version": _MEASURE_VERSION,
            "reason": ("VNNI (" + ", ".join(flags) + "): int_mm, or a prepacked backend "
                       f"{PREPACK_MARGIN}x faster than it" if flags else
                       "no VNNI: fastest of float32 / int_mm / prepacked backends")}


def _cached_choice(key: str, choose, version: int = _MEASURE_VERSION) -> dict:
    """choose() once per machine key, remembered in ~/.cache/mixdq/kernels.json."""
    path = cache_dir() / "kernels.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if table.get(key, {}).get("version") != version:
        table[key] = choose()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs a re-measure next time
    return table[key]


_CPU_CHOICES: dict[tuple, dict] = {}


def cpu_choice() -> dict:
    """This machine's measured choice, once per process and machine key."""
    key = (cpu_id(), str(cache_dir()))
    if key not in _CPU_CHOICES:
        _CPU_CHOICES[key] = _cached_choice(key[0], _choose_cpu)
    return _CPU_CHOICES[key]


# bump when _measure_cuda measures something new (the CUDA keys are apart from the CPU's)
_CUDA_MEASURE_VERSION = 3
# the shape classes measured on CUDA, one per layer type the dispatch decides for:
# SDXL's most common linear (1280 -> 1280 over the 4096 tokens of 1024 px) and a
# 640-channel 3x3 conv of its 64x64 stage (1024 px)
CUDA_LINEAR_SHAPE = (4096, 1280, 1280)
CUDA_CONV_SHAPE = (640, 640, 64)


def _cuda_time(fn, device, repeat=20) -> float:
    """Seconds per call (CUDA events; the first calls compile and fill caches)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeat / 1e3


def _cuda_candidates(dev) -> dict:
    """{layer type: {path: zero-argument call}}: the float16 dequant path (what the
    'float' backend runs) against every int8 backend that applies on this GPU."""
    torch.manual_seed(0)
    m, k, n = CUDA_LINEAR_SHAPE
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    wq = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    ws = torch.rand(n, device=dev) * 1e-2
    xs = torch.tensor([8.0 / 255], device=dev)
    xz = torch.tensor([128.0], device=dev)
    # the float path as layers run it: one-entry act_scale for the int8 kernels, its 0-d
    # element for fake quantization (which then stays in float16; the 1-d tensor would
    # promote the activation to float32 and back, twice the traffic the layer has)
    s0, z0 = xs[0], xz[0]
    lin = {"float16": lambda: F.linear(fake_quantize_act(x, s0, z0, 8), wq.half() * ws[:, None].half()),
           "int_mm": lambda: linear_int_mm(x, xs, xz, wq, ws, None)}
    c, o, h = CUDA_CONV_SHAPE
    xc = torch.randn(1, c, h, h, device=dev, dtype=torch.float16)
    wc = torch.randint(-127, 128, (o, c, 3, 3), device=dev, dtype=torch.int8)
    wcs = torch.rand(o, device=dev) * 1e-2
    conv = {"float16": lambda: F.conv2d(fake_quantize_act(xc, s0, z0, 8),
                                        wc.half() * wcs[:, None, None, None].half(), None, 1, 1)}
    for name in ("triton", "triton_fp8"):
        be = REGISTRY[name]
        if be.supports("linear", dev):
            fp8 = name == "triton_fp8"
            lin[name] = (lambda fp8=fp8: REGISTRY["triton"].linear_triton(x, xs, xz, wq, ws, None, fp8=fp8))
            conv[name] = (lambda fp8=fp8: REGISTRY["triton"].conv2d_triton(xc, xs, xz, wc, wcs, None, 1, 1,
                                                                            fp8=fp8))
    if "triton" in lin:
        # the kernel alone on codes made beforehand: what a compiled layer runs once inductor
        # has fused the quantization into the producing op (triton_cuda.act_quant_mode)
        t = REGISTRY["triton"]
        xq, xcq = t.act_codes(x, s0, z0, False), t.act_codes(xc, s0, z0, False)
        lin["triton_codes"] = lambda: t.linear_triton(xq, xs, xz, wq, ws, None, act_quant="codes",
                                                      out_dtype=torch.float16)
        conv["triton_codes"] = lambda: t.conv2d_triton(xcq, xs, xz, wc, wcs, None, 1, 1, act_quant="codes",
                                                       out_dtype=torch.float16)
    return {"linear": lin, "conv": conv}


def _measure_cuda(index: int) -> dict:
    """Each layer type's int8 backends against dequantize-then-float16, on this GPU.

    On an H100 `torch._int_mm` dispatches to Ampere (sm80) int8 kernels and the
    whole W8A8 UNet step ran at 0.69-0.76x of float16 (bench/analysis.md), so
    the compute capability alone does not decide: the faster path is measured, per
    layer type (CUDA_LINEAR_SHAPE, CUDA_CONV_SHAPE).  Timed for the record but never
    chosen (RECORD_ONLY): triton_fp8, which computes another function (triton_fp8.py),
    and triton_codes, the kernel without the activation's quantization (what compiled
    layers run, their quantization fused elsewhere), which no eager layer runs.
    """
    dev = torch.device("cuda", index)
    times = {}
    with torch.inference_mode():
        for kind, paths in _cuda_candidates(dev).items():
            times[kind] = {}
            for name, fn in paths.items():
                try:
                    times[kind][name] = _cuda_time(fn, dev)
                except Exception:  # noqa: BLE001 - a kernel that fails to build or run loses
                    times[kind][name] = float("inf")
    return _pick_cuda(times)


RECORD_ONLY = ("triton_fp8", "triton_codes")


def _pick_cuda(times: dict) -> dict:
    """The choice from {layer type: {path: seconds}}: per type the fastest path that
    computes the W8A8 function as an eager layer runs it ('float16' = the float backend;
    RECORD_ONLY excluded)."""
    choice = {}
    for kind, t in times.items():
        exact = {k: v for k, v in t.items() if k not in RECORD_ONLY}
        best = min(exact, key=exact.get)
        choice[f"{kind}_backend"] = "float" if best == "float16" else best
    int8 = any(v != "float" for v in choice.values())
    return {**choice, "times_s": times, "version": _CUDA_MEASURE_VERSION,
            "kernel": "int_mm" if int8 else "dequant",
            "reason": "measured per layer type: int8 backends vs dequantize + float16"}


def cuda_choice(device) -> dict:
    """This GPU's measured int8 choice (kernel, backend per layer type, times), once
    per process and GPU (and once per GPU, torch and triton version on disk)."""
    device = torch.device(device)
    return _cuda_choice(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_choice(index: int) -> dict:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:  # no int8 tensor-core GEMM behind torch._int_mm
        return {"kernel": "dequant", "linear_backend": "float", "conv_backend": "float",
                "reason": f"sm{major}{minor}: no int8 GEMM"}
    triton_version = "none"
    if REGISTRY["triton"].available():
        import triton

        triton_version = triton.__version__
    key = f"cuda|{torch.cuda.get_device_name(index)}|torch {torch.__version__}|triton {triton_version}"
    return _cached_choice(key, lambda: _measure_cuda(index), _CUDA_MEASURE_VERSION)
