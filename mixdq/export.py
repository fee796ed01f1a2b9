"""A quantized pipeline as a folder (save_quantized / load_quantized), or as one zip of
that folder (export_archive / import_archive: what the app's Export gives and Load takes).

    out/
      mixdq.json            format, pipeline class, the manifest: every other file's size
      model_index.json      the diffusers pipeline index; its unet is mixdq's
                            ["mixdq", "QuantizedUNet2DConditionModel"]
      unet/                 the quantized UNet, all it needs to load alone
                            (config.json, mixdq.json, plan.json, mixdq_unet.safetensors:
                            mixdq/diffusers_unet.py)
      text_encoder*/ tokenizer*/ vae/ scheduler/   as diffusers writes them
      mixdq_defaults.json   the few-step generation settings

    import mixdq                                          # diffusers then finds the UNet's class
    pipe = DiffusionPipeline.from_pretrained("out")       # the pipeline mixdq.load_quantized("out") gives

No file names a folder of the machine that wrote it (loaders record the folder they read
a config from; those entries are dropped).  Writing goes to a hidden sibling folder that is
renamed into place at the end, so a failure never leaves a half-written export.  Exports
of format mixdq-export/1 (the UNet's mixdq.json and plan.json at the root, model_index.json
naming diffusers' UNet) still load with load_quantized.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ExportError
from .defaults import DEFAULTS_FILE, META_FILE, default_device, generation_defaults, is_embedded
from .memory import MB
from .quant import quantized_layers

# An archive is a few dozen files and mixdq.json a few KB: refuse more before reading anything.
MAX_ARCHIVE_MEMBERS = 10_000
MAX_META_BYTES = 4 << 20
# Packed codes and float weights hardly compress (export_archive stores them): an archive
# that expands more than this (plus room for highly compressible text files) is a zip
# bomb, whatever its manifest says.
MAX_EXPANSION = 100
EXPANSION_SLACK = 16 << 20


def save_quantized(pipe, folder, overwrite: bool = False) -> Path:
    """Write a quantized pipeline to `folder` atomically; return its path."""
    from .diffusers_unet import FOLDER_KEYS, FORMAT, MODEL_INDEX_ENTRY, save_unet, write_json

    folder = Path(folder).expanduser().resolve()
    if not quantized_layers(pipe.unet):
        raise ExportError("this pipeline is not quantized: run mixdq.quantize(pipe, plan, ...) first")
    if folder.exists() and not overwrite:
        raise ExportError(f"{folder} already exists: choose a new folder or pass overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, component in pipe.components.items():
            if component is None or name == "unet":
                continue
            if hasattr(component, "save_pretrained"):
                component.save_pretrained(tmp / name)
        pipe.save_config(tmp)
        index = json.loads((tmp / "model_index.json").read_text())
        write_json(tmp / "model_index.json", index | {"unet": MODEL_INDEX_ENTRY})
        save_unet(pipe.unet, tmp / "unet")
        (tmp / DEFAULTS_FILE).write_text(json.dumps(generation_defaults(pipe), indent=1))
        for config in tmp.rglob("*.json"):
            data = json.loads(config.read_text())
            if isinstance(data, dict) and any(k in data for k in FOLDER_KEYS):
                write_json(config, data)   # which drops them
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / META_FILE, {"format": FORMAT, "pipeline_class": type(pipe).__name__, "files": files})
        if folder.exists():  # overwrite: swap in the new folder, then drop the old one
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ExportError):
            raise
        if isinstance(e, Exception):
            raise ExportError(f"could not write {folder}: {e}") from e
        raise
    return folder


def _check_files(folder: Path, meta: dict) -> None:
    """Every file the manifest lists is there, at its size (format 1 lists none)."""
    for rel, size in (meta.get("files") or {}).items():
        path = folder / rel
        if not path.is_file():
            raise ExportError(f"{folder} is incomplete: {rel} is missing; copy the whole folder again, "
                              "or export the model again")
        if path.stat().st_size != size:
            raise ExportError(f"{path} has {path.stat().st_size} bytes where the export wrote {size}: it was "
                              "cut short or changed; copy the whole folder again, or export the model again")


def load_quantized(folder, device=None, kernel: str | None = None, verify: bool = True,
                   int8_safe: bool = True):
    """Rebuild a pipeline written by save_quantized, without any float UNet weights.
    The W8A8 path is this machine's (kernels.select_kernel), or `kernel`, and the
    plan is fitted to it as quantize fits it (quantization.fit_plan_to_device).

    Where a W8A8 layer's int8 backend saturates on 8-bit weight codes (oneDNN /
    FBGEMM without VNNI), int8_safe (the default, as for quantize) re-rounds its
    codes to 7 bits (QuantLayer.requantize_weight), which those kernels run
    exactly; the images then differ a little from the export's, and
    `unet.mixdq_state.fitted` says how many layers.  int8_safe=False keeps them,
    on the exact float path, no faster than float: a warning says so.

    The UNet is QuantizedUNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
    what `DiffusionPipeline.from_pretrained(folder)` builds too."""
    from diffusers import DiffusionPipeline

    from .diffusers_unet import QuantizedUNet2DConditionModel, read_meta

    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    if not (folder / "model_index.json").is_file():
        raise ExportError(f"{folder} holds a quantized UNet, not a whole pipeline (no model_index.json): load it "
                          "with mixdq.QuantizedUNet2DConditionModel.from_pretrained(folder) and pass it as "
                          "unet= to a pipeline of its architecture")
    _check_files(folder, meta)
    device = torch.device(device) if device is not None else default_device()
    unet = QuantizedUNet2DConditionModel.from_pretrained(folder, subfolder="unet", device=device, kernel=kernel,
                                                         verify=verify, int8_safe=int8_safe)
    pipe = DiffusionPipeline.from_pretrained(folder, unet=unet, dtype=unet.dtype)
    pipe.to(device)  # the other components: the UNet is there already
    pipe._mixdq_source = {"source": str(folder), "kind": "mixdq-export", "lora": None}
    return pipe


# ------------------------------------------------------------------------------------------
# One-file export.
# ------------------------------------------------------------------------------------------
def export_archive(pipe, path, *, embedded: bool | None = None) -> Path:
    """Write the quantized pipeline (the `save_quantized` folder) as one zip archive at `path`,
    atomically: the zip is built beside it and renamed into place."""
    from .diffusers_unet import write_json

    path = Path(path).expanduser().resolve()
    if path.suffix != ".zip":
        raise ExportError(f"{path} must end in .zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        folder = save_quantized(pipe, work / path.stem)
        if embedded if embedded is not None else is_embedded(pipe):
            meta = json.loads((folder / META_FILE).read_text())
            # keeps the attribute checker on when loaded back (not in the manifest: it lists the other files)
            write_json(folder / META_FILE, meta | {"embedded_model": True})
        tmp_zip = work / "archive.zip"
        # Stored, not deflated: safetensors of packed integers hardly compress, and storing is fast.
        with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(folder.parent).as_posix())
        os.replace(tmp_zip, path)
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(f"could not write {path}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _archive_members(zf: zipfile.ZipFile, name: str) -> list[tuple[zipfile.ZipInfo, str, int]]:
    """Check an archive against the manifest inside it before anything is unpacked:
    [(member, its path in the export, the bytes it may unpack to)]."""
    from .diffusers_unet import FORMAT, OLD_FORMAT

    infos = zf.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise ExportError(f"{name} holds {len(infos)} files; a mixdq export holds a few dozen")
    for info in infos:
        p = Path(info.filename)
        if p.is_absolute() or ".." in p.parts:
            raise ExportError(f"{name} contains an unsafe path {info.filename!r}; refusing it")
    files = {i.filename: i for i in infos if not i.is_dir()}
    roots = [n[: -len(META_FILE)] for n in files
             if (n == META_FILE or n.endswith("/" + META_FILE)) and n[: -len(META_FILE)] + "model_index.json" in files]
    if not roots:
        raise ExportError(f"{name} is not a mixdq export (no mixdq.json beside a model_index.json inside); "
                          "upload the .zip written by Export")
    if len(roots) > 1:
        raise ExportError(f"{name} holds {len(roots)} exports; upload one at a time")
    root = roots[0]
    meta_info = files.pop(root + META_FILE)
    if meta_info.file_size > MAX_META_BYTES:
        raise ExportError(f"{root + META_FILE} in {name} is {meta_info.file_size / MB:.0f} MB; an export's is a "
                          "few KB: refusing the archive, upload the .zip written by Export")
    try:
        meta = json.loads(zf.read(meta_info))
    except ValueError as e:
        raise ExportError(f"{root + META_FILE} in {name} is corrupted ({e}); export the model again") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found == OLD_FORMAT:
        raise ExportError(f"{name} was written by an older mixdq and lists no file sizes, so it cannot be checked "
                          "before unpacking: unzip it yourself and load the folder with mixdq.load_quantized(folder) "
                          "(or `python -m mixdq generate --model FOLDER`), or export the model again")
    if found != FORMAT:
        raise ExportError(f"{name} has format {found!r}; this mixdq reads {FORMAT!r}: export the model again with it")
    manifest = meta.get("files")
    if not (isinstance(manifest, dict)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in manifest.values())):
        raise ExportError(f"{root + META_FILE} in {name} has no valid file manifest ('files': path -> bytes), so "
                          "the archive cannot be checked before unpacking: upload the .zip written by Export")
    members = [(meta_info, META_FILE, meta_info.file_size)]
    for filename, info in files.items():
        rel = filename[len(root):] if filename.startswith(root) else None
        if rel not in manifest:
            raise ExportError(f"{name} holds {filename!r}, which its manifest does not list: the archive was "
                              "changed after export; export the model again")
        if info.file_size != manifest[rel]:
            raise ExportError(f"{filename!r} in {name} unpacks to {info.file_size} bytes where its manifest says "
                              f"{manifest[rel]}: the archive was changed after export; export the model again")
        members.append((info, rel, manifest[rel]))
    missing = sorted(set(manifest) - {rel for _, rel, _ in members[1:]})
    if missing:
        raise ExportError(f"{name} lacks {missing[:3]}, listed in its manifest: the archive is incomplete; "
                          "export the model again")
    total = sum(size for _, _, size in members)
    packed = sum(info.compress_size for info, _, _ in members)
    if total > MAX_EXPANSION * packed + EXPANSION_SLACK:
        raise ExportError(f"{name} would unpack to {total / MB:.0f} MB from {packed / MB:.1f} MB: a quantized "
                          f"model does not compress {MAX_EXPANSION}x, so this is no mixdq export (a zip bomb?); "
                          "refusing it: upload the .zip written by Export")
    return members


def _copy_bounded(src, dst, size: int, what: str) -> None:
    """Copy exactly `size` bytes, stopping at the first chunk past it: what is written
    never exceeds what the manifest declared, whatever the archive's headers claim."""
    n = 0
    while chunk := src.read(1 << 20):
        n += len(chunk)
        if n > size:
            raise ExportError(f"{what} holds more than the {size} bytes its manifest declares: the archive was "
                              "changed after export; refusing it, export the model again")
        dst.write(chunk)
    if n != size:
        raise ExportError(f"{what} holds {n} bytes where its manifest declares {size}: the archive is damaged; "
                          "export the model again")


