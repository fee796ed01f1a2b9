"""Which INT8 kernel runs W8A8 layers on this device: one small dispatch.

The machines differ (see README): on an EPYC with AVX-512 VNNI `torch._int_mm`
is several times faster than float32 matmul, on an AVX2-only EPYC it is 30-100x
slower.  So the choice is measured once per machine (a ~0.1 s micro-benchmark,
cached on disk) instead of assumed.  Override with MIXDQ_KERNEL=int_mm|dequant
or `select_kernel(device, override=...)`.

Paths:
  int_mm   activations quantized to int8, `torch._int_mm` against int8
           weights, epilogue s_a * s_w * (acc - z * sum(W)) + bias.
  dequant  weights dequantized on the fly, activations fake-quantized, float
           matmul: the reference, and the path every non-W8A8 layer takes.
"""
from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS = ("int_mm", "dequant")


def cache_dir() -> Path:
    return Path(os.environ.get("MIXDQ_CACHE", Path.home() / ".cache" / "mixdq"))


def _cpu_id() -> str:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}"


def _time(fn, repeat=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _measure_cpu() -> dict:
    """Time int8 GEMM (with its activation quantization) against float32 GEMM."""
    m, k, n = 1024, 640, 640
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)

    def int_path():
        xq = torch.clamp(torch.round(x / 0.05) + 3, 0, 255).sub_(128).to(torch.int8)
        return torch._int_mm(xq, wq.t()).float() * 0.01

    t_float = _time(lambda: F.linear(x, w))
    try:
        t_int = _time(int_path)
    except RuntimeError:
        t_int = float("inf")
    return {"float32_s": t_float, "int_mm_s": t_int,
            "kernel": "int_mm" if t_int < t_float else "dequant"}


@lru_cache(maxsize=None)
def _cpu_choice() -> dict:
    path = cache_dir() / "kernels.json"
    key = _cpu_id()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = _measure_cpu()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs a re-measure next time
    return table[key]


def select_kernel(device: torch.device | str = "cpu", override: str | None = None) -> str:
    """The W8A8 path for `device`: 'int_mm' or 'dequant'."""
    choice = override or os.environ.get("MIXDQ_KERNEL")
    if choice:
        if choice not in KERNELS:
            raise ValueError(f"unknown kernel {choice!r}; choose one of {KERNELS}")
        return choice
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "int_mm" if major >= 8 else "dequant"
    if device.type == "cpu":
        return _cpu_choice()["kernel"]
    return "dequant"


def kernel_report(device="cpu") -> dict:
    """What the dispatch decided and why, for logs, the app and RESULTS.md."""
    device = torch.device(device)
    report = {"device": str(device), "kernel": select_kernel(device)}
    if device.type == "cpu":
        report["cpu"] = _cpu_id()
        report.update({k: v for k, v in _cpu_choice().items() if k != "kernel"})
    elif device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    return report


def int_mm_usable(x2d: torch.Tensor, weight_q: torch.Tensor) -> bool:
    """CUDA's _int_mm needs M > 16 and K, N multiples of 8; CPU takes any shape."""
    if x2d.device.type != "cuda":
        return True
    m, k = x2d.shape
    return m > 16 and k % 8 == 0 and weight_q.shape[0] % 8 == 0


def int8_linear(x: torch.Tensor, act_scale: torch.Tensor, act_zero_point: torch.Tensor,
                weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """y = s_a * s_w * (Xq - z) Wq^T + b, computed as an int8 x int8 -> int32 GEMM.

    Activation codes live in [0, 255]; shifting both codes and zero point by
    128 puts them in int8 without changing (Xq - z).
    """
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    xq = torch.clamp(torch.round(x2d / act_scale) + act_zero_point, 0, 255).sub_(128).to(torch.int8)
    acc = torch._int_mm(xq, weight_q.t())
    zp = act_zero_point - 128
    # sum over K of W: the zero-point correction; cheap next to the GEMM
    row_sum = weight_q.sum(dim=1, dtype=torch.int32)
    y = (acc - zp.to(torch.int32) * row_sum).to(torch.float32) * (act_scale * weight_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], weight_q.shape[0])
