"""Regenerate the shipped presets (and the evidence table) for the embedded model.

    mixdq presets                                # presets/*.json + *.stats.json + sensitivity
    mixdq presets --evidence docs/evidence.md    # also the ablation table

What it does, end to end through the library (nothing here is special-cased):
  1. sensitivity of every layer (cached: a rerun costs seconds);
  2. budgets = the UNet sizes of uniform W8A8 / W5A8 / W4A8 / W3A8 plans (clamped to the
     feasible range), so each preset is "the memory of W{b}A8, spent where it matters";
  3. per budget, the ILP for every content/quality ratio in the sweep (the Pareto family);
  4. each candidate is really quantized (sequential calibration) and measured against the
     float model on held-out prompts: SSIM, PSNR and prompt-alignment accuracy;
  5. the best measured candidate is written as presets/mixdq-w{b}a8-size.json with its
     numbers in mixdq-w{b}a8-size.stats.json; presets/sensitivity.json lets the app solve
     any other budget instantly.

The evidence table compares, at equal memory and on the same prompts and seeds, MixDQ with
uniform W8A8 / W4A8 / W4A16, with a single-metric plan (no decoupling) and with the same plan
without BOS-aware K/V quantization.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .allocation import (DEFAULT_RATIOS, TOTAL, Allocator, PlanEvaluator, default_eval_prompts,
                       select, selection_score)
from .calibrate import Calibration
from .errors import MixDQError
from .plan import Plan
from .published import MIXDQ_SDXL_TURBO
from .quant.machine import cpu_name
from .resources import shipped

PRESETS_DIR = shipped("presets")
PRESET_BITS = (8, 5, 4, 3)
EVAL_SEED = 1000
SELECT_SEED = 5000


def _setup(model, eval_prompts: int, progress: bool):
    from . import layer_costs, load_pipeline
    from .quant import quantizable_layers
    from .sensitivity_analysis import sensitivity

    pipe = load_pipeline(model)
    cal = Calibration.default(pipe)
    t0 = time.perf_counter()
    sens = sensitivity(pipe, cal, progress=progress)
    sens_s = time.perf_counter() - t0
    costs = layer_costs(pipe.unet)
    names = list(quantizable_layers(pipe.unet))
    # Plans are chosen on one prompt set and reported on another (disjoint prompts and seeds).
    sel = PlanEvaluator(pipe, cal, default_eval_prompts(pipe, eval_prompts, "select"), seed=SELECT_SEED)
    ev = PlanEvaluator(pipe, cal, default_eval_prompts(pipe, eval_prompts, "report"), seed=EVAL_SEED)
    ev.selector = sel
    return pipe, cal, sens, sens_s, costs, names, ev


def _uniform_size(costs, names, w: int, a: int = 8) -> float:
    return costs.total_mb(Plan.uniform(names, w, a))


def nominal_size(costs, names, bits: float, act: int = 8) -> float:
    """UNet MB of a uniform W{bits}A8 model with its weights packed at exactly `bits` bits.

    The core library stores 3-bit weights in 4-bit containers and 5/6/7-bit in int8, so a real
    uniform W5A8 is as large as W8A8; "the memory of ~W5A8" is the exactly-packed size, which
    is linear in bits between the container widths 2, 4 and 8 (same scales and float parts)."""
    if bits in (2, 4, 8, 16):
        return _uniform_size(costs, names, int(bits), act)
    lo, hi = (2, 4) if bits < 4 else (4, 8)
    s_lo, s_hi = _uniform_size(costs, names, lo, act), _uniform_size(costs, names, hi, act)
    return s_lo + (s_hi - s_lo) * (bits - lo) / (hi - lo)


def _budget_for(alloc: Allocator, size_mb: float) -> tuple[float, bool]:
    lo, hi = alloc.feasible_range_mb()
    if size_mb < lo:
        return lo, True
    return min(size_mb, hi), False


def make_presets(model=None, out: Path = PRESETS_DIR, eval_prompts: int = 16, ratios=DEFAULT_RATIOS,
                 bits=PRESET_BITS, progress: bool = True, state=None) -> list[dict]:
    """Write the presets; returns their stats.  `state` reuses a _setup() result."""
    pipe, cal, sens, sens_s, costs, names, ev = state or _setup(model, eval_prompts, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # shipped for the app (solve any budget without the analysis); no machine-local paths in it
    import dataclasses

    dataclasses.replace(sens, meta={k: v for k, v in sens.meta.items() if k != "cache"}).save(
        out / "sensitivity.json")
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    written = []
    for b in bits:
        target = nominal_size(costs, names, b)
        budget, clamped = _budget_for(alloc, target)
        t0 = time.perf_counter()
        fam = alloc.family([budget], ratios)
        solve_s = time.perf_counter() - t0
        best = select(fam, getattr(ev, "selector", ev), progress=progress)
        reported = ev(best.plan)
        name = f"mixdq-w{b}a8-size"
        plan = Plan(dict(best.plan.items()), meta={**best.plan.meta, "preset": name})
        plan.save(out / f"{name}.json")
        stats = {
            "preset": name, "model": sens.meta.get("model"),
            "budget_mb": round(budget, 6), "nominal_w%da8_mb" % b: round(target, 6),
            "budget_clamped_to_min": clamped, "feasible_mb": [round(lo, 6), round(hi, 6)],
            "float_mb": round(costs.float_mb(), 6),
            "size_mb": round(best.size_mb, 6), "measured_size_mb": round(reported["size_mb"], 6),
            "ssim": reported["ssim"], "psnr": reported["psnr"],
            "alignment": reported.get("alignment"), "float_alignment": ev.float_metrics.get("alignment"),
            "ratio": best.ratio, "summary": plan.summary(),
            "eval": {"prompts": len(ev.eval.prompts), "seed": EVAL_SEED, "settings": ev.eval.settings(pipe)},
            "selection": {"prompts": len(getattr(ev, "selector", ev).eval.prompts), "seed": SELECT_SEED,
                          "rule": "max mean SSIM + alignment on the selection prompts (disjoint from eval)"},
            "candidates": [{"ratio": a.ratio, "size_mb": round(a.size_mb, 6), "predicted_loss": a.predicted[TOTAL],
                            "selection_measured": a.measured, "score": selection_score(a.measured)} for a in fam],
            "ilp_solve_s": round(solve_s, 3),
        }
        (out / f"{name}.stats.json").write_text(json.dumps(stats, indent=1))
        written.append(stats)
        if progress:
            print(f"{name}: {best.size_mb:.4f} MB (budget {budget:.4f}), SSIM {stats['ssim']:.4f}, "
                  f"PSNR {stats['psnr']:.2f} dB, alignment {stats['alignment']}", file=sys.stderr)
    return written


def _sensitivity_timing(sens, sens_s: float) -> str:
    n = sum(len(per) for table in sens.scores.values() for per in table.values())
    timing = Path(sens.meta.get("cache", "")) / "timing.json"
    if sens.meta.get("computed"):
        return (f"{n} measurements ({len(sens.layers)} layers x candidate bits, weights and activations), "
                f"{sens.meta['computed']} computed in this run in {sens_s:.0f} s on "
                f"{sens.meta.get('world_size', 1)} process(es)")
    if timing.is_file():
        t = json.loads(timing.read_text())
        return (f"{n} measurements ({len(sens.layers)} layers x candidate bits, weights and activations), "
                f"computed in {t['wall_s']:.0f} s wall on {t['world_size']} process(es) "
                f"(CPU: {t.get('cpu', '?')}), read from the cache here in {sens_s:.1f} s")
    return f"{n} measurements, read from the cache in {sens_s:.1f} s"


def presets_table(stats: list[dict]) -> list[str]:
    """Markdown rows for the shipped presets (from their stats)."""
    lines = ["| preset | budget MB | measured MB | SSIM | PSNR (dB) | alignment (float) | ratio | ILP s | plan |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in stats:
        al = s.get("alignment")
        fl = s.get("float_alignment")
        al_s = "n/a" if al is None else f"{al:.3f} ({fl:.3f})"
        lines.append(f"| {s['preset']} | {s['budget_mb']:.4f} | {s['measured_size_mb']:.4f} | {s['ssim']:.4f} | "
                     f"{s['psnr']:.2f} | {al_s} | {'joint' if s['ratio'] is None else s['ratio']} | "
                     f"{s['ilp_solve_s']:.2f} | {s['summary']} |")
    return lines


def make_evidence(model=None, path: Path | None = None, eval_prompts: int = 16, progress: bool = True,
                  state=None, ratios=DEFAULT_RATIOS, presets_stats: list[dict] | None = None) -> str:
    """The ablation table, as markdown (written to `path` when given)."""
    pipe, cal, sens, sens_s, costs, names, ev = state or _setup(model, eval_prompts, progress)
    alloc = Allocator(sens, costs)
    single = Allocator(sens, costs, decoupled=False)
    lines = []
    rows_all = {}
    t_eval = time.perf_counter()
    for base_w, base_a in ((8, 8), (4, 8), (4, 16), (3, 8)):
        uni = Plan.uniform(names, base_w, base_a)
        # W3 has no storable uniform baseline at its exact size (3-bit weights live in 4-bit
        # containers): compare the plans at the exactly-packed W3A8 memory instead.
        size = nominal_size(costs, names, base_w, base_a) if base_w == 3 else costs.total_mb(uni)
        budget, clamped = _budget_for(alloc, size)
        rows = [("float", {"size_mb": costs.float_mb(), "ssim": 1.0, "psnr": float("inf"),
                           **ev.float_metrics})]
        if base_w != 3:
            rows.append((f"uniform W{base_w}A{base_a}", ev(uni)))
        act = dict(act_avg_bits=None, act_candidates={"content": (16,), "quality": (16,)}) if base_a == 16 else {}
        mix = Allocator(sens, costs, **act) if act else alloc
        fam = mix.family([budget], ratios)
        best = select(fam, getattr(ev, "selector", ev))
        rows.append(("MixDQ (decoupled metrics, BOS-aware, ratio selected)", ev(best.plan)))
        joint = mix.solve(budget, None)
        rows.append(("MixDQ, joint budget (no ratio sweep, no selection)", ev(joint.plan)))
        one = (Allocator(sens, costs, decoupled=False, **act) if act else single).solve(budget, None)
        rows.append(("single metric (SQNR for all layers, no decoupling)", ev(one.plan)))
        rows.append(("MixDQ plan without BOS-aware K/V", ev(best.plan, bos_aware=False)))
        rows_all[f"W{base_w}A{base_a}"] = [(n, m) for n, m in rows]
        what = "exactly-packed W3A8" if base_w == 3 else f"uniform W{base_w}A{base_a}"
        lines.append(f"\n### At the memory of {what}: {size:.4f} MB"
                     + (f" (clamped to the smallest feasible plan, {budget:.4f} MB)" if clamped else "") + "\n")
        lines.append("| method | UNet MB | SSIM to float | PSNR to float (dB) | prompt alignment |")
        lines.append("|---|---:|---:|---:|---:|")
        for n, m in rows:
            al = m.get("alignment")
            lines.append(f"| {n} | {m['size_mb']:.4f} | {m['ssim']:.4f} | {m['psnr']:.2f} | "
                         + (f"{al:.3f}" if al is not None else "n/a") + " |")
    t_eval = time.perf_counter() - t_eval
    settings = ev.eval.settings(pipe)
    from .defaults import is_embedded

    embedded = is_embedded(pipe)
    model_desc = "the embedded tiny-sdxl" if embedded else f"`{model}`"
    prompt_desc = "held-out prompts of the model's world" if embedded else "prompts"
    head = [
        "# Evidence: MixDQ's ablation, reproduced" + (" on the embedded model" if embedded else ""),
        "",
        f"Model: {model_desc} (fingerprint `{sens.meta.get('model')}`), {len(names)} quantizable UNet layers, "
        f"float UNet {costs.float_mb():.4f} MB. Images: {settings['height']}x{settings['width']}, "
        f"{settings['num_inference_steps']} step(s), guidance {settings['guidance_scale']}.",
        f"Evaluation: {len(ev.eval.prompts)} {prompt_desc}, seed of prompt i = "
        f"{EVAL_SEED} + i, the same for every row. SSIM (gaussian 11x11, sigma 1.5) and PSNR against "
        "the float model's images, averaged over the prompts"
        + ("; prompt alignment = fraction of images whose every attribute (shape, colour, size, "
           "position, background) the pixel checker (`mixdq.zoo.check`) confirms." if ev.checker else "."),
        f"Calibration: the {len(cal.prompts)} shipped calibration prompts. Sensitivity: "
        f"{_sensitivity_timing(sens, sens_s)}.",
        "Every quantized row is really quantized (packed weights, sequential activation calibration); "
        "`UNet MB` is measured from the tensors the quantized UNet holds.",
        "MixDQ rows: the ILP at the uniform plan's size, content/quality ratio swept over "
        f"{', '.join('joint' if r is None else str(r) for r in ratios)}, "
        "the best candidate by SSIM + alignment on a *separate* selection set "
        f"({len(getattr(ev, 'selector', ev).eval.prompts)} other prompts, seeds from {SELECT_SEED}) "
        "is then measured on the evaluation prompts; activations average 8 bits "
        "(float at the W4A16 size, as the baseline). Joint: the same ILP with one shared budget and no "
        "selection. Single metric: the joint ILP with every layer scored by SQNR in one group (no "
        "decoupling). Without BOS: the selected MixDQ plan, BOS-aware K/V off.",
        f"Machine: {cpu_name()}, torch threads {__import__('torch').get_num_threads()}; evaluation wall time "
        f"{t_eval:.0f} s.",
        "",
        "Reproduce: `python -m mixdq presets --evidence docs/evidence.md` (also regenerates presets/).",
    ]
    if presets_stats:
        lines += ["", "### Shipped presets (`presets/`, regenerated by the same command)", "",
                  "Budget = the memory of W{b}A8 with weights packed at exactly b bits (for 8 and 4 "
                  "bits, the uniform plan's real size; smaller budgets are clamped to the smallest "
                  "feasible plan); the float UNet is "
                  f"{costs.float_mb():.4f} MB. ILP s = solving the whole ratio sweep at that budget "
                  "(weights; the activation program is solved once).", ""]
        lines += presets_table(presets_stats)
    text = "\n".join(head + lines) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


# Presets of a published model, from its architecture and a published table: no weights,
# no images, so each preset is the plan of least predicted loss at its budget.
PUBLISHED_PRESETS = {MIXDQ_SDXL_TURBO.model: "sdxl-turbo"}


def make_published_presets(model: str = MIXDQ_SDXL_TURBO.model, out: Path | None = None,
                           bits=PRESET_BITS, sens=None) -> list[dict]:
    """Presets for a published model at the sizes of uniform W{b}A8, from the published
    architecture on the meta device (exact layer costs) and the table shipped beside them
    (`out`/sensitivity.json, or `sens`); writes NAME.json + NAME.stats.json into `out`."""
    import torch

    from .architectures import meta_unet
    from .memory import layer_costs
    from .published import activation_options
    from .quant import quantizable_layers
    from .sensitivity_analysis import Sensitivity

    if model not in PUBLISHED_PRESETS:
        raise MixDQError(f"no published presets for {model!r}; published: {sorted(PUBLISHED_PRESETS)}")
    out = Path(out or PRESETS_DIR / PUBLISHED_PRESETS[model])
    sens = sens or Sensitivity.load(out / "sensitivity.json")
    unet = meta_unet(model, torch.float32)   # sizes as loaded for a CPU; stats say so
    costs, names = layer_costs(unet), list(quantizable_layers(unet))
    options = activation_options(sens)
    act_avg = options["act_avg_bits"]
    alloc = Allocator(sens, costs, **options)
    theirs = set(sens.meta.get("origin", {}).get("float16_activations") or ())
    ours = sorted(n for n, a in alloc.act_bits.items() if a == 16)
    total_act = sum(sens.act_numel.values())
    lo, hi = alloc.feasible_range_mb()
    written = []
    for b in bits:
        target = nominal_size(costs, names, b)
        budget, clamped = _budget_for(alloc, target)
        best = alloc.solve(budget)
        name = f"mixdq-w{b}a8-size"
        plan = Plan(dict(best.plan.items()), meta={**best.plan.meta, "preset": name, "model": model})
        plan.save(out / f"{name}.json")
        stats = {
            "preset": name, "model": model, "budget_mb": round(budget, 6), "nominal_w%da8_mb" % b: round(target, 6),
            "budget_clamped_to_min": clamped, "feasible_mb": [round(lo, 6), round(hi, 6)],
            "float_mb": round(costs.float_mb(), 6), "size_mb": round(best.size_mb, 6),
            "predicted_loss": best.predicted, "summary": plan.summary(), "ilp_solve_s": round(best.solve_s, 3),
            "selection": "least predicted loss (made without the weights: no images to measure)",
            "sizes_from": f"layer_costs of the published {model} UNet config (float32 float parts)",
            "activations": {"avg_bits": round(act_avg, 4), "float16": ours, "in_both": len(theirs & set(ours)),
                            # why the program keeps or quantizes each of the publication's float16
                            # activations: its 8-bit scores and its share of all activation elements
                            "publication_float16": {n: {"kept": n in ours, "scores_at_8": sens.scores["act"][n][8],
                                                        "share": sens.act_numel[n] / total_act}
                                                    for n in sorted(theirs)}},
            "sensitivity": sens.meta.get("origin", {}).get("repository"),
        }
        (out / f"{name}.stats.json").write_text(json.dumps(stats, indent=1))
        written.append(stats)
    return written


def regenerate(model=None, out: Path = PRESETS_DIR, eval_prompts: int = 32, bits=PRESET_BITS,
               evidence: Path | None = None, write_presets: bool = True, progress: bool = True) -> list[dict] | None:
    """Everything `mixdq presets` writes, from one sensitivity run and one pair of evaluators:
    the preset plans and their measured numbers into `out` (unless write_presets=False), and the
    ablation table into `evidence`.  Returns the presets' stats (None without presets)."""
    if eval_prompts < 1:
        raise MixDQError(f"the presets are measured on at least one prompt, got eval_prompts={eval_prompts}")
    state = _setup(model, eval_prompts, progress)
    stats = make_presets(out=Path(out), bits=tuple(bits), state=state, progress=progress) if write_presets else None
    if evidence:
        make_evidence(model=model, path=Path(evidence), state=state, presets_stats=stats, progress=progress)
    return stats


