"""`python -m mixdq VERB`: the library's verbs on the command line.

    python -m mixdq calibrate   --out ranges.json           float activation ranges
    python -m mixdq sensitivity --out scores.json           per-layer scores (cached)
    python -m mixdq allocate    --budget-mb 2.5 --out plan.json
    python -m mixdq quantize    --plan plan.json            quantize, report size and time
    python -m mixdq export      --plan plan.json --out q/   quantize and save the folder
    python -m mixdq generate    --model q/ --prompt "..."   generate (float, export or plan)
    python -m mixdq bench       ...                         memory / speed benchmarks
    python -m mixdq presets     [--evidence docs/evidence.md]   regenerate presets/
    python -m mixdq zoo train | evaluate | tokenizer        the embedded model's tools

Every subcommand takes --model (default: the embedded model) and prints its
errors as one clear line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from .allocation import CONTENT, DEFAULT_RATIOS, QUALITY, TOTAL, Allocation
from .calibrate import DEFAULT_PROMPTS, Calibration
from .errors import BudgetError, MixDQError, PlanError
from .plan import WEIGHT_BITS
from .resources import shipped
from .sensitivity_analysis import Sensitivity, sensitivity

PRESETS = shipped("presets")


def _preset_names() -> list[str]:
    """Every shipped preset, as `--plan` takes it: presets/NAME.json and presets/MODEL/NAME.json
    are both NAME; which file a name means follows from the model (`presets.presets_folder`)."""
    return sorted({p.stem for p in PRESETS.glob("**/*.json")
                   if not p.stem.endswith(".stats") and p.stem != "sensitivity"})


def _plan_arg(text: str):
    """A plan file, a preset name or a uniform spec like W8A8."""
    from .plan import Plan

    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", text)
    if m:
        return ("uniform", int(m.group(1)), int(m.group(2)))
    path = Path(text)
    if path.is_file():
        return Plan.load(path)
    if text in _preset_names():
        return ("preset", text)
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a plan file, a preset ({', '.join(_preset_names()) or 'none shipped'}) "
        "nor a uniform spec like W8A8")


def _weight_bits_map(text: str) -> dict[int, int]:
    """'8=7' or '8=7,4=3' -> {8: 7} ..."""
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {int(old): int(new) for old, new in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write OLD=NEW weight bits, e.g. 8=7") from None


def _resolve_plan(spec, unet, weight_bits_map=None):
    from .plan import Plan
    from .quant import quantizable_layers

    if isinstance(spec, tuple) and spec[0] == "preset":
        from .presets import presets, presets_folder

        found = {p.name: p.plan for p in presets(unet)}
        if spec[1] not in found:
            raise PlanError(f"the preset {spec[1]!r} does not ship for this model (its presets: "
                            f"{', '.join(found) or 'none'}, in {presets_folder(unet) or 'no folder'})")
        spec = found[spec[1]]
    elif isinstance(spec, tuple):
        _, w, a = spec
        spec = Plan.uniform(quantizable_layers(unet), w, a)
    return spec.with_weight_bits(weight_bits_map) if weight_bits_map else spec


# ---------------------------------------------------------------------------
# calibration, sensitivity and allocation options
# ---------------------------------------------------------------------------
def _bits_list(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit-widths like 2,4,8, got {text!r}")
    if not bits:
        raise argparse.ArgumentTypeError("no bit-widths given")
    return bits


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the subcommands that run the model on calibration prompts."""
    parser.add_argument("--model", default=None,
                        help="model source: a diffusers folder or hub id (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=None, metavar="N",
                        help=f"use the first N shipped calibration prompts (default: {DEFAULT_PROMPTS} or all)")
    parser.add_argument("--prompts-file", default=None, help="text file with one prompt per line")
    parser.add_argument("--seed", type=int, default=Calibration.seed,
                        help=f"seed of prompt i is seed + i (default {Calibration.seed})")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--resolution", type=int, default=None, help="image height = width (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=Calibration.batch_size,
                        help=f"prompts per forward (default {Calibration.batch_size})")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")


