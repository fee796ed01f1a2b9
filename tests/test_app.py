"""The Gradio app over its HTTP API (gradio_client), launched in-process on a free port."""
import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

import mixdq  # noqa: E402
from test_measure import SMALL_CAL, shipped_elsewhere, shipped_like, synthetic_sensitivity  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(pipe, tmp_path):
    """The app as `python app.py` builds it, on the tiny random SDXL, with a small calibration
    set and a synthetic sensitivity table (the real analysis takes minutes; it has its own
    tests).  Returns (demo, url)."""
    from mixdq import app

    demo = app.build_app(pipe, sensitivity=synthetic_sensitivity(pipe.unet),
                         calibration=mixdq.Calibration(SMALL_CAL, batch_size=2), workdir=tmp_path / "work")
    port = free_port()
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("app-model"))
    demo, url = launch_app(mixdq.load_pipeline(folder, device="cpu"), tmp_path_factory.mktemp("app"))
    yield demo, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    demo.close()


def _generate(client, budget, prompt="a red circle", seed=1, steps=2):
    return client.predict(budget, prompt, seed, steps, api_name="/generate")


def test_budget_gives_images_and_measured_stats(served):
    demo, client = served
    session = demo.mixdq_session
    lo, hi = session.budget_range()
    budget = round(lo + 0.4 * (hi - lo), 3)
    out = _generate(client, budget)
    float_img, quant_img, overlay, diff, stats, chart, pareto_html, raw, status, _slider, info, header = out
    from PIL import Image

    a, b = Image.open(float_img), Image.open(quant_img)
    assert a.size == b.size == (256, 256)          # 16 px shown enlarged
    # what is shown is exactly what was measured: lossless, nearest-neighbour enlargement
    assert a.format == "PNG"
    shown = a.convert("RGB").resize((16, 16), Image.NEAREST)
    assert list(shown.getdata()) == list(session.last["float_image"].convert("RGB").getdata())
    assert os.path.isfile(diff["value"]) and "×" in diff["label"]     # an update: image + its gain
    assert raw["unet_quant_mb"] <= budget + 1e-6   # the budget is honoured, measured
    assert raw["unet_quant_mb"] == pytest.approx(raw["plan_mb_layer_costs"], abs=1e-6)
    assert raw["unet_float_mb"] == pytest.approx(session.float_mb)
    assert 0 < raw["ssim"] < 1 and raw["psnr"] > 0
    assert raw["step_ms"]["float"] > 0 and raw["step_ms"]["quantized"] > 0
    assert raw["peak_mb"]["quantized"] > 0
    assert raw["settings"]["num_inference_steps"] == 2
    for needle in ("UNet weight memory", "UNet latency per step", "Peak process memory", "SSIM", "PSNR"):
        assert needle in stats
    assert ("Why slower" in stats) == (raw["speedup"] < 1)
    assert "<svg" in chart and "content" in chart and "up 0" in chart
    assert "<svg" in pareto_html and "this plan" in pareto_html
    assert status.startswith("**Done**")
    assert "average bits" in info and "sensitivity given ✓" in header    # passed in, not found
    # a bigger budget: a plan at least as large, never above the budget
    top = session.slider_spec()["maximum"]          # the slider's own end is feasible
    out2 = _generate(client, top)
    assert out2[7]["unet_quant_mb"] >= raw["unet_quant_mb"] - 1e-9
    assert out2[7]["unet_quant_mb"] <= top + 1e-6


def test_export_gives_a_file_that_loads_back(served, tmp_path):
    demo, client = served
    session = demo.mixdq_session
    lo, hi = session.budget_range()
    first = _generate(client, round(lo + 0.5 * (hi - lo), 3), seed=4)
    path = client.predict(api_name="/export")
    assert path.endswith(".zip") and os.path.getsize(path) > 0
    loaded = mixdq.import_archive(path, dest=tmp_path)
    assert mixdq.current_plan(loaded.unet) == session.current.plan
    # through the app's load control: same model -> same numbers as before the export
    again = client.predict(handle_file(path), "a red circle", 4, 2, api_name="/load")
    assert again[7]["ssim"] == first[7]["ssim"]
    assert again[7]["unet_quant_mb"] == pytest.approx(first[7]["unet_quant_mb"])
    assert "loaded from" in again[8]
    assert "int8_safe" not in again[7]["quantization"]  # this CPU runs the export's W8A8 layers on int8 kernels


