"""The simulated shop whose truth is known: a generic interpreter of ``world.json``.

Every later claim about decision quality is measured against this world, and
it must hold on worlds the engine has never seen. So nothing here knows which
action suits whom: that knowledge lives only in ``world.json`` (the packaged
``default_world.json`` or any other), and :meth:`World.perturbed` re-deals it.

The model (all symbols are fields of ``world.json``)
----------------------------------------------------
Customers arrive uniformly over ``days``. Each draws a ``customer_types`` entry
(by ``weight``) and, from it, latent traits: ``price_sensitivity``, ``eco``,
``return_proneness`` (Beta), a category affinity (Dirichlet), channel
probabilities (Dirichlet around the type's), ``ctx`` demographics, a log-mean
order value (``mu`` + Normal(``between_sd``)), an initial latent satisfaction
(Normal, NPS scale 0..10) and whether they ever answer surveys. ``signals``
emit noisy observable columns of a trait (``ctx_packaging_pref`` of ``eco``).

The hidden state ``h`` of an order is: the traits, the latent satisfaction and
the true tier it implies (``satisfaction.promoter_min``/``passive_min``), the
journey stage and a recent incident (as ``observed`` defines them), the
order's channel and gift flag, the order-value law and the category affinity.
A *term* is a linear function of ``h`` (see ``effects._doc``); with ``x(h)``
the design row of ``h`` and ``w`` a term's coefficients, its value is
``x(h) . w``. For a combination ``a`` of one action per slot:

* ``p(h,a) = sigmoid(intensity[type] + repurchase(h) + sum_slots logit[a_s](h)
  + sum_pairs interaction(h))``: probability that the next order comes within
  ``horizon_days``;
* ``rr(h,a) = sum_c affinity_c * sigmoid(logit(return_rate_c) + returns(h) +
  sum_slots return_logit[a_s](h))``: expected share of the next order's value
  returned (a guide read at home shapes the next purchase);
* ``reward(h,a) = p * E[V] * (1 - rr) * (1 - discount(a)) - cost(a)``, with
  ``E[V] = exp(mu + sigma^2 / 2)`` the next order's expected value,
  ``discount(a) = 1 - prod_slots (1 - reward.discount[a_s])`` (paid only by
  a customer who comes back: a coupon to someone who would come anyway only
  costs margin) and ``cost(a)`` the catalog's unit costs.

This is exactly what :meth:`World.expected_reward` computes, so the oracle
(the best eligible combination per order) is known.

Dynamics. Orders are simulated in vectorized rounds (every customer's k-th
order at once). At each order the shop's systems compute the observed features
(the columns of ``schema.FEATURES`` the catalog tests, with the ``observed``
windows), the logging policy picks each slot's action (the catalog's rules with
probability ``1 - epsilon``, else uniform among eligible actions; the exact
propensity is logged), then the next order comes within the horizon with
probability ``p(h,a)`` (``1 + (horizon - 1) * U**repeat_timing.shape`` days
later), or later with the type's ``later_return`` probability (horizon +
Exponential(``later_mean_days``)), or never. The next order's value is drawn
from the customer's law, the coupon discount is taken off it, its returns are
Binomial(n_items, rr)/n_items of the paid value with rr from its realized main
category. An incident (at most one)
may hit the order; latent satisfaction then moves by the actions'
``satisfaction`` terms and the incident's hit, an NPS answer may follow
(``nps``), and satisfaction reverts toward the type's mean.
The logged reward of an order is the next order's paid value net of returns if
it came within the horizon, else 0, minus the action costs: an unbiased draw
of ``reward(h,a)``. It counts the next order only (the SPEC's derived reward
counts every order in the horizon; the logged one overrides it), and for the
last orders it may count a next order past the end of the data.

The shop's features are computed inside the simulation by ``insertrec.features``
itself on the history simulated so far (so the logged propensities are exact
from the engine's point of view too). :meth:`World.evaluation_set` gives fresh
orders, the history before them and their hidden state, for ``simulate``;
:meth:`World.perturbed` re-deals the truth so that quality is measured on
worlds the engine has not seen.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import yaml

from insertrec.catalog import Catalog
from insertrec.data import Dataset
from insertrec.errors import CatalogError, InsertrecError
from insertrec.features import FeatureParams
from insertrec.features.history import ArrayHistory, history_features
from insertrec.schema import FEATURES, JOURNEY_STAGES

TIERS: tuple[str, ...] = ("promoter", "passive", "detractor")
TRAITS: tuple[str, ...] = ("price_sensitivity", "eco", "return_proneness", "satisfaction")
EFFECT_KINDS: tuple[str, ...] = ("logit", "return_logit", "satisfaction")
_STAGES: tuple[str, ...] = JOURNEY_STAGES
_NEW, _DEVELOPING, _LOYAL, _LAPSED = (_STAGES.index(s) for s in ("new", "developing", "loyal", "lapsed"))
_MAX_EXTRA_ITEMS = 4        # extra items whose categories join the order's main one
_SECONDS_PER_DAY = 86400.0


class WorldError(InsertrecError):
    """A world.json (or a hidden-state frame) refused: names the field and the reason."""

    def __init__(self, field: str, reason: str, *, file: str = "world.json"):
        self.field, self.reason = field, reason
        super().__init__(f"{file} field {field!r}: {reason}")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return np.log(p) - np.log1p(-p)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of ``probs`` (rows need not be normalised)."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), probs.shape[1] - 1)


# --------------------------------------------------------------------------- parsing

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

    def _mapping(self) -> dict:
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


class _StateDesign:
    """The design row x(h) of a hidden state: which coefficient of a term multiplies what."""

    def __init__(self, channels: tuple[str, ...]):
        self.channels = channels
        self.groups: dict[str, tuple[str, ...]] = {"tier": TIERS, "stage": _STAGES, "traits": TRAITS,
                                                   "channel": channels}
        self.columns: list[tuple[str, str]] = [("base", ""), ("incident", ""), ("gift", "")]
        for group, names in self.groups.items():
            self.columns += [(group, n) for n in names]
        self.index = {c: i for i, c in enumerate(self.columns)}

    def term(self, node: _Node) -> np.ndarray:
        w = np.zeros(len(self.columns))
        for key, sub in node.items(("base", "incident", "gift", *self.groups)):
            if key in self.groups:
                for name, coef in sub.items(self.groups[key]):
                    w[self.index[(key, name)]] = coef.num()
            else:
                w[self.index[(key, "")]] = sub.num()
        return w

    def term_dict(self, w: np.ndarray) -> dict[str, Any]:
        """Inverse of :meth:`term` (zeros left out), so a re-dealt world is written back as JSON."""
        out: dict[str, Any] = {}
        for (group, name), v in zip(self.columns, w):
            if v != 0.0:
                v = round(float(v), 4)
                if name:
                    out.setdefault(group, {})[name] = v
                else:
                    out[group] = v
        return out

    def design(self, st: dict[str, np.ndarray]) -> np.ndarray:
        n = len(st["tier"])
        x = np.zeros((n, len(self.columns)))
        x[:, self.index[("base", "")]] = 1.0
        x[:, self.index[("incident", "")]] = st["incident"]
        x[:, self.index[("gift", "")]] = st["is_gift"]
        rows = np.arange(n)
        x[rows, self.index[("tier", TIERS[0])] + st["tier"]] = 1.0
        x[rows, self.index[("stage", _STAGES[0])] + st["stage"]] = 1.0
        x[rows, self.index[("channel", self.channels[0])] + st["channel"]] = 1.0
        for name in TRAITS:
            x[:, self.index[("traits", name)]] = st[name] / 10.0 if name == "satisfaction" else st[name]
        return x


# --------------------------------------------------------------------------- population

class _Population:
    """Who the customers are and what they order (``customer_types``, ``categories``, ...)."""

    def __init__(self, root: _Node):
        cats = root["categories"].items()
        if not cats or len(cats) > 30:
            root["categories"].fail("expected 1 to 30 categories")
        self.categories = tuple(k for k, _ in cats)
        self.cat_return_logit = np.array([_logit(_open_unit(n["return_rate"])) for _, n in cats])
        self.channels = tuple(n.text() for n in root["channels"].seq(1))
        regions = root["regions"]
        self.regions = tuple(k for k, _ in regions.items())
        self.region_p = regions.probs(self.regions)
        types = root["customer_types"].seq(1)
        self.type_names = tuple(t["name"].text() for t in types)
        self.type_p = np.array([t["weight"].num(0.0) for t in types])
        if self.type_p.sum() <= 0:
            root["customer_types"].fail("weights must not all be zero")
        self.type_p /= self.type_p.sum()
        self.beta = {trait: np.array([t[trait].pair(positive=True) for t in types]) for trait in TRAITS[:3]}
        self.affinity = np.array([self._alphas(t["category_affinity"], self.categories) for t in types])
        self.channel_p = np.array([t["channel"].probs(self.channels) for t in types])
        values: dict[str, tuple[str, ...]] = {}    # ctx column -> every value any type emits
        for t in types:
            for col, dist in t.get("ctx", {}).items():
                values[col] = tuple(dict.fromkeys(values.get(col, ()) + tuple(k for k, _ in dist.items())))
        self.ctx = {col: (vals, np.array([t["ctx"][col].probs(vals) for t in types])) for col, vals in values.items()}
        self.gift_rate = np.array([t["gift_rate"].num(0.0, 1.0) for t in types])
        self.intensity = np.array([t["intensity"].num() for t in types])
        self.later = np.array([t["later_return"].num(0.0, 1.0) for t in types])
        self.later_days = np.array([t["later_mean_days"].num(0.0, open_lo=True) for t in types])
        self.value_mu = np.array([t["order_value"]["mu"].num() for t in types])
        self.value_sigma = np.array([t["order_value"]["sigma"].num(0.0) for t in types])
        self.value_between = np.array([t["order_value"]["between_sd"].num(0.0) for t in types])
        self.items = np.array([t["items"].num(1.0) for t in types])
        self.sat_mean = np.array([t["satisfaction"]["mean"].num(0.0, 10.0) for t in types])
        self.sat_sd = np.array([t["satisfaction"]["sd"].num(0.0) for t in types])
        self.signals = []
        for s in root.get("signals", []).seq():
            trait = s["trait"].text()
            if trait not in TRAITS[:3]:
                s["trait"].fail(f"expected one of {', '.join(TRAITS[:3])}")
            column = s["column"].text()
            if not column.startswith("ctx_"):
                s["column"].fail("signal columns must start with 'ctx_'")
            self.signals.append((column, trait, s["threshold"].num(), s["noise_sd"].num(0.0),
                                 s["above"].text(), s["below"].text()))

    @staticmethod
    def _alphas(node: _Node, names: tuple[str, ...]) -> np.ndarray:
        a = np.zeros(len(names))
        for k, v in node.items(names):
            a[names.index(k)] = v.num(0.0)
        if (a <= 0).all():
            node.fail("Dirichlet parameters must not all be zero")
        return np.maximum(a, 1e-3)

    def sample(self, n: int, days: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per-customer latent traits and constant context."""
        typ = rng.choice(len(self.type_names), size=n, p=self.type_p)
        c: dict[str, np.ndarray] = {"type": typ, "arrival": np.sort(rng.random(n)) * days}
        for trait, ab in self.beta.items():
            c[trait] = rng.beta(ab[typ, 0], ab[typ, 1])
        aff = rng.gamma(self.affinity[typ])
        c["aff"] = aff / aff.sum(axis=1, keepdims=True)
        chan = rng.gamma(self.channel_p[typ] * 8.0 + 1e-3)
        c["channel_p"] = chan / chan.sum(axis=1, keepdims=True)
        c["value_mu"] = self.value_mu[typ] + self.value_between[typ] * rng.standard_normal(n)
        c["value_sigma"] = self.value_sigma[typ]
        c["satisfaction"] = np.clip(self.sat_mean[typ] + self.sat_sd[typ] * rng.standard_normal(n), 0, 10)
        c["region"] = np.asarray(self.regions, dtype=object)[rng.choice(len(self.regions), size=n, p=self.region_p)]
        for col, (values, table) in self.ctx.items():
            c[f"ctx_{col}"] = np.asarray(values, dtype=object)[_draw(table[typ], rng)]
        for column, trait, threshold, noise, above, below in self.signals:
            c[column] = np.where(c[trait] + noise * rng.standard_normal(n) > threshold, above, below).astype(object)
        return c

    def order_attrs(self, c: dict[str, np.ndarray], idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """What the k-th orders of customers ``idx`` contain (independent of any action)."""
        n, typ = len(idx), c["type"][idx]
        items = 1 + rng.poisson(self.items[typ] - 1.0)
        main = _draw(c["aff"][idx], rng)
        extra = np.stack([_draw(c["aff"][idx], rng) for _ in range(_MAX_EXTRA_ITEMS)], axis=1)
        present = np.arange(_MAX_EXTRA_ITEMS)[None, :] < (items - 1)[:, None]
        mask = (np.left_shift(1, extra) * present).astype(np.int64)
        mask = np.bitwise_or.reduce(mask, axis=1) | np.left_shift(1, main)
        return {"value": np.round(np.exp(c["value_mu"][idx] + c["value_sigma"][idx] * rng.standard_normal(n)), 2),
                "items": items, "main": main, "cat_mask": mask,
                "channel": _draw(c["channel_p"][idx], rng),
                "is_gift": rng.random(n) < self.gift_rate[typ]}

    def category_strings(self, main: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Pipe-separated categories, the main one first (built once per distinct basket)."""
        code = main.astype(np.int64) * (1 << len(self.categories)) + mask
        uniq, inv = np.unique(code, return_inverse=True)
        k = 1 << len(self.categories)
        names = [self._basket(int(u // k), int(u % k)) for u in uniq]
        return np.asarray(names, dtype=object)[inv]

    def _basket(self, main: int, mask: int) -> str:
        rest = [c for i, c in enumerate(self.categories) if mask >> i & 1 and i != main]
        return "|".join([self.categories[main], *rest])


# --------------------------------------------------------------------------- truth

class _Truth:
    """The true response to actions (``effects``, ``reward``) on top of the catalog's costs."""

    def __init__(self, root: _Node, catalog: Catalog, layout: _StateDesign, pop: _Population):
        self.layout, self.pop = layout, pop
        self.slots = tuple(catalog.slots)
        eff = root["effects"]
        eff.items(("repurchase", "returns", "actions", "interactions"))
        self.repurchase = layout.term(eff["repurchase"])
        self.returns = layout.term(eff["returns"])
        self.W = {kind: {s: np.zeros((len(layout.columns), len(catalog.slots[s].actions))) for s in self.slots}
                  for kind in EFFECT_KINDS}
        for slot, per_action in eff.get("actions", {}).items(self.slots):
            ids = catalog.slots[slot].action_ids
            for aid, node in per_action.items(ids):
                for kind, term in node.items(EFFECT_KINDS):
                    self.W[kind][slot][:, ids.index(aid)] = layout.term(term)
        self.pairs: list[tuple[int, int, int, int, np.ndarray]] = []
        for inter in eff.get("interactions", []).seq():
            inter.items(("actions", "logit"))
            chosen = inter["actions"].items(self.slots)
            if len(chosen) != 2:
                inter["actions"].fail("an interaction names exactly two slots")
            (s1, j1), (s2, j2) = ((self.slots.index(s), _action_index(catalog, s, node)) for s, node in chosen)
            self.pairs.append((s1, j1, s2, j2, layout.term(inter["logit"])))
        self.costs = [catalog.slots[s].costs.astype(float) for s in self.slots]
        self.discount = _per_action(root["reward"].get("discount", {}), catalog)
        self.nps_boost = _per_action(root["nps"].get("boost", {}), catalog)

        # actions whose return effects coincide share one class, so expected return
        # rates are computed once per distinct class combination, not per combo
        self.return_class = [np.unique(self.W["return_logit"][s], axis=1, return_inverse=True)[1].ravel()
                             for s in self.slots]

    @staticmethod
    def _gather(m: np.ndarray, pick: np.ndarray) -> np.ndarray:
        """Columns of ``m`` per pick: (1, C) the same combos for every row, (n, 1) one choice per row."""
        return m[:, pick[0]] if pick.shape[0] == 1 else np.take_along_axis(m, pick, axis=1)

    def _sum_actions(self, kind: str, x: np.ndarray, picks: list[np.ndarray]) -> np.ndarray:
        out = self._gather(x @ self.W[kind][self.slots[0]], picks[0])
        for s, p in zip(self.slots[1:], picks[1:]):
            out += self._gather(x @ self.W[kind][s], p)
        return out

    def repeat_probability(self, st: dict[str, np.ndarray], x: np.ndarray, picks: list[np.ndarray]) -> np.ndarray:
        """p(h, a), (n, C): picks are per slot, (1, C) combos or (n, 1) choices."""
        z = self._sum_actions("logit", x, picks)
        z += (self.pop.intensity[st["type"]] + x @ self.repurchase)[:, None]
        for s1, j1, s2, j2, w in self.pairs:
            both = (picks[s1] == j1) & (picks[s2] == j2)
            if picks[s1].shape[0] == 1:
                z[:, both[0]] += (x @ w)[:, None]
            else:
                z += (x @ w)[:, None] * both
        np.negative(z, out=z)
        np.exp(z, out=z)
        z += 1.0
        return np.reciprocal(z, out=z)

    def return_offset(self, x: np.ndarray, picks: list[np.ndarray]) -> np.ndarray:
        """Logit offset of the next order's return rate (category base excluded), (n, C)."""
        return (x @ self.returns)[:, None] + self._sum_actions("return_logit", x, picks)

    def by_action(self, table: list[np.ndarray], picks: list[np.ndarray]) -> np.ndarray:
        return sum(t[p] for t, p in zip(table, picks))

    def expected_reward(self, st: dict[str, np.ndarray], combos: np.ndarray) -> np.ndarray:
        x = self.layout.design(st)
        classes = np.stack([cls[combos[:, i]] for i, cls in enumerate(self.return_class)], axis=1)
        _, first, inverse = np.unique(classes, axis=0, return_index=True, return_inverse=True)
        off = self.return_offset(x, [combos[None, first, i] for i in range(len(self.slots))])
        rr = sum(st["aff"][:, c, None] * _sigmoid(base + off) for c, base in enumerate(self.pop.cat_return_logit))
        value = np.exp(st["value_mu"] + 0.5 * st["value_sigma"] ** 2)[:, None] * (1.0 - rr)
        picks = [combos[None, :, i] for i in range(len(self.slots))]
        keep = np.prod([1.0 - d[pk] for d, pk in zip(self.discount, picks)], axis=0)
        reward = self.repeat_probability(st, x, picks)
        reward *= value[:, inverse.ravel()] * keep
        reward -= self.by_action(self.costs, picks)
        return reward


class _Dynamics:
    """What happens around an order besides the decision: satisfaction, NPS, incidents, windows."""

    def __init__(self, root: _Node):
        sat = root["satisfaction"]
        self.promoter_min = sat["promoter_min"].num(0.0, 10.0)
        self.passive_min = sat["passive_min"].num(0.0, self.promoter_min)
        self.reversion = sat["reversion"].num(0.0, 1.0)
        self.sat_noise = sat["noise_sd"].num(0.0)
        nps = root["nps"]
        self.responder_share = nps["responder_share"].num(0.0, 1.0)
        self.responder_rate = nps["responder_rate"].num(0.0, 1.0)
        self.other_rate = nps["other_rate"].num(0.0, 1.0)
        self.nps_noise = nps["noise_sd"].num(0.0)
        self.nps_delay = nps["delay_days"].pair()
        inc = root["incidents"].items()
        self.incident_types = np.asarray([k for k, _ in inc], dtype=object)
        self.incident_p = np.array([n["probability"].num(0.0, 1.0) for _, n in inc])
        if self.incident_p.sum() > 1:
            root["incidents"].fail("incident probabilities sum above 1")
        self.incident_hit = np.array([n["satisfaction"].num() for _, n in inc])
        self.incident_delay = np.array([n["delay_days"].pair() for _, n in inc]).reshape(-1, 2)
        self.gap_shape = root["repeat_timing"]["shape"].num(0.0, open_lo=True)
        obs = root["observed"]
        self.nps_ttl = obs["nps_ttl_days"].days()
        self.lapse = obs["lapse_days"].days()
        self.return_window = obs["return_window_days"].days()
        self.incident_window = obs["incident_window_days"].days()

    def tier(self, satisfaction: np.ndarray) -> np.ndarray:
        return np.where(satisfaction >= self.promoter_min, 0, np.where(satisfaction >= self.passive_min, 1, 2))


def _logging_probs(catalog: Catalog, features: pd.DataFrame, epsilon: float) -> dict[str, np.ndarray]:
    """The logging policy's probability of every action: rules w.p. 1-eps, else uniform among eligible."""
    eligible, rules = catalog.eligible(features), catalog.rules_choice(features)
    rows = np.arange(len(features))
    out = {}
    for slot, ok in eligible.items():
        probs = epsilon * ok / ok.sum(axis=1, keepdims=True)
        probs[rows, rules[slot]] += 1.0 - epsilon
        out[slot] = probs
    return out


# --------------------------------------------------------------------------- results

@dataclass
class WorldData:
    """One simulated history: the input tables (data.py's dtypes) and the hidden state of each order.

    ``hidden`` is row-aligned with ``orders``; pass it to :meth:`World.expected_reward`.
    """

    orders: pd.DataFrame
    nps: pd.DataFrame
    exposures: pd.DataFrame
    incidents: pd.DataFrame
    hidden: pd.DataFrame
    catalog: Catalog

    def to_dataset(self) -> Dataset:
        return Dataset(orders=self.orders, nps=self.nps, exposures=self.exposures,
                       incidents=self.incidents, catalog=self.catalog, source="world")


@dataclass
class EvaluationSet:
    """Fresh orders to decide, with the history before them and their hidden truth.

    ``data`` holds each evaluation customer's history strictly before their
    evaluation order plus that order (without its exposures); everyone else is
    cut at the start of the evaluation stretch. ``features`` is the shop's own
    view of each evaluation order (what the catalog's rules and eligibility
    see), so the caller can compute the rules' and the logging policy's value.
    """

    data: Dataset
    order_ids: np.ndarray
    hidden: pd.DataFrame
    features: pd.DataFrame
    world: World

    def logging_propensities(self) -> dict[str, np.ndarray]:
        """Per slot, (n_orders, n_actions): the probability the world's logging policy gives each action."""
        return _logging_probs(self.world.catalog, self.features, self.world.epsilon)


# --------------------------------------------------------------------------- the world

class World:
    """A simulated shop defined entirely by its ``world.json`` (see the module docstring)."""

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
            self._layout = _StateDesign(self._pop.channels)
            self._truth = _Truth(root, self.catalog, self._layout, self._pop)
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
        return _Run(self, customers, seed, keep_features=False).run()[0]

    def write_demo_data(self, out: Path, customers: int = 5000, seed: int = 0) -> None:
        """A data directory (SPEC tables, catalog.yaml) plus the world.json it came from."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = self.generate(customers, seed)
        iso = "%Y-%m-%dT%H:%M:%SZ"
        for name in ("orders", "nps", "exposures", "incidents"):
            getattr(data, name).to_csv(out / f"{name}.csv", index=False, date_format=iso)
        (out / "catalog.yaml").write_text(self.catalog.text)
        (out / "world.json").write_text(self.to_json())

    def evaluation_set(self, orders: int, seed: int) -> EvaluationSet:
        """``orders`` fresh orders in the last ``horizon_days`` of a history generated with ``seed``.

        Each evaluation order is its customer's first order in that stretch, so
        nothing in ``data`` depends on how it was decided.
        """
        if orders < 1:
            raise WorldError("orders", "expected at least one evaluation order", file="evaluation_set")
        customers = max(1000, 8 * orders)    # roughly 1 customer in 7 orders in the last stretch
        while True:
            data, feats = _Run(self, customers, seed, keep_features=True).run()
            t0 = self.start + pd.Timedelta(days=self.days - self.horizon)
            late = data.orders.index[data.orders["order_ts"] >= t0]
            firsts = data.orders.loc[late].drop_duplicates("customer_id").index.to_numpy()
            if len(firsts) >= orders:
                break
            customers = int(customers * 1.25 * orders / max(len(firsts), 1)) + 1
        rng = np.random.default_rng([seed, 1])
        chosen = np.sort(rng.choice(firsts, size=orders, replace=False))
        evals = data.orders.loc[chosen]
        cut_of = dict(zip(evals["customer_id"], evals["order_ts"]))

        def before_cut(frame: pd.DataFrame, ts: str) -> pd.Series:
            cut = frame["customer_id"].map(cut_of).fillna(t0)
            return frame[ts] < cut

        o = data.orders
        keep = before_cut(o, "order_ts").to_numpy().copy()
        keep[chosen] = True
        kept_ids = set(o.loc[keep, "order_id"]) - set(evals["order_id"])
        history = Dataset(
            orders=o[keep].reset_index(drop=True),
            nps=data.nps[before_cut(data.nps, "response_ts")].reset_index(drop=True),
            exposures=data.exposures[data.exposures["order_id"].isin(kept_ids)].reset_index(drop=True),
            incidents=data.incidents[before_cut(data.incidents, "ts")].reset_index(drop=True),
            catalog=self.catalog, source="world evaluation")
        return EvaluationSet(data=history, order_ids=evals["order_id"].to_numpy(dtype=object),
                             hidden=data.hidden.loc[chosen].reset_index(drop=True),
                             features=feats.loc[chosen].reset_index(drop=True), world=self)

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
        lay = self._layout
        blocks = [[lay.index[(g, n)] for n in names] for g, names in lay.groups.items() if g in ("tier", "stage")]
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
                    entry[kind] = lay.term_dict(new[:, j])
        for inter in spec["effects"].get("interactions", []):
            w = lay.term(_Node(inter["logit"], "interaction"))
            inter["logit"] = lay.term_dict(w * np.exp(spread * rng.standard_normal(w.shape)))
        spec["_perturbation"] = {"seed": seed, "strength": strength}
        return World(spec)


def _catalog(node: _Node) -> Catalog:
    """world.json's catalog section, checked by the catalog module itself."""
    node.items()
    text = yaml.safe_dump(node.value, sort_keys=False, allow_unicode=True)
    try:
        return Catalog.from_yaml(text, file="world.json catalog")
    except CatalogError as err:
        raise WorldError(f"catalog.{err.field}" if err.field else "catalog", err.reason) from None


# --------------------------------------------------------------------------- the simulation

class _Run:
    """One simulated history: every customer's k-th order at once, round after round.

    The shop's features of an order are ``insertrec.features``' own
    (:func:`~insertrec.features.history.history_features`) on the history
    simulated so far, so the logged propensities are exactly what the engine
    computes from the written tables. A customer in round k was in every round
    before (each round's customers are sorted), so their prior orders are one
    row found by binary search in each earlier round.
    """

    def __init__(self, world: World, customers: int, seed: int, *, keep_features: bool):
        if int(customers) < 1:
            raise WorldError("customers", "expected at least one customer", file="generate")
        self.w, self.keep_features = world, keep_features
        self.rng = np.random.default_rng(seed)
        n, pop, dyn = int(customers), world._pop, world._dyn
        self.c = pop.sample(n, world.days, self.rng)
        self.responder = self.rng.random(n) < world._dyn.responder_share
        self.ctx_cols = [k for k in self.c if k.startswith("ctx_")]
        slots = list(world.catalog.slots.values())
        self.ids = [aid for s in slots for aid in s.action_ids]
        self.offsets = np.cumsum([0] + [len(s.actions) for s in slots])[:-1]
        self.params = FeatureParams(
            nps_ttl_days=dyn.nps_ttl, lapse_days=dyn.lapse, return_window_days=dyn.return_window,
            incident_window_days=dyn.incident_window, categories=pop.categories, channels=pop.channels,
            action_ids=tuple(self.ids), cap_windows=world.catalog.cap_windows(), ctx_columns=tuple(self.ctx_cols))
        # what an order leaves for the next one: its return logit offset, discount, and whether it came in time
        self.ret_off, self.disc, self.in_time = np.zeros(n), np.zeros(n), np.zeros(n, bool)
        self.rounds: list[dict[str, Any]] = []
        # a round of no orders, so that the history before the first round has the columns' shapes
        self._none: dict[str, Any] = {
            "ledger": {"ts": np.zeros(0, np.int64), "value": np.zeros(0), "returned": np.zeros(0),
                       "gift": np.zeros(0, bool), "cats": np.zeros((0, len(pop.categories)), bool),
                       "chan": np.zeros(0, np.int64), "recv": np.zeros((0, len(self.ids)), bool)},
            "nps_t": np.zeros(0), "inc_t": np.zeros(0), "score": np.zeros(0), "inc": np.zeros(0, np.int64)}

    def run(self) -> tuple[WorldData, pd.DataFrame | None]:
        pending, t_next = np.arange(len(self.c["type"])), self.c["arrival"].copy()
        while pending.size:
            pending = self._step(pending, t_next)
        return self._tables()

    def _returned(self, paid: np.ndarray, attrs: dict[str, np.ndarray], offset: np.ndarray) -> np.ndarray:
        rate = _sigmoid(self.w._pop.cat_return_logit[attrs["main"]] + offset)
        return np.round(paid * self.rng.binomial(attrs["items"], rate) / attrs["items"], 2)

    def _step(self, idx: np.ndarray, t_next: np.ndarray) -> np.ndarray:
        w, rng, pop, truth, dyn = self.w, self.rng, self.w._pop, self.w._truth, self.w._dyn
        t = t_next[idx]
        attrs = pop.order_attrs(self.c, idx, rng)
        paid = np.round(attrs["value"] * (1.0 - self.disc[idx] * self.in_time[idx]), 2)
        if self.rounds:    # this order is the previous one's reward, even past the end of the data
            returned = self._returned(paid, attrs, self.ret_off[idx])
            prev = self.rounds[-1]
            prev["reward"][np.searchsorted(prev["cust"], idx)] += np.where(self.in_time[idx], paid - returned, 0.0)
        keep = t < w.days
        idx, t, paid = idx[keep], t[keep], paid[keep]
        attrs = {k: v[keep] for k, v in attrs.items()}
        if not idx.size:
            return idx
        frame, st = self._observe(idx, t, attrs, paid)
        x = w._layout.design(st)
        returned = returned[keep] if self.rounds else self._returned(paid, attrs, x @ truth.returns)

        n, rows = len(idx), np.arange(len(idx))
        probs = _logging_probs(w.catalog, frame, w.epsilon)
        chosen = np.stack([_draw(probs[s], rng) for s in w.slots], axis=1)
        propensity = np.stack([probs[s][rows, chosen[:, i]] for i, s in enumerate(w.slots)], axis=1)
        picks = [chosen[:, i:i + 1] for i in range(len(w.slots))]
        p = truth.repeat_probability(st, x, picks)[:, 0]
        off = truth.return_offset(x, picks)[:, 0]
        typ = st["type"]
        in_time = rng.random(n) < p
        later = ~in_time & (rng.random(n) < pop.later[typ])
        gap = np.where(in_time, 1.0 + (w.horizon - 1.0) * rng.random(n) ** dyn.gap_shape,
                       np.where(later, w.horizon + rng.exponential(pop.later_days[typ]), np.inf))

        inc = rng.choice(len(dyn.incident_p) + 1, size=n, p=[1.0 - dyn.incident_p.sum(), *dyn.incident_p]) - 1
        lo, hi = np.vstack([dyn.incident_delay, [0.0, 0.0]])[inc].T
        inc_t = np.where(inc >= 0, t + lo + (hi - lo) * rng.random(n), np.inf)
        after = np.clip(st["satisfaction"] + truth._sum_actions("satisfaction", x, picks)[:, 0]
                        + np.append(dyn.incident_hit, 0.0)[inc], 0.0, 10.0)
        rate = (np.where(self.responder[idx], dyn.responder_rate, dyn.other_rate)
                + truth.by_action(truth.nps_boost, picks)[:, 0])
        nps_t = np.where(rng.random(n) < rate, t + rng.uniform(*dyn.nps_delay, size=n), np.inf)
        score = np.clip(np.round(after + dyn.nps_noise * rng.standard_normal(n)), 0, 10)
        self.c["satisfaction"][idx] = np.clip(after + dyn.reversion * (pop.sat_mean[typ] - after)
                                              + dyn.sat_noise * rng.standard_normal(n), 0.0, 10.0)

        recv = np.zeros((n, len(self.ids)), dtype=bool)
        recv[rows[:, None], self.offsets + chosen] = True
        self.rounds.append({"cust": idx, "t": t, "paid": paid, "returned": returned, "items": attrs["items"],
                            "categories": frame["categories"].to_numpy(), "channel": attrs["channel"],
                            "is_gift": attrs["is_gift"], "actions": chosen, "propensity": propensity,
                            "reward": -truth.by_action(truth.costs, picks)[:, 0], "inc": inc, "inc_t": inc_t,
                            "nps_t": nps_t, "score": score, "state": st,
                            "features": frame if self.keep_features else None,
                            "ledger": {"ts": self._ns(t), "value": paid, "returned": returned, "gift": attrs["is_gift"],
                                       "cats": (attrs["cat_mask"][:, None] >> np.arange(len(pop.categories))) & 1 > 0,
                                       "chan": attrs["channel"], "recv": recv}})
        self.ret_off[idx], self.in_time[idx] = off, in_time
        self.disc[idx] = 1.0 - np.prod([1.0 - d[chosen[:, i]] for i, d in enumerate(truth.discount)], axis=0)
        t_next[idx] = t + gap
        return idx[in_time | (later & (t + gap < w.days))]

    def _ns(self, days: np.ndarray) -> np.ndarray:
        """Simulated days as the UTC nanoseconds of the written tables (rounded to the second)."""
        seconds = np.round(np.where(np.isfinite(days), days, 0.0) * _SECONDS_PER_DAY).astype(np.int64)
        return self.w.start.value + seconds * 10**9

    def _history(self, idx: np.ndarray) -> ArrayHistory:
        """Customers ``idx``'s orders, NPS answers and incidents so far, customer ``i`` coded ``i``."""
        w, n = self.w, len(idx)
        pos = [np.searchsorted(r["cust"], idx) for r in self.rounds]
        code = np.tile(np.arange(n), len(pos))

        def gather(get: Any) -> np.ndarray:
            return np.concatenate([get(self._none), *(get(r)[p] for r, p in zip(self.rounds, pos))])

        orders = {"customer": code} | {k: gather(lambda r, k=k: r["ledger"][k]) for k in self._none["ledger"]}
        nps_t, inc_t = gather(lambda r: r["nps_t"]), gather(lambda r: r["inc_t"])
        told, hit = nps_t < w.days, inc_t < w.days
        return ArrayHistory(
            orders=orders,
            nps={"customer": code[told], "ts": self._ns(nps_t[told]),
                 "score": gather(lambda r: r["score"])[told].astype(np.int64)},
            incidents={"customer": code[hit], "ts": self._ns(inc_t[hit]),
                       "type": gather(lambda r: r["inc"])[hit].astype(np.int64)},
            incident_types=tuple(w._dyn.incident_types))

    def _observe(self, idx: np.ndarray, t: np.ndarray, attrs: dict[str, np.ndarray],
                 paid: np.ndarray) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """The shop's features of each order (strictly from before it) and the order's hidden state."""
        pop, c = self.w._pop, self.c
        hist = history_features(self.params, self._history(idx), np.arange(len(idx)), self._ns(t))
        own = {
            "order_value": paid, "n_items": attrs["items"].astype(float),
            "channel": np.asarray(pop.channels, dtype=object)[attrs["channel"]], "region": c["region"][idx],
            "is_gift": attrs["is_gift"], "categories": pop.category_strings(attrs["main"], attrs["cat_mask"]),
            "main_category": np.asarray(pop.categories, dtype=object)[attrs["main"]],
        }
        cols = {k: getattr(v, "array", v) for k, v in (own | hist).items()}
        frame = pd.DataFrame({k: cols[k] for k in FEATURES} | {k: c[k][idx] for k in self.ctx_cols}
                             | {k: v for k, v in cols.items() if k not in FEATURES})
        stage = pd.Categorical(cols["journey_stage"], categories=_STAGES).codes.astype(np.intp)
        state = {"type": c["type"][idx], "tier": self.w._dyn.tier(c["satisfaction"][idx]), "stage": stage,
                 "channel": attrs["channel"], "is_gift": attrs["is_gift"], "incident": cols["incidents_90d"] > 0,
                 "satisfaction": c["satisfaction"][idx].copy(), "aff": c["aff"][idx],
                 **{k: c[k][idx] for k in ("price_sensitivity", "eco", "return_proneness", "value_mu", "value_sigma")}}
        return frame, state

    def _tables(self) -> tuple[WorldData, pd.DataFrame | None]:
        w, pop, rounds = self.w, self.w._pop, self.rounds
        cat = {k: np.concatenate([r[k] for r in rounds]) for k in rounds[0] if k not in ("state", "features", "ledger")}
        seconds = np.round(cat["t"] * _SECONDS_PER_DAY)
        order = np.argsort(seconds, kind="stable")
        cat = {k: v[order] for k, v in cat.items()}
        n, n_slots = len(order), len(w.slots)
        ts = (w.start + pd.to_timedelta(seconds[order], unit="s")).astype("datetime64[ns, UTC]")
        order_id = _ids("o", np.arange(n))
        customer_id = _ids("c", cat["cust"])
        orders = pd.DataFrame({
            "order_id": order_id, "customer_id": customer_id, "order_ts": ts,
            "order_value": cat["paid"], "n_items": cat["items"].astype(float),
            "channel": np.asarray(pop.channels, dtype=object)[cat["channel"]], "categories": cat["categories"],
            "is_gift": cat["is_gift"], "returned_value": cat["returned"], "region": self.c["region"][cat["cust"]],
            **{col: self.c[col][cat["cust"]] for col in self.ctx_cols}})
        action_ids = np.asarray(self.ids, dtype=object)
        exposures = pd.DataFrame({
            "order_id": np.repeat(order_id, n_slots), "slot": np.tile(np.asarray(w.slots, dtype=object), n),
            "action_id": action_ids[(self.offsets + cat["actions"]).ravel()],
            "propensity": cat["propensity"].ravel(), "reward": np.repeat(np.round(cat["reward"], 4), n_slots)})
        answered = cat["nps_t"] < w.days
        nps = pd.DataFrame({"customer_id": customer_id[answered], "response_ts": _timestamps(w, cat["nps_t"][answered]),
                            "score": cat["score"][answered].astype(np.int64)})
        hit = cat["inc_t"] < w.days
        incidents = pd.DataFrame({"customer_id": customer_id[hit], "order_id": order_id[hit],
                                  "type": w._dyn.incident_types[cat["inc"][hit]],
                                  "ts": _timestamps(w, cat["inc_t"][hit])})
        st = {k: np.concatenate([r["state"][k] for r in rounds])[order] for k in rounds[0]["state"]}
        hidden = pd.DataFrame({
            "order_id": order_id, "customer_id": customer_id,
            "customer_type": np.asarray(pop.type_names, dtype=object)[st["type"]],
            "tier": np.asarray(TIERS, dtype=object)[st["tier"]],
            "stage": np.asarray(_STAGES, dtype=object)[st["stage"]],
            "channel": np.asarray(pop.channels, dtype=object)[st["channel"]], "is_gift": st["is_gift"],
            "incident_recent": st["incident"],
            **{k: st[k] for k in (*TRAITS, "value_mu", "value_sigma")},
            **{f"aff_{name}": st["aff"][:, i] for i, name in enumerate(pop.categories)}})
        features = None
        if self.keep_features:
            features = pd.concat([r["features"] for r in rounds], ignore_index=True).iloc[order].reset_index(drop=True)
            features.insert(0, "order_ts", ts)
            features.insert(0, "customer_id", customer_id)
            features.insert(0, "order_id", order_id)
        data = WorldData(orders=orders, nps=nps.sort_values(["response_ts", "customer_id"], ignore_index=True),
                         exposures=exposures,
                         incidents=incidents.sort_values(["ts", "order_id"], ignore_index=True),
                         hidden=hidden, catalog=w.catalog)
        return data, features


def _ids(prefix: str, numbers: np.ndarray) -> np.ndarray:
    width = max(6, len(str(int(numbers.max())))) if len(numbers) else 6
    return np.char.add(prefix, np.char.zfill(numbers.astype(str), width)).astype(object)


def _timestamps(world: World, days: np.ndarray) -> pd.Series:
    return pd.Series(world.start + pd.to_timedelta(np.round(days * _SECONDS_PER_DAY), unit="s")).astype(
        "datetime64[ns, UTC]")
