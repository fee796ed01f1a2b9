"""The Triton kernels (mixdq/quant/backends/triton_kernels.py), proven on the CPU in
Triton's interpreter: the very kernel body the GPU compiles, run on CPU tensors.

What is exact, and against what:
  * the int32 accumulator: equal to the integer product sum_k (Xq - 128) Wq (padded
    pixels: the zero point's code), for linears, convs and both slices of a split conv,
    from int8 and from packed 4- and 2-bit codes;
  * the int8 outputs: equal, bit for bit, to float32(acc) * scale + beff computed by
    torch with the int_mm backend's constants (common._epilogue_consts);
  * FP8: the kernel's e4m3 rounding of activations and weights equals
    torch.float8_e4m3fn's, bit for bit (one-hot GEMMs expose single roundings).
Within tolerance: the int8 outputs against the fake-quant reference (its float32 GEMM
rounds; 1e-5 relative), FP8 GEMMs against a float64 dot of the e4m3 values (float32
accumulation order; 1e-6 of the sum of |terms|).
Tile sizes are small here (16) so that M, N and K all have tails.
And what the GPU would run, compiled here for sm_90 / sm_80 (tk.compiling_for):
it compiles, on tensor cores, without register spills.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-dev.txt)")

from mixdq.quant import kernels, machine  # noqa: E402
from mixdq.quant.backends import common, reference  # noqa: E402
from mixdq.quant.backends import triton_cuda as T  # noqa: E402
from mixdq.quant.backends import triton_fp8  # noqa: E402
from mixdq.quant.backends import triton_kernels as tk  # noqa: E402
from mixdq.quant.packing import pack  # noqa: E402

BLOCKS = (16, 16, 16, 1, 1)


def _codes(shape, bits, gen):
    q = 2 ** (bits - 1)
    return torch.randint(-q, q, shape, generator=gen, dtype=torch.int8)


def _act(x):
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255
    return torch.tensor([s]), torch.tensor([float(round(-lo / s))])


def _xq(x, s, z):
    """The activation codes the reference quantizes to, as float64 (uint8 convention)."""
    return torch.clamp(torch.round(x.float() / s) + z, 0, 255).double()


def _raw_acc(x, w, per, geometry, parts):
    """Run the linear kernel with scale 1 and no bias: the output is float32(acc) (|acc| < 2^24 here)."""
    n = geometry["N"]
    s, z = geometry.pop("act")
    y = torch.empty(geometry["M"], n)
    tk.launch(x, w, y, s, z, torch.ones(parts * n), torch.zeros(parts * n), geometry, per=per, parts=parts,
              fp8=False, blocks=BLOCKS)
    return y.double()


@pytest.mark.parametrize("act_quant", ["tile", "first"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_accumulator_and_output_exact(bits, act_quant):
    g = torch.Generator().manual_seed(bits)
    m, k, n = 37, 45, 29  # tails in M, N and K against 16-wide tiles
    x = torch.randn(m, k, generator=g) * 3 + 0.5
    wq = _codes((n, k), bits, g)
    ws = torch.rand(n, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g)
    s, z = _act(x)
    w = wq if bits == 8 else pack(wq, bits)
    per = {8: 1, 4: 2, 2: 4}[bits]
    geometry = dict(M=m, N=n, C=k, H=1, W=1, HO=1, WO=1, SPLIT=k, sx=(k, 1, 0, 0), sw=(k, 1, 0, 0),
                    sy=(n, 1, 0, 0), KH=1, KW=1, STRIDE=1, PAD=0, DIL=1, act=(s, z))
    acc = _raw_acc(x, w, per, geometry, 1)
    exact = (_xq(x, s, z) - 128) @ wq.double().t()
    assert torch.equal(acc, exact)

    y = T.linear_triton(x, s, z, w, ws, b, bits=bits, shape=(n, k), blocks=BLOCKS, act_quant=act_quant)
    scale, beff = common._epilogue_consts(wq, ws, b, s, z, wq, "test")
    assert torch.equal(y, exact.float() * scale + beff)
    ref = reference.linear_reference(x, s, z, wq, ws, b)
    assert float((y - ref).norm() / ref.norm()) < 1e-5


# 8-bit 3x3 convs on channels_last inputs (taps outer), the others NCHW (taps inner, TAP_INNER)
@pytest.mark.parametrize("case", [dict(k=3, stride=1, padding=1), dict(k=3, stride=2, padding=1),
                                  dict(k=3, stride=1, padding=1, layout=torch.contiguous_format),
                                  dict(k=1, stride=1, padding=0), dict(k=3, stride=2, padding=0, bits=4),
                                  dict(k=3, stride=1, padding=2, dilation=2, bits=2)])
@pytest.mark.parametrize("act_quant", ["tile", "first"])
def test_conv_accumulator_and_output_exact(case, act_quant):
    case = dict(case)
    kk, bits = case.pop("k"), case.pop("bits", 8)
    g = torch.Generator().manual_seed(kk + bits)
    b_, c, o, h, wd = 2, 7, 19, 9, 6  # batch 2, odd channel counts, non-square image
    layout = case.pop("layout", torch.channels_last if kk == 3 and bits == 8 else torch.contiguous_format)
    x = (torch.randn(b_, c, h, wd, generator=g) * 2).contiguous(memory_format=layout)
    wq = _codes((o, c, kk, kk), bits, g)
    ws = torch.rand(o, generator=g) * 0.02 + 1e-3
    bias = torch.randn(o, generator=g)
    s, z = _act(x)
    w = wq if bits == 8 else pack(wq, bits)
    y = T.conv2d_triton(x, s, z, w, ws, bias, bits=bits, shape=wq.shape, blocks=BLOCKS, act_quant=act_quant,
                        **case)
    st, p, d = case["stride"], case["padding"], case.get("dilation", 1)
    xq = F.pad(_xq(x, s, z), (p, p, p, p), value=float(z))  # zero padding = the zero point's code
    exact = F.conv2d(xq - 128, wq.double(), None, st, 0, d)  # integers below 2^53: exact
    scale, beff = common._epilogue_consts(wq.reshape(o, -1), ws, bias, s, z, wq, "test")
    assert y.shape == exact.shape
    assert torch.equal(y, exact.float() * scale.view(-1, 1, 1) + beff.view(-1, 1, 1))
    ref = reference.conv2d_reference(x, s, z, wq, ws, bias, **case)
    assert float((y - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("act_quant", ["tile", "first"])
def test_split_shortcut_conv_exact_per_slice(act_quant):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 13, 5, 6, generator=g) * 20
    skip = torch.randn(2, 9, 5, 6, generator=g) * 0.1
    x = torch.cat([hidden, skip], 1)
    wq = _codes((21, 22, 1, 1), 8, g)
    ws = torch.rand(21, generator=g) * 0.02 + 1e-3
    bias = torch.randn(21, generator=g)
    (s0, z0), (s1, z1) = _act(hidden), _act(skip)
    ss, zs = torch.cat([s0, s1]), torch.cat([z0, z1])
    y = T.split_conv1x1_triton(x, ss, zs, 13, wq, ws, bias, blocks=BLOCKS, act_quant=act_quant)
    w2 = wq.reshape(21, 22)
    out = None
    for (lo, hi), s, z in (((0, 13), s0, z0), ((13, 22), s1, z1)):
        acc = torch.einsum("bchw,oc->bohw", _xq(x[:, lo:hi], s, z) - 128, w2[:, lo:hi].double())
        scale, beff = common._epilogue_consts(w2[:, lo:hi], ws, bias if lo == 0 else None, s, z, wq, f"t{lo}")
        t = acc.float() * scale.view(-1, 1, 1) + beff.view(-1, 1, 1)
        out = t if out is None else out + t
    assert torch.equal(y, out)
    ref = (reference.conv2d_reference(hidden, s0, z0, wq[:, :13], ws, bias)
           + reference.conv2d_reference(skip, s1, z1, wq[:, 13:], ws, None))
    assert float((y - ref).norm() / ref.norm()) < 1e-5


def _e4m3(v):
    return v.float().to(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("act_quant", ["tile", "first"])
def test_fp8_rounding_matches_torch_e4m3(act_quant):
    """One-hot GEMMs: every output is a single e4m3 activation (weight) times 1, so the
    kernel's rounding is compared element by element: ties, subnormals, saturation."""
    special = torch.tensor([7.77, 7.75, 0.001, 0.0029, 1000.0, -3.3, 0.0, -0.0, 447.0, 300.1, 17.0, -127.0,
                            1 / 512, 3 / 1024, 5e-4, 2.0 ** -6])
    x = torch.cat([special, torch.randn(16, generator=torch.Generator().manual_seed(0)) * 40]).reshape(2, 16)
    s, z = torch.tensor([448.0 / 128]), torch.tensor([128.0])  # s8 = max(z, 255 - z) * s / 448 = 1
    eye = torch.eye(16, dtype=torch.int8)
    y = triton_fp8.linear_fp8(x, s, z, eye, torch.ones(16), None, blocks=BLOCKS, act_quant=act_quant)
    assert torch.equal(y, _e4m3(x.clamp(-448, 448)))
    codes = _codes((19, 16), 8, torch.Generator().manual_seed(1))
    yw = triton_fp8.linear_fp8(torch.eye(16), s, z, codes, torch.ones(19), None, blocks=BLOCKS,
                               act_quant=act_quant)
    assert torch.equal(yw, _e4m3(codes).t())


