"""The Triton kernel behind the `triton` and `triton_fp8` backends: one implicit GEMM
that runs linears, 3x3 / 1x1 convs (any stride, padding, dilation) and the split
up-block shortcut conv, with the activation quantization fused into the A-tile
load (or, A_CODES, the activation's codes read as they are, quantized before),
weight codes unpacked from their packed container (1, 2 or 4 codes per byte)
inside the kernel, an exact int32 accumulator (int8 mode) or an FP8 e4m3 dot
(fp8 mode), and the epilogue y = acc * scale + beff fused.

Imported only where triton is installed (backends/triton_cuda.py checks first).
CUDA tensors run the compiled kernel; CPU tensors run the very same kernel body in
Triton's interpreter (`InterpretedFunction`, built explicitly, so TRITON_INTERPRET
need not be set, nor set before anything imports triton), which is how the kernel
is proven against the reference without a GPU (tests/test_triton_kernels.py).
`compiling_for(capability)` compiles the CUDA kernels a GPU would get, with Triton's
compiler and bundled ptxas on any machine, so that the code the GPU runs is checked
there too: that it compiles (the interpreter accepts things the compiler refuses),
that its dots are tensor-core instructions, and that it does not spill registers.

Rounding is written out in float32 arithmetic rather than taken from libdevice or
from float8 casts: round-half-even of x / s by adding and subtracting 1.5 * 2^23
(exact for |v| <= 2^22, and v is clamped to 512 first), and e4m3 rounding with the
same trick at the value's own e4m3 spacing.  Both are IEEE operations that the
compiled kernel and the interpreter evaluate identically (libdevice does not exist
in the interpreter, and its float32 -> e4m3 cast does not carry a rounded-up
mantissa into the exponent: 7.77 came out as 4), so the casts that follow are exact.
"""
import contextlib
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl

# kernel globals must be constexpr (the compiler refuses others; the interpreter does not)
RND = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + RND - RND rounds v to an integer, ties to even
E4M3_MAX = tl.constexpr(448.0)


