"""The benchmark scripts run on small configs and write well-formed results.

No timing assertions: only that every figure the report needs is there, is a
number where it should be, and that the memory accounting is consistent.
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from bench import common as bcommon, configs, run as brun
from bench.models import build_unet, unet_inputs
from mixdq.measure import shared_copy


@pytest.mark.parametrize("name", ["sdxl-turbo", "sd-turbo", "sd15"])
def test_published_configs_build_with_published_parameter_counts(name):
    unet = build_unet(name, materialize=False)  # meta device: no memory
    assert sum(p.numel() for p in unet.parameters()) == configs.expected_params(name)


def test_mixed_plans_hit_their_mean_bits():
    unet = build_unet("tiny-sdxl")
    from mixdq import quantizable_layers

    layers = quantizable_layers(unet)
    plans = brun.make_plans(layers, ["W8A8", "W5A8", "W4A8", "W4A16"])
    numel = {n: m.weight.numel() for n, m in layers.items()}

    def mean(plan):
        return sum(plan[n].weight * numel[n] for n in layers) / sum(numel.values())

    assert mean(plans["W8A8"]) == 8 and mean(plans["W4A16"]) == 4
    assert 4.0 < mean(plans["W5A8"]) <= 5.0 + 1e-9
    assert mean(plans["W4A8"]) <= 4.0 + 1e-9
    # text-facing K/V and the first / last convs stay at 8 bits
    for n in layers:
        if bcommon._sensitive(n):
            assert plans["W4A8"][n].weight == 8
    # -keep-w8 variants: the same plan (build_variant then keeps its W8A8 layers 8-bit)
    assert brun.make_plans(layers, ["W4A8-keep-w8"])["W4A8-keep-w8"] == plans["W4A8"]


def test_variants_are_built_as_quantize_builds_them(monkeypatch, tmp_path):
    """Decided for a CPU without VNNI, on oneDNN: a W8A8 variant is measured as quantize()
    stores it, W7A8, with the count recorded; the -keep-w8 variant keeps 8-bit codes,
    off the int8 path."""
    from mixdq import quantizable_layers

    unet = build_unet("tiny-sdxl")
    inputs = unet_inputs("tiny-sdxl", unet, px=64)
    ranges, _, _ = brun.observe_ranges(unet, inputs)
    plan = brun.make_plans(quantizable_layers(unet), ["W8A8"])["W8A8"]
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_CPU", "avx2")
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "onednn")
    monkeypatch.delenv("MIXDQ_INT8_SATURATE", raising=False)
    monkeypatch.delenv("MIXDQ_KERNEL", raising=False)
    _, safe = brun.build_variant(unet, plan, ranges)
    _, kept = brun.build_variant(unet, plan, ranges, int8_safe=False)
    assert safe["plan"] == f"W7A8x{len(plan)}" and safe["w8a8_as_w7a8_layers"] == len(plan)
    assert safe["routed_int8_layers"] == len(plan)
    assert kept["plan"] == f"W8A8x{len(plan)}" and kept["w8a8_as_w7a8_layers"] == 0
    assert kept["routed_int8_layers"] == 0 and kept["weight_bytes"] == safe["weight_bytes"]


def test_routed_layers_match_the_library_reference():
    """The layers' integer routing (as the benchmark runs them) computes what the dequant path computes."""
    from mixdq import Plan, quantizable_layers
    from mixdq.quant import replace_layers

    torch.manual_seed(0)
    unet = build_unet("tiny-sdxl")
    inputs = unet_inputs("tiny-sdxl", unet, px=64)
    ranges, _, _ = brun.observe_ranges(unet, inputs)
    names = list(quantizable_layers(unet))
    for bits in ((8, 8), (4, 8), (2, 8)):
        v = shared_copy(unet)
        replace_layers(v, Plan.uniform(names, *bits), ranges)
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
                 for n, m in quantizable_layers(v).items()]
        for m in quantizable_layers(v).values():
            m.kernel = "dequant"
        with torch.inference_mode():
            v(**inputs)
        for h in hooks:
            h.remove()
        ref = {}
        with torch.inference_mode():
            for n, m in quantizable_layers(v).items():
                ref[n] = m(seen[n])
            for m in quantizable_layers(v).values():
                m.kernel = "int_mm"
            for n, m in quantizable_layers(v).items():
                out = m(seen[n])
                err = float((out - ref[n]).norm() / ref[n].norm().clamp_min(1e-12))
                # the CPU fast quantizer multiplies by 1/scale where the reference
                # divides: an input within ~1e-6 of a rounding tie may land one
                # code apart (seen: 1 of 4096 codes, 5e-4 relative on that layer)
                assert err < 2e-3, (bits, n, err)