@pytest.mark.parametrize("act_quant", ["tile", "first"])
@pytest.mark.parametrize("op", ["linear", "conv", "split"])
def test_fp8_matches_emulated_e4m3_gemm(op, act_quant):
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(21, generator=g)
    ws = torch.rand(21, generator=g) * 0.02 + 1e-3
    if op == "linear":
        x = torch.randn(2, 19, 37, generator=g) * 3
        wq = _codes((21, 37), 8, g)
        s, z = _act(x)
        y = triton_fp8.linear_fp8(x, s, z, wq, ws, bias, blocks=BLOCKS, act_quant=act_quant)
        parts = [(x, s, z, wq)]
    else:
        x = torch.randn(2, 7, 6, 5, generator=g) * torch.tensor([5.0] * 4 + [0.1] * 3).view(1, -1, 1, 1)
        if op == "conv":
            wq = _codes((21, 7, 3, 3), 8, g)
            s, z = _act(x)
            y = triton_fp8.conv2d_fp8(x, s, z, wq, ws, bias, 1, 1, blocks=BLOCKS, act_quant=act_quant)
            parts = [(x, s, z, wq)]
        else:
            wq = _codes((21, 7, 1, 1), 8, g)
            (s0, z0), (s1, z1) = _act(x[:, :4]), _act(x[:, 4:])
            y = triton_fp8.conv2d_fp8(x, torch.cat([s0, s1]), torch.cat([z0, z1]), wq, ws, bias, split=4,
                                      blocks=BLOCKS, act_quant=act_quant)
            parts = [(x[:, :4], s0, z0, wq[:, :4]), (x[:, 4:], s1, z1, wq[:, 4:])]
    ref = bias.double().view(-1, *([1, 1] if op != "linear" else []))
    bound = ref.abs()
    for xp, s, z, wp in parts:
        s8 = torch.maximum(z * s, (255 - z) * s) / 448
        x8, w8 = _e4m3((xp / s8).clamp(-448, 448)).double(), _e4m3(wp).double()
        sc = (s8 * ws).double()
        if op == "linear":
            ref = ref + (x8 @ w8.t()) * sc
            bound = bound + (x8.abs() @ w8.abs().t()) * sc
        else:
            pad = 1 if op == "conv" else 0
            ref = ref + F.conv2d(x8, w8, None, 1, pad) * sc.view(-1, 1, 1)
            bound = bound + F.conv2d(x8.abs(), w8.abs(), None, 1, pad) * sc.view(-1, 1, 1)
    assert y.shape == ref.shape
    assert bool(((y.double() - ref).abs() <= 1e-6 * bound + 1e-30).all())


