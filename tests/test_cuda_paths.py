"""Code that only runs on CUDA, exercised on the CPU: the branch a CUDA tensor takes is
forced, and what would break there (a host sync while a CUDA graph is captured, a
float16 path timed through float32) is refused or checked."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixdq.plan import LayerBits
from mixdq.quant import layers, machine
from mixdq.quant.backends import int_mm, triton_cuda, triton_fp8
from mixdq.quant.backends.reference import conv2d_reference
from mixdq.quant.layers import QuantLinear
from mixdq.quant.quantizers import ActRange


def test_capturing_asks_cuda_only_for_cuda_tensors():
    # a CPU build's torch.cuda.is_current_stream_capturing raises: CPU tensors must not reach it
    assert not layers._capturing(torch.zeros(1))


def test_bos_aware_linear_takes_no_host_sync_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setenv("MIXDQ_KERNEL", "dequant")
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    bos = torch.randn(16)
    layer = QuantLinear.from_float(lin, LayerBits(8, 8), bos_embedding=bos)
    x = torch.randn(2, 5, 16)
    x[:, 0] = bos
    layer.set_ranges([ActRange(float(x.min()), float(x.max()), 1)])

    def refuse(self):
        raise AssertionError("bool() of a tensor: a host sync, which fails a CUDA graph's capture")

    with torch.no_grad():
        eager = layer(x)
        monkeypatch.setattr(layers, "_capturing", lambda t: True)
        monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
        captured = layer(x)
    monkeypatch.undo()
    assert torch.equal(captured[:, 0], eager[:, 0])  # the BOS rows: the exact float output
    torch.testing.assert_close(captured[:, 1:], eager[:, 1:])


def test_int_mm_conv_reads_no_zero_point_on_cuda(monkeypatch):
    """CUDA tensors zero-pad the float input instead of padding codes with the zero point
    read on the host (a sync per call; a CUDA graph's capture refuses it): same result."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9)
    w = torch.randint(-127, 128, (24, 16, 3, 3), dtype=torch.int8)
    ws = torch.rand(24) * 1e-2
    s, z = torch.tensor(0.02), torch.tensor(117.0)
    cpu = int_mm.conv2d_int_mm(x, s, z, w, ws, None, 1, 1)

    class OnCuda(torch.Tensor):
        is_cuda = property(lambda self: True)

    reads = []
    scalar = int_mm._scalar
    monkeypatch.setattr(int_mm, "_scalar", lambda t: reads.append(t) or scalar(t))
    cuda = int_mm.conv2d_int_mm(x.as_subclass(OnCuda), s, z, w, ws, None, 1, 1).as_subclass(torch.Tensor)
    assert reads == []
    assert torch.equal(cuda, cpu)
    torch.testing.assert_close(cpu, conv2d_reference(x, s, z, w, ws, None, 1, 1), rtol=1e-4, atol=1e-4)


class _Outputs(TorchDispatchMode):
    """(dtype, numel) of every op's outputs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, t.numel()))
        return out


def test_cuda_measurement_times_the_float16_path_as_layers_run_it(monkeypatch):
    """machine._measure_cuda's float16 candidates fake-quantize in float16, as a layer's
    float path does (a 0-d scale), not through a float32 copy of the activation, and
    compute the int8 kernels' function."""
    monkeypatch.setattr(machine, "CUDA_LINEAR_SHAPE", (32, 64, 48))
    monkeypatch.setattr(machine, "CUDA_CONV_SHAPE", (16, 24, 8))
    for be in (triton_cuda, triton_fp8):  # the interpreter is slow, and not what is checked here
        monkeypatch.setattr(be, "supports", lambda *a, **k: False)
    with torch.inference_mode():
        paths = machine._cuda_candidates(torch.device("cpu"))
        assert set(paths["linear"]) == {"float16", "int_mm"} and set(paths["conv"]) == {"float16"}
        for kind, numel in (("linear", 32 * 64), ("conv", 16 * 8 * 8)):
            with _Outputs() as ops:
                y = paths[kind]["float16"]()
            assert y.dtype == torch.float16
            wide = [s for s in ops.seen if s[0] == torch.float32 and s[1] >= numel]
            assert not wide, f"{kind}: float32 activation-sized tensors {wide}"
        ref, got = paths["linear"]["float16"]().float(), paths["linear"]["int_mm"]().float()
    assert float((got - ref).norm() / ref.norm()) < 1e-2
