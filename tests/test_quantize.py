"""End to end on small random SDXL and SD1.5 pipelines: quantize, generate, measure."""
import math

import pytest
import torch

import mixdq
from mixdq import Calibration, LayerBits, Plan, PlanError
from mixdq.quant import backends as B
from mixdq.quant import kernels, machine, quantized_layers, shortcut_splits
from mixdq.quantization import wide_int8_layers

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a cat"]


def _gen(pipe, prompt="a red circle", seed=0, **kw):
    settings = mixdq.generation_defaults(pipe) | kw
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=g, output_type="pt", **settings).images


def _mixed_plan(unet):
    names = list(mixdq.quantizable_layers(unet))
    cycle = [(8, 8), (4, 8), (2, 8), (16, 8), (8, 16), (3, 6), (5, 4), (16, 16)]
    return Plan({n: cycle[i % len(cycle)] for i, n in enumerate(names)})


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_quantize_and_generate(arch, request):
    pipe = request.getfixturevalue(f"tiny_{arch}_pipe")
    ref = _gen(pipe)
    costs = mixdq.layer_costs(pipe.unet)
    plan = _mixed_plan(pipe.unet)
    report = mixdq.quantize(pipe, plan, Calibration(PROMPTS, batch_size=2), progress=False)
    out = _gen(pipe)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    # measured bytes: exactly the tensors stored, exactly the prediction, smaller than float;
    # held at run time: plus what prepacked int8 copies of 2-4-bit layers hold (oneDNN / FBGEMM)
    extra = sum(math.prod(q.weight_shape) - q.weight_packed.nbytes for q in quantized_layers(pipe.unet).values()
                if q.backend in B.PREPACKED and q.weight_bits < 5)
    assert mixdq.model_nbytes(pipe.unet) == report.held_bytes == report.quantized_bytes + extra
    stored = sum(t.nbytes for t in pipe.unet.state_dict().values())
    assert stored == report.quantized_bytes == costs.total_bytes(report.plan) == costs.total_bytes(plan)
    assert stored < report.float_bytes
    assert (extra > 0) == any("int8 copies" in n for n in report.notes)
    # every quantized layer got a calibrated range, and lost its float weight
    layers = quantized_layers(pipe.unet)
    assert len(layers) == len(plan.quantized())
    for name, layer in layers.items():
        if layer.act_bits != 16:
            assert all(r.batches > 0 for r in layer.ranges), name
            assert layer.act_scale.min() > 0
        if layer.weight_bits != 16:
            assert not hasattr(layer, "weight") or layer.weight is None
    # the plan quantize reports is the plan the layers run (W8A8 stored as W7A8 where
    # this machine's int8 backend saturates on 8-bit codes, same bytes)
    assert mixdq.current_plan(pipe.unet) == Plan(report.plan.quantized())
    changed = {n for n, b in plan.items() if b != report.plan[n]}
    assert changed == set(wide_int8_layers(plan, report.kernel["kernel"], pipe.unet))
    assert all(plan[n] == LayerBits(8, 8) and report.plan[n] == LayerBits(7, 8)
               and machine.saturates(layers[n].backend, "conv" if layers[n].op == "conv" else "linear")
               for n in changed)


def test_w8a8_close_and_bits_order(tiny_sdxl_dir):
    ref_pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    ref = _gen(ref_pipe)
    names = list(mixdq.quantizable_layers(ref_pipe.unet))
    errors = {}
    for w in (8, 4, 2):
        pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
        mixdq.quantize(pipe, Plan.uniform(names, w, 16), progress=False)
        errors[w] = (_gen(pipe) - ref).pow(2).mean().item()
    assert errors[8] < errors[4] < errors[2]