def _layers():
    from mixdq.plan import LayerBits
    from mixdq.quant.layers import QuantConv2d, QuantLinear
    from mixdq.quant.quantizers import ActRange

    torch.manual_seed(3)
    made = {"linear": (QuantLinear.from_float(torch.nn.Linear(36, 20), LayerBits(4, 8)), torch.randn(2, 5, 36)),
            "conv_s2": (QuantConv2d.from_float(torch.nn.Conv2d(8, 6, 3, stride=2, padding=1), LayerBits(8, 8)),
                        torch.randn(2, 8, 7, 7)),
            "split": (QuantConv2d.from_float(torch.nn.Conv2d(10, 6, 1), LayerBits(8, 8), split=6),
                      torch.cat([torch.randn(1, 6, 4, 5) * 5, torch.randn(1, 4, 4, 5) * 0.2], 1))}
    for layer, x in made.values():
        parts = [x[:, :layer.split], x[:, layer.split:]] if layer.split else [x]
        layer.set_ranges([ActRange(float(p.min()), float(p.max()), 1) for p in parts])
        layer.kernel = "int_mm"
    return made


@pytest.mark.parametrize("backend", ["triton", "triton_fp8"])
def test_layers_run_the_kernels_and_trace_fullgraph(monkeypatch, tmp_path, backend):
    """Forced onto the backend (the CPU runs it in the interpreter), quantized layers
    run the kernel from their packed buffers, and torch.compile(fullgraph=True) traces
    them as the custom ops (fake implementations give the shapes) with equal outputs."""
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", backend)
    for name, (layer, x) in _layers().items():
        assert layer.backend == backend, name
        with kernels.recording() as ran:
            eager = layer(x)
        assert ran == [(layer, backend)]
        if backend == "triton":
            codes = layer.int_codes()
            if layer.op == "linear":
                ref = reference.linear_reference(x, layer.act_scale, layer.act_zero_point, codes,
                                                 layer.weight_scale, layer.bias)
            elif layer.split:
                s = layer.split
                ref = (reference.conv2d_reference(x[:, :s], layer.act_scale[0], layer.act_zero_point[0],
                                                  codes[:, :s], layer.weight_scale, layer.bias)
                       + reference.conv2d_reference(x[:, s:], layer.act_scale[1], layer.act_zero_point[1],
                                                    codes[:, s:], layer.weight_scale, None))
            else:
                ref = reference.conv2d_reference(x, layer.act_scale[0], layer.act_zero_point[0], codes,
                                                 layer.weight_scale, layer.bias, **layer.conv_args)
            assert float((eager - ref).norm() / ref.norm()) < 1e-5, name
        torch._dynamo.reset()
        traced = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert torch.equal(traced, eager), name


