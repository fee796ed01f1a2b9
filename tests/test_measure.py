"""mixdq.measure: the numbers the app shows, measured."""
import math
from pathlib import Path

import pytest
import torch

import mixdq
from mixdq import measure, memory, tables
from mixdq.app import charts
from mixdq.allocation import Allocator, budget_bounds
from mixdq.defaults import is_embedded
from mixdq.sensitivity_analysis import Sensitivity, layer_group

SMALL_CAL = ["a red circle", "a blue square on black"]


def synthetic_sensitivity(unet) -> Sensitivity:
    """A plausible sensitivity table without the (minutes-long) analysis: fewer bits hurt
    more, larger layers a little more, so the allocator makes genuinely mixed plans.  Tests of
    the app and of measure only need *a* table; the real analysis is tested in its own file."""
    layers = list(mixdq.quantizable_layers(unet))
    scores = {"weight": {}, "act": {}}
    for i, n in enumerate(layers):
        k = 1 + (i * 7919) % 13 / 6          # deterministic spread of sensitivities
        scores["weight"][n] = {b: {"ssim": 1 - k / b ** 2, "sqnr": 6.0 * b + 4 / k} for b in (2, 4, 8)}
        scores["act"][n] = {b: {"ssim": 1 - k / b ** 3, "sqnr": 6.0 * b + 2 / k} for b in (4, 8)}
    return Sensitivity(layers, {n: layer_group(n) for n in layers}, scores,
                       {n: 256 for n in layers}, meta={"synthetic": True})


@pytest.fixture
def quantized_pair(tiny_sdxl_pipe):
    f, q = measure.pair(tiny_sdxl_pipe)
    plan = mixdq.Plan.uniform(mixdq.quantizable_layers(q.unet), 8, 8)
    mixdq.quantize(q, plan, mixdq.Calibration(SMALL_CAL, batch_size=2), progress=False)
    return f, q


def test_pair_shares_all_but_the_unet(tiny_sdxl_pipe):
    f, q = measure.pair(tiny_sdxl_pipe)
    assert q.unet is not f.unet and q.vae is f.vae and q.text_encoder is f.text_encoder
    assert mixdq.generation_defaults(q) == mixdq.generation_defaults(f)
    assert measure.same_architecture(f, q)


def test_pair_holds_the_float_weights_once_and_each_side_stays_its_own(tiny_sdxl_pipe):
    """The copy's tensors start over the float UNet's storage (an SDXL-size float32 UNet is
    not held twice while it is quantized); quantizing, casting or re-allocating the copy
    leaves the float UNet's tensors, values and images as they were."""
    f, q = measure.pair(tiny_sdxl_pipe)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in f.unet.state_dict().items()}
    assert {n: p.data_ptr() for n, p in q.unet.state_dict().items()} == {n: v[0] for n, v in before.items()}
    settings = mixdq.generation_defaults(f)
    image = measure.generate(f, "a red circle", 1, settings)
    mixdq.quantize(q, mixdq.Plan.uniform(mixdq.quantizable_layers(q.unet), 8, 8),
                   mixdq.Calibration(SMALL_CAL, batch_size=2), progress=False)
    q.unet.to(torch.bfloat16)
    for p in q.unet.parameters():
        p.data = p.data.clone()
    for n, t in f.unet.state_dict().items():
        assert t.dtype == torch.float32 and t.data_ptr() == before[n][0] and torch.equal(t, before[n][1]), n
    assert measure.generate(f, "a red circle", 1, settings).tobytes() == image.tobytes()


def test_compare_measures_everything(quantized_pair):
    f, q = quantized_pair
    seen = []
    s = measure.compare(f, q, "a red circle", seed=3, timing_repeats=3, progress=lambda x, d: seen.append(x))
    assert s["float_image"].size == s["quant_image"].size == (16, 16)
    assert s["unet_float_mb"] == pytest.approx(mixdq.model_nbytes(f.unet) / 1e6)
    assert s["unet_quant_mb"] == pytest.approx(mixdq.model_nbytes(q.unet) / 1e6)
    assert 0.2 < s["unet_ratio"] < 0.5                      # W8A8 of float32 weights, plus scales
    assert s["peak_mb"]["float"] > 50 and s["peak_mb"]["quantized"] > 50
    assert len(s["step_ms_all"]["float"]) == len(s["step_ms_all"]["quantized"]) == 3
    assert all(t > 0 for t in s["step_ms_all"]["float"] + s["step_ms_all"]["quantized"])
    assert 0 < s["ssim"] <= 1 and s["psnr"] > 10
    assert s["settings"]["num_inference_steps"] == 2       # the model's own few-step count
    assert s["checks"] is None                              # not the embedded model
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    # same seed, same images: the float side is deterministic
    again = measure.compare(f, q, "a red circle", seed=3, timing_repeats=1)
    assert list(again["float_image"].getdata()) == list(s["float_image"].getdata())
    assert again["ssim"] == s["ssim"]


