"""Reading world.json: every value with its path, so that every refusal names the field."""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import numpy as np
import yaml

from insertrec.catalog import Catalog
from insertrec.errors import CatalogError, InsertrecError


class WorldError(InsertrecError):
    """A world.json (or a hidden-state frame) refused: names the field and the reason."""

    def __init__(self, field: str, reason: str, *, file: str = "world.json"):
        self.field, self.reason = field, reason
        super().__init__(f"{file} field {field!r}: {reason}")


class _Node:
    """A value of world.json with its path, so that every refusal names the field."""

    __slots__ = ("path", "value")

    def __init__(self, value: Any, path: str):
        self.value, self.path = value, path

    def fail(self, reason: str) -> NoReturn:
        shown = "" if isinstance(self.value, (dict, list)) else f" (got {json.dumps(self.value)[:60]})"
        raise WorldError(self.path or "(top)", reason + shown)

    def _child(self, key: str | int) -> str:
        return f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else key)

    def _mapping(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            self.fail("expected a mapping")
        return self.value

    def __getitem__(self, key: str) -> _Node:
        d = self._mapping()
        if key not in d:
            raise WorldError(self._child(key), "missing")
        return _Node(d[key], self._child(key))

    def get(self, key: str, default: Any) -> _Node:
        d = self._mapping()
        return _Node(d.get(key, default), self._child(key))

    def items(self, allowed: tuple[str, ...] | None = None) -> list[tuple[str, _Node]]:
        """Entries of a mapping, comments (``_`` keys) skipped; ``allowed`` refuses other keys."""
        out = [(k, _Node(v, self._child(k))) for k, v in self._mapping().items() if not k.startswith("_")]
        for k, node in out:
            if allowed is not None and k not in allowed:
                node.fail(f"unknown key; expected one of {', '.join(allowed)}")
        return out

    def seq(self, min_len: int = 0) -> list[_Node]:
        if not isinstance(self.value, list) or len(self.value) < min_len:
            self.fail(f"expected a list of at least {min_len} item(s)")
        return [_Node(v, self._child(i)) for i, v in enumerate(self.value)]

    def num(self, lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False) -> float:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail("expected a number")
        if v < lo or v > hi or (open_lo and v == lo):
            self.fail(f"expected a number in {'(' if open_lo else '['}{lo}, {hi}]")
        return float(v)

    def days(self) -> int:
        """A positive whole number of days (a feature window, as ``FeatureParams`` takes it)."""
        v = self.num(1.0)
        if v != int(v):
            self.fail("expected a whole number of days")
        return int(v)

    def text(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            self.fail("expected a non-empty string")
        return self.value

    def probs(self, names: tuple[str, ...]) -> np.ndarray:
        """A mapping name -> non-negative weight over ``names`` (absent = 0), normalised."""
        w = np.zeros(len(names))
        for k, node in self.items(names):
            w[names.index(k)] = node.num(0.0)
        if w.sum() <= 0:
            self.fail("weights must not all be zero")
        return w / w.sum()

    def pair(self, *, positive: bool = False) -> tuple[float, float]:
        """Two numbers: Beta parameters [a, b] (positive) or an interval of days [low, high]."""
        if not isinstance(self.value, list) or len(self.value) != 2:
            self.fail("expected a list of two numbers")
        a, b = (n.num(0.0, open_lo=positive) for n in self.seq())
        if not positive and b < a:
            self.fail("expected [low, high] with low <= high")
        return a, b


def _open_unit(node: _Node) -> float:
    """A probability strictly inside (0, 1), as a logit needs."""
    v = node.num(0.0, 1.0)
    if not 0.0 < v < 1.0:
        node.fail("expected a number strictly between 0 and 1")
    return v


def _action_index(catalog: Catalog, slot: str, node: _Node) -> int:
    ids = catalog.slots[slot].action_ids
    if node.text() not in ids:
        node.fail(f"not an action of slot {slot!r}")
    return ids.index(node.value)


def _per_action(node: _Node, catalog: Catalog) -> list[np.ndarray]:
    """A mapping action id -> share in [0, 1] as one array per slot (absent = 0)."""
    out = [np.zeros(len(slot.actions)) for slot in catalog.slots.values()]
    where = {aid: (i, j) for i, slot in enumerate(catalog.slots.values()) for j, aid in enumerate(slot.action_ids)}
    for aid, value in node.items():
        if aid not in where:
            value.fail(f"{aid!r} is not a catalog action")
        i, j = where[aid]
        out[i][j] = value.num(0.0, 1.0)
    return out


def _catalog(node: _Node) -> Catalog:
    """world.json's catalog section, checked by the catalog module itself."""
    node.items()
    text = yaml.safe_dump(node.value, sort_keys=False, allow_unicode=True)
    try:
        return Catalog.from_yaml(text, file="world.json catalog")
    except CatalogError as err:
        raise WorldError(f"catalog.{err.field}" if err.field else "catalog", err.reason) from None


__all__ = ["WorldError"]
