"""Sensitivity tables measured by someone else for a published model: import and identity.

The MixDQ authors published the per-layer sensitivity of SDXL-Turbo (thu-nics/MixDQ,
`mixed_precision_scripts/sensitivity_log/sdxl_turbo/`): four YAML files, each mapping a
layer (``model.`` + its diffusers name) to three scores, at 2, 4 and 8 bits (index
log2(bits) - 1): SSIM of the generated images (content layers) and SQNR in dB of the UNet
output (every layer), one layer's weights or input activation quantized at a time, against
float16.  `import_mixdq_tables` turns them into a mixdq `Sensitivity`, checked against the
published architecture built on the meta device (every quantizable layer, none extra), with
their provenance in its meta.  presets/sdxl-turbo/sensitivity.json is its output.

Such a table carries no weight fingerprint (only the measuring machine's files could give
one): its meta["identity"] names the hub id and the architecture hash
(`mixdq.architectures.architecture_hash`), and mixdq.tables matches a pipeline by those.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MixDQError
from .sensitivity_analysis import CONTENT, QUALITY, Sensitivity, layer_group

KINDS = ("weight", "act")
METRICS = ("ssim", "sqnr")
LIST_BITS = (2, 4, 8)       # the authors' list index i holds the score at 2 ** (i + 1) bits
PREFIX = "model."           # their layer names are attributes of a wrapper's `model`


@dataclass(frozen=True)
class Publication:
    """Where a published set of MixDQ sensitivity files comes from, and what it measured."""
    model: str
    measured_by: str
    repository: str
    commit: str
    date: str
    folder: str                            # in the repository
    files: dict                            # "weight-ssim" -> (path under folder, sha256)
    calibration: dict
    candidates: dict                       # the bits their integer program offered
    quantizer: dict
    quantizer_file: str
    float16_activations: tuple = ()
    float16_activations_file: str = ""
    notes: tuple = field(default=())

    def url(self) -> str:
        return f"https://github.com/{self.repository}/tree/{self.commit}/{self.folder}"

    def credit(self) -> str:
        return f"{self.measured_by} ({self.repository} @ {self.commit[:7]}, {self.date})"


# Read from the authors' repository at this commit (the shared copy's files hash the same).
MIXDQ_SDXL_TURBO = Publication(
    model="stabilityai/sdxl-turbo",
    measured_by="the MixDQ authors",
    repository="thu-nics/MixDQ",
    commit="4f6b32ad20d980494bcfecae50bfde5d17ed805c",
    date="2024-11-27",
    folder="mixed_precision_scripts/sensitivity_log/sdxl_turbo",
    files={
        "weight-ssim": ("weight/ssim/bs32_split_ssim_weight/sensitivity.yaml",
                        "fedf7ca77fdc42568b0709ccd34037d9cab086fb55580b6cf91395be5da97705"),
        "weight-sqnr": ("weight/sqnr/bs32_split_sqnr_weight/sensitivity.yaml",
                        "5b2b4d688a9c8e3fd7146570df185dd151ccc5cf532a3f4e7c0967e886713ce3"),
        "act-ssim": ("act/ssim/bs32_split_ssim_act/sensitivity.yaml",
                     "efa884370241d3a705ea85d825283fdb6f75adb0316dce7f9a0a6466c0ac4d48"),
        "act-sqnr": ("act/sqnr/bs32_split_sqnr_act/sensitivity.yaml",
                     "9a430574b115c24f2d321b5a0518b42581cb1964b1e0e1f0020256ce2d09a0a1"),
    },
    # their config: calib_data n_samples 32, n_steps 1, scale_value 0 (guidance); float16
    calibration={"prompts": 32, "settings": {"num_inference_steps": 1, "guidance_scale": 0.0},
                 "dtype": "torch.float16"},
    candidates={"weight": {CONTENT: [2, 4, 8], QUALITY: [4, 8]}, "act": {CONTENT: [4, 8], QUALITY: [4, 8]}},
    quantizer={"weight": {"channel_wise": True, "scale_method": "min_max", "round_mode": "nearest"},
               "activation": {"channel_wise": False, "scale_method": "min_max", "round_mode": "nearest_ste",
                              "running_stat": True, "bos_aware": True}},
    quantizer_file="configs/stable-diffusion/sdxl_turbo.yaml",
    # the activations their final W*A8 plans keep in float16 (a list of names in a .pt file,
    # sha256 c0943b0212a22becd7967cb502bd6c6c5f1ed2821d9461b17166d251499b102f)
    float16_activations=(
        "conv_in", "conv_out", "down_blocks.0.resnets.0.conv2", "up_blocks.2.resnets.2.conv_shortcut",
        "down_blocks.2.attentions.1.transformer_blocks.6.ff.net.2",
        "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.8.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.5.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.7.ff.net.2"),
    float16_activations_file="mixed_precision_scripts/mixed_percision_config/sdxl_turbo/final_config/act/"
                             "act_sensitivie_a8_1%.pt",
    notes=("scores at 2, 4 and 8 bits for every layer and kind, as measured; their integer program "
           "offered weights {2,4,8} to content and {4,8} to quality layers, activations {4,8}",),
)

PUBLICATIONS = {MIXDQ_SDXL_TURBO.model: MIXDQ_SDXL_TURBO}


class PublishedTableError(MixDQError, ValueError):
    """Files that are not a complete, consistent MixDQ sensitivity set for the model."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _find_file(folder: Path, name: str, pub: Publication | None) -> Path:
    """`name`.yaml (the short names of the shared copy), else the authors' own layout."""
    short = folder / f"{name}.yaml"
    if short.is_file():
        return short
    if pub is not None and (folder / pub.files[name][0]).is_file():
        return folder / pub.files[name][0]
    where = f" or {pub.files[name][0]}" if pub is not None else ""
    raise PublishedTableError(f"{folder} has no {name}.yaml{where}: give the folder that holds the "
                              "four files weight-ssim, weight-sqnr, act-ssim, act-sqnr")


