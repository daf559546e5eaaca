"""The simulator run: every customer's k-th order at once, round after round, decided by the
world's logging policy on the shop's own features; the tables it writes and the evaluation sets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from insertrec.catalog import Catalog
from insertrec.data import Dataset
from insertrec.features import FeatureParams
from insertrec.features.history import ArrayHistory, history_features
from insertrec.schema import FEATURES
from insertrec.world.spec import WorldError
from insertrec.world.truth import _STAGES, TIERS, TRAITS, _draw, _sigmoid

if TYPE_CHECKING:
    from insertrec.world.model import World

_SECONDS_PER_DAY = 86400.0

#: a policy deciding a batch of orders from the shop's features of each: per slot, (n, n_actions)
#: probabilities (a product-form policy), or (n, n_boxes) joint probabilities over ``World.combos()``
Decide = Callable[[pd.DataFrame], "dict[str, np.ndarray] | np.ndarray"]


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


class _LoggingView:
    """What the world's logging policy would have done with a set of orders (their features)."""

    world: World
    features: pd.DataFrame

    def logging_propensities(self) -> dict[str, np.ndarray]:
        """Per slot, (n_orders, n_actions): the probability the world's logging policy gives each action."""
        return _logging_probs(self.world.catalog, self.features, self.world.epsilon)


@dataclass
class EvaluationSet(_LoggingView):
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


