"""Tests for the embedded tiny-sdxl model (mixdq.zoo): tokenizer, world, checker, shipped
pipeline.  CPU only, a few seconds."""
from __future__ import annotations

import importlib.util
import json
import random
import time

import pytest
import torch
from PIL import Image, ImageFilter

from mixdq import zoo
from mixdq.zoo import build, world

# Ids produced by the reference CLIP tokenizer (open_clip's SimpleTokenizer, i.e. OpenAI's
# BPE) for these texts; verified when these tests were written, and re-verified below
# whenever open-clip-torch is installed.
KNOWN_IDS = {
    "a small red circle in the top left corner on a black background":
        [49406, 320, 2442, 736, 7117, 530, 518, 1253, 1823, 5253, 525, 320, 1449, 5994, 49407],
    "there is a big cyan disk; the background is grey":
        [49406, 997, 533, 320, 1205, 1470, 550, 17970, 282, 518, 5994, 533, 5046, 49407],
    "Hello, World!": [49406, 3306, 267, 1002, 256, 49407],
    "naïve café": [49406, 1097, 35689, 563, 15304, 49407],
    "don't": [49406, 847, 713, 49407],
    "A  Big   RED\tsquare": [49406, 320, 1205, 736, 3999, 49407],
}


@pytest.fixture(scope="module")
def toks():
    from transformers import CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(str(zoo.ASSET_DIR / "tokenizer")),
            CLIPTokenizer.from_pretrained(str(zoo.ASSET_DIR / "tokenizer_2")))


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(zoo.ASSET_DIR))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def defaults():
    return json.loads((zoo.ASSET_DIR / "mixdq_defaults.json").read_text())


# ------------------------------------------------------------------------------ tokenizer

def test_tokenizer_known_ids(toks):
    for tok in toks:
        assert len(tok) == 49408
        assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
        assert tok.model_max_length == 77
        for text, ids in KNOWN_IDS.items():
            if tok is toks[1] and "!" in text:
                continue  # see test_tokenizer_2_pad_quirk
            assert tok(text).input_ids == ids, text


def test_tokenizer_2_pad_quirk(toks):
    # SDXL's tokenizer_2 has pad_token "!", a special token, so a literal "!" in the text
    # becomes id 0 instead of 256 ("!</w>"); the real SDXL tokenizer_2 does the same. No
    # caption of the world contains "!".
    assert toks[0]("Hello, World!").input_ids == KNOWN_IDS["Hello, World!"]
    assert toks[1]("Hello, World!").input_ids == [49406, 3306, 267, 1002, 0, 49407]


def test_tokenizer_padding_like_sdxl(toks):
    t1, t2 = toks
    a = t1("a red square", padding="max_length", max_length=77).input_ids
    b = t2("a red square", padding="max_length", max_length=77).input_ids
    assert len(a) == len(b) == 77 and a[:5] == b[:5]
    assert a[5:] == [49407] * 72  # tokenizer pads with <|endoftext|>
    assert b[5:] == [0] * 72  # tokenizer_2 pads with "!" (id 0), as SDXL's does


def _have_open_clip() -> bool:
    return all(importlib.util.find_spec(m) for m in ("open_clip", "ftfy"))


@pytest.mark.skipif(not _have_open_clip(), reason="open-clip-torch/ftfy not installed (dev-time reference)")
def test_tokenizer_matches_reference(toks, tmp_path):
    from mixdq.zoo.tokenizer import reference_tokenize, write_tokenizer

    texts = list(KNOWN_IDS) + world.train_prompts(100, seed=3) + world.heldout_prompts(50, seed=3) + [
        "An astronaut riding a horse, 4k, trending on artstation!!",
        "the quick brown fox jumps over the lazy dog 1234567890",
        "Ünïcödé and emoji 🙂🚀, CamelCaseWords and snake_case_words",
    ]
    ref = reference_tokenize(texts)
    for tok in toks:
        for text, r in zip(texts, ref):
            if tok is toks[1] and "!" in text:
                continue  # see test_tokenizer_2_pad_quirk
            n = r.index(49407) + 1  # the reference pads with 0 after EOS
            assert tok(text).input_ids == r[:n], text
    # The shipped files are exactly what the generator derives from the BPE file.
    write_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").read_text() == (zoo.ASSET_DIR / "tokenizer" / "vocab.json").read_text()
    assert (tmp_path / "merges.txt").read_text() == (zoo.ASSET_DIR / "tokenizer" / "merges.txt").read_text()


# ---------------------------------------------------------------------------------- world

def test_parse_round_trip_all_templates():
    rng = random.Random(0)
    for a in world.all_combinations()[::7]:
        for t in range(len(world.TEMPLATES)):
            c = world.caption(a, rng, template=t)
            assert zoo.parse_caption(c) == a, c


@pytest.mark.parametrize("text", ["a photo of a cat", "", "a red circle", "a small red blue circle at the top on black",
                                  "a small red circle at the top left and the bottom right on black"])