def test_load_on_a_cpu_without_vnni_says_what_loading_changed(served, monkeypatch, tmp_path):
    """An export with W8A8 layers loaded where they would saturate the int8 kernels (decided
    for a CPU without VNNI, on oneDNN): the library re-rounds them to W7A8, and the app says
    so next to the model."""
    demo, client = served
    session = demo.mixdq_session
    lo, hi = session.budget_range()
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_KERNEL", "dequant")  # the export is made where W8A8 is kept (e.g. a GPU)
    _generate(client, round(hi, 3) - 0.002, seed=4)  # near the largest budget: W8A8 layers in the plan
    n8 = sum(1 for b in session.current.plan.values() if str(b) == "W8A8")
    assert n8 > 0
    path = client.predict(api_name="/export")
    monkeypatch.delenv("MIXDQ_KERNEL")
    monkeypatch.setenv("MIXDQ_CPU", "avx2")
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "onednn")
    monkeypatch.delenv("MIXDQ_INT8_SATURATE", raising=False)
    out = client.predict(handle_file(path), "a red circle", 4, 2, api_name="/load")
    assert session.current.pipe.unet.mixdq_state.fitted == {"layers": n8, "from": "W8A8", "to": "W7A8"}
    note = f"{n8} W8A8 layers re-rounded to W7A8 for this CPU's int8 kernels"
    assert note in out[7]["quantization"] and "W7A8" in out[7]["plan"]
    assert note in out[4]  # the stats table's footer, next to the plan
    # quantizing on that CPU: the app shows the plan quantize built, and why it differs
    out = _generate(client, round(hi, 3) - 0.003, seed=4)
    assert "W8A8" not in session.current.plan.summary() and "W7A8" in session.current.plan.summary()
    assert "W8A8" in session.current.request.summary()
    assert "quantized as W7A8" in out[4] and session.current.plan.summary() in out[4]


def test_load_note_says_what_loading_changed():
    """What the app writes next to a loaded model comes from the library: its SlowPathWarnings
    (int8_safe=False keeps W8A8 on the float path) and `unet.mixdq_state.fitted`."""
    import warnings
    from types import SimpleNamespace

    from mixdq.app.state import load_note

    pipe = SimpleNamespace(unet=SimpleNamespace(mixdq_state=mixdq.QuantState(bos_aware=True, kernel="int_mm")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("3 W8A8 layers run the exact float path", mixdq.SlowPathWarning)
        warnings.warn("not about the model", UserWarning)
    assert load_note(pipe, caught) == "loaded from an export; 3 W8A8 layers run the exact float path"
    pipe.unet.mixdq_state.fitted = {"layers": 2, "from": "W8A8", "to": "W7A8"}
    assert load_note(pipe, []) == ("loaded from an export; 2 W8A8 layers re-rounded to W7A8 "
                                   "for this CPU's int8 kernels")


@pytest.mark.parametrize("args,message", [
    # gradio checks the slider's range (the feasible range) itself and names the limit
    ((0.0001, "a red circle", 1, 2), "minimum value"),
    ((1e9, "a red circle", 1, 2), "maximum value"),
    (("mid", "", 1, 2), "prompt is empty"),
    (("mid", "a red circle", 1, 100000), "steps"),
    (("mid", "a red circle", -5, 2), "seed"),
])
def test_bad_input_shows_a_message_and_the_app_lives_on(served, args, message):
    from gradio_client.exceptions import AppError

    demo, client = served
    lo, hi = demo.mixdq_session.budget_range()
    args = tuple(round((lo + hi) / 2, 3) if a == "mid" else a for a in args)
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name="/generate")
    assert message in str(info.value).lower()


def test_corrupt_upload_is_refused(served, tmp_path):
    from gradio_client.exceptions import AppError

    _, client = served
    junk = tmp_path / "model.zip"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AppError, match="not a zip archive"):
        client.predict(handle_file(str(junk)), "a red circle", 1, 2, api_name="/load")
    lo_hi = served[0].mixdq_session.budget_range()
    out = _generate(client, round(sum(lo_hi) / 2, 3))     # still serving
    assert out[7]["ssim"] > 0


def test_concurrent_clicks_are_queued(served):
    demo, client = served
    lo, hi = demo.mixdq_session.budget_range()
    jobs = [client.submit(round(lo + f * (hi - lo), 3), "a red circle", s, 2, api_name="/generate")
            for s, f in ((1, 0.3), (2, 0.7))]
    results = [j.result(timeout=120) for j in jobs]
    assert [r[7]["seed"] for r in results] == [1, 2]


def test_export_before_quantizing_says_so(tmp_path):
    from gradio_client.exceptions import AppError

    from conftest import build_tiny_sdxl

    demo, url = launch_app(mixdq.load_pipeline(build_tiny_sdxl(tmp_path / "m"), device="cpu"), tmp_path)
    try:
        with pytest.raises(AppError, match="Nothing to export"):
            Client(url, verbose=False).predict(api_name="/export")
    finally:
        demo.close()


