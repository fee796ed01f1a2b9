"""Published architectures and sensitivity tables measured elsewhere: the architecture
identity, the import of the MixDQ authors' files, and how a pipeline finds such a table.

The real SDXL-Turbo is only ever built on the meta device here (shapes, no memory); where
weights are needed, the embedded tiny model stands in, with a published-style table written
for its architecture."""
import json
import math
from pathlib import Path

import pytest
import torch

import mixdq
from mixdq import architectures as A
from mixdq import published as P
from mixdq import sensitivity_analysis as S
from mixdq import tables
from mixdq.sensitivity_analysis import layer_group

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "presets" / "sdxl-turbo" / "sensitivity.json"
# The MixDQ authors' files as the checkout's sibling folder holds them (not on a clean clone).
AUTHORS = ROOT.parent / "shared" / "mixdq-official-sdxl-turbo"
SDXL = "stabilityai/sdxl-turbo"
TINY_ID = "test/tiny-sdxl"
TINY_SOURCE = {"measured_by": "a test", "repository": "example/tiny-tables", "commit": "0" * 40,
               "calibration": {"prompts": 32, "settings": {"num_inference_steps": 1, "guidance_scale": 0.0}}}


@pytest.fixture(scope="module")
def embedded():
    return mixdq.load_pipeline(None, device="cpu")


@pytest.fixture(scope="module")
def sdxl_meta():
    return A.meta_unet(SDXL, dtype=torch.float16)


def _meta_copy(unet):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet.config)


# --------------------------------------------------------------------------------------------
# Architectures.
# --------------------------------------------------------------------------------------------
def test_published_architectures_build_on_meta_with_their_parameter_counts(sdxl_meta):
    from bench import configs

    assert sum(p.numel() for p in sdxl_meta.parameters()) == A.expected_params(SDXL)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in sdxl_meta.parameters())
    costs = mixdq.layer_costs(sdxl_meta)          # exact bytes from shapes alone
    assert len(costs.float_bytes) == 794
    assert round(costs.float_mb()) == 5135       # the float16 UNet
    # the benchmarks build the same architectures (one source: the library's)
    for short, hub in configs.HUB_IDS.items():
        assert configs.config(short) == A.unet_config(hub)
        assert configs.expected_params(short) == A.expected_params(hub)
    with pytest.raises(ValueError, match="no published architecture known for 'me/mine'.*stabilityai/sdxl-turbo"):
        A.meta_unet("me/mine")


def test_architecture_hash_is_the_architecture_not_its_spelling(sdxl_meta, embedded):
    h = A.architecture_hash(sdxl_meta)
    assert A.architecture_hash(A.unet_config(SDXL)) == h
    assert A.architecture_hash(A.meta_unet(SDXL, dtype=torch.float32)) == h   # dtype is not architecture
    # config.json as the hub writes it: every default spelled out, loader keys, SDXL's
    # "upcast_attention": null (diffusers reads it as its default, False)
    full = {**dict(sdxl_meta.config), "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.24.0.dev0",
            "_name_or_path": "/cache/snapshots/abc/unet", "upcast_attention": None}
    assert A.architecture_hash(full) == h
    # what does change it: SDXL base's 1024 px, another model, a real architecture field
    assert A.architecture_hash({**A.unet_config(SDXL), "sample_size": 128}) != h
    assert A.architecture_hash(A.unet_config("stabilityai/sd-turbo")) != h
    assert A.architecture_hash({**A.unet_config(SDXL), "upcast_attention": True}) != h
    assert A.published_model_for(sdxl_meta) == SDXL
    # a loaded model (config.json from disk) and the same config built on meta: one architecture
    assert A.architecture_hash(embedded.unet) == A.architecture_hash(_meta_copy(embedded.unet))
    assert A.published_model_for(embedded.unet) is None


