"""mixdq.export: folders and archives that load back exactly, the mixdq way and the diffusers way."""
import io
import json
import os
import shutil
import zipfile

import pytest
import torch

import mixdq
from mixdq import Calibration, ExportError, Plan
from mixdq.diffusers_unet import OLD_FORMAT, QuantizedUNet2DConditionModel

PROMPTS = ["a red circle", "a blue square", "a cat"]


def _gen(pipe, seed=0, settings=None):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", generator=g, output_type="pt", **(settings or mixdq.generation_defaults(pipe))).images


def _rewrite(out, rel, text):
    """Change a file of an export and its size in the manifest, as a consistent export would be."""
    (out / rel).write_text(text)
    meta = json.loads((out / "mixdq.json").read_text())
    meta["files"][rel] = (out / rel).stat().st_size
    (out / "mixdq.json").write_text(json.dumps(meta))


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
    meta = json.loads((out / "unet" / "mixdq.json").read_text())
    assert meta["bos_aware"] is True and meta["unet_bytes"] == mixdq.stored_nbytes(quantized.unet)
    # the manifest: every other file of the folder, at its size
    manifest = json.loads((out / "mixdq.json").read_text())["files"]
    assert manifest == {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*")
                        if p.is_file() and p != out / "mixdq.json"}
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
    plan = json.loads((out2 / "unet" / "plan.json").read_text())
    name = next(iter(plan["layers"]))
    plan["layers"][name] = [16, 16] if plan["layers"][name] != [16, 16] else [8, 8]
    _rewrite(out2, "unet/plan.json", json.dumps(plan))
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
    # float32 attention: bfloat16's rounding of Q, K, V would magnify the float-rounding
    # differences this test bounds (test_attention.py checks loads with either)
    monkeypatch.setenv("MIXDQ_ATTENTION", "float")
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
    # the same codes, the W8A8 ones on the exact float path
    assert mixdq.current_plan(exact.unet) == plan
    backends = {str(layer.bits): layer.backend for layer in quantized_layers(exact.unet).values()}
    assert backends["W8A8"] == "float" and backends["W4A8"] == "onednn"
    from mixdq.metrics import psnr

    # The image up to float rounding, bounded by PSNR, not per value: oneDNN and the float
    # path round differently (more so capped to AVX2), a difference can move an activation
    # across a rounding boundary and the steps amplify it.  Saturating W8 codes fall to
    # about 30 dB.
    assert float(psnr(_gen(exact), before)) > 40

    safe = mixdq.load_quantized(out, device="cpu", kernel="int_mm")
    safe_plan = mixdq.current_plan(safe.unet)
    assert {n for n, b in safe_plan.items() if str(b) == "W7A8"} == {
        n for n, b in plan.items() if str(b) == "W8A8"}
    assert all(layer.backend == "onednn" for layer in quantized_layers(safe.unet).values()
               if layer.act_bits == 8 and layer.weight_bits <= 8)
    assert mixdq.model_nbytes(safe.unet) == mixdq.model_nbytes(exact.unet)
    assert safe.unet.mixdq_state.fitted == {"layers": n8, "from": "W8A8", "to": "W7A8"}
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
    assert json.loads((out / "unet" / "mixdq.json").read_text())["kernel"] == "dequant"
    here = kernels.select_kernel("cpu")
    loaded = mixdq.load_quantized(out, device="cpu")
    assert {layer.kernel for layer in quantized_layers(loaded.unet).values()} == {here}
    assert loaded.unet.mixdq_state.kernel == here
    told = mixdq.load_quantized(out, device="cpu", kernel="dequant")
    assert {layer.kernel for layer in quantized_layers(told.unet).values()} == {"dequant"}