def calibration_from_args(pipe, args):

    kw = dict(seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
              height=args.resolution, width=args.resolution, batch_size=args.batch_size)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"error: --prompts-file {str(path)!r} does not exist")
        prompts = [p.strip() for p in path.read_text().splitlines() if p.strip()]
        if args.prompts:
            prompts = prompts[:args.prompts]
        return Calibration(prompts=prompts, **kw)
    if args.prompts is not None and args.prompts < 1:
        raise SystemExit("error: --prompts must be >= 1")
    try:
        return Calibration.default(pipe, n=args.prompts, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}; pass a smaller --prompts or a --prompts-file")


def add_sensitivity_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_calibration_args(parser)
    parser.add_argument("--weight-bits", type=_bits_list, default=None, metavar="B,B",
                        help="weight candidates for every layer (default: content 2,4,8; quality 4,8)")
    parser.add_argument("--act-bits", type=_bits_list, default=None, metavar="B,B",
                        help="activation candidates (default 4,8)")
    parser.add_argument("--layers", nargs="*", default=None, metavar="PATTERN",
                        help="only these layers (fnmatch patterns, e.g. 'up_blocks.*attn2*')")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $MIXDQ_CACHE or ~/.cache/mixdq)")
    parser.add_argument("--recompute", action="store_true", help="ignore cached measurements")
    parser.add_argument("--out", default=None, help="also write the scores to this JSON file")
    parser.add_argument("--show", action="store_true", help="print the per-layer table")
    parser.add_argument("--import-mixdq", default=None, metavar="DIR",
                        help="instead of measuring: import the MixDQ authors' published sensitivity files in "
                             "DIR (weight-ssim.yaml, weight-sqnr.yaml, act-ssim.yaml, act-sqnr.yaml) for --model "
                             "(default stabilityai/sdxl-turbo), checked against its published architecture; "
                             "needs --out")
    return parser


def import_sensitivity(args) -> Sensitivity:
    """`mixdq sensitivity --import-mixdq DIR --out PATH`: no model, no measuring."""
    from .published import MIXDQ_SDXL_TURBO, import_mixdq_tables, origin_text

    if not args.out:
        raise PlanError("--import-mixdq needs --out PATH, the sensitivity table to write "
                        "(e.g. presets/sdxl-turbo/sensitivity.json)")
    sens = import_mixdq_tables(args.import_mixdq, args.model or MIXDQ_SDXL_TURBO.model)
    sens.save(args.out)
    n_c = sum(1 for g in sens.group.values() if g == CONTENT)
    _log(f"wrote {args.out}: {len(sens.layers)} layers ({n_c} content, {len(sens.layers) - n_c} quality) of "
         f"{sens.meta['identity']['model']}, scores at 2, 4, 8 bits, measured by {origin_text(sens.meta)}")
    return sens


def _say_what_the_analysis_costs(pipe, cal, args) -> None:
    """Before a default analysis starts, how long it will take here (a GPU job says so)."""
    from .sensitivity_analysis import estimate_analysis
    from .tables import analysis_todo, find_sensitivity

    if args.recompute or args.layers or args.weight_bits or args.act_bits or args.cache_dir:
        return   # a custom analysis: the default one's count would mislead
    found = find_sensitivity(pipe, cal)
    if found.source == "cached":
        return   # complete here: nothing to run
    # a shipped or published table is not this cache: the analysis asked for still runs, so
    # say what it costs (and that the table exists)
    todo = found.todo
    if todo is None and found.source != "none":  # the lookup returned before counting the cache
        todo = analysis_todo(pipe, cal)
    if todo:
        estimate = estimate_analysis(pipe, cal, todo)
        _log("sensitivity: " + (f"{found.message}; measuring here anyway, as asked: " if found.source != "none"
                                else "") + estimate.message
             + ("; starting anyway, as asked (resumable: stop with Ctrl-C and rerun to continue)"
                if estimate.gpu_job else ""))


