"""quant.attention: the attention products in bfloat16 where the machine measured it faster."""
import pytest
import torch

import mixdq
from mixdq import Calibration, Plan
from mixdq.quant import attention, machine
from conftest import unet_call
from mixdq.quant.attention import CpuAttention, attention_in_use, set_attention

PROMPTS = ["a red circle", "a blue square"]


def test_the_processor_computes_what_diffusers_does_in_float32_and_rounds_only_the_product(tiny_sdxl_pipe):
    unet = tiny_sdxl_pipe.unet
    reference = unet_call(unet)
    # float32 through CpuAttention's own path: the very ops of diffusers' processor
    assert set_attention(unet, "bfloat16", dtype=torch.float32) > 0
    assert torch.equal(unet_call(unet), reference)
    set_attention(unet, "bfloat16")
    assert attention_in_use(unet) == "bfloat16"
    rounded = unet_call(unet)
    assert not torch.equal(rounded, reference)  # it did run in bfloat16
    assert (rounded - reference).abs().max() < 0.05 * reference.abs().max()
    set_attention(unet, "float")  # its float32 product, not a wrapper of a wrapper
    assert attention_in_use(unet) == "float"
    assert all(type(p.replaced) is not CpuAttention for p in unet.attn_processors.values())
    assert torch.equal(unet_call(unet), reference)
    set_attention(unet, None)  # diffusers' processors back
    assert not any(isinstance(p, CpuAttention) for p in unet.attn_processors.values())
    assert torch.equal(unet_call(unet), reference)


def test_other_calls_go_to_the_replaced_processor(tiny_sdxl_pipe):
    """A masked call, or one not in float32, is not the product this processor rounds."""
    attn = next(m for m in tiny_sdxl_pipe.unet.modules() if type(m).__name__ == "Attention")
    calls = []

    def replaced(*args, **kwargs):
        calls.append(args)
        return args[1]

    proc = CpuAttention(replaced)
    h = torch.randn(1, 4, attn.to_q.in_features)
    proc(attn, h.double())
    proc(attn, h, attention_mask=torch.ones(1, 4))
    assert len(calls) == 2
    proc(attn, h)
    assert len(calls) == 2


@pytest.mark.parametrize("forced", ["auto", "bfloat16", "float"])
def test_quantize_and_load_run_the_chosen_attention(forced, tiny_sdxl_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXDQ_ATTENTION", forced)
    expected = machine.cpu_choice()["attention"] if forced == "auto" else forced
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    report = mixdq.quantize(tiny_sdxl_pipe, Plan({n: (8, 8) for n in names}), Calibration(PROMPTS),
                            progress=False)
    assert report.attention == attention_in_use(tiny_sdxl_pipe.unet) == expected
    notes = [n for n in report.notes if "bfloat16" in n]
    assert len(notes) == (expected == "bfloat16")
    assert all(("MIXDQ_ATTENTION=bfloat16" in n) == (forced == "bfloat16") for n in notes)  # why, truly
    assert "attention:" in report.kernel_times()  # the measurement behind the choice is reported
    before = unet_call(tiny_sdxl_pipe.unet)
    loaded = mixdq.load_pipeline(mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "export"), device="cpu")
    assert attention_in_use(loaded.unet) == expected
    assert torch.equal(unet_call(loaded.unet), before)


def test_the_choice_follows_the_measurement_and_the_override_is_checked(monkeypatch):
    assert machine.pick_attention({"float32": 2.0, "bfloat16": 1.0}) == "bfloat16"
    assert machine.pick_attention({"float32": 1.1, "bfloat16": 1.0}) == "float"  # under the margin
    assert machine.pick_attention({"float32": 1.0, "bfloat16": float("inf")}) == "float"
    monkeypatch.setenv("MIXDQ_ATTENTION", "fp16")
    with pytest.raises(ValueError, match="MIXDQ_ATTENTION='fp16'.*auto"):
        attention.attention_choice("cpu")
    monkeypatch.setenv("MIXDQ_ATTENTION", "bfloat16")
    assert attention.attention_choice("meta") == "float"  # off the CPU the processor would not round
    monkeypatch.setenv("MIXDQ_ATTENTION", "auto")
    assert attention.attention_choice("meta") == "float"  # only the CPU's choice is measured
    assert attention.attention_choice("cpu") == machine.cpu_choice()["attention"]


def test_bfloat16_attention_traces_without_graph_breaks(tiny_sdxl_pipe):
    unet = tiny_sdxl_pipe.unet
    set_attention(unet, "bfloat16")
    eager = unet_call(unet)
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    assert torch.equal(unet_call(compiled), eager)