def _igemm(x_ptr, w_ptr, y_ptr, sa_ptr, za_ptr, scale_ptr, beff_ptr,
           M, N, C, H, W, HO, WO, SPLIT,
           sxb, sxc, sxh, sxw, swn, swc, swh, sww, syb, syn, syh, syw,
           KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
           DIL: tl.constexpr, PER: tl.constexpr, PARTS: tl.constexpr, FP8: tl.constexpr,
           TAP_INNER: tl.constexpr, A_CODES: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Output pixel m = ((b * HO) + oh) * WO + ow; a linear is B = M rows of 1x1 pixels.
    # x: the float activation, quantized in the tile load, or (A_CODES) its codes,
    # quantized before the kernel: signed int8 (code - 128), or e4m3 in FP8 mode.
    # Input channels [0, SPLIT) and [SPLIT, C) are the PARTS slices, each with its
    # own activation (scale, zero point) and its own accumulator and epilogue.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    ow = rm % WO
    oh = (rm // WO) % HO
    ob = rm // (WO * HO)
    for part in tl.static_range(PARTS):
        if part == 0:
            lo = 0
            hi = SPLIT
        else:
            lo = SPLIT
            hi = C
        s = tl.load(sa_ptr + part)
        z = tl.load(za_ptr + part)
        # A_CODES: padded pixels read the code quantizing 0.0 gives (int8: the zero point's)
        pad = 0.0 if FP8 else z - 128.0
        if FP8:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        else:
            acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        # Two orders of the reduction index k over (channel c, tap kh kw):
        # TAP_INNER (NCHW convs with taps): k = c * KH * KW + tap, the order of the
        # OIHW weight, so a weight tile is contiguous along k and loads in vectors
        # (with taps outer its bytes sat KH * KW apart and loaded one by one); an
        # activation tile then steps through pixels along m, still contiguous.
        # Otherwise (linears, 1x1 convs, channels_last inputs): KW unrolled loops,
        # each over (kh, channel block), so the channels a tile reads are contiguous;
        # a tap column known at compile time keeps an NCHW 1x1 input's pixels
        # provably contiguous for the asynchronous loads, and fewer unrolled copies
        # keep registers from spilling (KH * KW copies did).
        taps = KH * KW
        c_blocks = (hi - lo + BLOCK_K - 1) // BLOCK_K  # not tl.cdiv: the interpreter cannot call it
        if TAP_INNER:
            steps = ((hi - lo) * taps + BLOCK_K - 1) // BLOCK_K
        else:
            steps = KH * c_blocks
        for kw0 in tl.static_range(1 if TAP_INNER else KW):
            for it in range(steps):
                if TAP_INNER:
                    k = lo * taps + it * BLOCK_K + rk
                    k_ok = k < hi * taps
                    c = k // taps
                    kh = (k % taps) // KW
                    kw = k % KW
                    ih = oh[:, None] * STRIDE - PAD + kh[None, :] * DIL
                    iw = ow[:, None] * STRIDE - PAD + kw[None, :] * DIL
                    x_off = (ob * sxb)[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :]
                    f = rn[None, :] * swn + k[:, None]  # flat code index, (K, N) tile
                else:
                    kh = it // c_blocks
                    c = lo + (it % c_blocks) * BLOCK_K + rk
                    k_ok = c < hi
                    ih1 = oh * STRIDE - PAD + kh * DIL
                    iw1 = ow * STRIDE - PAD + kw0 * DIL
                    x_off = (ob * sxb + ih1 * sxh + iw1 * sxw)[:, None] + c[None, :] * sxc
                    f = (rn * swn + kh * swh + kw0 * sww)[None, :] + c[:, None] * swc
                    ih = ih1[:, None]
                    iw = iw1[:, None]
                # padded pixels load 0.0, which quantizes to the zero point: the
                # zero-point term of the epilogue (over every tap) then cancels them
                a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                if A_CODES:
                    xa = tl.load(x_ptr + x_off, mask=a_ok, other=pad)
                else:
                    a = tl.load(x_ptr + x_off, mask=a_ok, other=0.0).to(tl.float32)
                w_ok = k_ok[:, None] & n_ok[None, :]
                if PER == 1:
                    wq = tl.load(w_ptr + f, mask=w_ok, other=0)
                else:
                    byte = tl.load(w_ptr + f // PER, mask=w_ok, other=0).to(tl.int32)
                    width = 8 // PER
                    wq = (byte >> ((f % PER) * width)) & ((1 << width) - 1)
                    wq = tl.where(w_ok, wq - (1 << (width - 1)), 0).to(tl.int8)
                if FP8:
                    if A_CODES:
                        a8 = xa
                    else:
                        v = tl.minimum(tl.maximum(tl.math.div_rn(a, s), -E4M3_MAX), E4M3_MAX)
                        e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)
                        magic = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
                        a8 = ((v + magic) - magic).to(tl.float8e4nv)
                    wf = wq.to(tl.float32)
                    e = tl.maximum((wf.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)
                    magic = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
                    w8 = ((wf + magic) - magic).to(tl.float8e4nv)
                    acc = tl.dot(a8, w8, acc, out_dtype=tl.float32)
                else:
                    if A_CODES:
                        q = xa
                    else:
                        v = tl.minimum(tl.maximum(tl.math.div_rn(a, s), -512.0), 512.0)
                        q = (tl.minimum(tl.maximum((v + RND) - RND + z, 0.0), 255.0) - 128.0).to(tl.int8)
                    acc = tl.dot(q, wq, acc, out_dtype=tl.int32)
        sc = tl.load(scale_ptr + part * N + rn, mask=n_ok, other=0.0)
        be = tl.load(beff_ptr + part * N + rn, mask=n_ok, other=0.0)
        if part == 0:
            y = acc.to(tl.float32) * sc[None, :] + be[None, :]
        else:
            y = y + (acc.to(tl.float32) * sc[None, :] + be[None, :])
    out = y_ptr + (ob * syb + oh * syh + ow * syw)[:, None] + rn[None, :] * syn
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_BUILT: dict = {}


def kernel(device_type: str):
    """The kernel for tensors on `device_type`: compiled for CUDA, interpreted for the CPU."""
    if device_type not in _BUILT:
        if device_type == "cuda":
            _BUILT[device_type] = triton.jit(_igemm)
        elif device_type == "cpu":
            from triton.runtime.interpreter import InterpretedFunction

            _BUILT[device_type] = InterpretedFunction(_igemm)
        else:
            raise RuntimeError(f"the triton backend runs CUDA tensors (CPU ones in Triton's interpreter), "
                               f"not {device_type}: move the model to CUDA or pick another backend")
    return _BUILT[device_type]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).  The interpreter pays per
# operation, not per element: big tiles are fastest there.
CPU_BLOCKS = (64, 64, 64, 4, 1)


def cuda_blocks(m: int, n: int, k: int, parts: int = 1, per: int = 1) -> tuple:
    """Tile sizes for an (m x k) @ (k x n) GEMM on the GPU: 128x128x64 tiles in 8 warps,
    3 pipeline stages; halved in M where few rows would leave most of the GPU's SMs
    idle, and in N for a split conv, whose first slice's result stays live beside the
    second's accumulator; 32 wide in 4 warps for a few output channels (conv_out's 4);
    32 deep in 2 stages for packed 2-4-bit codes, whose unpacking needs the registers
    that deeper tiles and a third stage take.  Each exception removed register spills
    that the full configuration had on sm_90 or sm_80 (tests/test_triton_kernels.py
    checks that none spill)."""
    bm = 128 if m >= 2048 else 64
    bn = 32 if n <= 32 else 128 if n >= 128 and parts == 1 else 64
    bk = 64 if k >= 64 and per == 1 else 32
    return bm, bn, bk, 4 if bn == 32 else 8, 3 if per == 1 else 2


def launch(x, w, y, sa, za, scale, beff, geometry: dict, *, per: int, parts: int, fp8: bool,
           blocks: tuple | None = None, a_codes: bool = False):
    """Run the kernel.  geometry: M N C H W HO WO SPLIT, the x / weight-code / y strides
    (in elements, in codes for the weight), KH KW STRIDE PAD DIL.  a_codes: x holds the
    activation's codes (int8, or e4m3 with fp8), not the float activation.
    Inside `compiling_for(...)`: compile the CUDA kernel for these arguments instead."""
    g = geometry
    dev = "cuda" if _COMPILING else x.device.type
    if blocks is None:
        blocks = CPU_BLOCKS if dev == "cpu" else cuda_blocks(g["M"], g["N"], g["C"], parts, per)
    bm, bn, bk, warps, stages = blocks
    grid = (triton.cdiv(g["M"], bm), triton.cdiv(g["N"], bn))
    args = (x, w, y, sa, za, scale, beff, g["M"], g["N"], g["C"], g["H"], g["W"], g["HO"], g["WO"], g["SPLIT"],
            *g["sx"], *g["sw"], *g["sy"])
    # taps inner where the input's channels are not contiguous (NCHW convs): see the kernel
    tap_inner = g["KH"] * g["KW"] > 1 and g["sx"][1] != 1
    meta = dict(KH=g["KH"], KW=g["KW"], STRIDE=g["STRIDE"], PAD=g["PAD"], DIL=g["DIL"], PER=per, PARTS=parts,
                FP8=fp8, TAP_INNER=tap_inner, A_CODES=a_codes, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if dev == "cuda":
        # no fused multiply-add in the epilogue: acc * scale + beff rounds twice, as
        # the reference computation of the same formula does
        meta.update(num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    if _COMPILING:
        build = _COMPILING[-1]
        build.kernels.append((meta, build.jit.warmup(*args, grid=grid, **meta)))
    else:
        kernel(dev)[grid](*args, **meta)
    return y


# ---------------------------------------------------------------------------
# compiling for a GPU that is not here
# ---------------------------------------------------------------------------
class _TargetOnlyDriver:
    """Stands in for the CUDA driver while compiling: a warm-up compile asks the driver
    only for a device, a stream and the target, and never loads the binary."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class CudaBuild:
    """What `compiling_for` compiled: (launch meta, triton CompiledKernel) per launch."""

    def __init__(self):
        self.jit = triton.jit(_igemm)  # its own compile cache, never the one real launches use
        self.kernels: list = []


_COMPILING: list[CudaBuild] = []


@contextlib.contextmanager
def compiling_for(capability: int = 90):
    """Within it, every `launch` compiles the CUDA kernel a GPU of compute capability
    `capability` (90: H100 / H200, 80: A100) would run for the same arguments, with
    the same specialisation on strides and alignment, and does not run it: CPU
    tensors stand in for CUDA ones and outputs stay unwritten.  Triton's own
    compiler and its bundled ptxas do the work, so no GPU is needed: this is how
    the code the GPU gets is checked (it compiles; registers and spills,
    `resource_usage`) on any machine.  Yields the CudaBuild."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    build = CudaBuild()
    before = driver._active
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", capability, 32)))
    _COMPILING.append(build)
    try:
        yield build
    finally:
        _COMPILING.pop()
        driver._active = before


def resource_usage(compiled) -> dict:
    """Registers and stack (spilled registers) per thread, and shared memory per block,
    of a compiled CUDA kernel, read from its cubin by the cuobjdump Triton ships."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return dict(registers=int(usage["REG"]), stack_bytes=int(usage["STACK"]), shared_bytes=compiled.metadata.shared)