def run_sensitivity(args) -> Sensitivity:
    import torch

    from .loading import load_pipeline
    from .plan import ACT_BITS

    if args.import_mixdq:
        return import_sensitivity(args)
    for what, bits, allowed in (("--weight-bits", args.weight_bits, WEIGHT_BITS), ("--act-bits", args.act_bits, ACT_BITS)):
        bad = [b for b in bits or [] if b not in allowed]
        if bad:
            raise SystemExit(f"error: {what} {bad} not supported; choose from {list(allowed)}")
    device = args.device
    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per rank
    pipe = load_pipeline(args.model, device=device)
    cal = calibration_from_args(pipe, args)
    _say_what_the_analysis_costs(pipe, cal, args)
    sens = sensitivity(pipe, cal, weight_bits=args.weight_bits, act_bits=args.act_bits, layers=args.layers,
                       cache_dir=args.cache_dir, recompute=args.recompute)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        if args.out:
            sens.save(args.out)
        if getattr(args, "show", False):
            print(sens.table("weight"))
            print(sens.table("act"))
        m = sens.meta
        n_c = sum(1 for g in sens.group.values() if g == CONTENT)
        print(f"sensitivity: {len(sens.layers)} layers ({n_c} content, {len(sens.layers) - n_c} quality), "
              f"{len(cal.prompts)} prompts, {m['computed']} measured now, wall {m['wall_s']:.1f} s, "
              f"{m['world_size']} process(es); cache {m['cache']}", file=sys.stderr)
    return sens


def _ratio_list(text: str) -> list[float | None]:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if t in ("joint", "none"):
            out.append(None)
            continue
        try:
            v = float(t)
        except ValueError:
            import argparse

            raise argparse.ArgumentTypeError(f"ratios are numbers > 0 or 'joint', got {t!r}")
        if not v > 0:
            import argparse

            raise argparse.ArgumentTypeError(f"ratios must be > 0, got {v}")
        out.append(v)
    return out


def add_allocate_args(parser):
    add_calibration_args(parser)
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="UNet memory budget in MB (1 MB = 1e6 bytes), as the quantized model stores it")
    parser.add_argument("--range", action="store_true", help="print the feasible budget range and exit")
    parser.add_argument("--sensitivity", default=None,
                        help="sensitivity JSON (default: the table shipped for --model and this calibration, "
                             "else the cached one, else measured and cached)")
    parser.add_argument("--ratio", type=_ratio_list, default=None, metavar="K[,K..]",
                        help="content/quality bits-per-weight ratio(s); 'joint' = one shared budget "
                             f"(default: sweep {','.join('joint' if r is None else str(r) for r in DEFAULT_RATIOS)})")
    parser.add_argument("--no-select", action="store_true",
                        help="do not measure the candidates; take the best predicted plan")
    parser.add_argument("--eval-prompts", type=int, default=16, metavar="N",
                        help="prompts used to measure candidate plans (default 16)")
    parser.add_argument("--act-avg-bits", type=float, default=None,
                        help="average activation bits (weighted by activation size; default 8, and for a "
                             "published table 8 with float16 where it matters, at the publication's "
                             "average); 0 leaves activations unconstrained")
    parser.add_argument("--act-floor", type=int, default=None, help="no activation below this many bits")
    parser.add_argument("--content-bits", type=_bits_list, default=None, metavar="B,B",
                        help="weight candidates for content layers (default 2,4,8,16)")
    parser.add_argument("--quality-bits", type=_bits_list, default=None, metavar="B,B",
                        help="weight candidates for quality layers (default 4,8,16)")
    parser.add_argument("--single-metric", action="store_true",
                        help="ablation: score every layer by SQNR in one group (no metric decoupling)")
    parser.add_argument("--pareto", type=int, default=None, metavar="N",
                        help="print the Pareto front (size vs predicted loss) of the plans for N budgets "
                             "spread over the feasible range and every ratio, then exit")
    parser.add_argument("--out", default=None, help="write the plan JSON here (default: stdout)")
    return parser


