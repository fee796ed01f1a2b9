"""mixdq: MixDQ mixed-precision quantization for few-step text-to-image models.

The flow, one verb per step:

    pipe = load_pipeline()                                  # loading.py
    calibration = Calibration.default(pipe)                 # calibrate.py
    scores = sensitivity(pipe, calibration)                 # sensitivity_analysis.py
    plan = allocate(scores, layer_costs(pipe.unet), budget_mb=...)   # allocation.py
    report = quantize(pipe, plan, calibration)              # quantization.py
    save_quantized(pipe, "out/")                            # export.py
    pipe = load_quantized("out/")            # or, with mixdq imported, DiffusionPipeline.from_pretrained("out/")
"""
from .calibrate import Calibration, bos_embedding, float_ranges
from .errors import BudgetError, ExportError, GPUJobError, MixDQError, ModelNotFoundError, PlanError, SlowPathWarning
from .defaults import generation_defaults
from .loading import load_pipeline
from .memory import LayerCosts, layer_costs, model_nbytes, stored_nbytes
from .plan import LayerBits, Plan
from .quant import quantizable_layers
from .quantization import QuantReport, QuantState, current_plan, quantize, quantize_unet

__all__ = [
    "load_pipeline", "generation_defaults", "Calibration", "float_ranges", "quantize",
    "QuantReport", "QuantState", "quantize_unet", "current_plan", "bos_embedding", "Plan", "LayerBits", "quantizable_layers",
    "layer_costs", "LayerCosts", "model_nbytes", "stored_nbytes", "MixDQError", "PlanError", "BudgetError",
    "ModelNotFoundError", "ExportError", "GPUJobError", "SlowPathWarning",
]
from .export import export_archive, import_archive, load_quantized, save_quantized  # noqa: E402
from .sensitivity_analysis import Sensitivity, sensitivity  # noqa: E402
from .allocation import allocate  # noqa: E402

__all__ += ["save_quantized", "load_quantized", "export_archive", "import_archive", "sensitivity", "Sensitivity",
            "allocate", "QuantizedUNet2DConditionModel"]


def __getattr__(name):
    # Imported on first use: the class subclasses diffusers' UNet, whose import takes seconds.
    # An export's model_index.json names ["mixdq", "QuantizedUNet2DConditionModel"]; diffusers'
    # loader looks that class up here, and ModelMixin too (a component's base classes, looked
    # up in its library, tell it which method loads it).
    if name in ("QuantizedUNet2DConditionModel", "ModelMixin"):
        from . import diffusers_unet

        return getattr(diffusers_unet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
