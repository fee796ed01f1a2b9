"""Per-layer-type kernel comparison: float32, bfloat16 and each INT8 backend.

Shapes are those of the SDXL-Turbo UNet at 512 px, batch 1 (latent 64x64:
320 ch at 64x64, 640 ch at 32x32 with 1024 tokens, 1280 ch at 16x16 with 256
tokens, 77 text tokens of width 2048).  Each INT8 time includes the activation
quantization and the epilogue (float in, float out), i.e. what a layer costs.
All variants of one shape are timed interleaved, round-robin, so the ratios hold
on a shared, noisy machine.

torchao=True adds torchao's CPU W8A8 recipe (`Int8DynamicActivationInt8WeightConfig`:
activations quantized per token at run time, weights per channel) to the linear
rows, on a float32 and on a bfloat16 layer: the library this field reaches for
first, timed beside ours (it quantizes nn.Linear only, so conv rows have none).

`python -m bench.kernels` prints the table; `compare()` returns it (bench.run
records it in RESULTS.md and the JSON).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mixdq.quant.backends import CONV_KERNELS, LINEAR_KERNELS, conv_codes_as_held
from mixdq.quant.machine import built, interleaved_times

# (label, M, K, N): tokens x in x out
LINEAR_SHAPES = [
    ("attn qkvo 640 (1024 tok)", 1024, 640, 640),
    ("ff in 640->5120 (GEGLU)", 1024, 640, 5120),
    ("ff out 2560->640", 1024, 2560, 640),
    ("attn qkvo 1280 (256 tok)", 256, 1280, 1280),
    ("ff in 1280->10240 (GEGLU)", 256, 1280, 10240),
    ("ff out 5120->1280", 256, 5120, 1280),
    ("cross k/v 2048->1280 (77 tok)", 77, 2048, 1280),
]
# (label, C, O, H, k, stride)
CONV_SHAPES = [
    ("3x3 320->320 @64", 320, 320, 64, 3, 1),
    ("3x3 640->640 @32", 640, 640, 32, 3, 1),
    ("3x3 1280->1280 @16", 1280, 1280, 16, 3, 1),
    ("3x3 960->640 @32 (up)", 960, 640, 32, 3, 1),
    ("3x3 s2 640->640 (down)", 640, 640, 32, 3, 2),
    ("1x1 1920->1280 @16 (shortcut)", 1920, 1280, 16, 1, 1),
]
TINY_LINEAR = [("tiny linear", 64, 32, 48)]
TINY_CONV = [("tiny conv", 16, 24, 8, 3, 1)]


def _quantized(w: torch.Tensor):
    dims = tuple(range(1, w.dim()))
    ws = (w.abs().amax(dim=dims) / 127).clamp_min(1e-8)
    wq = torch.round(w / ws.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return wq, ws


def _median_ms(fns: dict, reps: int, budget_s: float) -> dict:
    times = interleaved_times(fns, reps, budget_s)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def torchao_version() -> str | None:
    try:
        import torchao
    except Exception:  # not installed, or built for another torch
        return None
    return torchao.__version__


def _torchao_linears(w: torch.Tensor, b: torch.Tensor) -> dict:
    """{column: nn.Linear quantized by torchao} for the float32 and bfloat16 layer."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    out = {}
    for name, dtype in (("torchao_dyn", torch.float32), ("torchao_dyn_bf16", torch.bfloat16)):
        with torch.inference_mode(False):  # quantize_ swaps parameters
            layer = torch.nn.Linear(w.shape[1], w.shape[0], dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        out[name] = layer
    return out


QUICK_LINEAR = [LINEAR_SHAPES[i] for i in (0, 1, 3, 6)]
QUICK_CONV = [CONV_SHAPES[i] for i in (0, 2, 5)]


def compare(small: bool = False, reps: int = 7, budget_s: float = 6.0, backends=None, quick: bool = False,
            torchao: bool = False) -> dict:
    """Median ms per layer call for each path, and speed-ups vs float32.

    quick: a subset of the shapes (for slow emulated ISAs).  torchao: add its
    W8A8 recipe to the linear rows (an error when torchao cannot be imported)."""
    torch.manual_seed(0)
    backends = [b for b in (backends or ("int_mm", "onednn", "fbgemm")) if built(b)]
    if torchao and torchao_version() is None:
        raise RuntimeError("torchao is not importable here: pip install torchao (see requirements-dev.txt)")
    rows = []
    with torch.inference_mode():
        for label, m, k, n in (TINY_LINEAR if small else QUICK_LINEAR if quick else LINEAR_SHAPES):
            x = torch.randn(m, k)
            w = torch.randn(n, k) / k ** 0.5
            b = torch.randn(n) * 0.02
            wq, ws = _quantized(w)
            s, z = float(x.max() - x.min()) / 255, int(round(float(-x.min()) / (float(x.max() - x.min()) / 255)))
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            fns = {"float32": lambda: F.linear(x, w, b), "bfloat16": lambda: F.linear(xb, wb, bb)}
            for be in backends:
                f = LINEAR_KERNELS[be]
                fns[be] = (lambda f=f: f(x, s, z, wq, ws, b))
            if torchao:
                for name, layer in _torchao_linears(w, b).items():
                    xt = x.to(layer.weight.dtype)
                    fns[name] = (lambda layer=layer, xt=xt: layer(xt))
            ms = _median_ms(fns, reps, budget_s)
            rows.append({"type": "linear", "label": label, "shape": [m, k, n], "ms": ms})
        for label, c, o, h, kk, st in (TINY_CONV if small else QUICK_CONV if quick else CONV_SHAPES):
            x = torch.randn(1, c, h, h)
            w = torch.randn(o, c, kk, kk) / (c * kk * kk) ** 0.5
            b = torch.randn(o) * 0.02
            wq, ws = _quantized(w)
            s, z = float(x.max() - x.min()) / 255, int(round(float(-x.min()) / (float(x.max() - x.min()) / 255)))
            pad = kk // 2
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            fns = {"float32": lambda: F.conv2d(x, w, b, st, pad),
                   "bfloat16": lambda: F.conv2d(xb, wb, bb, st, pad)}
            for be in backends:
                if be in CONV_KERNELS:
                    f = CONV_KERNELS[be]
                    w_be = conv_codes_as_held(be, wq, 8)
                    fns[be] = (lambda f=f, w_be=w_be: f(x, s, z, w_be, ws, b, st, pad))
            ms = _median_ms(fns, reps, budget_s)
            rows.append({"type": "conv", "label": label, "shape": [c, o, h, kk, st], "ms": ms})
    for r in rows:
        r["speedup_vs_float32"] = {k: r["ms"]["float32"] / v for k, v in r["ms"].items()}
        ints = {k: v for k, v in r["ms"].items() if k not in ("float32", "bfloat16")}
        r["fastest_int8"] = min(ints, key=ints.get)
    summary = {}
    for t in ("linear", "conv"):
        sel = [r for r in rows if r["type"] == t]
        if not sel:
            continue
        tot = {k: sum(r["ms"][k] for r in sel) for k in sel[0]["ms"]}
        summary[t] = {"total_ms": tot, "speedup_vs_float32": {k: tot["float32"] / v for k, v in tot.items()}}
    return {"rows": rows, "summary": summary, "env": {
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torchao": torchao_version() if torchao else None}}


def table(result: dict) -> str:
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r["ms"]))
    lines = ["| layer | " + " | ".join(f"{k} ms" for k in keys) + " | best int8 vs float32 |",
             "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        best = r["fastest_int8"]
        lines.append(f"| {r['type']} {r['label']} | " + " | ".join(f"{r['ms'][k]:.2f}" if k in r["ms"] else "-" for k in keys)
                     + f" | {best} {r['speedup_vs_float32'][best]:.2f}x |")
    for t, s in result["summary"].items():
        lines.append(f"| **all {t} shapes (sum)** | " + " | ".join(f"{s['total_ms'][k]:.1f}" if k in s["total_ms"] else "-" for k in keys)
                     + " | " + ", ".join(f"{k} {v:.2f}x" for k, v in s["speedup_vs_float32"].items()
                                       if k != "float32") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torchao", action="store_true", help="add torchao's W8A8 recipe to the linear rows")
    p.add_argument("--json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res = compare(small=a.small, quick=a.quick, reps=a.reps, budget_s=2.0 if a.quick else 6.0, torchao=a.torchao)
    print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
