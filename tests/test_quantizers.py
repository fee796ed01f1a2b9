import pytest
import torch

from mixdq.quant.packing import codes_per_byte, pack, packed_nbytes, unpack
from mixdq.quant.quantizers import (ActRange, act_qparams, dequantize_weight, fake_quantize_act,
                                    quantize_act, quantize_weight, weight_qrange)
from mixdq.metrics import sqnr as sqnr_db

WBITS = (2, 3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize("bits", WBITS)
def test_weight_codes_in_range_and_per_channel(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    q, scale = quantize_weight(w, bits)
    lo, hi = weight_qrange(bits)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (16,)
    assert q.min() >= lo and q.max() <= hi
    # the largest |w| of each channel maps exactly to the top code
    assert torch.equal(q.reshape(16, -1).abs().amax(1), torch.full((16,), hi, dtype=torch.int8))
    err = (dequantize_weight(q, scale) - w).abs().reshape(16, -1).amax(1)
    assert torch.all(err <= scale / 2 + 1e-6)


def test_weight_sqnr_grows_with_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    s = [sqnr_db(w, dequantize_weight(*quantize_weight(w, b))) for b in (2, 4, 8)]
    assert s[0] < s[1] < s[2]
    assert s[2] > 35  # ~6 dB per bit


def test_scale_clamped_per_channel_not_whole_tensor():
    w = torch.randn(4, 10)
    w[1] = 0.0  # a dead channel
    q, scale = quantize_weight(w, 8)
    assert torch.equal(q[1], torch.zeros(10, dtype=torch.int8))
    # other channels keep their own scale (the reference reset them all)
    assert torch.allclose(scale[0], w[0].abs().max() / 127)
    assert scale[1] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (1000, 300), (7, 300000), (40, 640, 3, 3)])
def test_blockwise_codes_match_the_whole_weight_formula(shape, dtype, monkeypatch):
    """Codes are made a block of rows at a time (quantizers._QUANT_BLOCK); they are the
    codes of round(w / scale) over the whole weight, at every tail: rows not a multiple
    of the block's, a row longer than the block, a dead channel, channel ranges from 1e-3 to 1e2."""
    import mixdq.quant.quantizers as quantizers

    monkeypatch.setattr(quantizers, "_QUANT_BLOCK", 4096)  # many blocks even on small weights
    torch.manual_seed(0)
    w = (torch.randn(shape) * torch.logspace(-3, 2, shape[0]).view(-1, *[1] * (len(shape) - 1))).to(dtype)
    w[0] = 0
    for bits in (2, 4, 7, 8):
        q, scale = quantize_weight(w, bits)
        wf = w.float().reshape(shape[0], -1)
        ref_scale = (wf.abs().amax(1) / weight_qrange(bits)[1]).clamp_min(1e-8)
        ref = torch.round(wf / ref_scale[:, None]).clamp(*weight_qrange(bits)).to(torch.int8).view(shape)
        assert torch.equal(scale, ref_scale) and torch.equal(q, ref)
        out = torch.empty(w.numel(), dtype=torch.int8)
        q_out, _ = quantize_weight(w, bits, out=out)
        assert torch.equal(out.view(shape), ref) and q_out.data_ptr() == out.data_ptr()


def test_act_range_over_batches_and_zero_included():
    r = ActRange()
    r.update(torch.tensor([0.5, 2.0]))
    r.update(torch.tensor([1.0, 3.0]))
    assert (r.lo, r.hi, r.batches) == (0.0, 3.0, 2)
    r.update(torch.tensor([-1.0]))
    assert r.lo == -1.0
    assert r.merged(ActRange(-5.0, 1.0, 1)).to_list() == [-5.0, 3.0, 4]


@pytest.mark.parametrize("bits", (4, 6, 8))
def test_act_quant_asymmetric(bits):
    torch.manual_seed(0)
    x = torch.rand(1000) * 5 - 1  # [-1, 4)
    scale, zp = act_qparams(float(x.min()), float(x.max()), bits)
    codes = quantize_act(x, scale, zp, bits)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    assert zp == round(-float(x.min()) / scale)
    err = (fake_quantize_act(x, scale, zp, bits) - x).abs().max()
    assert err <= scale / 2 + 1e-6
    # zero is exactly representable (padding and ReLU zeros stay zero)
    assert fake_quantize_act(torch.zeros(1), scale, zp, bits).item() == 0.0


@pytest.mark.parametrize("bits", WBITS)
def test_packing_roundtrip_and_bytes(bits):
    lo, hi = weight_qrange(bits)
    q = torch.randint(lo, hi + 1, (7, 5, 3, 3), dtype=torch.int8)
    p = pack(q, bits)
    assert p.numel() == p.nbytes == packed_nbytes(q.numel(), bits)
    assert torch.equal(unpack(p, bits, q.shape), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpack_every_code_at_every_tail_length(bits):
    """Every code value at every position within a byte, and every padding length."""
    lo, hi = weight_qrange(bits)
    values = torch.arange(lo, hi + 1, dtype=torch.int8)
    for numel in range(1, 3 * values.numel() + 4):
        q = values.repeat(numel // values.numel() + 1)[:numel].roll(numel % 3)
        assert torch.equal(unpack(pack(q, bits), bits, (numel,)), q), numel


def test_packed_byte_layout_is_fixed():
    """The export format: low bits hold the earlier code, codes stored offset by 2^(b-1)."""
    assert unpack(torch.tensor([0x1F], dtype=torch.uint8), 4, (2,)).tolist() == [7, -7]
    assert unpack(torch.tensor([0xE4], dtype=torch.uint8), 2, (4,)).tolist() == [-2, -1, 0, 1]
    assert pack(torch.tensor([7, -7], dtype=torch.int8), 4).tolist() == [0x1F]
    assert pack(torch.tensor([-2, -1, 0, 1], dtype=torch.int8), 2).tolist() == [0xE4]


def test_container_sizes():
    assert [codes_per_byte(b) for b in (2, 3, 4, 5, 6, 7, 8)] == [4, 2, 2, 1, 1, 1, 1]
    assert packed_nbytes(10, 2) == 3 and packed_nbytes(10, 4) == 5 and packed_nbytes(10, 8) == 10
    with pytest.raises(ValueError, match="supported"):
        codes_per_byte(16)
