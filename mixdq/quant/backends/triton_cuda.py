"""triton: fused W8A8 Triton kernels for CUDA (triton_kernels.py), copy-free.

One implicit-GEMM kernel runs linears, convs (3x3 stride 1 / 2, 1x1, any padding
or dilation, no im2col in memory) and the split up-block shortcut conv (two input
slices with their own activation range, two accumulators): activations quantized
in the A-tile load (eager) or before the kernel by torch ops that inductor fuses
into the producing op (under torch.compile; `act_quant_mode` says why), 2/4-bit
codes unpacked from the layer's packed buffer in the kernel (no int8 copy), int32
accumulator, epilogue acc * s_a s_w + (b - z' s_a s_w sum W) fused.  The effective
bias is the int_mm backend's (common._epilogue_consts' formula), cached per weight;
int8 results equal `float(acc) * scale + beff` bit for bit (tests/test_triton_kernels.py).
`triton_fp8` (triton_fp8.py) is the same kernel in FP8 e4m3 mode.

Where it runs: CUDA tensors; CPU tensors run the same kernel in Triton's
interpreter (slow: for the proofs, or when forced with MIXDQ_INT8_BACKEND=triton).
On CUDA the dispatch takes it per layer type where a one-off measurement on this
GPU finds it faster than float16 (machine.cuda_choice).  Under torch.compile the
layers call it as custom ops (mixdq::triton_linear / triton_conv2d) with fake
implementations, so fullgraph tracing and CUDA graphs see one opaque op.
"""
from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache

import torch

from ..packing import codes_per_byte, unpack
from .common import SHIFT, _as_tensor, _pair, _rowsum, _versions, cached
from .reference import conv2d_reference

