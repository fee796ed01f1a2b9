"""Per-layer sensitivity: what quantizing one layer alone costs, for every candidate bit-width.

For every quantizable UNet layer L and candidate bits b, with everything else float:
  * weights:      plan {L: W{b}A16}
  * activations:  plan {L: W16A{b}} (float-model activation ranges, BOS-aware K/V)
and measure
  * "sqnr" (every layer): SQNR in dB of the UNet output vs the float UNet output on the
    calibration inputs (the float pipeline's UNet inputs at every step, captured once);
  * "ssim" (content layers): SSIM of the final decoded images vs the float images, same
    prompts and seeds.
Which layers are "content" is decided by one named function, `layer_group` (override with
``group_fn=``).  The allocator then scores content layers by SSIM and quality layers by SQNR
(metric decoupling); SQNR of content layers is kept too, for the single-metric ablation.

Never twice.  Every measurement is appended (and flushed) to a JSON-lines file in a cache
folder keyed by what determines the numbers: the model's weights and configs, the calibration
prompts, seed, steps, guidance, resolution, the dtype and device type, and CODE_VERSION.  A rerun reads the folder and
only computes what is missing: an interrupted run resumes; an identical rerun computes
nothing (it does not even run the float pipeline).  The key deliberately leaves out the
candidate bits and the layer list, so asking for an extra bit-width later only computes that.

Past one machine.  Under ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``)
each rank takes a shard of the layers still to measure (balanced by estimated cost, the same
split computed on every rank) and writes its own part file; rank 0 merges all parts into
``results.json`` after a barrier.  The same command runs single-process without accelerate.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .quant.machine import cpu_name

CONTENT, QUALITY = "content", "quality"
# Bump when anything that changes the numbers changes (quantizers, metrics, evaluation).
CODE_VERSION = "mixdq-sensitivity-2"
FLOAT_BITS = 16
DEFAULT_WEIGHT_BITS = {CONTENT: (2, 4, 8), QUALITY: (4, 8)}
DEFAULT_ACT_BITS = {CONTENT: (4, 8), QUALITY: (4, 8)}
KINDS = ("weight", "act")


def layer_group(name: str) -> str:
    """The grouping rule (overridable: pass ``group_fn=`` to `sensitivity`).

    Cross-attention (``attn2.*``) and feed-forward (``ff.*``) layers decide *what* is drawn:
    "content", scored by SSIM of the final images.  Everything else: "quality", scored by
    SQNR of the UNet output."""
    parts = name.split(".")
    return CONTENT if ("attn2" in parts or "ff" in parts) else QUALITY


def metrics_for(group: str) -> tuple[str, ...]:
    """What is measured for a layer of this group (SQNR always: the ablation needs it)."""
    return ("sqnr", "ssim") if group == CONTENT else ("sqnr",)


@dataclass
class Sensitivity:
    """Scores of every analysed layer.

    scores[kind][layer][bits][metric]: kind "weight" (plan {layer: (bits, 16)}) or "act"
    ({layer: (16, bits)}); metric "sqnr" (dB, UNet output vs float, every layer) and "ssim"
    (final images vs float, content layers).  act_numel: input-activation elements per UNet
    sample, the weights of the activation average-bit target.
    """
    layers: list[str]
    group: dict[str, str]
    scores: dict[str, dict[str, dict[int, dict[str, float]]]]
    act_numel: dict[str, int]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "mixdq-sensitivity/1", "layers": self.layers, "group": self.group,
                "act_numel": self.act_numel, "meta": self.meta,
                "scores": {k: {n: {str(b): m for b, m in per.items()} for n, per in t.items()}
                           for k, t in self.scores.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Sensitivity":
        if d.get("format") != "mixdq-sensitivity/1":
            raise ValueError("not a mixdq sensitivity file (expected format 'mixdq-sensitivity/1')")
        scores = {k: {n: {int(b): {m: float(v) for m, v in ms.items()} for b, ms in per.items()}
                      for n, per in t.items()} for k, t in d["scores"].items()}
        return cls(list(d["layers"]), dict(d["group"]), scores,
                   {n: int(v) for n, v in d["act_numel"].items()}, dict(d.get("meta", {})))

    def save(self, path) -> None:
        _atomic_write(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> "Sensitivity":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sensitivity file {str(path)!r} does not exist; "
                                    "compute it with `python -m mixdq sensitivity`")
        return cls.from_dict(json.loads(path.read_text()))

    def table(self, kind: str = "weight") -> str:
        """Readable per-layer table (for the CLI)."""
        lines = []
        for n in self.layers:
            per = self.scores.get(kind, {}).get(n, {})
            cells = []
            for b in sorted(per):
                m = per[b]
                cells.append(f"{b}b: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
            lines.append(f"{self.group[n]:8s} {n:70s} " + " | ".join(cells))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Cache.
# --------------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("MIXDQ_CACHE", "~/.cache/mixdq")).expanduser() / "sensitivity"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Config entries that record where and by which library release a component was loaded, not
# what it computes: a copy of the model in another folder must keep its fingerprint, or the
# shipped sensitivity table (matched by it) is lost on every clone.  Diffusers writes
# `_name_or_path`, `_diffusers_version`, `_use_default_values`; transformers `_name_or_path`,
# `_commit_hash`, `_attn_implementation*`, `transformers_version` and `dtype` (`torch_dtype` in
# older releases: the dtype it was loaded in, float16 on a GPU, which would split one model's
# fingerprint by device).  `_class_name` says which model it is and stays.
_LOADER_KEYS = frozenset({"transformers_version", "dtype", "torch_dtype"})


def _identity_config(cfg) -> dict:
    """A component's or scheduler's config without its loader metadata (nested configs too)."""
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: _identity_config(v) if isinstance(v, Mapping) else v for k, v in cfg.items()
            if not isinstance(k, str) or k == "_class_name" or not (k.startswith("_") or k in _LOADER_KEYS)}


def model_fingerprint(pipe) -> str:
    """Hash of which model this is: every component's config (without paths and loader
    metadata) and weights (each tensor's name, shape and up to 65536 evenly strided values, so
    a fine-tune or a fused LoRA changes it while hashing SDXL stays quick), and the scheduler's
    class and config.  Not where the model was loaded from, nor in what dtype or on which
    device: the cache key adds those, since they change the measurements.

    Floating-point values are hashed rounded to float16, so the same files loaded in float32
    or float16 (a GPU's default, or a hub model's fp16 variant when that is its float32
    weights rounded), on a CPU or any device, give the same fingerprint: float32 holds float16
    values exactly and the load rounds to nearest, as the hash does.  bfloat16 keeps fewer
    mantissa bits than float16, so a bfloat16 load of float32 or float16 files is other
    (coarser) weights with another fingerprint; files stored in bfloat16 give one fingerprint
    in all three dtypes.  Weights that differ only below float16's resolution (2^-11 relative;
    6e-8 near zero, where float16 is subnormal) or outside the sampled values share one."""
    h = hashlib.sha256()
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(pipe, comp, None)
        if m is None:
            continue
        h.update(comp.encode())
        h.update(json.dumps(_identity_config(getattr(m, "config", {})), sort_keys=True, default=str).encode())
        for name, t in m.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}".encode())
            if t.is_meta:   # a model built without weights (planning) is its shapes alone
                continue
            flat = t.detach().reshape(-1)
            if flat.numel() > 65536:
                flat = flat[:: flat.numel() // 65536 + 1]
            # integer buffers (position ids) keep their dtype whatever the load: hash them exactly
            flat = flat.to("cpu", torch.float16 if flat.is_floating_point() else torch.int64)
            h.update(flat.numpy().tobytes())
    sched = getattr(pipe, "scheduler", None)
    if sched is not None:
        h.update(type(sched).__name__.encode())
        h.update(json.dumps(_identity_config(sched.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def key_of(inputs: Mapping) -> str:
    """The cache key of `cache_key`'s inputs (also of inputs edited to another dtype or device,
    to recognise a table measured there)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def cache_key(pipe, calibration) -> tuple[str, dict]:
    """(key, inputs): what determines the measurements, and its hash, the cache folder's name.
    The UNet's dtype and device type are in it: a float16 GPU measurement and a float32 CPU one
    of the same model (one fingerprint) are different numbers and stay in different folders."""
    settings = calibration.settings(pipe)
    inputs = {"code_version": CODE_VERSION, "model": model_fingerprint(pipe),
              "prompts": list(calibration.prompts), "seed": calibration.seed,
              "settings": {k: settings[k] for k in sorted(settings)},
              "dtype": str(pipe.unet.dtype), "device_type": pipe.unet.device.type}
    return key_of(inputs), inputs


