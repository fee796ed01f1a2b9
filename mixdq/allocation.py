"""Bit allocation: the integer program that turns sensitivities and a memory budget into a Plan.

Two integer programs, solved exactly (see Solving below):

* **activation program** (first): one binary per (layer, activation bits); maximise the
  summed, group-normalised activation score subject to an *average activation bit-width*
  target weighted by each layer's input-activation element count (activations are not stored,
  so they do not count in model memory; the average is what sets the speed/quality trade-off).
  An optional floor removes candidates below it.

* **weight program** (second, given the activation bits): one binary per (layer, weight bits),
  *float (16) included as an ordinary choice with its true byte cost*; maximise the summed,
  group-normalised weight score subject to the budget in **megabytes of UNet memory** as the
  quantized model really stores it (packed weights + scales + everything kept float: the
  numbers of `mixdq.layer_costs`, which the core library checks against measured bytes).

Scores.  Sensitivity gives, per layer and bit-width, SSIM of final images (content group) or
SQNR dB of the UNet output (quality group).  Both become a *loss* that is 0 for float:
``1 - SSIM`` and the noise-to-signal power ratio ``10^(-SQNR/10)`` (independent layer noises
add in power, so summing NSR is the right additive model; summing dB is not).  Each group's
losses are divided by the group's total loss with every layer at a reference width of the
table (`NORM_REF_BITS`: the lowest width MixDQ offers the group by default, weights content 2
and quality 4 bits, activations 4), so a group's whole loss there is 1 and both groups share
one objective ("group-normalised").  The reference is the table's, never the candidate set's:
offering or withdrawing a bit-width leaves every other option's value as it was.  The
objective maximised is ``-sum(normalised loss)``.

Decoupling.  Like the paper, the available bytes can be split between the groups by a ratio
``k``: content bits-per-weight = k x quality bits-per-weight.  ``k=None`` solves one joint
program with a single budget.  Sweeping k (and the budget) gives a family of plans; `pareto`
keeps the non-dominated ones (size vs predicted loss) and `select` picks the final plan by
*measured* metrics over several prompts, never one image.

Solving.  Both programs are multiple-choice knapsacks with one cap (or one cap per group,
which splits into one knapsack per group).  Their LP relaxation is solved exactly by the
convex-hull greedy; it bounds every plan, fixes almost every layer by reduced cost, and the few
layers left are searched exhaustively, so plans are proven optimal (794 SDXL layers: tens of
milliseconds).  A time limit (`DEFAULT_TIME_LIMIT_S`) bounds every solve; one cut short
returns the best plan found with its proven gap.  CBC is used only for caps that overlap.

Ties are resolved lexicographically: among plans with the optimal objective (within
`REL_TOL` of the objective's span), the smallest one wins, and equal (cost, score) options
keep the higher bit-width.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from .errors import BudgetError, PlanError
from .plan import ACT_BITS, FLOAT_BITS, WEIGHT_BITS, LayerBits, Plan

if TYPE_CHECKING:  # only PlanEvaluator's annotation; torch loads when a plan is measured
    import torch

CONTENT, QUALITY = "content", "quality"
GROUPS = (CONTENT, QUALITY)
TOTAL = "total"

# Candidate sets (per group).  Float is an ordinary candidate everywhere.
DEFAULT_WEIGHT_CANDIDATES = {CONTENT: (2, 4, 8, 16), QUALITY: (4, 8, 16)}
DEFAULT_ACT_CANDIDATES = {CONTENT: (4, 8, 16), QUALITY: (4, 8, 16)}
# Content/quality ratios swept for the Pareto family (the paper's k is around 0.6 for weights).
DEFAULT_RATIOS = (0.5, 0.6, 0.8, 1.0, 1.25, None)
MB = 1_000_000
# The width each group's losses are normalised at (see the module doc): the lowest width MixDQ
# offers the group by default, a constant of the group, never of the candidate set.  A table
# without it for some layer of a group normalises that group at its lowest width scored for
# every layer.  (Both groups at 4 bits weighed content ~9x more in the joint program; on the
# embedded model that lost 4.3 dB PSNR at the W4A8 size.)
NORM_REF_BITS = {"weight": {CONTENT: 2, QUALITY: 4}, "act": {CONTENT: 4, QUALITY: 4}}


# --------------------------------------------------------------------------------------------
# The exact multiple-choice knapsack, independent of models (this is what the brute-force
# tests check).
# --------------------------------------------------------------------------------------------
# Two plans whose objectives differ by at most REL_TOL x the objective's span (the summed
# best-minus-worst option value over layers) are ties, and the smaller plan wins.  Relative to
# the span, not to |objective|: raw scores such as SSIM near 1 add a large constant to every
# plan, and a tolerance scaled by that constant swallowed real differences between plans.
REL_TOL = 1e-9
# What Allocator.solve gives CBC-free search and CBC alike by default: an app slider never waits
# longer, and a plan cut short says how far from optimal it can be (Solution.gap).
DEFAULT_TIME_LIMIT_S = 1.5


@dataclass
class Solution:
    assign: dict[str, int]               # layer -> chosen option (bits)
    objective: float                     # sum of values of the chosen options
    cost: dict[str, float]               # per capped key (group names / TOTAL) -> cost used
    solve_s: float
    bound: float | None = None           # proven upper bound on the objective (None: the objective)
    optimal: bool = True                 # False: the time limit stopped the search first

    def __post_init__(self):
        if self.bound is None:
            self.bound = self.objective

    @property
    def gap(self) -> float:
        """Relative optimality gap, (bound - objective) / |objective|: no plan is better than this
        one by more than that fraction.  0 when proven optimal."""
        d = max(0.0, self.bound - self.objective)
        if d == 0.0:
            return 0.0
        return d / abs(self.objective) if self.objective else math.inf


def _cap_slack(cap: float) -> float:
    return cap + 1e-9 * max(1.0, abs(cap))


def solve_choice(values: Mapping[str, Mapping[int, float]], costs: Mapping[str, Mapping[int, float]],
                 caps: Mapping[str, float], groups: Mapping[str, str] | None = None,
                 time_limit: float | None = None) -> Solution:
    """Pick exactly one option per layer, maximising the summed value, with cost caps; among
    plans of the optimal value (within REL_TOL of the span) the least costly.

    caps: ``{"total": C}`` caps the summed cost of all layers; ``{group: C, ...}`` caps each
    group's summed cost (layers' groups from ``groups``).  Both kinds may be combined.
    time_limit (seconds, None = none): past it the best plan found so far is returned with
    ``optimal=False`` and the proven ``bound`` / ``gap``.
    Raises BudgetError when no choice fits (callers check feasibility first and give the
    user-facing range; this is the safety net).

    Caps that do not share layers (one total cap, or one cap per group) split the problem into
    independent one-cap knapsacks, solved exactly without CBC (`_knapsack`); caps that overlap
    go to CBC.
    """
    t0 = time.perf_counter()
    deadline = math.inf if time_limit is None else t0 + max(0.0, time_limit)
    layers = sorted(values)
    if not layers:
        return Solution({}, 0.0, {k: 0.0 for k in caps}, 0.0)
    groups = dict(groups or {})
    under = {n: [k for k in caps if k == TOTAL or groups.get(n) == k] for n in layers}

    # Drop dominated options: same or higher cost with no better value can never be needed,
    # and on exact (cost, value) ties the higher bit-width is kept (deterministic ties).
    # Each layer's kept options then rise strictly in cost and in value.
    options: dict[str, list[int]] = {}
    for n in layers:
        opts = sorted(values[n], key=lambda b: (costs[n][b], -values[n][b], -b))
        kept, best = [], -math.inf
        for b in opts:
            if values[n][b] > best:
                kept.append(b)
                best = values[n][b]
        options[n] = kept

    def cost_of(assign):
        return {key: sum(costs[n][b] for n, b in assign.items() if key in under[n]) for key in caps}

    def fits(assign):
        c = cost_of(assign)
        return all(c[k] <= _cap_slack(caps[k]) for k in caps)

    cheapest = {n: options[n][0] for n in layers}
    if not fits(cheapest):
        used = cost_of(cheapest)
        raise BudgetError("no choice of options fits the caps " + ", ".join(
            f"{k}: {used[k]:g} > {caps[k]:g}" for k in caps if used[k] > caps[k]))

    best_val = {n: options[n][-1] for n in layers}  # kept options rise in value and cost
    tol = REL_TOL * sum(values[n][options[n][-1]] - values[n][options[n][0]] for n in layers)
    if fits(best_val):
        # every layer's best fits: optimal, and the least costly of that value (an option of
        # equal value was pruned only if it was not cheaper)
        assign, bound, optimal = best_val, None, True
    elif all(len(u) <= 1 for u in under.values()):
        assign, bound, optimal = {}, 0.0, True
        for n in layers:
            if not under[n]:
                assign[n] = options[n][-1]
                bound += values[n][assign[n]]
        for key, cap in caps.items():
            part = [n for n in layers if under[n] == [key]]
            a, b, ok = _knapsack(part, values, costs, options, cap, tol, deadline)
            assign.update(a)
            bound += b
            optimal = optimal and ok
    else:
        assign, bound, optimal = _solve_cbc(layers, values, costs, options, caps, under, tol, deadline, cheapest)

    if not fits(assign):  # pragma: no cover - a bug in the search, never a user error
        raise RuntimeError("the allocator returned a plan over its caps; please report this")
    obj = sum(values[n][b] for n, b in assign.items())
    return Solution(assign, obj, cost_of(assign), time.perf_counter() - t0,
                    obj if optimal else max(bound, obj), optimal)


def _hull_greedy(layers, values, costs, options, cap):
    """The LP relaxation of a one-cap multiple-choice knapsack, and a plan next to it.

    The LP optimum takes, from the cheapest plan up, the upgrades along each layer's convex
    hull of (cost, value) in order of value per cost, until the first one that does not fit
    (the break); its slope `lam` is the LP's dual price of the cap.  Returns (plan, its value,
    lam, U) where the plan keeps taking later upgrades that still fit, and U = the LP optimum,
    an upper bound on every plan's value (Lagrangian: sum of max(v - lam c) + lam cap)."""
    choice = {n: options[n][0] for n in layers}
    used = sum(costs[n][options[n][0]] for n in layers)
    steps = []
    for i, n in enumerate(layers):
        o = options[n]
        hull = [0]
        for k in range(1, len(o)):
            while len(hull) >= 2:
                a, b = o[hull[-2]], o[hull[-1]]
                s_ab = (values[n][b] - values[n][a]) / (costs[n][b] - costs[n][a])
                s_bk = (values[n][o[k]] - values[n][b]) / (costs[n][o[k]] - costs[n][b])
                if s_ab >= s_bk:
                    break
                hull.pop()  # b lies under the chord a-k: never an LP choice
            hull.append(k)
        for j in range(1, len(hull)):
            a, b = o[hull[j - 1]], o[hull[j]]
            dc = costs[n][b] - costs[n][a]
            # (-slope, layer, step): a layer's steps stay in order, slopes being non-increasing
            steps.append((-(values[n][b] - values[n][a]) / dc, i, j, n, b, dc))
    steps.sort()
    lam, blocked, room = None, set(), _cap_slack(cap)
    for neg_slope, _, _, n, b, dc in steps:
        if n in blocked:
            continue
        if used + dc <= room:
            used += dc
            choice[n] = b
        else:
            if lam is None:
                lam = -neg_slope
            blocked.add(n)  # its later steps start from the option it did not reach
    lam = lam or 0.0
    value = sum(values[n][choice[n]] for n in layers)
    upper = sum(max(values[n][b] - lam * costs[n][b] for b in options[n]) for n in layers) + lam * cap
    return choice, value, lam, max(upper, value)