def test_activation_quantized_first_or_in_the_tile_load_gives_one_result(monkeypatch, tmp_path):
    """Eager layers quantize in the tile load, compiled ones first (act_quant_mode), and
    MIXDQ_TRITON_ACT_QUANT sets either everywhere: the outputs are the same bits."""
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "triton")
    monkeypatch.delenv(T.ACT_QUANT_ENV, raising=False)
    assert (T.act_quant_mode(compiling=False), T.act_quant_mode(compiling=True)) == ("tile", "first")
    made = _layers()
    tile = {name: layer(x) for name, (layer, x) in made.items()}
    monkeypatch.setenv(T.ACT_QUANT_ENV, "first")
    for name, (layer, x) in made.items():
        assert torch.equal(layer(x), tile[name]), name
    monkeypatch.setenv(T.ACT_QUANT_ENV, "fused")
    with pytest.raises(ValueError, match="'tile'.*'first'"):
        made["linear"][0](made["linear"][1])


@pytest.mark.parametrize("backend", ["triton", "int_mm"])
def test_few_row_linears_leave_the_int8_path_only_for_int_mm(monkeypatch, tmp_path, backend):
    """torch._int_mm's CUDA shape limits (more than 16 rows) send such calls to the float
    path; the triton kernel takes them.  int_mm_ok answers as on CUDA for a 2-row input."""
    from mixdq.quant import layers

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", backend)
    monkeypatch.setattr(layers, "int_mm_ok", lambda m, k, n, device: m > 16)
    layer, _ = _layers()["linear"]
    with kernels.recording() as ran:
        layer(torch.randn(2, 36))
    assert ran == [(layer, backend if backend == "triton" else "float")]


