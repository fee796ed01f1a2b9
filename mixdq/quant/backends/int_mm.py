"""int_mm: `torch._int_mm` (int8 x int8 -> int32) on the CPU and CUDA.

Activations shifted to int8 (codes - 128, zero point - 128), epilogue
s_a s_w (acc - z' sum_k W) + b with the zero-point term folded into an effective
bias.  Needs no second weight copy, so 2-4-bit layers run it too (codes unpacked to
int8 for the call).  Convs run as an NHWC im2col + the same GEMM (on the CPU a layer
keeps its codes in the patches' order, TapMajorCodes: same bytes); the split shortcut
conv as one GEMM per slice.  On AVX-512 VNNI it ran 3.7x (linears) and 2.8x
(convs) faster than float32 over SDXL's layer shapes; on AVX2-only CPUs
`_int_mm` is 30-100x *slower* (README), and the dispatch measures that.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ..packing import pack, unpack
from .common import (SHIFT, Bound, _epilogue, _epilogue_consts, _pair, _prepacked, _scalar, _versions,
                     contiguous_in_scratch, quantize_act, register_read_back, scratch, scratch_ok)
from .reference import conv2d_reference

NAME = "int_mm"
PREPACKED = False


def supports(op: str, device, weight_shape=(), groups: int = 1) -> bool:
    """Every CPU layer but grouped convs; on CUDA, convs whose GEMM is 8-aligned."""
    if op == "conv" and groups != 1:
        return False
    if torch.device(device).type == "cuda" and op != "linear":
        return math.prod(weight_shape[1:]) % 8 == 0 and weight_shape[0] % 8 == 0
    return torch.device(device).type in ("cpu", "cuda")


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    consts = (layer.epilogue_scale, layer.epilogue_bias) if layer.holds_epilogue else None
    return linear_int_mm(x, layer.act_scale, layer.act_zero_point, layer.int_codes(), layer.weight_scale,
                         layer.bias, key=layer.weight_packed, consts=consts)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.split:
        return split_conv1x1_int_mm(x, layer.act_scale, layer.act_zero_point, layer.split, layer.int_codes(),
                                    layer.weight_scale, layer.bias, key=layer.weight_packed)
    if holds_taps(layer) and not torch.compiler.is_compiling():
        # the layer's copy in patch order, made once, then held alone (QuantLayer._release_codes)
        codes = _prepacked(layer.weight_packed, TAPS, lambda: _versions(layer.weight_packed),
                           lambda: TapMajorCodes(layer._codes_now(), layer.weight_bits))
    else:
        codes = layer.int_codes()
    return conv2d_int_mm(x, layer.act_scale[0], layer.act_zero_point[0], codes, layer.weight_scale, layer.bias,
                         key=layer.weight_packed, **layer.conv_args)


def bind(layer) -> Bound | None:
    """The layer's CPU call with its epilogue constants, held codes and activation
    parameters resolved (common.Bound); 2-4-bit codes are still unpacked per call."""
    if layer.split or layer.device.type != "cpu":
        return None
    s, z = _scalar(layer.act_scale[0]), _scalar(layer.act_zero_point[0])
    if layer.op == "linear":
        codes = _codes_now(layer)
        consts = ((layer.epilogue_scale, layer.epilogue_bias) if layer.holds_epilogue else
                  _epilogue_consts(codes, layer.weight_scale, layer.bias, layer.act_scale, layer.act_zero_point,
                                   layer.weight_packed, "lin_epi"))
        return Bound(lambda x: linear_int_mm(x, s, z, codes(), None, consts=consts))
    if holds_taps(layer):
        taps = _prepacked(layer.weight_packed, TAPS, lambda: _versions(layer.weight_packed),
                          lambda: TapMajorCodes(layer._codes_now(), layer.weight_bits))
        codes, w2 = (lambda: taps), taps.taps
    else:
        codes = _codes_now(layer)
        o = layer.weight_shape[0]
        w2 = lambda: codes().reshape(o, -1)  # noqa: E731
    consts = _epilogue_consts(w2, layer.weight_scale, layer.bias, layer.act_scale[0], layer.act_zero_point[0],
                              layer.weight_packed, "conv_epi")
    args = layer.conv_args
    return Bound(lambda x: conv2d_int_mm(x, s, z, codes(), None, consts=consts, **args))


def _codes_now(layer):
    """The layer's codes for each call: the same view for 5-8 bits, unpacked per call for 2-4
    (through a weak reference: a Bound the layer holds must not keep the layer alive)."""
    if layer.weight_bits >= 5:
        view = layer.int_codes()
        return lambda: view
    ref = weakref.ref(layer)
    return lambda: ref().int_codes()


TAPS = "int_mm_taps"


def holds_taps(layer) -> bool:
    """Whether this conv layer's eager CPU calls keep its codes as a TapMajorCodes."""
    return layer.op == "conv" and layer.kernel_size != (1, 1) and layer.device.type == "cpu"


