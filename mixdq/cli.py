"""`python -m mixdq VERB`: the library's verbs on the command line.

    python -m mixdq calibrate   --out ranges.json           float activation ranges
    python -m mixdq sensitivity --out scores.json           per-layer scores (cached)
    python -m mixdq allocate    --budget-mb 2.5 --out plan.json
    python -m mixdq quantize    --plan plan.json            quantize, report size and time
    python -m mixdq export      --plan plan.json --out q/   quantize and save the folder
    python -m mixdq generate    --model q/ --prompt "..."   generate (float, export or plan)
    python -m mixdq bench       ...                         memory / speed benchmarks

Every subcommand takes --model (default: the embedded model) and prints its
errors as one clear line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .errors import MixDQError
from .resources import shipped

PRESETS = shipped("presets")


def _plan_arg(text: str):
    """A plan file, a preset name (presets/NAME.json) or a uniform spec like W8A8."""
    from .plan import Plan

    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", text)
    if m:
        return ("uniform", int(m.group(1)), int(m.group(2)))
    path = Path(text)
    if not path.is_file() and (PRESETS / f"{text}.json").is_file():
        path = PRESETS / f"{text}.json"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.json") if not p.stem.endswith(".stats"))
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a plan file, a preset ({', '.join(names) or 'none shipped'}) "
            "nor a uniform spec like W8A8")
    return Plan.load(path)


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

    if isinstance(spec, tuple):
        _, w, a = spec
        spec = Plan.uniform(quantizable_layers(unet), w, a)
    return spec.with_weight_bits(weight_bits_map) if weight_bits_map else spec


def _add_plan_args(p, required: bool = True):
    from .sensitivity import add_calibration_args

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
    from .sensitivity import calibration_from_args

    pipe = load_pipeline(args.model, device=args.device)
    plan = _resolve_plan(args.plan, pipe.unet, args.weight_bits_map)
    cal = calibration_from_args(pipe, args)
    report = quantize(pipe, plan, cal, bos_aware=not args.no_bos, kernel=args.kernel,
                      int8_safe=not args.keep_w8)
    print(report, file=sys.stderr)
    return pipe, report


def cmd_calibrate(args):
    from . import float_ranges, load_pipeline
    from .sensitivity import calibration_from_args

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


def build_parser() -> argparse.ArgumentParser:
    from .allocate import add_allocate_args
    from .sensitivity import add_calibration_args, add_sensitivity_args

    parser = argparse.ArgumentParser(prog="python -m mixdq", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("calibrate", help="float activation ranges over calibration prompts")
    add_calibration_args(p)
    p.add_argument("--out", help="write the ranges to this JSON file (default: stdout)")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("sensitivity", help="per-layer sensitivity (content: SSIM, quality: SQNR)")
    add_sensitivity_args(p)
    p.set_defaults(run=lambda a: __import__("mixdq.sensitivity", fromlist=["x"]).run_sensitivity(a))

    p = sub.add_parser("allocate", help="integer program: bits per layer under a memory budget")
    add_allocate_args(p)
    p.set_defaults(run=lambda a: __import__("mixdq.allocate", fromlist=["x"]).run_allocate(a))

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