@pytest.mark.parametrize("prompt,seed,steps,match", [
    ("", 0, 1, "prompt is empty"), ("   ", 0, 1, "prompt is empty"),
    ("a cat", -1, 1, "seed"), ("a cat", 1.5, 1, "seed"), ("a cat", 2**70, 1, "seed"),
    ("a cat", "x", 1, "seed"), ("a cat", 0, 0, "steps"), ("a cat", 0, 10**6, "steps"),
    ("a cat", 0, float("nan"), "steps"), ("a cat", 0, None, "steps"),
])
def test_bad_requests_say_what_to_fix(prompt, seed, steps, match):
    with pytest.raises(measure.InputError, match=match):
        measure.check_request(prompt, seed, steps)


def test_peak_memory_sees_an_allocation():
    import torch

    with measure.peak_memory() as m:
        x = torch.ones(40_000_000, dtype=torch.uint8)   # 40 MB, touched
        x += 1
        del x
    before = measure.current_rss_mb()
    assert m["peak_mb"] >= before + 30, (m, before)


def test_budget_bounds_contain_the_allocator_range(tiny_sdxl_pipe):
    costs = mixdq.layer_costs(tiny_sdxl_pipe.unet)
    lo, hi = budget_bounds(costs)
    alo, ahi = Allocator(synthetic_sensitivity(tiny_sdxl_pipe.unet), costs).feasible_range_mb()
    assert lo == pytest.approx(alo, abs=1e-9)
    assert ahi <= hi + 1e-9 and hi - ahi < 0.01 * hi
    assert lo < costs.float_mb() <= hi


def test_equivalent_bits(quantized_pair):
    f, q = quantized_pair
    float_mb = mixdq.model_nbytes(f.unet) / 1e6
    quant_mb = mixdq.model_nbytes(q.unet) / 1e6
    assert memory.dtype_bits(f.unet) == memory.dtype_bits(q.unet) == 32
    assert memory.equivalent_bits(float_mb, float_mb) == 32
    # all-W8A8 plus per-channel scales: a little over 8 bits per parameter
    assert 8 < memory.equivalent_bits(quant_mb, float_mb) < 12


def test_plan_chart_data(tiny_sdxl_pipe):
    unet = tiny_sdxl_pipe.unet
    names = list(mixdq.quantizable_layers(unet))
    plan = mixdq.Plan({names[0]: (4, 8), names[-1]: (8, 16)})
    rows = charts.plan_chart_data(plan, unet)
    assert sorted(r["layer"] for r in rows) == sorted(names)
    by_name = {r["layer"]: r for r in rows}
    assert (by_name[names[0]]["weight_bits"], by_name[names[0]]["act_bits"]) == (4, 8)
    assert (by_name[names[-1]]["weight_bits"], by_name[names[-1]]["act_bits"]) == (8, 16)
    assert sum(r["weight_bits"] == 16 for r in rows) == len(names) - 2
    assert {r["group"] for r in rows} == {"content", "quality"}
    assert all(r["group"] == layer_group(r["layer"]) for r in rows)
    blocks = [r["block"] for r in rows]
    # data-flow order: input, down, mid, up, output
    order = ["input", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "output"]
    assert [b for i, b in enumerate(blocks) if i == 0 or blocks[i - 1] != b] == order


def test_difference_map(quantized_pair):
    f, q = quantized_pair
    s = measure.compare(f, q, "a red circle", seed=1, timing_repeats=1)
    diff, gain = measure.difference_map(s["float_image"], s["quant_image"])
    assert diff.size == s["float_image"].size and gain >= 1
    same, _ = measure.difference_map(s["float_image"], s["float_image"])
    assert max(same.getdata()) == 0
    assert math.isinf(measure.compare(f, f, "a red circle", seed=1, timing_repeats=1)["psnr"])