def test_int_mm_and_dequant_kernels_agree(tiny_sdxl_dir):
    """Layer by layer the integer kernels equal the dequantized reference to float
    rounding; end to end, a rare rounding tie that flips one 8-bit code may propagate,
    so images are compared by PSNR."""
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    names = list(mixdq.quantizable_layers(pipe.unet))
    plan = Plan({n: [(8, 8), (4, 8), (2, 8)][i % 3] for i, n in enumerate(names)})
    report = mixdq.quantize(pipe, plan, Calibration(PROMPTS), kernel="int_mm", progress=False)
    assert report.kernel["kernel"] == "int_mm"
    layers = quantized_layers(pipe.unet)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach().clone()))
             for n, m in layers.items()]
    images = {"int_mm": _gen(pipe)}
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for name, layer in layers.items():
            out_int = layer(inputs[name])
            layer.kernel = "dequant"
            out_ref = layer(inputs[name])
            scale = out_ref.abs().max().item() + 1e-6
            assert (out_int - out_ref).abs().max().item() <= 2e-3 * scale, name
    images["dequant"] = _gen(pipe)
    from mixdq.metrics import psnr

    assert float(psnr(images["int_mm"], images["dequant"])) > 20


@pytest.mark.parametrize("kind", machine.CPU_KINDS)
def test_w8a8_layers_become_w7a8_where_int8_kernels_saturate(tiny_sdxl_dir, monkeypatch, tmp_path, kind):
    """On oneDNN, decided for each CPU kind (MIXDQ_CPU): where it saturates on 8-bit codes
    (always without VNNI) quantize stores the plan's W8A8 layers as W7A8 (same bytes,
    every layer on the integer kernels) and says so; int8_safe=False keeps them W8A8 on
    the float path and says what that costs and what to use instead.  Where oneDNN is
    exact (VNNI) the plan is stored as it is."""
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_CPU", kind)
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", "onednn")
    monkeypatch.delenv("MIXDQ_INT8_SATURATE", raising=False)
    monkeypatch.setenv("MIXDQ_ATTENTION", "float")  # its note is not this test's (test_attention.py)
    cal = Calibration(PROMPTS[:2])
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    names = list(mixdq.quantizable_layers(pipe.unet))
    plan = Plan({n: [(8, 8), (7, 8), (8, 16)][i % 3] for i, n in enumerate(names)})
    n8 = sum(1 for b in plan.values() if b == LayerBits(8, 8))
    n_int = sum(1 for b in plan.values() if b.act == 8)
    saturating = machine.saturates("onednn") or machine.saturates("onednn", "conv")
    assert saturating == (kind == "avx2" or machine.probe_saturates("onednn"))
    report = mixdq.quantize(pipe, plan, cal, kernel="int_mm", progress=False)
    assert mixdq.current_plan(pipe.unet) == report.plan
    assert report.int8_layers == n_int and report.backends.get("onednn") == n_int
    if not saturating:
        assert report.plan == plan and report.notes == []
        return
    assert {str(b) for b in report.plan.values()} == {"W7A8", "W8A16"}  # weight-only layers keep 8
    assert report.quantized_bytes == mixdq.layer_costs(mixdq.load_pipeline(tiny_sdxl_dir).unet).total_bytes(plan)
    assert len(report.notes) == 1 and f"{n8} W8A8 layers were quantized as W7A8" in report.notes[0]
    assert "--keep-w8" in str(report) and report.plan.meta["fitted"]["layers"] == n8
    assert pipe.unet.mixdq_state.fitted == {"layers": n8, "from": "W8A8", "to": "W7A8"}

    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    report = mixdq.quantize(pipe, plan, cal, kernel="int_mm", int8_safe=False, progress=False)
    assert report.plan == plan
    assert report.int8_layers == n_int - n8 and report.backends["float"] == len(plan) - n_int + n8
    assert len(report.notes) == 1 and f"{n8} W8A8 layers run the exact float path" in report.notes[0]
    # the dequant kernel (e.g. a GPU's choice) never saturates: nothing changes there
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    report = mixdq.quantize(pipe, plan, cal, kernel="dequant", progress=False)
    assert report.plan == plan and report.notes == [] and report.backends == {"float": len(plan)}


