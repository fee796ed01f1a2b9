"""OpenVINO beside mixdq: the tool a CPU user would reach for instead.

`python -m bench.run --variants W8A8 openvino-fp32 openvino-int8` converts the same
random-weight UNet with `openvino.convert_model`, saves it as OpenVINO IR, and once the
torch rounds are done compiles it for the CPU with the benchmark's thread count and
times it on the same inputs.  openvino-int8 is NNCF's default post-training
quantization of that model, calibrated on the benchmark's own step inputs.
Both run at float32 precision where not quantized: OpenVINO would pick bfloat16 on
CPUs that have it, which no other variant uses.  requirements-dev.txt installs both.

Why saved and timed afterwards: OpenVINO's compiled FP32 model holds its own copy of
the weights (about 1.1x them), so an SDXL-size float32 UNet (10 GiB), its quantized
variants and OpenVINO's copy do not fit together in the 24 GiB of the project's
machines (the process was killed when they were built side by side).  NNCF's pass over
that IR needs about 15 GiB more on its own, so it runs in a process of its own once the
torch UNet is gone (`quantize`), and writes an INT8 IR that `build` compiles.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

VARIANTS = ("openvino-fp32", "openvino-int8")


class _Positional(torch.nn.Module):
    """The UNet step with positional tensor inputs and one tensor out, as OpenVINO converts it."""

    def __init__(self, unet, keys):
        super().__init__()
        self.unet, self.keys = unet, keys

    def forward(self, *args):
        kw = dict(zip(self.keys, args))
        added = {k: kw.pop(k) for k in ("text_embeds", "time_ids") if k in kw}
        if added:
            kw["added_cond_kwargs"] = added
        return self.unet(**kw, return_dict=False)[0]


def _flat(inputs: dict) -> dict:
    """The step's inputs with SDXL's added_cond_kwargs flattened, in a fixed order."""
    flat = {k: v for k, v in inputs.items() if k != "added_cond_kwargs"}
    flat.update(inputs.get("added_cond_kwargs", {}))
    return flat


class CompiledStep:
    """Called like a UNet (`model(**inputs).sample`) so the benchmark times it alike."""

    def __init__(self, compiled, keys):
        self.compiled, self.keys = compiled, keys
        self.request = compiled.create_infer_request()

    def __call__(self, **inputs):
        flat = _flat(inputs)
        out = self.request.infer([flat[k].numpy() for k in self.keys])
        return SimpleNamespace(sample=torch.from_numpy(next(iter(out.values())).copy()))


def available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def versions() -> dict:
    import nncf
    import openvino

    return {"openvino": openvino.__version__, "nncf": nncf.__version__}


def _no_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage statistics unless the user decided
    otherwise; a benchmark sends nothing anywhere.  Where no decision is recorded yet,
    record the opt-out (what OpenVINO's `opt_in_out --opt_out` writes); a recorded
    decision is the user's and stays."""
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    checker = OptInChecker()
    if not os.path.exists(checker.consent_file()):
        checker.update_result(ConsentCheckResult.DECLINED)
        print(f"OpenVINO telemetry: no decision recorded; opted out in {checker.consent_file()}")


FOLDER_PREFIX = "mixdq-bench-openvino-"


def ir_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder for the IRs, marked with this process's id.  A killed run cannot
    remove its folder (an SDXL-size IR is 10 GiB): folders whose process is gone are
    removed first; unmarked ones are left alone."""
    for old in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        try:
            pid = int((old / "pid").read_text())
        except (OSError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
            print(f"removed {old}: left by a benchmark run that was killed (pid {pid})")
    folder = tempfile.TemporaryDirectory(prefix=FOLDER_PREFIX)
    Path(folder.name, "pid").write_text(str(os.getpid()))
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def convert(unet, inputs: dict, folder) -> tuple[str, float]:
    """(the saved IR's path, seconds): `unet` converted as OpenVINO IR into `folder`, at
    float32 (no fp16 compression), so that it can be compiled once `unet` is gone."""
    if not available():
        raise RuntimeError("the OpenVINO variants need OpenVINO and NNCF: pip install -r requirements-dev.txt")
    _no_telemetry()
    import openvino as ov

    flat = _flat(inputs)
    t = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(_Positional(unet, list(flat)), example_input=tuple(flat.values()))
    path = os.path.join(folder, "unet.xml")
    ov.save_model(model, path, compress_to_fp16=False)
    return path, time.perf_counter() - t


def quantize(ir_path: str, inputs: dict) -> tuple[str, float]:
    """(the INT8 IR's path, seconds): NNCF's default post-training quantization of the IR
    `convert` saved, calibrated on `inputs`, saved beside it.  Run in a process of its
    own: NNCF's statistics pass compiles its own copy of the model, and the memory that
    pass took goes back to the system only when the process that ran it ends."""
    import numpy as np

    folder = os.path.dirname(ir_path)
    calibration = os.path.join(folder, "calibration.npz")
    np.savez(calibration, *[v.numpy() for v in _flat(inputs).values()])
    out = os.path.join(folder, "unet-int8.xml")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.openvino_variants", ir_path, calibration, out],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        why = (f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}")
        raise RuntimeError(f"NNCF's quantization of {ir_path} failed ({why}; signal 9 is most often the "
                           "out-of-memory killer): leave openvino-int8 out of --variants, or run it on a "
                           "machine with more memory")
    return out, time.perf_counter() - t


def build(ir_path: str, inputs: dict, threads: int) -> tuple[CompiledStep, dict]:
    """(the compiled step, what compiling it took): a saved IR compiled for the CPU with
    `threads` threads, called with the step's `inputs`."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(ir_path)
    t = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": "f32"})
    return CompiledStep(compiled, list(_flat(inputs))), {**versions(), "compile_s": time.perf_counter() - t}


def _quantize_main(ir_path: str, calibration: str, out: str) -> None:
    import nncf
    import numpy as np
    import openvino as ov

    _no_telemetry()
    with np.load(calibration) as npz:
        sample = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    model = nncf.quantize(ov.Core().read_model(ir_path), nncf.Dataset([sample]), subset_size=1)
    ov.save_model(model, out, compress_to_fp16=False)


if __name__ == "__main__":  # quantize's own process: python -m bench.openvino_variants IR NPZ OUT
    _quantize_main(*sys.argv[1:])