def _read_yaml(path: Path) -> dict[str, tuple[float, float, float]]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PublishedTableError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise PublishedTableError(f"{path} is not a mapping of layer names to score lists")
    out = {}
    for raw, scores in data.items():
        name = str(raw)
        name = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if not (isinstance(scores, list) and len(scores) == len(LIST_BITS)):
            raise PublishedTableError(f"{path}: {raw!r} has {scores!r}; expected a list of {len(LIST_BITS)} scores "
                               f"(at {', '.join(map(str, LIST_BITS))} bits)")
        try:
            values = tuple(float(v) for v in scores)
        except (TypeError, ValueError):
            raise PublishedTableError(f"{path}: {raw!r} has a score that is not a number: {scores!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise PublishedTableError(f"{path}: {raw!r} has a score that is not finite: {scores!r}")
        if name in out:
            raise PublishedTableError(f"{path}: layer {name!r} appears twice (with and without {PREFIX!r}?)")
        out[name] = values
    return out


def _names_diff(what: str, got: set[str], want: list[str], path: Path, fix: str) -> None:
    missing = [n for n in want if n not in got]
    extra = sorted(got - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} not among them (e.g. {', '.join(extra[:3])})")
        raise PublishedTableError(f"{path} does not name exactly {what}: {'; '.join(parts)}; {fix}")


def import_mixdq_tables(folder, model: str = MIXDQ_SDXL_TURBO.model, *, unet=None,
                        source: dict | None = None) -> Sensitivity:
    """The MixDQ authors' sensitivity files in `folder` as a mixdq Sensitivity for `model`.

    folder: weight-ssim.yaml, weight-sqnr.yaml, act-ssim.yaml, act-sqnr.yaml (or the authors'
        own layout, sensitivity_log/<model>/{weight,act}/{ssim,sqnr}/...).
    model: the hub id the files were measured for; its published architecture
        (mixdq.architectures) is built on the meta device unless `unet` is given.
    source: provenance for files that are not a known publication (a dict stored as the
        table's meta["origin"]); without it the files must be byte-identical to the known
        publication for `model` (their sha256 is checked), so the credit in the table is true.

    Checks: the SQNR files name exactly the UNet's quantizable layers; the SSIM files name
    exactly the content layers of mixdq's `layer_group` (cross-attention and feed-forward);
    every score is a finite number.  Scores land at 2, 4 and 8 bits; act_numel comes from a
    meta-device forward at the model's default size (the count `mixdq.sensitivity` records).
    """
    from .architectures import activation_numel, architecture_hash, meta_unet
    from .quant import quantizable_layers

    folder = Path(folder)
    if not folder.is_dir():
        raise PublishedTableError(f"{str(folder)!r} is not a folder; give the folder with the MixDQ "
                                  "sensitivity YAML files")
    pub = PUBLICATIONS.get(model)
    if source is None and pub is None:
        raise PublishedTableError(f"no known publication of MixDQ sensitivity for {model!r} (known: "
                           f"{', '.join(sorted(PUBLICATIONS))}); pass source={{...}} saying where the "
                           "files come from")
    paths = {f"{k}-{m}": _find_file(folder, f"{k}-{m}", pub if source is None else None)
             for k in KINDS for m in METRICS}
    if source is None:
        for name, path in paths.items():
            digest = _sha256(path)
            if digest != pub.files[name][1]:
                raise PublishedTableError(
                    f"{path} is not the file {pub.credit()} published ({pub.folder}/{pub.files[name][0]}, "
                    f"sha256 {pub.files[name][1][:12]}..., this one {digest[:12]}...); restore it, or "
                    "pass source={...} saying where these files come from")
    data = {name: _read_yaml(path) for name, path in paths.items()}

    unet = unet if unet is not None else meta_unet(model)
    layers = quantizable_layers(unet)
    names = list(layers)
    group = {n: layer_group(n) for n in names}
    content = [n for n in names if group[n] == CONTENT]
    for kind in KINDS:
        _names_diff(f"the {len(names)} quantizable layers of {model}", set(data[f"{kind}-sqnr"]), names,
                    paths[f"{kind}-sqnr"], "these files were measured for another model")
        _names_diff(f"the {len(content)} content layers (attn2 / ff) of {model}", set(data[f"{kind}-ssim"]),
                    content, paths[f"{kind}-ssim"],
                    "their content group differs from mixdq's layer_group, which the allocator scores by SSIM")
        for n, values in data[f"{kind}-ssim"].items():
            if not all(-1.0 <= v <= 1.0 for v in values):
                raise PublishedTableError(f"{paths[f'{kind}-ssim']}: {n!r} has {list(values)}, not SSIM values in [-1, 1]")

    scores = {kind: {n: {} for n in names} for kind in KINDS}
    for kind in KINDS:
        for n in names:
            for i, bits in enumerate(LIST_BITS):
                cell = {"sqnr": data[f"{kind}-sqnr"][n][i]}
                if group[n] == CONTENT:
                    cell["ssim"] = data[f"{kind}-ssim"][n][i]
                scores[kind][n][bits] = cell

    if source is None:
        origin = {"repository": pub.repository, "commit": pub.commit, "date": pub.date, "url": pub.url(),
                  "files": {name: {"path": f"{pub.folder}/{p}", "sha256": digest}
                            for name, (p, digest) in pub.files.items()},
                  "quantizer": pub.quantizer, "quantizer_file": pub.quantizer_file,
                  "float16_activations": list(pub.float16_activations),
                  "float16_activations_file": pub.float16_activations_file,
                  "candidates": pub.candidates, "notes": list(pub.notes)}
        measured_by, calibration = pub.measured_by, pub.calibration
        missing16 = [n for n in pub.float16_activations if n not in layers]
        if missing16:
            raise PublishedTableError(f"the float16 activations of {pub.credit()} name layers {model} lacks: {missing16}")
    else:
        origin = dict(source)
        measured_by = str(source.get("measured_by", source.get("repository", "unknown")))
        calibration = dict(source.get("calibration", {}))
    meta = {
        "measured_by": measured_by,
        "identity": {"model": model, "architecture": architecture_hash(unet)},
        "origin": origin,
        "prompts": calibration.get("prompts"), "settings": calibration.get("settings", {}),
        "dtype": calibration.get("dtype"), "device_type": calibration.get("device_type"),
        "weight_bits": {g: list(LIST_BITS) for g in (CONTENT, QUALITY)},
        "act_bits": {g: list(LIST_BITS) for g in (CONTENT, QUALITY)},
        "group_fn": "layer_group",
        "act_numel_from": "meta-device forward at the model's default size, batch 1",
        "imported_with": "mixdq.published.import_mixdq_tables",
    }
    return Sensitivity(names, group, scores, activation_numel(unet, layers), meta)


# --------------------------------------------------------------------------------------------
# Identity: which pipelines such a table applies to.
# --------------------------------------------------------------------------------------------
def is_published(meta: dict) -> bool:
    """Whether a table's meta says it was measured elsewhere for a published model (it then
    has an identity, hub id + architecture, instead of a weight fingerprint)."""
    ident = meta.get("identity")
    return isinstance(ident, dict) and bool(ident.get("model")) and bool(ident.get("architecture"))


def origin_text(meta: dict) -> str:
    """'the MixDQ authors (thu-nics/MixDQ @ 4f6b32a, 2024-11-27)' for a published table."""
    origin = meta.get("origin") or {}
    who = meta.get("measured_by") or "someone else"
    where = origin.get("repository")
    if where and origin.get("commit"):
        where += f" @ {str(origin['commit'])[:7]}"
    if where and origin.get("date"):
        where += f", {origin['date']}"
    return f"{who} ({where})" if where else str(who)


def published_message(meta: dict, name: str, how: str = "matched by its architecture (not by weights)") -> str:
    """What the CLI and the app say whenever a published table is used."""
    model = meta["identity"]["model"]
    return (f"{name}, measured by {origin_text(meta)} for {model}, {how}; a fine-tune of {model} "
            "has other sensitivities: measure it with `mixdq sensitivity`")


# A published table plans A8 the way its authors did: every activation 8-bit, with float16
# where the scores say it matters most, within the activation budget of their own float16 list.
A8_WITH_FLOAT = {CONTENT: (8, 16), QUALITY: (8, 16)}


def activation_options(table: Sensitivity, act_avg_bits: float | None = None) -> dict:
    """The Allocator's activation settings for this table: `act_avg_bits` as given (0: no
    cap), else 8 bits on average over the default candidates, or, for a published table, 8 or
    16 bits at the average of the publication's own float16 list (`published_act_avg_bits`)."""
    if act_avg_bits is not None:
        return {"act_avg_bits": act_avg_bits or None}
    if is_published(table.meta):
        return {"act_candidates": A8_WITH_FLOAT, "act_avg_bits": published_act_avg_bits(table)}
    return {"act_avg_bits": 8.0}


def published_act_avg_bits(table: Sensitivity) -> float:
    """The average activation bits of the publication's own W*A8 choice (8 bits, its float16
    list at 16), weighted by activation size."""
    keep = set(table.meta.get("origin", {}).get("float16_activations") or ())
    total = sum(table.act_numel.values())
    return 8.0 + 8.0 * sum(n for name, n in table.act_numel.items() if name in keep) / total
