"""What the CPU and GPU benchmarks share (bench/run.py, bench/gpu.py): process memory
probes, the environment record, the benchmarked plans, and building a quantized
variant beside the float UNet the way `mixdq.quantize_unet` builds it."""
from __future__ import annotations

import gc
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MB = 1_000_000
MiB = 1 << 20


# ---------------------------------------------------------------------------
# process memory
# ---------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def fix_malloc_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation >= nbytes by mmap and return it to the OS on free.

    glibc raises its mmap threshold after frees (up to 32 MiB), after which freed
    tensors stay in the heap and count in the resident set: peaks read from
    VmHWM then include memory no tensor holds.  Fixing the threshold makes
    the resident set follow live tensors; small allocations are unaffected.
    """
    try:
        import ctypes
        M_MMAP_THRESHOLD = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except Exception:
        return False


def trim():
    gc.collect()
    try:  # give freed heap pages back so RSS deltas mean something
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


# ---------------------------------------------------------------------------
# environment record
# ---------------------------------------------------------------------------
def environment(device: str, argv=None, prog: str = "python -m bench.run") -> dict:
    from mixdq.quant import kernels, machine

    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": prog + " " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": machine.cpu_capability(),
    }
    for mod in ("diffusers", "transformers", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()

        env["git_commit"] = git("rev-parse", "--short", "HEAD")
        if env["git_commit"] and git("status", "--porcelain", "--untracked-files=no"):
            env["git_commit"] += " + uncommitted changes"  # what ran is not exactly that commit
    except Exception:
        env["git_commit"] = None
    try:
        env["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["kernel_dispatch"] = {k: v for k, v in kernels.kernel_report("cpu").items()
                                  if k in ("kernel", "linear_backend", "conv_backend", "packed_linear_backend",
                                           "packed_conv_backend", "reason")}
    return env


# ---------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------
def _sensitive(name: str) -> bool:
    """Layers MixDQ's search keeps at 8 bits almost always: the text-facing
    cross-attention K/V, the first / last convs, the embeddings, the shortcuts."""
    return (name.endswith(("attn2.to_k", "attn2.to_v")) or name in ("conv_in", "conv_out")
            or name.startswith(("time_embedding", "add_embedding")) or "conv_shortcut" in name)


def mixed_plan(layers: dict, target_bits: float, low: int, act: int = 8, lowest: int | None = None):
    """A deterministic mixed plan with parameter-weighted mean weight bits ~target.

    Sensitive layers stay at 8 bits; the largest remaining layers drop to `low`
    bits until the mean reaches the target; if it cannot (the 8-bit layers keep
    it above), the largest low-bit layers drop further to `lowest`.
    Stands in for a searched plan: memory and speed depend on how many weights
    sit at which width, not on which exact layers.
    """
    from mixdq import Plan

    numel = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(numel.values())
    bits = {n: 8 for n in layers}

    def mean():
        return sum(bits[n] * numel[n] for n in layers) / total

    order = sorted((n for n in layers if not _sensitive(n)), key=lambda n: -numel[n])
    for n in order:
        if mean() <= target_bits:
            break
        bits[n] = low
    if lowest is not None:
        for n in order:
            if mean() <= target_bits:
                break
            if bits[n] == low:
                bits[n] = lowest
    plan = Plan({n: (b, act) for n, b in bits.items()},
                meta={"mean_weight_bits": round(mean(), 3), "kind": f"mixed ~W{target_bits:g}A{act}"})
    return plan


KEEP_W8 = "-keep-w8"  # variant suffix: quantize(int8_safe=False): W8A8 layers stay 8-bit everywhere
FLOAT_ATTENTION = "-float-attention"  # variant suffix: quantized with MIXDQ_ATTENTION=float
ON = "@"  # variant suffix: W8A8@onednn is W8A8 quantized with MIXDQ_INT8_BACKEND=onednn


def split_variant(v: str) -> tuple[str, str | None]:
    """'W8A8@onednn' -> ('W8A8', 'onednn'); 'W8A8' -> ('W8A8', None)."""
    base, _, backend = v.partition(ON)
    return base, backend or None


class forced_env:
    """Environment variables set while one variant is quantized (layers resolve their
    backend, and the UNet its attention, then, once); a None value leaves the
    library's own choice."""

    def __init__(self, **values: str | None):
        self.values = {k: v for k, v in values.items() if v is not None}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forced_backend(value: str | None) -> forced_env:
    """MIXDQ_INT8_BACKEND=value while one variant is quantized (None: the library's choice)."""
    return forced_env(MIXDQ_INT8_BACKEND=value)