def _check_cpu_results(res, out_dir, models, name="results-cpu.json", extra=frozenset()):
    data = json.loads((out_dir / name).read_text())
    assert [m["model"] for m in data["models"]] == models
    env = data["env"]
    for key in ("torch", "diffusers", "command", "cpu", "date_utc"):
        assert env[key]
    assert env["cpu"]["capability"] == (torch.backends.cpu.get_cpu_capability() if "emulation" not in env
                                        else env["emulation"]["ATEN_CPU_CAPABILITY"].upper())
    for m in data["models"]:
        v = m["variants"]
        assert set(v) - extra == {"float32", "W8A8", "W5A8", "W4A8", "W4A16", "bfloat16", "float16"}
        for k, d in v.items():
            assert d["weight_bytes"] > 0
            if k != "float16" and (k != "bfloat16" or "step_s" in d):  # bfloat16 step: optional
                assert d["step_s"] > 0 and len(d["step_times_s"]) >= 1
                # timed steps' peak and the warm-up step's (prepacking happens there) apart
                assert "peak_step_bytes" in d and "peak_first_step_bytes" in d
        # memory accounting: float32 = 2x float16; quantized below float16
        assert v["float32"]["weight_bytes"] == 2 * v["float16"]["weight_bytes"]
        assert v["W8A8"]["weight_bytes"] < v["float16"]["weight_bytes"]
        assert v["W4A8"]["stored_bytes"] < v["W5A8"]["stored_bytes"] < v["W8A8"]["stored_bytes"]
        for k in ("W8A8", "W5A8", "W4A8", "W4A16"):  # held: + prepacked copies of 2-4-bit layers
            assert v[k]["weight_bytes"] >= v[k]["stored_bytes"]
        for k in ("W8A8", "W5A8", "W4A8", "W4A16"):
            assert v[k]["quantize_s"] > 0 and v[k]["routed_int8_layers"] >= 0
            assert 0 <= v[k]["rel_err_vs_float32"] < 10  # finite, not NaN
        r = m["ratios"]
        assert r["float16"]["weights_vs_float16"] == 1.0
        assert r["W8A8"]["speedup_vs_float32"] > 0
    md = (out_dir / ("EMULATED.md" if "emulation" in env else "RESULTS.md")).read_text()
    for name in models:
        assert f"### {name}" in md
    assert "capability" in md and "W8A8" in md and "first step peak above start MiB" in md


def test_cpu_bench_runs_on_small_configs(tmp_path):
    threads = torch.get_num_threads()
    res = brun.run(models=("tiny-sdxl", "tiny-sd15"), reps=1, px=64, out_dir=tmp_path, threads=1,
                   kernels_table=True, small_kernels=True, log=lambda *a: None, argv=["--test"])
    assert torch.get_num_threads() == threads  # restored
    _check_cpu_results(res, tmp_path, ["tiny-sdxl", "tiny-sd15"])
    k = res["kernels"]
    assert {r["type"] for r in k["rows"]} == {"linear", "conv"}
    for r in k["rows"]:
        assert r["ms"]["float32"] > 0 and r["fastest_int8"] in r["ms"]


