"""Which sensitivity table a pipeline gets: the one shipped in presets/ for this exact
model and calibration, else a complete one in the cache, else one shipped for this model and
calibration but measured in another dtype or on another device, else one published for this
model by someone else (presets/sdxl-turbo/sensitivity.json: the MixDQ authors'), else
(load_sensitivity only) one measured now.  The CLI and the app ask here, so they agree.

Two kinds of identity.  A table measured here carries the model's weight fingerprint (the
same in float32 and float16, on any device) and its calibration's cache key (which includes
the dtype and device type); the exact key matches, and so does the key recomputed with the
dtype and device the table records.  A table measured by others for a published model
(meta["identity"]: hub id + architecture hash, see mixdq.published) matches a pipeline of the
same architecture (mixdq.architectures.architecture_hash) and calibration settings, unless the
pipeline is known to be another model (another hub id, or a fused LoRA); whoever uses it is
told where it comes from and that a fine-tune should be measured itself."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .calibrate import Calibration
from .published import is_published, origin_text, published_message
from .resources import shipped
from .sensitivity_analysis import (DEFAULT_ACT_BITS, DEFAULT_WEIGHT_BITS, Sensitivity, _candidates, _jobs, _read_results,
                          cache_key, cache_root, key_of, layer_group, metrics_for, sensitivity)


@dataclass
class SensitivityLookup:
    """What `find_sensitivity` found: the table or None, where it came from ("shipped",
    "cached", "published" or "none"), and one line for the user saying so (for "published":
    who measured it, where, and that a fine-tune should be measured with `mixdq sensitivity`).
    `measured_as` ("cpu in float32"): where and in what a shipped table was measured, when that
    is not this pipeline's device and dtype (None otherwise).
    For "none": `shipped_note` says why the shipped table measured for this model does not
    apply (if there is one), `shipped_flags` the command-line flags that would select its
    calibration.  For "none" and a table measured elsewhere: `todo`, how many evaluations the
    analysis here (in this dtype, on this device) still has to run."""
    table: object | None          # mixdq.sensitivity_analysis.Sensitivity
    source: str
    message: str
    shipped_note: str | None = None
    shipped_flags: str | None = None
    todo: int | None = None
    measured_as: str | None = None


def _calibration_fields(prompts, seed, settings) -> dict:
    # not the dtype nor the device: a table measured in another one is taken (see find_sensitivity)
    out = {"prompts": prompts, "seed": seed, "steps": settings.get("num_inference_steps"),
           "guidance": settings.get("guidance_scale"), "height": settings.get("height"),
           "width": settings.get("width")}
    return {k: v for k, v in out.items() if v is not None}


_CALIBRATION_FLAGS = {"prompts": "--prompts", "seed": "--seed", "steps": "--steps", "guidance": "--guidance",
                      "height": "--resolution", "width": "--resolution"}


def _shipped_mismatch(meta: dict, key: str, inputs: dict, name: str) -> tuple[str, str | None]:
    """Why a shipped table measured for this model does not fit this calibration (field by
    field, as far as its meta records them), and the flags that would select its calibration."""
    theirs = _calibration_fields(meta.get("prompts"), meta.get("seed"), meta.get("settings") or {})
    yours = _calibration_fields(len(inputs["prompts"]), inputs["seed"], inputs["settings"])
    diff = [k for k in theirs if theirs[k] != yours.get(k)]
    if diff:
        how = "with " + ", ".join(f"{k} {theirs[k]} (yours {yours.get(k)})" for k in diff)
        flags = dict.fromkeys(f"{_CALIBRATION_FLAGS[k]} {theirs[k]}" for k in diff if k in _CALIBRATION_FLAGS)
        flags = " ".join(flags) or None
    elif meta.get("key"):  # the key also covers the prompts' text and the sensitivity code's version
        how = (f"with other calibration prompts or another version of the sensitivity code "
               f"(cache key {meta['key']}, yours {key})")
        flags = None
    else:
        how, flags = "with a calibration it does not record (no cache key in its meta)", None
    return f"the shipped {name} was measured for this model {how}", flags


def _dtype_name(dtype: str) -> str:
    return str(dtype).replace("torch.", "")


def _measured_elsewhere(meta: dict, inputs: dict) -> tuple[str, str] | None:
    """(device type, dtype), e.g. ("cpu", "float32"), if the table was measured for exactly
    these inputs but in another dtype or on another device type: its key is this pipeline's
    inputs with the dtype and device it records, hashed.  None if it was not (or does not
    record them)."""
    dtype, device = meta.get("dtype"), meta.get("device_type")
    if not (isinstance(dtype, str) and isinstance(device, str) and meta.get("key")):
        return None
    if (dtype, device) == (inputs["dtype"], inputs["device_type"]):
        return None   # the same dtype and device with another key: another calibration
    if key_of({**inputs, "dtype": dtype, "device_type": device}) != meta["key"]:
        return None
    return device, _dtype_name(dtype)


def _tables(presets_dir):
    """(display name, data) of every sensitivity table under the presets folder, subfolders
    too (presets/sdxl-turbo/sensitivity.json)."""
    root = Path(presets_dir or shipped("presets"))
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(data, dict) and data.get("format") == "mixdq-sensitivity/1"):
            continue
        try:
            name = str(path.resolve().relative_to(shipped("presets").parent))
        except ValueError:
            name = str(path)
        yield name, data


def _published_fits(pipe, meta: dict, inputs: dict, architecture: str, name: str) -> tuple[bool, str | None, str | None]:
    """Whether a published table applies to this pipeline: (fits, why not, flags).  Another
    architecture is another model (no note); the same architecture with another known
    identity, or other calibration settings, gets a note saying so."""
    ident = meta["identity"]
    if ident.get("architecture") != architecture:
        return False, None, None
    model = ident["model"]
    src = getattr(pipe, "_mixdq_source", None) or {}
    anyway = f"measure it with `mixdq sensitivity`, or pass --sensitivity {name} to use that table anyway"
    if src.get("lora"):
        return False, (f"{name} was measured by {origin_text(meta)} for {model}, but this pipeline has "
                       f"the LoRA {src['lora']} fused in: {anyway}"), None
    if src.get("kind") == "hub" and src.get("source") != model:
        return False, (f"{name} was measured by {origin_text(meta)} for {model}; this is {src.get('source')} "
                       f"(the same architecture, other weights): {anyway}"), None
    theirs = meta.get("settings") or {}
    diff = [k for k in sorted(theirs) if inputs["settings"].get(k) != theirs[k]]
    if diff:
        flags = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "height": "--resolution",
                 "width": "--resolution"}
        how = ", ".join(f"{k} {theirs[k]} (yours {inputs['settings'].get(k)})" for k in diff)
        hint = " ".join(dict.fromkeys(f"{flags[k]} {theirs[k]:g}" if isinstance(theirs[k], float) else
                                      f"{flags[k]} {theirs[k]}" for k in diff if k in flags)) or None
        return False, f"{name} was measured by {origin_text(meta)} for {model} with {how}", hint
    return True, None, None


def find_sensitivity(pipe, calibration=None, presets_dir=None) -> SensitivityLookup:
    """The sensitivity table for this model and calibration, without measuring anything, first
    found of:

    1. shipped in presets/ for exactly these (the same cache key: model, calibration, dtype,
       device type);
    2. complete in the on-disk cache (measured here, in this dtype on this device);
    3. shipped for this model and calibration but measured in another dtype or on another
       device (its key recomputed with the dtype and device its meta records), source
       "shipped", the message saying where and in what (`measured_as`).  A cache measured in
       yours comes first: it is the same question answered without the float rounding in
       between, and `mixdq sensitivity`, which the message suggests, leaves exactly that;
    4. published for this model's architecture by someone else (see the module doc): matched
       by architecture, not by these weights, so after a table measured for them;
    5. none (`message` says why, and what is cached)."""
    from .architectures import architecture_hash

    calibration = calibration or Calibration.default(pipe)
    key, inputs = cache_key(pipe, calibration)
    note = flags = None
    published = elsewhere = None
    architecture = None
    for name, data in _tables(presets_dir):
        meta = data.get("meta") or {}
        if is_published(meta):
            architecture = architecture or architecture_hash(pipe.unet)
            fits, why, hint = _published_fits(pipe, meta, inputs, architecture, name)
            if fits and published is None:
                published = (name, data)
            elif why and note is None:
                note, flags = why, hint
            continue
        if str(meta.get("model", "")) != inputs["model"][:16]:
            continue   # another model's table says nothing about this one
        # Scores measured on other prompts, seed, steps or size answer another question: only
        # the exact cache key (model and calibration) counts.
        if meta.get("key") == key:
            return SensitivityLookup(Sensitivity.from_dict(data), "shipped",
                                     f"shipped {name}, measured for this model and calibration")
        measured_as = _measured_elsewhere(meta, inputs)
        if measured_as is not None:
            if elsewhere is None:
                elsewhere = (name, data, measured_as)
            continue
        note, flags = _shipped_mismatch(meta, key, inputs, name)
    folder = cache_root() / key
    prefix = f"{note}; " if note else ""
    todo, jobs = _cache_todo(pipe, folder)
    if todo == 0 and (folder / "model.json").is_file():
        # measured here for these very weights: better than anyone's published table
        return SensitivityLookup(sensitivity(pipe, calibration, progress=False), "cached",
                                 f"cached in {folder}")
    if elsewhere is not None:
        name, data, (device, dtype) = elsewhere
        yours = f"{inputs['device_type']}, {_dtype_name(inputs['dtype'])}"
        return SensitivityLookup(Sensitivity.from_dict(data), "shipped",
                                 f"shipped {name}, measured for this model and calibration on {device} in {dtype} "
                                 f"(yours: {yours}): per-layer scores transfer up to float rounding; "
                                 f"`mixdq sensitivity` measures your own",
                                 todo=todo, measured_as=f"{device} in {dtype}")
    if published is not None:
        name, data = published
        return SensitivityLookup(Sensitivity.from_dict(data), "published", published_message(data["meta"], name))
    if todo is None:
        return SensitivityLookup(None, "none", f"{prefix}the cache in {folder} is unreadable", note, flags)
    have = "nothing" if todo == len(jobs) else f"{len(jobs) - todo} of {len(jobs)} evaluations"
    return SensitivityLookup(None, "none", f"{prefix}{have} cached in {folder}", note, flags, todo)


def _cache_todo(pipe, folder) -> tuple[int | None, list | None]:
    """(evaluations of the default analysis not yet in the cache folder, all its jobs);
    (None, None) where the folder is unreadable (its layout changed: it is recomputed)."""
    from .quant import quantizable_layers

    try:
        names = list(quantizable_layers(pipe.unet))
        groups = {n: layer_group(n) for n in names}
        jobs = list(_jobs(names, groups, _candidates(None, DEFAULT_WEIGHT_BITS), _candidates(None, DEFAULT_ACT_BITS)))
        done = _read_results(folder) if folder.is_dir() else {}
        return sum(1 for job in jobs if not all(m in done.get(job, {}) for m in metrics_for(groups[job[0]]))), jobs
    except (AttributeError, OSError, ValueError, KeyError):
        return None, None


def analysis_todo(pipe, calibration=None) -> int | None:
    """How many evaluations the default analysis of this model and calibration still has to
    run here (whatever tables ship for it): the count its time estimate is made for."""
    key, _ = cache_key(pipe, calibration or Calibration.default(pipe))
    return _cache_todo(pipe, cache_root() / key)[0]


def find_published(model_id: str, presets_dir=None) -> SensitivityLookup:
    """The table published for the hub id `model_id` (its identity: that id and the published
    architecture of mixdq.architectures), for planning without the model's weights."""
    from .architectures import architecture_hash, unet_config

    architecture = architecture_hash(unet_config(model_id))
    for name, data in _tables(presets_dir):
        meta = data.get("meta") or {}
        if is_published(meta) and meta["identity"]["model"] == model_id \
                and meta["identity"]["architecture"] == architecture:
            return SensitivityLookup(Sensitivity.from_dict(data), "published",
                                     published_message(meta, name, "found by its hub id"))
    return SensitivityLookup(None, "none", f"no sensitivity table for {model_id} ships in "
                             f"{presets_dir or shipped('presets')}")


