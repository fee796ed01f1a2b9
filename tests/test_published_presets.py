"""SDXL-Turbo presets made without the weights: from the published architecture (meta device)
and the published sensitivity shipped in presets/sdxl-turbo/.  No test materialises the UNet."""
import json

import pytest

MODEL = "stabilityai/sdxl-turbo"


@pytest.fixture(scope="module")
def sdxl_turbo():
    """The meta-device UNet, its exact layer costs and the shipped published table."""
    import torch

    import mixdq
    from mixdq.architectures import meta_unet
    from mixdq.presets import PRESETS_DIR
    from mixdq.sensitivity_analysis import Sensitivity

    unet = meta_unet(MODEL, torch.float32)   # the presets' sizes are for float32 float parts
    return unet, mixdq.layer_costs(unet), Sensitivity.load(PRESETS_DIR / "sdxl-turbo" / "sensitivity.json")


def test_shipped_presets_are_what_the_published_table_gives(sdxl_turbo, tmp_path):
    """Regenerating from the shipped table gives the shipped plans and numbers, so the files
    in presets/sdxl-turbo/ are the library's own output, not edited by hand."""
    from mixdq.plan import Plan
    from mixdq.presets import PRESETS_DIR, make_published_presets

    unet, costs, sens = sdxl_turbo
    made = make_published_presets(MODEL, out=tmp_path, sens=sens)
    assert [s["preset"] for s in made] == ["mixdq-w8a8-size", "mixdq-w5a8-size", "mixdq-w4a8-size",
                                           "mixdq-w3a8-size"]
    for s in made:
        shipped = PRESETS_DIR / "sdxl-turbo" / f"{s['preset']}.json"
        assert dict(Plan.load(shipped).items()) == dict(Plan.load(tmp_path / shipped.name).items())
        stats = json.loads(shipped.with_name(f"{s['preset']}.stats.json").read_text())
        assert stats["size_mb"] == s["size_mb"] and stats["predicted_loss"] == pytest.approx(s["predicted_loss"])


def test_each_preset_fits_its_budget_with_its_exact_size_and_predicted_loss(sdxl_turbo):
    from mixdq.allocation import Allocator
    from mixdq.published import activation_options
    from mixdq.presets import presets

    unet, costs, sens = sdxl_turbo
    found = presets(unet)
    assert [p.name for p in found] == ["mixdq-w3a8-size", "mixdq-w4a8-size", "mixdq-w5a8-size",
                                       "mixdq-w8a8-size"]  # smallest first; the embedded model's are not listed
    alloc = Allocator(sens, costs, **activation_options(sens))
    lo, hi = alloc.feasible_range_mb()
    for p in found:
        assert p.size_mb == pytest.approx(p.stats["size_mb"], abs=1e-6)   # layer_costs of the meta UNet
        assert lo - 1e-6 <= p.size_mb <= p.stats["budget_mb"] + 1e-6
        assert alloc.predicted_loss(p.plan) == pytest.approx(p.stats["predicted_loss"])
        acts = p.stats["activations"]
        float16 = {n for n, bits in p.plan.items() if bits.act == 16 and bits.weight != 16}
        assert float16 <= set(acts["float16"]) and acts["in_both"] == sum(
            v["kept"] for v in acts["publication_float16"].values())
    sizes = [p.size_mb for p in found]
    losses = [p.stats["predicted_loss"]["total"] for p in found]
    assert sizes == sorted(sizes) and losses == sorted(losses, reverse=True)  # more memory, less loss


def test_embedded_presets_do_not_list_the_sdxl_turbo_ones():
    import mixdq
    from mixdq.presets import presets

    pipe = mixdq.load_pipeline()
    assert {p.name for p in presets(pipe.unet)} == {"mixdq-w8a8-size", "mixdq-w5a8-size", "mixdq-w4a8-size",
                                                    "mixdq-w3a8-size"}
    assert all(p.stats.get("model") != MODEL for p in presets(pipe.unet))


def test_published_presets_refuse_a_model_without_a_publication(tmp_path):
    from mixdq.errors import MixDQError
    from mixdq.presets import make_published_presets

    with pytest.raises(MixDQError, match="no published presets for 'someone/else'.*stabilityai/sdxl-turbo"):
        make_published_presets("someone/else", out=tmp_path)


def test_another_architecture_gets_no_presets_even_where_its_layer_names_fit(tiny_sdxl_pipe):
    """The embedded model's layer names are a subset of SDXL's: presets are found by the
    architecture (published, or the embedded one), never by names alone."""
    from mixdq.architectures import build_meta, unet_config
    from mixdq.presets import PRESETS_DIR, presets, presets_folder

    assert presets_folder(tiny_sdxl_pipe.unet) is None and presets(tiny_sdxl_pipe.unet) == []
    sdxl_base = build_meta({**unet_config(MODEL), "sample_size": 128})    # SDXL 1.0 base: 1024 px
    assert presets_folder(sdxl_base) is None and presets(sdxl_base) == []
    assert [p.name for p in presets(sdxl_base, PRESETS_DIR / "sdxl-turbo")]  # an explicit folder is taken