def test_openvino_int8_quantization_that_fails_names_the_way_out(tmp_path):
    """NNCF runs in a process of its own (for the memory); when that process fails, the
    error says which IR and what to do, rather than a bare exit status."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from bench import openvino_variants

    missing = str(tmp_path / "unet.xml")
    with pytest.raises(RuntimeError, match=r"unet\.xml failed \(exit status 1.*leave openvino-int8 out"):
        openvino_variants.quantize(missing, {"sample": torch.zeros(1, 4, 8, 8)})


def test_openvino_ir_folders_left_by_killed_runs_are_removed(tmp_path, monkeypatch):
    """A killed run leaves its IR folder (10 GiB for SDXL); the next run removes folders
    whose process is gone, keeps live runs' and unmarked ones."""
    import subprocess
    import sys
    import tempfile

    from bench import openvino_variants as ov

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    marked = {"gone": gone, "live": str(os.getpid())}
    for name, pid in marked.items():
        (tmp_path / f"{ov.FOLDER_PREFIX}{name}").mkdir()
        (tmp_path / f"{ov.FOLDER_PREFIX}{name}" / "pid").write_text(pid)
    (tmp_path / f"{ov.FOLDER_PREFIX}unmarked").mkdir()
    folder = ov.ir_folder()
    left = sorted(p.name.removeprefix(ov.FOLDER_PREFIX) for p in tmp_path.iterdir())
    assert "gone" not in left and {"live", "unmarked"} <= set(left) and len(left) == 3
    assert (tmp_path / folder.name / "pid").read_text() == str(os.getpid())
    folder.cleanup()