class TapMajorCodes:
    """A conv's codes packed as the layer packs them (same bits, same bytes), but in
    (O, kh, kw, C) order: the order of the NHWC patches the GEMM multiplies them with.
    Codes stored (O, C, kh, kw) would otherwise be transposed on every call, a byte
    transpose that torch does slowly, beside GEMMs only a few times longer.  A layer
    keeps this copy alone, like the prepacked backends' (read back for export)."""

    def __init__(self, codes: torch.Tensor, bits: int):
        self.bits, self.shape = bits, tuple(codes.shape)
        self.packed = pack(codes.permute(0, 2, 3, 1), bits)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def taps(self) -> torch.Tensor:
        """(O, kh * kw * C) int8 codes: a view for 5-8 bits, unpacked for 2-4."""
        o = self.shape[0]
        return unpack(self.packed, self.bits, (o, math.prod(self.shape[1:])))

    def codes(self) -> torch.Tensor:
        """The codes in the weight's own (O, C, kh, kw) order (a view of taps())."""
        o, c, kh, kw = self.shape
        return self.taps().view(o, kh, kw, c).permute(0, 3, 1, 2)


register_read_back(TAPS, TapMajorCodes.codes, nbytes=lambda held: held.nbytes)


# On the CPU the int32 accumulator is a reused buffer (common.scratch: a fresh
# one per call costs page faults, or heap holes that stay resident), filled by
# blocks of rows of ~4 MiB where it would be large (SD1.5's 4096-token
# feed-forward, 4096 x 2560: 40 MiB), so that the epilogue reads it from cache.
_ACC_SPLIT_ABOVE = 32 << 20
_ACC_BLOCK = 4 << 20