def _knapsack(layers, values, costs, options, cap, tol, deadline):
    """Exact one-cap multiple-choice knapsack: (plan, bound, proven optimal).

    Every plan's value is U - R - lam * (unused cap), R >= 0 the summed reduced costs
    max(v - lam c) - (v - lam c) of its options (lam, U from `_hull_greedy`).  So a plan
    within G of U uses only options of reduced cost <= G: at full size almost every layer has
    one such option, and the few left (the "core") are searched exhaustively (`_core_search`).
    G starts small and grows; a search that finds a plan within G of U has found the optimum.
    Past the deadline the best plan so far comes back with U as its bound."""
    if not layers:
        return {}, 0.0, True
    best = {n: options[n][-1] for n in layers}
    if sum(costs[n][b] for n, b in best.items()) <= _cap_slack(cap):
        return best, sum(values[n][b] for n, b in best.items()), True
    incumbent, low, lam, upper = _hull_greedy(layers, values, costs, options, cap)
    full = upper - low
    g = min(full, max(tol, full / 64))
    while True:
        found = _core_search(layers, values, costs, options, cap, lam, g + tol, tol, deadline)
        if found is None:
            return incumbent, upper, False
        plan, vmax = found
        if plan is not None and (vmax >= upper - g or g >= full):
            return plan, vmax, True
        if plan is None and g >= full:  # pragma: no cover - the hull plan is always within `full`
            return incumbent, upper, False
        g = upper - vmax if plan is not None else min(full, 2 * g)


