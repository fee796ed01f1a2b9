"""quant.layout: a quantized UNet's activations stay channels_last on the CPU, with the
values diffusers' NCHW path gives."""
import copy
import io

import pytest
import torch

import mixdq
from mixdq import Calibration, Plan
from mixdq.quant import QuantConv2d, quantized_layers
from conftest import quantize_w7a8, unet_call, unet_call_hooked
from mixdq.quant.layout import ChannelsLastTransformer2D, channels_last_kept, keep_channels_last

PROMPTS = ["a red circle", "a blue square"]


def _conv_inputs(unet):
    """Run the UNet once; each conv's input and output, by name."""
    seen, hooks = {}, []
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, QuantConv2d)):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))))
    unet_call_hooked(unet, hooks)
    return seen


def _channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])  # linear projections / 1x1 conv projections
def test_the_float_unet_computes_the_same_with_channels_last_kept(arch, request):
    unet = request.getfixturevalue(f"tiny_{arch}_pipe").unet
    reference = unet_call(unet)
    nchw = _conv_inputs(unet)
    assert keep_channels_last(unet) > 0 and channels_last_kept(unet)
    kept = _conv_inputs(unet)  # convs in the order they ran
    names = [n for n in kept if kept[n][0].shape[-1] > 1]  # 1x1 pixels: both layouts at once
    assert all(_channels_last(kept[n][0]) for n in names)
    assert not any(_channels_last(nchw[n][0]) for n in names)  # the float model, as diffusers runs it
    torch.testing.assert_close(unet_call(unet), reference, rtol=1e-5, atol=1e-5)
    assert keep_channels_last(unet, False) == 0 and not channels_last_kept(unet)
    assert torch.equal(unet_call(unet), reference)  # diffusers' own class back


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("backend", ["auto", "int_mm", "onednn", "float"])
def test_quantized_convs_give_the_same_values_on_either_layout(backend, arch, request, monkeypatch, tmp_path):
    """Each quantized conv, fed the channels_last input it met in the UNet, returns what
    it returns on that input made NCHW: exactly on the integer kernels (7-bit codes, so
    exact on every CPU), within float rounding on the float path."""
    if backend == "onednn" and not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        pytest.skip("this torch build has no oneDNN int8 ops")
    pipe = request.getfixturevalue(f"tiny_{arch}_pipe")
    unet = pipe.unet
    quantize_w7a8(pipe, monkeypatch, tmp_path, backend)
    assert channels_last_kept(unet)  # quantize installs it on the CPU
    layers = quantized_layers(unet)
    ran = {n: (x, out) for n, (x, out) in _conv_inputs(unet).items() if n in layers}
    assert sum(_channels_last(x) for x, _ in ran.values()) > len(ran) // 2
    exact = {n for n, layer in layers.items() if layer._int_path()}
    assert backend == "float" or exact
    with torch.no_grad():
        for name, (x, out) in ran.items():
            again = layers[name](x.contiguous())
            if name in exact:
                assert torch.equal(again, out), name
            else:
                torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5, msg=name)


def test_kept_through_copies_exports_and_compile(tiny_sdxl_pipe, tmp_path):
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    mixdq.quantize(tiny_sdxl_pipe, Plan({n: (8, 8) for n in names}), Calibration(PROMPTS), progress=False)
    unet = tiny_sdxl_pipe.unet
    before = unet_call(unet)
    buf = io.BytesIO()
    torch.save(unet, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(unet), torch.load(buf, weights_only=False)):
        assert channels_last_kept(twin)
        assert torch.equal(unet_call(twin), before)
    loaded = mixdq.load_pipeline(mixdq.save_quantized(tiny_sdxl_pipe, tmp_path / "export"), device="cpu")
    assert channels_last_kept(loaded.unet)
    assert torch.equal(unet_call(loaded.unet), before)
    compiled = unet_call(torch.compile(unet, fullgraph=True, backend="eager"))  # the pre-hook traces too
    # traced int_mm layers round activations near a tie apart from eager's (test_quantize)
    assert float((compiled - before).norm() / before.norm()) < 0.05


def test_other_devices_keep_diffusers_output_path(tiny_sdxl_pipe):
    """Off the CPU the block calls diffusers' own method (here on the meta device)."""
    block = next(m for m in tiny_sdxl_pipe.unet.modules() if type(m).__name__ == "Transformer2DModel")
    keep_channels_last(tiny_sdxl_pipe.unet)
    assert isinstance(block, ChannelsLastTransformer2D)
    n, c, h, w = 1, block.config.in_channels, 4, 4
    with torch.device("meta"):
        hidden = torch.empty(n, h * w, c)
        residual = torch.empty(n, c, h, w)
        block_meta = copy.deepcopy(block).to("meta")
        out = block_meta._get_output_for_continuous_inputs(hidden, residual, n, h, w, c)
    assert out.is_contiguous()  # NCHW, as diffusers makes it