def _int_mm_epilogue(a: torch.Tensor, b: torch.Tensor, scale, beff, dtype) -> torch.Tensor:
    """_epilogue(torch._int_mm(a, b), ...), by blocks of rows where the accumulator is large
    (a: the activation codes, made contiguous here as _int_mm needs)."""
    a = a.contiguous()
    if not scratch_ok(a):
        return _epilogue(torch._int_mm(a, b), scale, beff, dtype)
    m, n = a.shape[0], b.shape[1]
    if m * n * 4 <= _ACC_SPLIT_ABOVE:
        return _epilogue(torch._int_mm(a, b, out=scratch("int_mm_acc", (m, n), torch.int32)), scale, beff, dtype)
    rows = max(64, _ACC_BLOCK // (4 * n))
    y = torch.empty(m, n, dtype=torch.float32)
    for i in range(0, m, rows):
        acc = scratch("int_mm_acc", (min(rows, m - i), n), torch.int32)
        torch.addcmul(beff, torch._int_mm(a[i:i + rows], b, out=acc), scale, out=y[i:i + rows])
    return y if dtype == torch.float32 else y.to(dtype)


def int_mm_ok(m: int, k: int, n: int, device) -> bool:
    """CUDA's _int_mm needs M > 16 and K, N multiples of 8; the CPU takes any shape."""
    if torch.device(device).type != "cuda":
        return True
    return m > 16 and k % 8 == 0 and n % 8 == 0


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
    cols = contiguous_in_scratch("int_mm_patches", cols)
    return cols.view(b * ho * wo, kh * kw * c), (b, ho, wo)


def conv2d_int_mm(x, x_scale, x_zp, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1,
                  groups=1, key=None, consts=None):
    """Implicit-GEMM conv: NHWC im2col of the int8 codes, then the int8 GEMM.
    w_q: (O, C, kh, kw) int8 codes, or a TapMajorCodes (already in patch order);
    consts: (scale, effective bias) as for linear_int_mm.

    Zero padding of the float input is the zero point in code space, so patches
    are padded with z - 128.  Output is returned as an NCHW-shaped view of the
    NHWC GEMM result (channels_last memory), which the following GroupNorm /
    SiLU / add accept without a copy.
    """
    taps = w_q if isinstance(w_q, TapMajorCodes) else None
    if groups != 1:
        w_q = taps.codes() if taps is not None else w_q
        return conv2d_reference(x, x_scale, x_zp, w_q, w_scale, bias, stride, padding, dilation, groups)
    o, c, kh, kw = w_q.shape
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    key = (taps.packed if taps is not None else w_q) if key is None else key
    if (torch.compiler.is_compiling() or x.is_cuda) and padding != (0, 0):
        # the patches' pad code (the zero point) is a tensor value in a traced
        # graph, and reading a CUDA one is a host sync per call (which a CUDA
        # graph's capture refuses); zero-padding the float input is the same
        # (0 quantizes to the zero point)
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        padding = (0, 0)
    nhwc = x.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():  # channels_last input (e.g. the previous int8 conv's output)
        xq = quantize_act(nhwc, x_scale, x_zp, signed=True)    # contiguous NHWC codes, no float copy
    else:
        xq = quantize_act(x, x_scale, x_zp, signed=True).permute(0, 2, 3, 1)  # NCHW codes, one pass
    if kh == 1 and kw == 1 and padding == (0, 0) and stride == (1, 1):
        cols, (b, ho, wo) = xq.reshape(-1, c), (x.shape[0], x.shape[2], x.shape[3])
    else:
        # read only where there is padding (never on CUDA or in a traced graph: above)
        zp_s8 = int(round(_scalar(x_zp))) - SHIFT if padding != (0, 0) else 0
        cols, (b, ho, wo) = _im2col_nhwc(xq, zp_s8, kh, kw, stride, padding, dilation)
    if taps is not None:
        w2 = taps.taps()
    elif kh == 1 and kw == 1:
        w2 = w_q.reshape(o, c)
    else:
        # weight in (O, kh, kw, C) order to match the patches: a per-call copy into this
        # thread's reusable buffer (layers hold a TapMajorCodes instead).  The bytes are
        # copied as uint8, for which torch's transposing copy is 1.8x faster than for int8
        w2 = contiguous_in_scratch("int_mm_weight", w_q.view(torch.uint8).permute(0, 2, 3, 1))
        w2 = w2.view(o, kh * kw * c).view(torch.int8)
    # row sums do not depend on the order within a row: patch-order codes serve as well
    scale, beff = consts if consts is not None else _epilogue_consts(w2, w_scale, bias, x_scale, x_zp, key,
                                                                     "conv_epi")
    y = _int_mm_epilogue(cols, w2.t(), scale, beff, x.dtype)
    return y.view(b, ho, wo, o).permute(0, 3, 1, 2)


def split_conv1x1_int_mm(x, x_scales, x_zps, split: int, w_q, w_scale, bias=None, key=None):
    """1x1 conv over concat(hidden, skip) whose two slices have their own act range.

    One int8 GEMM per slice (the weight split along input channels), summed in
    float: y = sum_i s_i s_w (acc_i - z_i' rowsum(W_i)) + b.
    """
    o, c = w_q.shape[:2]
    key = w_q if key is None else key
    w2 = w_q.reshape(o, c)
    y = None
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    for i, (lo, hi) in enumerate(((0, split), (split, c))):
        xi = x[:, lo:hi]
        if channels_last:  # the slice's pixels are rows of NHWC memory: gathered, not transposed
            xq = quantize_act(xi.permute(0, 2, 3, 1), x_scales[i], x_zps[i], signed=True).reshape(-1, hi - lo)
        else:
            xq = quantize_act(xi, x_scales[i], x_zps[i], signed=True).permute(0, 2, 3, 1).reshape(-1, hi - lo)
        wi = w2[:, lo:hi]
        scale, beff = _epilogue_consts(wi, w_scale, bias if i == 0 else None, x_scales[i], x_zps[i],
                                       key, f"split_epi{i}")
        yi = _int_mm_epilogue(xq, wi.t(), scale, beff, torch.float32)
        y = yi if y is None else y.add_(yi)
    b, _, h, w = x.shape
    return y.to(x.dtype).view(b, h, w, o).permute(0, 3, 1, 2)