# ------------------------------------------------------------------------------------------
# The diffusers way, and what an export may not hold.
# ------------------------------------------------------------------------------------------
def test_diffusers_loads_the_export(quantized, tiny_sdxl_dir, tmp_path):
    """With mixdq imported, diffusers' own loaders build the quantized pipeline from an
    export, and its UNet alone is a drop-in for the float model's: the same images as the
    quantized pipeline that was exported."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from mixdq.quant import kernels

    settings = mixdq.generation_defaults(quantized)
    before = _gen(quantized, settings=settings)
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["mixdq", "QuantizedUNet2DConditionModel"]
    for cls, kwargs in ((StableDiffusionXLPipeline, {}), (DiffusionPipeline, {"device_map": "cpu"}),
                        (DiffusionPipeline, {})):
        pipe = cls.from_pretrained(out, **kwargs)
        assert isinstance(pipe.unet, QuantizedUNet2DConditionModel) and not pipe.unet.training
        assert torch.equal(_gen(pipe, settings=settings), before)
    assert mixdq.current_plan(pipe.unet) == mixdq.current_plan(quantized.unet)
    assert pipe.unet.mixdq_state.kernel == kernels.select_kernel("cpu")
    assert mixdq.model_nbytes(pipe.unet) == mixdq.model_nbytes(quantized.unet)
    # the UNet alone, from a copy of its folder elsewhere, into the float model's pipeline
    alone = shutil.copytree(out / "unet", tmp_path / "elsewhere" / "unet")
    drop_in = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_dir, unet=QuantizedUNet2DConditionModel.from_pretrained(alone.parent, subfolder="unet"))
    assert torch.equal(_gen(drop_in, settings=settings), before)
    # saved by diffusers, which asks the UNet to save itself
    pipe.save_pretrained(tmp_path / "resaved")
    assert torch.equal(_gen(DiffusionPipeline.from_pretrained(tmp_path / "resaved"), settings=settings), before)


def test_no_folder_of_the_exporting_machine_is_written(quantized, tiny_sdxl_dir, tmp_path):
    """Loaders record the folder a config came from (_name_or_path); an export, shared,
    would show the exporting machine's folders.  No file of it names the source model's
    folder, the export's own (or its temporary sibling), in text or binary."""
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    archive = mixdq.export_archive(quantized, tmp_path / "export.zip")
    needles = {str(p) for d in (tiny_sdxl_dir, tmp_path) for p in (d, d.resolve())}
    files = [p for p in out.rglob("*") if p.is_file()] + [archive]
    assert len(files) > 10
    for f in files:
        data = f.read_bytes()
        assert not [n for n in needles if n.encode() in data], f


def _as_format_1(out):
    """Rewrite an export into the layout mixdq-export/1 wrote: the UNet's mixdq.json (with
    the pipeline's fields) and plan.json at the root, model_index.json naming diffusers'
    UNet, unet/config.json naming its class, no manifest."""
    unet_meta = json.loads((out / "unet" / "mixdq.json").read_text())
    root = json.loads((out / "mixdq.json").read_text())
    del root["files"]
    (out / "mixdq.json").write_text(json.dumps(unet_meta | root | {"format": OLD_FORMAT}, indent=1))
    (out / "unet" / "mixdq.json").unlink()
    os.replace(out / "unet" / "plan.json", out / "plan.json")
    for rel, key, value in (("model_index.json", "unet", ["diffusers", "UNet2DConditionModel"]),
                            ("unet/config.json", "_class_name", "UNet2DConditionModel")):
        data = json.loads((out / rel).read_text())
        (out / rel).write_text(json.dumps(data | {key: value}, indent=2))
    return out


def test_exports_of_format_1_still_load(quantized, tmp_path):
    before = _gen(quantized)
    old = _as_format_1(mixdq.save_quantized(quantized, tmp_path / "old"))
    loaded = mixdq.load_quantized(old, device="cpu")
    assert torch.equal(_gen(loaded), before)
    assert mixdq.current_plan(loaded.unet) == mixdq.current_plan(quantized.unet)
    # its UNet alone too: format 1 kept the UNet's mixdq.json and plan.json at the root
    unet = QuantizedUNet2DConditionModel.from_pretrained(old, subfolder="unet", device="cpu")
    assert mixdq.current_plan(unet) == mixdq.current_plan(quantized.unet)
    # zipped, it lists no sizes to check before unpacking: refused, saying what to do instead
    archive = tmp_path / "old.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(old.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path).as_posix())
    with pytest.raises(ExportError, match=r"older mixdq .* mixdq.load_quantized\(folder\)"):
        mixdq.import_archive(archive, dest=tmp_path / "in")
    assert not (tmp_path / "in").exists()


def test_unet_loading_says_what_to_pass(quantized, tmp_path):
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    with pytest.raises(ExportError, match=r"holds a torch.float32 quantized UNet .* without dtype"):
        QuantizedUNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=torch.float16)
    with pytest.raises(ExportError, match="subfolder='unet'"):
        QuantizedUNet2DConditionModel.from_pretrained(out)
    with pytest.raises(ExportError, match="not a folder"):
        QuantizedUNet2DConditionModel.from_pretrained(tmp_path / "nowhere", subfolder="unet")
    with pytest.raises(ExportError, match="one device"):
        QuantizedUNet2DConditionModel.from_pretrained(out, subfolder="unet", device_map="balanced")
    with pytest.raises(ExportError, match=r"QuantizedUNet2DConditionModel.from_pretrained\(folder\)"):
        mixdq.load_quantized(out / "unet", device="cpu")


