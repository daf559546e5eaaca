"""The world: a simulated shop defined entirely by its ``world.json``."""

from __future__ import annotations

import copy
import json
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from insertrec.errors import InsertrecError
from insertrec.world.simulation import EvaluationSet, ShopRun, WorldData, evaluation_set, generate, write_demo_data
from insertrec.world.spec import WorldError, _catalog, _Node
from insertrec.world.truth import _STAGES, EFFECT_KINDS, TIERS, TRAITS, _Dynamics, _Population, _StateDesign, _Truth


class World:
    """A simulated shop defined entirely by its ``world.json`` (see the ``insertrec.world`` docstring)."""

    def __init__(self, spec: dict[str, Any], *, file: str = "world.json"):
        if not isinstance(spec, dict):
            raise WorldError("(top)", "expected a JSON object", file=file)
        self.spec = copy.deepcopy(spec)     # the truth must not change behind the compiled arrays
        try:
            root = _Node(self.spec, "")
            root.items(("horizon_days", "start", "days", "categories", "channels", "regions", "customer_types",
                        "signals", "repeat_timing", "satisfaction", "nps", "incidents", "observed", "catalog",
                        "logging_policy", "effects", "reward"))
            self.horizon = root["horizon_days"].num(1.0)
            self.days = root["days"].num(self.horizon, open_lo=True)
            try:
                self.start = pd.Timestamp(root["start"].text(), tz="UTC")
            except ValueError:
                root["start"].fail("expected an ISO 8601 date")
            self.catalog = _catalog(root["catalog"])
            self.epsilon = root["logging_policy"]["epsilon"].num(0.0, 1.0)
            self._pop = _Population(root)
            self._design = _StateDesign(self._pop.channels)
            self._truth = _Truth(root, self.catalog, self._design, self._pop)
            self._dyn = _Dynamics(root)
        except WorldError as err:
            raise WorldError(err.field, err.reason, file=file) from None

    # ---- construction and persistence

    @classmethod
    def load(cls, path: str | Path) -> World:
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
        except OSError as err:
            raise InsertrecError(f"{path}: cannot read the world file ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise InsertrecError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        return cls(spec, file=str(path))

    @classmethod
    def default(cls) -> World:
        text = resources.files("insertrec").joinpath("default_world.json").read_text()
        return cls(json.loads(text), file="default_world.json")

    def to_json(self) -> str:
        return json.dumps(self.spec, indent=2)

    # ---- the truth

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.catalog.slots)

    def combos(self) -> np.ndarray:
        """Every combination of one action per slot, (n_combos, n_slots), catalog order."""
        sizes = [len(s.actions) for s in self.catalog.slots.values()]
        return np.array(list(product(*(range(k) for k in sizes))), dtype=np.intp).reshape(-1, len(sizes))

    def expected_reward(self, hidden: pd.DataFrame, combos: np.ndarray) -> np.ndarray:
        """True expected reward of each combination for each order, (n_orders, n_combos)."""
        combos = np.asarray(combos)
        sizes = np.array([len(s.actions) for s in self.catalog.slots.values()])
        if combos.ndim != 2 or combos.shape[1] != len(sizes) or (combos < 0).any() or (combos >= sizes).any():
            raise WorldError("combos", f"expected action indices of shape (n_combos, {len(sizes)}) within each slot")
        return self._truth.expected_reward(self._state(hidden), combos.astype(np.intp))

    def _state(self, hidden: pd.DataFrame) -> dict[str, np.ndarray]:
        """Hidden-state arrays from a ``hidden`` frame (as ``generate`` writes it)."""
        vocab = {"customer_type": ("type", self._pop.type_names), "tier": ("tier", TIERS),
                 "stage": ("stage", _STAGES), "channel": ("channel", self._pop.channels)}
        numbers = (*TRAITS, "value_mu", "value_sigma")
        aff_cols = [f"aff_{c}" for c in self._pop.categories]
        missing = [c for c in (*vocab, *numbers, "is_gift", "incident_recent", *aff_cols) if c not in hidden]
        if missing:
            raise WorldError(missing[0], "missing from the hidden-state frame", file="hidden")
        st: dict[str, np.ndarray] = {}
        for col, (key, values) in vocab.items():
            codes = pd.Categorical(hidden[col], categories=list(values)).codes
            if (codes < 0).any():
                raise WorldError(col, f"unknown value {hidden[col].iloc[int(np.argmax(codes < 0))]!r}", file="hidden")
            st[key] = codes.astype(np.intp)
        for col in numbers:
            st[col] = hidden[col].to_numpy(dtype=float)
        st["is_gift"] = hidden["is_gift"].to_numpy(dtype=bool)
        st["incident"] = hidden["incident_recent"].to_numpy(dtype=bool)
        st["aff"] = hidden[aff_cols].to_numpy(dtype=float)
        return st

    # ---- data

    def generate(self, customers: int, seed: int) -> WorldData:
        """A full history of ``customers`` customers over ``days``; deterministic per seed."""
        return generate(self, customers, seed)

    def write_demo_data(self, out: Path, customers: int = 5000, seed: int = 0) -> None:
        """A data directory (SPEC tables, catalog.yaml) plus the world.json it came from."""
        write_demo_data(self, out, customers, seed)

    def evaluation_set(self, orders: int, seed: int) -> EvaluationSet:
        """``orders`` fresh orders in the last ``horizon_days`` of a history generated with ``seed``
        (see :func:`insertrec.world.simulation.evaluation_set`)."""
        return evaluation_set(self, orders, seed)

    def shop_run(self, customers: int, seed: int) -> ShopRun:
        """This world's history continued stretch by stretch under policies the caller deploys (the closed
        loop; see :class:`insertrec.world.simulation.ShopRun`)."""
        return ShopRun(self, customers, seed)

    # ---- changed worlds

    def perturbed(self, seed: int, strength: float = 1.0) -> World:
        """A world with the same structure whose effects are re-dealt.

        Within each slot the non-default actions' effects are shuffled among
        the actions, each action's tier and stage answers are shuffled among
        tiers and stages, and every coefficient is rescaled by a log-normal
        factor. ``strength`` in [0, 1] blends the shuffled truth with the old
        (0 = unchanged); above 1 only the rescaling grows.
        """
        rng = np.random.default_rng(seed)
        mix, spread = min(max(strength, 0.0), 1.0), 0.3 * max(strength, 0.0)
        spec = copy.deepcopy(self.spec)
        effects = spec["effects"].setdefault("actions", {})
        design = self._design
        blocks = [[design.index[(g, n)] for n in names] for g, names in design.groups.items() if g in ("tier", "stage")]
        for slot_name, slot in self.catalog.slots.items():
            movable = [j for j, a in enumerate(slot.actions) if not a.default]
            perm = rng.permutation(movable)
            per_slot = effects.setdefault(slot_name, {})
            for kind in EFFECT_KINDS:
                w = self._truth.W[kind][slot_name]
                new = w.copy()
                new[:, movable] = (1 - mix) * w[:, movable] + mix * w[:, perm]
                for block in blocks:
                    for j in movable:
                        new[block, j] = (1 - mix) * new[block, j] + mix * new[rng.permutation(block), j]
                new *= np.exp(spread * rng.standard_normal(new.shape))
                for j in movable:
                    entry = per_slot.setdefault(slot.actions[j].id, {})
                    entry[kind] = design.term_dict(new[:, j])
        for inter in spec["effects"].get("interactions", []):
            w = design.term(_Node(inter["logit"], "interaction"))
            inter["logit"] = design.term_dict(w * np.exp(spread * rng.standard_normal(w.shape)))
        spec["_perturbation"] = {"seed": seed, "strength": strength}
        return World(spec)


__all__ = ["World"]