def test_prompt_checker_runs_for_captions_of_the_embedded_world(quantized_pair, tmp_path):
    from mixdq import zoo

    f, q = quantized_pair
    caption = zoo.heldout_prompts(1)[0]
    s = measure.compare(f, q, caption, seed=0, check=True, timing_repeats=1)
    for side in ("float", "quantized"):
        assert set(s["checks"][side]) == {"shape", "color", "size", "position", "background"}
        assert all(isinstance(v, bool) for v in s["checks"][side].values())
    # the checker's verdict is its own reading of the image (same image, same verdict)
    assert s["checks"]["float"] == zoo.check(s["float_image"], caption)
    assert measure.compare(f, q, "a photo of a cat", seed=0, check=True, timing_repeats=1)["checks"] is None
    # the embedded model (and its exports) turn the checker on by default; others do not
    assert not is_embedded(f)
    loaded = mixdq.import_archive(mixdq.export_archive(q, tmp_path / "e.zip", embedded=True), dest=tmp_path)
    assert is_embedded(loaded)


def shipped_like(pipe, cal, folder, **meta):
    """A table in `folder` as presets/sensitivity.json ships one: measured for `pipe` under
    `cal` (its meta as `sensitivity` writes it), with `meta` overriding."""
    from mixdq.sensitivity_analysis import cache_key

    key, inputs = cache_key(pipe, cal)
    sens = synthetic_sensitivity(pipe.unet)
    sens.meta = {"key": key, "model": inputs["model"][:16], "prompts": len(cal.prompts), "seed": cal.seed,
                 "settings": inputs["settings"], "dtype": inputs["dtype"],
                 "device_type": inputs["device_type"], **meta}
    folder.mkdir(parents=True, exist_ok=True)
    sens.save(folder / "sensitivity.json")
    return sens


def shipped_elsewhere(pipe, cal, folder, dtype="torch.float16", device_type="cuda", **meta):
    """`shipped_like`, as if measured in `dtype` on `device_type`: its key is the key there."""
    from mixdq.sensitivity_analysis import cache_key, key_of

    _, inputs = cache_key(pipe, cal)
    key = key_of({**inputs, "dtype": dtype, "device_type": device_type})
    return shipped_like(pipe, cal, folder, key=key, dtype=dtype, device_type=device_type, **meta)


def complete_cache(pipe, cal, table) -> Path:
    """The on-disk cache of `pipe` under `cal` as a finished analysis leaves it, with `table`'s scores."""
    import json

    from mixdq.sensitivity_analysis import cache_key, cache_root

    folder = cache_root() / cache_key(pipe, cal)[0]
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"act_numel": table.act_numel, "images": [2, 3, 16, 16]}))
    (folder / "results.json").write_text(json.dumps(
        [{"layer": n, "kind": kind, "bits": b, "metrics": m}
         for kind, per in table.scores.items() for n, bits in per.items() for b, m in bits.items()]))
    return folder


def test_shipped_sensitivity_is_used_only_for_its_own_model(tiny_sdxl_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    cal = mixdq.Calibration(SMALL_CAL, batch_size=2)
    shipped_like(tiny_sdxl_pipe, cal, tmp_path, model="0" * 16)
    assert tables.cached_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path) is None   # another model's
    assert tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path).shipped_note is None
    sens = shipped_like(tiny_sdxl_pipe, cal, tmp_path)
    found = tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path)
    assert found.source == "shipped" and found.message.startswith(f"shipped {tmp_path / 'sensitivity.json'}")
    assert found.table.layers == sens.layers and found.table.scores == sens.scores
    assert not (tmp_path / "empty-cache" / "sensitivity").exists()


