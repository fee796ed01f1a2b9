"""What the app holds between clicks (the float model, its sensitivity and allocator, the
quantized model beside it) and the flow a click runs: allocate -> quantize -> generate and
measure.  No gradio here: `progress(fraction, desc=...)` is any callable (gr.Progress in the
app), and refusals are MixDQError (AppError when the page should title them)."""
from __future__ import annotations

import math
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import mixdq
from mixdq import measure
from mixdq.allocation import TOTAL, Allocation, Allocator, budget_bounds, pareto
from mixdq.defaults import is_embedded
from mixdq.errors import BudgetError, MixDQError, PlanError
from mixdq.memory import MB
from mixdq.plan import Plan
from mixdq.presets import presets
from mixdq.published import activation_options
from mixdq.tables import find_sensitivity, load_sensitivity

from .charts import ParetoPoints
from .text import fmt_mb, loaded_from

PARETO_BUDGETS = 8   # budgets swept for the size-vs-quality curve (x the ratios below)
PARETO_RATIOS = (0.6, 1.0, None)
# A budget this close outside the feasible range is still taken: half the 0.001 MB budgets are typed to.
RANGE_SLACK_MB = 5e-4


class AppError(MixDQError):
    """A refusal the page shows under its own title."""

    def __init__(self, message: str, title: str):
        super().__init__(message)
        self.title = title


def ignore(*args, **kwargs) -> None:
    """The default progress and warn callables: report nothing."""


# ------------------------------------------------------------------------------------------
# The slider's scale: feasible MB rounded to a step, so both ends stay feasible.
# ------------------------------------------------------------------------------------------
def _decimals(step: float) -> int:
    return max(0, -int(round(math.log10(step))))


def slider_spec(lo: float, hi: float) -> dict:
    """gr.Slider's minimum, maximum and step for the range [lo, hi] MB: about a thousand steps,
    never finer than a kilobyte, both ends rounded inward."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-3) / 1000)) if hi > lo else 0.001
    step = max(step, 0.001)
    d = _decimals(step)
    return {"minimum": round(math.ceil(lo / step) * step, d), "maximum": round(math.floor(hi / step) * step, d),
            "step": step}


def snap_up(value: float, spec: dict) -> float:
    """`value` rounded up to the slider's step (a plan's size shown as a budget is never below
    the plan), within the slider's range."""
    step = spec["step"]
    snapped = round(math.ceil(value / step - 1e-9) * step, _decimals(step))
    return min(max(snapped, spec["minimum"]), spec["maximum"])


def midpoint(spec: dict) -> float:
    return round((spec["minimum"] + spec["maximum"]) / 2, _decimals(spec["step"]))


# ------------------------------------------------------------------------------------------
# The quantized model.
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedModel:
    """The model shown beside the float one: quantized here, or loaded from an export."""
    pipe: object
    plan: Plan                  # what its layers run (quantize may fit the plan to this CPU)
    how: str                    # Markdown: how the plan was chosen, or which export it is
    note: str                   # what quantizing or loading took, and what it changed
    request: Plan | None        # the plan quantize was asked for; None: loaded from an export

    @property
    def from_export(self) -> bool:
        return self.request is None

    def planned_mb(self, costs) -> float | None:
        """The plan's exact UNet MB by the cost table (what the budget promised), for a model
        quantized here; None for an export, whose plan this app did not size."""
        return None if self.from_export else costs.total_mb(self.plan)

    def size_mb(self, costs) -> float:
        """UNet MB: the planned size, else the bytes the loaded UNet holds."""
        planned = self.planned_mb(costs)
        return planned if planned is not None else mixdq.model_nbytes(self.pipe.unet) / MB


