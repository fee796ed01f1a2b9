import json
import os

import pytest
import torch

import mixdq
from mixdq import Calibration, ExportError, Plan

PROMPTS = ["a red circle", "a blue square", "a cat"]


def _gen(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", generator=g, output_type="pt", **mixdq.generation_defaults(pipe)).images


@pytest.fixture
def quantized(tiny_sdxl_pipe):
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    cycle = [(8, 8), (4, 8), (2, 16), (16, 8), (16, 16)]
    plan = Plan({n: cycle[i % len(cycle)] for i, n in enumerate(names)})
    mixdq.quantize(tiny_sdxl_pipe, plan, Calibration(PROMPTS), progress=False)
    return tiny_sdxl_pipe


def test_roundtrip_bit_identical(quantized, tmp_path):
    before = _gen(quantized)
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    loaded = mixdq.load_pipeline(out, device="cpu")  # load_pipeline recognises exports
    assert torch.equal(_gen(loaded), before)
    # the same bytes stored, and held (prepacked copies included, where a backend makes them)
    assert mixdq.stored_nbytes(loaded.unet) == mixdq.stored_nbytes(quantized.unet)
    assert mixdq.model_nbytes(loaded.unet) == mixdq.model_nbytes(quantized.unet)
    assert mixdq.current_plan(loaded.unet) == mixdq.current_plan(quantized.unet)
    meta = json.loads((out / "mixdq.json").read_text())
    assert meta["bos_aware"] is True and meta["unet_bytes"] == mixdq.stored_nbytes(quantized.unet)
    # no float UNet weights in the folder: the safetensors is the packed model
    size = (out / "unet" / "mixdq_unet.safetensors").stat().st_size
    assert size < 1.1 * mixdq.stored_nbytes(quantized.unet)


def test_failed_write_leaves_nothing(quantized, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(ExportError, match="disk full"):
        mixdq.save_quantized(quantized, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_and_overwrite(quantized, tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        mixdq.save_quantized(quantized, target)
    assert (target / "keep.txt").read_text() == "mine"
    mixdq.save_quantized(quantized, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "mixdq.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_not_quantized(tiny_sdxl_pipe, tmp_path):
    with pytest.raises(ExportError, match="not quantized"):
        mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_corrupted_and_mismatched(quantized, tmp_path):
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    weights = out / "unet" / "mixdq_unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="checksum"):
        mixdq.load_quantized(out, device="cpu")
    with pytest.raises(ExportError):  # even unverified, a broken header is caught
        weights.write_bytes(b"not a safetensors file")
        mixdq.load_quantized(out, device="cpu", verify=False)

    out2 = mixdq.save_quantized(quantized, tmp_path / "export2")
    plan = json.loads((out2 / "plan.json").read_text())
    name = next(iter(plan["layers"]))
    plan["layers"][name] = [16, 16] if plan["layers"][name] != [16, 16] else [8, 8]
    (out2 / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ExportError, match="does not match"):
        mixdq.load_quantized(out2, device="cpu")

    os.remove(out2 / "mixdq.json")
    with pytest.raises(ExportError, match="not a mixdq export"):
        mixdq.load_quantized(out2, device="cpu")
    (out2 / "mixdq.json").write_text("{broken")
    with pytest.raises(ExportError, match="corrupted"):
        mixdq.load_quantized(out2, device="cpu")


def test_roundtrip_with_a_prepacked_backend(tiny_sdxl_pipe, tmp_path, monkeypatch):
    """With oneDNN (the int8 backend of CPUs without VNNI) the integer-path layers hold only
    the backend's prepacked copy from quantize on; export still writes their codes and the
    loaded model (prepacked at load) generates the same image."""
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "onednn")
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    plan = Plan({n: [(8, 8), (4, 8)][i % 2] for i, n in enumerate(names)})
    mixdq.quantize(tiny_sdxl_pipe, plan, Calibration(PROMPTS), kernel="int_mm", progress=False)

    def released(pipe):
        return {q.weight_bits for q in mixdq.quant.quantized_layers(pipe.unet).values()
                if q.weight_packed.untyped_storage().nbytes() == 0}

    stored_bits = {b.weight for b in mixdq.current_plan(tiny_sdxl_pipe.unet).values()}
    assert stored_bits in ({8, 4}, {7, 4})  # W7A8 where oneDNN saturates on 8-bit codes
    assert released(tiny_sdxl_pipe) == stored_bits
    before = _gen(tiny_sdxl_pipe)
    out = mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "export")
    loaded = mixdq.load_pipeline(out, device="cpu")
    assert released(loaded) == stored_bits
    assert torch.equal(_gen(loaded), before) and torch.equal(_gen(tiny_sdxl_pipe), before)


def test_loading_w8_codes_where_int8_kernels_saturate(tiny_sdxl_pipe, tmp_path, monkeypatch):
    """An export with W8A8 layers (made on the float path, exact on every CPU, as a GPU
    would make it) loaded where its backend saturates on them (pinned: no VNNI, oneDNN): by
    default (int8_safe, as quantize) re-rounded to 7 bits, which oneDNN runs exactly;
    int8_safe=False loads the codes as written, on the exact float path, with a warning
    that names the way out."""
    from mixdq.quant import quantized_layers

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXDQ_INT8_SATURATE", raising=False)
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    cycle = [(8, 8), (4, 8), (2, 16), (16, 8), (16, 16)]
    quantized = tiny_sdxl_pipe
    mixdq.quantize(quantized, Plan({n: cycle[i % len(cycle)] for i, n in enumerate(names)}),
                   Calibration(PROMPTS), kernel="dequant", progress=False)
    plan = mixdq.current_plan(quantized.unet)
    n8 = sum(1 for b in plan.values() if str(b) == "W8A8")
    assert n8 > 0
    before = _gen(quantized)
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    monkeypatch.setenv("MIXDQ_CPU", "avx2")
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "onednn")
    with pytest.warns(mixdq.SlowPathWarning, match=f"{n8} W8A8 layers .* int8_safe=True"):
        exact = mixdq.load_quantized(out, device="cpu", kernel="int_mm", int8_safe=False)
    # the same codes, the W8A8 ones on the exact float path: the image up to float rounding
    assert mixdq.current_plan(exact.unet) == plan
    backends = {str(layer.bits): layer.backend for layer in quantized_layers(exact.unet).values()}
    assert backends["W8A8"] == "float" and backends["W4A8"] == "onednn"
    torch.testing.assert_close(_gen(exact), before, rtol=0, atol=2e-3)

    safe = mixdq.load_quantized(out, device="cpu", kernel="int_mm")
    safe_plan = mixdq.current_plan(safe.unet)
    assert {n for n, b in safe_plan.items() if str(b) == "W7A8"} == {
        n for n, b in plan.items() if str(b) == "W8A8"}
    assert all(layer.backend == "onednn" for layer in quantized_layers(safe.unet).values()
               if layer.act_bits == 8 and layer.weight_bits <= 8)
    assert mixdq.model_nbytes(safe.unet) == mixdq.model_nbytes(exact.unet)
    assert safe.unet.mixdq_state.fitted == {"layers": n8, "from": "W8A8", "to": "W7A8"}
    from mixdq.metrics import psnr

    assert 30 < float(psnr(_gen(safe), before)) < float("inf")


def test_requantize_weight_rounds_codes_to_fewer_bits():
    from mixdq.plan import LayerBits
    from mixdq.quant.layers import QuantLinear
    from mixdq.quant.quantizers import quantize_weight

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = QuantLinear.from_float(linear, LayerBits(8, 8))
    layer.requantize_weight(7)
    codes = layer.int_codes()
    assert layer.bits == LayerBits(7, 8) and int(codes.abs().max()) <= 64
    direct_q, direct_s = quantize_weight(linear.weight, 7)
    err = (layer.dequantized_weight(torch.float32) - linear.weight).abs()
    direct = (direct_q.float() * direct_s[:, None] - linear.weight).abs()
    # rounded twice: within 3/4 of a 7-bit step (direct rounding: 1/2), a little worse on average
    assert (err <= 0.75 * direct_s[:, None] + 1e-7).all() and direct.mean() < err.mean() < 1.5 * direct.mean()
    with pytest.raises(ValueError, match="cannot requantize 7-bit weight codes to 8 bits"):
        layer.requantize_weight(8)


def test_load_picks_this_machines_kernel(tiny_sdxl_pipe, tmp_path):
    """An export made with another path (say on a GPU, where dequant won) runs the path
    this machine picks, unless told otherwise."""
    from mixdq.quant import kernels, quantized_layers

    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    mixdq.quantize(tiny_sdxl_pipe, Plan.uniform(names, 8, 8), Calibration(PROMPTS[:1]), kernel="dequant",
                   progress=False)
    out = mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "export")
    assert json.loads((out / "mixdq.json").read_text())["kernel"] == "dequant"
    here = kernels.select_kernel("cpu")
    loaded = mixdq.load_quantized(out, device="cpu")
    assert {layer.kernel for layer in quantized_layers(loaded.unet).values()} == {here}
    assert loaded.unet.mixdq_state.kernel == here
    told = mixdq.load_quantized(out, device="cpu", kernel="dequant")
    assert {layer.kernel for layer in quantized_layers(told.unet).values()} == {"dequant"}