def test_an_incomplete_folder_is_named(quantized, tmp_path):
    out = mixdq.save_quantized(quantized, tmp_path / "export")
    (out / "vae" / "config.json").unlink()
    with pytest.raises(ExportError, match="incomplete: vae/config.json is missing"):
        mixdq.load_quantized(out, device="cpu")
    out = mixdq.save_quantized(quantized, tmp_path / "export2")
    weights = out / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ExportError, match="model.safetensors has .* bytes where the export wrote .*cut short"):
        mixdq.load_quantized(out, device="cpu")


def test_moving_the_unet_keeps_prepacked_copies_and_picks_the_kernel(tiny_sdxl_pipe, tmp_path, monkeypatch):
    """Loaded, the UNet holds only its prepacked copies (oneDNN here); pipe.to() to where it
    already is leaves them alone; a real move gives the codes back (QuantLayer._apply) and
    picks the new device's kernel, as loading there would."""
    from diffusers import DiffusionPipeline

    from mixdq.quant import quantized_layers

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "onednn")
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    plan = Plan({n: [(8, 8), (4, 8)][i % 2] for i, n in enumerate(names)})
    mixdq.quantize(tiny_sdxl_pipe, plan, Calibration(PROMPTS), kernel="int_mm", progress=False)
    before = _gen(tiny_sdxl_pipe)
    out = mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    layers = quantized_layers(pipe.unet).values()

    def held():
        return [layer._held_prepacked for layer in layers if layer._held_prepacked is not None]

    first = held()
    assert len(first) == len(layers)
    pipe.to("cpu")
    assert len(held()) == len(layers) and all(a is b for a, b in zip(held(), first))
    pipe.unet.cpu()   # nn.Module.cpu: no shortcut
    assert held() == []
    assert torch.equal(_gen(pipe), before) and len(held()) == len(layers)   # prepacked again on the way
    # a move to another device (there is none here: as if it had been loaded on one)
    monkeypatch.setenv("MIXDQ_KERNEL", "dequant")
    pipe.unet._mixdq_load["device"] = torch.device("meta")
    pipe.unet.cpu()
    assert {layer.kernel for layer in layers} == {"dequant"} and pipe.unet.mixdq_state.kernel == "dequant"
    assert {layer.backend for layer in layers} == {"float"}


# ------------------------------------------------------------------------------------------
# Archives: one zip of an export, checked before anything is unpacked.
# ------------------------------------------------------------------------------------------
def test_archive_round_trip_is_exact(quantized, tiny_sdxl_dir, tmp_path):
    path = mixdq.export_archive(quantized, tmp_path / "out" / "model.zip")
    assert path.is_file() and zipfile.is_zipfile(path)
    assert not [p for p in path.parent.iterdir() if p != path]    # nothing half-written left
    loaded = mixdq.import_archive(path, dest=tmp_path / "in")
    assert mixdq.current_plan(loaded.unet) == mixdq.current_plan(quantized.unet)
    assert torch.equal(_gen(loaded), _gen(quantized))
    with pytest.raises(ExportError, match="not quantized"):
        mixdq.export_archive(mixdq.load_pipeline(tiny_sdxl_dir, device="cpu"), tmp_path / "float.zip")


def test_corrupt_archives_are_refused_and_leave_nothing(quantized, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    good = mixdq.export_archive(quantized, tmp_path / "good.zip")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip")
    with pytest.raises(ExportError, match="not a zip archive"):
        mixdq.import_archive(junk)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ExportError, match="no mixdq.json"):
        mixdq.import_archive(empty)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../mixdq.json", "{}")
    with pytest.raises(ExportError, match="unsafe path"):
        mixdq.import_archive(evil)
    # flip bytes inside the weights: zipfile's CRC check catches it while unpacking
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo(f"{good.stem}/unet/mixdq_unet.safetensors")
    mid = info.header_offset + 200 + info.compress_size // 2
    data[mid:mid + 64] = bytes(64)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="damaged .* Bad CRC-32"):
        mixdq.import_archive(bad, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # unpacked whole, then refused by load_quantized: the unpacked folder goes (and the
    # temporary folder made for it)
    def wrong_checksum(members):
        name = f"{good.stem}/unet/mixdq.json"
        meta = json.loads(members[name])
        meta["unet_sha256"] = "0" * len(meta["unet_sha256"])
        members[name] = json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n"

    wrong = _rezip(good, tmp_path / "wrong.zip", wrong_checksum)
    with pytest.raises(ExportError, match="checksum"):
        mixdq.import_archive(wrong, dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="checksum"):
        mixdq.import_archive(wrong)
    # truncated
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ExportError):
        mixdq.import_archive(cut, dest=tmp_path / "y")
    assert not (tmp_path / "y").exists()
    assert list((tmp_path / "system-tmp").iterdir()) == []


