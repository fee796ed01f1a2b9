"""SDXL-Turbo on first use: the app on an SDXL-Turbo-architecture pipeline (its UNet on the
meta device: the app's planning needs no weights) offers the SDXL-Turbo presets and the whole
feasible range at once, from the published table; and where no table exists, the app and
the CLI say what the analysis costs here before starting it, refusing a GPU job on a CPU."""
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")

import mixdq  # noqa: E402
from test_measure import SMALL_CAL  # noqa: E402

MODEL = "stabilityai/sdxl-turbo"


@pytest.fixture(scope="module")
def sdxl_turbo_like():
    """The embedded pipeline with its UNet replaced by SDXL-Turbo's architecture on the meta
    device, and the calibration of the published table (1 step, guidance 0)."""
    import torch

    from mixdq.architectures import meta_unet

    pipe = mixdq.load_pipeline()
    pipe.register_modules(unet=meta_unet(MODEL, torch.float32))
    return pipe, mixdq.Calibration(["a red circle"], num_inference_steps=1, guidance_scale=0.0)


def _components(demo, kind):
    return [c for c in demo.blocks.values() if type(c).__name__ == kind]


def test_app_offers_the_sdxl_turbo_presets_and_the_whole_range_from_the_start(sdxl_turbo_like, tmp_path):
    import time

    from mixdq import app
    from mixdq.app.text import header_markdown

    pipe, cal = sdxl_turbo_like
    demo = app.build_app(pipe, calibration=cal, workdir=tmp_path / "w")
    session = demo.mixdq_session
    assert session.sens_source == "published" and session.allocator is not None
    header = header_markdown(session)
    assert "MixDQ authors" in header and "mixdq sensitivity" in header   # where from, and fine-tunes
    names = ["mixdq-w3a8-size", "mixdq-w4a8-size", "mixdq-w5a8-size", "mixdq-w8a8-size"]
    assert [p.name for p in session.presets] == names
    buttons = {c.elem_id for c in _components(demo, "Button")}
    assert {f"preset-{n}" for n in names} <= buttons
    slider = next(c for c in _components(demo, "Slider") if c.elem_id == "budget")
    lo, hi = session.allocator.feasible_range_mb()
    assert slider.minimum - 1 < lo <= slider.minimum and hi - 1 < slider.maximum <= hi   # the exact range
    for p in session.presets:
        assert lo <= p.size_mb <= hi and p.stats["model"] == MODEL
    # a budget between presets goes through the allocator, in well under the 2 s the app allows
    budget = round((session.presets[1].size_mb + session.presets[2].size_mb) / 2)
    t0 = time.perf_counter()
    plan, how, alloc = session.plan_for(budget, lambda *a, **k: None)
    assert time.perf_counter() - t0 < 2 and how.startswith("allocated for") and alloc.optimal
    assert alloc.size_mb <= budget and session.costs.total_mb(plan) == pytest.approx(alloc.size_mb, abs=1e-6)


@pytest.fixture
def no_table(tmp_path, monkeypatch):
    """The tiny test pipeline with nothing cached and no table shipped, whose UNet counts as
    SDXL-size (so on this CPU its analysis is a GPU job); the analysis itself must not start."""
    from conftest import build_tiny_sdxl

    from mixdq import sensitivity_analysis, tables

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sensitivity_analysis, "GPU_JOB_PARAMS", 1000)

    def started(*a, **k):
        raise AssertionError("the analysis started")

    monkeypatch.setattr(tables, "sensitivity", started)   # where the CLI and the app start it
    folder = build_tiny_sdxl(tmp_path / "m")
    (tmp_path / "presets").mkdir()
    return folder, tmp_path / "presets"