def load_note(pipe, caught: list[warnings.WarningMessage]) -> str:
    """What loading an export did on this machine, as the library reports it: its
    SlowPathWarnings (layers on the float path) and the layers it re-rounded to fit this
    CPU's int8 kernels (`unet.mixdq_state.fitted`)."""
    notes = [str(w.message) for w in caught if issubclass(w.category, mixdq.SlowPathWarning)]
    fitted = pipe.unet.mixdq_state.fitted
    if fitted:
        notes.append(f"{fitted['layers']} {fitted['from']} layers re-rounded to {fitted['to']} "
                     "for this CPU's int8 kernels")
    return "loaded from an export" + "".join(f"; {n}" for n in notes)


class PlanFamily:
    """The allocator's plans over its feasible range (PARETO_BUDGETS budgets x PARETO_RATIOS),
    solved on first use, and its predictions for other plans: what the Pareto chart draws."""

    def __init__(self, allocator: Allocator):
        self.allocator = allocator
        self._allocs: list[Allocation] | None = None

    def allocations(self, progress=ignore) -> list[Allocation]:
        if self._allocs is None:
            lo, hi = self.allocator.feasible_range_mb()
            budgets = [min(max(lo + (hi - lo) * i / (PARETO_BUDGETS - 1), lo), hi) for i in range(PARETO_BUDGETS)]

            def tick(done, total):
                progress(0.92 + 0.07 * done / total, desc=f"Pareto curve: plan {done}/{total} (once)")

            self._allocs = self.allocator.family(budgets, PARETO_RATIOS, callback=tick)
        return self._allocs

    def predicted_loss(self, plan: Plan) -> float | None:
        """The predicted total loss of any plan; None for one the allocator has no prediction
        for (e.g. W7A8 layers), which the chart then leaves out."""
        try:
            return self.allocator.predicted_loss(plan)[TOTAL]
        except PlanError:
            return None