def test_openvino_int8_that_fails_loses_none_of_the_run(tmp_path, monkeypatch):
    """NNCF killed for memory (simulated) after the torch rounds: the run still writes its
    results, openvino-fp32 timed, and the report says why openvino-int8 is missing."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from bench import openvino_variants

    def killed(ir_path, inputs):
        raise RuntimeError(f"NNCF's quantization of {ir_path} failed (killed by signal 9; ...)")

    monkeypatch.setattr(openvino_variants, "quantize", killed)
    res = brun.main(["--models", "tiny-sdxl", "--reps", "1", "--px", "64", "--out", str(tmp_path),
                     "--threads", "1", "--no-kernels-table", "--no-bfloat16-step",
                     "--variants", "openvino-fp32", "openvino-int8"])
    m = res["models"][0]
    assert m["variants"]["openvino-fp32"]["step_s"] > 0 and "openvino-int8" not in m["variants"]
    assert "killed by signal 9" in m["not_timed"]["openvino-int8"]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "Not timed: openvino-int8: NNCF's quantization of" in md


def test_openvino_variants_timed_beside_ours(tmp_path, monkeypatch):
    """OpenVINO FP32 and NNCF INT8 of the same UNet on the same inputs, each timed in
    rounds of its own beside mixdq's W8A8: FP32 computes what torch float32 computes,
    INT8 close to it.  NNCF runs when no torch UNet is left in the process (for an
    SDXL-size UNet it needs the room)."""
    pytest.importorskip("openvino")  # requirements-dev.txt installs it, and nncf
    pytest.importorskip("nncf")
    import gc

    from bench import openvino_variants

    def float_layers():  # live float linears and convs, the UNet's or any other's
        gc.collect()
        return sum(isinstance(o, (torch.nn.Linear, torch.nn.Conv2d)) for o in gc.get_objects())

    alive = [float_layers()]
    quantize = openvino_variants.quantize

    def counting(*a, **kw):
        alive.append(float_layers())
        return quantize(*a, **kw)

    monkeypatch.setattr(openvino_variants, "quantize", counting)
    res = brun.main(["--models", "tiny-sdxl", "--reps", "1", "--px", "64", "--out", str(tmp_path),
                     "--threads", "1", "--no-kernels-table", "--no-bfloat16-step",
                     "--variants", "W8A8", "openvino-fp32", "openvino-int8"])
    v = res["models"][0]["variants"]
    for k in ("openvino-fp32", "openvino-int8"):
        assert v[k]["step_s"] > 0 and v[k]["compile_s"] > 0 and v[k]["openvino"] and v[k]["nncf"]
        assert res["models"][0]["ratios"][k]["speedup_vs_float32"] > 0
    assert v["openvino-fp32"]["rel_err_vs_float32"] < 1e-4
    assert v["openvino-int8"]["quantize_s"] > 0 and v["openvino-int8"]["rel_err_vs_float32"] < 0.5
    for k in ("openvino-fp32", "openvino-int8"):
        assert v[k]["beside"]["W8A8"] > 0 and "beside W8A8" in v[k]["timed_after"]
    assert alive[1] == alive[0], "the benchmark's UNet layers are still alive when NNCF runs"
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| openvino-int8 |" in md and "openvino-fp32 after float32 and quantized rounds, beside W8A8" in md


def test_kernel_table_alone_with_torchao(tmp_path):
    """`--models` with no names runs the kernel table only; --torchao times torchao's W8A8
    recipe beside ours on the linear rows, from layers that compute what the float ones do."""
    pytest.importorskip("torchao")  # requirements-dev.txt installs it
    from bench import kernels as kbench

    res = brun.main(["--models", "--small-kernels", "--torchao", "--threads", "1", "--out", str(tmp_path),
                     "--label", "kernels only"])
    assert res["models"] == [] and res["kernels"]["env"]["torchao"] == kbench.torchao_version()
    rows = {r["type"]: r for r in res["kernels"]["rows"]}
    assert rows["linear"]["ms"]["torchao_dyn"] > 0 and rows["linear"]["ms"]["torchao_dyn_bf16"] > 0
    assert "torchao_dyn" not in rows["conv"]["ms"]  # torchao quantizes nn.Linear only
    assert "torchao_dyn ms" in (tmp_path / "RESULTS.md").read_text()
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 40) / 40 ** 0.5, torch.randn(24) * 0.1, torch.randn(7, 40)
    for name, layer in kbench._torchao_linears(w, b).items():
        y = layer(x.to(layer.weight.dtype)).float()
        ref = torch.nn.functional.linear(x, w, b)
        assert float((y - ref).norm() / ref.norm()) < 0.05, name


def test_emulated_avx2_run_caps_every_library(tmp_path):
    """--emulate avx2: a fresh process with torch, oneDNN, FBGEMM and MKL capped to AVX2
    and the integer layers on the backends an AVX2-only CPU gets; its own JSON and title."""
    res = brun.main(["--models", "tiny-sdxl", "--reps", "1", "--px", "64", "--out", str(tmp_path),
                     "--threads", "1", "--no-kernels-table",
                     "--emulate", "avx2", "--label", "emulated test run",
                     "--variants", "W8A8", "W8A8-keep-w8", "W5A8", "W4A8", "W4A16"])
    assert res["env"]["cpu"]["capability"] == "AVX2"  # ATEN_CPU_CAPABILITY took effect
    assert res["env"]["emulation"] == brun.EMULATIONS["avx2"]
    assert res["env"]["kernel_dispatch"]["linear_backend"] == "fbgemm"
    assert res["env"]["kernel_dispatch"]["conv_backend"] == "onednn"
    _check_cpu_results(res, tmp_path, ["tiny-sdxl"], "results-cpu-avx2-emulated.json", {"W8A8-keep-w8"})
    # no VNNI: 8-bit codes would saturate the u8s8 kernels, so W8A8 layers are built as
    # quantize builds them there, W7A8, and all run them; kept 8-bit, none does
    v = res["models"][0]["variants"]
    n = res["models"][0]["layers"]["quantizable"]
    assert v["W8A8"]["plan"] == f"W7A8x{n}" and v["W8A8"]["routed_int8_layers"] == n
    assert v["W8A8-keep-w8"]["plan"] == f"W8A8x{n}" and v["W8A8-keep-w8"]["routed_int8_layers"] == 0
    assert v["W4A8"]["routed_int8_layers"] == n
    assert "step_s" not in res["models"][0]["variants"]["bfloat16"]  # weights only: implied by --emulate
    assert sorted(p.name for p in tmp_path.glob("results-*.json")) == ["results-cpu-avx2-emulated.json"]
    md = (tmp_path / "EMULATED.md").read_text()  # never among the real machines' results
    assert "## CPU: emulated test run" in md and "FBGEMM_ENABLE_INSTRUCTIONS" in md
    assert "emulated test run" not in (tmp_path / "RESULTS.md").read_text()


def test_cli_args_round_trip(tmp_path):
    p = brun.add_bench_args(argparse.ArgumentParser())
    args = p.parse_args(["--models", "tiny-sdxl", "--reps", "1", "--px", "64", "--out", str(tmp_path),
                         "--threads", "1", "--no-kernels-table", "--variants", "W8A8", "W4A8"])
    assert args.models == ["tiny-sdxl"] and args.variants == ["W8A8", "W4A8"]
    with pytest.raises(SystemExit):
        p.parse_args(["--variants", "W3A3"])


def test_variants_with_a_forced_backend_run_beside_the_chosen_one(tmp_path, capsys):
    """VARIANT@BACKEND: the same plan quantized with that int8 backend forced, in the same
    run (VARIANT-float-attention: with the attention products kept in float); the
    environment is as it was afterwards; unknown backends or bases are refused."""
    from mixdq.quant.attention import attention_choice

    p = brun.add_bench_args(argparse.ArgumentParser())
    for bad in ("W8A8@magic", "openvino-fp32@onednn", "W3A3@onednn"):
        with pytest.raises(SystemExit):
            p.parse_args(["--variants", bad])
        assert f"unknown variant {bad!r}" in capsys.readouterr().err
    args = p.parse_args(["--variants", "W8A8", "W8A8@float", "W7A8@int_mm", "W8A8-float-attention"])
    assert args.variants == ["W8A8", "W8A8@float", "W7A8@int_mm", "W8A8-float-attention"]
    before = os.environ.get("MIXDQ_INT8_BACKEND"), os.environ.get("MIXDQ_ATTENTION")
    res = brun.run(models=("tiny-sdxl",), variants=args.variants, reps=1, px=64, out_dir=tmp_path, threads=1,
                   kernels_table=False, log=lambda *a: None, argv=["--test"], time_bfloat16=False)
    assert (os.environ.get("MIXDQ_INT8_BACKEND"), os.environ.get("MIXDQ_ATTENTION")) == before
    v, n = res["models"][0]["variants"], res["models"][0]["layers"]["quantizable"]
    assert v["W8A8"]["attention"] == attention_choice("cpu") and v["W8A8-float-attention"]["attention"] == "float"
    assert v["W8A8-float-attention"]["plan"] == v["W8A8"]["plan"]
    assert v["W8A8@float"]["backends"] == {"float": n} and v["W8A8@float"]["routed_int8_layers"] == 0
    assert v["W7A8@int_mm"]["backends"] == {"int_mm": n} and v["W7A8@int_mm"]["routed_int8_layers"] == n
    assert all(v[k]["step_s"] > 0 for k in args.variants)


def test_gpu_script_runs_unchanged_on_cpu(tmp_path):
    """bench.gpu's code path (weights, eager stage, report) on the CPU, tiny model."""
    from bench import gpu
    from bench.report import write_results_md

    res = gpu.run(model="tiny-sdxl", device="cpu", out_dir=tmp_path, iters=1, log=lambda *a: None,
                  hold_epilogue=True)
    m = res["models"][0]
    assert m["kernel"] == "int_mm"  # the int8 path is what this benchmark measures
    held = m["epilogue_held_layers"]
    assert held["W8A8"] == held["W8A8-linears"] > 0 and held["W4A8"] > 0
    assert {"float16", "W8A8", "W8A8-linears", "W4A8"} <= set(m["weights"])
    assert m["weights"]["W4A8"] < m["weights"]["W8A8"] < m["weights"]["float16"] * 2
    assert {r["variant"] for r in m["timings"]} == {"float16", "W8A8", "W8A8-linears"}
    assert all(r["ms"] > 0 for r in m["timings"])
    data = json.loads((tmp_path / "results-gpu.json").read_text())
    assert data["env"]["device"] == "cpu"
    assert "## GPU" in write_results_md(tmp_path).read_text()