@dataclass
class Preset:
    name: str
    plan: object                  # mixdq.Plan
    size_mb: float                # layer_costs(unet).total_mb(plan): what quantize will store
    stats: dict = field(default_factory=dict)   # presets/NAME.stats.json, measured when shipped


def presets_folder(unet) -> Path | None:
    """Where this UNet's shipped presets are: presets/<model>/ for a published architecture
    (its presets are made from that model's table), presets/ for the embedded model's
    architecture, None for any other (no presets ship for it).  Layer names alone cannot
    tell: the embedded model's are a subset of SDXL's."""
    from .architectures import architecture_hash, published_model_for

    model = published_model_for(unet)
    if model in PUBLISHED_PRESETS:
        return PRESETS_DIR / PUBLISHED_PRESETS[model]
    embedded = shipped("assets", "tiny-sdxl", "unet", "config.json")
    if embedded.is_file() and architecture_hash(unet) == architecture_hash(json.loads(embedded.read_text())):
        return PRESETS_DIR
    return None


def presets(unet, folder: Path | None = None) -> list[Preset]:
    """The shipped plans (NAME.json, numbers in NAME.stats.json) in `folder` (default: this
    UNet's `presets_folder`) that fit this UNet, smallest first."""
    from .memory import layer_costs
    from .plan import Plan
    from .quant import quantizable_layers

    folder = folder or presets_folder(unet)
    if folder is None:
        return []
    folder = Path(folder)
    names = list(quantizable_layers(unet))
    costs = None
    out = []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".stats.json"):
            continue
        try:
            plan = Plan.load(path)
            plan.validate(names)
        except MixDQError:
            continue
        costs = costs or layer_costs(unet)
        stats_path = path.with_name(path.stem + ".stats.json")
        try:
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        except ValueError:
            stats = {}
        out.append(Preset(path.stem, plan, costs.total_mb(plan), stats))
    return sorted(out, key=lambda p: p.size_mb)
