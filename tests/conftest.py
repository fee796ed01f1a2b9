"""Small random-weight pipelines of the real architectures, built offline.

SDXL: two CLIP text encoders (the second with projection), text_time
conditioning, cross-attention, a VAE.  SD1.5: one encoder, no added
conditioning.  Each is saved once per session to a folder; tests load fresh
copies from it (quantize works in place).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Tiny models gain nothing from threads, and OpenMP threads spin badly when the
# cores are shared (a 64x64 matmul took 24 ms with 2 threads under load, 0.01 ms with 1).
torch.set_num_threads(1)


def _bytes_to_unicode():
    # The GPT-2/CLIP byte <-> unicode table, so any text tokenizes.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def char_tokenizer(folder):
    """A real CLIPTokenizer over single characters (no merges): tiny and offline."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tok


def _text_config(hidden=32, projection=32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=514, hidden_act="gelu",
                          projection_dim=projection, max_position_embeddings=16)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                         norm_num_groups=32, sample_size=16)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                  rescale_betas_zero_snr=True, steps_offset=1)


def unet_call(unet, seed=0):
    """One no-grad call of a tiny UNet on random inputs of a 16x16 latent (SDXL's added
    text_time conditioning where its config has it): the sample it returns."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx, **kwargs).sample


def build_tiny_sdxl(folder):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    tok = char_tokenizer(folder / "_tok")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=tok,
        unet=unet, scheduler=_scheduler())
    pipe.save_pretrained(folder)
    (folder / "mixdq_defaults.json").write_text(json.dumps(
        {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 16, "width": 16}))
    return folder


def build_tiny_sd15(folder):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        cross_attention_dim=32, norm_num_groups=8)
    tok = char_tokenizer(folder / "_tok")
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=tok, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "mixdq_defaults.json").write_text(json.dumps(
        {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 16, "width": 16}))
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture
def tiny_sdxl_pipe(tiny_sdxl_dir):
    import mixdq

    return mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")


@pytest.fixture
def tiny_sd15_pipe(tiny_sd15_dir):
    import mixdq

    return mixdq.load_pipeline(tiny_sd15_dir, device="cpu")


@pytest.fixture
def calibration_prompts():
    return ["a red circle", "a blue square on black", "two green triangles", "a photo of a cat",
            "a yellow star", "an orange box"]


def quantize_w7a8(pipe, monkeypatch, tmp_path, backend="auto"):
    """`pipe` quantized at W7A8 everywhere (7-bit codes: exact on every CPU's int8 kernels),
    on `backend` unless 'auto' (MIXDQ_INT8_BACKEND), measuring into tmp_path's cache."""
    import mixdq
    from mixdq import Calibration, Plan

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    if backend != "auto":
        monkeypatch.setenv("MIXDQ_INT8_BACKEND", backend)
    names = list(mixdq.quantizable_layers(pipe.unet))
    return mixdq.quantize(pipe, Plan({n: (7, 8) for n in names}), Calibration(["a red circle", "a blue square"]),
                          progress=False)


def unet_call_hooked(unet, hooks):
    """unet_call, then the hook handles `hooks` removed, whatever the call did."""
    try:
        return unet_call(unet)
    finally:
        for h in hooks:
            h.remove()
