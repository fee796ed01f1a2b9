"""The plan: which bit-width each quantizable UNet layer gets.

A plan is the one object that flows between the steps: `allocate` returns it,
`quantize` consumes it, `save_quantized` writes it beside the weights.  It is a
plain mapping ``layer name -> LayerBits(weight, act)`` and serialises to JSON.

16 bits means "kept in float" (float16 on CUDA, float32 on CPU).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import PlanError

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # 7: exact int8 on CPUs without VNNI (kernels.py)
ACT_BITS = (4, 6, 8, 16)
FLOAT_BITS = 16
PLAN_FORMAT = "mixdq-plan/1"


@dataclass(frozen=True, order=True)
class LayerBits:
    weight: int = FLOAT_BITS
    act: int = FLOAT_BITS

    def __post_init__(self):
        if self.weight not in WEIGHT_BITS:
            raise PlanError(f"weight bits {self.weight!r} not supported; allowed: {WEIGHT_BITS}")
        if self.act not in ACT_BITS:
            raise PlanError(f"activation bits {self.act!r} not supported; allowed: {ACT_BITS}")

    @property
    def is_float(self) -> bool:
        return self.weight == FLOAT_BITS and self.act == FLOAT_BITS

    def __str__(self) -> str:
        return f"W{self.weight}A{self.act}"


class Plan(Mapping[str, LayerBits]):
    """Immutable mapping layer name -> LayerBits. Layers not listed stay float."""

    def __init__(self, layers: Mapping[str, LayerBits | tuple[int, int]] | None = None,
                 meta: Mapping | None = None):
        parsed: dict[str, LayerBits] = {}
        for name, bits in (layers or {}).items():
            if not isinstance(bits, LayerBits):
                try:
                    w, a = bits
                except (TypeError, ValueError):
                    raise PlanError(f"layer {name!r}: expected (weight_bits, act_bits), got {bits!r}")
                try:
                    bits = LayerBits(int(w), int(a))
                except PlanError as e:
                    raise PlanError(f"layer {name!r}: {e}") from None
            parsed[name] = bits
        self._layers = dict(sorted(parsed.items()))
        self.meta = dict(meta or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> LayerBits:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self._layers == other._layers

    def __repr__(self) -> str:
        return f"Plan({len(self)} layers, {self.summary()})"

    @classmethod
    def uniform(cls, layer_names: Iterable[str], weight: int, act: int, meta=None) -> "Plan":
        bits = LayerBits(weight, act)
        return cls({name: bits for name in layer_names}, meta=meta)

    def with_weight_bits(self, mapping: Mapping[int, int], act: int | None = None) -> "Plan":
        """The same plan with weight widths replaced per `mapping`, e.g. {8: 7}: on CPUs
        without VNNI 8-bit codes cannot run the int8 kernels exactly, 7-bit ones
        can (quant.machine.saturates; what ONNX Runtime's reduce_range does to weights).
        `act` limits the change to layers with that activation width (8: only the
        layers the int8 kernels run)."""
        for old, new in mapping.items():
            if FLOAT_BITS in (old, new):
                raise PlanError(f"weight bits {old}->{new}: only integer widths can be mapped "
                                f"({', '.join(str(b) for b in WEIGHT_BITS if b != FLOAT_BITS)})")
        layers = {n: LayerBits(mapping.get(b.weight, b.weight), b.act)
                  if not b.is_float and act in (None, b.act) else b
                  for n, b in self._layers.items()}
        meta = dict(self.meta)
        meta["weight_bits_mapped"] = {str(k): v for k, v in mapping.items()}
        if act is not None:
            meta["weight_bits_mapped_act"] = act
        return Plan(layers, meta=meta)

    def quantized(self) -> dict[str, LayerBits]:
        """The layers that actually change (not W16A16)."""
        return {n: b for n, b in self._layers.items() if not b.is_float}

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for b in self._layers.values():
            counts[str(b)] = counts.get(str(b), 0) + 1
        return ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))

    def validate(self, layer_names: Iterable[str]) -> None:
        """Raise PlanError naming the first unknown layer (with close matches)."""
        known = set(layer_names)
        unknown = [n for n in self._layers if n not in known]
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], sorted(known), n=3)
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise PlanError(
                f"plan names layer {unknown[0]!r}{more} which is not a quantizable layer of this UNet"
                + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else
                   "; list the model's layers with `mixdq.quantizable_layers(pipe.unet)`"))

    # serialisation
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "meta": self.meta,
                "layers": {n: [b.weight, b.act] for n, b in self._layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a mixdq plan (expected format {PLAN_FORMAT!r})")
        return cls(data.get("layers", {}), meta=data.get("meta"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist")
        return cls.from_json(path.read_text())