def _core_search(layers, values, costs, options, cap, lam, g, tol, deadline):
    """All plans whose summed reduced cost is <= g, searched layer by layer over the
    non-dominated (cost, value) partial plans.  Returns (the least costly plan within tol of
    the best value, the best value), (None, -inf) if no plan is within g, or None when the
    deadline passed."""
    import numpy as np

    base_c = base_v = 0.0
    fixed, free = {}, []
    for n in layers:
        red = [values[n][b] - lam * costs[n][b] for b in options[n]]
        top = max(red)
        ok = [(b, top - s) for b, s in zip(options[n], red) if top - s <= g]
        if len(ok) == 1:
            fixed[n] = ok[0][0]
            base_c += costs[n][ok[0][0]]
            base_v += values[n][ok[0][0]]
        else:
            free.append((n, [b for b, _ in ok], np.array([costs[n][b] for b, _ in ok], dtype=float),
                         np.array([values[n][b] for b, _ in ok], dtype=float),
                         np.array([r for _, r in ok], dtype=float)))
    room = _cap_slack(cap)
    # cheapest / dearest completion of the layers not yet searched
    min_rest, max_rest = [0.0] * (len(free) + 1), [0.0] * (len(free) + 1)
    for i in range(len(free) - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + free[i][2].min()
        max_rest[i] = max_rest[i + 1] + free[i][2].max()
    c, v, r = np.array([base_c]), np.array([base_v]), np.zeros(1)
    back = []
    for i, (n, bits, oc, ov, orr) in enumerate(free):
        if time.perf_counter() > deadline:
            return None
        k = len(bits)
        C, V, R = (c[:, None] + oc).ravel(), (v[:, None] + ov).ravel(), (r[:, None] + orr).ravel()
        # a completion leaves at least this much of the cap unused, which costs lam per unit
        unused = np.maximum(0.0, cap - C - max_rest[i + 1])
        keep = np.flatnonzero((C <= room - min_rest[i + 1]) & (R + lam * unused <= g))
        if keep.size == 0:
            return None, -math.inf
        C, V, R = C[keep], V[keep], R[keep]
        # dominance: a partial plan no cheaper and no better than another is dropped
        # (np.lexsort is stable, so equal (cost, value) keep the first: deterministic)
        order = np.lexsort((-V, C))
        C, V, R, keep = C[order], V[order], R[order], keep[order]
        best_before = np.maximum.accumulate(V)
        nd = np.ones(len(V), dtype=bool)
        nd[1:] = V[1:] > best_before[:-1]
        c, v, r, keep = C[nd], V[nd], R[nd], keep[nd]
        back.append((keep // k, keep % k))
    if c[0] > room:
        return None, -math.inf
    vmax = float(v.max())
    j = int(np.argmax(v >= vmax - tol))   # v rises with cost: the first is the least costly
    plan = dict(fixed)
    for i in range(len(free) - 1, -1, -1):
        parent, opt = back[i]
        plan[free[i][0]] = free[i][1][int(opt[j])]
        j = int(parent[j])
    return plan, vmax


def _solve_cbc(layers, values, costs, options, caps, under, tol, deadline, start):
    """Caps that share layers: CBC, then a second stage for the least costly plan within tol of
    the optimum.  Returns (plan, bound, optimal); when the time limit stops CBC the plan is the
    best it found (else `start`, a plan that fits) and the bound the best one-cap LP bound
    (each cap alone, the others dropped).

    No warm start: PuLP's (PULP_CBC_CMD(warmStart=True)) made CBC return the starting plan as
    optimal on a four-layer instance (test_overlapping_caps_equal_brute_force[0])."""
    import pulp

    # Per-layer shift (one option per layer, so it changes no choice) and scale: the objective's
    # span becomes 1e3, far above CBC's absolute tolerances (1e-6 and so on).
    top = {n: values[n][options[n][-1]] for n in layers}
    span = sum(top[n] - values[n][options[n][0]] for n in layers) or 1.0
    vscale = 1e3 / span
    prob = pulp.LpProblem("mixdq_bits", pulp.LpMaximize)
    x = {(n, b): prob.add_variable(f"x_{i}_{b}", 0, 1, cat="Integer")
         for i, n in enumerate(layers) for b in options[n]}
    value_expr = pulp.lpSum(vscale * (values[n][b] - top[n]) * x[n, b] for n in layers for b in options[n])
    prob += value_expr
    for i, n in enumerate(layers):
        prob += pulp.lpSum(x[n, b] for b in options[n]) == 1, f"one_{i}"
    for key, cap in caps.items():
        prob += pulp.lpSum(costs[n][b] * x[n, b] for n in layers for b in options[n] if key in under[n]) <= cap, \
            f"cap_{key}"

    def run():
        left = deadline - time.perf_counter()
        if left <= 0:
            return False
        with warnings.catch_warnings():
            # PuLP 3.3 flags its bundled CBC as deprecated for 4.0; it is still the solver we ship with.
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, gapRel=0, gapAbs=0, threads=1,
                                       timeLimit=None if math.isinf(left) else left)
            status = prob.solve(solver)
        if pulp.LpStatus[status] != "Optimal":
            raise BudgetError(f"the integer program is {pulp.LpStatus[status].lower()} for caps {dict(caps)}")
        return prob.sol_status == pulp.LpSolutionOptimal

    def read():
        return {n: next(b for b in options[n] if (x[n, b].value() or 0) > 0.5) for n in layers}

    def bound():
        out = math.inf
        for key, cap in caps.items():
            part = [n for n in layers if key in under[n]]
            rest = sum(top[n] for n in layers if key not in under[n])
            out = min(out, rest + _hull_greedy(part, values, costs, options, cap)[3] if part else rest)
        return out

    if not run():
        plan = read() if prob.sol_status == pulp.LpSolutionIntegerFeasible else start
        return plan, bound(), False
    plan = read()
    opt = pulp.value(value_expr)
    prob += value_expr >= opt - tol * vscale, "optimal_value"
    prob.sense = pulp.LpMinimize
    prob.setObjective(pulp.lpSum(costs[n][b] * x[n, b] for n in layers for b in options[n]))
    # the value is proven optimal already; a second stage cut short only leaves a costlier tie
    if run() or prob.sol_status == pulp.LpSolutionIntegerFeasible:
        plan = read()
    return plan, None, True


# --------------------------------------------------------------------------------------------
# From sensitivities to normalised values.
# --------------------------------------------------------------------------------------------
def loss_from_score(metric: str, score: float) -> float:
    """Score -> loss that is 0 for float and grows as quality drops (see module doc)."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        raise ValueError(f"missing {metric} score")
    if metric == "ssim":
        return max(0.0, 1.0 - float(score))
    if metric == "sqnr":
        if math.isinf(score):
            return 0.0 if score > 0 else math.inf
        return 10.0 ** (-float(score) / 10.0)
    raise ValueError(f"unknown metric {metric!r}; expected 'ssim' or 'sqnr'")


def group_metric(group: str, decoupled: bool = True) -> str:
    """The metric that scores a group: SSIM of images for content, SQNR for quality.
    Without decoupling (the ablation) every layer is scored by SQNR."""
    if not decoupled:
        return "sqnr"
    return "ssim" if group == CONTENT else "sqnr"


def normalised_values(sens, kind: str, candidates: Mapping[str, Sequence[int]],
                      decoupled: bool = True) -> tuple[dict, dict]:
    """Per layer and candidate bit: value = -(loss / group scale).  Returns (values, scales).

    kind: "weight" or "act".  Float (16) has loss 0 without being measured.  A group's scale
    is its summed loss at the reference width (`reference_bits`), from the table alone, so
    it does not depend on `candidates`.  Without decoupling there is one group, so one
    normalisation."""
    table = sens.scores[kind]
    values, raw = {}, {}
    for n in sens.layers:
        g = sens.group[n]
        metric = group_metric(g, decoupled)
        raw[n] = {}
        for b in candidates[g]:
            if b == FLOAT_BITS:
                raw[n][b] = 0.0
                continue
            try:
                raw[n][b] = loss_from_score(metric, table[n][b][metric])
            except (KeyError, ValueError):
                raise PlanError(
                    f"sensitivity has no {metric} score for layer {n!r} at {kind} bits {b}; "
                    f"rerun `python -m mixdq sensitivity` with these candidate bits") from None
    norm_group = (lambda n: sens.group[n]) if decoupled else (lambda n: TOTAL)
    members: dict[str, list[str]] = {}
    for n in sens.layers:
        members.setdefault(norm_group(n), []).append(n)
    # a group offered float alone has nothing to weigh, and its table may score nothing
    scales = {k: _group_scale(sens, kind, layers, decoupled)
              if any(b != FLOAT_BITS for n in layers for b in raw[n]) else 1.0 for k, layers in members.items()}
    for n in sens.layers:
        s = scales[norm_group(n)]
        values[n] = {b: -(l / s) if math.isfinite(l) else -1e6 for b, l in raw[n].items()}
    return values, scales


def reference_bits(sens, kind: str, group: str, layers: Sequence[str], decoupled: bool = True) -> int:
    """The width the `group` layers among `layers` are normalised at: NORM_REF_BITS[kind][group]
    when the table scores every one of them there (with its group's metric), else the lowest
    width it scores for all of them."""
    common = None
    for n in layers:
        metric = group_metric(sens.group[n], decoupled)
        have = {b for b, m in sens.scores[kind].get(n, {}).items() if b != FLOAT_BITS and metric in m}
        common = have if common is None else common & have
    want = NORM_REF_BITS[kind][group]
    if not common:
        raise PlanError(f"the sensitivity table scores no {kind} bit-width for every layer of a group "
                        f"(the {group} group is normalised at one width, {want} bits by default); rerun "
                        "`python -m mixdq sensitivity` with the same candidate bits for every layer")
    return want if want in common else min(common)


def _group_scale(sens, kind, layers, decoupled) -> float:
    """Summed loss of `layers`, each group's at its reference width (one normalisation over
    both groups without decoupling still takes each layer at its own group's width)."""
    s = 0.0
    for group in GROUPS:
        members = [n for n in layers if sens.group[n] == group]
        if not members:
            continue
        ref = reference_bits(sens, kind, group, members, decoupled)
        losses = [loss_from_score(group_metric(group, decoupled), sens.scores[kind][n][ref][
            group_metric(group, decoupled)]) for n in members]
        # a layer that breaks the model at the reference width (SQNR -inf) says nothing of scale
        s += sum(l for l in losses if math.isfinite(l))
    return s if s > 0 else 1.0


def _normalise_candidates(cands, allowed, what) -> dict[str, tuple[int, ...]]:
    if cands is None:
        raise ValueError("candidates required")
    if not isinstance(cands, Mapping):
        cands = {g: tuple(cands) for g in GROUPS}
    out = {}
    for g in GROUPS:
        c = tuple(sorted(set(int(b) for b in cands.get(g, ()))))
        bad = [b for b in c if b not in allowed]
        if bad:
            raise PlanError(f"{what} candidate bits {bad} for group {g!r} not supported; allowed: {allowed}")
        if not c:
            raise PlanError(f"no {what} candidate bits for group {g!r}")
        out[g] = c
    return out


# --------------------------------------------------------------------------------------------
# Layer byte costs under a given activation choice.
# --------------------------------------------------------------------------------------------
def layer_bytes(costs, name: str, wbits: int, abits: int) -> int:
    """Exact bytes layer `name` holds at (wbits, abits): the core library's own count
    (`LayerCosts.layer_bytes`), the same number `quantize` makes true."""
    return int(costs.layer_bytes(name, LayerBits(wbits, abits)))


def weight_costs(costs, layers, act_bits: Mapping[str, int], candidates: Mapping[str, Sequence[int]],
                 groups: Mapping[str, str]) -> dict[str, dict[int, int]]:
    return {n: {w: layer_bytes(costs, n, w, act_bits.get(n, FLOAT_BITS)) for w in candidates[groups[n]]}
            for n in layers}


def _cands_str(weight_candidates: Mapping[str, Sequence[int]]) -> str:
    return "; ".join(f"{g} {{{','.join(map(str, c))}}}" for g, c in weight_candidates.items())


def check_budget_range(budget_mb: float, lo: float, hi: float, weight_candidates, lower_bits_how: str = "") -> None:
    """BudgetError naming the feasible range [lo, hi] MB and what to change, if `budget_mb` is
    outside it (half a byte of slack: sizes are whole bytes).  `lower_bits_how` says how the
    caller's user allows lower bit-widths (a command line names its flags)."""
    if not isinstance(budget_mb, (int, float)) or math.isnan(budget_mb):
        raise BudgetError(f"budget must be a number of megabytes, got {budget_mb!r}")
    # The printed range is rounded inward so that both printed ends are themselves feasible.
    lo_s, hi_s = math.ceil(lo * 1000) / 1000, math.floor(hi * 1000) / 1000
    if budget_mb * MB < lo * MB - 0.5:
        raise BudgetError(
            f"no plan fits in {budget_mb:g} MB: the smallest this UNet can be with weight candidates "
            f"{_cands_str(weight_candidates)} is {lo_s:.3f} MB (feasible budgets: {lo_s:.3f} .. {hi_s:.3f} MB); "
            f"raise the budget or allow lower bit-widths{lower_bits_how}")
    if budget_mb * MB > hi * MB + 0.5:
        raise BudgetError(
            f"a budget of {budget_mb:g} MB is above the largest plan, {hi_s:.3f} MB, which already keeps "
            f"every candidate at its widest (feasible budgets: {lo_s:.3f} .. {hi_s:.3f} MB); "
            f"use at most {hi_s:.3f} MB")


# --------------------------------------------------------------------------------------------
# The user-facing allocation.
# --------------------------------------------------------------------------------------------
def budget_bounds(costs, weight_candidates=None) -> tuple[float, float]:
    """(smallest, largest) UNet MB any plan over the allocator's candidate weight bits can
    take, before sensitivity is known.  The smallest is exact (lowest candidate bits); the
    largest takes each layer's widest option with or without activation quantization, so the
    allocator's exact maximum (which knows the activation bits) can be a little lower."""
    from .sensitivity_analysis import layer_group

    cands = weight_candidates or DEFAULT_WEIGHT_CANDIDATES
    lo = hi = costs.fixed_bytes
    for name, float_bytes in costs.float_bytes.items():
        options = [costs.bytes[name][w] for w in cands[layer_group(name)] if w != FLOAT_BITS]
        if FLOAT_BITS in cands[layer_group(name)]:
            options += [float_bytes, costs.bytes[name][FLOAT_BITS]]
        lo += min(options)
        hi += max(options)
    return lo / MB, hi / MB


@dataclass
class Allocation:
    plan: Plan
    budget_mb: float
    size_mb: float                        # UNet MB under the plan (LayerCosts.total_mb)
    ratio: float | None                   # content/quality bits-per-weight ratio, None = joint
    predicted: dict[str, float]           # normalised predicted loss per group (+ "total")
    solve_s: float
    measured: dict[str, float] = field(default_factory=dict)
    optimal: bool = True                  # False: the time limit stopped the weight program first
    gap: float = 0.0                      # then: the predicted loss is within this fraction of the best

    def to_dict(self) -> dict:
        return {"budget_mb": self.budget_mb, "size_mb": self.size_mb, "ratio": self.ratio,
                "predicted": self.predicted, "solve_s": self.solve_s, "measured": self.measured,
                "optimal": self.optimal, "gap": self.gap, "summary": self.plan.summary()}


@dataclass
class Allocator:
    """Holds one sensitivity table + cost table and answers budget queries.

    The activation program is solved once at construction (it does not depend on the budget),
    within `act_time_limit` seconds (a weight program's limit is `solve`'s) (`act_optimal` / `act_gap` say how it
    ended).
    """
    sens: object
    costs: object
    weight_candidates: Mapping[str, Sequence[int]] | None = None
    act_candidates: Mapping[str, Sequence[int]] | None = None
    act_avg_bits: float | None = 8.0
    act_floor: int | None = None
    decoupled: bool = True
    act_time_limit: float | None = DEFAULT_TIME_LIMIT_S

    def __post_init__(self):
        self.weight_candidates = _normalise_candidates(
            self.weight_candidates or DEFAULT_WEIGHT_CANDIDATES, WEIGHT_BITS, "weight")
        act = _normalise_candidates(self.act_candidates or DEFAULT_ACT_CANDIDATES, ACT_BITS, "activation")
        if self.act_floor is not None:
            if self.act_floor not in ACT_BITS:
                raise PlanError(f"activation floor {self.act_floor} not supported; allowed: {ACT_BITS}")
            act = {g: tuple(b for b in c if b >= self.act_floor) or (FLOAT_BITS,) for g, c in act.items()}
        self.act_candidates = act
        self.layers = list(self.sens.layers)
        missing = [n for n in self.layers if n not in self.costs.float_bytes]
        if missing:
            raise PlanError(f"sensitivity names layer {missing[0]!r} that this model does not have; "
                            "the sensitivity cache belongs to another model")
        # Layers the model has but sensitivity did not score stay float; they still cost bytes.
        self.unscored = [n for n in self.costs.float_bytes if n not in set(self.layers)]
        self.groups = {n: self.sens.group[n] for n in self.layers}
        self.act_bits, self.act_solve_s, self.act_optimal, self.act_gap = self._solve_activations()
        self.wvalues, self.wscales = normalised_values(self.sens, "weight", self.weight_candidates, self.decoupled)
        self.wcosts = weight_costs(self.costs, self.layers, self.act_bits, self.weight_candidates, self.groups)
        self.fixed_bytes = int(self.costs.fixed_bytes) + sum(int(self.costs.float_bytes[n]) for n in self.unscored)
        self.weight_numel = {n: int(self.costs.weight_numel[n]) for n in self.layers}

    # ---- activations
    def _solve_activations(self) -> tuple[dict[str, int], float, bool, float]:
        values, _ = normalised_values(self.sens, "act", self.act_candidates, self.decoupled)
        numel = {n: int(self.sens.act_numel[n]) for n in self.layers}
        costs = {n: {a: a * numel[n] for a in self.act_candidates[self.groups[n]]} for n in self.layers}
        if self.act_avg_bits is None:
            cap = sum(max(c.values()) for c in costs.values())
        else:
            cap = self.act_avg_bits * sum(numel.values())
            lo = sum(min(c.values()) for c in costs.values()) / max(1, sum(numel.values()))
            if cap + 1e-9 < lo * sum(numel.values()):
                raise BudgetError(f"activation average of {self.act_avg_bits:g} bits is below the smallest "
                                  f"possible {lo:.3g} with candidates {self.act_candidates}; raise the "
                                  "average (--act-avg-bits) or allow lower activation bits")
        sol = solve_choice(values, costs, {TOTAL: cap}, time_limit=self.act_time_limit)
        return sol.assign, sol.solve_s, sol.optimal, sol.gap

    # ---- feasibility
    def feasible_range_mb(self) -> tuple[float, float]:
        lo = self.fixed_bytes + sum(min(c.values()) for c in self.wcosts.values())
        hi = self.fixed_bytes + sum(max(c.values()) for c in self.wcosts.values())
        return lo / MB, hi / MB

    def check_budget(self, budget_mb: float) -> None:
        check_budget_range(budget_mb, *self.feasible_range_mb(), self.weight_candidates)

    # ---- the weight program
    def split(self, avail: float, ratio: float | None) -> dict[str, float]:
        """Caps for the weight program: one joint cap, or content/quality caps from the ratio.

        The ratio-derived content share is projected onto the interval where both groups stay
        feasible, so every feasible total budget stays feasible for every ratio, and both caps
        are non-decreasing in the budget (hence a larger budget never gives a worse plan)."""
        if ratio is None:
            return {TOTAL: avail}
        if not ratio > 0:
            raise PlanError(f"content/quality ratio must be > 0, got {ratio}")
        nc = sum(self.weight_numel[n] for n in self.layers if self.groups[n] == CONTENT)
        nq = sum(self.weight_numel[n] for n in self.layers if self.groups[n] == QUALITY)
        if nc == 0 or nq == 0:
            return {TOTAL: avail}

        def bound(g, f):
            return sum(f(self.wcosts[n].values()) for n in self.layers if self.groups[n] == g)

        min_c, max_c, min_q, max_q = bound(CONTENT, min), bound(CONTENT, max), bound(QUALITY, min), bound(QUALITY, max)
        want_c = avail * ratio * nc / (ratio * nc + nq)
        lo, hi = max(min_c, avail - max_q), min(max_c, avail - min_q)
        cap_c = min(max(want_c, lo), hi)
        return {CONTENT: cap_c, QUALITY: avail - cap_c}

    def solve(self, budget_mb: float, ratio: float | None = None,
              time_limit: float | None = DEFAULT_TIME_LIMIT_S) -> Allocation:
        """The plan of least predicted loss that fits `budget_mb` (see the module doc).

        time_limit: seconds for the weight program (None: no limit).  A solve cut short
        returns the best plan found, with ``Allocation.optimal`` False and ``gap`` its proven
        relative distance from the optimum (also in the plan's meta)."""
        self.check_budget(budget_mb)
        # whole bytes; the 1e-6 absorbs decimal MB not representable in binary (0.513384 MB)
        avail = math.floor(budget_mb * MB + 1e-6) - self.fixed_bytes
        caps = self.split(avail, ratio)
        sol = solve_choice(self.wvalues, self.wcosts, caps, self.groups, time_limit=time_limit)
        plan_layers = {n: LayerBits(sol.assign[n], self.act_bits[n]) for n in self.layers}
        plan_layers = {n: b for n, b in plan_layers.items() if not b.is_float}
        predicted = self._predicted(sol.assign)
        size_mb = (self.fixed_bytes + sum(self.wcosts[n][sol.assign[n]] for n in self.layers)) / MB
        plan = Plan(plan_layers, meta={
            "budget_mb": budget_mb, "size_mb": round(size_mb, 6), "ratio": ratio,
            "decoupled": self.decoupled, "act_avg_bits": self.act_avg_bits,
            "predicted_loss": predicted, "model": getattr(self.sens, "meta", {}).get("model"),
            "optimal": sol.optimal, "gap": sol.gap})
        # The core library's own count is the truth the budget promises; check it agrees.
        reported = self.costs.total_mb(plan)
        if abs(reported - size_mb) * MB > 0.5 or reported * MB > budget_mb * MB + 0.5:
            raise RuntimeError(f"cost model mismatch: allocator counted {size_mb:.6f} MB, "
                               f"layer_costs reports {reported:.6f} MB for budget {budget_mb} MB")
        return Allocation(plan, budget_mb, size_mb, ratio, predicted, sol.solve_s + self.act_solve_s,
                          optimal=sol.optimal, gap=sol.gap)

    def _predicted(self, weight_bits: Mapping[str, int]) -> dict[str, float]:
        """Predicted loss per group and "total" of one weight width per scored layer."""
        per = {g: 0.0 for g in GROUPS}
        for n in self.layers:
            per[self.groups[n]] += -self.wvalues[n][weight_bits[n]]
        # without decoupling one normalisation spans every layer, so only the total means anything
        return {**per, TOTAL: sum(per.values())} if self.decoupled else {TOTAL: sum(per.values())}

    def predicted_loss(self, plan: Mapping[str, LayerBits]) -> dict[str, float]:
        """The weight program's predicted loss for any plan of this model (a preset, an
        imported or hand-made plan), on the scale `solve` reports as `Allocation.predicted`:
        the group-normalised loss per group and "total" ("total" alone without decoupling).
        Layers the plan leaves out are float (loss 0).

        Raises PlanError for a plan the program has no prediction for: a weight width that is
        not a candidate of the layer's group (e.g. W7A8, which fit_plan_to_device makes), or
        a quantized layer the sensitivity did not score."""
        unscored = [n for n, bits in plan.items() if n not in self.wvalues and bits.weight != FLOAT_BITS]
        if unscored:
            raise PlanError(f"no predicted loss: layer {unscored[0]!r} is quantized in the plan but "
                            "the sensitivity did not score it")
        widths = {n: plan[n].weight if n in plan else FLOAT_BITS for n in self.layers}
        for n, w in widths.items():
            if w not in self.wvalues[n]:
                raise PlanError(f"no predicted loss: layer {n!r} has weight bits {w}, not a candidate of "
                                f"its {self.groups[n]} group {self.weight_candidates[self.groups[n]]}")
        return self._predicted(widths)

    def family(self, budgets_mb: Iterable[float], ratios: Sequence[float | None] = DEFAULT_RATIOS,
               progress: bool = False, callback: Callable[[int, int], None] | None = None) -> list[Allocation]:
        """Every (budget, ratio) plan, budget by budget; duplicates (same plan) are kept once.
        callback(done, total) is called after each solve (an app's progress bar)."""
        from tqdm.auto import tqdm

        out, seen = [], set()
        jobs = list(itertools.product(budgets_mb, ratios))
        for i, (b, k) in enumerate(tqdm(jobs, desc="allocate", disable=not progress)):
            a = self.solve(b, k)
            key = tuple(sorted((n, bits.weight, bits.act) for n, bits in a.plan.items()))
            if key not in seen:
                seen.add(key)
                out.append(a)
            if callback is not None:
                callback(i + 1, len(jobs))
        return out


def pareto(allocs: Sequence[Allocation], key: str = TOTAL) -> list[Allocation]:
    """Non-dominated plans on (size_mb, predicted[key]), sorted by size."""
    pts = sorted(allocs, key=lambda a: (a.size_mb, a.predicted[key]))
    front, best = [], math.inf
    for a in pts:
        if a.predicted[key] < best - 1e-15:
            front.append(a)
            best = a.predicted[key]
    return front


def selection_score(measured: Mapping[str, float]) -> float:
    """How the final plan is chosen among candidates at one budget: mean SSIM to the float
    images over several prompts, plus prompt-alignment accuracy when the model has a checker
    (both in [0, 1], so a 1/n change in accuracy weighs like a 1/n change in SSIM)."""
    return float(measured.get("ssim", 0.0)) + float(measured.get("alignment", 0.0))


def select(allocs: Sequence[Allocation], evaluate: Callable[[Plan], Mapping[str, float]],
           score: Callable[[Mapping[str, float]], float] = selection_score,
           progress: bool = False) -> Allocation:
    """Measure each candidate plan with `evaluate` (float metrics over several prompts) and
    return the best; each Allocation keeps its measured numbers in `.measured`.
    Ties go to the smaller plan."""
    from tqdm.auto import tqdm

    if not allocs:
        raise PlanError("no candidate plans to select from")
    for a in tqdm(allocs, desc="select", disable=not progress):
        a.measured = dict(evaluate(a.plan))
    return max(allocs, key=lambda a: (score(a.measured), -a.size_mb))


def allocate(sens, costs, budget_mb: float, ratio: float | None = None, **kw) -> Plan:
    """One plan for one budget (no selection): the library verb."""
    return Allocator(sens, costs, **kw).solve(budget_mb, ratio).plan


# --------------------------------------------------------------------------------------------
# Measuring candidate plans (selection, presets, evidence).
# --------------------------------------------------------------------------------------------
class PlanEvaluator:
    """Quantizes a copy of the UNet per plan and measures it against the float model on
    several prompts (never one image): mean SSIM and PSNR of the images, prompt-alignment
    accuracy when the model has a checker (the embedded model), and the measured UNet bytes.

    Float images are generated once; each plan costs one calibration pass + one eval pass.
    """

    def __init__(self, pipe, calibration, eval_prompts: Sequence[str], seed: int = 1000,
                 batch_size: int = 8, progress: bool = False):
        from .calibrate import Calibration

        if not eval_prompts:
            raise PlanError("plan evaluation needs at least one prompt")
        self.pipe, self.calibration, self.progress = pipe, calibration, progress
        self.eval = Calibration(list(eval_prompts), seed=seed, batch_size=batch_size,
                                num_inference_steps=calibration.num_inference_steps,
                                guidance_scale=calibration.guidance_scale,
                                height=calibration.height, width=calibration.width)
        self.checker = _alignment_checker(self.eval.prompts)
        self.float_images = self._images(pipe)
        self.float_metrics = {"alignment": self.checker(self.float_images)} if self.checker else {}

    def _images(self, pipe) -> "torch.Tensor":
        import torch

        from .calibrate import run_pipeline

        outs = run_pipeline(pipe, self.eval, output_type="pt", progress=False)
        return torch.cat([o.images for o in outs]).float().clamp(0, 1)

    def __call__(self, plan: Plan, bos_aware: bool = True) -> dict[str, float]:
        from .measure import pair
        from .memory import stored_nbytes
        from .metrics import psnr, ssim
        from .quantization import quantize

        _, twin = pair(self.pipe)
        quantize(twin, plan, self.calibration, bos_aware=bos_aware, progress=False)
        images = self._images(twin)
        out = {"ssim": float(ssim(images, self.float_images)),
               "psnr": float(psnr(images, self.float_images)),
               "size_mb": stored_nbytes(twin.unet) / MB}
        if self.checker:
            out["alignment"] = self.checker(images)
        del twin
        return out


def _alignment_checker(prompts: Sequence[str]):
    """Prompt-alignment accuracy for the embedded model's world, or None for other prompts."""
    try:
        from .zoo import alignment, parse_caption
    except ImportError:  # pragma: no cover - zoo is part of the package
        return None
    if not all(parse_caption(p) is not None for p in prompts):
        return None
    prompts = list(prompts)
    return lambda images: float(alignment(list(images), prompts)["all"])


def default_eval_prompts(pipe, n: int = 16, purpose: str = "select") -> list[str]:
    """Prompts for measuring plans.  Two disjoint sets: "select" picks the plan, "report" gives
    the numbers shown for it (so a reported number is not the one it was chosen on).
    The embedded model: held-out captions of its world (alignment can be scored); other models:
    the two ends of the shipped calibration prompt list."""
    from .defaults import is_embedded

    if purpose not in ("select", "report"):
        raise ValueError("purpose must be 'select' or 'report'")
    if is_embedded(pipe):
        from .zoo import heldout_prompts

        pool = heldout_prompts(2 * n, seed=1)
        return pool[:n] if purpose == "select" else pool[n:]
    from .calibrate import Calibration

    for m in (32, 16, 8, 4, 2, 1):
        try:
            pool = Calibration.default(pipe, n=m).prompts
            break
        except ValueError:
            continue
    half = max(1, len(pool) // 2)
    chosen = pool[:half] if purpose == "select" else (pool[half:] or pool)
    return chosen[:n]
