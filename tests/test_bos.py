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


PROMPTS = ["a red circle", "a blue square", "two green triangles", "a cat", "a dog", "sunset"]


@pytest.mark.skipif(not (EMBEDDED / "model_index.json").is_file(), reason="embedded model not built yet")
def test_bos_awareness_reduces_kv_error_on_trained_clip():
    # The tiny CLIP trained here has no BOS outliers (real CLIP's come with scale), so the
    # gain is small (~1.5%) but it must be there: token 0 is exact instead of quantized.
    prompts = _prompts()
    on = kv_error(None, True, prompts)
    off = kv_error(None, False, prompts)
    assert off > on, (on, off)


@pytest.fixture(scope="module")
def outlier_bos_dir(tiny_sdxl_dir, tmp_path_factory):
    """The tiny SDXL with real CLIP's symptom: a BOS hidden state with huge outliers.

    Both encoders are causal, so scaling position 0's embedding changes the BOS state
    (what SDXL reads: the penultimate layer, before the final norm) and nothing else.
    """
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    with torch.no_grad():
        for enc in (pipe.text_encoder, pipe.text_encoder_2):
            emb = enc.embeddings if hasattr(enc, "embeddings") else enc.text_model.embeddings
            emb.position_embedding.weight[0] *= 60
    folder = tmp_path_factory.mktemp("outlier-bos")
    pipe.save_pretrained(folder)
    (folder / "mixdq_defaults.json").write_text((tiny_sdxl_dir / "mixdq_defaults.json").read_text())
    return folder


def test_bos_awareness_with_outliers(outlier_bos_dir):
    on = kv_error(outlier_bos_dir, True, PROMPTS)
    off = kv_error(outlier_bos_dir, False, PROMPTS)
    assert off > 3 * on, (on, off)