@pytest.fixture(scope="module")
def gigabyte_of_zeros(tmp_path_factory):
    """A zip holding one 1 GiB member of zeros, 1 MB on disk (built once: 5 s)."""
    path = tmp_path_factory.mktemp("bomb") / "zeros.zip"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("m/unet/mixdq_unet.safetensors", "w", force_zip64=True) as f:
            for _ in range(1024):
                f.write(zeros)
    assert path.stat().st_size < 2 << 20
    return path


@pytest.mark.parametrize("members,problem", [
    ({"m/mixdq.json": "{}"}, "not a mixdq export"),   # a stub beside the member
    ({"m/mixdq.json": json.dumps({"format": "mixdq-export/2"}), "m/model_index.json": "{}"},
     "no valid file manifest"),
    ({"m/mixdq.json": json.dumps({"format": "mixdq-export/2", "files": {
        "model_index.json": 2, "unet/mixdq_unet.safetensors": 1 << 30}}), "m/model_index.json": "{}"},
     r"would unpack to 1074 MB from 1.0 MB: .* zip bomb"),
    ({"m/mixdq.json": json.dumps({"format": OLD_FORMAT, "unet_bytes": 1 << 30}), "m/model_index.json": "{}"},
     "older mixdq"),
])
def test_zip_bombs_are_refused_before_unpacking(gigabyte_of_zeros, members, problem, tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    shutil.copy(gigabyte_of_zeros, bomb)
    with zipfile.ZipFile(bomb, "a") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    for dest in (tmp_path / "in", None):
        with pytest.raises(ExportError, match=problem):
            mixdq.import_archive(bomb, dest=dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip", "system-tmp"]
    assert list((tmp_path / "system-tmp").iterdir()) == []


def _rezip(src, dst, change):
    """Copy archive `src` to `dst` with change(members: {name: bytes}) applied."""
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


@pytest.mark.parametrize("case,problem", [
    ("grown", r"'export/vae/config.json' in .* unpacks to \d+ bytes where its manifest says \d+"),
    ("extra", "holds 'export/extra.bin', which its manifest does not list"),
    ("outside", "holds 'other/notes.txt', which its manifest does not list"),
    ("dropped", r"lacks \['vae/config.json'\], listed in its manifest"),
])
def test_archive_members_must_match_the_manifest(quantized, tmp_path, case, problem):
    good = mixdq.export_archive(quantized, tmp_path / "export.zip")
    changes = {
        "grown": lambda m: m.update({"export/vae/config.json": m["export/vae/config.json"] + b" " * 1000}),
        "extra": lambda m: m.update({"export/extra.bin": bytes(10)}),
        "outside": lambda m: m.update({"other/notes.txt": b"hello"}),
        "dropped": lambda m: m.pop("export/vae/config.json"),
    }
    changed = _rezip(good, tmp_path / f"{case}.zip", changes[case])
    with pytest.raises(ExportError, match=problem):
        mixdq.import_archive(changed, dest=tmp_path / "in")
    assert not (tmp_path / "in").exists()


def test_unpacking_stops_at_the_declared_size():
    """The stream check behind every member: never more written than declared (zipfile
    itself stops at the header's size, which must equal the manifest's)."""
    from mixdq.export import _copy_bounded

    for size in (1000, 3 << 19):
        out = io.BytesIO()
        with pytest.raises(ExportError, match=f"more than the {size} bytes its manifest declares"):
            _copy_bounded(io.BytesIO(bytes(5 << 20)), out, size, "'m/x' in a.zip")
        assert out.tell() <= size
    with pytest.raises(ExportError, match="holds 3 bytes where its manifest declares 10"):
        _copy_bounded(io.BytesIO(b"abc"), io.BytesIO(), 10, "'m/x' in a.zip")
    out = io.BytesIO()
    _copy_bounded(io.BytesIO(b"abc"), out, 3, "'m/x' in a.zip")
    assert out.getvalue() == b"abc"