def test_each_layer_runs_the_backend_the_dispatch_chose(tiny_sdxl_dir, monkeypatch, tmp_path):
    """One generation per backend that can be forced here: every quantized layer runs, and
    only on the backend it resolved (recorded), which is the forced one for its type
    wherever an int8 kernel applies (auto: the dispatch's choice); prepacked layers hold
    only their copy from quantize on (no prepacking in the first step)."""
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    cal = Calibration(PROMPTS[:1])
    forced = ["int_mm", "onednn"] + (["fbgemm"] if "fbgemm" in torch.backends.quantized.supported_engines else [])
    for backend in forced + ["auto"]:
        monkeypatch.setenv("MIXDQ_INT8_BACKEND", backend)
        pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
        report = mixdq.quantize(pipe, _mixed_plan(pipe.unet), cal, kernel="int_mm", progress=False)
        layers = quantized_layers(pipe.unet)
        with kernels.recording() as ran:
            _gen(pipe)
        by_layer = {}
        for layer, be in ran:
            by_layer.setdefault(id(layer), set()).add(be)
        for name, layer in layers.items():
            assert by_layer[id(layer)] == {layer.backend}, (backend, name)
            op = "conv" if layer.op == "conv" else "linear"
            if layer.act_bits != 8 or layer.weight_bits > 8:  # no int8 kernel for these
                assert layer.backend == "float", name
            elif backend != "auto" and not (op == "conv" and backend == "fbgemm"):
                assert layer.backend == backend, (backend, name, layer.bits)
            else:
                assert layer.backend == kernels.layer_backend(layer.op, layer.weight_bits, 8, "cpu", "int_mm",
                                                              layer.weight_shape, layer.groups), name
            if layer.backend in B.PREPACKED:
                assert layer._held_prepacked is not None, name
        assert sum(report.backends.values()) == len(layers)


def test_sequential_calibration_sees_quantized_upstream(tiny_sdxl_dir):
    """Ranges differ from the float model's ranges once upstream layers are quantized."""
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    cal = Calibration(PROMPTS[:2])
    float_r = mixdq.float_ranges(pipe, cal, progress=False)
    names = list(mixdq.quantizable_layers(pipe.unet))
    mixdq.quantize(pipe, Plan.uniform(names, 2, 4), cal, progress=False)
    layers = quantized_layers(pipe.unet)
    changed = sum(abs(layers[n].ranges[0].hi - float_r[n][0].hi) > 1e-6 for n in names[5:])
    assert changed > len(names) // 2
    # float ranges: every layer, BOS-excluded K/V, two slices for the split shortcuts
    assert set(float_r) == set(names)
    for name, split in shortcut_splits(pipe.unet).items():
        assert len(float_r[name]) == 2


def test_errors(tiny_sdxl_pipe):
    names = list(mixdq.quantizable_layers(tiny_sdxl_pipe.unet))
    with pytest.raises(PlanError, match="calibration"):
        mixdq.quantize(tiny_sdxl_pipe, Plan.uniform(names, 8, 8), progress=False)
    with pytest.raises(PlanError, match="not a quantizable layer"):
        mixdq.quantize(tiny_sdxl_pipe, Plan({"nope": (8, 16)}), progress=False)
    mixdq.quantize(tiny_sdxl_pipe, Plan.uniform(names, 8, 16), progress=False)
    with pytest.raises(PlanError, match="already quantized"):
        mixdq.quantize(tiny_sdxl_pipe, Plan.uniform(names, 8, 16), progress=False)


def test_bos_token_exact_in_pipeline(tiny_sdxl_pipe):
    """Token 0 of every cross-attention K/V equals the float projection of BOS."""
    pipe = tiny_sdxl_pipe
    bos = mixdq.bos_embedding(pipe)
    emb = pipe.encode_prompt(prompt="a blue square", device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.equal(emb[0, 0], bos)  # causal CLIP: BOS state is prompt-independent
    names = [n for n in mixdq.quantizable_layers(pipe.unet) if n.endswith("attn2.to_k")]
    floats = {n: pipe.unet.get_submodule(n) for n in names}
    expected = {n: m(emb) for n, m in floats.items()}
    mixdq.quantize(pipe, Plan.uniform(names, 4, 8), Calibration(PROMPTS), progress=False)
    for n in names:
        out = pipe.unet.get_submodule(n)(emb)
        torch.testing.assert_close(out[:, 0], expected[n][:, 0], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, 1:], expected[n][:, 1:], atol=1e-6)


def test_zeroed_negative_prompt_with_guidance(tiny_sdxl_pipe):
    """SDXL zeroes the negative embedding for an empty negative prompt: no BOS there."""
    pipe = tiny_sdxl_pipe
    names = list(mixdq.quantizable_layers(pipe.unet))
    assert pipe.config.force_zeros_for_empty_prompt
    mixdq.quantize(pipe, Plan.uniform(names, 8, 8), Calibration(PROMPTS, guidance_scale=3.0),
                   progress=False)
    out = _gen(pipe, guidance_scale=3.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["int_mm", "onednn", "fbgemm"])
