"""What the int8 backends share: activation quantization, per-weight constants cached
by the tensor owning the codes, the epilogue, and the bookkeeping of prepacked copies.

Every kernel computes the same function as the fake-quant reference (reference.py)

    y = (s_a * (Xq - z)) @ (s_w * Wq)^T + b        (conv: the same over patches)

with Xq = clamp(round(x / s_a) + z, 0, 255) (asymmetric uint8 activations, one
scale / zero point per tensor) and Wq integer codes (int8 tensor, symmetric per
output channel, any bit width <= 8), and is tested against it
(tests/test_int8_ops.py).

Activation quantization on the CPU uses `torch.quantize_per_tensor` (one
vectorised pass, ~10x faster than round/clamp/cast as separate ops) and
reinterprets the quantized tensor's bytes as a plain int8/uint8 tensor: no copy.
On CUDA (and when compiling) the arithmetic form is used, which inductor fuses
into the neighbouring ops.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..packing import unpack

# torch.quantize_per_tensor warns that quantized dtypes are deprecated; the op
# still runs and is the fastest quantizer on CPU.  Silence exactly that warning.
warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")

QMIN_U8, QMAX_U8 = 0, 255
SHIFT = 128  # uint8 code - 128 = int8 code; zero point shifts alike


# ---------------------------------------------------------------------------
# activation quantization
# ---------------------------------------------------------------------------
def _plain(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of quantized tensor q as a plain tensor of `dtype` (no copy)."""
    out = torch.empty((0,), dtype=dtype, device=q.device)
    out.set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
    return out


def _fast_cpu_quant_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling() and hasattr(torch, "quantize_per_tensor"))


def quantize_act(x: torch.Tensor, scale, zero_point, signed: bool = True) -> torch.Tensor:
    """Asymmetric 8-bit codes of x: uint8 in [0, 255], or (signed) those minus 128 as int8.

    scale / zero_point: Python numbers or 0-d/1-element tensors (zero_point in
    the uint8 convention either way).
    """
    if _fast_cpu_quant_ok(x):
        s = float(scale)
        z = int(round(float(zero_point)))
        # a channels_last input (the output of oneDNN's convs) stays so: making it
        # contiguous is a transposing copy that costs many times the quantization, and
        # oneDNN's conv runs faster on channels_last codes than on NCHW ones
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        try:
            if signed:
                return _plain(torch.quantize_per_tensor(x, s, z - SHIFT, torch.qint8), torch.int8)
            return _plain(torch.quantize_per_tensor(x, s, z, torch.quint8), torch.uint8)
        except (RuntimeError, NotImplementedError):
            pass  # an op removed in a later torch: fall through to the arithmetic form
    q = torch.clamp(torch.round(x / scale) + zero_point, QMIN_U8, QMAX_U8)
    if signed:
        return (q - SHIFT).to(torch.int8)
    return q.to(torch.uint8)


