"""The allocate step for one model, from a pipeline to the plan a user takes home: which
sensitivity table (given, shipped, cached, published or measured), refusing an impossible
budget before any measuring, the Pareto family over content/quality ratios, and the
image-based selection among its candidates; or, for a published model, the same without its
weights (`allocator_without_weights`).  `python -m mixdq allocate` is these calls and its
printing."""
from __future__ import annotations

from typing import Callable, Sequence

from .allocation import (CONTENT, DEFAULT_RATIOS, DEFAULT_WEIGHT_CANDIDATES, QUALITY, TOTAL, Allocation, Allocator,
                         PlanEvaluator, _normalise_candidates, budget_bounds, check_budget_range,
                         default_eval_prompts, pareto, select)
from .errors import PlanError
from .plan import WEIGHT_BITS, Plan
from .published import activation_options
from .sensitivity_analysis import Sensitivity


def weight_candidates(content_bits: Sequence[int] | None = None,
                      quality_bits: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """The weight bit-widths each group may take: the defaults, with either group replaced."""
    cands = dict(DEFAULT_WEIGHT_CANDIDATES)
    if content_bits:
        cands[CONTENT] = tuple(content_bits)
    if quality_bits:
        cands[QUALITY] = tuple(quality_bits)
    return _normalise_candidates(cands, WEIGHT_BITS, "weight")


def _given_table(sensitivity: str | Sensitivity | None, log) -> Sensitivity | None:
    if sensitivity is None or isinstance(sensitivity, Sensitivity):
        return sensitivity
    if log:
        log(f"sensitivity: read from {sensitivity}")
    return Sensitivity.load(sensitivity)


def _allocator(table, costs, candidates, act_avg_bits, act_floor, decoupled) -> Allocator:
    return Allocator(table, costs, weight_candidates=candidates, act_floor=act_floor, decoupled=decoupled,
                     **activation_options(table, act_avg_bits))


def _check_early(budget_mb, costs, candidates, lower_bits_how) -> None:
    # These bounds contain the allocator's exact range (the low end is exact; the high end
    # assumes the widest activation choice), so they never refuse a feasible budget.
    if budget_mb is not None:
        check_budget_range(budget_mb, *budget_bounds(costs, candidates), candidates, lower_bits_how)


def allocator_for(pipe, calibration, *, sensitivity: str | Sensitivity | None = None,
                  candidates: dict | None = None, act_avg_bits: float | None = None,
                  act_floor: int | None = None, decoupled: bool = True, budget_mb: float | None = None,
                  lower_bits_how: str = "", log: Callable[[str], None] | None = None) -> Allocator:
    """The Allocator of this pipeline: its exact layer costs and a sensitivity table, the one
    given (a Sensitivity or a JSON path) or `tables.load_sensitivity`'s (shipped, cached,
    published, or measured now).  With `budget_mb`, a budget no plan can meet is refused before
    a table is measured: the feasible range depends only on the layer costs and the candidate
    bits.  `act_avg_bits`: see `activation_options`."""
    from .memory import layer_costs
    from .tables import load_sensitivity

    candidates = candidates or weight_candidates()
    costs = layer_costs(pipe.unet)
    table = _given_table(sensitivity, log)
    if table is None:
        _check_early(budget_mb, costs, candidates, lower_bits_how)
        table = load_sensitivity(pipe, calibration, log=log)
    return _allocator(table, costs, candidates, act_avg_bits, act_floor, decoupled)


def plan_budget(allocator: Allocator, budget_mb: float, ratios: Sequence[float | None] | None = None,
                evaluate: Callable[[Plan], dict] | None = None,
                progress: bool = True) -> tuple[Allocation, list[Allocation]]:
    """The best plan within `budget_mb` and every candidate it was chosen from (one per
    content/quality ratio, duplicates once).  With `evaluate` (a PlanEvaluator: quantize and
    compare images) the best measured candidate wins, else the best predicted one; the chosen
    plan's meta carries its measured numbers."""
    allocator.check_budget(budget_mb)
    family = allocator.family([budget_mb], list(ratios or DEFAULT_RATIOS), progress=progress)
    if evaluate is None or len(family) == 1:
        best = min(family, key=lambda a: (a.predicted[TOTAL], a.size_mb))
    else:
        best = select(family, evaluate, progress=progress)
    best.plan = Plan(dict(best.plan.items()), meta={**best.plan.meta, "measured": best.measured})
    return best, family


def plan_evaluator(pipe, calibration, eval_prompts: int = 16) -> PlanEvaluator:
    """What `plan_budget` measures candidates with: `eval_prompts` held-out prompts."""
    if eval_prompts < 1:
        raise PlanError(f"the selection needs at least one prompt, got {eval_prompts}")
    return PlanEvaluator(pipe, calibration, default_eval_prompts(pipe, eval_prompts))


def pareto_plans(allocator: Allocator, n_budgets: int, ratios: Sequence[float | None] | None = None,
                 progress: bool = True) -> list[Allocation]:
    """The Pareto front (size vs predicted loss) of the plans for `n_budgets` budgets spread
    over the feasible range, every ratio each."""
    if n_budgets < 2:
        raise PlanError("a Pareto front needs at least 2 budgets")
    lo, hi = allocator.feasible_range_mb()
    budgets = [lo + (hi - lo) * i / (n_budgets - 1) for i in range(n_budgets)]
    return pareto(allocator.family(budgets, list(ratios or DEFAULT_RATIOS), progress=progress))


def plans_without_weights(model: str | None, presets_dir=None) -> bool:
    """Whether `model` can be planned without its weights: a hub id whose architecture is
    published (mixdq.architectures) and for which a sensitivity table ships."""
    from .architectures import known_models
    from .tables import find_published

    return model in known_models() and find_published(model, presets_dir).table is not None


def allocator_without_weights(model: str, *, sensitivity: str | Sensitivity | None = None,
                              candidates: dict | None = None, act_avg_bits: float | None = None,
                              act_floor: int | None = None, decoupled: bool = True,
                              budget_mb: float | None = None, dtype=None, presets_dir=None,
                              lower_bits_how: str = "", log: Callable[[str], None] | None = None) -> Allocator:
    """The Allocator of the published model `model` (a hub id) without its weights: exact
    layer costs of its published architecture built on the meta device (in `dtype`: default
    the one `load_pipeline` would load it in here, so sizes are the loaded model's), and the
    sensitivity table published for it (`tables.find_published`), or the one given.  There are
    no images to select a plan by: `plan_budget(..., evaluate=None)` takes the least
    predicted loss."""
    from .architectures import meta_unet
    from .memory import layer_costs
    from .tables import find_published

    candidates = candidates or weight_candidates()
    costs = layer_costs(meta_unet(model, dtype))
    _check_early(budget_mb, costs, candidates, lower_bits_how)
    table = _given_table(sensitivity, log)
    if table is None:
        found = find_published(model, presets_dir)
        if found.table is None:
            raise PlanError(f"{found.message}: planning {model} without its weights needs a published "
                            "sensitivity table; load the model to measure it (`mixdq sensitivity`), or pass "
                            "--sensitivity FILE")
        table = found.table
        if log:
            log(f"sensitivity: {found.message}")
    return _allocator(table, costs, candidates, act_avg_bits, act_floor, decoupled)
