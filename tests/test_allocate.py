"""The integer program: exact (vs brute force), feasible range, ties, monotone in budget."""
import itertools
import json
import math
import random

import pytest

from mixdq.allocation import (CONTENT, QUALITY, TOTAL, Allocator, budget_bounds, loss_from_score, normalised_values,
                              pareto, reference_bits, select, solve_choice)
from mixdq.errors import BudgetError, PlanError
from mixdq.memory import LayerCosts
from mixdq.plan import Plan
from mixdq.sensitivity_analysis import Sensitivity, layer_group

WBITS = (2, 3, 4, 5, 6, 7, 8, 16)


def _costs(numel: dict[str, int], fixed=1000) -> LayerCosts:
    # realistic-shaped byte counts: packed weight + per-channel float32 scales (16 channels)
    byts = {n: {w: (k * w + 7) // 8 + 64 + 16 * 4 for w in WBITS} for n, k in numel.items()}
    for n, k in numel.items():
        byts[n][16] = 2 * k + 64 + 16 * 4 + 8
    return LayerCosts(fixed_bytes=fixed, bytes=byts, float_bytes={n: 2 * k + 64 for n, k in numel.items()},
                      weight_numel=dict(numel))


def _random_instance(rng: random.Random, n_layers=5):
    names = []
    for i in range(n_layers):
        names.append(rng.choice([f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_q",
                                 f"up_blocks.{i}.resnets.0.conv1",
                                 f"mid_block.attentions.{i}.transformer_blocks.0.ff.net.2"]))
    names = sorted(set(names))
    group = {n: layer_group(n) for n in names}
    scores = {"weight": {}, "act": {}}
    for n in names:
        scores["weight"][n] = {b: {"ssim": rng.uniform(0.3, 1.0), "sqnr": rng.uniform(5, 40)} for b in (2, 4, 8)}
        scores["act"][n] = {b: {"ssim": rng.uniform(0.3, 1.0), "sqnr": rng.uniform(5, 40)} for b in (4, 8)}
    sens = Sensitivity(names, group, scores, {n: rng.randint(100, 5000) for n in names})
    costs = _costs({n: rng.choice([256, 1024, 4096, 9216]) for n in names})
    return sens, costs


def _brute_force(values, costs, caps, groups):
    layers = sorted(values)
    best = None
    for combo in itertools.product(*[sorted(values[n]) for n in layers]):
        used = {k: sum(costs[n][b] for n, b in zip(layers, combo) if k == TOTAL or groups[n] == k) for k in caps}
        if any(used[k] > caps[k] for k in caps):
            continue
        val = sum(values[n][b] for n, b in zip(layers, combo))
        size = sum(costs[n][b] for n, b in zip(layers, combo))
        if best is None or val > best[0] + 1e-12 or (abs(val - best[0]) <= 1e-12 and size < best[1]):
            best = (val, size)
    return best


@pytest.mark.parametrize("seed", range(24))
def test_ilp_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    layers = [f"l{i}" for i in range(n)]
    groups = {l: rng.choice([CONTENT, QUALITY]) for l in layers}
    values, costs = {}, {}
    for l in layers:
        bits = rng.sample([2, 3, 4, 5, 6, 7, 8, 16], rng.randint(2, 4))
        values[l] = {b: -rng.random() for b in bits}
        costs[l] = {b: rng.randint(1, 100) for b in bits}
    lo = sum(min(c.values()) for c in costs.values())
    hi = sum(max(c.values()) for c in costs.values())
    cap = rng.randint(lo, hi)
    if seed % 2:
        caps = {TOTAL: cap}
    else:
        # per-group caps, kept feasible
        caps = {g: sum(min(costs[l].values()) for l in layers if groups[l] == g) + rng.randint(0, 60)
                for g in (CONTENT, QUALITY)}
    sol = solve_choice(values, costs, caps, groups)
    want_val, want_size = _brute_force(values, costs, caps, groups)
    assert sol.objective == pytest.approx(want_val, abs=1e-9)
    # ties broken towards the smaller plan, exactly as brute force does
    assert sum(costs[l][b] for l, b in sol.assign.items()) == want_size
    for k, c in caps.items():
        assert sol.cost[k] <= c


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [None, 0.6])
def test_allocator_weight_program_is_optimal(seed, ratio):
    """The full Allocator (normalisation, ratio split, costs) against brute force on its own tables."""
    sens, costs = _random_instance(random.Random(100 + seed))
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    budget = lo + (hi - lo) * 0.35
    a = alloc.solve(budget, ratio)
    caps = alloc.split(budget * 1e6 - alloc.fixed_bytes, ratio)
    want_val, want_size = _brute_force(alloc.wvalues, alloc.wcosts, caps, alloc.groups)
    got_val = sum(alloc.wvalues[n][(a.plan[n].weight if n in a.plan else 16)] for n in sens.layers)
    assert got_val == pytest.approx(want_val, abs=1e-9)
    assert a.size_mb <= budget + 1e-12
    # size is what the core library's cost table says for this plan
    assert a.size_mb == pytest.approx(costs.total_mb(a.plan), abs=1e-9)
    assert round(a.size_mb * 1e6) == want_size + alloc.fixed_bytes


def _ssim_like_instance(rng: random.Random, n_layers: int, raw: bool):
    """Layers with options 2/4/8/16 bits, losses ~1e-5..1e-3 falling with bits, byte costs
    rising with bits.  raw=True: values are the SSIM scores themselves (1 - loss, all close
    to 1), as a caller that does not normalise would pass them."""
    values, costs = {}, {}
    for i in range(n_layers):
        k = rng.choice([256, 1024, 4096])
        loss2 = 10 ** rng.uniform(-4, -3)
        losses = {2: loss2, 4: loss2 * rng.uniform(0.05, 0.3), 8: 10 ** rng.uniform(-5.5, -5), 16: 0.0}
        values[f"l{i}"] = {b: (1.0 - l) if raw else -l for b, l in losses.items()}
        costs[f"l{i}"] = {b: k * b // 8 + 64 for b in losses}
    return values, costs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("raw", [False, True])
def test_bigger_instances_equal_brute_force(seed, raw):
    """Eight layers with four options each (65536 plans): the search over the LP core is
    exact on instances where many layers are in the core, with one cap or one per group."""
    rng = random.Random(500 + seed)
    values, costs = _ssim_like_instance(rng, 8, raw)
    layers = sorted(values)
    groups = {l: (CONTENT, QUALITY)[i % 2] for i, l in enumerate(layers)}
    lo = sum(min(c.values()) for c in costs.values())
    hi = sum(max(c.values()) for c in costs.values())
    if seed % 2:
        caps = {TOTAL: lo + (hi - lo) * rng.uniform(0.1, 0.7)}
    else:
        caps = {g: sum(min(costs[l].values()) for l in layers if groups[l] == g) + rng.randint(200, 3000)
                for g in (CONTENT, QUALITY)}
    sol = solve_choice(values, costs, caps, groups)
    want_val, want_size = _brute_force(values, costs, caps, groups)
    assert sol.optimal and sol.gap == 0.0
    assert sol.objective == pytest.approx(want_val, rel=0, abs=1e-12)
    assert sum(costs[l][b] for l, b in sol.assign.items()) == want_size


def test_tie_tolerance_is_relative_to_the_objectives_span_not_its_size():
    """Raw SSIM values (all near 1): the objective is ~n, its differences ~1e-5.  A tolerance
    of 1e-6 x |objective| took a cheaper plan 4e-6 below the optimum as a tie."""
    values = {f"l{i}": {4: 1 - 2e-4, 8: 1 - 1e-5} for i in range(5)}
    costs = {f"l{i}": {4: 100, 8: 200} for i in range(5)}
    # l0's 4-bit option is only 4e-6 worse than its 8-bit one, but still worse
    values["l0"] = {4: 1 - 1.4e-5, 8: 1 - 1e-5}
    # and l5 cannot afford its 8 bits: the optimum is l0..l4 at 8 bits, l5 at 4
    values["l5"], costs["l5"] = {4: 1 - 1e-3, 8: 1 - 1e-5}, {4: 100, 8: 10_000}
    cap = 5 * 200 + 150
    for vals in (values, {n: {b: v * 1000 for b, v in per.items()} for n, per in values.items()}):
        sol = solve_choice(vals, costs, {TOTAL: cap})
        assert sol.assign == {**{f"l{i}": 8 for i in range(5)}, "l5": 4}
    # and random raw-SSIM instances against brute force, to the last 1e-12
    for seed in range(8):
        vals, cst = _ssim_like_instance(random.Random(900 + seed), 7, raw=True)
        lo, hi = sum(min(c.values()) for c in cst.values()), sum(max(c.values()) for c in cst.values())
        caps = {TOTAL: (lo + hi) / 2}
        want_val, want_size = _brute_force(vals, cst, caps, {})
        sol = solve_choice(vals, cst, caps)
        assert sol.objective == pytest.approx(want_val, rel=0, abs=1e-12)
        assert sum(cst[l][b] for l, b in sol.assign.items()) == want_size


@pytest.mark.parametrize("seed", range(6))
def test_overlapping_caps_equal_brute_force(seed):
    """A total cap and per-group caps together share layers: that program goes to CBC."""
    rng = random.Random(700 + seed)
    layers = [f"l{i}" for i in range(rng.randint(3, 6))]
    groups = {l: rng.choice([CONTENT, QUALITY]) for l in layers}
    values = {l: {b: -rng.random() for b in rng.sample([2, 4, 8, 16], 3)} for l in layers}
    costs = {l: {b: rng.randint(1, 100) for b in values[l]} for l in layers}
    caps = {g: sum(min(costs[l].values()) for l in layers if groups[l] == g) + rng.randint(0, 80)
            for g in (CONTENT, QUALITY)}
    caps[TOTAL] = sum(min(c.values()) for c in costs.values()) + rng.randint(0, 100)
    sol = solve_choice(values, costs, caps, groups)
    want_val, want_size = _brute_force(values, costs, caps, groups)
    assert sol.optimal
    assert sol.objective == pytest.approx(want_val, abs=1e-9)
    assert sum(costs[l][b] for l, b in sol.assign.items()) == want_size


def test_time_limit_returns_a_fitting_plan_with_a_proven_gap():
    rng = random.Random(42)
    values, costs = _ssim_like_instance(rng, 300, raw=False)
    lo, hi = sum(min(c.values()) for c in costs.values()), sum(max(c.values()) for c in costs.values())
    caps = {TOTAL: lo + (hi - lo) * 0.3}
    exact = solve_choice(values, costs, caps)
    assert exact.optimal and exact.bound == exact.objective
    cut = solve_choice(values, costs, caps, time_limit=0)
    assert not cut.optimal
    assert cut.cost[TOTAL] <= caps[TOTAL]
    assert cut.objective <= exact.objective + 1e-12 <= cut.bound + 2e-12
    assert 0 < cut.gap == pytest.approx((cut.bound - cut.objective) / abs(cut.objective))
    assert cut.gap < 0.05   # the LP-guided plan is close even when the search never ran
    # overlapping caps (CBC) stop at the limit too, with a bound from the caps taken one by one
    groups = {l: (CONTENT, QUALITY)[i % 2] for i, l in enumerate(sorted(values))}
    both = {TOTAL: caps[TOTAL], CONTENT: caps[TOTAL] * 0.6}
    cut = solve_choice(values, costs, both, groups, time_limit=0)
    assert not cut.optimal and cut.bound >= exact.objective - 1e-12 and cut.cost[TOTAL] <= caps[TOTAL]


def test_allocation_reports_the_gap_when_the_time_limit_stops_it():
    sens, costs = _random_instance(random.Random(8), n_layers=6)
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    a = alloc.solve(lo + (hi - lo) * 0.4)
    assert a.optimal and a.gap == 0.0 and a.plan.meta["optimal"] is True and a.plan.meta["gap"] == 0.0
    assert a.to_dict()["optimal"] is True
    cut = alloc.solve(lo + (hi - lo) * 0.4, time_limit=0)
    assert cut.size_mb <= lo + (hi - lo) * 0.4
    assert cut.plan.meta["optimal"] == cut.optimal and cut.plan.meta["gap"] == cut.gap == cut.to_dict()["gap"]
    if not cut.optimal:
        assert cut.gap > 0 and cut.predicted[TOTAL] >= a.predicted[TOTAL] - 1e-12


def test_infeasible_budget_names_the_feasible_range():
    sens, costs = _random_instance(random.Random(7))
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    with pytest.raises(BudgetError) as e:
        alloc.solve(lo * 0.5)
    msg = str(e.value)
    assert f"{math.ceil(lo * 1000) / 1000:.3f}" in msg and f"{math.floor(hi * 1000) / 1000:.3f}" in msg
    assert "raise the budget" in msg
    with pytest.raises(BudgetError, match="above the largest plan"):
        alloc.solve(hi * 2)
    # both ends are themselves feasible
    assert alloc.solve(lo).size_mb <= lo + 1e-12
    assert alloc.solve(hi).size_mb <= hi + 1e-12
    with pytest.raises(BudgetError):
        alloc.solve(float("nan"))


def test_ties_go_to_the_smallest_plan_and_are_deterministic():
    layers = [f"l{i}" for i in range(4)]
    values = {l: {4: -0.5, 8: -0.5, 16: -0.5} for l in layers}  # every choice scores the same
    costs = {l: {4: 10, 8: 20, 16: 40} for l in layers}
    sol = solve_choice(values, costs, {TOTAL: 1000})
    assert set(sol.assign.values()) == {4}
    # exact (cost, value) ties between options keep the wider bit-width, every time
    values2 = {l: {4: -1.0, 8: -0.2, 16: -0.2} for l in layers}
    costs2 = {l: {4: 10, 8: 20, 16: 20} for l in layers}
    runs = [solve_choice(values2, costs2, {TOTAL: 50}).assign for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert sorted(runs[0].values()) == [4, 4, 4, 16]


@pytest.mark.parametrize("ratio", [None, 0.6, 1.5])
def test_larger_budget_never_gives_worse_objective(ratio):
    sens, costs = _random_instance(random.Random(3), n_layers=6)
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    prev = -math.inf
    for t in [i / 10 for i in range(11)]:
        a = alloc.solve(lo + (hi - lo) * t, ratio)
        obj = -a.predicted[TOTAL]
        assert obj >= prev - 1e-12
        prev = obj
    assert prev == pytest.approx(0.0)  # at the top everything can stay float: no loss


def test_float_is_an_ordinary_choice_with_its_true_cost():
    names = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2"]
    scores = {"weight": {names[0]: {4: {"sqnr": 0.0}, 8: {"sqnr": 1.0}},   # hopeless when quantized
                         names[1]: {4: {"sqnr": 30.0}, 8: {"sqnr": 50.0}}},
              "act": {n: {4: {"sqnr": 40.0}, 8: {"sqnr": 50.0}} for n in names}}
    sens = Sensitivity(names, {n: QUALITY for n in names}, scores, {n: 100 for n in names})
    costs = _costs({n: 4096 for n in names})
    alloc = Allocator(sens, costs, act_candidates={CONTENT: (16,), QUALITY: (16,)}, act_avg_bits=None)
    lo, hi = alloc.feasible_range_mb()
    # room for layer 0 in float and layer 1 at 4 bits, not both float
    budget = (costs.fixed_bytes + costs.float_bytes[names[0]] + costs.bytes[names[1]][4]) / 1e6
    a = alloc.solve(budget)
    assert names[0] not in a.plan  # float: left out of the plan, costs its float bytes
    assert a.plan[names[1]].weight == 4
    assert a.size_mb == pytest.approx(budget)
    # and with less room, float is not chosen
    a2 = alloc.solve(lo)
    assert a2.plan[names[0]].weight == 4


def test_activation_program_meets_average_and_floor():
    sens, costs = _random_instance(random.Random(11), n_layers=6)
    for target in (4.0, 6.0, 8.0, 12.0):
        alloc = Allocator(sens, costs, act_avg_bits=target)
        num = sum(alloc.act_bits[n] * sens.act_numel[n] for n in sens.layers)
        assert num <= target * sum(sens.act_numel.values()) + 1e-9
    alloc = Allocator(sens, costs, act_avg_bits=None, act_floor=8)
    assert set(alloc.act_bits.values()) <= {8, 16}
    with pytest.raises(BudgetError, match="activation average"):
        Allocator(sens, costs, act_avg_bits=3.0)


def test_losses_and_group_normalisation():
    assert loss_from_score("ssim", 0.9) == pytest.approx(0.1)
    assert loss_from_score("sqnr", 20.0) == pytest.approx(0.01)
    assert loss_from_score("sqnr", math.inf) == 0.0
    names = ["a.attn2.to_q", "b.resnets.0.conv1"]
    scores = {"weight": {names[0]: {4: {"ssim": 0.8, "sqnr": 10.0}}, names[1]: {4: {"sqnr": 10.0}}}}
    sens = Sensitivity(names, {n: layer_group(n) for n in names}, scores, {})
    vals, scales = normalised_values(sens, "weight", {CONTENT: (4, 16), QUALITY: (4, 16)})
    # each group's total loss at its lowest bits is 1 after normalisation; float is 0
    assert vals[names[0]] == {4: pytest.approx(-1.0), 16: 0.0}
    assert vals[names[1]] == {4: pytest.approx(-1.0), 16: 0.0}
    assert scales == {CONTENT: pytest.approx(0.2), QUALITY: pytest.approx(0.1)}
    # without decoupling everything is SQNR, one group
    vals, scales = normalised_values(sens, "weight", {CONTENT: (4, 16), QUALITY: (4, 16)}, decoupled=False)
    assert vals[names[0]][4] == pytest.approx(-0.5) and set(scales) == {TOTAL}
    with pytest.raises(PlanError, match="rerun"):
        normalised_values(sens, "weight", {CONTENT: (2, 16), QUALITY: (4, 16)})


@pytest.mark.parametrize("kind", ["weight", "act"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_normalisation_does_not_depend_on_the_candidate_bits(kind, decoupled):
    """Offering 2-bit quality weights (or withdrawing 2-bit content ones, or float) leaves every
    other option's value unchanged: a group's scale comes from the table, not the candidates."""
    sens, _ = _random_instance(random.Random(13), n_layers=6)
    measured = (2, 4, 8) if kind == "weight" else (4, 8)
    base = {CONTENT: measured[1:] + (16,), QUALITY: measured[1:] + (16,)}
    variants = [{CONTENT: measured + (16,), QUALITY: measured[1:] + (16,)},
                {CONTENT: measured + (16,), QUALITY: measured + (16,)},
                {CONTENT: measured[1:], QUALITY: measured[1:]},
                {CONTENT: measured[-1:], QUALITY: measured[1:]}]
    ref, ref_scales = normalised_values(sens, kind, base, decoupled)
    for cands in variants:
        vals, scales = normalised_values(sens, kind, cands, decoupled)
        assert scales == ref_scales
        for n in sens.layers:
            for b in set(vals[n]) & set(ref[n]):
                assert vals[n][b] == ref[n][b], (cands, n, b)
    # the scale is the group's summed loss, each layer at its group's reference width (weights:
    # content 2, quality 4 bits; activations 4)
    metric = {CONTENT: "ssim", QUALITY: "sqnr"}
    ref_bits = {"weight": {CONTENT: 2, QUALITY: 4}, "act": {CONTENT: 4, QUALITY: 4}}[kind]
    for g in (CONTENT, QUALITY) if decoupled else (TOTAL,):
        layers = [n for n in sens.layers if not decoupled or sens.group[n] == g]
        want = sum(loss_from_score(metric[sens.group[n]] if decoupled else "sqnr",
                                   sens.scores[kind][n][ref_bits[sens.group[n]]][
                                       metric[sens.group[n]] if decoupled else "sqnr"]) for n in layers)
        assert ref_scales[g] == pytest.approx(want)


def test_normalisation_falls_back_to_the_lowest_width_every_layer_has():
    names = ["a.attn2.to_q", "b.attn2.to_k"]
    scores = {"weight": {names[0]: {2: {"ssim": 0.5}, 8: {"ssim": 0.9}},
                         names[1]: {2: {"ssim": 0.7}, 8: {"ssim": 0.95}, 6: {"ssim": 0.9}}}}
    sens = Sensitivity(names, {n: CONTENT for n in names}, scores, {})
    vals, scales = normalised_values(sens, "weight", {CONTENT: (8, 16), QUALITY: (16,)})
    assert scales[CONTENT] == pytest.approx(0.5 + 0.3)          # 2 bits: scored for both, 4 for neither
    assert vals[names[0]][8] == pytest.approx(-0.1 / 0.8)
    # one normalisation over every layer (no decoupling): each layer still at its own group's
    # width, so groups scored at different widths are fine; a group with no common width is not
    scores = {"weight": {names[0]: {8: {"sqnr": 20.0}}, "c.resnets.0.conv1": {6: {"sqnr": 20.0}}}}
    sens = Sensitivity([names[0], "c.resnets.0.conv1"], {names[0]: CONTENT, "c.resnets.0.conv1": QUALITY}, scores, {})
    _, scales = normalised_values(sens, "weight", {CONTENT: (8, 16), QUALITY: (6, 16)}, decoupled=False)
    assert scales == {TOTAL: pytest.approx(0.01 + 0.01)}
    scores["weight"][names[1]] = {6: {"sqnr": 20.0}}
    sens = Sensitivity([names[0], names[1]], {n: CONTENT for n in names}, scores, {})
    with pytest.raises(PlanError, match="no weight bit-width for every layer of a group"):
        reference_bits(sens, "weight", CONTENT, names, decoupled=False)


def test_grouping_rule():
    assert layer_group("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == CONTENT
    assert layer_group("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj") == CONTENT
    assert layer_group("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k") == QUALITY
    assert layer_group("conv_in") == QUALITY and layer_group("add_embedding.linear_1") == QUALITY
    assert layer_group("mid_block.resnets.0.conv_shortcut") == QUALITY


def test_family_pareto_and_selection():
    sens, costs = _random_instance(random.Random(5), n_layers=6)
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    fam = alloc.family([lo + (hi - lo) * t for t in (0.2, 0.5, 0.8)], ratios=(0.5, 1.0, None))
    assert fam and all(isinstance(a.plan, Plan) for a in fam)
    front = pareto(fam)
    sizes = [a.size_mb for a in front]
    losses = [a.predicted[TOTAL] for a in front]
    assert sizes == sorted(sizes) and losses == sorted(losses, reverse=True)
    for a in fam:  # nothing in the family dominates a front member
        for f in front:
            assert not (a.size_mb <= f.size_mb and a.predicted[TOTAL] < f.predicted[TOTAL] - 1e-12)
    # selection uses measured metrics, not the prediction
    target = fam[-1]
    best = select(fam, lambda p: {"ssim": 1.0 if p == target.plan else 0.5})
    assert best is target and all("ssim" in a.measured for a in fam)
    with pytest.raises(PlanError):
        select([], lambda p: {})


def test_family_reports_progress_per_solve():
    sens, costs = _random_instance(random.Random(5), n_layers=6)
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    calls = []
    fam = alloc.family([lo, hi], ratios=(0.5, None), callback=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]   # every solve, duplicates included
    assert len(fam) < 4                               # at hi every ratio keeps everything float


@pytest.mark.parametrize("decoupled", [True, False])
def test_predicted_loss_of_any_plan_matches_what_solve_predicts(decoupled):
    sens, costs = _random_instance(random.Random(7), n_layers=6)
    alloc = Allocator(sens, costs, decoupled=decoupled)
    lo, hi = alloc.feasible_range_mb()
    for t, ratio in ((0.0, None), (0.3, 0.6), (0.7, 1.25), (1.0, None)):
        a = alloc.solve(lo + (hi - lo) * t, ratio)
        got = alloc.predicted_loss(a.plan)
        assert got.keys() == a.predicted.keys() == ({CONTENT, QUALITY, TOTAL} if decoupled else {TOTAL})
        assert got == {k: pytest.approx(v, abs=1e-12) for k, v in a.predicted.items()}
    # a plan solve did not make: one layer raised to float loses less, never more
    low = alloc.solve(lo).plan
    raised = Plan({n: b for n, b in low.items() if n != sens.layers[0]})
    assert alloc.predicted_loss(raised)[TOTAL] < alloc.predicted_loss(low)[TOTAL]
    assert alloc.predicted_loss(Plan({})) == dict.fromkeys(alloc.predicted_loss(low), 0.0)   # float


def test_predicted_loss_is_on_the_normalised_scale_and_refuses_what_it_cannot_predict():
    # monotone scores; a group's whole loss with every layer at its reference width (content
    # weights 2 bits, quality 4) is 1
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", "up_blocks.0.resnets.0.conv1",
             "up_blocks.0.resnets.0.conv2"]
    scores = {"weight": {n: {b: {"ssim": 1 - 0.1 / b, "sqnr": 6.0 * b} for b in (2, 4, 8)} for n in names},
              "act": {n: {b: {"ssim": 1 - 0.1 / b, "sqnr": 6.0 * b} for b in (4, 8)} for n in names}}
    sens = Sensitivity(names, {n: layer_group(n) for n in names}, scores, {n: 100 for n in names})
    alloc = Allocator(sens, _costs({n: 1024 for n in names}))
    content, q1, q2 = names
    got = alloc.predicted_loss(Plan({content: (2, 8), q1: (4, 8), q2: (4, 8)}))
    assert got == {CONTENT: pytest.approx(1.0), QUALITY: pytest.approx(1.0), TOTAL: pytest.approx(2.0)}
    # 4 bits lose half what 2 bits do here (0.1 / b), on the same scale
    assert alloc.predicted_loss(Plan({content: (4, 8)}))[CONTENT] == pytest.approx(0.5)
    half = alloc.predicted_loss(Plan({q1: (4, 8)}))         # the other quality layer, equal scores, float
    assert half == {CONTENT: 0.0, QUALITY: pytest.approx(0.5), TOTAL: pytest.approx(0.5)}
    with pytest.raises(PlanError, match="weight bits 7, not a candidate"):
        alloc.predicted_loss(Plan({q1: (7, 8)}))           # what fit_plan_to_device makes of W8A8
    with pytest.raises(PlanError, match="weight bits 2, not a candidate"):
        alloc.predicted_loss(Plan({q1: (2, 8)}))           # 2 bits are a content candidate only
    with pytest.raises(PlanError, match="did not score"):
        alloc.predicted_loss(Plan({"mid_block.resnets.0.conv1": (4, 8)}))


def test_sensitivity_from_another_model_is_refused():
    sens, costs = _random_instance(random.Random(2))
    other = _costs({"conv_in": 100})
    with pytest.raises(PlanError, match="another model"):
        Allocator(sens, other)


# ---------------------------------------------------------------------------------------------
# Against the real cost model and the real quantizer (tiny random-weight SDXL).
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers; two threads on a shared 2-core box wait on each other
    yield
    torch.set_num_threads(threads)


def _synthetic_sensitivity(unet, seed=0):
    """Plausible scores for every layer: ~6 dB per bit with a per-layer offset."""
    import mixdq

    rng = random.Random(seed)
    names = list(mixdq.quantizable_layers(unet))
    scores = {"weight": {}, "act": {}}
    for n in names:
        off = rng.uniform(-8, 8)
        scores["weight"][n] = {b: {"sqnr": 6.02 * b + off, "ssim": 1 - 0.3 * 2.0 ** (-b) * rng.uniform(0.5, 1.5)}
                               for b in (2, 4, 8)}
        scores["act"][n] = {b: {"sqnr": 6.02 * b + off + 3, "ssim": 1 - 0.2 * 2.0 ** (-b)} for b in (4, 8)}
    return Sensitivity(names, {n: layer_group(n) for n in names}, scores, {n: rng.randint(64, 4096) for n in names})


class _AnalysisStarted(Exception):
    pass


def _analysis_refused(monkeypatch, tmp_path):
    """An empty cache, and the sensitivity analysis (where the CLI and the app would start it,
    mixdq.tables) raising instead of running: (the cache folder, the exception it raises)."""
    from mixdq import tables

    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("MIXDQ_CACHE", str(cache))

    def started(*a, **k):
        raise _AnalysisStarted

    monkeypatch.setattr(tables, "sensitivity", started)
    return cache, _AnalysisStarted


def test_measured_bytes_never_exceed_the_budget(tiny_sdxl_dir, one_thread):
    import mixdq

    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    costs = mixdq.layer_costs(pipe.unet)
    sens = _synthetic_sensitivity(pipe.unet)
    alloc = Allocator(sens, costs)
    lo, hi = alloc.feasible_range_mb()
    assert lo < hi < costs.float_mb() * 1.01
    cal = mixdq.Calibration(["a red circle", "a blue square"], batch_size=2)
    for t, ratio in ((0.0, None), (0.4, 0.6), (0.8, None)):
        budget = lo + (hi - lo) * t
        a = alloc.solve(budget, ratio)
        fresh = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
        report = mixdq.quantize(fresh, a.plan, cal, progress=False)
        measured = mixdq.stored_nbytes(fresh.unet)  # what the plan stores, on any machine
        assert measured == report.quantized_bytes
        assert measured / 1e6 <= budget, (t, ratio, measured, budget)
        assert measured == round(a.size_mb * 1e6)  # predicted == measured, to the byte
        # held at run time: the same, plus the prepacked copies' excess where a backend makes them
        assert mixdq.model_nbytes(fresh.unet) == report.held_bytes >= measured


def test_cli_range_errors_and_plan(tiny_sdxl_dir, tmp_path, capsys, one_thread):
    import argparse

    import mixdq
    from mixdq.cli import add_allocate_args, run_allocate

    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    sens_path = tmp_path / "sens.json"
    _synthetic_sensitivity(pipe.unet).save(sens_path)
    parser = add_allocate_args(argparse.ArgumentParser())
    base = ["--model", str(tiny_sdxl_dir), "--sensitivity", str(sens_path)]
    run_allocate(parser.parse_args(base + ["--range"]))
    out = capsys.readouterr().out
    lo, hi = (float(x) for x in out.split(":")[1].split("MB")[0].split(".."))
    with pytest.raises(BudgetError, match=r"feasible budgets: .* MB"):
        run_allocate(parser.parse_args(base + ["--budget-mb", str(lo / 2)]))
    with pytest.raises(BudgetError, match="positive"):
        run_allocate(parser.parse_args(base + ["--budget-mb", "-1"]))
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--ratio", "abc"])
    plan_path = tmp_path / "plan.json"
    best = run_allocate(parser.parse_args(base + ["--budget-mb", str((lo + hi) / 2), "--no-select",
                                                  "--out", str(plan_path)]))
    plan = Plan.load(plan_path)
    assert plan == best.plan and best.size_mb <= (lo + hi) / 2
    plan.validate(mixdq.quantizable_layers(pipe.unet))


def test_cli_refuses_an_impossible_budget_before_any_sensitivity_work(tiny_sdxl_dir, tmp_path, monkeypatch,
                                                                       one_thread):
    """No sensitivity cached (a fresh clone): a budget outside the feasible range is refused at
    once, naming the range and the fix; the range is the one of the candidate bits given."""
    import argparse

    import mixdq
    from mixdq.allocation import DEFAULT_WEIGHT_CANDIDATES
    from mixdq.cli import add_allocate_args, run_allocate

    cache, Started = _analysis_refused(monkeypatch, tmp_path)
    costs = mixdq.layer_costs(mixdq.load_pipeline(tiny_sdxl_dir, device="cpu").unet)
    lo, hi = budget_bounds(costs)
    parser = add_allocate_args(argparse.ArgumentParser())

    def run(*extra):
        return run_allocate(parser.parse_args(["--model", str(tiny_sdxl_dir), *extra]))

    with pytest.raises(BudgetError) as e:
        run("--budget-mb", "0.001")
    msg = str(e.value)
    assert f"feasible budgets: {math.ceil(lo * 1000) / 1000:.3f} .. {math.floor(hi * 1000) / 1000:.3f} MB" in msg
    assert "raise the budget" in msg and "--quality-bits" in msg
    with pytest.raises(BudgetError, match="use at most"):
        run("--budget-mb", str(hi * 2))
    with pytest.raises(PlanError, match="not supported"):      # a bad candidate costs nothing either
        run("--budget-mb", str(lo), "--quality-bits", "9")
    assert not (cache / "sensitivity").exists()
    # lower quality candidates lower the floor: the same budget is now feasible, so the
    # analysis is what runs next
    low = {**DEFAULT_WEIGHT_CANDIDATES, QUALITY: (2, 4, 8, 16)}
    lo2 = budget_bounds(costs, low)[0]
    assert lo2 < lo
    between = str((lo + lo2) / 2)
    with pytest.raises(BudgetError):
        run("--budget-mb", between)
    with pytest.raises(Started):
        run("--budget-mb", between, "--quality-bits", "2,4,8,16")
    with pytest.raises(Started):       # a feasible budget goes on to the analysis
        run("--budget-mb", str((lo + hi) / 2))


def test_cli_takes_the_shipped_sensitivity_only_for_its_calibration(tmp_path, monkeypatch, capsys, one_thread):
    """The embedded model on a fresh clone: --pareto (like --range and --budget-mb) uses
    presets/sensitivity.json and says so; a non-default calibration (--prompts 8 --seed 3) is
    not handed that table: the analysis starts, and stderr says why and which flags would
    have used the shipped one."""
    import argparse

    from mixdq.cli import add_allocate_args, run_allocate
    from mixdq.loading import EMBEDDED

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    cache, Started = _analysis_refused(monkeypatch, tmp_path)
    parser = add_allocate_args(argparse.ArgumentParser())
    run_allocate(parser.parse_args(["--pareto", "2", "--device", "cpu"]))
    out, err = capsys.readouterr()
    assert "sensitivity: shipped presets/sensitivity.json, measured for this model and calibration" in err
    assert "size MB" in out and "content loss" in out
    with pytest.raises(Started):
        run_allocate(parser.parse_args(["--range", "--prompts", "8", "--seed", "3", "--device", "cpu"]))
    err = capsys.readouterr().err
    assert ("sensitivity: the shipped presets/sensitivity.json was measured for this model with prompts 32 "
            "(yours 8), seed 0 (yours 3); nothing cached in ") in err
    # what the analysis would cost here, timed before it starts
    assert "the sensitivity analysis would take about" in err and "882 evaluations" in err
    assert "measuring it now" in err and "--prompts 32 --seed 0 would use the shipped table" in err
    assert not (cache / "sensitivity").exists()


def test_selection_measures_plans_on_several_prompts(tiny_sdxl_pipe, one_thread):
    import mixdq
    from mixdq.allocation import PlanEvaluator

    pipe = tiny_sdxl_pipe
    names = list(mixdq.quantizable_layers(pipe.unet))
    cal = mixdq.Calibration(["a red circle", "a blue square"], batch_size=2)
    ev = PlanEvaluator(pipe, cal, ["a red circle", "a cat", "a dog"], batch_size=3)
    w8 = ev(Plan.uniform(names, 8, 8))
    w2 = ev(Plan.uniform(names, 2, 8))
    assert ev.float_images.shape[0] == 3
    assert 0 < w2["ssim"] < w8["ssim"] <= 1 and w2["psnr"] < w8["psnr"]
    assert w2["size_mb"] < w8["size_mb"]
    assert "alignment" not in w8  # not the embedded world's captions
    # the float pipeline is left untouched
    assert not any(type(m).__name__.startswith("Quant") for m in pipe.unet.modules())


def test_presets_command_writes_plans_with_their_measured_numbers(tiny_sdxl_dir, tmp_path, one_thread):
    """`mixdq.presets` end to end on a tiny model (synthetic sensitivity to stay fast):
    each preset fits its budget, and its stats file holds the sizes measured after quantizing."""
    import mixdq
    from mixdq.allocation import PlanEvaluator
    from mixdq.presets import make_evidence, make_presets

    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    cal = mixdq.Calibration(["a red circle", "a blue square"], batch_size=2)
    costs = mixdq.layer_costs(pipe.unet)
    names = list(mixdq.quantizable_layers(pipe.unet))
    ev = PlanEvaluator(pipe, cal, ["a red circle", "a cat"], batch_size=2)
    state = (pipe, cal, _synthetic_sensitivity(pipe.unet), 0.0, costs, names, ev)
    stats = make_presets(out=tmp_path, bits=(8, 4), ratios=(0.6, None), progress=False, state=state)
    assert [s["preset"] for s in stats] == ["mixdq-w8a8-size", "mixdq-w4a8-size"]
    for s in stats:
        plan = Plan.load(tmp_path / f"{s['preset']}.json")
        on_disk = json.loads((tmp_path / f"{s['preset']}.stats.json").read_text())
        assert on_disk["size_mb"] == s["size_mb"] and len(on_disk["candidates"]) <= 2
        assert s["measured_size_mb"] == pytest.approx(costs.total_mb(plan), abs=1e-6)
        assert s["measured_size_mb"] <= s["budget_mb"] + 1e-9
        assert 0 < s["ssim"] <= 1
    assert stats[1]["size_mb"] < stats[0]["size_mb"]
    # "~W5A8 memory" is the exactly-packed size (5-bit weights really live in int8 containers)
    from mixdq.presets import nominal_size

    w4, w8 = (costs.total_mb(Plan.uniform(names, b, 8)) for b in (4, 8))
    assert nominal_size(costs, names, 4) == w4 and nominal_size(costs, names, 8) == w8
    assert nominal_size(costs, names, 5) == pytest.approx(w4 + (w8 - w4) / 4)
    assert costs.total_mb(Plan.uniform(names, 5, 8)) == w8
    assert Sensitivity.load(tmp_path / "sensitivity.json").layers == names
    text = make_evidence(path=tmp_path / "evidence.md", state=state, ratios=(None,), presets_stats=stats)
    assert "| mixdq-w4a8-size |" in text
    assert "uniform W4A8" in text and "without BOS" in text and (tmp_path / "evidence.md").is_file()


def test_cli_pareto_front(tiny_sdxl_dir, tmp_path, capsys, one_thread):
    import argparse

    import mixdq
    from mixdq.cli import add_allocate_args, run_allocate

    pipe = mixdq.load_pipeline(tiny_sdxl_dir, device="cpu")
    sens_path = tmp_path / "sens.json"
    _synthetic_sensitivity(pipe.unet).save(sens_path)
    parser = add_allocate_args(argparse.ArgumentParser())
    run_allocate(parser.parse_args(["--model", str(tiny_sdxl_dir), "--sensitivity", str(sens_path),
                                    "--pareto", "4", "--ratio", "0.6,joint"]))
    rows = [l.split() for l in capsys.readouterr().out.splitlines()[1:]]
    sizes, totals = [float(r[0]) for r in rows], [float(r[3]) for r in rows]
    assert len(rows) >= 3 and sizes == sorted(sizes) and totals == sorted(totals, reverse=True)
    assert totals[-1] == 0.0  # the largest plan keeps everything float


def test_shipped_presets_fit_the_embedded_model():
    """presets/ ships plans for the embedded model: each names only its layers, stays inside its
    budget by the core library's byte count, and its stats file agrees with that count."""
    from pathlib import Path

    import mixdq
    from mixdq.loading import EMBEDDED

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    presets = Path(__file__).resolve().parent.parent / "presets"
    plans = sorted(p for p in presets.glob("mixdq-*.json") if not p.name.endswith(".stats.json"))
    assert len(plans) >= 3, "regenerate them with `python -m mixdq.presets`"
    pipe = mixdq.load_pipeline(None, device="cpu")
    costs = mixdq.layer_costs(pipe.unet)
    names = list(mixdq.quantizable_layers(pipe.unet))
    sizes = []
    for path in plans:
        plan = Plan.load(path)
        plan.validate(names)
        stats = json.loads(path.with_name(path.stem + ".stats.json").read_text())
        size = costs.total_mb(plan)
        assert size == pytest.approx(stats["measured_size_mb"], abs=1e-6)
        assert size <= stats["budget_mb"] + 1e-9
        assert 0 < stats["ssim"] <= 1 and stats["alignment"] is not None
        sizes.append(size)
    assert len(set(sizes)) == len(sizes)
    sens = Sensitivity.load(presets / "sensitivity.json")
    assert sens.layers == names  # the app can solve any budget without recomputing