def test_parse_rejects_non_captions(text):
    assert zoo.parse_caption(text) is None
    with pytest.raises(ValueError, match="not a caption"):
        zoo.check(Image.new("RGB", (64, 64)), text)


def test_heldout_never_in_training():
    train, held = set(world.TRAIN_COMBOS), set(world.HELDOUT_COMBOS)
    assert not train & held
    assert train | held == set(world.all_combinations())
    assert 0.08 < len(held) / (len(train) + len(held)) < 0.12
    assert all(zoo.parse_caption(p) in held for p in zoo.heldout_prompts(300, seed=1))
    assert all(zoo.parse_caption(p) in train for p in zoo.train_prompts(300, seed=1))
    _, caps, attrs = world.sample_batch(500, random.Random(0), torch.Generator().manual_seed(0))
    assert all(a in train for a in attrs) and all(zoo.parse_caption(c) == a for c, a in zip(caps, attrs))
    # every single attribute value is still seen in training
    for field in ("shape", "color", "size", "row", "col", "background"):
        assert {getattr(a, field) for a in train} == {getattr(a, field) for a in world.all_combinations()}
    # prompt lists are deterministic
    assert zoo.heldout_prompts(20, seed=4) == zoo.heldout_prompts(20, seed=4)


# -------------------------------------------------------------------------------- checker

def _rendered(n, seed=0):
    rng = random.Random(seed)
    attrs = [rng.choice(world.all_combinations()) for _ in range(n)]
    imgs = world.to_pil(world.render(attrs, torch.Generator().manual_seed(seed)))
    return imgs, [world.caption(a, rng) for a in attrs]


def test_checker_exact_on_rendered_images():
    imgs, caps = _rendered(300)
    r = zoo.alignment(imgs, caps)
    assert r["all"] == 1.0 and r["n"] == 300
    assert set(r["per_attribute"]) == set(world.ATTRIBUTE_NAMES)


def test_checker_robust_to_blur_and_resize():
    imgs, caps = _rendered(200, seed=1)
    blurred = [im.filter(ImageFilter.GaussianBlur(1.0)) for im in imgs]
    assert zoo.alignment(blurred, caps)["all"] >= 0.99
    big = [im.resize((128, 128), Image.BICUBIC) for im in imgs]
    assert zoo.alignment(big, caps)["all"] >= 0.99


def test_checker_detects_wrong_attributes():
    imgs, caps = _rendered(100, seed=2)
    wrong = 0
    for im, c in zip(imgs, caps):
        a = zoo.parse_caption(c)
        other = world.Attributes(
            world.SHAPES[(world.SHAPES.index(a.shape) + 1) % 3], a.color,
            "small" if a.size == "large" else "large", (a.row + 1) % 3, a.col, a.background)
        v = zoo.check(im, world.caption(other))
        assert v["color"] and v["background"] and not v["position"] and not v["size"]
        wrong += not v["shape"]
    assert wrong >= 95
    blank = zoo.check(Image.new("RGB", (64, 64), (10, 10, 10)), caps[0])
    assert not blank["shape"] and not blank["color"]


# ----------------------------------------------------------------------- shipped pipeline