def test_fake_implementations_give_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 9, 7)
        packed = torch.empty(6 * 8 * 9, dtype=torch.int8)
        one = torch.ones(1)
        y = torch.ops.mixdq.triton_conv2d(x, packed, 8, [6, 8, 3, 3], torch.ones(6), None, one, one,
                                          [2, 2], [1, 1], [1, 1], 0, False, "tile", torch.float32)
        assert y.shape == (2, 6, 5, 4) and y.dtype == torch.float32
        yl = torch.ops.mixdq.triton_linear(torch.empty(3, 5, 36), torch.empty(360, dtype=torch.uint8), 4,
                                           [20, 36], torch.ones(20), None, one, one, True, "codes",
                                           torch.float16)
        assert yl.shape == (3, 5, 20) and yl.dtype == torch.float16


def test_cuda_measurement_candidates_compute_one_function(monkeypatch):
    """Every path the GPU measurement times (machine._cuda_candidates, on small shapes,
    the triton ones in the interpreter) computes the W8A8 layer's function, and the kernel
    on ready-made codes gives the tile load's bits."""
    monkeypatch.setattr(machine, "CUDA_LINEAR_SHAPE", (20, 32, 24))
    monkeypatch.setattr(machine, "CUDA_CONV_SHAPE", (8, 12, 6))
    with torch.inference_mode():
        paths = machine._cuda_candidates(torch.device("cpu"))
        for kind in ("linear", "conv"):
            assert {"float16", "triton", "triton_codes"} <= set(paths[kind]), kind
            out = {name: fn().float() for name, fn in paths[kind].items()}
            assert torch.equal(out["triton"], out["triton_codes"]), kind
            for name, y in out.items():
                tol = 0.1 if name == "triton_fp8" else 1e-2  # e4m3 is another quantization
                assert float((y - out["float16"]).norm() / out["float16"].norm()) < tol, (kind, name)


def test_cuda_dispatch_takes_the_measured_backend_per_layer_type(monkeypatch):
    """What a GPU measured (machine._pick_cuda) decides each layer type there; FP8 and the
    kernel on ready-made codes are never picked by measurement, and packed codes of the
    wrong size are refused."""
    times = {"linear": {"float16": 2e-4, "int_mm": 3e-4, "triton": 1e-4, "triton_fp8": 5e-5},
             "conv": {"float16": 1e-4, "triton": 2e-4, "triton_codes": 5e-5}}
    choice = machine._pick_cuda(times)
    assert (choice["linear_backend"], choice["conv_backend"], choice["kernel"]) == ("triton", "float", "int_mm")
    assert machine._pick_cuda({"linear": {"float16": 1.0, "int_mm": 2.0}})["kernel"] == "dequant"
    monkeypatch.setattr(machine, "cuda_choice", lambda device: choice)
    monkeypatch.delenv("MIXDQ_INT8_BACKEND", raising=False)
    assert kernels.layer_backend("linear", 8, 8, "cuda", weight_shape=(20, 36)) == "triton"
    assert kernels.layer_backend("conv", 8, 8, "cuda", weight_shape=(6, 8, 3, 3)) == "float"
    assert kernels.layer_backend("linear", 8, 6, "cuda") == "float"  # 6-bit activations: no int8 path
    assert not machine.saturates("triton") and not machine.saturates("triton_fp8")
    with pytest.raises(ValueError, match="packed 4-bit container"):
        T.linear_triton(torch.randn(2, 36), 0.1, 128, torch.zeros(100, dtype=torch.uint8), torch.ones(20),
                        bits=4, shape=(20, 36))


