"""Retrain the embedded tiny-sdxl model from scratch (fixed seed, resumable).

    mixdq zoo train --device cuda         # ~4 min on one H100 (how the shipped one was made)
    mixdq zoo train                       # the same recipe on CPU (hours, see below)
    nohup mixdq zoo train > runs/tiny-sdxl/train.log 2>&1 &   # unattended; rerun to resume

It writes assets/tiny-sdxl (--out) at the end; checkpoints go to runs/tiny-sdxl (--run-dir)
every few minutes and a rerun of the same command resumes from them.  On CPU the whole
recipe (1586 VAE + 822 UNet steps) took 3.0 h with --threads 1 on the 2-core AMD EPYC here
(~3 s per VAE step, ~6 s per UNet step) and reached the quality bar (held-out all-attribute
accuracy 0.978; assets/tiny-sdxl/cpu_recipe.json).  Use --threads 1 on a shared machine.

Stages (each resumes from its last checkpoint in --run-dir; a finished stage is skipped):
  1. vae:     AutoencoderKL on rendered training-split images (L1 + MSE + tiny KL); its
              reconstructions are scored with the checker (the VAE bounds what the UNet can do).
  2. latents: a bank of VAE latents of training-split images (the images are random, the
              captions are redrawn from the templates at every step); sets the VAE's
              scaling_factor to 1/std of the latents.
  3. unet:    UNet + both text encoders jointly, v-prediction on zero-terminal-SNR betas,
              timesteps biased to the ones a 1-4 step "trailing" Euler sampler visits;
              EMA weights; held-out accuracy logged with the checker.
  4. export:  diffusers pipeline folder (fp16 safetensors, loads as float32) + defaults,
              calibration prompts, and the measured defaults.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..resources import shipped
from . import build, checker, world

DEFAULT_RUN = Path("runs") / "tiny-sdxl"  # checkpoints: a working folder, not shipped data
DEFAULT_OUT = shipped("assets", "tiny-sdxl")
FEW_STEP_T = (999, 749, 666, 499, 332, 249)  # trailing Euler timesteps for 1..4 steps


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never corrupts the last good checkpoint


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def tokenizers(tok_dir: Path):
    from transformers import CLIPTokenizer

    from .tokenizer import write_tokenizer

    t1, t2 = tok_dir / "tokenizer", tok_dir / "tokenizer_2"
    shipped = DEFAULT_OUT / "tokenizer", DEFAULT_OUT / "tokenizer_2"
    if all((d / "vocab.json").exists() for d in shipped):
        # The shipped files (generated from the CLIP BPE file, tested against the reference):
        # lets training run where open-clip-torch is not installed (e.g. a GPU box).
        t1, t2 = shipped
    if not (t1 / "vocab.json").exists():
        write_tokenizer(t1)
    if not (t2 / "vocab.json").exists():
        write_tokenizer(t2, pad_token="!")
    return CLIPTokenizer.from_pretrained(str(t1)), CLIPTokenizer.from_pretrained(str(t2))


# ------------------------------------------------------------------------------ stage 1

def train_vae(args, device):
    ck = args.run_dir / "vae.pt"
    vae = build.make_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if ck.exists():
        s = torch.load(ck, map_location=device, weights_only=False)
        vae.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        step = s["step"]
        random.setstate(s["py_rng"])
        log(f"vae: resumed at step {step}")
    end = min(args.vae_steps, args.vae_stop_step or args.vae_steps)
    vae.trained_steps = step
    if step >= end:
        return vae
    rng = random.Random(args.seed * 1000 + step)  # reseeded per resume: reproducible per step count
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    use_bf16 = device.type == "cpu" or args.bf16
    last_save = time.time()
    t0 = time.time()
    vae.train()
    t_start = time.time()
    while step < end:
        if args.vae_max_minutes and time.time() - t_start > args.vae_max_minutes * 60:
            log(f"vae: time budget of {args.vae_max_minutes} min reached at step {step}")
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                         "py_rng": random.getstate()}, ck)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 200)
        x, _, _ = world.sample_batch(args.vae_batch, rng, gen)
        x = (x * 2 - 1).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=None)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        kl = post.kl().float().mean() / x[0].numel()
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step}/{args.vae_steps} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f} "
                f"{(time.time() - t0) / 50:.2f}s/step")
            t0 = time.time()
        if step % args.vae_eval_every == 0 or step == end:
            log(f"vae step {step}: reconstruction alignment {vae_alignment(vae, device, 256)}")
        if time.time() - last_save > args.ckpt_minutes * 60 or step == end:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                         "py_rng": random.getstate()}, ck)
            last_save = time.time()
    vae.trained_steps = step
    return vae


@torch.no_grad()
def vae_alignment(vae, device, n: int, seed: int = 123) -> dict:
    """Checker accuracy of VAE reconstructions of held-out images (the UNet's ceiling)."""
    was = vae.training
    vae.eval()
    rng = random.Random(seed)
    attrs = [rng.choice(world.HELDOUT_COMBOS) for _ in range(n)]
    x = world.render(attrs, torch.Generator().manual_seed(seed)) * 2 - 1
    rec = vae.decode(vae.encode(x.to(device)).latent_dist.mode()).sample.float().cpu()
    vae.train(was)
    imgs = world.to_pil((rec + 1) / 2)
    res = checker.alignment(imgs, [world.caption(a) for a in attrs])
    return {"all": round(res["all"], 3), **{k: round(v, 3) for k, v in res["per_attribute"].items()}}


# ------------------------------------------------------------------------------ stage 2

@torch.no_grad()
def make_latent_bank(args, vae, device):
    path = args.run_dir / "latents.pt"
    if path.exists():
        bank = torch.load(path, weights_only=False)
        if bank.get("vae_step") == getattr(vae, "trained_steps", None):
            return bank
        log("latent bank was made with another VAE checkpoint: rebuilding it")
    vae.eval()
    rng = random.Random(args.seed + 7)
    gen = torch.Generator().manual_seed(args.seed + 7)
    lat, idx = [], []
    combo_index = {a: i for i, a in enumerate(world.TRAIN_COMBOS)}
    for start in range(0, args.bank, 256):
        n = min(256, args.bank - start)
        x, _, attrs = world.sample_batch(n, rng, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cpu" or args.bf16):
            z = vae.encode((x * 2 - 1).to(device)).latent_dist.mode()
        lat.append(z.float().cpu())
        idx.extend(combo_index[a] for a in attrs)
    lat = torch.cat(lat)
    scale = float(1.0 / lat.std())
    bank = {"latents": lat * scale, "combo": torch.tensor(idx), "scaling_factor": scale,
            "vae_step": getattr(vae, "trained_steps", None)}
    atomic_save(bank, path)
    log(f"latent bank: {tuple(lat.shape)}, scaling_factor {scale:.4f}")
    return bank


# ------------------------------------------------------------------------------ stage 3

def sample_timesteps(n: int, gen: torch.Generator) -> torch.Tensor:
    """25 % t=999 (the 1-step sample, and the first step of every schedule), 35 % the other
    few-step timesteps, 40 % uniform (keeps the model a real diffusion model in between)."""
    u = torch.rand(n, generator=gen)
    uni = torch.randint(0, 1000, (n,), generator=gen)
    few = torch.tensor(FEW_STEP_T[1:])[torch.randint(0, len(FEW_STEP_T) - 1, (n,), generator=gen)]
    return torch.where(u < 0.25, torch.full_like(uni, 999), torch.where(u < 0.60, few, uni))


def train_unet(args, vae, bank, device):
    tok1, tok2 = tokenizers(args.run_dir)
    te1, te2 = build.make_text_encoders()
    unet = build.make_unet()
    models = torch.nn.ModuleDict({"unet": unet, "te1": te1, "te2": te2}).to(device)
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    opt = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = build.make_training_noise_schedule()
    ac = sched.alphas_cumprod.to(device)
    ck = args.run_dir / "unet.pt"
    step = 0
    if ck.exists():
        s = torch.load(ck, map_location=device, weights_only=False)
        models.load_state_dict(s["model"])
        ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"])
        step = s["step"]
        log(f"unet: resumed at step {step}")
    end = min(args.unet_steps, args.unet_stop_step or args.unet_steps)
    if step >= end:
        return ema, (tok1, tok2)
    lat_all = bank["latents"]
    combos = bank["combo"]
    rng = random.Random(args.seed * 7919 + step)
    gen = torch.Generator().manual_seed(args.seed * 7919 + step)
    tids = build.add_time_ids(args.batch).to(device)
    models.train()
    last_save = time.time()
    t0 = time.time()
    t_start = time.time()
    while step < end:
        if args.unet_max_minutes and time.time() - t_start > args.unet_max_minutes * 60:
            log(f"unet: time budget of {args.unet_max_minutes} min reached at step {step}")
            atomic_save({"model": models.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step}, ck)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.lr, args.warmup)
        ix = torch.randint(0, lat_all.shape[0], (args.batch,), generator=gen)
        x0 = lat_all[ix].to(device)
        caps = [world.caption(world.TRAIN_COMBOS[int(c)], rng) for c in combos[ix]]
        t = sample_timesteps(args.batch, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = ac[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            emb, pooled = build.encode_prompts((tok1, tok2), (models["te1"], models["te2"]), caps)
            pred = models["unet"](xt, t, encoder_hidden_states=emb,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
        loss = F.mse_loss(pred.float(), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), models.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / 50:.2f}s/step")
            t0 = time.time()
        if step % args.eval_every == 0 or step == end:
            pipe = pipeline_from(ema, vae, (tok1, tok2), bank["scaling_factor"], device)
            for steps in (1, 2, 4):
                r = evaluate_pipe(pipe, world.heldout_prompts(args.eval_n, seed=1), steps, seed=0)
                log(f"unet step {step}: held-out @{steps} steps all {r['all']:.3f} "
                    + " ".join(f"{k} {v:.3f}" for k, v in r["per_attribute"].items()))
        if time.time() - last_save > args.ckpt_minutes * 60 or step == end:
            atomic_save({"model": models.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step}, ck)
            last_save = time.time()
    return ema, (tok1, tok2)


def pipeline_from(ema, vae, toks, scaling_factor, device):
    vae = copy.deepcopy(vae).eval()
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = build.assemble(vae, copy.deepcopy(ema["te1"]), copy.deepcopy(ema["te2"]), toks[0], toks[1],
                          copy.deepcopy(ema["unet"]))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate_pipe(pipe, prompts, steps, seed=0, batch=64):
    imgs = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        imgs += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=0.0, generator=g).images
    return checker.alignment(imgs, prompts)


# ------------------------------------------------------------------------------ stage 4

def export(pipe, out_dir: Path, steps: int, meta: dict):
    """fp16 safetensors (halves the repo size); configs say float32 so that a plain
    ``from_pretrained`` (transformers' dtype="auto") loads every component in float32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tokenizer files are shipped as vocab.json + merges.txt (what the generator derives from
    # the CLIP BPE file).  Some transformers versions save only tokenizer.json, so keep the
    # source files' bytes and write them back after save_pretrained.
    tok_files = {}
    for sub, tok in (("tokenizer", pipe.tokenizer), ("tokenizer_2", pipe.tokenizer_2)):
        src = Path(tok.name_or_path)
        tok_files[sub] = {f: (src / f).read_bytes() for f in ("vocab.json", "merges.txt", "tokenizer_config.json")}
    pipe = copy.deepcopy(pipe).to("cpu")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.to(torch.float16)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    for sub, files in tok_files.items():
        for f in (out_dir / sub).iterdir():
            f.unlink()
        for name, data in files.items():
            (out_dir / sub / name).write_bytes(data)
    for sub in ("text_encoder", "text_encoder_2"):
        f = out_dir / sub / "config.json"
        c = json.loads(f.read_text())
        c["dtype"] = "float32"
        c.pop("torch_dtype", None)
        f.write_text(json.dumps(c, indent=2) + "\n")
    (out_dir / "mixdq_defaults.json").write_text(json.dumps(
        {"num_inference_steps": steps, "guidance_scale": 0.0, "height": world.IMAGE_SIZE,
         "width": world.IMAGE_SIZE}, indent=2) + "\n")
    (out_dir / "calibration_prompts.txt").write_text("\n".join(world.train_prompts(32, seed=0)) + "\n")
    (out_dir / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"exported pipeline to {out_dir}")


@dataclass
class TrainConfig:
    """The training recipe.  The defaults are the recipe of the shipped weights: learning-rate
    schedules planned for 3000 steps, stopped at 1586 (VAE) and 822 (UNet) steps, where the
    first (GPU) run's time budget ended them; that was already past the quality bar.
    `mixdq zoo train` has one option per field (help from `metadata`)."""
    run_dir: Path = field(default=DEFAULT_RUN, metadata={"help": "checkpoints (a rerun resumes from them)"})
    out: Path = field(default=DEFAULT_OUT, metadata={"help": "pipeline folder to write at the end"})
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    vae_steps: int = field(default=3000, metadata={"help": "length of the VAE lr schedule"})
    vae_stop_step: int = field(default=1586, metadata={"help": "stop the VAE here (0: at --vae-steps)"})
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4
    vae_eval_every: int = 1000
    bank: int = 65536
    unet_steps: int = field(default=3000, metadata={"help": "length of the UNet lr schedule"})
    unet_stop_step: int = field(default=822, metadata={"help": "stop the UNet here (0: at --unet-steps)"})
    batch: int = 256
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    eval_every: int = 250
    eval_n: int = 96
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the UNet (GPU)"})
    ckpt_minutes: float = 3.0
    default_steps: int = field(default=0, metadata={
        "help": "default step count to ship; 0 = pick the best of 1/2/4 on a validation set"})
    val_n: int = field(default=192, metadata={"help": "captions for choosing the default step count"})
    no_export: bool = False
    vae_max_minutes: float = field(default=0.0, metadata={"help": "stop the VAE stage after this long (0: no limit)"})
    unet_max_minutes: float = field(default=0.0, metadata={"help": "stop the UNet stage after this long (0: no limit)"})


def train(args: TrainConfig) -> None:
    """The whole recipe, stage by stage (each resumes from --run-dir), then the export."""

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.run_dir.mkdir(parents=True, exist_ok=True)
    meta_path = args.run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"stages": {}}
    meta["args"] = {k: str(v) for k, v in asdict(args).items()}

    def timed(name, fn):
        t = time.time()
        r = fn()
        meta["stages"][name] = meta["stages"].get(name, 0.0) + time.time() - t
        meta_path.write_text(json.dumps(meta, indent=2))
        return r

    from ..quant.machine import cpu_name

    meta["hardware"] = {"device": str(device), "threads": args.threads, "cpu": cpu_name(),
                        "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    log(f"training tiny-sdxl on {device} ({args.threads} threads), run dir {args.run_dir}")
    vae = timed("vae", lambda: train_vae(args, device))
    vae.eval().requires_grad_(False)
    log(f"vae reconstruction alignment (held-out, 512): {vae_alignment(vae, device, 512)}")
    bank = timed("latents", lambda: make_latent_bank(args, vae, device))
    ema, toks = timed("unet", lambda: train_unet(args, vae, bank, device))
    pipe = pipeline_from(ema, vae.float(), toks, bank["scaling_factor"], device)
    pipe.to(torch.float32)
    # Pick the default step count on *training-split* captions (held-out stays a test set).
    scores = {}
    for steps in (1, 2, 3, 4):
        r = evaluate_pipe(pipe, world.train_prompts(args.val_n, seed=5), steps, seed=11)
        scores[steps] = r["all"]
        log(f"validation (train split) @{steps} steps: {r}")
    best = args.default_steps or max(scores, key=lambda s: (round(scores[s], 2), -s))
    meta["validation_all_by_steps"] = scores
    meta["default_steps"] = best
    meta["total_seconds"] = sum(meta["stages"].values())
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"default steps: {best}; total training time {meta['total_seconds'] / 60:.1f} min")
    if not args.no_export:
        export(pipe, args.out, best, meta)

