"""Before a sensitivity analysis starts, the library says what it would cost on this device."""
import pytest


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    import mixdq

    return mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")


def test_estimate_times_one_evaluation_and_leaves_the_model_float(pipe):
    import torch

    import mixdq
    from mixdq.quant import quantized_layers
    from mixdq.sensitivity_analysis import DEFAULT_ACT_BITS, DEFAULT_WEIGHT_BITS, estimate_analysis, layer_group

    cal = mixdq.Calibration(["a red circle", "a blue square", "a green cross"], batch_size=2)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    est = estimate_analysis(pipe, cal)
    names = mixdq.quantizable_layers(pipe.unet)
    expected = sum(len(DEFAULT_WEIGHT_BITS[layer_group(n)]) + len(DEFAULT_ACT_BITS[layer_group(n)]) for n in names)
    assert (est.evaluations, est.prompts, est.gpu_job) == (expected, 3, False)
    assert 0 < est.seconds_per_evaluation and est.seconds > est.seconds_per_evaluation * est.evaluations
    assert f"{est.evaluations} evaluations" in est.message and "timed at" in est.message
    assert not quantized_layers(pipe.unet)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert estimate_analysis(pipe, cal, evaluations=5).evaluations == 5   # what is left to measure


def test_an_sdxl_size_unet_on_a_cpu_is_a_gpu_job(pipe, monkeypatch):
    """Not timed (one evaluation alone would take minutes): said plainly instead."""
    import mixdq
    from mixdq import sensitivity_analysis

    monkeypatch.setattr(sensitivity_analysis, "GPU_JOB_PARAMS", 1000)  # the tiny UNet "is" SDXL-size
    called = []
    monkeypatch.setattr(sensitivity_analysis, "_time_one", lambda *a: called.append(a))
    est = sensitivity_analysis.estimate_analysis(pipe, mixdq.Calibration(["a red circle"]))
    assert est.gpu_job and est.seconds is None and called == []
    assert "GPU job" in est.message and f"{est.evaluations} evaluations" in est.message