# The calls an SDXL-Turbo UNet step makes at 512 px (64x64 latents, CLIP's 77 tokens),
# as (name, function of act_quant making the call); every kernel configuration
# cuda_blocks can pick for them appears once at least.
def _sdxl_calls():
    h = torch.float16

    def codes(*shape):
        return torch.zeros(shape, dtype=torch.int8)

    def lin(m, k, n, bits=8, fp8=False, dtype=h):
        w = pack(codes(n, k), bits)
        return lambda aq: T.linear_triton(torch.zeros(m, k, dtype=dtype), torch.tensor(0.1), torch.tensor(128.), w,
                                          torch.ones(n), torch.zeros(n, dtype=dtype), bits=bits, shape=(n, k),
                                          fp8=fp8, act_quant=aq)

    def conv(c, o, side, k=3, stride=1, bits=8, fp8=False, channels_last=False):
        x = torch.zeros(1, c, side, side, dtype=h)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        w = pack(codes(o, c, k, k), bits)
        return lambda aq: T.conv2d_triton(x, torch.tensor(0.1), torch.tensor(128.), w, torch.ones(o), None, stride,
                                          k // 2, bits=bits, shape=(o, c, k, k), fp8=fp8, act_quant=aq)

    def split(hidden, skip, o, side, fp8=False):
        x = torch.zeros(1, hidden + skip, side, side, dtype=h)
        return lambda aq: T.split_conv1x1_triton(x, torch.tensor([0.1, 0.2]), torch.tensor([128., 120.]), hidden,
                                                 codes(o, hidden + skip, 1, 1), torch.ones(o),
                                                 torch.zeros(o, dtype=h), fp8=fp8, act_quant=aq)

    return [("attention projection 4096x640x640", lin(4096, 640, 640)),
            ("W4 attention projection", lin(4096, 640, 640, bits=4)),
            ("W2 attention projection", lin(4096, 640, 640, bits=2)),
            ("bfloat16 attention projection", lin(4096, 640, 640, dtype=torch.bfloat16)),
            ("feed-forward 1024x1280x10240", lin(1024, 1280, 10240)),
            ("text K/V 77x2048x1280", lin(77, 2048, 1280)),
            ("resnet conv 3x3 320ch 64x64", conv(320, 320, 64)),
            ("resnet conv channels_last", conv(320, 320, 64, channels_last=True)),
            ("W4 resnet conv", conv(320, 320, 64, bits=4)),
            ("W2 resnet conv", conv(640, 640, 32, bits=2)),
            ("downsample conv stride 2", conv(320, 320, 64, stride=2)),
            ("conv_in 4 channels", conv(4, 320, 64)),
            ("conv_out 4 channels", conv(320, 4, 64)),
            ("up-block shortcut 1x1 split", split(640, 320, 320, 64)),
            ("FP8 linear", lin(4096, 640, 640, fp8=True)),
            ("FP8 conv", conv(320, 320, 64, fp8=True)),
            ("FP8 split", split(640, 320, 320, 64, fp8=True))]


@pytest.mark.parametrize("act_quant", ["tile", "first"])  # eager, and what torch.compile runs
@pytest.mark.parametrize("capability", [90, 80])
def test_cuda_kernels_compile_for_the_gpu_on_tensor_cores_without_spills(capability, act_quant):
    """What the GPU gets, checked without one: every kernel configuration SDXL-Turbo's
    calls pick compiles for H100/H200 (sm_90) and A100 (sm_80, no FP8) through the real
    wrappers, specialised as a real launch would be, runs its dot products on int8 (or
    e4m3) tensor cores, loads a tile asynchronously in the software pipeline where
    its layout allows, and keeps its registers: no spills to local memory (a kernel that spills
    is slow whatever its tiles; 3x3 taps unrolled, full tiles for the split conv and
    3 stages for packed codes did spill).  Not checked here: coalescing (an NCHW conv's
    weight tile is contiguous only with the taps inner, TAP_INNER) and speed."""
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no CUDA compiler")
    for name, call in _sdxl_calls():
        fp8 = name.startswith("FP8")
        if fp8 and capability < 89:
            continue  # e4m3 tensor cores start at sm_89
        with tk.compiling_for(capability) as build:
            call(act_quant)
        assert len(build.kernels) == 1, name
        meta, compiled = build.kernels[0]
        ptx = compiled.asm["ptx"]
        assert (".e4m3.e4m3" if fp8 else ".s32.s8.s8") in ptx, f"{name}: no tensor-core dot in the PTX"
        if capability >= 90:
            assert "wgmma.mma_async" in ptx, name
        # a tile that loads byte by byte cannot load asynchronously: packed codes (two or
        # four to a byte), conv_in's 36-code weight rows (not 16-byte aligned), and with
        # the codes made first, the split conv's int8 NCHW activation (along pixels)
        exempt = ("W4", "W2", "conv_in") + (("up-block", "FP8 split") if act_quant == "first" else ())
        if not name.startswith(exempt):
            assert "async_copy_global_to_local" in compiled.asm["ttgir"], f"{name}: no tile load is pipelined"
        usage = tk.resource_usage(compiled)
        assert usage["stack_bytes"] == 0, f"{name} ({meta}) spills: {usage}"
        assert usage["shared_bytes"] <= 227 * 1024, name