def run_allocate(args) -> Allocation | None:
    from . import planning
    from .defaults import default_dtype

    if args.budget_mb is None and not args.range and not args.pareto:
        raise PlanError("give --budget-mb MB (see the feasible range with --range)")
    if args.budget_mb is not None and not (args.budget_mb > 0 and math.isfinite(args.budget_mb)):
        raise BudgetError(f"--budget-mb must be a positive number of megabytes, got {args.budget_mb}")
    if args.eval_prompts < 1:
        raise PlanError("--eval-prompts must be >= 1")
    candidates = planning.weight_candidates(args.content_bits, args.quality_bits)
    solver = dict(sensitivity=args.sensitivity, candidates=candidates, act_avg_bits=args.act_avg_bits,
                  act_floor=args.act_floor, decoupled=not args.single_metric, budget_mb=args.budget_mb,
                  lower_bits_how=f" (--content-bits / --quality-bits, down to {min(WEIGHT_BITS)})", log=_log)
    pipe = _pipeline_to_plan(args)
    if pipe is None:
        # sizes in the dtype the model would be loaded in on --device (default: this machine's)
        dtype = default_dtype(args.device) if args.device else None
        alloc = planning.allocator_without_weights(args.model, dtype=dtype, **solver)
        whence = f"; from the published architecture of {args.model}, without its weights"
    else:
        cal = calibration_from_args(pipe, args)
        alloc = planning.allocator_for(pipe, cal, **solver)
        whence = ""
    float_mb = alloc.costs.float_mb()
    if args.range:
        lo, hi = alloc.feasible_range_mb()
        print(f"feasible budgets: {math.ceil(lo * 1000) / 1000:.3f} .. {math.floor(hi * 1000) / 1000:.3f} MB "
              f"(float UNet {float_mb:.3f} MB{whence})")
        return None
    if args.pareto:
        _print_pareto(planning.pareto_plans(alloc, args.pareto, args.ratio))
        return None
    evaluate = None if args.no_select or pipe is None else planning.plan_evaluator(pipe, cal, args.eval_prompts)
    best, family = planning.plan_budget(alloc, args.budget_mb, args.ratio, evaluate)
    _print_candidates(family, best)
    if pipe is None:
        _log(f"no image-based selection without the model's weights: the plan with the least predicted loss, "
             f"{best.size_mb:.4f} MB ({best.size_mb / float_mb:.3f}x the float UNet's {float_mb:.1f} MB), "
             f"predicted loss {best.predicted[TOTAL]:.4e} (content {best.predicted.get(CONTENT, math.nan):.4e}, "
             f"quality {best.predicted.get(QUALITY, math.nan):.4e}){whence}")
    if args.out:
        best.plan.save(args.out)
        _log(f"wrote {args.out}: {best.size_mb:.4f} MB <= {args.budget_mb} MB, {best.plan.summary()}")
    else:
        print(json.dumps(best.plan.to_dict(), indent=1))
    return best


def _log(line: str) -> None:
    print(line, file=sys.stderr)


_CALIBRATION_FLAGS = ("prompts", "prompts_file", "steps", "guidance", "resolution")


def _pipeline_to_plan(args):
    """The pipeline `allocate` plans for, or None to plan a published model without its weights
    (its architecture and a published sensitivity table ship): always for --range, --pareto
    and --no-select (loading gigabytes of weights would only give the same byte counts), and
    when the model cannot be loaded here (not in the Hugging Face cache, no network)."""
    from . import planning
    from .errors import ModelNotFoundError
    from .loading import load_pipeline

    if not planning.plans_without_weights(args.model):
        return load_pipeline(args.model, device=args.device)
    given = [f"--{k.replace('_', '-')}" for k in _CALIBRATION_FLAGS if getattr(args, k) is not None]
    if not (args.range or args.pareto or args.no_select):
        try:
            return load_pipeline(args.model, device=args.device)
        except ModelNotFoundError:
            if given:
                raise
            _log(f"{args.model} is neither in the local Hugging Face cache nor downloadable here: planning it "
                 "without its weights")
    if given:
        raise PlanError(f"{' '.join(given)} set a calibration, which only the model's weights can measure; "
                        f"planning {args.model} without them takes the published table as measured")
    return None


