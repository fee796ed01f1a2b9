"""Small configs for the tiny-sdxl model: every component class is the one SDXL-Turbo uses.

- two CLIP text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``), causal, real
  49408-id CLIP vocabulary; hidden sizes kept small because the token embeddings dominate
  the parameter count;
- ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (pooled text embedding of
  encoder 2 + 6 time ids), cross-attention on the concatenated penultimate hidden states;
- ``AutoencoderKL`` with 4x downsampling and 4 latent channels (64x64 px <-> 4x16x16);
- ``EulerDiscreteScheduler``, v-prediction, zero-terminal-SNR betas, "trailing" spacing, so
  the first step starts from pure noise and a 1-step sample is the predicted x0.
"""
from __future__ import annotations

import torch

TE1_DIM = 32
TE2_DIM = 64
PROJ_DIM = 64
TIME_EMBED_DIM = 8
LATENT_CHANNELS = 4
SAMPLE_SIZE = 16  # latent side: 64 px images at VAE factor 4


def text_encoder_configs():
    from transformers import CLIPTextConfig

    common = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,  # pooled output = hidden state at the first EOS (real CLIP)
        pad_token_id=1,
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_factor=1.0,
    )
    c1 = CLIPTextConfig(
        hidden_size=TE1_DIM, intermediate_size=4 * TE1_DIM, num_hidden_layers=3,
        num_attention_heads=2, hidden_act="quick_gelu", projection_dim=PROJ_DIM, **common,
    )
    c2 = CLIPTextConfig(
        hidden_size=TE2_DIM, intermediate_size=4 * TE2_DIM, num_hidden_layers=3,
        num_attention_heads=4, hidden_act="gelu", projection_dim=PROJ_DIM, **common,
    )
    return c1, c2


def make_text_encoders():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    c1, c2 = text_encoder_configs()
    return CLIPTextModel(c1), CLIPTextModelWithProjection(c2)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        transformer_layers_per_block=1,
        attention_head_dim=(1, 2, 4),  # diffusers' legacy name: these are head *counts*, as in SDXL's config
        norm_num_groups=8,
        cross_attention_dim=TE1_DIM + TE2_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJ_DIM,
        flip_sin_to_cos=True,
        freq_shift=0,
        upcast_attention=False,
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=1.0,  # replaced by 1/std of the trained latents (see train_tiny)
        force_upcast=False,
    )


def make_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
        final_sigmas_type="zero",
    )


def make_training_noise_schedule():
    """The DDPM view of the same betas (for add_noise / get_velocity during training)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True,
    )


def add_time_ids(batch: int, height: int = 64, width: int = 64, dtype=torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline builds it with default arguments:
    original_size + crops_coords_top_left (0, 0) + target_size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(batch, 1)


def encode_prompts(tokenizers, text_encoders, prompts: list[str]):
    """Exactly what ``StableDiffusionXLPipeline.encode_prompt`` computes (clip_skip None):
    penultimate hidden states of both encoders concatenated, pooled (projected) output of
    encoder 2.  Differentiable, for training; a test checks it against the pipeline."""
    embeds = []
    pooled = None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        pooled = out[0]  # for encoder 2 (last in the loop): text_embeds, shape (B, PROJ_DIM)
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def assemble(vae, te1, te2, tok1, tok2, unet, scheduler=None):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler or make_scheduler(), force_zeros_for_empty_prompt=True,
    )


def count_params(m) -> int:
    return sum(p.numel() for p in m.parameters())
