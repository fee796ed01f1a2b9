import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixdq.plan import LayerBits
from mixdq.quant import hold_epilogue, kernels
from mixdq.quant.backends import common, int_mm
from mixdq.quant.layers import BOS_KEY_LEN, QuantConv2d, QuantLinear, quantized_nbytes
from mixdq.quant.quantizers import ActRange, act_qparams, fake_quantize_act, fake_quantize_weight


def _nbytes(module):
    return sum(t.nbytes for t in module.state_dict().values())


def _float_tensors(module):
    return [n for n, t in module.state_dict().items() if t.is_floating_point() and t.dim() >= 2]


@pytest.mark.parametrize("w,a", [(2, 8), (3, 8), (4, 8), (5, 6), (6, 4), (7, 8), (8, 8), (16, 8), (4, 16)])
def test_linear_matches_fake_quant_reference_and_bytes(w, a):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    x = torch.randn(3, 10, 40) * 2 + 0.5
    q = QuantLinear.from_float(lin, LayerBits(w, a))
    q.kernel = "dequant"
    q.set_ranges([ActRange(float(x.min()), float(x.max()), 1)])
    ref_w = lin.weight if w == 16 else fake_quantize_weight(lin.weight, w)
    ref_x = x
    if a != 16:
        s, z = act_qparams(float(x.min()), float(x.max()), a)
        ref_x = fake_quantize_act(x, s, z, a)
    torch.testing.assert_close(q(x), F.linear(ref_x, ref_w, lin.bias), rtol=1e-5, atol=1e-5)
    # packed storage: the float weight is gone, and the byte count is exact
    if w != 16:
        assert _float_tensors(q) == []
    assert _nbytes(q) == quantized_nbytes((24, 40), True, LayerBits(w, a), torch.float32)


def test_dequant_path_reuses_one_scratch_buffer_per_dtype():
    """Forwards on the dequant path write the float weight into one reused
    per-thread buffer: results stay exact across layers of different sizes, in
    and out of inference mode, and the buffer is the largest weight's size."""
    from mixdq.quant.backends import common

    torch.manual_seed(4)
    float_layers = [nn.Linear(40, 24), nn.Conv2d(6, 10, 3, padding=1), nn.Linear(16, 8)]
    inputs = [torch.randn(2, 5, 40), torch.randn(1, 6, 7, 7), torch.randn(3, 16)]
    quant = [(QuantLinear if isinstance(m, nn.Linear) else QuantConv2d).from_float(m, LayerBits(4, 16))
             for m in float_layers]
    refs = [F.linear(x, fake_quantize_weight(m.weight, 4), m.bias) if isinstance(m, nn.Linear)
            else F.conv2d(x, fake_quantize_weight(m.weight, 4), m.bias, padding=1)
            for m, x in zip(float_layers, inputs)]
    common._SCRATCH.clear()
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            for q, x, ref in zip(quant, inputs, refs):
                torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    buffers = common._SCRATCH.buffers()
    assert list(buffers) == [("weight", torch.float32)]
    assert buffers[("weight", torch.float32)].numel() == 40 * 24
    # the public accessor returns a tensor of its own
    w = quant[0].dequantized_weight(torch.float32)
    assert w.data_ptr() != buffers[("weight", torch.float32)].data_ptr()