def test_app_says_a_gpu_job_is_one_and_offers_the_presets(no_table, tmp_path):
    from mixdq import app
    from mixdq.errors import GPUJobError

    folder, presets_dir = no_table
    pipe = mixdq.load_pipeline(folder, device="cpu")
    names = list(mixdq.quantizable_layers(pipe.unet))
    mixdq.Plan({n: (8, 8) for n in names}).save(presets_dir / "all-w8.json")
    session = app.Session(pipe, calibration=mixdq.Calibration(SMALL_CAL, batch_size=2), workdir=tmp_path / "w",
                          presets_dir=presets_dir)
    assert session.allocator is None
    lo, hi = session.budget_range()
    warned = []
    with pytest.raises(GPUJobError, match="GPU job") as e:
        session.plan_for(round((lo + hi) / 2, 3), lambda *a, **k: None, warned.append)
    assert "mixdq sensitivity --device cuda" in str(e.value) and warned == []
    assert session.plan_for(session.preset_value(session.presets[0]), lambda *a, **k: None)[1].startswith("preset")


def test_cli_allocate_refuses_a_gpu_job_with_what_to_use_instead(no_table):
    import argparse

    from mixdq.cli import add_allocate_args, run_allocate
    from mixdq.errors import GPUJobError

    folder, _ = no_table
    parser = add_allocate_args(argparse.ArgumentParser())
    with pytest.raises(GPUJobError, match="is a GPU job: [0-9]+ evaluations") as e:
        run_allocate(parser.parse_args(["--model", str(folder), "--range", "--prompts", "4", "--device", "cpu"]))
    assert "measure it on a GPU" in str(e.value) and "published sensitivity tables ship for " + MODEL in str(e.value)


def test_app_times_the_analysis_before_starting_it(no_table, tmp_path, monkeypatch):
    """Not a GPU job: the warning before the analysis says how long it will take here."""
    from mixdq import app, sensitivity_analysis

    monkeypatch.setattr(sensitivity_analysis, "GPU_JOB_PARAMS", 10 ** 12)
    folder, presets_dir = no_table
    pipe = mixdq.load_pipeline(folder, device="cpu")
    session = app.Session(pipe, calibration=mixdq.Calibration(SMALL_CAL[:2], batch_size=2), workdir=tmp_path / "w",
                          presets_dir=presets_dir)
    warned = []
    lo, hi = session.budget_range()
    with pytest.raises(AssertionError, match="the analysis started"):
        session.plan_for(round((lo + hi) / 2, 3), lambda *a, **k: None, warned.append)
    assert len(warned) == 1 and "would take about" in warned[0] and "evaluations" in warned[0]


def test_plan_takes_a_preset_name_for_the_model_at_hand(sdxl_turbo_like):
    """`--plan mixdq-w4a8-size` is the SDXL-Turbo preset for an SDXL-Turbo UNet and the
    embedded model's for the embedded model: the same name, the model decides the file."""
    import argparse

    from mixdq.cli import _plan_arg, _resolve_plan
    from mixdq.plan import Plan
    from mixdq.presets import PRESETS_DIR

    pipe, _ = sdxl_turbo_like
    spec = _plan_arg("mixdq-w4a8-size")
    assert dict(_resolve_plan(spec, pipe.unet).items()) == dict(
        Plan.load(PRESETS_DIR / "sdxl-turbo" / "mixdq-w4a8-size.json").items())
    embedded = mixdq.load_pipeline().unet
    assert dict(_resolve_plan(spec, embedded).items()) == dict(Plan.load(PRESETS_DIR / "mixdq-w4a8-size.json").items())
    with pytest.raises(argparse.ArgumentTypeError, match="neither a plan file, a preset .*mixdq-w3a8-size"):
        _plan_arg("mixdq-w9a8-size")


def test_app_without_the_model_says_it_can_be_planned_without_weights(tmp_path):
    """`python app.py --model stabilityai/sdxl-turbo` with no network and an empty cache:
    the error names how to get the model, and that planning needs no weights."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.run([sys.executable, str(root / "app.py"), "--model", MODEL], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert "not in the local Hugging Face cache" in proc.stderr
    assert f"python -m mixdq allocate --model {MODEL} --budget-mb N` plans it without its weights" in proc.stderr