NAME = "triton"
PREPACKED = False
NEVER_SATURATES = True  # a true int32 dot (CUDA) or exact integer matmul (interpreter)


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether triton is installed (checked without importing it: the library imports without it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately hidden install
        return False


def supports(op: str, device, weight_shape=(), groups: int = 1) -> bool:
    """CUDA (CPU: Triton's interpreter) with triton installed; ungrouped convs."""
    if op != "linear" and groups != 1:
        return False
    return available() and torch.device(device).type in ("cuda", "cpu")


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return layer_linear(layer, x, fp8=False)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    return layer_conv2d(layer, x, fp8=False)


def _layer_args(layer) -> tuple:
    return (layer.weight_packed, layer.weight_bits, list(layer.weight_shape), layer.weight_scale, layer.bias,
            layer.act_scale, layer.act_zero_point)


def layer_linear(layer, x: torch.Tensor, fp8: bool) -> torch.Tensor:
    compiling = torch.compiler.is_compiling()
    xa, how = _layer_input(layer, x, fp8, compiling)
    args = (xa, *_layer_args(layer), fp8, how, x.dtype)
    return torch.ops.mixdq.triton_linear(*args) if compiling else _linear_packed(*args)


def layer_conv2d(layer, x: torch.Tensor, fp8: bool) -> torch.Tensor:
    stride, padding, dilation = (_pair(layer.conv_args.get(k, 1 if k != "padding" else 0))
                                 for k in ("stride", "padding", "dilation"))
    compiling = torch.compiler.is_compiling()
    xa, how = _layer_input(layer, x, fp8, compiling)
    args = (xa, *_layer_args(layer), list(stride), list(padding), list(dilation), layer.split, fp8, how, x.dtype)
    return torch.ops.mixdq.triton_conv2d(*args) if compiling else _conv2d_packed(*args)


# ---------------------------------------------------------------------------
# where the activation is quantized
# ---------------------------------------------------------------------------
ACT_QUANT_ENV = "MIXDQ_TRITON_ACT_QUANT"


def act_quant_mode(compiling: bool) -> str:
    """Where a layer's activation is quantized: 'tile' (in the kernel's tile load) or
    'first' (by torch ops before the kernel, which then reads int8 / e4m3 codes).

    In the tile load every N-tile of the GEMM, and every tap of a conv, quantizes its A
    tile again: some 25 float32 instructions per element (an IEEE division among them)
    beside 2 * BLOCK_K / BLOCK_N int8 multiply-adds per element and tile, which the
    tensor cores do many times faster: by instruction count, several times a tile's MMA
    time (not yet timed on a GPU).  Quantized first, each element is quantized once, and
    under torch.compile inductor fuses those ops into the op producing the activation
    (LayerNorm, GELU, the residual add), which then writes int8 instead of float16.  In
    eager they would be separate passes over the activation, so eager keeps the tile
    load.  MIXDQ_TRITON_ACT_QUANT=tile|first sets it everywhere (to compare the two)."""
    mode = os.environ.get(ACT_QUANT_ENV)
    if mode is None:
        return "first" if compiling else "tile"
    if mode not in ("tile", "first"):
        raise ValueError(f"{ACT_QUANT_ENV}={mode!r}: use 'tile' (quantize in the kernel's tile load) or "
                         "'first' (quantize before the kernel), or unset it for the default")
    return mode


def _fp8_act_scale(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """e4m3's scale for a calibrated uint8 range (s, z): its larger side onto e4m3's 448."""
    return torch.maximum(z * s, (255.0 - z) * s) / 448.0


def act_codes(x: torch.Tensor, s, z, fp8: bool) -> torch.Tensor:
    """The activation's codes as the kernel's tile load computes them, by torch ops (which
    inductor fuses into the producing op): int8 code - 128 of round(x / s) + z, or (fp8;
    s: e4m3's scale) x / s in e4m3, both in float32 arithmetic.  Bit for bit the tile
    load's (tests/test_triton_kernels.py)."""
    v = x.float() / s
    if fp8:
        return v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (torch.round(v) + z).clamp(0.0, 255.0).sub(SHIFT).to(torch.int8)


def _slice_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bounds, fp8: bool, dim: int) -> torch.Tensor:
    """act_codes per input slice [lo, hi) of dim, each with its own (s, z)."""
    if len(bounds) == 1:
        return act_codes(x, s[0], z[0], fp8)
    return torch.cat([act_codes(x.narrow(dim, lo, hi - lo), s[p], z[p], fp8) for p, (lo, hi) in enumerate(bounds)],
                     dim)


def _layer_input(layer, x: torch.Tensor, fp8: bool, compiling: bool) -> tuple[torch.Tensor, str]:
    """(what the wrapper gets, its act_quant): the float activation and the mode, or, when a
    traced layer quantizes first, the codes ('codes') made here by torch ops, outside the
    custom op, where inductor can fuse them into the producing op."""
    mode = act_quant_mode(compiling)
    if mode == "tile" or not compiling:
        return x, mode   # eager 'first': the wrapper quantizes, from its cached constants
    s, z = layer.act_scale, layer.act_zero_point
    if fp8:
        s, z = _fp8_act_scale(s, z), torch.zeros_like(z)
    c = x.shape[-1] if layer.op == "linear" else x.shape[1]
    bounds = [(0, layer.split), (layer.split, c)] if layer.split else [(0, c)]
    return _slice_codes(x, s, z, bounds, fp8, -1 if layer.op == "linear" else 1), "codes"


# ---------------------------------------------------------------------------
# the constants a call needs, cached per weight
# ---------------------------------------------------------------------------
def _parts(x_scale, x_zp, device, n_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zero points) as float32 tensors of n_parts entries on `device`."""
    if isinstance(x_scale, torch.Tensor) and x_scale.numel() == n_parts:
        s = x_scale.reshape(-1).float().to(device)
    else:
        s = _as_tensor(x_scale, device).reshape(1).expand(n_parts).contiguous()
    if isinstance(x_zp, torch.Tensor) and x_zp.numel() == n_parts:
        z = x_zp.reshape(-1).float().to(device)
    else:
        z = _as_tensor(x_zp, device).reshape(1).expand(n_parts).contiguous()
    return s.contiguous(), z.contiguous()


def _consts(key, codes_3d, bounds, w_scale, bias, x_scale, x_zp, fp8: bool, name: str):
    """(act scales, act zero points, epilogue scale, effective bias), the last two
    [parts * N]: one row of N per input slice [lo, hi) of `bounds`.

    int8: scale_p = s_p * s_w and beff_p = -(z_p - 128) * scale_p * sum_{k in p} W
    (+ b for the first slice), common._epilogue_consts' formula (the int_mm
    backend's).  fp8: the activation scale is s8_p = max(z_p, 255 - z_p) * s_p / 448,
    e4m3's range over the calibrated one; scale_p = s8_p * s_w, beff = b (no zero point).
    codes_3d: a callable returning the int8 codes as (N, C, taps), called only on a cache miss.
    """
    device = w_scale.device

    def make():
        s, z = _parts(x_scale, x_zp, device, len(bounds))
        rows = []
        if fp8:
            s, z = _fp8_act_scale(s, z), torch.zeros_like(z)
        codes = None if fp8 else codes_3d()
        for p, (lo, hi) in enumerate(bounds):
            scale = (w_scale.float() * s[p]).reshape(-1)
            if fp8:
                beff = torch.zeros_like(scale)
            else:
                beff = -(z[p] - SHIFT) * scale * _rowsum(codes[:, lo:hi].reshape(codes.shape[0], -1)).float()
            if bias is not None and p == 0:
                beff = beff + bias.float()
            rows.append((scale, beff))
        return (s, z, torch.cat([r[0] for r in rows]).contiguous(), torch.cat([r[1] for r in rows]).contiguous())

    return cached(key, name, lambda: _versions(key, w_scale, bias, x_scale, x_zp), make)


def _weight(w_q, bits: int, shape):
    """(tensor the kernel reads codes from, codes per byte, callable for the int8 codes
    as (N, C, taps): a slice of input channels is a slice of dim 1)."""
    n, c = shape[0], shape[1]
    if w_q.dtype == torch.int8 and w_q.numel() == math.prod(shape):  # codes, or their int8 container
        return w_q.contiguous(), 1, lambda: w_q.reshape(n, c, -1)
    per = codes_per_byte(bits)
    if w_q.dtype != torch.uint8 or per == 1 or w_q.numel() != math.ceil(math.prod(shape) / per):
        raise ValueError(f"weight codes {tuple(w_q.shape)} {w_q.dtype} are neither int8 codes of shape "
                         f"{tuple(shape)} nor their packed {bits}-bit container (packing.pack)")
    return w_q, per, lambda: unpack(w_q, bits, shape).reshape(n, c, -1)


def _check_size(*ts) -> None:
    for t in ts:
        if t.numel() >= 2 ** 31:
            raise ValueError(f"a {tuple(t.shape)} tensor is too large for the triton kernels' 32-bit "
                             "offsets: run smaller batches or another backend")


# ---------------------------------------------------------------------------
# the raw kernels
# ---------------------------------------------------------------------------
def _kernel_input(x, act_quant: str, out_dtype, sa, za, bounds, fp8: bool, dim: int):
    """(what the kernel reads, whether it is codes, the output dtype) for act_quant 'tile'
    (x float, quantized in the tile load), 'first' (x float, quantized here) or 'codes' (x
    already holds act_codes' output; out_dtype says the output's float dtype)."""
    if act_quant == "tile":
        return x, False, out_dtype or x.dtype
    if act_quant == "first":
        return _slice_codes(x, sa, za, bounds, fp8, dim), True, out_dtype or x.dtype
    if act_quant == "codes":
        want = torch.float8_e4m3fn if fp8 else torch.int8
        if x.dtype != want or out_dtype is None:
            raise ValueError(f"act_quant='codes' takes the activation's {want} codes (act_codes) and the "
                             f"output's out_dtype, not a {x.dtype} input and out_dtype={out_dtype}")
        return x, True, out_dtype
    raise ValueError(f"act_quant={act_quant!r}: one of 'tile', 'first', 'codes'")


def linear_triton(x, x_scale, x_zp, w_q, w_scale, bias=None, key=None, *, bits: int = 8, shape=None,
                  fp8: bool = False, blocks=None, act_quant: str = "tile", out_dtype=None):
    """y = x W^T in one fused kernel.  w_q: (N, K) int8 codes, or a layer's packed
    buffer with `bits` and `shape` (2/4-bit codes are unpacked in the kernel).
    blocks: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), else the defaults.
    act_quant: where the activation is quantized (_kernel_input; act_quant_mode)."""
    from . import triton_kernels as tk

    shape = tuple(shape or w_q.shape)
    n, k = shape[0], math.prod(shape[1:])
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    w, per, codes = _weight(w_q, bits, shape)
    x2d = x.reshape(-1, k)
    _check_size(x2d)
    m = x2d.shape[0]
    key = w_q if key is None else key
    sa, za, scale, beff = _consts(key, codes, [(0, k)], w_scale, bias, x_scale, x_zp, fp8,
                                  "triton_lin_fp8" if fp8 else "triton_lin")
    x2d, a_codes, out_dtype = _kernel_input(x2d, act_quant, out_dtype, sa, za, [(0, k)], fp8, 1)
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    geometry = dict(M=m, N=n, C=k, H=1, W=1, HO=1, WO=1, SPLIT=k, sx=(x2d.stride(0), x2d.stride(1), 0, 0),
                    sw=(k, 1, 0, 0), sy=(n, 1, 0, 0), KH=1, KW=1, STRIDE=1, PAD=0, DIL=1)
    tk.launch(x2d, w, y, sa, za, scale, beff, geometry, per=per, parts=1, fp8=fp8, blocks=blocks, a_codes=a_codes)
    return y.reshape(*x.shape[:-1], n)


def conv2d_triton(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  key=None, *, bits: int = 8, shape=None, split: int = 0, fp8: bool = False, blocks=None,
                  act_quant: str = "tile", out_dtype=None):
    """Implicit-GEMM conv: each output pixel's (kh, kw, c) inputs are addressed in the
    kernel from x's strides (NCHW or channels_last), padding by masks; output NCHW.
    split > 0: input channels [:split] and [split:] are quantized with their own
    (scale, zero point), x_scale / x_zp then holding two entries each."""
    from . import triton_kernels as tk

    shape = tuple(shape or w_q.shape)
    o, c, kh, kw = shape
    (sh, sw_), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if groups != 1 or sh != sw_ or ph != pw or dh != dw:
        if split:
            raise ValueError("a split conv must be ungrouped with square stride, padding and dilation")
        # the kernel's geometry is square and ungrouped (every UNet conv is); the
        # rest computes the same function the plain way
        if act_quant == "codes":
            raise ValueError("act_quant='codes' needs an ungrouped conv with square stride, padding and dilation")
        codes = w_q if w_q.dtype == torch.int8 else unpack(w_q, bits, shape)
        return conv2d_reference(x, x_scale, x_zp, codes.reshape(shape), w_scale, bias, stride, padding,
                                dilation, groups)
    b, cx, h, wd = x.shape
    if cx != c:
        raise ValueError(f"input has {cx} channels, the weight {c}")
    w, per, codes = _weight(w_q, bits, shape)
    _check_size(x)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw_ + 1
    bounds = [(0, split), (split, c)] if split else [(0, c)]
    key = w_q if key is None else key
    name = f"triton_conv{'_split' if split else ''}{'_fp8' if fp8 else ''}"
    sa, za, scale, beff = _consts(key, codes, bounds, w_scale, bias, x_scale, x_zp, fp8, name)
    x, a_codes, out_dtype = _kernel_input(x, act_quant, out_dtype, sa, za, bounds, fp8, 1)
    y = torch.empty(b, o, ho, wo, dtype=out_dtype, device=x.device)
    sx = x.stride()
    geometry = dict(M=b * ho * wo, N=o, C=c, H=h, W=wd, HO=ho, WO=wo, SPLIT=split or c,
                    sx=(sx[0], sx[1], sx[2], sx[3]), sw=(c * kh * kw, kh * kw, kw, 1),
                    sy=(o * ho * wo, ho * wo, wo, 1), KH=kh, KW=kw, STRIDE=sh, PAD=ph, DIL=dh)
    tk.launch(x, w, y, sa, za, scale, beff, geometry, per=per, parts=len(bounds), fp8=fp8, blocks=blocks,
              a_codes=a_codes)
    return y


def split_conv1x1_triton(x, x_scales, x_zps, split: int, w_q, w_scale, bias=None, key=None, **kw):
    """The up-block shortcut conv over concat(hidden, skip): int_mm.split_conv1x1_int_mm's
    signature, one kernel with one accumulator per slice."""
    return conv2d_triton(x, x_scales, x_zps, w_q, w_scale, bias, key=key, split=split, **kw)


def _linear_packed(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, fp8, act_quant="tile", out_dtype=None):
    return linear_triton(x, x_scale, x_zp, packed, w_scale, bias, key=packed, bits=bits, shape=shape, fp8=fp8,
                         act_quant=act_quant, out_dtype=out_dtype)


def _conv2d_packed(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, stride, padding, dilation, split, fp8,
                   act_quant="tile", out_dtype=None):
    scale_arg, zp_arg = (x_scale, x_zp) if split else (x_scale[0], x_zp[0])
    return conv2d_triton(x, scale_arg, zp_arg, packed, w_scale, bias, stride, padding, dilation, key=packed,
                         bits=bits, shape=shape, split=split, fp8=fp8, act_quant=act_quant, out_dtype=out_dtype)


# ---------------------------------------------------------------------------
# torch.compile: the layers' calls as custom ops of known output shape
# ---------------------------------------------------------------------------
@torch.library.custom_op("mixdq::triton_linear", mutates_args=())
def triton_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, shape: list[int], w_scale: torch.Tensor,
                  bias: torch.Tensor | None, x_scale: torch.Tensor, x_zp: torch.Tensor, fp8: bool,
                  act_quant: str, out_dtype: torch.dtype) -> torch.Tensor:
    """linear_triton on a layer's packed buffer (epilogue constants cached per buffer); x
    the float activation or (act_quant 'codes') its codes."""
    return _linear_packed(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, fp8, act_quant, out_dtype)


@triton_linear.register_fake
def _(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, fp8, act_quant, out_dtype):
    return x.new_empty(*x.shape[:-1], shape[0], dtype=out_dtype)


@torch.library.custom_op("mixdq::triton_conv2d", mutates_args=())
def triton_conv2d(x: torch.Tensor, packed: torch.Tensor, bits: int, shape: list[int], w_scale: torch.Tensor,
                  bias: torch.Tensor | None, x_scale: torch.Tensor, x_zp: torch.Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], split: int, fp8: bool, act_quant: str,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """conv2d_triton on a layer's packed buffer (epilogue constants cached per buffer); x
    the float activation or (act_quant 'codes') its codes."""
    return _conv2d_packed(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, stride, padding, dilation,
                          split, fp8, act_quant, out_dtype)


@triton_conv2d.register_fake
def _(x, packed, bits, shape, w_scale, bias, x_scale, x_zp, stride, padding, dilation, split, fp8, act_quant,
      out_dtype):
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty(x.shape[0], shape[0], *size, dtype=out_dtype)
