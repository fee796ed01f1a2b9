"""Sensitivity analysis on a tiny random-weight SDXL pipeline: values, cache, resume, shards."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


import mixdq
from mixdq import cli, tables

# the module, not the verb: `mixdq.sensitivity` is the function once the package exports it
from mixdq import sensitivity_analysis as S
from mixdq.metrics import sqnr, ssim
from mixdq.plan import Plan
from mixdq.quant import replace_layers, restore_layers

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square on black", "two green triangles", "a photo of a cat"]
CONTENT_L = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
KV_L = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
QUALITY_L = "conv_in"
SHORTCUT_L = "up_blocks.0.resnets.0.conv_shortcut"
FEW = [CONTENT_L, KV_L, QUALITY_L, SHORTCUT_L]


@pytest.fixture(autouse=True)
def _one_thread_and_quiet():
    # Tiny layers: one thread is fastest, and on a shared 2-core machine two OpenMP threads
    # wait on each other (10x slower measured here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import transformers

    import diffusers

    transformers.logging.set_verbosity_error()  # the char tokenizer truncates: harmless, loud
    diffusers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def _cal(**kw):
    return mixdq.Calibration(PROMPTS, batch_size=kw.pop("batch_size", 2), **kw)


def test_scores_shape_and_sense(tiny_sdxl_pipe, tmp_path):
    s = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=FEW, cache_dir=tmp_path, progress=False)
    assert s.layers == sorted(s.layers, key=list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet)).index)
    assert s.group[CONTENT_L] == "content" and s.group[QUALITY_L] == "quality"
    for n in FEW:
        w, a = s.scores["weight"][n], s.scores["act"][n]
        want_w = (2, 4, 8) if s.group[n] == "content" else (4, 8)
        assert sorted(w) == list(want_w) and sorted(a) == [4, 8]
        # more bits, less noise: the weight SQNR grows ~6 dB per bit
        assert w[8]["sqnr"] > w[4]["sqnr"] + 10
        assert a[8]["sqnr"] > a[4]["sqnr"]
        assert s.act_numel[n] > 0
        if s.group[n] == "content":
            assert 0 < w[2]["ssim"] <= w[8]["ssim"] <= 1.0 + 1e-12
        else:
            assert "ssim" not in w[4]
    # activation element counts per UNet sample: conv_in sees the latent (4 x 8 x 8 at 16 px)
    latent = 16 // tiny_sdxl_pipe.vae_scale_factor
    assert s.act_numel[QUALITY_L] == 4 * latent * latent
    shortcut = dict(tiny_sdxl_pipe.unet.named_modules())[SHORTCUT_L]
    assert s.act_numel[SHORTCUT_L] % shortcut.in_channels == 0  # concat(hidden, skip) channels
    assert s.meta["computed"] == sum(len(v) for k in s.scores for v in s.scores[k].values())
    # the calibration it was measured with, as the shipped-table lookup compares it
    key, inputs = S.cache_key(tiny_sdxl_pipe, _cal())
    assert s.meta["key"] == key and s.meta["seed"] == inputs["seed"] == _cal().seed
    assert (s.meta["dtype"], s.meta["device_type"]) == ("torch.float32", "cpu")
    # round trip through JSON
    path = tmp_path / "s.json"
    s.save(path)
    assert S.Sensitivity.load(path).scores == s.scores


def test_values_match_a_direct_computation(tiny_sdxl_pipe, tmp_path):
    """SSIM of the decoded images and SQNR of UNet outputs, recomputed here without the
    module's capture/replay machinery (one step: the calibration inputs are the pipeline's)."""
    pipe = tiny_sdxl_pipe
    cal = _cal(num_inference_steps=1, batch_size=4)
    s = S.sensitivity(pipe, cal, layers=[CONTENT_L, QUALITY_L], weight_bits=[4], act_bits=[8],
                      cache_dir=tmp_path, progress=False)
    settings = cal.settings(pipe)

    def run():
        outs = []
        h = pipe.unet.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o.sample))
        gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        with torch.inference_mode():
            img = pipe(prompt=PROMPTS, generator=gens, output_type="pt", **settings).images
        h.remove()
        return img.float(), torch.cat(outs)

    ref_img, ref_out = run()
    ranges = mixdq.float_ranges(pipe, cal, progress=False)
    for name in (CONTENT_L, QUALITY_L):
        for kind, bits in (("weight", (4, 16)), ("act", (16, 8))):
            orig = replace_layers(pipe.unet, Plan({name: bits}), ranges=ranges,
                                  bos_embedding=mixdq.bos_embedding(pipe))
            img, out = run()
            restore_layers(pipe.unet, orig)
            b = bits[0] if kind == "weight" else bits[1]
            got = s.scores[kind][name][b]
            assert got["sqnr"] == pytest.approx(float(sqnr(ref_out, out)), rel=1e-6)
            if name == CONTENT_L:
                # abs 1e-6: the analysis decodes channels-last on CPU (pixels differ by ~1e-6)
                assert got["ssim"] == pytest.approx(float(ssim(img.clamp(0, 1), ref_img.clamp(0, 1))), abs=1e-6)
                assert got["ssim"] < 1.0  # a real difference, far larger than the tolerance


def test_second_run_computes_nothing_and_key_tracks_inputs(tiny_sdxl_pipe, tmp_path, monkeypatch):
    s1 = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=[QUALITY_L], cache_dir=tmp_path, progress=False)
    assert s1.meta["computed"] == 4

    def boom(*a, **k):
        raise AssertionError("the float pipeline ran although everything is cached")

    monkeypatch.setattr(S, "_Reference", boom)
    s2 = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=[QUALITY_L], cache_dir=tmp_path, progress=False)
    assert s2.meta["computed"] == 0 and s2.scores == s1.scores and s2.act_numel == s1.act_numel
    monkeypatch.undo()
    # another seed or resolution is another key; an extra bit-width only computes itself
    k0 = S.cache_key(tiny_sdxl_pipe, _cal())[0]
    assert S.cache_key(tiny_sdxl_pipe, _cal(seed=1))[0] != k0
    assert S.cache_key(tiny_sdxl_pipe, _cal(height=32, width=32))[0] != k0
    assert S.cache_key(tiny_sdxl_pipe, mixdq.Calibration(PROMPTS[:3]))[0] != k0
    w = tiny_sdxl_pipe.unet.conv_in.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0, 0, 0] += 1.0
    assert S.cache_key(tiny_sdxl_pipe, _cal())[0] != k0
    with torch.no_grad():
        w.copy_(saved)
    s3 = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=[QUALITY_L], weight_bits=[3, 4, 8], cache_dir=tmp_path,
                       progress=False)
    assert s3.meta["computed"] == 1 and s3.scores["weight"][QUALITY_L][4] == s1.scores["weight"][QUALITY_L][4]


def test_interrupted_run_resumes(tiny_sdxl_pipe, tmp_path, monkeypatch):
    layers = [CONTENT_L, QUALITY_L]
    full = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=layers, cache_dir=tmp_path / "a", progress=False)
    real = S._evaluate
    calls = {"n": 0}

    def dies_after_three(*a, **k):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(S, "_evaluate", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        S.sensitivity(tiny_sdxl_pipe, _cal(), layers=layers, cache_dir=tmp_path / "b", progress=False)
    monkeypatch.undo()
    # the layer it died in was restored to float
    assert not any(type(m).__name__.startswith("Quant") for m in tiny_sdxl_pipe.unet.modules())
    part = next((tmp_path / "b" / "sensitivity").glob("*/part-*.jsonl"))
    with part.open("a") as fh:
        fh.write('{"layer": "conv_in", "kind": "weight", "bi')  # a line cut by the kill
    resumed = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=layers, cache_dir=tmp_path / "b", progress=False)
    assert resumed.meta["computed"] == full.meta["computed"] - 3
    assert resumed.scores == full.scores


def test_group_function_is_overridable(tiny_sdxl_pipe, tmp_path):
    s = S.sensitivity(tiny_sdxl_pipe, _cal(), layers=[QUALITY_L], weight_bits=[8], act_bits=[8],
                      group_fn=lambda n: "content", cache_dir=tmp_path, progress=False)
    assert s.group[QUALITY_L] == "content" and "ssim" in s.scores["weight"][QUALITY_L][8]
    with pytest.raises(ValueError, match="expected 'content' or 'quality'"):
        S.sensitivity(tiny_sdxl_pipe, _cal(), layers=[QUALITY_L], group_fn=lambda n: "other",
                      cache_dir=tmp_path, progress=False)
    with pytest.raises(mixdq.PlanError, match="no quantizable layer matches"):
        S.sensitivity(tiny_sdxl_pipe, _cal(), layers=["nope.*"], cache_dir=tmp_path, progress=False)


def test_two_processes_merge_to_the_single_process_result(tiny_sdxl_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes: each rank takes layers[rank::2]; the merged
    cache equals a single-process run of the same command."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["-m", "mixdq", "sensitivity", "--model", str(tiny_sdxl_dir), "--prompts-file", str(prompts),
            "--batch-size", "2", "--layers", "down_blocks.1.attentions.0.*attn2*", "conv_in", "conv_out",
            "up_blocks.0.resnets.0.*"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    accelerate = Path(sys.executable).with_name("accelerate")
    multi = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", *args,
                            "--cache-dir", str(tmp_path / "multi"), "--out", str(tmp_path / "multi.json")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "2 process(es)" in multi.stderr
    single = subprocess.run([sys.executable, *args, "--cache-dir", str(tmp_path / "single"),
                             "--out", str(tmp_path / "single.json")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a = json.loads((tmp_path / "multi.json").read_text())
    b = json.loads((tmp_path / "single.json").read_text())
    assert a["layers"] == b["layers"] and len(a["layers"]) == 10
    assert a["scores"] == b["scores"] and a["act_numel"] == b["act_numel"]
    # both ranks wrote into one cache, merged into one results file, no stray parts
    folder = next((tmp_path / "multi" / "sensitivity").iterdir())
    assert (folder / "results.json").is_file() and not list(folder.glob("part-*"))


def test_cli_errors_are_clear(tmp_path):
    import argparse

    p = cli.add_sensitivity_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        p.parse_args(["--weight-bits", "four"])
    with pytest.raises(SystemExit, match="not supported"):
        cli.run_sensitivity(p.parse_args(["--weight-bits", "9"]))


def test_shards_cover_every_layer_once_and_balance_cost():
    names = [f"b.{i}.attn2.to_q" for i in range(7)] + [f"b.{i}.conv1" for i in range(20)]
    groups = {n: S.layer_group(n) for n in names}
    jobs = list(S._jobs(names, groups, S.DEFAULT_WEIGHT_BITS, S.DEFAULT_ACT_BITS))
    for world in (1, 2, 3):
        shards = S._shard(jobs, groups, world)
        assert set().union(*shards) == set(names) and sum(map(len, shards)) == len(names)
        loads = [sum(S.EVAL_COST[groups[n]] * sum(1 for j in jobs if j[0] == n) for n in sh) for sh in shards]
        assert max(loads) - min(loads) <= 5 * S.EVAL_COST["content"]  # at most one layer's work apart
        assert S._shard(jobs, groups, world) == shards  # every rank computes the same split


def test_fingerprint_is_what_makes_the_images_not_where_they_came_from(tiny_sdxl_pipe):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    pipe = tiny_sdxl_pipe
    f0 = S.model_fingerprint(pipe)
    # loader metadata: the folder, the library releases that read it, defaults filled in
    pipe.unet.register_to_config(_name_or_path="/somewhere/else/unet", _diffusers_version="0.0.1",
                                 _use_default_values=["sample_size"])
    pipe.text_encoder.config._name_or_path = "/somewhere/else/text_encoder"
    pipe.text_encoder_2.config.transformers_version = "0.0.1"
    pipe.scheduler.register_to_config(_diffusers_version="0.0.1")
    assert S.model_fingerprint(pipe) == f0
    # one weight
    w = pipe.vae.decoder.conv_out.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.view(-1)[0] += 1e-3
    assert S.model_fingerprint(pipe) != f0
    with torch.no_grad():
        w.copy_(saved)
    assert S.model_fingerprint(pipe) == f0
    # the scheduler: its config, or its class on the same config
    sched = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(sched.config, timestep_spacing="leading")
    assert S.model_fingerprint(pipe) != f0
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sched.config)
    assert S.model_fingerprint(pipe) != f0
    pipe.scheduler = sched
    # an architecture field of a component's config
    pipe.unet.register_to_config(upcast_attention=not pipe.unet.config.upcast_attention)
    assert S.model_fingerprint(pipe) != f0


def test_embedded_model_copied_elsewhere_finds_the_shipped_table(tmp_path, monkeypatch):
    """A clone in another folder is the same model: same fingerprint, same cache key, and the
    shipped presets/sensitivity.json is found for it (the app solves any budget at once)."""
    import shutil

    from mixdq.loading import EMBEDDED

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    copy = shutil.copytree(EMBEDDED, tmp_path / "elsewhere" / "my-model")
    here, there = mixdq.load_pipeline(None, device="cpu"), mixdq.load_pipeline(copy, device="cpu")
    assert there.unet.config._name_or_path != here.unet.config._name_or_path  # really loaded from the copy
    fp = S.model_fingerprint(here)
    assert S.model_fingerprint(there) == fp
    cal = mixdq.Calibration.default(there)
    assert S.cache_key(there, cal)[0] == S.cache_key(here, mixdq.Calibration.default(here))[0]

    shipped = json.loads((ROOT / "presets" / "sensitivity.json").read_text())
    # the shipped identity is this model's and its default calibration's (a fingerprint that
    # depended on the machine or the folder would fail here on another one)
    assert shipped["meta"]["model"] == fp[:16]
    key, inputs = S.cache_key(there, cal)
    assert shipped["meta"]["key"] == key
    # what its meta says it was measured with is what the key hashes (the lookup's messages quote it)
    meta = shipped["meta"]
    assert (meta["prompts"], meta["seed"], meta["settings"], meta["dtype"], meta["device_type"]) == \
        (len(inputs["prompts"]), inputs["seed"], inputs["settings"], inputs["dtype"], inputs["device_type"])
    for stats in (ROOT / "presets").glob("*.stats.json"):
        assert json.loads(stats.read_text())["model"] == fp[:16], stats.name
        plan = json.loads(stats.with_name(stats.name.replace(".stats.json", ".json")).read_text())
        assert plan["meta"]["model"] == fp[:16], stats.name

    def boom(*a, **k):
        raise AssertionError("the sensitivity analysis ran although a table ships for this model")

    monkeypatch.setattr(S, "sensitivity", boom)
    got = tables.cached_sensitivity(there, cal)
    assert got is not None and got.scores == S.Sensitivity.from_dict(shipped).scores
    assert not (tmp_path / "empty-cache" / "sensitivity").exists()


def test_embedded_model_in_float16_is_the_same_model_and_finds_the_shipped_table(tmp_path, monkeypatch):
    """A GPU loads the embedded model in float16 (loading.default_dtype): the same weights,
    so the same fingerprint as the float32 CPU load and the shipped table (measured on a CPU
    in float32) is taken, saying so; the cache key still tells the two measurements apart; a
    fine-tune of one weight is another model."""
    from mixdq.loading import EMBEDDED

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    f32 = mixdq.load_pipeline(None, device="cpu", dtype=torch.float32)
    f16 = mixdq.load_pipeline(None, device="cpu", dtype=torch.float16)
    assert f16.unet.dtype == torch.float16 and f16.text_encoder.dtype == torch.float16
    fp = S.model_fingerprint(f32)
    shipped = json.loads((ROOT / "presets" / "sensitivity.json").read_text())
    assert S.model_fingerprint(f16) == fp and shipped["meta"]["model"] == fp[:16]
    cal = mixdq.Calibration.default(f16)
    (k32, in32), (k16, in16) = S.cache_key(f32, mixdq.Calibration.default(f32)), S.cache_key(f16, cal)
    assert k16 != k32 and {k for k in in32 if in32[k] != in16[k]} == {"dtype"}
    assert (in32["dtype"], in16["dtype"]) == ("torch.float32", "torch.float16")

    def boom(*a, **k):
        raise AssertionError("the sensitivity analysis ran although a table ships for this model")

    monkeypatch.setattr(S, "sensitivity", boom)
    found = tables.find_sensitivity(f16, cal)
    assert found.source == "shipped" and found.table.scores == S.Sensitivity.from_dict(shipped).scores
    assert "measured for this model and calibration on cpu in float32 (yours: cpu, float16)" in found.message
    assert "`mixdq sensitivity` measures your own" in found.message and found.measured_as == "cpu in float32"
    assert tables.find_sensitivity(f32, mixdq.Calibration.default(f32)).measured_as is None
    # a fine-tune: one weight moved by more than float16 rounding
    w = f16.unet.conv_in.weight
    with torch.no_grad():
        w.view(-1)[0] += 0.01 + w.view(-1)[0].abs() * 0.01
    assert S.model_fingerprint(f16) != fp
    found = tables.find_sensitivity(f16, cal)
    assert found.table is None and found.source == "none" and found.shipped_note is None
    assert not (tmp_path / "empty-cache" / "sensitivity").exists()