def test_shipped_sensitivity_is_used_only_for_its_own_calibration(tiny_sdxl_pipe, tmp_path, monkeypatch):
    """The same model measured on other prompts, seed, steps or size is another table: it is
    not handed out, and the lookup says which settings differ and the flags that match them."""
    import dataclasses

    from mixdq import sensitivity_analysis as S

    def no_analysis(*a, **k):
        raise AssertionError("find_sensitivity must never measure")

    monkeypatch.setattr(S, "sensitivity", no_analysis)
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    cal = mixdq.Calibration(SMALL_CAL, batch_size=2)
    shipped_like(tiny_sdxl_pipe, cal, tmp_path / "presets")
    assert tables.cached_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path / "presets") is not None
    # the batch size is not part of what is measured
    assert tables.cached_sensitivity(tiny_sdxl_pipe, dataclasses.replace(cal, batch_size=1),
                                      presets_dir=tmp_path / "presets") is not None
    for other, diff, flags in [
            (dataclasses.replace(cal, seed=5), "seed 0 (yours 5)", "--seed 0"),
            (dataclasses.replace(cal, prompts=SMALL_CAL[:1]), "prompts 2 (yours 1)", "--prompts 2"),
            (dataclasses.replace(cal, num_inference_steps=1, height=32, width=32),
             "steps 2 (yours 1), height 16 (yours 32), width 16 (yours 32)", "--steps 2 --resolution 16")]:
        assert tables.cached_sensitivity(tiny_sdxl_pipe, other, presets_dir=tmp_path / "presets") is None
        found = tables.find_sensitivity(tiny_sdxl_pipe, other, presets_dir=tmp_path / "presets")
        assert found.table is None and found.source == "none"
        assert found.shipped_note == f"the shipped {tmp_path / 'presets' / 'sensitivity.json'} was measured " \
                                     f"for this model with {diff}"
        assert found.shipped_flags == flags and found.todo > 0
        assert found.message.startswith(found.shipped_note) and "nothing cached in " in found.message
    # same counts and settings, other prompt text: only the cache key tells them apart
    found = tables.find_sensitivity(tiny_sdxl_pipe, dataclasses.replace(cal, prompts=["a cat", "a dog"]),
                                     presets_dir=tmp_path / "presets")
    assert found.table is None and "other calibration prompts" in found.shipped_note
    assert found.shipped_flags is None
    # a table that does not record its calibration is not trusted with any
    shipped_like(tiny_sdxl_pipe, cal, tmp_path / "old", key=None)
    found = tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path / "old")
    assert found.table is None and "no cache key" in found.shipped_note


def test_shipped_sensitivity_measured_in_another_dtype_or_device(tiny_sdxl_pipe, tmp_path, monkeypatch):
    """A table shipped for this model and calibration, measured in float16 on a GPU, is taken
    on this float32 CPU pipeline (and said so); its key is checked as recomputed for the dtype
    and device it records, so another calibration there is still not taken; a complete cache
    measured here comes first."""
    import dataclasses

    from mixdq import sensitivity_analysis as S

    def no_analysis(*a, **k):
        raise AssertionError("find_sensitivity must never measure")

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    cal = mixdq.Calibration(SMALL_CAL, batch_size=2)
    presets = tmp_path / "presets"
    sens = shipped_elsewhere(tiny_sdxl_pipe, cal, presets)
    with monkeypatch.context() as m:
        m.setattr(S, "sensitivity", no_analysis)
        found = tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=presets)
    assert found.source == "shipped" and found.table.scores == sens.scores
    assert found.message == (f"shipped {presets / 'sensitivity.json'}, measured for this model and calibration on "
                             "cuda in float16 (yours: cpu, float32): per-layer scores transfer up to float "
                             "rounding; `mixdq sensitivity` measures your own")
    assert found.measured_as == "cuda in float16" and found.shipped_note is None and found.todo > 0
    # the exact key says nothing of elsewhere
    shipped_like(tiny_sdxl_pipe, cal, tmp_path / "here")
    assert tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path / "here").measured_as is None
    # measured there with another seed: another calibration, and the note names it, not the dtype
    other = dataclasses.replace(cal, seed=5)
    found = tables.find_sensitivity(tiny_sdxl_pipe, other, presets_dir=presets)
    assert found.table is None and found.source == "none"
    assert found.shipped_note.endswith("was measured for this model with seed 0 (yours 5)")
    assert found.shipped_flags == "--seed 0"
    # a key that is not this calibration's in the dtype and device the table records: not taken
    shipped_like(tiny_sdxl_pipe, cal, tmp_path / "forged", key="0" * 20, dtype="torch.float16", device_type="cuda")
    found = tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=tmp_path / "forged")
    assert found.table is None and "other calibration prompts" in found.shipped_note
    # a complete cache in this pipeline's own dtype and device wins over the transferred table
    mine = synthetic_sensitivity(tiny_sdxl_pipe.unet)
    mine.scores["weight"][mine.layers[0]][8]["sqnr"] += 1.0
    folder = complete_cache(tiny_sdxl_pipe, cal, mine)
    found = tables.find_sensitivity(tiny_sdxl_pipe, cal, presets_dir=presets)
    assert found.source == "cached" and found.message == f"cached in {folder}" and found.measured_as is None
    assert found.table.scores["weight"][mine.layers[0]][8]["sqnr"] == mine.scores["weight"][mine.layers[0]][8]["sqnr"]