def _print_pareto(front) -> None:
    # losses are normalised per group: 1 = the whole group at its reference width (allocation.NORM_REF_BITS)
    print(f"{'size MB':>10} {'content loss':>13} {'quality loss':>13} {'total':>10}  ratio  plan")
    for a in front:
        print(f"{a.size_mb:10.4f} {a.predicted.get(CONTENT, float('nan')):13.3e} "
              f"{a.predicted.get(QUALITY, float('nan')):13.3e} {a.predicted[TOTAL]:10.3e}  "
              f"{'joint' if a.ratio is None else a.ratio:>5}  {a.plan.summary()}")


def _print_candidates(family, best) -> None:
    fmt = {"ssim": ".6f", "psnr": ".2f", "size_mb": ".4f", "alignment": ".3f"}
    for a in family:
        meas = " ".join(f"{k}={v:{fmt.get(k, '.4g')}}" for k, v in a.measured.items())
        cut = "" if a.optimal else f" (time limit: within {a.gap:.2%} of optimal)"
        _log(f"{'*' if a is best else ' '} ratio={a.ratio if a.ratio is not None else 'joint':>5} "
             f"size={a.size_mb:.4f} MB predicted loss={a.predicted[TOTAL]:.3e}{cut} {meas}")


# ---------------------------------------------------------------------------
# quantize, export, generate
# ---------------------------------------------------------------------------
def _add_plan_args(p, required: bool = True):
    add_calibration_args(p)
    p.add_argument("--plan", type=_plan_arg, required=required,
                   help="plan JSON, preset name, or a uniform spec such as W8A8 / W4A16"
                        + ("" if required else ": quantize with it first"))
    p.add_argument("--weight-bits-map", type=_weight_bits_map, default=None, metavar="OLD=NEW",
                   help="replace weight widths throughout the plan, e.g. 8=7 (weight-only layers too)")
    p.add_argument("--keep-w8", action="store_true",
                   help="keep W8A8 layers 8-bit where this CPU's int8 backend saturates on them (no VNNI: "
                        "exact float path, no faster than float there) instead of making them W7A8 "
                        "(quantizing, or re-rounding an exported --model's codes)")
    p.add_argument("--no-bos", action="store_true", help="turn BOS-aware K/V quantization off (ablation)")
    p.add_argument("--kernel", choices=["int_mm", "dequant"], default=None,
                   help="override the W8A8 kernel choice (default: measured per machine)")


def _quantized_pipe(args):
    """Load, quantize per --plan with calibration from the shared arguments."""
    from . import load_pipeline, quantize

    pipe = load_pipeline(args.model, device=args.device)
    plan = _resolve_plan(args.plan, pipe.unet, args.weight_bits_map)
    cal = calibration_from_args(pipe, args)
    report = quantize(pipe, plan, cal, bos_aware=not args.no_bos, kernel=args.kernel,
                      int8_safe=not args.keep_w8)
    print(report, file=sys.stderr)
    return pipe, report