# ---------------------------------------------------------------------------
# working buffers reused from call to call
# ---------------------------------------------------------------------------
class _Scratch:
    """Reusable CPU buffers, one per thread and purpose, for what a layer call makes
    and drops: the float weight the dequant path computes on the fly, and on
    `int_mm` the patches, the reordered conv weight and the int32 accumulator.

    Fresh buffers that size cost twice.  glibc serves allocations above its mmap
    threshold straight from the kernel (page faults on every call: writing SDXL's
    1280-channel 3x3 conv weight into a reused buffer took its float path from 147
    to 117 ms); and below it, after it has risen (up to 32 MiB), from the heap,
    where buffers of ever-changing sizes interleaved with the step's longer-lived
    activations leave holes that stay resident.  Each buffer holds the largest size
    seen: working memory like an activation, not a held weight.  Callers use one
    only within a call and never return it (or a view of it).

    Only the `THREADS` threads that used them last keep theirs: a server runs each
    request on whichever thread of its pool is free, and buffers per thread would
    otherwise pile up.  Dropping them is safe while a call of that thread still
    uses one: its view keeps the memory until the call returns."""

    THREADS = 2

    def __init__(self):
        self._lock = threading.Lock()
        self._by_thread: OrderedDict[int, dict] = OrderedDict()

    def buffers(self) -> dict:
        """{(purpose, dtype): buffer} of the calling thread."""
        tid = threading.get_ident()
        with self._lock:
            mine = self._by_thread.pop(tid, None)
            self._by_thread[tid] = mine = {} if mine is None else mine
            while len(self._by_thread) > self.THREADS:
                self._by_thread.popitem(last=False)
        return mine

    def clear(self) -> None:
        with self._lock:
            self._by_thread.clear()

    def get(self, purpose: str, shape, dtype) -> torch.Tensor:
        numel = math.prod(shape)
        mine = self.buffers()
        buf = mine.get((purpose, dtype))
        if buf is None or buf.numel() < numel:
            mine.pop((purpose, dtype), None)  # free the old one before the new exists
            # a normal tensor even when first made under inference_mode, so that
            # calls outside it may write into it too
            with torch.inference_mode(False):
                buf = mine[(purpose, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def scratch_ok(t: torch.Tensor) -> bool:
    """Whether a call on t uses the reusable buffers: CPU eager calls (CUDA's caching
    allocator already reuses memory, and a traced graph plans its own)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def scratch(purpose: str, shape, dtype) -> torch.Tensor:
    """This thread's reusable CPU buffer for `purpose`, viewed as `shape` (see _Scratch)."""
    return _SCRATCH.get(purpose, shape, dtype)


def contiguous_in_scratch(purpose: str, t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor, for the current call only: copied into the reusable
    buffer for `purpose` in CPU eager calls, else t.contiguous() (CUDA, traced graphs)."""
    if not scratch_ok(t):
        return t.contiguous()
    return scratch(purpose, t.shape, t.dtype).copy_(t)


# ---------------------------------------------------------------------------
# per-weight constants, computed once and cached
# ---------------------------------------------------------------------------
# Keyed by the tensor that owns the codes (a layer buffer); invalidated when it
# or the activation parameters change in place (load_state_dict, recalibration).
# (by identity: tensors compare elementwise, so a plain WeakKeyDictionary breaks)
_CACHE = WeakIdKeyDictionary()


def _owner(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def _versions(*ts) -> tuple:
    """What identifies the current contents of ts: version counters (bumped by
    in-place writes), plus the values of small CPU tensors (activation scale and
    zero point: cheap, exact even for inference tensors, which have no version
    counter, and for a tensor replaced by another), plus Python numbers as they
    are.  Called on every eager integer call: cheap checks first."""
    out = []
    for t in ts:
        if not isinstance(t, torch.Tensor):
            out.append(t)
        elif t.numel() <= 4 and t.is_cpu:
            out.append(t.tolist())  # compared, never hashed: a list will do
        elif t.is_inference():
            out.append(("inference", t.data_ptr()))  # immutable outside inference mode
        else:
            out.append(t._version)
    return tuple(out)


def cached(key_tensor: torch.Tensor, name: str, deps, make):
    """make() once per (key tensor, name) while the version/value deps are unchanged.

    deps: a tuple, or a callable returning one (evaluated only outside tracing:
    torch.compile must not see version counters).
    """
    if torch.compiler.is_compiling():
        return make()  # traced graphs see the computation; inductor folds or fuses it
    if callable(deps):
        deps = deps()
    owner = _owner(key_tensor)
    try:
        slot = _CACHE.setdefault(owner, {})
    except TypeError:  # inference tensors etc. that refuse weak references
        return make()
    hit = slot.get(name)
    if hit is not None and hit[0] == deps:
        return hit[1]
    value = make()
    slot[name] = (deps, value)
    return value


def clear_cache() -> None:
    _CACHE.clear()


class Bound:
    """A layer's eager call with what it looks up on every call resolved once: the
    prepacked copy or epilogue constants, the activation scale and zero point as
    numbers.  On layers of the embedded model's size those lookups cost more than
    the kernel.  Made by a backend's `bind(layer)` once the layer's copies exist;
    valid while the layer holds the same buffers at the same versions (`holds`).

    run(x) -> y; run_add(x, residual) -> residual + y summed into residual's memory
    by the kernel, or None where the backend has no such form."""

    __slots__ = ("run", "run_add", "_buffers")

    def __init__(self, run, run_add=None):
        self.run, self.run_add = run, run_add
        self._buffers = None

    def tie(self, buffers: dict) -> "Bound":
        """Tie to a layer's buffers as they are now (bind only outside inference mode:
        inference tensors have no version counter)."""
        self._buffers = [(name, t, None if t is None else t._version) for name, t in buffers.items()]
        return self

    def holds(self, buffers: dict) -> bool:
        if len(buffers) != len(self._buffers):
            return False
        for name, t, version in self._buffers:
            if buffers.get(name) is not t or (t is not None and t._version != version):
                return False
        return True


# Prepacked copies hold the int8 codes themselves, in the backend's layout; each
# reads back exactly (tested), which lets a layer keep only the prepacked copy.
# A copy is cached under "<kind>" or, for one input slice of a split conv,
# "<kind>/<part>" (the parts, read back and joined along K, are the whole weight).
# Each prepacked backend registers how its kinds read back (register_read_back).
_READ_BACK: dict = {}
_NBYTES: dict = {}


def register_read_back(kind: str, fn, nbytes=None) -> None:
    """fn(copy) -> the int8 codes a copy of `kind` holds; nbytes(copy) -> its bytes, for
    copies that are not one byte per weight (default: int8, the weight's numel)."""
    _READ_BACK[kind] = fn
    if nbytes is not None:
        _NBYTES[kind] = nbytes


def held_nbytes(held, numel: int) -> int:
    """Bytes of the copies in `held` (take_fresh_prepacked's list) for a weight of
    `numel` codes: their own count where their kind has one, else one byte per weight."""
    kinds = [name.partition("/")[0] for name, _ in held]
    if all(k in _NBYTES for k in kinds):
        return sum(_NBYTES[k](copy) for k, (_, copy) in zip(kinds, held))
    return numel

_FRESH = WeakIdKeyDictionary()  # key -> names of the prepacked copies made since take_fresh_prepacked


_HELD = WeakIdKeyDictionary()   # key -> [(name, packed)] where those copies alone hold the codes


def _cache_name(kind: str, part: int) -> str:
    return kind if part < 0 else f"{kind}/{part}"


def note_prepacked(key: torch.Tensor, name: str) -> None:
    """Mark key's prepacked copy `name` as one its layer may keep alone (take_fresh_prepacked)."""
    try:
        names = _FRESH.setdefault(_owner(key), [])
    except TypeError:  # inference tensors etc. that refuse weak references
        return
    if name not in names:
        names.append(name)


def _prepacked(key, name, deps, make):
    """cached() for the backends' prepacked copies: also notes that a new copy was made."""
    def make_and_note():
        value = make()
        note_prepacked(key, name)
        return value

    return cached(key, name, deps, make_and_note)


class probing:
    """with probing(): calls that only make what a layer's backend makes once, at a
    moment between steps (QuantLayer.prepare's and refit's probe input): they say nothing
    of the inputs to come, and may make a prepacked copy for the input shape noted."""
    active = False

    def __enter__(self):
        self.outer, probing.active = probing.active, True

    def __exit__(self, *exc):
        probing.active = self.outer


_REFIT = WeakIdKeyDictionary()  # key -> True: its prepacked copy was made for no input shape, one is noted now


def prepack_shape(key: torch.Tensor, name: str, x: torch.Tensor) -> tuple | None:
    """The input shape key's prepacked copy `name` is (to be) made for, the copy's deps
    ending with it.  oneDNN picks the weight layout of an int8 conv for its input's
    shape; a copy made for another (or none, as prepare()'s probe makes it) is reordered
    inside every call (a sixth to two thirds of the call on SDXL's 3x3 convs).

    The first input shape a call meets outside probing() is noted and kept.  A call
    outside probing() keeps the copy there is, whatever it was made for: made again in
    the middle of a step, between the step's transient buffers, a copy pins heap pages
    that every later step then touches anew.  A copy made for no shape is then due for
    QuantLayer.refit, which makes it for the noted shape between steps (inside
    probing()); a later shape runs on that copy, reordered.  With no copy yet, the
    call makes one for its own input."""
    if torch.compiler.is_compiling():
        return None
    owner = _owner(key)
    try:
        slot = _CACHE.setdefault(owner, {})
    except TypeError:
        return None
    noted = slot.get("input_shape")
    if probing.active:
        return None if noted is None else noted[1]
    if noted is None:
        slot["input_shape"] = noted = ((), tuple(x.shape))
    copy = slot.get(name)
    if copy is None:
        return noted[1]
    if copy[0][-1] is None:
        _REFIT[owner] = True
    return copy[0][-1]


def prepacked_for(key: torch.Tensor, name: str) -> tuple | None:
    """The input shape key's prepacked copy `name` was made for; None for a copy made for
    none, or no copy."""
    copy = _CACHE.get(_owner(key), {}).get(name)
    return None if copy is None else copy[0][-1]


def refit_due(key: torch.Tensor) -> bool:
    """Whether key's prepacked copy waits to be made for its noted input shape (prepack_shape);
    answering yes clears it."""
    try:
        return _REFIT.pop(_owner(key), None) is not None
    except TypeError:
        return False


def refit_pending() -> bool:
    return bool(_REFIT)


def take_fresh_prepacked(key: torch.Tensor):
    """[(name, packed), ...] for the prepacked copies of key's codes made since the
    last call (one, or one per slice of a split conv), else None (one dictionary
    lookup: called after every integer-path call; compiled graphs skip it)."""
    if torch.compiler.is_compiling() or not _FRESH:
        return None
    owner = _owner(key)
    try:
        names = _FRESH.pop(owner, None)
    except TypeError:
        return None
    if not names:
        return None
    current, slot = _versions(key)[0], _CACHE.get(owner, {})
    out = []
    for name in sorted(names):
        hit = slot.get(name)
        if hit is None or hit[0][0] != current:  # deps start with _versions(key)
            return None
        out.append((name, hit[1]))
    parts = [n.partition("/")[2] for n, _ in out]
    if parts != [""] and parts != [str(i) for i in range(len(out))]:
        return None  # not one whole copy nor every slice's: keep the codes
    return out


def read_back(held) -> torch.Tensor:
    """The int8 codes prepacked copies hold, weight-shaped as the backend got them
    (held: take_fresh_prepacked's list; slices joined along the input dimension)."""
    codes = [_READ_BACK[name.partition("/")[0]](packed) for name, packed in held]
    return codes[0] if len(codes) == 1 else torch.cat(codes, dim=1)


def hold_codes(key: torch.Tensor, held) -> None:
    """From now on only `held` (prepacked copies) holds key's codes; None: key again."""
    if held is None:
        _HELD.pop(_owner(key), None)
    else:
        _HELD[_owner(key)] = held


def codes_of(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """The int8 codes of a layer's packed buffer, read back where prepacked copies hold them."""
    held = _HELD.get(_owner(packed))
    if held is not None:
        return read_back(held).reshape(shape)
    return unpack(packed, bits, shape)


def _codes(w_q) -> torch.Tensor:
    """w_q as a tensor: the prepacked backends also take a zero-argument callable
    (a layer's int_codes), called only when the prepacked copy is (re)made, so
    that 2/3/4-bit codes are not unpacked on every call."""
    return w_q() if callable(w_q) else w_q


# ---------------------------------------------------------------------------
# the epilogue: y = acc * scale + effective bias
# ---------------------------------------------------------------------------
def _scalar(t) -> float:
    return float(t) if not isinstance(t, torch.Tensor) else float(t.reshape(-1)[0])


def _as_tensor(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].float().to(device)
    return torch.tensor(float(v), device=device)


def _epilogue_consts(w_q2d: torch.Tensor, w_scale: torch.Tensor, bias, x_scale, x_zp, key, name):
    """(scale per output channel, effective bias) of y = acc * scale + beff (w_q2d: the
    codes, or a callable returning them, called only when the constants are made).

    acc = sum_k (Xq - 128) Wq, so (Xq - z) Wq = acc - (z - 128) * rowsum(Wq).
    """
    def make():
        s = (w_scale.float() * _as_tensor(x_scale, w_scale.device)).reshape(-1)
        zp = _as_tensor(x_zp, w_scale.device) - SHIFT
        rowsum = _rowsum(_codes(w_q2d)).float()
        beff = -zp * s * rowsum
        if bias is not None:
            beff = beff + bias.float()
        return s.contiguous(), beff.contiguous()

    return cached(key, name, lambda: _versions(key, w_scale, bias, x_scale, x_zp), make)


def _rowsum(w_q2d: torch.Tensor) -> torch.Tensor:
    """sum_k W per output row, in int32, once per layer at its first call.

    On the CPU an int8 GEMM of W by a column of ones: an order of magnitude faster
    than `sum(dtype=int32)`, which converts its input first (over SDXL-Turbo's
    weights, seconds of the first step).  W is the left operand because kernels
    without VNNI shift that one to uint8 (+128), which is exact; as the right
    operand, a code of -128 came out wrong under oneDNN capped to AVX2.  Elsewhere
    a block of rows at a time, so that the conversion never holds 4x the codes
    (200 MiB for SDXL's largest weight)."""
    if torch.compiler.is_compiling():
        return w_q2d.sum(dim=1, dtype=torch.int32)
    if w_q2d.device.type == "cpu":
        ones = torch.ones(w_q2d.shape[1], 1, dtype=torch.int8)
        return torch._int_mm(w_q2d.contiguous(), ones).reshape(-1)
    rows = max(1, (1 << 20) // max(1, w_q2d.shape[1]))
    return torch.cat([block.sum(dim=1, dtype=torch.int32) for block in w_q2d.split(rows)])


def epilogue_consts(w_q, w_scale, bias, x_scale, x_zp, key=None):
    """(scale, effective bias) for linear_int_mm's `consts`: precompute them once
    where a compiled graph would otherwise recompute sum_k W on every call.
    key: the tensor owning the codes (as in linear_int_mm), so that unpacked
    2/4-bit codes share the eager path's cache entry instead of making one."""
    return _epilogue_consts(w_q.reshape(w_q.shape[0], -1), w_scale, bias, x_scale, x_zp,
                            w_q if key is None else key, "lin_epi")


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, beff: torch.Tensor, dtype) -> torch.Tensor:
    # CPU eager: one op, one pass over the int32 accumulator (addcmul converts it
    # in the loop: 1.5x faster than convert, scale, add as three ops on small
    # GEMMs, where per-op cost dominates); torch.compile fuses the plain form.
    # CUDA eager keeps the form measured on the H100 (addcmul with an int32
    # operand is untested there).
    if torch.compiler.is_compiling():
        y = acc * scale + beff
    elif acc.device.type == "cpu":
        y = torch.addcmul(beff, acc, scale)
    else:
        y = acc.to(torch.float32).mul_(scale).add_(beff)
    return y if dtype == torch.float32 else y.to(dtype)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