def test_quantized_unet_compiles_whole_on_each_backend(tiny_sdxl_dir, monkeypatch, tmp_path, backend):
    """torch.compile(unet, fullgraph=True) of a quantized UNet, each backend forced: no graph
    break (BOS-aware K/V, int_mm convs, the prepacked backends' custom ops), as close to the
    float UNet as eager is (fbgemm: linears only, convs take the measured backend)."""
    if backend == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fbgemm not in this torch build")
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXDQ_INT8_BACKEND", backend)
    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    names = list(mixdq.quantizable_layers(pipe.unet))
    plan = Plan({n: [(8, 8), (4, 8), (7, 8)][i % 3] for i, n in enumerate(names)})
    emb, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor(999),
                  encoder_hidden_states=emb,
                  added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[16., 16, 0, 0, 16, 16]])})
    with torch.no_grad():
        ref = pipe.unet(**inputs).sample
    report = mixdq.quantize(pipe, plan, Calibration(PROMPTS[:1]), kernel="int_mm", progress=False)
    assert report.backends.get(backend, 0) > 0
    mixdq.quant.hold_epilogue(pipe.unet)
    with torch.no_grad():
        eager = pipe.unet(**inputs).sample
        torch._dynamo.reset()
        compiled = torch.compile(pipe.unet, backend="aot_eager", fullgraph=True)(**inputs).sample
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # traced int_mm layers round a few activations (those near a tie) apart from eager's
    # quantize_per_tensor, and the flips compound over the UNet (per layer: <= 1e-6,
    # test_int8_ops); the prepacked backends run the same kernels traced as eager
    assert rel(compiled, eager) < 0.05 and abs(rel(compiled, ref) - rel(eager, ref)) < 0.1 * rel(eager, ref)
    if backend == "onednn":
        assert torch.equal(compiled, eager)


def test_report_shows_the_measurement_behind_the_backend_choice():
    """A GPU's per-layer-type times (`times_s`) or a CPU's (`linear_s` /
    `conv_s`) are printed with the report, fastest first; a kernel record without times
    prints none."""
    import dataclasses

    from mixdq.quantization import QuantReport

    gpu = QuantReport(Plan({}), 10, 5, {"times_s": {"linear": {"float16": 1.7e-4, "triton": 1.1e-4, "int_mm": 1.9e-4},
                                                   "conv": {"float16": 2e-4, "triton": 3e-4}}}, 0.0, 0.0, True)
    assert ("backends measured here: linear: triton 0.11 ms, float16 0.17 ms, int_mm 0.19 ms; "
            "conv: float16 0.2 ms, triton 0.3 ms") in str(gpu)
    cpu = dataclasses.replace(gpu, kernel={"linear_s": {"float32": 9e-3, "onednn": 4.2e-3}, "linear_backend": "onednn"})
    assert "backends measured here: linear: onednn 4.2 ms, float32 9 ms" in str(cpu)
    assert "measured here" not in str(dataclasses.replace(gpu, kernel={"reason": "VNNI: avx512_vnni"}))


def test_observing_float_ranges_holds_no_second_copy_of_the_weights(tiny_sdxl_pipe):
    """Calibration runs the float UNet through the quantized layers' code kept in float:
    those layers use the float layers' own weight tensors, so an SDXL-size UNet is not
    held twice while its ranges are observed; every layer's range is still observed."""
    from mixdq.architectures import sample_inputs
    from mixdq.calibrate import observe_float_ranges
    from mixdq.quant import quantizable_layers
    from mixdq.quant.layers import QuantLayer

    unet = tiny_sdxl_pipe.unet
    own = {n: m.weight.data_ptr() for n, m in quantizable_layers(unet).items()}
    inputs = sample_inputs(unet)
    seen = {}

    def run():
        for n, m in unet.named_modules():
            if isinstance(m, QuantLayer):
                seen[n] = m.weight.data_ptr()
        with torch.no_grad():
            unet(**inputs)

    ranges = observe_float_ranges(unet, run)
    assert seen == own
    assert set(ranges) == set(own) and all(r.batches > 0 for rs in ranges.values() for r in rs)