class _Run:
    """One simulated history: every customer's k-th order at once, round after round.

    The shop's features of an order are ``insertrec.features``' own
    (:func:`~insertrec.features.history.history_features`) on the history
    simulated so far, so the logged propensities are exactly what the engine
    computes from the written tables. Each round's customers are sorted, so a
    customer's prior orders are found by binary search in each earlier round
    (in one full run a customer in round k was in every round before; a run
    advanced stretch by stretch, :meth:`advance`, lets customers skip rounds).
    """

    def __init__(self, world: World, customers: int, seed: int, *, keep_features: bool, keep_probs: bool = False):
        if int(customers) < 1:
            raise WorldError("customers", "expected at least one customer", file="generate")
        self.w, self.keep_features, self.keep_probs = world, keep_features, keep_probs
        self.combos = world.combos()
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
        # when each customer's next order comes (inf: never), and where their last order is (round, row)
        self.t_next = self.c["arrival"].copy()
        self.last_round, self.last_row = np.full(n, -1), np.zeros(n, np.intp)
        self.rounds: list[dict[str, Any]] = []
        # a round of no orders, so that the history before the first round has the columns' shapes
        self._none: dict[str, Any] = {
            "ledger": {"ts": np.zeros(0, np.int64), "value": np.zeros(0), "returned": np.zeros(0),
                       "gift": np.zeros(0, bool), "cats": np.zeros((0, len(pop.categories)), bool),
                       "chan": np.zeros(0, np.int64), "recv": np.zeros((0, len(self.ids)), bool)},
            "nps_t": np.zeros(0), "inc_t": np.zeros(0), "score": np.zeros(0), "inc": np.zeros(0, np.int64)}

    def run(self) -> tuple[WorldData, pd.DataFrame | None]:
        self.advance(np.inf)
        return self._tables()[:2]

    def advance(self, until: float, decide: Decide | None = None) -> None:
        """Simulate every order placed before day ``until`` (and, past the end of the data, the next
        orders that are the last ones' rewards), each decided by ``decide`` (default: the logging policy)."""
        while (idx := np.flatnonzero(self.t_next < until)).size:
            self._step(idx, decide)

    def _returned(self, paid: np.ndarray, attrs: dict[str, np.ndarray], offset: np.ndarray) -> np.ndarray:
        rate = _sigmoid(self.w._pop.cat_return_logit[attrs["main"]] + offset)
        return np.round(paid * self.rng.binomial(attrs["items"], rate) / attrs["items"], 2)

    def _step(self, idx: np.ndarray, decide: Decide | None) -> None:
        w, rng, pop, truth, dyn = self.w, self.rng, self.w._pop, self.w._truth, self.w._dyn
        t = self.t_next[idx]
        attrs = pop.order_attrs(self.c, idx, rng)
        paid = np.round(attrs["value"] * (1.0 - self.disc[idx] * self.in_time[idx]), 2)
        returned, seen = np.zeros(len(idx)), self.last_round[idx] >= 0
        if seen.any():    # this order is the previous one's reward, even past the end of the data
            returned[seen] = self._returned(paid[seen], {k: v[seen] for k, v in attrs.items()},
                                            self.ret_off[idx[seen]])
            gain = np.where(self.in_time[idx], paid - returned, 0.0)
            for r in np.unique(self.last_round[idx[seen]]):
                mine = seen & (self.last_round[idx] == r)
                self.rounds[r]["reward"][self.last_row[idx[mine]]] += gain[mine]
        keep = t < w.days
        self.t_next[idx[~keep]] = np.inf
        idx, t, paid, returned, seen = idx[keep], t[keep], paid[keep], returned[keep], seen[keep]
        attrs = {k: v[keep] for k, v in attrs.items()}
        if not idx.size:
            return
        frame, st = self._observe(idx, t, attrs, paid)
        x = w._design.matrix(st)
        if not seen.all():
            first = {k: v[~seen] for k, v in attrs.items()}
            returned[~seen] = self._returned(paid[~seen], first, (x @ truth.returns)[~seen])

        n, rows = len(idx), np.arange(len(idx))
        probs = _logging_probs(w.catalog, frame, w.epsilon) if decide is None else decide(frame)
        if isinstance(probs, dict):
            chosen = np.stack([_draw(probs[s], rng) for s in w.slots], axis=1)
            joint = self._joint(probs) if self.keep_probs else None
        else:    # a joint policy: each slot's propensity is the probability of its action (the marginal)
            joint = probs
            chosen = self.combos[_draw(joint, rng)]
            probs = {s: np.stack([joint[:, self.combos[:, i] == a].sum(axis=1) for a in range(len(sl.actions))],
                                 axis=1) for i, (s, sl) in enumerate(w.catalog.slots.items())}
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
                            "probs": joint,
                            "ledger": {"ts": self._ns(t), "value": paid, "returned": returned, "gift": attrs["is_gift"],
                                       "cats": (attrs["cat_mask"][:, None] >> np.arange(len(pop.categories))) & 1 > 0,
                                       "chan": attrs["channel"], "recv": recv}})
        self.ret_off[idx], self.in_time[idx] = off, in_time
        self.disc[idx] = 1.0 - np.prod([1.0 - d[chosen[:, i]] for i, d in enumerate(truth.discount)], axis=0)
        self.t_next[idx] = np.where(in_time | (later & (t + gap < w.days)), t + gap, np.inf)
        self.last_round[idx], self.last_row[idx] = len(self.rounds) - 1, rows

    def _joint(self, probs: dict[str, np.ndarray]) -> np.ndarray:
        """(n, n_boxes): a product-form policy's probability of every box."""
        return np.prod([probs[s][:, self.combos[:, i]] for i, s in enumerate(self.w.slots)], axis=0)

    def _ns(self, days: np.ndarray) -> np.ndarray:
        """Simulated days as the UTC nanoseconds of the written tables (rounded to the second)."""
        seconds = np.round(np.where(np.isfinite(days), days, 0.0) * _SECONDS_PER_DAY).astype(np.int64)
        return self.w.start.value + seconds * 10**9

    def _history(self, idx: np.ndarray) -> ArrayHistory:
        """Customers ``idx``'s orders, NPS answers and incidents so far, customer ``i`` coded ``i``."""
        w = self.w
        pos, codes = [], [np.zeros(0, np.intp)]    # per round, the rows of those of ``idx`` who ordered in it
        for r in self.rounds:
            p = np.minimum(np.searchsorted(r["cust"], idx), len(r["cust"]) - 1)
            mine = np.flatnonzero(r["cust"][p] == idx)
            pos.append(p[mine])
            codes.append(mine)
        code = np.concatenate(codes)

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

    def _tables(self, as_of: float = np.inf) -> tuple[WorldData, pd.DataFrame | None, np.ndarray | None]:
        """The tables as the shop knows them on day ``as_of``: later answers and incidents are not yet
        there, and an order's reward is blank until its horizon has passed."""
        w, pop, rounds = self.w, self.w._pop, self.rounds
        cat = {k: np.concatenate([r[k] for r in rounds]) for k in rounds[0]
               if k not in ("state", "features", "ledger", "probs")}
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
            "propensity": cat["propensity"].ravel(),
            "reward": np.repeat(np.round(np.where(cat["t"] + w.horizon <= as_of, cat["reward"], np.nan), 4), n_slots)})
        answered = cat["nps_t"] < min(w.days, as_of)
        nps = pd.DataFrame({"customer_id": customer_id[answered], "response_ts": _timestamps(w, cat["nps_t"][answered]),
                            "score": cat["score"][answered].astype(np.int64)})
        hit = cat["inc_t"] < min(w.days, as_of)
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
        probs = np.concatenate([r["probs"] for r in rounds])[order] if self.keep_probs else None
        if self.keep_features:
            features = pd.concat([r["features"] for r in rounds], ignore_index=True).iloc[order].reset_index(drop=True)
            features.insert(0, "order_ts", ts)
            features.insert(0, "customer_id", customer_id)
            features.insert(0, "order_id", order_id)
        data = WorldData(orders=orders, nps=nps.sort_values(["response_ts", "customer_id"], ignore_index=True),
                         exposures=exposures,
                         incidents=incidents.sort_values(["ts", "order_id"], ignore_index=True),
                         hidden=hidden, catalog=w.catalog)
        return data, features, probs