def test_activation_numel_is_what_the_sensitivity_analysis_records(embedded, sdxl_meta):
    # the shipped table of the embedded model was measured through its pipeline
    measured = json.loads((ROOT / "presets" / "sensitivity.json").read_text())["act_numel"]
    assert A.activation_numel(_meta_copy(embedded.unet)) == measured
    numel = A.activation_numel(sdxl_meta)
    assert len(numel) == 794
    assert numel["conv_in"] == 4 * 64 * 64                        # 512 px latents
    assert numel["time_embedding.linear_1"] == 320
    assert numel["add_embedding.linear_1"] == 2816
    k = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert numel[k] == 77 * 2048                                 # the text, not the image
    assert numel[k.replace("attn2.to_k", "attn2.to_q")] == 16 * 16 * 1280   # 64 / 4 latents, 1280 channels


# --------------------------------------------------------------------------------------------
# The importer, on synthetic files for the embedded model's architecture.
# --------------------------------------------------------------------------------------------
def _write_tables(folder: Path, names, *, drop=None, extra=None, content=None, bad=None):
    """MixDQ-style YAML files: `model.` + name -> [score at 2, 4, 8 bits]."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    content = content if content is not None else [n for n in names if layer_group(n) == "content"]
    for kind in P.KINDS:
        for metric, rows in (("sqnr", names), ("ssim", content)):
            data = {}
            for n in rows:
                if n == drop:
                    continue
                base = names.index(n) / 1000 + (0.5 if kind == "act" else 0.0)
                data[f"model.{n}"] = ([10 + base, 25 + base, 45 + base] if metric == "sqnr"
                                      else [0.9 + base / 100, 0.99 + base / 1000, 0.999])
            if extra:
                data[f"model.{extra}"] = [1.0, 2.0, 3.0]
            if bad and (kind, metric) == bad[0]:
                data[f"model.{bad[1]}"] = bad[2]
            (folder / f"{kind}-{metric}.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_import_maps_lists_to_bits_and_groups(embedded, tmp_path):
    names = list(mixdq.quantizable_layers(embedded.unet))
    folder = _write_tables(tmp_path / "t", names)
    sens = P.import_mixdq_tables(folder, TINY_ID, unet=_meta_copy(embedded.unet), source=TINY_SOURCE)
    assert sens.layers == names
    content = [n for n in names if sens.group[n] == "content"]
    assert content and len(content) < len(names)
    c, q = content[0], next(n for n in names if sens.group[n] == "quality")
    i = names.index(c)
    assert sens.scores["weight"][c] == {2: {"sqnr": 10 + i / 1000, "ssim": 0.9 + i / 100000},
                                        4: {"sqnr": 25 + i / 1000, "ssim": 0.99 + i / 1000000},
                                        8: {"sqnr": 45 + i / 1000, "ssim": 0.999}}
    assert set(sens.scores["act"][q]) == {2, 4, 8} and set(sens.scores["act"][q][4]) == {"sqnr"}
    assert sens.scores["act"][q][4]["sqnr"] == 25.5 + names.index(q) / 1000
    assert sens.act_numel == json.loads((ROOT / "presets" / "sensitivity.json").read_text())["act_numel"]
    assert sens.meta["identity"] == {"model": TINY_ID, "architecture": A.architecture_hash(embedded.unet)}
    assert sens.meta["origin"]["repository"] == "example/tiny-tables" and "model" not in sens.meta
    assert P.is_published(sens.meta)
    # the table round-trips and the allocator takes it as it is
    path = tmp_path / "s.json"
    sens.save(path)
    again = S.Sensitivity.load(path)
    assert again.scores == sens.scores and again.meta == sens.meta
    plan = mixdq.allocate(again, mixdq.layer_costs(embedded.unet), budget_mb=4.0, ratio=None)
    assert mixdq.layer_costs(embedded.unet).total_mb(plan) <= 4.0


@pytest.mark.parametrize("case, match", [
    ("missing", r"sqnr.yaml does not name exactly the \d+ quantizable layers of test/tiny-sdxl: 1 missing \(e.g. conv_out\)"),
    ("extra", r"1 not among them \(e.g. down_blocks.9.nothing\)"),
    ("content", r"ssim.yaml does not name exactly the \d+ content layers .*1 not among them \(e.g. conv_in\).*layer_group"),
    ("nan", r"act-sqnr.yaml: 'model.conv_in' has a score that is not finite"),
    ("short", r"weight-ssim.yaml: 'model.conv_in' has \[0.5, 0.6\]; expected a list of 3 scores \(at 2, 4, 8 bits\)"),
])
def test_import_refuses_files_that_do_not_fit_the_model(embedded, tmp_path, case, match):
    names = list(mixdq.quantizable_layers(embedded.unet))
    content = [n for n in names if layer_group(n) == "content"]
    kw = {"missing": dict(drop="conv_out"), "extra": dict(extra="down_blocks.9.nothing"),
          "content": dict(content=content + ["conv_in"]),
          "nan": dict(bad=(("act", "sqnr"), "conv_in", [1.0, math.nan, 2.0])),
          "short": dict(bad=(("weight", "ssim"), "conv_in", [0.5, 0.6]))}[case]
    folder = _write_tables(tmp_path / case, names, **kw)
    with pytest.raises(P.PublishedTableError, match=match):
        P.import_mixdq_tables(folder, TINY_ID, unet=embedded.unet, source=TINY_SOURCE)


def test_import_credits_only_the_files_it_knows(embedded, tmp_path):
    names = list(mixdq.quantizable_layers(embedded.unet))
    folder = _write_tables(tmp_path / "t", names)
    with pytest.raises(P.PublishedTableError, match="no known publication .* for 'test/tiny-sdxl'.*source="):
        P.import_mixdq_tables(folder, TINY_ID, unet=embedded.unet)
    # files that say they are the authors' SDXL-Turbo files must be those files, byte for byte
    with pytest.raises(P.PublishedTableError, match=r"is not the file the MixDQ authors \(thu-nics/MixDQ @ 4f6b32a"):
        P.import_mixdq_tables(folder, SDXL)
    with pytest.raises(P.PublishedTableError, match="has no weight-ssim.yaml or weight/ssim/bs32_split_ssim_weight"):
        P.import_mixdq_tables(tmp_path, SDXL)


def test_shipped_sdxl_turbo_table(sdxl_meta):
    data = json.loads(SHIPPED.read_text())
    sens = S.Sensitivity.from_dict(data)
    assert sens.layers == list(mixdq.quantizable_layers(sdxl_meta)) and len(sens.layers) == 794
    assert sum(g == "content" for g in sens.group.values()) == 420
    assert all(sens.group[n] == layer_group(n) for n in sens.layers)
    for kind in ("weight", "act"):
        for n in sens.layers:
            assert set(sens.scores[kind][n]) == {2, 4, 8}
            assert ("ssim" in sens.scores[kind][n][4]) == (sens.group[n] == "content")
    assert sens.act_numel == A.activation_numel(sdxl_meta)
    meta = sens.meta
    assert meta["identity"] == {"model": SDXL, "architecture": A.architecture_hash(A.unet_config(SDXL))}
    assert meta["origin"]["repository"] == "thu-nics/MixDQ"
    assert meta["origin"]["commit"] == P.MIXDQ_SDXL_TURBO.commit
    assert set(meta["origin"]["float16_activations"]) <= set(sens.layers)
    assert len(meta["origin"]["float16_activations"]) == 9
    assert "model" not in meta and "key" not in meta       # no weight fingerprint to match
    assert SHIPPED.stat().st_size < 1_000_000


def test_shipped_sdxl_turbo_table_is_the_import_of_the_authors_files():
    if not AUTHORS.is_dir():
        pytest.skip(f"the MixDQ authors' files are not in {AUTHORS}")
    assert P.import_mixdq_tables(AUTHORS, SDXL).to_dict() == json.loads(SHIPPED.read_text())


# --------------------------------------------------------------------------------------------
# Lookup: a pipeline finds a published table by its identity.
# --------------------------------------------------------------------------------------------
@pytest.fixture
def published_dir(embedded, tmp_path, monkeypatch):
    """A presets folder holding only a published-style table for the embedded architecture,
    and an empty cache, so nothing else can answer."""
    monkeypatch.setenv("MIXDQ_CACHE", str(tmp_path / "empty-cache"))
    names = list(mixdq.quantizable_layers(embedded.unet))
    sens = P.import_mixdq_tables(_write_tables(tmp_path / "yaml", names), TINY_ID,
                                 unet=_meta_copy(embedded.unet), source=TINY_SOURCE)
    presets = tmp_path / "presets"
    (presets / "tiny").mkdir(parents=True)
    sens.save(presets / "tiny" / "sensitivity.json")

    def boom(*a, **k):
        raise AssertionError("the sensitivity analysis ran although a published table applies")

    monkeypatch.setattr(tables, "sensitivity", boom)
    return presets


def test_a_local_copy_of_the_architecture_finds_the_published_table(embedded, published_dir):
    found = tables.find_sensitivity(embedded, presets_dir=published_dir)
    assert found.source == "published" and found.table is not None
    assert "measured by a test (example/tiny-tables @ 0000000) for test/tiny-sdxl" in found.message
    assert "matched by its architecture" in found.message and "`mixdq sensitivity`" in found.message
    lines = []
    got = tables.load_sensitivity(embedded, presets_dir=published_dir, log=lines.append)
    assert got.scores == found.table.scores and lines == [f"sensitivity: {found.message}"]


def test_a_known_other_model_does_not_take_the_published_table(embedded, published_dir):
    source = embedded._mixdq_source
    try:
        embedded._mixdq_source = {"source": "someone/tiny-finetune", "kind": "hub", "lora": None}
        found = tables.find_sensitivity(embedded, presets_dir=published_dir)
        assert found.source == "none" and found.table is None
        assert "this is someone/tiny-finetune (the same architecture, other weights)" in found.shipped_note
        assert "`mixdq sensitivity`" in found.shipped_note and "--sensitivity" in found.shipped_note
        embedded._mixdq_source = {**source, "lora": "someone/lcm-lora"}
        found = tables.find_sensitivity(embedded, presets_dir=published_dir)
        assert found.source == "none" and "the LoRA someone/lcm-lora fused in" in found.shipped_note
    finally:
        embedded._mixdq_source = source
    # other calibration settings than the table's: not this table, and the flag that would be
    found = tables.find_sensitivity(embedded, mixdq.Calibration.default(embedded, num_inference_steps=2),
                                    presets_dir=published_dir)
    assert found.source == "none" and "num_inference_steps 1 (yours 2)" in found.shipped_note
    assert found.shipped_flags == "--steps 1"


def test_other_architectures_and_exact_tables(embedded, tiny_sdxl_pipe, published_dir):
    # another architecture: the table says nothing about it
    found = tables.find_sensitivity(tiny_sdxl_pipe, presets_dir=published_dir)
    assert found.source == "none" and found.shipped_note is None
    # a table measured here for these exact weights and calibration wins over a published one
    (published_dir / "sensitivity.json").write_text((ROOT / "presets" / "sensitivity.json").read_text())
    assert tables.find_sensitivity(embedded, presets_dir=published_dir).source == "shipped"


def test_the_app_says_where_a_published_table_comes_from(embedded, published_dir, tmp_path):
    from mixdq.app.state import Session
    from mixdq.app.text import header_markdown

    session = Session(embedded, presets_dir=published_dir, workdir=tmp_path / "app")
    assert session.sens_source == "published" and session.allocator is not None
    text = header_markdown(session)
    assert "sensitivity published ✓" in text and "example/tiny-tables" in text
    assert "`mixdq sensitivity`" in text


def test_find_published_by_hub_id():
    found = tables.find_published(SDXL)
    assert found.source == "published" and len(found.table.layers) == 794
    assert "the MixDQ authors (thu-nics/MixDQ @ 4f6b32a, 2024-11-27)" in found.message
    assert tables.find_published("stabilityai/sd-turbo").table is None
    with pytest.raises(ValueError, match="no published architecture known"):
        tables.find_published("me/mine")


def test_presets_of_the_embedded_model_ignore_the_published_subfolder(embedded):
    from mixdq.presets import presets

    names = [p.name for p in presets(embedded.unet)]
    assert names and {p.stem for p in (ROOT / "presets").glob("mixdq-*.json") if not p.stem.endswith(".stats")} == set(names)
