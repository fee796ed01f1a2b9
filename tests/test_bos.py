"""BOS-aware cross-attention: turning it off measurably increases the K/V error."""
import pytest
import torch

import mixdq
from mixdq import Calibration, Plan
from mixdq.loading import EMBEDDED


def kv_error(source, bos_aware: bool, prompts) -> float:
    """Relative squared error of all cross-attention K/V outputs, quantized vs float."""
    pipe = mixdq.load_pipeline(source, device="cpu")
    names = [n for n in mixdq.quantizable_layers(pipe.unet) if n.endswith(("attn2.to_k", "attn2.to_v"))]
    with torch.no_grad():
        emb = pipe.encode_prompt(prompt=prompts, device="cpu", do_classifier_free_guidance=False)[0]
        ref = {n: pipe.unet.get_submodule(n)(emb) for n in names}
    mixdq.quantize(pipe, Plan.uniform(names, 8, 8), Calibration(prompts), bos_aware=bos_aware,
                   progress=False)
    num = den = 0.0
    with torch.no_grad():
        for n in names:
            out = pipe.unet.get_submodule(n)(emb)
            num += (out - ref[n]).pow(2).sum().item()
            den += ref[n].pow(2).sum().item()
    return num / den


def _prompts():
    from mixdq import zoo

    return zoo.train_prompts(8, seed=1)


@pytest.mark.skipif(not (EMBEDDED / "model_index.json").is_file(), reason="embedded model not built yet")
def test_bos_awareness_reduces_kv_error_on_trained_clip():
    prompts = _prompts()
    on = kv_error(None, True, prompts)
    off = kv_error(None, False, prompts)
    assert off > 1.5 * on, (on, off)


def test_bos_awareness_on_random_encoders(tiny_sdxl_dir):
    prompts = ["a red circle", "a blue square", "two green triangles", "a cat", "a dog", "sunset"]
    on = kv_error(tiny_sdxl_dir, True, prompts)
    off = kv_error(tiny_sdxl_dir, False, prompts)
    assert off > on
