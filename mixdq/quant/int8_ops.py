"""INT8 compute kernels for quantized layers: W(<=8)A8 linear and conv2d.

Every kernel computes the same function as the fake-quant reference

    y = (s_a * (Xq - z)) @ (s_w * Wq)^T + b        (conv: the same over patches)

with Xq = clamp(round(x / s_a) + z, 0, 255) (asymmetric uint8 activations, one
scale / zero point per tensor) and Wq integer codes (int8 tensor, symmetric per
output channel, any bit width <= 8), and is tested against it
(tests/test_int8_ops.py).

Backends (what was measured on which CPU is in bench/RESULTS.md):

  int_mm   `torch._int_mm` (int8 x int8 -> int32), activations shifted to int8
           (codes - 128, zero point - 128), epilogue
           s_a s_w (acc - z' sum_k W) + b with the zero-point term folded into
           an effective bias.  Needs no weight copy, so 4- and 2-bit layers run
           it too (codes unpacked to int8 just for the call).  Convs run as an
           NHWC im2col + the same GEMM.  On AVX-512 VNNI it ran 3.7x (linears)
           and 2.8x (convs) faster than float32 over SDXL's layer shapes; on
           AVX2-only CPUs `_int_mm` is 30-100x *slower* (README).
  onednn   `onednn::qlinear_pointwise` / `qconv2d_pointwise` (uint8 x int8,
           fused epilogue, float output) on a prepacked weight.  The prepack is
           a second copy of the weight (about the int8 size), so it is used only
           where `int_mm` loses, e.g. AVX2-only CPUs.
  fbgemm   `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`: one op,
           float in, float out, on prepacked weights; the AVX2 path for linears
           (about 2x float32 there), also a weight copy.
  reference  the float fake-quant formula, for tests and unsupported cases.

Activation quantization on the CPU uses `torch.quantize_per_tensor` (one
vectorised pass, ~10x faster than round/clamp/cast as separate ops) and
reinterprets the quantized tensor's bytes as a plain int8/uint8 tensor: no copy.
On CUDA (and when compiling) the arithmetic form is used, which inductor fuses
into the neighbouring ops.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .packing import unpack

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
        try:
            if signed:
                return _plain(torch.quantize_per_tensor(x.contiguous(), s, z - SHIFT, torch.qint8), torch.int8)
            return _plain(torch.quantize_per_tensor(x.contiguous(), s, z, torch.quint8), torch.uint8)
        except (RuntimeError, NotImplementedError):
            pass  # an op removed in a later torch: fall through to the arithmetic form
    q = torch.clamp(torch.round(x / scale) + zero_point, QMIN_U8, QMAX_U8)
    if signed:
        return (q - SHIFT).to(torch.int8)
    return q.to(torch.uint8)


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


# Prepacked copies hold the int8 codes themselves, in the backend's layout; each
# reads back exactly (tested), which lets a layer keep only the prepacked copy.
# A copy is cached under "<kind>" or, for one input slice of a split conv,
# "<kind>/<part>" (the parts, read back and joined along K, are the whole weight).
_READ_BACK = {
    "fbgemm_lin": lambda packed: torch.ops.quantized.linear_unpack(packed)[0].int_repr(),
    "onednn_lin": lambda packed: packed.to_dense().t(),
    "onednn_conv": lambda packed: packed.to_dense(),
}
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


def _scalar(t) -> float:
    return float(t) if not isinstance(t, torch.Tensor) else float(t.reshape(-1)[0])


def _epilogue_consts(w_q2d: torch.Tensor, w_scale: torch.Tensor, bias, x_scale, x_zp, key, name):
    """(scale per output channel, effective bias) of y = acc * scale + beff.

    acc = sum_k (Xq - 128) Wq, so (Xq - z) Wq = acc - (z - 128) * rowsum(Wq).
    """
    def make():
        s = (w_scale.float() * _as_tensor(x_scale, w_scale.device)).reshape(-1)
        zp = _as_tensor(x_zp, w_scale.device) - SHIFT
        rowsum = _rowsum(w_q2d).float()
        beff = -zp * s * rowsum
        if bias is not None:
            beff = beff + bias.float()
        return s.contiguous(), beff.contiguous()

    return cached(key, name, lambda: _versions(key, w_scale, bias, x_scale, x_zp), make)


def _rowsum(w_q2d: torch.Tensor) -> torch.Tensor:
    """sum_k W per output row, in int32, a block of rows at a time: `sum(dtype=int32)`
    converts its whole input first, 4x the int8 codes (200 MiB for SDXL's largest
    weight), once per layer at its first call."""
    if torch.compiler.is_compiling():
        return w_q2d.sum(dim=1, dtype=torch.int32)
    rows = max(1, (1 << 20) // max(1, w_q2d.shape[1]))
    return torch.cat([block.sum(dim=1, dtype=torch.int32) for block in w_q2d.split(rows)])


def _as_tensor(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].float().to(device)
    return torch.tensor(float(v), device=device)


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


# A large GEMM's int32 accumulator lies above glibc's mmap threshold (32 MiB at
# most), e.g. SD1.5's 4096-token feed-forward (4096 x 2560: 40 MiB): every call
# then maps fresh pages and faults them in, and the epilogue reads them back from
# memory.  Blocks of rows of ~4 MiB stay in the heap and in cache.
_ACC_SPLIT_ABOVE = 32 << 20
_ACC_BLOCK = 4 << 20


def _int_mm_epilogue(a: torch.Tensor, b: torch.Tensor, scale, beff, dtype) -> torch.Tensor:
    """_epilogue(torch._int_mm(a, b), ...), by blocks of rows where the accumulator is large
    (a: the activation codes, made contiguous here as _int_mm needs)."""
    a = a.contiguous()
    m, n = a.shape[0], b.shape[1]
    if m * n * 4 <= _ACC_SPLIT_ABOVE or a.device.type != "cpu" or torch.compiler.is_compiling():
        return _epilogue(torch._int_mm(a, b), scale, beff, dtype)
    rows = max(64, _ACC_BLOCK // (4 * n))
    y = torch.empty(m, n, dtype=torch.float32)
    for i in range(0, m, rows):
        torch.addcmul(beff, torch._int_mm(a[i:i + rows], b), scale, out=y[i:i + rows])
    return y if dtype == torch.float32 else y.to(dtype)


# ---------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------
def linear_reference(x, x_scale, x_zp, w_q, w_scale, bias=None):
    """The fake-quant formula in float32 (what every kernel must reproduce)."""
    xq = torch.clamp(torch.round(x.float() / x_scale) + x_zp, QMIN_U8, QMAX_U8)
    xd = (xq - x_zp) * x_scale
    wd = w_q.float() * w_scale.float().view(-1, 1)
    y = F.linear(xd, wd, None if bias is None else bias.float())
    return y.to(x.dtype)


def int_mm_ok(m: int, k: int, n: int, device) -> bool:
    """CUDA's _int_mm needs M > 16 and K, N multiples of 8; the CPU takes any shape."""
    if torch.device(device).type != "cuda":
        return True
    return m > 16 and k % 8 == 0 and n % 8 == 0