def test_asset_files_and_size(defaults):
    files = [p for p in zoo.ASSET_DIR.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert size < 40e6, f"assets/tiny-sdxl is {size / 1e6:.1f} MB"
    assert set(defaults) == {"num_inference_steps", "guidance_scale", "height", "width"}
    assert 1 <= defaults["num_inference_steps"] <= 4 and defaults["height"] == defaults["width"] == 64
    prompts = (zoo.ASSET_DIR / "calibration_prompts.txt").read_text().strip().splitlines()
    assert len(prompts) == 32
    assert all(zoo.parse_caption(p) in set(world.TRAIN_COMBOS) for p in prompts)
    assert (zoo.ASSET_DIR / "README.md").exists() and (zoo.ASSET_DIR / "grid.png").exists()


def test_pipeline_architecture(pipe):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    sc = pipe.scheduler.config
    assert sc.prediction_type == "v_prediction" and sc.timestep_spacing == "trailing" and sc.rescale_betas_zero_snr
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert next(m.parameters()).dtype == torch.float32  # fp16 files, float32 at load
    # causal CLIP: the BOS hidden state is the same for every prompt (MixDQ's BOS-aware path)
    e1, _ = build.encode_prompts((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                 ["a small red circle at the top on black", "big blue box on the left, white background"])
    assert torch.allclose(e1[0, 0], e1[1, 0]) and not torch.allclose(e1[0, 1], e1[1, 1])


def test_training_encoding_matches_pipeline(pipe):
    prompts = zoo.train_prompts(3, seed=9)
    with torch.no_grad():
        emb, pooled = build.encode_prompts((pipe.tokenizer, pipe.tokenizer_2),
                                           (pipe.text_encoder, pipe.text_encoder_2), prompts)
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    assert emb.shape == ref.shape == (3, 77, pipe.unet.config.cross_attention_dim)
    torch.testing.assert_close(emb, ref)
    torch.testing.assert_close(pooled, ref_pooled)
    tids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(build.add_time_ids(1), tids)


def test_one_image_fast_on_cpu(pipe, defaults):
    kw = dict(num_inference_steps=defaults["num_inference_steps"], guidance_scale=defaults["guidance_scale"])
    prompt = "a small red circle in the center on a black background"
    threads = torch.get_num_threads()
    # One thread: this model is too small for intra-op parallelism to pay, and on a shared
    # machine 2 threads' OpenMP barriers made it 5-20x slower (measured).
    torch.set_num_threads(1)
    try:
        pipe(prompt, **kw)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            img = pipe(prompt, **kw).images[0]
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    assert img.size == (64, 64)
    assert min(times) < 1.0, f"{min(times):.2f} s per image"  # ~0.1 s measured; generous for loaded CI


def test_heldout_accuracy_floor(pipe, defaults):
    prompts = zoo.heldout_prompts(48, seed=0)
    g = torch.Generator("cpu").manual_seed(0)
    imgs = pipe(prompts, num_inference_steps=defaults["num_inference_steps"],
                guidance_scale=defaults["guidance_scale"], generator=g).images
    r = zoo.alignment(imgs, prompts)
    assert r["all"] >= 0.6, r
    assert min(r["per_attribute"].values()) >= 0.8, r


def test_library_default_loads_embedded_model(defaults):
    import mixdq

    if not hasattr(mixdq, "load_pipeline"):
        pytest.skip("mixdq.load_pipeline not available")
    pipe = mixdq.load_pipeline(device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert next(pipe.unet.parameters()).dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    prompt = zoo.heldout_prompts(1, seed=5)[0]
    img = pipe(prompt, num_inference_steps=defaults["num_inference_steps"], guidance_scale=defaults["guidance_scale"],
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_training_times_and_cpu_recipe_card(tmp_path):
    """The CPU-recipe paragraph of the model card comes from a real log and an evaluate record."""
    from mixdq.zoo import evaluate

    log = "\n".join([
        "[23:50:00] training tiny-sdxl on cpu (1 threads), run dir r",
        "[23:55:00] vae step 50/3000 l1 0.1 mse 0.1 kl 0.1 6.00s/step",
        "[23:58:00] vae step 80/3000 ...",            # killed here; the gap below is not counted
        "[00:30:00] training tiny-sdxl on cpu (1 threads), run dir r",
        "[00:30:03] vae: resumed at step 50",
        "[00:40:03] vae step 100: reconstruction alignment {}",
        "[00:50:03] latent bank: (8, 4, 16, 16), scaling_factor 0.5",
        "[01:20:03] unet step 50/3000 loss 0.1",
        "[01:21:03] validation (train split) @1 steps: {}",
        "[01:21:33] default steps: 1; total training time 1 min",
        "noise without a timestamp",
    ])
    t = evaluate.training_times(log)
    assert t["processes"] == 2
    # vae: 5 + 3 min in the first process, 3 s + 10 min after resuming
    assert t["stages_min"] == pytest.approx({"vae": 18.05, "latents": 10.0, "unet": 30.0,
                                             "validation + export": 1.5}, abs=0.06)
    assert t["total_min"] == pytest.approx(59.55, abs=0.06)
    per = {"shape": 0.95, "color": 1.0, "size": 1.0, "position": 1.0, "background": 1.0}
    rec = {"training": t, "hardware": {"threads": 1, "cpu": "x86_64", "torch": "2.13"}, "n_captions": 200,
           "seeds": [0, 1, 2], "defaults": {"num_inference_steps": 1},
           "results": {"1": {"per_attribute": per, "all": 0.95, "n": 600}}}
    path = tmp_path / evaluate.CPU_RECIPE_FILE
    path.write_text(json.dumps(rec))
    text = "\n".join(evaluate.cpu_recipe_lines(path))
    assert "1.0 h" in text and "unet 30.0 min" in text and "all 0.950" in text and "**passed**" in text
    assert "2 processes: interrupted and resumed" in text
    rec["results"]["1"]["per_attribute"]["shape"] = 0.5
    path.write_text(json.dumps(rec))
    assert "NOT reached" in "\n".join(evaluate.cpu_recipe_lines(path))
    assert "not recorded" in "\n".join(evaluate.cpu_recipe_lines(tmp_path / "missing.json"))


def test_shipped_cpu_recipe_record_reaches_the_bar():
    """The recorded CPU run of the recipe (evaluate --json of its export) passed the bar."""
    from mixdq.zoo import evaluate

    rec = json.loads((evaluate.ASSET_DIR / evaluate.CPU_RECIPE_FILE).read_text())
    steps = str(rec["defaults"]["num_inference_steps"])
    assert evaluate.passes_bar(rec["results"][steps]) and rec["bar_passed"]
    assert rec["results"][steps]["n"] == rec["n_captions"] * len(rec["seeds"]) >= 600
    assert rec["hardware"]["device"] == "cpu" and rec["training"]["total_min"] > 0