def test_bytes_per_bit_are_packed():
    lin = nn.Linear(64, 32, bias=False)
    sizes = {w: _nbytes(QuantLinear.from_float(lin, LayerBits(w, 8))) for w in (2, 4, 8)}
    extra = 32 * 4 + 8  # float32 scales + act scale/zero point
    assert sizes == {2: 64 * 32 // 4 + extra, 4: 64 * 32 // 2 + extra, 8: 64 * 32 + extra}


@pytest.mark.parametrize("w,a", [(4, 8), (7, 8), (8, 8), (2, 16), (8, 4)])
def test_conv_matches_reference(w, a):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, padding=1, stride=2)
    x = torch.randn(2, 6, 9, 9)
    q = QuantConv2d.from_float(conv, LayerBits(w, a))
    q.set_ranges([ActRange(float(x.min()), float(x.max()), 1)])
    ref_x = x
    if a != 16:
        s, z = act_qparams(float(x.min()), float(x.max()), a)
        ref_x = fake_quantize_act(x, s, z, a)
    ref = F.conv2d(ref_x, fake_quantize_weight(conv.weight, w), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    assert _float_tensors(q) == []
    assert _nbytes(q) == quantized_nbytes(conv.weight.shape, True, LayerBits(w, a), torch.float32)


def test_int_mm_path_matches_reference():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 20, 64)
    q = QuantLinear.from_float(lin, LayerBits(8, 8))
    q.set_ranges([ActRange(float(x.min()), float(x.max()), 1)])
    q.kernel = "dequant"
    ref = q(x)
    q.kernel = "int_mm"
    out = q(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_held_epilogue_follows_ranges_and_loads_and_traces(monkeypatch):
    """hold_epilogue (for torch.compile): same outputs as the cached eager path, kept
    current through set_ranges and load_state_dict, never saved, traceable."""
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "int_mm")  # the backend that reads held constants
    torch.manual_seed(3)
    x = torch.randn(2, 20, 64)
    r1, r2 = ActRange(float(x.min()), float(x.max()), 1), ActRange(-1.0, 2.5, 1)

    def model(seed):
        torch.manual_seed(seed)
        layers = [QuantLinear.from_float(nn.Linear(64, 64), LayerBits(w, a)) for w, a in ((8, 8), (4, 8), (8, 16))]
        for layer in layers:
            layer.kernel = "int_mm"
            layer.set_ranges([r1])
        return nn.Sequential(*layers[:1], nn.ReLU(), *layers[1:])

    ref, held = model(0), model(0)
    assert hold_epilogue(held) == 2  # the A16 layer has no integer path
    # the 4-bit layer's constants were cached under its packed codes, not a transient unpacked copy
    assert held[2].weight_bits == 4 and held[2].weight_packed in common._CACHE
    expected = ref(x)
    assert not any("epilogue" in k for k in held.state_dict())
    # the held path does not consult the cache at all
    monkeypatch.setattr(int_mm, "_epilogue_consts", lambda *a, **k: pytest.fail("cache used"))
    torch.testing.assert_close(held(x), expected, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "int_mm")
    # new ranges refresh the held constants
    for m in (ref, held):
        m[0].set_ranges([r2])
    torch.testing.assert_close(held(x), ref(x), rtol=0, atol=0)
    # loading other weights refreshes them too (export.load assigns tensors)
    other = model(1)
    held.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(held(x), other(x), rtol=0, atol=0)
    torch.save(held, io.BytesIO())  # the load hook pickles with the module
    compiled = torch.compile(held, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), other(x), rtol=1e-6, atol=1e-6)


def test_kernel_dispatch_override_and_report(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    assert kernels.select_kernel("cpu", override="dequant") == "dequant"
    monkeypatch.setenv("MIXDQ_KERNEL", "int_mm")
    assert kernels.select_kernel("cpu") == "int_mm"
    monkeypatch.setenv("MIXDQ_KERNEL", "cuda-magic")
    with pytest.raises(ValueError, match="int_mm"):
        kernels.select_kernel("cpu")
    monkeypatch.delenv("MIXDQ_KERNEL")
    report = kernels.kernel_report("cpu")
    assert report["kernel"] in kernels.KERNELS and "AVX" in report["cpu"] or "DEFAULT" in report["cpu"]


def test_split_shortcut_quantizes_slices_separately():
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 8, 1)
    with torch.no_grad():
        conv.weight[:, :8] = 0  # the output reads only the skip slice
    hidden = torch.randn(1, 8, 5, 5) * 20  # wide range
    skip = torch.randn(1, 8, 5, 5) * 0.1   # narrow range: lost if quantized jointly
    x = torch.cat([hidden, skip], 1)
    ref = conv(x)
    errs = {}
    for split in (0, 8):
        q = QuantConv2d.from_float(conv, LayerBits(16, 8), split=split)
        q.start_observing("float")
        q(x)
        q.stop_observing()
        errs[split] = (q(x) - ref).pow(2).mean().item()
        if split:
            assert q.act_scale.numel() == 2 and q.act_scale[0] > 50 * q.act_scale[1]
    assert errs[8] < errs[0] / 100


def test_bos_aware_token0_exact_and_range_excludes_bos():
    torch.manual_seed(4)
    lin = nn.Linear(32, 16)
    bos = torch.randn(32) * 50  # BOS carries huge outliers
    tokens = torch.randn(2, 6, 32)
    x = torch.cat([bos.expand(2, 1, 32), tokens], 1)
    q = QuantLinear.from_float(lin, LayerBits(8, 8), bos_embedding=bos)
    q.kernel = "dequant"
    q.start_observing("float")
    q(x)
    q.stop_observing()
    assert q.ranges[0].hi <= tokens.max().item() + 1e-6  # BOS did not widen the range
    out = q(x)
    torch.testing.assert_close(out[:, 0], lin(bos).expand(2, 16), rtol=0, atol=1e-6)
    # a zeroed negative prompt has no BOS: token 0 computed on the fly (bias only here)
    x0 = x.clone()
    x0[1] = 0
    out0 = q(x0)
    torch.testing.assert_close(out0[1, 0], lin.bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(out0[0, 0], out[0, 0])
    # traced (torch.compile, fullgraph): no data-dependent branch, same outputs
    for kernel in ("dequant", "int_mm"):
        q.kernel = kernel
        torch._dynamo.reset()
        compiled = torch.compile(q, backend="eager", fullgraph=True)
        for inp in (x, x0):
            torch.testing.assert_close(compiled(inp), q(inp), rtol=1e-5, atol=1e-5)
    assert sum(t.nbytes for t in q.state_dict().values()) == quantized_nbytes(
        (16, 32), True, LayerBits(8, 8), torch.float32, bos=True)
    assert q.bos_key.numel() == BOS_KEY_LEN