@contextmanager
def _unpack_errors(name: str):
    """What goes wrong while reading or unpacking an archive, as an ExportError."""
    try:
        yield
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(f"could not unpack {name} ({e}); free some disk space, or choose another folder") from None
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ... from a damaged member
        raise ExportError(f"{name} is damaged and cannot be unpacked ({type(e).__name__}: {e}); "
                          "export the model again") from None


def import_archive(path, dest=None, device=None):
    """Load a pipeline from an archive written by `export_archive` (or any zip of a
    `save_quantized` folder).  It is checked against its manifest before anything is
    unpacked, then unpacked into a new folder in `dest` (default: a new temporary
    folder), kept because the pipeline reads its settings from there.  Any failure
    removes what was unpacked and raises ExportError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist; choose the .zip written by Export")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path.name} is not a zip archive: upload the .zip written by Export")
    made_dest = dest is None or not Path(dest).exists()
    dest = Path(dest) if dest is not None else None
    target = None
    try:
        with _unpack_errors(path.name), zipfile.ZipFile(path) as zf:
            members = _archive_members(zf, path.name)
            dest = dest or Path(tempfile.mkdtemp(prefix="mixdq-import-"))
            dest.mkdir(parents=True, exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix="export-", dir=dest))
            for info, rel, size in members:
                out = target / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "xb") as dst:
                    _copy_bounded(src, dst, size, f"{info.filename!r} in {path.name}")
        return load_quantized(target, device=device)
    except BaseException:
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
        if made_dest and dest is not None:
            try:
                os.rmdir(dest)  # only if empty: another import may be unpacking beside ours
            except OSError:
                pass
        raise
