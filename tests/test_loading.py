import pytest
import torch

import mixdq
from mixdq import ModelNotFoundError
from mixdq.loading import EMBEDDED


def test_local_folder(tiny_sdxl_dir, tiny_sd15_dir):
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.dtype == torch.float32
    assert mixdq.generation_defaults(pipe)["num_inference_steps"] == 2
    pipe = mixdq.load_pipeline(str(tiny_sd15_dir), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        mixdq.load_pipeline(tmp_path)


def test_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        mixdq.load_pipeline("stabilityai/sdxl-turbo")
    msg = str(e.value)
    assert "stabilityai/sdxl-turbo" in msg and "huggingface-cli download" in msg and "local folder" in msg


def test_garbage_source():
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a hub id"):
        mixdq.load_pipeline("./no/such/folder")


def test_lcm_lora_fused(tiny_sdxl_dir, tmp_path):
    """An LCM-LoRA (here: random, built with peft) is fused into the UNet weights."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    base = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    before = base.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").weight.clone()
    torch.manual_seed(0)
    base.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make it do something
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora",
                                                unet_lora_layers=get_peft_model_state_dict(base.unet))
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, lora=str(tmp_path / "lora"), device="cpu")
    after = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert isinstance(after, torch.nn.Linear) and not torch.equal(after.weight, before)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert mixdq.generation_defaults(pipe)["num_inference_steps"] == 4


@pytest.mark.skipif(not (EMBEDDED / "model_index.json").is_file(), reason="embedded model not built yet")
def test_embedded_default():
    pipe = mixdq.load_pipeline(device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_hub_id_from_local_cache(tiny_sdxl_dir, tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout, offline."""
    import shutil

    repo = tmp_path / "hub" / "models--stabilityai--sdxl-turbo"
    shutil.copytree(tiny_sdxl_dir, repo / "snapshots" / "0123abcd", ignore=shutil.ignore_patterns("_tok"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pipe = mixdq.load_pipeline("stabilityai/sdxl-turbo", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    # the model's own few-step settings, though name_or_path is a cache folder
    assert mixdq.generation_defaults(pipe) == dict(num_inference_steps=1, guidance_scale=0.0,
                                                   height=512, width=512)