# ------------------------------------------------------------------------------------------
# The session.
# ------------------------------------------------------------------------------------------
class Session:
    """What the app holds between clicks.  One lock, which the page holds for a whole click:
    clicks are queued, and the two models never change under a running generation."""

    def __init__(self, pipe, *, sensitivity=None, calibration=None, workdir=None, presets_dir=None):
        self.lock = threading.RLock()
        self.float_pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.source = (getattr(pipe, "_mixdq_source", None) or {}).get("source", "?")
        self.defaults = mixdq.generation_defaults(pipe)
        self.costs = mixdq.layer_costs(pipe.unet)
        self.float_mb = self.costs.float_mb()
        self.n_layers = len(mixdq.quantizable_layers(pipe.unet))
        self.embedded = is_embedded(pipe)
        self.calibration = calibration or mixdq.Calibration.default(pipe)
        self.presets_dir = presets_dir
        self.presets = presets(pipe.unet, presets_dir)
        # sens_source ("given", "shipped", "cached", "published", "measured" or "none") lets the
        # header say which, sens_note why a shipped table of this model was not taken,
        # sens_message where a published table comes from, and sens_measured_as where and in
        # what a shipped table was measured when that is not this device and dtype
        self.sens_message = self.sens_measured_as = None
        if sensitivity is not None:
            self.sens, self.sens_source, self.sens_note = sensitivity, "given", None
        else:
            found = find_sensitivity(pipe, self.calibration, presets_dir=presets_dir)
            self.sens, self.sens_source, self.sens_note = found.table, found.source, found.shipped_note
            self.sens_message, self.sens_measured_as = found.message, found.measured_as
        self.allocator: Allocator | None = None
        self.family: PlanFamily | None = None          # comes with the allocator, for the chart
        if self.sens is not None:
            self._use(self.sens)
        self.current: QuantizedModel | None = None
        self.last: dict | None = None                  # the latest measurement (measure.compare)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mixdq-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    # ---- budget
    def budget_range(self) -> tuple[float, float]:
        """The feasible UNet sizes: the allocator's exact range once sensitivity is known; before,
        the same candidate bit-widths' byte counts with activations at their widest."""
        if self.allocator is not None:
            return self.allocator.feasible_range_mb()
        return budget_bounds(self.costs)

    def in_range(self, budget: float) -> bool:
        lo, hi = self.budget_range()
        return not (budget < lo - RANGE_SLACK_MB or budget > hi + RANGE_SLACK_MB)

    def slider_spec(self) -> dict:
        return slider_spec(*self.budget_range())

    def preset_value(self, preset) -> float:
        """The slider value of a preset (what its button sets): its exact size, rounded up."""
        return snap_up(preset.size_mb, self.slider_spec())

    def default_budget(self) -> float:
        if self.presets:
            return self.preset_value(self.presets[len(self.presets) // 2])
        return midpoint(self.slider_spec())

    def matching_preset(self, budget):
        """The preset a budget selects: the one whose button gives this slider value."""
        for p in self.presets:
            if abs(self.preset_value(p) - budget) < 1e-9 * max(1.0, budget):
                return p
        return None

    def check_budget(self, budget) -> float:
        """The budget as a float, or BudgetError saying the feasible range."""
        if budget is None or not isinstance(budget, (int, float)) or math.isnan(budget):
            raise BudgetError("enter a budget in MB")
        if not self.in_range(budget):
            if self.allocator is not None:
                self.allocator.check_budget(float(budget))   # the library's message
            lo, hi = self.budget_range()
            raise BudgetError(f"no plan fits {budget:g} MB: feasible budgets are "
                              f"{lo:.3f} .. {hi:.3f} MB for this model")
        return float(budget)

    # ---- the flow: allocate -> quantize -> generate & measure
    def measure_sensitivity(self, progress, warn=ignore) -> None:
        """The analysis, once, as the command line runs it (`tables.load_sensitivity`): `warn`
        is told what it will cost here before it starts; a GPU job on a CPU is refused with
        what to use instead."""
        def starting(line):
            warn(f"{line}. Presets are instant.")
            progress(0.0, desc="sensitivity: measuring every layer once (cached for next time)")

        progress(0.0, desc="sensitivity: timing one layer's measurement first")
        self._use(load_sensitivity(self.float_pipe, self.calibration, self.presets_dir, log=starting))
        self.sens_source = "measured"

    def _use(self, sens) -> None:
        self.sens = sens
        self.allocator = Allocator(sens, self.costs, **activation_options(sens))
        self.family = PlanFamily(self.allocator)

    def plan_for(self, budget: float, progress, warn=ignore) -> tuple[Plan, str, Allocation | None]:
        """(plan, how it was chosen in Markdown, the Allocation or None for a preset); `warn(text)`
        is told before a long stage starts."""
        preset = self.matching_preset(budget)
        if preset is not None:
            progress(0.05, desc=f"allocate: preset {preset.name}")
            return preset.plan, f"preset **{preset.name}**", None
        if self.allocator is None:
            self.measure_sensitivity(progress, warn)
        lo, hi = self.allocator.feasible_range_mb()
        note = ""
        if budget > hi:
            # Before sensitivity was known the slider's top was an upper bound on the widest plan;
            # a budget above the widest plan means "the widest plan".
            budget, note = hi, " (the widest plan)"
        progress(0.05, desc=f"allocate: integer program for {fmt_mb(budget)}")
        alloc = self.allocator.solve(budget)
        cut = "" if alloc.optimal else f", time limit: within {alloc.gap:.2%} of optimal"
        return alloc.plan, f"allocated for **{fmt_mb(budget)}**{note} (ILP, {alloc.solve_s:.2f} s{cut})", alloc

    def quantize(self, plan: Plan, how: str, progress) -> QuantizedModel:
        """A quantized copy of the float model for `plan` (the current one if it already is)."""
        if self.current is not None and not self.current.from_export and self.current.request == plan:
            progress(0.3, desc="quantize: this plan is already quantized")
            self.current = replace(self.current, how=how, note="already quantized (reused)")
            return self.current
        self.current = None      # drop the old copy before making a new one
        progress(0.1, desc="quantize: copying the float UNet")
        _, q = measure.pair(self.float_pipe)

        def calib(done, total):
            progress(0.1 + 0.25 * done / max(total, 1), desc=f"quantize: calibrating activations {done}/{total}")

        report = mixdq.quantize(q, plan, self.calibration, progress=False, callback=calib)
        note = (f"quantized in {report.seconds_quantize:.2f} s + calibrated in {report.seconds_calibrate:.2f} s "
                f"({len(self.calibration.prompts)} prompts)" + "".join(f"; {n}" for n in report.notes))
        # report.plan is the plan quantize built (W8A8 -> W7A8 where this CPU's int8 backend saturates)
        self.current = QuantizedModel(q, report.plan, how, note, request=plan)
        return self.current

    def compare(self, prompt, seed, steps, progress, start: float, span: float) -> dict:
        """Generate with both models and measure (measure.compare); kept as `last`."""
        self.last = measure.compare(self.float_pipe, self.current.pipe, prompt, seed, steps,
                                    progress=lambda f, d: progress(start + span * f, desc=f"generate: {d}"))
        return self.last

    def generate(self, budget, prompt, seed, steps, progress, warn=ignore) -> tuple[dict, Allocation | None]:
        """A click on Quantize & generate: (the measurement, the Allocation or None)."""
        measure.check_request(prompt, seed, steps)   # everything before any long stage: a typo costs nothing
        budget = self.check_budget(budget)
        plan, how, alloc = self.plan_for(budget, progress, warn)
        self.quantize(plan, how, progress)
        return self.compare(prompt, seed, steps, progress, 0.4, 0.5), alloc

    def load(self, path, prompt, seed, steps, progress) -> dict:
        """A click on Load & generate: the export at `path` becomes the quantized model."""
        measure.check_request(prompt, seed, steps)
        progress(0.05, desc="load: unpacking and verifying the archive")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", mixdq.SlowPathWarning)
            loaded = mixdq.import_archive(path, dest=self.workdir / "imports", device=self.float_pipe.unet.device)
        if not measure.same_architecture(self.float_pipe, loaded):
            raise AppError("This export was made from a different model than the one the app runs, so "
                           "there is no float image to compare with. Start the app with "
                           "`--model PATH_OF_THE_EXPORT` to generate with it alone.", title="Different model")
        self.current = QuantizedModel(loaded, mixdq.current_plan(loaded.unet), how=loaded_from(path),
                                      note=load_note(loaded, caught), request=None)
        return self.compare(prompt, seed, steps, progress, 0.2, 0.7)

    def export(self) -> Path:
        """The current quantized model as one zip in the work folder (mixdq.export_archive)."""
        if self.current is None:
            raise AppError("Nothing to export yet: press Quantize & generate first.", title="No model")
        name = f"mixdq-{self.current.size_mb(self.costs):.3f}MB-{time.strftime('%Y%m%d-%H%M%S')}.zip"
        return mixdq.export_archive(self.current.pipe, self.workdir / "exports" / name, embedded=self.embedded)

    # ---- what the Pareto chart shows
    def pareto_points(self, alloc: Allocation | None = None, progress=ignore,
                      ring_current: bool = True) -> ParetoPoints | None:
        """The Pareto chart's points (None before sensitivity), the current model ringed if
        `ring_current`.  `alloc`, the plan just allocated, is optimal for its own budget, so the
        front is drawn through it."""
        if self.family is None:
            return None
        allocs = self.family.allocations(progress)
        front = pareto(allocs + ([alloc] if alloc is not None else []))
        chosen = None
        if ring_current and self.current is not None:
            loss = alloc.predicted[TOTAL] if alloc is not None else self.family.predicted_loss(self.current.plan)
            chosen = (self.current.size_mb(self.costs), loss)
        return ParetoPoints(front=[(a.size_mb, a.predicted[TOTAL]) for a in front],
                            family=[(a.size_mb, a.predicted[TOTAL]) for a in allocs], chosen=chosen,
                            presets=[(p.size_mb, self.family.predicted_loss(p.plan), p.name) for p in self.presets])