def _read_results(folder: Path) -> dict[tuple[str, str, int], dict[str, float]]:
    """Every measurement in the folder: merged file first, then all part files (any rank,
    any world size).  A line cut short by an interrupted run is skipped."""
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    merged = folder / "results.json"
    if merged.is_file():
        for r in json.loads(merged.read_text()):
            out.setdefault((r["layer"], r["kind"], int(r["bits"])), {}).update(r["metrics"])
    for part in sorted(folder.glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault((r["layer"], r["kind"], int(r["bits"])), {}).update(r["metrics"])
    return out


def _merge_parts(folder: Path) -> None:
    """Fold all part files into results.json (atomic), then drop the parts."""
    results = _read_results(folder)
    rows = [{"layer": l, "kind": k, "bits": b, "metrics": m} for (l, k, b), m in sorted(results.items())]
    _atomic_write(folder / "results.json", json.dumps(rows))
    for part in folder.glob("part-*.jsonl"):
        part.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The float reference: images, UNet inputs/outputs at every call, activation sizes.
# --------------------------------------------------------------------------------------------
def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


def record_act_numel(layers: Mapping[str, torch.nn.Module], into: dict[str, int]) -> list:
    """Hooks that record into `into` each layer's input-activation elements per UNet sample
    (its first input's numel over the batch, the largest over all calls): the weights of the
    allocator's average activation bit-width.  Returns the hook handles, to remove."""
    def hook_for(name):
        def hook(_m, args):
            x = args[0]
            into[name] = max(into.get(name, 0), x.numel() // max(1, x.shape[0]))
        return hook

    return [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]


class _Reference:
    """Runs the float pipeline once and keeps what every evaluation compares against."""

    def __init__(self, pipe, calibration, layer_names: Sequence[str], progress: bool):
        from .calibrate import run_pipeline

        unet = pipe.unet
        self.calls: list[tuple[tuple, dict]] = []    # UNet inputs, in call order
        self.outputs: list[torch.Tensor] = []         # float UNet outputs
        self.first_call: list[bool] = []              # step 0 of its batch: same input in any run
        self.act_numel: dict[str, int] = {}
        modules = dict(unet.named_modules())
        state = {"batch_calls": 0}

        def pre(_m, args, kwargs):
            self.calls.append((_clone(args), _clone(kwargs)))
            self.first_call.append(state["batch_calls"] == 0)
            state["batch_calls"] += 1

        def post(_m, _args, _kwargs, out):
            self.outputs.append(_first(out).detach().clone())

        handles = [unet.register_forward_pre_hook(pre, with_kwargs=True),
                   unet.register_forward_hook(post, with_kwargs=True)]
        handles += record_act_numel({n: modules[n] for n in layer_names}, self.act_numel)

        def new_batch(_done, _total):
            state["batch_calls"] = 0

        try:
            outs = run_pipeline(pipe, calibration, output_type="pt", progress=progress,
                                desc="float reference", callback=new_batch)
        finally:
            for h in handles:
                h.remove()
        self.images = torch.cat([o.images for o in outs]).float()
        self.calibration = calibration


@torch.inference_mode()
def _evaluate(pipe, ref: _Reference, metrics: Sequence[str]) -> dict[str, float]:
    """Metrics of the pipeline as it is now (one layer swapped) against the float reference."""
    from .calibrate import run_pipeline
    from .metrics import sqnr, ssim

    unet = pipe.unet
    outputs: list[torch.Tensor | None] = [None] * len(ref.calls)
    if "ssim" in metrics:
        # Full pipeline: images for SSIM.  The first UNet call of each batch sees exactly the
        # float inputs (same latents, float text encoders), so its output is reused for SQNR.
        seen = []
        h = unet.register_forward_hook(lambda _m, _a, out: seen.append(_first(out).detach().clone()))
        try:
            outs = run_pipeline(pipe, ref.calibration, output_type="pt", progress=False)
        finally:
            h.remove()
        images = torch.cat([o.images for o in outs]).float()
        for i, out in enumerate(seen):
            if i < len(outputs) and ref.first_call[i]:
                outputs[i] = out
    for i, (args, kwargs) in enumerate(ref.calls):
        if outputs[i] is None:  # later steps: replay the float inputs (SQNR is on calibration inputs)
            outputs[i] = _first(unet(*args, **kwargs)).detach()
    # pooled over every call: sum of signal over sum of noise (the paper's definition)
    result = {"sqnr": float(sqnr(torch.cat([o.flatten() for o in ref.outputs]),
                                 torch.cat([o.flatten() for o in outputs])))}
    if "ssim" in metrics:
        result["ssim"] = float(ssim(images.clamp(0, 1), ref.images.clamp(0, 1)))
    return result


# --------------------------------------------------------------------------------------------
# The analysis.
# --------------------------------------------------------------------------------------------
def _candidates(spec, default) -> dict[str, tuple[int, ...]]:
    if spec is None:
        return {g: tuple(v) for g, v in default.items()}
    if not isinstance(spec, Mapping):
        spec = {CONTENT: spec, QUALITY: spec}
    return {g: tuple(sorted(int(b) for b in spec.get(g, ()) if int(b) != FLOAT_BITS)) for g in (CONTENT, QUALITY)}


def _jobs(layers, groups, wbits, abits):
    for n in layers:
        for b in wbits[groups[n]]:
            yield (n, "weight", b)
        for b in abits[groups[n]]:
            yield (n, "act", b)


def _vae_channels_last(pipe):
    """On CPU, run the VAE decoder channels-last for the analysis (1.4x faster decode measured
    on the embedded model; float reference and evaluations share it), and return the undo."""
    vae = getattr(pipe, "vae", None)
    if vae is None or pipe.unet.device.type != "cpu":
        return lambda: None
    vae.to(memory_format=torch.channels_last)
    return lambda: vae.to(memory_format=torch.contiguous_format)


def _memo_encode_prompt(pipe):
    """Text encoders stay float during the analysis, so the prompt embeddings of a batch are
    the same in every evaluation: encode each batch once (~10% of a content evaluation on
    the embedded model).  Only plain (tensor-free) arguments are memoised.  Returns the undo."""
    orig = getattr(pipe, "encode_prompt", None)
    if orig is None:
        return lambda: None
    memo = {}

    def encode_prompt(*args, **kwargs):
        if any(isinstance(v, torch.Tensor) for v in list(args) + list(kwargs.values())):
            return orig(*args, **kwargs)
        key = repr((args, sorted(kwargs.items())))
        if key not in memo:
            memo[key] = orig(*args, **kwargs)
        return memo[key]

    pipe.encode_prompt = encode_prompt

    def undo():
        if pipe.__dict__.get("encode_prompt") is encode_prompt:
            del pipe.encode_prompt

    return undo


# Relative cost of one evaluation: a content layer runs the whole pipeline (text encoders,
# UNet, VAE decode, SSIM), a quality layer only the UNet (measured ~4x on the embedded model).
EVAL_COST = {CONTENT: 4.0, QUALITY: 1.0}


def _shard(jobs, groups, world: int) -> list[set[str]]:
    """Split the layers with pending work over `world` ranks, balancing estimated cost (largest
    first, each to the least-loaded rank).  Deterministic, so every rank computes the same split
    without talking; a layer's evaluations stay on one rank."""
    cost: dict[str, float] = {}
    for n, _, _ in jobs:
        cost[n] = cost.get(n, 0.0) + EVAL_COST[groups[n]]
    shards = [set() for _ in range(world)]
    load = [0.0] * world
    for n in sorted(cost, key=lambda n: (-cost[n], n)):
        r = min(range(world), key=lambda r: (load[r], r))
        shards[r].add(n)
        load[r] += cost[n]
    return shards


def _dist_state():
    """(rank, world, barrier): from accelerate when launched with several processes
    (`accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`; both
    set WORLD_SIZE), else a single process.  Without CUDA the ranks talk over gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        st = PartialState(cpu=not torch.cuda.is_available())
        return st.process_index, st.num_processes, st.wait_for_everyone
    return 0, 1, (lambda: None)


def _select_layers(unet, layers, group_fn) -> tuple[list[str], list[str], dict[str, str]]:
    """(every quantizable layer, the ones to score, their groups)."""
    from .errors import PlanError
    from .quant import quantizable_layers

    all_layers = list(quantizable_layers(unet))
    if layers is None:
        names = all_layers
    else:
        pats = list(layers)
        names = [n for n in all_layers if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not names:
            raise PlanError(f"no quantizable layer matches {pats}; list them with "
                            "`mixdq.quantizable_layers(pipe.unet)`")
    groups = {}
    for n in names:
        g = group_fn(n)
        if g not in (CONTENT, QUALITY):
            raise ValueError(f"group_fn returned {g!r} for {n!r}; expected 'content' or 'quality'")
        groups[n] = g
    return all_layers, names, groups


def _append_line(part: Path):
    """The part file opened for appending, after any line a kill cut short."""
    fh = part.open("a+")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:
        fh.seek(fh.tell() - 1)
        if fh.read(1) != "\n":
            fh.write("\n")  # a line cut by a kill must not swallow the next record
    return fh


def _measure(pipe, calibration, todo, all_layers, groups, folder: Path, info_path: Path, rank: int, world: int,
             batch_size: int | None, progress: bool) -> int:
    """Run the float reference and every job in `todo`, appending each result to this rank's
    part file as it comes (a killed run resumes from there).  Returns how many it measured."""
    from tqdm.auto import tqdm

    from .calibrate import bos_embedding, float_ranges
    from .plan import Plan
    from .quant import replace_layers, restore_layers

    unet = pipe.unet
    computed = 0
    undo = [_vae_channels_last(pipe), _memo_encode_prompt(pipe)]
    try:
        if world > 1 and unet.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        if batch_size is None:
            batch_size = calibration.batch_size if unet.device.type == "cuda" else min(32, len(calibration.prompts))
        eval_cal = dataclasses.replace(calibration, batch_size=max(1, int(batch_size)))
        ref = _Reference(pipe, eval_cal, all_layers, progress=progress and rank == 0)
        if rank == 0:
            _atomic_write(info_path, json.dumps({"act_numel": ref.act_numel, "images": list(ref.images.shape)}))
        ranges = bos = None
        if any(k == "act" for _, k, _ in todo):
            ranges = float_ranges(pipe, eval_cal, progress=progress and rank == 0)
        if any(n.endswith(("attn2.to_k", "attn2.to_v")) for n, _, _ in todo):
            bos = bos_embedding(pipe)
        bar = tqdm(total=len(todo), desc=f"sensitivity [{rank + 1}/{world}]" if world > 1 else "sensitivity",
                   unit="eval", disable=not progress, position=rank, dynamic_ncols=True)
        with _append_line(folder / f"part-{rank}-{os.getpid()}.jsonl") as fh:
            for n, kind, b in todo:
                bits = (b, FLOAT_BITS) if kind == "weight" else (FLOAT_BITS, b)
                originals = replace_layers(unet, Plan({n: bits}), ranges=ranges, bos_embedding=bos)
                try:
                    res = _evaluate(pipe, ref, metrics_for(groups[n]))
                finally:
                    restore_layers(unet, originals)
                fh.write(json.dumps({"layer": n, "kind": kind, "bits": b, "metrics": res}) + "\n")
                fh.flush()  # written as it goes: a killed run resumes from here
                computed += 1
                bar.set_postfix_str(f"{'.'.join(n.split('.')[-2:])} {kind}{b}", refresh=False)
                bar.update(1)
        bar.close()
    finally:
        for u in undo:
            u()
    return computed


def sensitivity(pipe, calibration=None, *, weight_bits=None, act_bits=None,
                layers: Iterable[str] | None = None, group_fn: Callable[[str], str] = layer_group,
                cache_dir: str | os.PathLike | None = None, recompute: bool = False,
                progress: bool = True, distributed: bool = True,
                batch_size: int | None = None) -> Sensitivity:
    """Score every layer at every candidate bit-width (see module doc).  Returns a Sensitivity.

    calibration: mixdq.Calibration (default: the model's shipped prompts, 32).
    weight_bits / act_bits: candidates, a list for both groups or {group: list}; 16 (float)
        needs no measurement.  Defaults: weights content {2,4,8}, quality {4,8}; acts {4,8}.
    layers: restrict to these names (fnmatch patterns allowed); default every quantizable layer.
    cache_dir: the cache root (default $MIXDQ_CACHE or ~/.cache/mixdq, + /sensitivity/<key>).
    batch_size: prompts per forward in the evaluations.  Default: the calibration's on CUDA;
        on CPU all prompts at once (up to 32), because per-layer Python overhead dominates small
        models there (1.75x faster than batches of 8 on the tiny test model).  Batching does not
        change which noise a prompt gets (seed + i per prompt), so it is not part of the key.
    """
    from .calibrate import Calibration
    from .errors import PlanError
    from .quant import quantized_layers

    t_start = time.perf_counter()
    if quantized_layers(pipe.unet):
        raise PlanError("sensitivity needs the float model, but this UNet is already quantized; "
                        "load it again with mixdq.load_pipeline")
    calibration = calibration or Calibration.default(pipe)
    all_layers, names, groups = _select_layers(pipe.unet, layers, group_fn)
    wbits = _candidates(weight_bits, DEFAULT_WEIGHT_BITS)
    abits = _candidates(act_bits, DEFAULT_ACT_BITS)

    key, inputs = cache_key(pipe, calibration)
    folder = Path(cache_dir).expanduser() / "sensitivity" / key if cache_dir else cache_root() / key
    rank, world, barrier = _dist_state() if distributed else (0, 1, lambda: None)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if recompute:
            for f in list(folder.glob("part-*.jsonl")) + [folder / "results.json"]:
                f.unlink(missing_ok=True)
        _atomic_write(folder / "inputs.json", json.dumps(inputs, indent=1))
    barrier()

    def needed(done):
        return [j for j in _jobs(names, groups, wbits, abits)
                if not all(m in done.get(j, {}) for m in metrics_for(groups[j[0]]))]

    todo_all = needed(_read_results(folder))
    info_path = folder / "model.json"
    computed = 0
    my_layers = _shard(todo_all, groups, world)[rank]
    todo = [j for j in todo_all if j[0] in my_layers]
    if todo or (rank == 0 and not info_path.is_file()):
        computed = _measure(pipe, calibration, todo, all_layers, groups, folder, info_path, rank, world,
                            batch_size, progress)
    barrier()
    if rank == 0 and any(folder.glob("part-*.jsonl")):
        _merge_parts(folder)
    if rank == 0 and todo_all:
        # what the last computing run cost, for reports (docs/evidence.md)
        _atomic_write(folder / "timing.json", json.dumps({
            "wall_s": round(time.perf_counter() - t_start, 2), "world_size": world,
            "computed": len(todo_all), "device": str(pipe.unet.device), "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))
    barrier()

    done = _read_results(folder)
    missing = needed(done)
    if missing:  # pragma: no cover - only if a rank died
        raise RuntimeError(f"{len(missing)} measurements missing after the run (first: {missing[0]}); rerun to resume")
    act_numel = json.loads(info_path.read_text())["act_numel"]
    scores = {k: {n: {} for n in names} for k in KINDS}
    for (n, kind, b), m in done.items():
        if n in groups and b in (wbits if kind == "weight" else abits)[groups[n]]:
            scores[kind][n][b] = {k: v for k, v in m.items() if k in metrics_for(groups[n])}
    meta = {"cache": str(folder), "key": key, "model": inputs["model"][:16],
            "prompts": len(calibration.prompts), "seed": calibration.seed, "settings": inputs["settings"],
            "dtype": inputs["dtype"], "device_type": inputs["device_type"],
            "weight_bits": {g: list(v) for g, v in wbits.items()},
            "act_bits": {g: list(v) for g, v in abits.items()},
            "computed": len(todo_all), "computed_here": computed,
            "world_size": world, "wall_s": round(time.perf_counter() - t_start, 2),
            "group_fn": getattr(group_fn, "__qualname__", str(group_fn))}
    return Sensitivity(list(names), groups, scores, {n: int(act_numel[n]) for n in names}, meta)


# --------------------------------------------------------------------------------------------
# What the analysis would cost here, before starting it.
# --------------------------------------------------------------------------------------------
# A UNet this large (SDXL: 2.6 G parameters) is a GPU job for the analysis: thousands of image
# generations, each a full float UNet pass on the calibration prompts.
GPU_JOB_PARAMS = 1_500_000_000


@dataclass
class AnalysisEstimate:
    """How long `sensitivity` would take on this pipeline's device: `evaluations` to run,
    `seconds_per_evaluation` timed here on one prompt and scaled to the calibration's prompts
    (None when not timed), `seconds` in all, and `gpu_job` for an SDXL-size UNet on a CPU
    (not timed: one evaluation alone would take minutes).  `message` says it in one line."""
    evaluations: int
    prompts: int
    device: str
    gpu_job: bool
    seconds_per_evaluation: float | None = None
    seconds: float | None = None

    @property
    def message(self) -> str:
        what = f"{self.evaluations} evaluations (one layer at one bit-width each, {self.prompts} prompts)"
        if self.gpu_job:
            return (f"the sensitivity analysis of this SDXL-size model is a GPU job: {what}, each a full "
                    f"generation of the calibration images, which on this CPU ({cpu_name()}) would take days")
        return (f"the sensitivity analysis would take about {_duration(self.seconds)} here ({what}; one "
                f"evaluation timed at {self.seconds_per_evaluation:.2f} s on {self.device})")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _time_one(pipe, calibration, layers: Mapping[str, str]) -> tuple[float, dict[str, float]]:
    """Seconds of the float reference, and of one evaluation per group of its layer in
    `layers` ({group: layer}, at the group's lowest weight bits): a content layer is scored
    on generated images, a quality layer on UNet outputs only, so their costs differ."""
    from .plan import Plan
    from .quant import replace_layers, restore_layers

    t0 = time.perf_counter()
    ref = _Reference(pipe, calibration, list(layers.values()), progress=False)
    t_ref, t_eval = time.perf_counter() - t0, {}
    for group, layer in layers.items():
        originals = replace_layers(pipe.unet, Plan({layer: (min(DEFAULT_WEIGHT_BITS[group]), FLOAT_BITS)}))
        try:
            t0 = time.perf_counter()
            _evaluate(pipe, ref, metrics_for(group))
            t_eval[group] = time.perf_counter() - t0
        finally:
            restore_layers(pipe.unet, originals)
    return t_ref, t_eval


@torch.inference_mode()
def estimate_analysis(pipe, calibration=None, evaluations: int | None = None) -> AnalysisEstimate:
    """Time one layer's measurement per group on this pipeline's device (the float reference,
    then a content and a quality layer quantized and scored) and scale it to the whole
    analysis: `evaluations` measurements (default: every layer at the default candidate bits,
    in the groups' shares of those jobs) on the calibration's prompts, plus the float reference
    and the activation ranges.  Timed on one prompt; where that is quick, again on one batch as
    the analysis runs it (small models are dominated by per-call overhead, so one prompt would
    overstate them).  On a CPU an SDXL-size UNet is not timed: it is reported as a GPU job."""
    from .calibrate import Calibration
    from .quant import quantizable_layers

    calibration = calibration or Calibration.default(pipe)
    unet = pipe.unet
    names = list(quantizable_layers(unet))
    groups = {n: layer_group(n) for n in names}
    jobs = list(_jobs(names, groups, _candidates(None, DEFAULT_WEIGHT_BITS), _candidates(None, DEFAULT_ACT_BITS)))
    evaluations = len(jobs) if evaluations is None else evaluations
    n = len(calibration.prompts)
    device = str(unet.device)
    if unet.device.type == "cpu" and sum(p.numel() for p in unet.parameters()) > GPU_JOB_PARAMS:
        return AnalysisEstimate(evaluations, n, device, gpu_job=True)
    share = {g: sum(1 for job in jobs if groups[job[0]] == g) / len(jobs) for g in (CONTENT, QUALITY)}
    layers = {g: next(x for x in names if groups[x] == g) for g in share if share[g]}
    batch = calibration.batch_size if unet.device.type == "cuda" else min(32, n)   # as sensitivity() runs
    undo = [_vae_channels_last(pipe), _memo_encode_prompt(pipe)]
    try:
        one = dataclasses.replace(calibration, prompts=calibration.prompts[:1], batch_size=1)
        t_ref, t_eval = _time_one(pipe, one, layers)
        if batch > 1 and max(t_eval.values()) * batch < 10:
            t_ref, t_eval = _time_one(pipe, dataclasses.replace(calibration, prompts=calibration.prompts[:batch],
                                                                batch_size=batch), layers)
            t_ref, t_eval = t_ref / batch, {g: t / batch for g, t in t_eval.items()}
    finally:
        for u in undo:
            u()
    per_eval = sum(share[g] * t for g, t in t_eval.items()) * n
    # the float reference and the activation ranges each cost about one float pass
    return AnalysisEstimate(evaluations, n, device, False, per_eval, per_eval * evaluations + 2 * t_ref * n)
