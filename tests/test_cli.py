"""`python -m mixdq VERB`: the library verbs end to end, in a real subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VERBS = ["calibrate", "sensitivity", "allocate", "quantize", "export", "generate", "bench", "presets"]


def run(*args, check=True, timeout=600, **env_vars):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_vars)
    proc = subprocess.run([sys.executable, "-m", "mixdq", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("verb", VERBS)
def test_help(verb, capsys):
    from mixdq.cli import main

    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m mixdq " + verb in out and "--model" in out


def test_quantize_export_generate(tiny_sdxl_dir, tmp_path):
    common = ["--model", str(tiny_sdxl_dir), "--prompts-file", str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    report = json.loads(run("quantize", *common, "--plan", "W8A8").stdout)
    # W8A8, or W7A8 (same bytes) for the layers whose int8 backend saturates on 8-bit codes here
    wide = sum(1 for n in report["notes"] if "quantized as W7A8" in n)
    assert report["quantized_mb"] < report["float_mb"] and report["plan"].startswith("W7A8x" if wide else "W8A8x")
    assert sum(report["backends"].values()) == sum(int(p.split("x")[1]) for p in report["plan"].split(", "))
    report = json.loads(run("quantize", *common, "--plan", "W8A8", "--weight-bits-map", "8=7").stdout)
    assert report["plan"].startswith("W7A8x") and "W8" not in report["plan"]
    assert report["int8_layers"] >= 0 and isinstance(report["notes"], list)
    run("export", *common, "--plan", "W4A8", "--out", str(tmp_path / "q"))
    assert (tmp_path / "q" / "mixdq.json").is_file()
    run("generate", "--model", str(tmp_path / "q"), "--prompt", "a red circle",
        "--image", str(tmp_path / "a.png"))
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size == (16, 16)
    ranges = json.loads(run("calibrate", *common).stdout)
    assert ranges["calibration"]["prompts"] == ["a red circle", "a blue square"]
    assert all(r[0][0] <= 0 <= r[0][1] for r in ranges["ranges"].values())


def test_quantize_without_vnni_stores_w7a8_unless_told(tiny_sdxl_dir, tmp_path):
    """Decided for a CPU without VNNI (MIXDQ_CPU=avx2) on oneDNN, which saturates on 8-bit
    codes there: W8A8 is stored as W7A8, --keep-w8 keeps it."""
    common = ["--model", str(tiny_sdxl_dir), "--prompts-file", str(tmp_path / "p.txt"), "--plan", "W8A8",
              "--kernel", "int_mm"]
    (tmp_path / "p.txt").write_text("a red circle\n")
    no_vnni = dict(MIXDQ_CPU="avx2", MIXDQ_INT8_BACKEND="onednn", MIXDQ_CACHE=str(tmp_path / "cache"))
    safe = json.loads(run("quantize", *common, **no_vnni).stdout)
    kept = json.loads(run("quantize", *common, "--keep-w8", **no_vnni).stdout)
    assert safe["plan"].startswith("W7A8x") and "W8" not in safe["plan"]
    assert "quantized as W7A8" in safe["notes"][0] and safe["int8_layers"] > 0
    assert kept["plan"].startswith("W8A8x") and kept["int8_layers"] == 0
    assert "exact float path" in kept["notes"][0] and safe["quantized_mb"] == kept["quantized_mb"]
    # an export with W8A8 codes, then generated from on such a CPU: re-rounded to 7 bits by
    # default (as quantize does), kept with --keep-w8 (the float path, a warning says so)
    run("export", *common, "--keep-w8", "--out", str(tmp_path / "q"))
    kept = run("generate", "--model", str(tmp_path / "q"), "--prompt", "a red circle", "--keep-w8",
               "--image", str(tmp_path / "a.png"), **no_vnni)
    assert "W8A8 layers" in kept.stderr and "int8_safe=True" in kept.stderr
    safe = run("generate", "--model", str(tmp_path / "q"), "--prompt", "a red circle",
               "--image", str(tmp_path / "b.png"), **no_vnni)
    assert "W8A8 layers" not in safe.stderr and (tmp_path / "b.png").is_file()
    # generate --plan quantizes first (the quantize options apply)
    run("generate", *common, "--keep-w8", "--prompt", "a red circle", "--image", str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").is_file()


def test_bad_arguments_are_clear(tiny_sdxl_dir, tmp_path):
    p = run("quantize", "--model", str(tiny_sdxl_dir), "--plan", "W9A8", check=False)
    assert p.returncode == 2 and "weight bits 9" in p.stderr and "allowed" in p.stderr
    p = run("quantize", "--model", str(tiny_sdxl_dir), "--plan", "W8A8", "--weight-bits-map", "8:7",
            check=False)
    assert p.returncode == 2 and "OLD=NEW" in p.stderr
    p = run("quantize", "--model", str(tiny_sdxl_dir), "--plan", "no-such-plan", check=False)
    assert p.returncode == 2 and "neither a plan file" in p.stderr
    p = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", check=False)
    assert p.returncode == 2 and "neither a local folder nor a hub id" in p.stderr
    p = run("generate", "--model", str(tiny_sdxl_dir), "--prompt", "x", "--int8-safe", check=False)
    assert p.returncode == 2 and "unrecognized arguments: --int8-safe" in p.stderr  # --keep-w8 inverts it
    p = run("export", "--model", str(tiny_sdxl_dir), "--plan", "W8A16", "--out", str(tiny_sdxl_dir),
            check=False)
    assert p.returncode == 2 and "already exists" in p.stderr


def test_allocate_on_a_fresh_clone_refuses_an_impossible_budget_at_once(tmp_path):
    """No ~/.cache/mixdq yet: `allocate --budget-mb 0.001` names the feasible range and the fix
    instead of starting the analysis (which makes its cache folder before anything else)."""
    from mixdq.loading import EMBEDDED

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    cache = tmp_path / "cache"
    p = run("allocate", "--budget-mb", "0.001", check=False, MIXDQ_CACHE=str(cache))
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no plan fits in 0.001 MB") and "feasible budgets: " in last
    assert "raise the budget" in last and "--content-bits" in last
    assert not (cache / "sensitivity").exists()


def test_allocate_on_a_fresh_clone_uses_the_shipped_sensitivity(tmp_path):
    """No ~/.cache/mixdq yet: `allocate --budget-mb 4` takes presets/sensitivity.json (measured
    for the embedded model and the default calibration), says so, and prints a plan in
    seconds; the analysis (882 evaluations, minutes) does not start."""
    from mixdq.loading import EMBEDDED
    from mixdq.presets import PRESETS_DIR
    from mixdq.plan import Plan

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    cache = tmp_path / "cache"
    # The analysis would run for minutes: the timeout turns that into a failure, not a wait.
    p = run("allocate", "--budget-mb", "4", "--no-select", timeout=180, MIXDQ_CACHE=str(cache))
    assert "sensitivity: shipped presets/sensitivity.json, measured for this model and calibration" in p.stderr
    plan = Plan.from_dict(json.loads(p.stdout))
    shipped = json.loads((PRESETS_DIR / "sensitivity.json").read_text())
    assert len(plan) > 100 and plan.meta["size_mb"] <= 4 and plan.meta["model"] == shipped["meta"]["model"]
    assert not (cache / "sensitivity").exists()


def test_bench_verb_records_its_command_and_emulates(tmp_path):
    """`python -m mixdq bench ... --emulate avx2`: the re-run process gets the bench words."""
    run("bench", "--models", "tiny-sdxl", "--reps", "1", "--px", "64", "--out", str(tmp_path), "--threads", "1",
        "--no-kernels-table", "--variants", "W8A8", "--no-bfloat16-step", "--emulate", "avx2")
    data = json.loads((tmp_path / "results-cpu-avx2-emulated.json").read_text())
    assert data["env"]["command"].endswith("--emulate avx2") and " bench " not in data["env"]["command"]
    assert data["env"]["emulation"]["FBGEMM_ENABLE_INSTRUCTIONS"] == "AVX2"


def test_zoo_train_options_are_the_recipe_fields():
    """`mixdq zoo train` has one option per TrainConfig field; with none given it trains the
    shipped recipe, and each option lands in its field with its type."""
    from mixdq.cli import build_parser, train_config
    from mixdq.zoo.train_tiny import TrainConfig

    assert train_config(build_parser().parse_args(["zoo", "train"])) == TrainConfig()
    cfg = train_config(build_parser().parse_args(["zoo", "train", "--vae-lr", "5e-4", "--bf16", "--run-dir", "r",
                                                   "--unet-stop-step", "7"]))
    assert (cfg.vae_lr, cfg.bf16, cfg.run_dir, cfg.unet_stop_step) == (5e-4, True, Path("r"), 7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["zoo", "train", "--batch", "many"])


def test_zoo_evaluate_measures_the_embedded_model(tmp_path, capsys):
    """`mixdq zoo evaluate` end to end, on a few captions: the table, and the JSON record."""
    from mixdq.cli import main

    out = tmp_path / "eval.json"
    assert main(["zoo", "evaluate", "--n", "2", "--seeds", "0", "--steps", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["n_captions"] == 2 and record["seeds"] == [0]
    default = str(record["defaults"]["num_inference_steps"])
    assert set(record["results"]) == {"1", default} and 0 <= record["results"][default]["all"] <= 1
    assert "steps:" in capsys.readouterr().out


def test_presets_command_regenerates_the_presets(tmp_path, monkeypatch):
    """`mixdq presets` through `presets.regenerate`: the plans and their stats land in --out.
    The sensitivity run is replaced by the shipped table (the command's own analysis is what
    tests/test_sensitivity.py covers); selection and measurement run for real on 2 prompts."""
    import mixdq
    from mixdq import presets
    from mixdq.allocation import PlanEvaluator
    from mixdq.cli import main
    from mixdq.plan import Plan
    from mixdq.sensitivity_analysis import Sensitivity

    def setup(model, eval_prompts, progress):
        pipe = mixdq.load_pipeline(model, device="cpu")
        cal = mixdq.Calibration(["a red circle", "a blue square"], batch_size=2)
        ev = PlanEvaluator(pipe, cal, ["a red circle", "a green cross"][:eval_prompts], batch_size=2)
        sens = Sensitivity.load(presets.PRESETS_DIR / "sensitivity.json")
        return (pipe, cal, sens, 0.0, mixdq.layer_costs(pipe.unet), list(mixdq.quantizable_layers(pipe.unet)), ev)

    monkeypatch.setattr(presets, "_setup", setup)
    assert main(["presets", "--out", str(tmp_path), "--bits", "8", "--eval-prompts", "2"]) == 0
    plan = Plan.load(tmp_path / "mixdq-w8a8-size.json")
    stats = json.loads((tmp_path / "mixdq-w8a8-size.stats.json").read_text())
    assert stats["measured_size_mb"] <= stats["budget_mb"] + 1e-9 and 0 < stats["ssim"] <= 1
    assert len(dict(plan.items())) > 0
    with pytest.raises(SystemExit):  # refused at parsing, before any work
        main(["presets", "--out", str(tmp_path), "--eval-prompts", "0"])


# ---------------------------------------------------------------------------
# A published model: its sensitivity imported, its plans made without its weights
# ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
AUTHORS = ROOT.parent / "shared" / "mixdq-official-sdxl-turbo"   # not on a clean clone


def test_sensitivity_imports_the_mixdq_authors_tables(tmp_path):
    # files that are not the authors' are refused, naming the publication they are not
    for name in ("weight-ssim", "weight-sqnr", "act-ssim", "act-sqnr"):
        (tmp_path / f"{name}.yaml").write_text("model.conv_in: [1.0, 2.0, 3.0]\n")
    p = run("sensitivity", "--import-mixdq", str(tmp_path), "--out", str(tmp_path / "s.json"), check=False)
    assert p.returncode == 2 and "is not the file the MixDQ authors (thu-nics/MixDQ @ 4f6b32a" in p.stderr
    assert not (tmp_path / "s.json").exists()
    if not AUTHORS.is_dir():
        pytest.skip(f"the MixDQ authors' files are not in {AUTHORS}")
    out = tmp_path / "sdxl-turbo.json"
    p = run("sensitivity", "--import-mixdq", str(AUTHORS), "--model", "stabilityai/sdxl-turbo", "--out", str(out))
    assert "794 layers (420 content, 374 quality) of stabilityai/sdxl-turbo" in p.stderr
    # the shipped table is exactly this command's output
    assert out.read_bytes() == (ROOT / "presets" / "sdxl-turbo" / "sensitivity.json").read_bytes()


def test_allocate_a_published_model_without_its_weights(tmp_path):
    """No network, nothing in the Hugging Face cache: allocate plans SDXL-Turbo from its
    published architecture (meta device) and the shipped published table, with exact sizes."""
    import torch

    import mixdq
    from mixdq.architectures import meta_unet
    from mixdq.plan import Plan

    env = dict(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               MIXDQ_CACHE=str(tmp_path / "mixdq"), CUDA_VISIBLE_DEVICES="")
    p = run("allocate", "--model", "stabilityai/sdxl-turbo", "--range", timeout=300, **env)
    costs = mixdq.layer_costs(meta_unet("stabilityai/sdxl-turbo", torch.float32))
    assert f"(float UNet {costs.float_mb():.3f} MB; from the published architecture of stabilityai/sdxl-turbo" in p.stdout
    assert "measured by the MixDQ authors (thu-nics/MixDQ @ 4f6b32a, 2024-11-27)" in p.stderr
    assert "`mixdq sensitivity`" in p.stderr
    out = tmp_path / "plan.json"
    p = run("allocate", "--model", "stabilityai/sdxl-turbo", "--budget-mb", "2600", "--ratio", "joint",
            "--out", str(out), timeout=300, **env)
    assert "neither in the local Hugging Face cache nor downloadable here" in p.stderr
    assert "no image-based selection without the model's weights" in p.stderr
    plan = Plan.load(out)
    assert 700 < len(plan) and set(dict(plan.items())) <= set(costs.float_bytes)   # W16A16 layers are left out
    size = costs.total_mb(plan)
    assert 2500 < size <= 2600 and f"{size:.4f} MB" in p.stderr and "predicted loss" in p.stderr
    assert not (tmp_path / "mixdq" / "sensitivity").exists()
    # a calibration needs the weights: refused, not silently ignored
    p = run("allocate", "--model", "stabilityai/sdxl-turbo", "--budget-mb", "2600", "--steps", "4", "--no-select",
            check=False, timeout=300, **env)
    assert p.returncode == 2 and "--steps set a calibration, which only the model's weights can measure" in p.stderr


def test_sensitivity_says_what_it_costs_where_a_table_already_ships(tmp_path, monkeypatch, capsys):
    """`mixdq sensitivity` measures when asked, also where the shipped table fits this model
    and calibration; before it starts it says that table exists and what measuring costs
    (the analysis itself is not run here: one evaluation timed at a fixed 0.5 s)."""
    import argparse

    from mixdq import Calibration, cli, sensitivity_analysis
    from mixdq.loading import EMBEDDED, load_pipeline

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setattr(sensitivity_analysis, "_time_one", lambda pipe, cal, layers: (0.5, dict.fromkeys(layers, 0.5)))
    pipe = load_pipeline(device="cpu")
    args = argparse.Namespace(recompute=False, layers=None, weight_bits=None, act_bits=None, cache_dir=None)
    cli._say_what_the_analysis_costs(pipe, Calibration.default(pipe), args)
    err = capsys.readouterr().err
    assert "shipped presets/sensitivity.json, measured for this model and calibration" in err
    assert "measuring here anyway, as asked" in err and "882 evaluations" in err
