"""quant.fusion: a quantized UNet's transformer blocks sum their sublayers' outputs into
the residual stream inside the output projections, with the values diffusers' blocks give."""
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import mixdq
from mixdq import Calibration, Plan
from mixdq.quant import QuantLinear, kernels
from mixdq.quant.fusion import ResidualTransformerBlock, fuse_residuals, residuals_fused
from conftest import quantize_w7a8, unet_call, unet_call_hooked

PROMPTS = ["a red circle", "a blue square"]


def _block_io(unet):
    """Run the UNet once; each transformer block's input (as the call got it, and a copy
    taken then) and output."""
    seen, hooks = [], []
    for m in unet.modules():
        if isinstance(m, BasicTransformerBlock):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: seen.append([args[0], args[0].clone(), None])))
            hooks.append(m.register_forward_hook(lambda mod, args, out: seen[-1].__setitem__(2, out)))
    unet_call_hooked(unet, hooks)
    return seen


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("backend", ["auto", "int_mm", "onednn", "fbgemm", "float"])
def test_fused_blocks_give_diffusers_values_and_leave_their_input_alone(backend, arch, request, monkeypatch,
                                                                        tmp_path):
    """Quantized on the CPU, every transformer block sums into the residual stream; the UNet
    gives what diffusers' blocks give on the same layers: the same bits where the sums are
    in-place adds (float addition commutes), within float rounding where oneDNN's kernel
    adds its output (its sum post-op).  A block never writes the tensor it was called with."""
    pipe = request.getfixturevalue(f"tiny_{arch}_pipe")
    unet = pipe.unet
    quantize_w7a8(pipe, monkeypatch, tmp_path, backend)
    assert residuals_fused(unet)  # quantize installs it on the CPU
    with kernels.recording() as ran:
        fused = unet_call(unet)
    projections = {id(m) for b in unet.modules() if isinstance(b, BasicTransformerBlock)
                   for m in (b.attn1.to_out[0], b.attn2.to_out[0], b.ff.net[-1])}
    summed_by = {be for layer, be in ran if id(layer) in projections}
    assert summed_by and all(isinstance(layer, QuantLinear) for layer, _ in ran if id(layer) in projections)
    for block_input, copy_at_call, _ in _block_io(unet):
        assert torch.equal(block_input, copy_at_call)
    fuse_residuals(unet, False)
    assert not residuals_fused(unet)
    plain = unet_call(unet)
    if "onednn" in summed_by:
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    else:
        assert torch.equal(fused, plain), summed_by
    fuse_residuals(unet, True)
    assert torch.equal(unet_call(unet), fused)


def test_blocks_outside_inference_run_diffusers_forward(tiny_sdxl_pipe, monkeypatch, tmp_path):
    """With autograd on (training, say) nothing is summed in place: diffusers' own forward."""
    unet = tiny_sdxl_pipe.unet
    quantize_w7a8(tiny_sdxl_pipe, monkeypatch, tmp_path)
    block = next(m for m in unet.modules() if isinstance(m, ResidualTransformerBlock))
    x = torch.randn(1, 5, block.norm1.normalized_shape[0])
    ctx = torch.randn(1, 3, unet.config.cross_attention_dim)
    with torch.no_grad():
        fused = block(x, encoder_hidden_states=ctx)
    calls = []
    monkeypatch.setattr(BasicTransformerBlock, "forward",
                        lambda self, *a, **k: calls.append(1) or fused.clone())
    with torch.enable_grad():
        block(x, encoder_hidden_states=ctx)
    assert calls == [1]


def test_loading_an_export_fuses_on_the_cpu(tiny_sdxl_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "cache"))
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    mixdq.quantize(tiny_sdxl_pipe, Plan({n: (8, 8) for n in names}), Calibration(PROMPTS), progress=False)
    before = unet_call(tiny_sdxl_pipe.unet)
    loaded = mixdq.load_pipeline(mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "export"), device="cpu")
    assert residuals_fused(loaded.unet)
    assert torch.equal(unet_call(loaded.unet), before)


@pytest.mark.parametrize("backend", ["int_mm", "onednn", "fbgemm", "float"])
def test_a_linear_sums_into_the_residual_only_where_nothing_else_can_need_it(backend, monkeypatch, tmp_path):
    from mixdq.plan import LayerBits
    from mixdq.quant.quantizers import ActRange

    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", backend)
    torch.manual_seed(3)
    q = QuantLinear.from_float(torch.nn.Linear(16, 24), LayerBits(7, 8))
    q.kernel = "int_mm"
    q.set_ranges([ActRange(-3.0, 3.0, 1)])
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    with torch.no_grad():
        y = q(x)
    expected = y + r
    with torch.enable_grad():  # autograd may need the residual: a new tensor
        out = q(x, residual=r.clone().requires_grad_())
    assert torch.equal(out, expected)
    with kernels.recording() as ran, torch.no_grad():
        into = r.clone()
        out = q(x, residual=into)
    assert out.data_ptr() == into.data_ptr()  # summed where the residual was
    if ran[0][1] == "onednn":  # oneDNN's own sum
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, expected)
    with torch.no_grad():  # a residual of another dtype or shape is added, not written
        other = r[:, :1].clone()
        assert torch.equal(q(x, residual=other), y + other) and torch.equal(other, r[:, :1])