@dataclass
class Month(_LoggingView):
    """The orders of one stretch of a :class:`ShopRun`, decided by the policy deployed for it.

    ``data`` is the whole log as the shop knows it at the stretch's end (rewards blank until their
    horizon has passed); ``rows`` are this stretch's orders in ``data.orders``, row-aligned with
    ``hidden`` (their truth, for :meth:`World.expected_reward`), ``features`` (the shop's view) and
    ``probs`` (n, n_boxes): the probability the deployed policy gave each box of ``World.combos()``.
    """

    data: Dataset
    rows: np.ndarray
    hidden: pd.DataFrame
    features: pd.DataFrame
    probs: np.ndarray
    world: World


class ShopRun:
    """A world's history continued stretch by stretch, each stretch decided by the policy the caller
    deploys for it: the closed loop (deploy, log, retrain). Before the first deployed stretch the
    world's logging policy decides, as in :func:`generate` (the same customers for the same seed)."""

    def __init__(self, world: World, customers: int, seed: int):
        self._run = _Run(world, customers, seed, keep_features=True, keep_probs=True)
        self.world, self.day = world, 0.0

    def advance(self, until: float, decide: Decide | None = None) -> Month:
        """Simulate the orders placed before day ``until`` (since the last stretch), decided by ``decide``
        (default: the logging policy), and return them with the log as known on day ``until``."""
        if not self.day < until <= self.world.days:
            raise WorldError("until", f"expected a day after {self.day:g} and at most {self.world.days:g}",
                             file="ShopRun")
        self._run.advance(until, decide)
        data, feats, probs = self._run._tables(as_of=until)
        assert feats is not None and probs is not None    # kept, as asked
        days = (data.orders["order_ts"] - self.world.start).dt.total_seconds().to_numpy() / _SECONDS_PER_DAY
        rows = np.flatnonzero(days >= self.day)
        self.day = until
        return Month(data=data.to_dataset(), rows=rows, hidden=data.hidden.iloc[rows].reset_index(drop=True),
                     features=feats.iloc[rows].reset_index(drop=True), probs=probs[rows], world=self.world)


def _ids(prefix: str, numbers: np.ndarray) -> np.ndarray:
    width = max(6, len(str(int(numbers.max())))) if len(numbers) else 6
    return np.char.add(prefix, np.char.zfill(numbers.astype(str), width)).astype(object)


def _timestamps(world: World, days: np.ndarray) -> pd.Series:
    return pd.Series(world.start + pd.to_timedelta(np.round(days * _SECONDS_PER_DAY), unit="s")).astype(
        "datetime64[ns, UTC]")


def generate(world: World, customers: int, seed: int) -> WorldData:
    """A full history of ``customers`` customers over ``world.days``; deterministic per seed."""
    return _Run(world, customers, seed, keep_features=False).run()[0]


def write_demo_data(world: World, out: Path, customers: int = 5000, seed: int = 0) -> None:
    """A data directory (SPEC tables, catalog.yaml) plus the world.json it came from."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = generate(world, customers, seed)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    for name in ("orders", "nps", "exposures", "incidents"):
        getattr(data, name).to_csv(out / f"{name}.csv", index=False, date_format=iso)
    (out / "catalog.yaml").write_text(world.catalog.text)
    (out / "world.json").write_text(world.to_json())


def evaluation_set(world: World, orders: int, seed: int) -> EvaluationSet:
    """``orders`` fresh orders in the last ``horizon_days`` of a history of ``world`` generated with ``seed``.

    Each evaluation order is its customer's first order in that stretch, so
    nothing in ``data`` depends on how it was decided.
    """
    if orders < 1:
        raise WorldError("orders", "expected at least one evaluation order", file="evaluation_set")
    customers = max(1000, 8 * orders)    # roughly 1 customer in 7 orders in the last stretch
    while True:
        data, feats = _Run(world, customers, seed, keep_features=True).run()
        assert feats is not None    # kept, as asked
        t0 = world.start + pd.Timedelta(days=world.days - world.horizon)
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
        catalog=world.catalog, source="world evaluation")
    return EvaluationSet(data=history, order_ids=evals["order_id"].to_numpy(dtype=object),
                         hidden=data.hidden.loc[chosen].reset_index(drop=True),
                         features=feats.loc[chosen].reset_index(drop=True), world=world)


__all__ = ["Decide", "EvaluationSet", "Month", "ShopRun", "WorldData", "evaluation_set", "generate",
           "write_demo_data"]