def epilogue_consts(w_q, w_scale, bias, x_scale, x_zp, key=None):
    """(scale, effective bias) for linear_int_mm's `consts`: precompute them once
    where a compiled graph would otherwise recompute sum_k W on every call.
    key: the tensor owning the codes (as in linear_int_mm), so that unpacked
    2/4-bit codes share the eager path's cache entry instead of making one."""
    return _epilogue_consts(w_q.reshape(w_q.shape[0], -1), w_scale, bias, x_scale, x_zp,
                            w_q if key is None else key, "lin_epi")


def linear_int_mm(x, x_scale, x_zp, w_q, w_scale, bias=None, key=None, consts=None):
    """int8 GEMM via torch._int_mm.  w_q: (N, K) int8 codes.  key: tensor owning
    the codes, for caching the epilogue constants (defaults to w_q itself);
    consts: (scale, effective bias) precomputed by epilogue_consts."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    xq = quantize_act(x2d, x_scale, x_zp, signed=True)
    scale, beff = consts if consts is not None else _epilogue_consts(
        w_q, w_scale, bias, x_scale, x_zp, w_q if key is None else key, "lin_epi")
    y = _int_mm_epilogue(xq, w_q.t(), scale, beff, x.dtype)
    return y.reshape(*shape[:-1], w_q.shape[0])


def _codes(w_q) -> torch.Tensor:
    """w_q as a tensor: the prepacked backends also take a zero-argument callable
    (a layer's int_codes), called only when the prepacked copy is (re)made, so
    that 2/3/4-bit codes are not unpacked on every call."""
    return w_q() if callable(w_q) else w_q


def _onednn_w_zp(n, device):
    return torch.zeros(n, dtype=torch.long, device=device)


def linear_onednn(x, x_scale, x_zp, w_q, w_scale, bias=None, key=None, part=-1):
    """onednn::qlinear_pointwise on a cached prepacked weight (an extra weight copy).
    part >= 0: w_q is one input slice of a split conv's weight, cached apart."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    key = w_q if key is None else key
    n = w_scale.shape[0]
    packed = _prepacked(key, _cache_name("onednn_lin", part), lambda: _versions(key),
                        lambda: torch.ops.onednn.qlinear_prepack(_codes(w_q).contiguous(), None))
    wz = cached(key, "onednn_wz", (), lambda: _onednn_w_zp(n, w_scale.device))
    ws = w_scale.float().contiguous()
    xq = quantize_act(x2d.float(), x_scale, x_zp, signed=False)
    y = torch.ops.onednn.qlinear_pointwise(
        xq, _scalar(x_scale), int(round(_scalar(x_zp))), packed, ws, wz,
        None if bias is None else bias.float(), 1.0, 0, torch.float32, "none", [], "")
    return y.to(x.dtype).reshape(*shape[:-1], n)


def linear_fbgemm(x, x_scale, x_zp, w_q, w_scale, bias=None, key=None, part=-1):
    """quantized::linear_with_input_q_dq_qweight_dq_output_fp32 (FBGEMM; AVX2 path);
    part as in linear_onednn."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).float().contiguous()
    key = w_q if key is None else key

    n = w_scale.shape[0]

    def make():
        qw = torch._make_per_channel_quantized_tensor(
            _codes(w_q).contiguous(), w_scale.double(), torch.zeros(n, dtype=torch.long), 0)
        with _engine("fbgemm"):
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())

    packed = _prepacked(key, _cache_name("fbgemm_lin", part), lambda: _versions(key, w_scale, bias), make)
    with _engine("fbgemm"):
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x2d, _scalar(x_scale), int(round(_scalar(x_zp))), packed)
    return y.to(x.dtype).reshape(*shape[:-1], n)


class _engine:
    """Temporarily select a quantized engine (fbgemm / onednn / x86)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = torch.backends.quantized.engine
        if self.name != self.old and self.name in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        if torch.backends.quantized.engine != self.old:
            torch.backends.quantized.engine = self.old


LINEAR_BACKENDS = {
    "int_mm": linear_int_mm,
    "onednn": linear_onednn,
    "fbgemm": linear_fbgemm,
}


# ---------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------
def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d_reference(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0,
                     dilation=1, groups=1):
    xq = torch.clamp(torch.round(x.float() / x_scale) + x_zp, QMIN_U8, QMAX_U8)
    xd = (xq - x_zp) * x_scale
    wd = w_q.float() * w_scale.float().view(-1, 1, 1, 1)
    y = F.conv2d(xd, wd, None if bias is None else bias.float(), stride, padding, dilation, groups)
    return y.to(x.dtype)


def _im2col_nhwc(xq_nhwc: torch.Tensor, pad_value: int, kh, kw, stride, padding, dilation):
    """(B, H, W, C) int8 -> (B*Ho*Wo, kh*kw*C) patches, C fastest (contiguous copies)."""
    b, h, w, c = xq_nhwc.shape
    ph, pw = padding
    if ph or pw:
        xq_nhwc = F.pad(xq_nhwc, (0, 0, pw, pw, ph, ph), value=pad_value)
    hp, wp = xq_nhwc.shape[1:3]
    sh, sw = stride
    dh, dw = dilation
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    s = xq_nhwc.stride()
    cols = xq_nhwc.as_strided((b, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
    return cols.reshape(b * ho * wo, kh * kw * c), (b, ho, wo)


def conv2d_int_mm(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1,
                  groups=1, key=None):
    """Implicit-GEMM conv: NHWC im2col of the int8 codes, then the int8 GEMM.

    Zero padding of the float input is the zero point in code space, so patches
    are padded with z - 128.  Output is returned as an NCHW-shaped view of the
    NHWC GEMM result (channels_last memory), which the following GroupNorm /
    SiLU / add accept without a copy.
    """
    if groups != 1:
        return conv2d_reference(x, x_scale, x_zp, w_q, w_scale, bias, stride, padding, dilation, groups)
    o, c, kh, kw = w_q.shape
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    key = w_q if key is None else key
    if torch.compiler.is_compiling() and padding != (0, 0):
        # the patches' pad code (the zero point) is a tensor value in a traced
        # graph; zero-padding the float input is the same (0 quantizes to it)
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        padding = (0, 0)
    nhwc = x.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():  # channels_last input (e.g. the previous int8 conv's output)
        xq = quantize_act(nhwc, x_scale, x_zp, signed=True)    # contiguous NHWC codes, no float copy
    else:
        xq = quantize_act(x, x_scale, x_zp, signed=True).permute(0, 2, 3, 1)  # NCHW codes, one pass
    if kh == 1 and kw == 1 and padding == (0, 0) and stride == (1, 1):
        cols, (b, ho, wo) = xq.reshape(-1, c), (x.shape[0], x.shape[2], x.shape[3])
        w2 = w_q.reshape(o, c)
    else:
        zp_s8 = int(round(_scalar(x_zp))) - SHIFT
        cols, (b, ho, wo) = _im2col_nhwc(xq, zp_s8, kh, kw, stride, padding, dilation)
        # weight in (O, kh, kw, C) order to match the patches: a per-call int8
        # copy of the codes (caching it would double the layer's memory).  The
        # bytes are copied as uint8, for which torch's transposing copy is 1.8x
        # faster than for int8 (SDXL 1280x1280x3x3: 8.4 -> 4.6 ms, next to an
        # 18.6 ms GEMM at 16x16)
        w2 = w_q.view(torch.uint8).permute(0, 2, 3, 1).reshape(o, kh * kw * c).view(torch.int8)
    scale, beff = _epilogue_consts(w_q.reshape(o, -1), w_scale, bias, x_scale, x_zp, key, "conv_epi")
    y = _int_mm_epilogue(cols, w2.t(), scale, beff, x.dtype)
    return y.view(b, ho, wo, o).permute(0, 3, 1, 2)


def conv2d_onednn(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1,
                  groups=1, key=None):
    """onednn::qconv2d_pointwise on a cached prepacked weight (an extra weight copy)."""
    stride, padding, dilation = map(lambda v: list(_pair(v)), (stride, padding, dilation))
    key = w_q if key is None else key
    s, z = _scalar(x_scale), int(round(_scalar(x_zp)))
    ws = w_scale.float().contiguous()
    packed = _prepacked(key, "onednn_conv", lambda: _versions(key, w_scale) + (s, z), lambda: torch.ops.onednn.qconv_prepack(
        _codes(w_q).contiguous(), ws, s, z, stride, padding, dilation, groups, None))
    wz = cached(key, "onednn_wz", (), lambda: _onednn_w_zp(ws.shape[0], ws.device))
    xq = quantize_act(x.float(), s, z, signed=False)
    y = torch.ops.onednn.qconv2d_pointwise(
        xq, s, z, packed, ws, wz, None if bias is None else bias.float(), stride, padding,
        dilation, groups, 1.0, 0, torch.float32, "none", [], "")
    return y.to(x.dtype)


CONV_BACKENDS = {
    "int_mm": conv2d_int_mm,
    "onednn": conv2d_onednn,
}


# ---------------------------------------------------------------------------
# inputs split in two activation ranges (the up-block shortcut conv)
# ---------------------------------------------------------------------------
def split_conv1x1_int_mm(x, x_scales, x_zps, split: int, w_q, w_scale, bias=None, key=None):
    """1x1 conv over concat(hidden, skip) whose two slices have their own act range.

    One int8 GEMM per slice (the weight split along input channels), summed in
    float: y = sum_i s_i s_w (acc_i - z_i' rowsum(W_i)) + b.
    """
    o, c = w_q.shape[:2]
    key = w_q if key is None else key
    w2 = w_q.reshape(o, c)
    y = None
    for i, (lo, hi) in enumerate(((0, split), (split, c))):
        xi = x[:, lo:hi]
        xq = quantize_act(xi, x_scales[i], x_zps[i], signed=True).permute(0, 2, 3, 1).reshape(-1, hi - lo)
        wi = w2[:, lo:hi]
        scale, beff = _epilogue_consts(wi, w_scale, bias if i == 0 else None, x_scales[i], x_zps[i],
                                       key, f"split_epi{i}")
        yi = _int_mm_epilogue(xq, wi.t(), scale, beff, torch.float32)
        y = yi if y is None else y.add_(yi)
    b, _, h, w = x.shape
    return y.to(x.dtype).view(b, h, w, o).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# the prepacked backends as custom ops, for torch.compile: their prepack cannot
# be traced, so a traced graph calls the whole eager kernel (prepacked copy
# cached as in eager calls) through an op whose output shape is known
# ---------------------------------------------------------------------------
@torch.library.custom_op("mixdq::prepacked_linear", mutates_args=())
def prepacked_linear(backend: str, x: torch.Tensor, packed: torch.Tensor, bits: int, shape: list[int],
                     lo: int, hi: int, part: int, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     x_scale: torch.Tensor, x_zp: torch.Tensor) -> torch.Tensor:
    """LINEAR_BACKENDS[backend] on codes [:, lo:hi] of a layer's packed buffer."""
    def codes():
        return codes_of(packed, bits, shape).reshape(shape[0], -1)[:, lo:hi]

    return LINEAR_BACKENDS[backend](x, x_scale, x_zp, codes, w_scale, bias, key=packed, part=part)


@prepacked_linear.register_fake
def _(backend, x, packed, bits, shape, lo, hi, part, w_scale, bias, x_scale, x_zp):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("mixdq::onednn_conv2d", mutates_args=())
def onednn_conv2d(x: torch.Tensor, packed: torch.Tensor, bits: int, shape: list[int], w_scale: torch.Tensor,
                  bias: torch.Tensor | None, x_scale: torch.Tensor, x_zp: torch.Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """conv2d_onednn on a layer's packed buffer."""
    return conv2d_onednn(x, x_scale, x_zp, lambda: codes_of(packed, bits, shape), w_scale, bias,
                         stride, padding, dilation, groups, key=packed)


@onednn_conv2d.register_fake
def _(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, stride, padding, dilation, groups):
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty(x.shape[0], shape[0], *size)


__all__ = ["quantize_act", "note_prepacked", "take_fresh_prepacked", "read_back", "hold_codes", "codes_of",
           "linear_reference", "linear_int_mm", "linear_onednn", "linear_fbgemm", "conv2d_reference",
           "conv2d_int_mm", "conv2d_onednn", "split_conv1x1_int_mm", "LINEAR_BACKENDS", "CONV_BACKENDS",
           "int_mm_ok", "clear_cache", "cached", "prepacked_linear", "onednn_conv2d"]