def cmd_calibrate(args):
    from . import float_ranges, load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    cal = calibration_from_args(pipe, args)
    ranges = float_ranges(pipe, cal)
    data = {"calibration": cal.to_dict(),
            "ranges": {name: [r.to_list() for r in rs] for name, rs in ranges.items()}}
    text = json.dumps(data, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote ranges of {len(ranges)} layers to {args.out}", file=sys.stderr)
    else:
        print(text)


def cmd_quantize(args):
    pipe, report = _quantized_pipe(args)
    print(json.dumps({"float_mb": report.float_bytes / 1e6, "quantized_mb": report.quantized_bytes / 1e6,
                      "ratio": report.ratio, "kernel": report.kernel, "plan": report.plan.summary(),
                      "seconds_quantize": report.seconds_quantize,
                      "seconds_calibrate": report.seconds_calibrate, "int8_layers": report.int8_layers,
                      "held_mb": report.held_bytes / 1e6, "backends": report.backends,
                      "notes": report.notes}, indent=1))


def cmd_export(args):
    from . import save_quantized

    pipe, _ = _quantized_pipe(args)
    out = save_quantized(pipe, args.out, overwrite=args.overwrite)
    print(f"exported to {out}", file=sys.stderr)


def cmd_generate(args):
    import torch

    from . import generation_defaults, load_pipeline

    if args.plan is not None:
        pipe, _ = _quantized_pipe(args)
    else:
        pipe = load_pipeline(args.model, device=args.device, kernel=args.kernel, int8_safe=not args.keep_w8)
    settings = generation_defaults(pipe)
    if args.steps is not None:
        settings["num_inference_steps"] = args.steps
    if args.guidance is not None:
        settings["guidance_scale"] = args.guidance
    if args.resolution is not None:
        settings["height"] = settings["width"] = args.resolution
    if not args.prompt.strip():
        raise MixDQError("--prompt is empty: describe the image to generate")
    gen = torch.Generator("cpu").manual_seed(args.seed)
    image = pipe(args.prompt, generator=gen, **settings).images[0]
    image.save(args.image)
    print(f"wrote {args.image}", file=sys.stderr)


# ---------------------------------------------------------------------------
# presets, and the embedded model's own tools (zoo)
# ---------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_presets_args(p) -> None:
    from .presets import PRESET_BITS, PRESETS_DIR

    p.add_argument("--model", default=None, help="model source (default: the embedded model)")
    p.add_argument("--out", default=None, help=f"presets folder (default: {PRESETS_DIR.name}/, "
                                                "and presets/<model>/ with --published)")
    p.add_argument("--published", action="store_true",
                   help="presets of a published model (--model, default stabilityai/sdxl-turbo) from its "
                        "architecture and the published sensitivity shipped beside them: no weights, no images")
    p.add_argument("--eval-prompts", type=_positive_int, default=32,
                   help="held-out prompts per measurement, and as many again for selection (default 32)")
    p.add_argument("--bits", type=_bits_list, default=list(PRESET_BITS), metavar="B,B",
                   help=f"uniform W{{b}}A8 sizes to make presets at (default {','.join(map(str, PRESET_BITS))})")
    p.add_argument("--evidence", default=None, help="also write the ablation table (markdown) here")
    p.add_argument("--no-presets", action="store_true", help="only the evidence table")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the embedded model's layers are tiny, and on "
                        "shared cores two OpenMP threads wait on each other, measured 10x slower here)")


def cmd_presets(args):
    import time

    import torch

    from .presets import PRESETS_DIR, make_published_presets, regenerate
    from .published import MIXDQ_SDXL_TURBO

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.published:
        for s in make_published_presets(args.model or MIXDQ_SDXL_TURBO.model, args.out, args.bits):
            _log(f"{s['preset']}: {s['size_mb']:.3f} MB, predicted loss {s['predicted_loss']['total']:.4g}, "
                 f"{s['summary']}")
    else:
        regenerate(args.model, Path(args.out or PRESETS_DIR), args.eval_prompts, args.bits, args.evidence,
                   write_presets=not args.no_presets)
    if args.evidence:
        _log(f"wrote {args.evidence}")
    _log(f"done in {time.perf_counter() - t0:.0f} s")