def test_cli_flags_and_env(monkeypatch, capsys):
    from mixdq import app

    monkeypatch.setenv("MIXDQ_PORT", "7999")
    monkeypatch.setenv("MIXDQ_HOST", "0.0.0.0")
    args = app.parse_args([])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 7999, None)
    args = app.parse_args(["--host", "127.0.0.1", "--port", "8123", "--model", "some/folder"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8123, "some/folder")
    # a bad --model is one clear line, exit status 2, no traceback
    assert app.main(["--model", "/no/such/model-folder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_python_app_py_starts_the_app():
    """`python app.py` at the repository root, as the README runs it, is the app's command line
    (mixdq.app.main): a bad --model is refused in one line (other libraries may log before it)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "app.py", "--model", "/no/such/model-folder", "--port", "7999"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr


def test_presets_without_sensitivity(tmp_path, monkeypatch):
    """A fresh clone: no sensitivity cached, a shipped preset.  The preset button's budget
    needs no analysis at all; the slider spans the cost-model bounds."""
    from conftest import build_tiny_sdxl
    from mixdq import app
    from mixdq.app.text import budget_markdown

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    pipe = mixdq.load_pipeline(build_tiny_sdxl(tmp_path / "m"), device="cpu")
    names = list(mixdq.quantizable_layers(pipe.unet))
    presets = tmp_path / "presets"
    presets.mkdir()
    plan = mixdq.Plan({n: (8, 8) if i % 2 else (4, 16) for i, n in enumerate(names)})
    plan.save(presets / "half-w4.json")
    mixdq.Plan({"not.a.layer.of.this.model": (8, 8)}).save(presets / "other-model.json")
    (presets / "half-w4.stats.json").write_text('{"ssim": 0.9}')
    demo = app.build_app(pipe, calibration=mixdq.Calibration(SMALL_CAL, batch_size=2),
                         workdir=tmp_path / "w", presets_dir=presets)
    session = demo.mixdq_session
    assert session.allocator is None and [p.name for p in session.presets] == ["half-w4"]
    size = session.presets[0].size_mb
    lo, hi = session.budget_range()
    value = session.preset_value(session.presets[0])     # what the preset button sets
    assert lo < size <= value < size + session.slider_spec()["step"] < hi
    assert "matches preset" in budget_markdown(session, value) and "SSIM 0.9000" in budget_markdown(session, value)
    assert "sensitivity analysis" in budget_markdown(session, round((lo + hi) / 2, 3))
    port = free_port()
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out = client.predict(value, "a red circle", 1, 2, api_name="/generate")
        assert "preset" in out[8] and out[7]["unet_quant_mb"] == pytest.approx(size)
        assert session.allocator is None                  # no analysis was started
        assert "sensitivity" in out[6]                    # the Pareto panel says what it needs
        from gradio_client.exceptions import AppError

        for outside in (lo / 2, hi * 2):                  # refused at once, still no analysis
            with pytest.raises(AppError, match="(minimum|maximum) value"):
                client.predict(outside, "a red circle", 1, 2, api_name="/generate")
        assert session.allocator is None and not (tmp_path / "empty-cache" / "sensitivity").exists()
    finally:
        demo.close()


def test_header_says_where_the_sensitivity_came_from(tiny_sdxl_pipe, tmp_path, monkeypatch):
    """Shipped in presets/ for this model and calibration, complete in the on-disk cache, or
    neither (and then why the shipped table of this model was not taken)."""
    import dataclasses
    import json

    from mixdq import app
    from mixdq.app.text import budget_markdown, header_markdown

    from mixdq import sensitivity_analysis as S
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "cache"))
    pipe, cal = tiny_sdxl_pipe, mixdq.Calibration(SMALL_CAL, batch_size=2)
    shipped_like(pipe, cal, tmp_path / "presets")

    def header(calibration, presets_dir):
        session = app.Session(pipe, calibration=calibration, workdir=tmp_path / "w", presets_dir=presets_dir)
        return session, header_markdown(session)

    session, text = header(cal, tmp_path / "presets")
    assert "sensitivity shipped ✓" in text and "cached" not in text and session.sens_source == "shipped"
    assert "measured on" not in text
    # measured for this model and calibration, but on a GPU in float16: taken, and said so
    shipped_elsewhere(pipe, cal, tmp_path / "elsewhere")
    session, text = header(cal, tmp_path / "elsewhere")
    assert "sensitivity shipped ✓ (measured on cuda in float16)" in text and session.allocator is not None
    session, text = header(dataclasses.replace(cal, seed=5), tmp_path / "presets")
    assert session.allocator is None
    assert "sensitivity not yet measured (the shipped table is another calibration's)" in text
    lo, hi = session.budget_range()
    assert "was measured for this model with seed 0 (yours 5)" in budget_markdown(session, round((lo + hi) / 2, 3))

    # a complete cache, as a finished analysis leaves it (its scores: any plausible ones)
    key, _ = S.cache_key(pipe, cal)
    folder = S.cache_root() / key
    folder.mkdir(parents=True)
    table = synthetic_sensitivity(pipe.unet)
    (folder / "model.json").write_text(json.dumps({"act_numel": table.act_numel, "images": [2, 3, 16, 16]}))
    (folder / "results.json").write_text(json.dumps(
        [{"layer": n, "kind": kind, "bits": b, "metrics": m}
         for kind, per in table.scores.items() for n, bits in per.items() for b, m in bits.items()]))
    (tmp_path / "no-presets").mkdir()
    session, text = header(cal, tmp_path / "no-presets")
    assert "sensitivity cached ✓" in text and "shipped" not in text and session.sens_source == "cached"
    assert session.sens.meta["computed"] == 0 and session.sens.meta["cache"] == str(folder)  # read back
