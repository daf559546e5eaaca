"""The truth of a world: who the customers are (population), how they respond to actions
(the design row of a hidden state and the response model) and what happens around an order
(dynamics)."""

from __future__ import annotations

from typing import Any

import numpy as np

from insertrec.catalog import Catalog
from insertrec.schema import JOURNEY_STAGES
from insertrec.world.spec import _action_index, _Node, _open_unit, _per_action

TIERS: tuple[str, ...] = ("promoter", "passive", "detractor")
TRAITS: tuple[str, ...] = ("price_sensitivity", "eco", "return_proneness", "satisfaction")
EFFECT_KINDS: tuple[str, ...] = ("logit", "return_logit", "satisfaction")
_STAGES: tuple[str, ...] = JOURNEY_STAGES


_MAX_EXTRA_ITEMS = 4        # extra items whose categories join the order's main one


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

    def matrix(self, st: dict[str, np.ndarray]) -> np.ndarray:
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

    def __init__(self, root: _Node, catalog: Catalog, design: _StateDesign, pop: _Population):
        self.design, self.pop = design, pop
        self.slots = tuple(catalog.slots)
        eff = root["effects"]
        eff.items(("repurchase", "returns", "actions", "interactions"))
        self.repurchase = design.term(eff["repurchase"])
        self.returns = design.term(eff["returns"])
        self.W = {kind: {s: np.zeros((len(design.columns), len(catalog.slots[s].actions))) for s in self.slots}
                  for kind in EFFECT_KINDS}
        for slot, per_action in eff.get("actions", {}).items(self.slots):
            ids = catalog.slots[slot].action_ids
            for aid, node in per_action.items(ids):
                for kind, term in node.items(EFFECT_KINDS):
                    self.W[kind][slot][:, ids.index(aid)] = design.term(term)
        self.pairs: list[tuple[int, int, int, int, np.ndarray]] = []
        for inter in eff.get("interactions", []).seq():
            inter.items(("actions", "logit"))
            chosen = inter["actions"].items(self.slots)
            if len(chosen) != 2:
                inter["actions"].fail("an interaction names exactly two slots")
            (s1, j1), (s2, j2) = ((self.slots.index(s), _action_index(catalog, s, node)) for s, node in chosen)
            self.pairs.append((s1, j1, s2, j2, design.term(inter["logit"])))
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
        x = self.design.matrix(st)
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


__all__ = ["EFFECT_KINDS", "TIERS", "TRAITS"]