def test_gpu_script_arguments():
    from bench import gpu

    a = gpu.parser().parse_args(["--configs", "512,1", "1024x1", "--variants", "float16", "FP8", "--dry-run"])
    assert a.configs == [(512, 1), (1024, 1)] and a.variants == ["float16", "FP8"] and a.dry_run
    with pytest.raises(SystemExit):
        gpu.parser().parse_args(["--configs", "500,1"])
    with pytest.raises(SystemExit):
        gpu.parser().parse_args(["--variants", "W3A3"])
    assert gpu.variant_backends("W8A8-linears", "triton") == "linear=triton,conv=float"
    assert gpu.variant_backends("W8A8", "triton") == "linear=triton,conv=triton"
    assert gpu.variant_backends("FP8", None) == "linear=triton_fp8,conv=triton_fp8"
    assert gpu.variant_backends("W8A8", "auto") is None


def test_gpu_dry_run_builds_triton_variants_on_cpu(tmp_path):
    """The W8A8 variant as the GPU run builds it (every layer on the triton backend; the
    CPU runs its kernels in Triton's interpreter), its output checked against float."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-dev.txt)")
    from bench import gpu

    res = gpu.run(model="tiny-sdxl", device="cpu", out_dir=tmp_path, configs=[(64, 1)],
                  variants=["float16", "W8A8"], int8_backend="triton", dry_run=True, log=lambda *a: None)
    m = res["models"][0]
    assert set(m["backends"]["W8A8"]) == {"triton"} and m["backends"]["W8A8"]["triton"] > 100
    assert 0 < m["output_rel_err_vs_float16"]["64px b1 W8A8"] < 0.1
    assert m["timings"] == [] and json.loads((tmp_path / "results-gpu.json").read_text())["env"]["triton"]
    # every stage this device has ran once (the CPU: eager), apart from the timings and the table
    assert [(r["variant"], r["mode"], len(r["times_ms"])) for r in m["dry_run_calls"]] == \
        [("float16", "eager", 1), ("W8A8", "eager", 1)] and "eager" in m["stages_done"]
    assert not (tmp_path / "RESULTS-gpu.md").exists()
    run = gpu.Run(torch.device("cpu"), tmp_path, 1.0, [], "tiny-sdxl")
    run.record((64, 1), "float16", "eager", 2.0, [2.0], log=lambda *a: None)
    run.record((64, 1), "W8A8", "eager", 1.0, [1.0], log=lambda *a: None)
    rows = (tmp_path / "RESULTS-gpu.md").read_text().splitlines()
    assert len(rows) == 4 and "| 2.00x |" in rows[-1] and "tiny-sdxl" in rows[-1]


def test_results_are_ordered_by_run_number():
    from bench.report import _run_order

    runs = [{"label": f"run {n}: x", "env": {}} for n in (10, 2, 9, 1)] + [{"env": {}}]
    assert [r.get("label", "")[:6] for r in sorted(runs, key=_run_order)] == \
        ["", "run 1:", "run 2:", "run 9:", "run 10"]


def test_step_peak_total_counts_the_larger_of_first_and_timed_steps():
    mib = 1 << 20
    v = {"float16": {"weight_bytes": 100 * mib},
         "float32": {"weight_bytes": 200 * mib, "step_s": 2.0, "peak_step_bytes": 10 * mib,
                     "peak_first_step_bytes": 5 * mib},
         "bfloat16": {"weight_bytes": 100 * mib, "peak_step_bytes": 20 * mib},
         "W8A8": {"weight_bytes": 50 * mib, "step_s": 1.0, "peak_step_bytes": 4 * mib,
                  "peak_first_step_bytes": 30 * mib}}
    r = brun.ratios({"variants": v})
    assert r["float32"]["step_peak_total_bytes"] == 210 * mib
    assert r["W8A8"]["step_peak_total_bytes"] == 80 * mib  # the first step's, not the timed ones'
    assert r["W8A8"]["step_peak_total_vs_half"] == 80 / 120 and r["W8A8"]["speedup_vs_float32"] == 2.0
    assert r["W8A8"]["weights_vs_float16"] == 0.5


def test_cpu_steps_are_timed_on_the_heap_the_step_before_left():
    """step_once on the CPU: the first of two steps reads the peak (on a trimmed heap),
    the second is timed; the second's work is what the seconds measure."""
    import time

    calls = []

    class Step(torch.nn.Module):
        def forward(self, **inputs):
            calls.append(len(calls))
            if len(calls) == 1:  # the memory step: touches 64 MiB
                buf = torch.ones(16 << 20)
                out = buf[:4].clone()
            else:  # the timed step: slow, small
                time.sleep(0.2)
                out = torch.zeros(4)
            return argparse.Namespace(sample=out)

    dt, peak, out = brun.step_once(Step(), {}, "cpu")
    assert calls == [0, 1]
    assert dt >= 0.2
    if peak is not None:  # VmHWM readable here
        assert peak >= 48 << 20
    assert torch.equal(out, torch.ones(4))  # the output is the memory step's