def make_plans(layers: dict, variants) -> dict:
    from mixdq import Plan

    names = list(layers)
    out = {}
    for v in variants:
        if v == "W8A8":
            out[v] = Plan.uniform(names, 8, 8, meta={"mean_weight_bits": 8})
        elif v == "W5A8":
            out[v] = mixed_plan(layers, 5.0, 4)
        elif v == "W4A8":
            out[v] = mixed_plan(layers, 4.0, 4, lowest=2)
        elif v == "W7A8":  # 7-bit codes: exact on the int8 kernels of CPUs without VNNI
            out[v] = Plan.uniform(names, 7, 8, meta={"mean_weight_bits": 7})
        elif v == "W4A16":
            out[v] = Plan.uniform(names, 4, 16, meta={"mean_weight_bits": 4})
        elif v.endswith((KEEP_W8, FLOAT_ATTENTION)) or ON in v:
            base = split_variant(v)[0].removesuffix(FLOAT_ATTENTION).removesuffix(KEEP_W8)
            out[v] = make_plans(layers, [base])[base]
        else:
            raise ValueError(f"unknown variant {v!r}")
    return out


def observe_ranges(unet, inputs) -> tuple[dict, float, torch.Tensor]:
    """One float step observed by the library (calibrate.observe_float_ranges): each
    quantizable layer's activation ranges, the step's seconds and output.  Token 0
    of the text input stands in for CLIP's BOS (bench_bos)."""
    from mixdq.calibrate import observe_float_ranges

    step = {}

    def run():
        t = time.perf_counter()
        with torch.inference_mode():
            step["out"] = unet(**inputs).sample
        step["s"] = time.perf_counter() - t

    ranges = observe_float_ranges(unet, run, bos=bench_bos(inputs))
    return ranges, step["s"], step["out"]


def bench_bos(inputs) -> torch.Tensor:
    """The BOS embedding BOS-aware K/V keep exact: token 0 of the step's text input
    (random here; a pipeline's is its encoders' BOS state, the same for every prompt)."""
    return inputs["encoder_hidden_states"][0, 0].detach().clone()


def build_variant(unet, plan, ranges, int8_safe: bool = True, bos=None, kernel=None, backend=None,
                  attention=None):
    """The quantized variant as `mixdq.quantize` makes it (mixdq.quantize_unet: W8A8
    layers as W7A8 where their int8 backend saturates on 8-bit codes, prepacked
    copies made layer by layer), sharing the float model's unquantized tensors.
    backend, attention: MIXDQ_INT8_BACKEND / MIXDQ_ATTENTION values for this variant (None:
    the library's choice)."""
    from mixdq import model_nbytes, quantize_unet
    from mixdq.measure import shared_copy

    trim()
    rss0 = rss_bytes()
    t = time.perf_counter()
    clone = shared_copy(unet)
    with torch.no_grad(), forced_env(MIXDQ_INT8_BACKEND=backend, MIXDQ_ATTENTION=attention):
        report = quantize_unet(clone, plan, ranges, bos=bos, kernel=kernel, int8_safe=int8_safe)
    dt = time.perf_counter() - t
    trim()
    rss1 = rss_bytes()
    # bytes this variant holds on its own: its quantized layers (the rest is
    # shared with the float model, counted in its float bytes), prepacked copies
    # included; stored_bytes: what the plan stores (= layer_costs, exports)
    return clone, {
        "plan": report.plan.summary(), "mean_weight_bits": plan.meta.get("mean_weight_bits"),
        "quantize_s": dt, "weight_bytes": model_nbytes(clone), "stored_bytes": report.quantized_bytes,
        "rss_delta_bytes": None if rss0 is None else rss1 - rss0,
        "kernel": report.kernel["kernel"], "routed_int8_layers": report.int8_layers, "backends": report.backends,
        "attention": report.attention,
        "w8a8_as_w7a8_layers": report.plan.meta.get("fitted", {}).get("layers", 0),
    }
