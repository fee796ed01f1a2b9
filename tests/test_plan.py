import pytest

from mixdq import LayerBits, Plan, PlanError


def test_roundtrip_json(tmp_path):
    plan = Plan({"a.to_q": (8, 8), "b.conv": LayerBits(4, 16)}, meta={"budget_mb": 3.5})
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan and back.meta == {"budget_mb": 3.5}
    assert back["b.conv"] == LayerBits(4, 16) and str(back["a.to_q"]) == "W8A8"


def test_bad_bits_name_layer_and_allowed_values():
    with pytest.raises(PlanError, match=r"layer 'x'.*weight bits 9.*\(2, 3, 4, 5, 6, 7, 8, 16\)"):
        Plan({"x": (9, 8)})
    with pytest.raises(PlanError, match=r"layer 'y'.*activation bits 2.*\(4, 6, 8, 16\)"):
        Plan({"y": (8, 2)})
    with pytest.raises(PlanError, match="expected \\(weight_bits, act_bits\\)"):
        Plan({"z": 8})


def test_validate_unknown_layer_suggests():
    plan = Plan({"down.0.attn2.to_kk": (8, 8)})
    with pytest.raises(PlanError, match=r"to_kk.*did you mean 'down.0.attn2.to_k'"):
        plan.validate(["down.0.attn2.to_k", "down.0.attn2.to_v"])
    Plan({"down.0.attn2.to_k": (8, 8)}).validate(["down.0.attn2.to_k"])


def test_not_a_plan(tmp_path):
    (tmp_path / "p.json").write_text("{\"layers\": {}}")
    with pytest.raises(PlanError, match="not a mixdq plan"):
        Plan.load(tmp_path / "p.json")
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_uniform_and_summary():
    plan = Plan.uniform(["a", "b", "c"], 4, 8)
    assert len(plan) == 3 and plan.summary() == "W4A8x3"
    assert Plan.uniform(["a"], 16, 16).quantized() == {}


def test_with_weight_bits_maps_integer_widths_only():
    plan = Plan({"a": (8, 8), "b": (4, 8), "c": (8, 16), "d": (16, 16), "e": (16, 8)}, meta={"k": 1})
    mapped = plan.with_weight_bits({8: 7})
    assert {n: str(b) for n, b in mapped.items()} == {
        "a": "W7A8", "b": "W4A8", "c": "W7A16", "d": "W16A16", "e": "W16A8"}
    assert mapped.meta == {"k": 1, "weight_bits_mapped": {"8": 7}} and plan["a"] == LayerBits(8, 8)
    only_int8 = plan.with_weight_bits({8: 7}, act=8)  # the layers the int8 kernels run
    assert {n: str(b) for n, b in only_int8.items()} == {
        "a": "W7A8", "b": "W4A8", "c": "W8A16", "d": "W16A16", "e": "W16A8"}
    assert only_int8.meta["weight_bits_mapped_act"] == 8
    with pytest.raises(PlanError, match="only integer widths"):
        plan.with_weight_bits({16: 8})
    with pytest.raises(PlanError, match="weight bits 9"):
        plan.with_weight_bits({8: 9})