def cached_sensitivity(pipe, calibration=None, presets_dir=None):
    """The sensitivity table `find_sensitivity` finds (shipped in presets/ for this model and
    calibration, complete on disk, or published for this model), else None.  Never starts the
    (long) analysis itself."""
    return find_sensitivity(pipe, calibration, presets_dir).table


def alternatives(pipe, presets_dir=None) -> str:
    """What to use instead of measuring this model's sensitivity here: its shipped presets,
    the published tables, and measuring on a GPU."""
    from .architectures import known_models
    from .presets import presets

    shipped_plans = [p.name for p in presets(pipe.unet)]
    published = [m for m in known_models() if find_published(m, presets_dir).table is not None]
    out = []
    if shipped_plans:
        out.append(f"the shipped presets fit this model and need no analysis ({', '.join(shipped_plans)}: "
                   "`--plan NAME`, or the app's buttons)")
    if published:
        out.append(f"published sensitivity tables ship for {', '.join(published)} (used for those models as "
                   "published, and without weights: `mixdq allocate --model ID --budget-mb N`)")
    out.append("or measure it on a GPU: `mixdq sensitivity --device cuda` (cached, resumable; copy the "
               "cache folder here or pass --sensitivity FILE)")
    return "; ".join(out)


def load_sensitivity(pipe, calibration=None, presets_dir=None, log=None):
    """`find_sensitivity`, else the analysis (resuming what is cached), after saying what it
    will cost here (`estimate_analysis`).  An analysis that is a GPU job on this CPU is refused
    (GPUJobError, saying what to use instead: `alternatives`); `mixdq sensitivity` runs it
    anyway when asked.  `log` (default: print to stderr) gets one line saying which table, or
    what the analysis will cost, before it starts.  The command line and the app take their
    table from here, so they agree."""
    import sys

    from .errors import GPUJobError
    from .sensitivity_analysis import estimate_analysis

    log = log or (lambda text: print(text, file=sys.stderr))
    calibration = calibration or Calibration.default(pipe)
    found = find_sensitivity(pipe, calibration, presets_dir)
    if found.table is not None:
        log(f"sensitivity: {found.message}")
        return found.table
    estimate = estimate_analysis(pipe, calibration, found.todo)
    if estimate.gpu_job:
        raise GPUJobError(f"{found.message}, and {estimate.message}; instead: {alternatives(pipe, presets_dir)}")
    hint = f"; {found.shipped_flags} would use the shipped table instead" if found.shipped_flags else ""
    log(f"sensitivity: {found.message}: {estimate.message}; measuring it now, once (resumable, then "
        f"cached){hint}")
    return sensitivity(pipe, calibration)