def add_zoo_args(p) -> None:
    """`mixdq zoo train | evaluate | tokenizer`: retrain, measure and tokenize the embedded model."""
    import dataclasses
    import typing

    from .zoo.evaluate import ASSET_DIR
    from .zoo.train_tiny import TrainConfig

    zoo = p.add_subparsers(dest="zoo_verb", required=True, metavar="TOOL")
    t = zoo.add_parser("train", help="retrain the embedded tiny-sdxl from scratch (resumable)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        if kind is bool:
            t.add_argument(flag, action="store_true", help=f.metadata.get("help"))
        else:
            t.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help"))
    t.set_defaults(run=cmd_zoo_train)
    e = zoo.add_parser("evaluate", help="measure the quality bar with the checker; draw the grid")
    e.add_argument("--model", type=Path, default=ASSET_DIR)
    e.add_argument("--n", type=_positive_int, default=200, help="held-out captions (each generated once per seed)")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    e.add_argument("--steps", type=_positive_int, nargs="+", default=[1, 2, 4])
    e.add_argument("--threads", type=_positive_int, default=1,
                   help="1 is fastest for this tiny model on a shared machine")
    e.add_argument("--json", type=Path, default=None)
    e.add_argument("--grid", type=Path, default=None, help="write the prompt | image grid here")
    e.add_argument("--grid-rows", type=_positive_int, default=12)
    e.add_argument("--card", action="store_true", help="write the model card README.md (and grid.png) into --model")
    e.add_argument("--training-log", type=Path, default=None,
                   help="this model's train_tiny log: adds its minutes per stage to --json")
    e.set_defaults(run=cmd_zoo_evaluate)
    k = zoo.add_parser("tokenizer", help="build the CLIP BPE tokenizer files offline")
    k.add_argument("out_dir", type=Path)
    k.add_argument("--bpe", type=Path, default=None, help="the CLIP BPE merges (default: open-clip's copy)")
    k.add_argument("--pad-token", default="<|endoftext|>")
    k.set_defaults(run=cmd_zoo_tokenizer)


def train_config(args):
    """The TrainConfig that `mixdq zoo train`'s options describe."""
    import dataclasses

    from .zoo.train_tiny import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def cmd_zoo_train(args):
    from .zoo.train_tiny import train

    train(train_config(args))


def cmd_zoo_evaluate(args):
    from .zoo.evaluate import evaluate_model

    evaluate_model(args.model, args.n, args.seeds, args.steps, args.threads, args.json, args.grid,
                   args.grid_rows, args.card, args.training_log)


def cmd_zoo_tokenizer(args):
    from .zoo.tokenizer import write_tokenizer

    write_tokenizer(args.out_dir, args.bpe, args.pad_token)
    _log(f"wrote CLIP tokenizer to {args.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mixdq", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("calibrate", help="float activation ranges over calibration prompts")
    add_calibration_args(p)
    p.add_argument("--out", help="write the ranges to this JSON file (default: stdout)")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("sensitivity", help="per-layer sensitivity (content: SSIM, quality: SQNR)")
    add_sensitivity_args(p)
    p.set_defaults(run=run_sensitivity)

    p = sub.add_parser("allocate", help="integer program: bits per layer under a memory budget")
    add_allocate_args(p)
    p.set_defaults(run=run_allocate)

    p = sub.add_parser("quantize", help="quantize with a plan and report size and timings")
    _add_plan_args(p)
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("export", help="quantize with a plan and save the folder")
    _add_plan_args(p)
    p.add_argument("--out", required=True, help="folder to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("generate", help="generate one image (float, exported, or --plan)")
    _add_plan_args(p, required=False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", default="out.png", help="output PNG (default out.png)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("presets", help="regenerate the shipped presets (and the evidence table)")
    add_presets_args(p)
    p.set_defaults(run=cmd_presets)

    p = sub.add_parser("zoo", help="the embedded model's tools: train, evaluate, tokenizer")
    add_zoo_args(p)

    p = sub.add_parser("bench", help="memory and latency benchmarks (bench/)")
    try:
        from bench.run import add_bench_args, run_bench
    except ImportError as e:  # bench/ lives beside the package in a source checkout
        p.set_defaults(run=lambda a, e=e: _missing_bench(e))
    else:
        add_bench_args(p)
        # the benchmark records its command line (and --emulate re-runs it): pass the words after "bench"
        p.set_defaults(run=lambda a: run_bench(a, argv=a.argv[a.argv.index("bench") + 1:]))
    return parser


def _missing_bench(error):
    raise MixDQError(f"the benchmarks live in bench/ of a source checkout; run from the repo root ({error})")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.run(args)
    except MixDQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
