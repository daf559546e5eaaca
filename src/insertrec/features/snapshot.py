"""Snapshots: every customer's state after a history, for batch scoring, the customer frame and serving."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from insertrec.data import Dataset
from insertrec.errors import DataError, InsertrecError, Problem
from insertrec.features.columns import _NO_TS, DAY_NS, _factorize, _lookup, _ns_scalar
from insertrec.features.history import _frame, _history, _values
from insertrec.features.ledger import _LEDGER_COLUMNS, _Events, _last_before, _Ledger, _Orders, _Side, _Totals
from insertrec.features.online import CustomerState
from insertrec.features.params import FeatureParams
from insertrec.schema import TABLES

CUSTOMER_COLUMNS: tuple[str, ...] = (
    "customer_id", "prior_orders", "recency_days", "tenure_days", "monetary", "total_spend",
    "return_rate", "gift_share", "nps_tier", "nps_score", "journey_stage", "incidents_90d",
    "days_since_incident")


class Snapshot:
    """Every customer's state just after the history it was built on, in compact arrays.

    Orders older than every window (return window, contact caps) are folded
    into per-customer totals; younger ones are kept one by one, as are the
    incidents inside the incident window and the NPS answers any later order
    may still need, so that features of any later order are computed exactly.
    """

    def __init__(self, params: FeatureParams, as_of_ns: int, customer_ids: np.ndarray, base: _Totals,
                 recent: _Events, nps: _Events, incidents: _Events, incident_types: pa.Array,
                 ctx: pd.DataFrame):
        self.params = params
        self.as_of_ns = as_of_ns
        self.customer_ids = customer_ids
        self.base, self.recent, self.nps, self.incidents = base, recent, nps, incidents
        self.incident_types = incident_types
        self.ctx = ctx

    @property
    def as_of(self) -> pd.Timestamp | None:
        """Orders at or after this instant may be scored from the snapshot (None: no history)."""
        return None if self.as_of_ns == _NO_TS else pd.Timestamp(self.as_of_ns, unit="ns", tz="UTC")

    @classmethod
    def build(cls, data: Dataset, params: FeatureParams, as_of: Any = None) -> Snapshot:
        """State from every event strictly before ``as_of`` (default: every event, and then
        ``as_of`` is the last event's instant)."""
        return cls.builder(data, params)(as_of)

    @classmethod
    def builder(cls, data: Dataset, params: FeatureParams) -> Callable[[Any], Snapshot]:
        """`build` of one history at any ``as_of``, its orders read once for every instant:
        training builds three (the model's and the repurchase model's two anchors), and reading
        a million orders took 1.4 CPU s of each (bench/results/budget.md §5)."""
        orders = _Orders.of(data.orders, params._layout, data.exposures)

        def at(as_of: Any = None) -> Snapshot:
            return cls._build(data, params, orders, as_of)
        return at

    @classmethod
    def _build(cls, data: Dataset, params: FeatureParams, orders: _Orders, as_of: Any) -> Snapshot:
        layout = params._layout
        cut = None if as_of is None else _ns_scalar(as_of, "as_of")
        keep = np.ones(len(orders.ts), dtype=bool) if cut is None else orders.ts < cut
        side = _Side.of(data, cut)
        kept_ids = orders.customer_id.filter(keep)
        _, customers = _factorize(pa.concat_arrays([kept_ids, side.nps_ids, side.inc_ids]))
        customers = customers.take(pc.array_sort_indices(customers))   # customer_frame rows in id order
        nps, incidents = side.events(customers)
        rows = np.flatnonzero(keep)
        full = _Events.of(_lookup(kept_ids, customers), orders.ts[rows], orders.seq[rows], row=rows,
                          **orders.ledger_columns(rows))
        if cut is None:
            cut = max([int(ev.ts.max()) for ev in (full, nps, incidents) if len(ev)], default=_NO_TS)
        old_before = cut - layout.memory_ns if cut != _NO_TS else _NO_TS
        codes = np.arange(len(customers))
        start = full.start(codes)
        base = _Ledger(full, layout).totals(start, full.count_before(codes, np.full(len(codes), old_before),
                                                                     start=start))
        for name in ("n", "gifts", "cats", "chans", "recv"):   # counts: half the memory
            setattr(base, name, getattr(base, name).astype(np.int32))
        recent = full.rows(full.ts >= old_before)
        recent.cols["order_id"] = orders.order_id.take(pa.array(recent.cols.pop("row"))).to_numpy(
            zero_copy_only=False)
        latest = np.r_[full.g[1:] != full.g[:-1], True] if len(full) else np.zeros(0, dtype=bool)
        ctx = pd.DataFrame({c: v[full.cols["row"][latest]] for c, v in orders.ctx.items()},
                           index=full.g[latest]).reindex(codes)   # each customer's latest order's context
        nps = nps.rows(_last_before(nps, cut) | (nps.ts >= cut))
        incidents = incidents.rows(_last_before(incidents, cut)
                                   | (incidents.ts >= cut - params.incident_window_days * DAY_NS))
        return cls(params, cut, customers.to_numpy(zero_copy_only=False), base, recent, nps, incidents,
                   side.types, ctx)

    @classmethod
    def build_empty(cls, params: FeatureParams) -> Snapshot:
        """A shop with no history yet: every customer is new."""
        empty = pd.DataFrame({c: pd.Series(dtype="str") for c in TABLES["orders"]["required"]})
        return cls.build(Dataset(orders=empty), params)

    @classmethod
    def concat(cls, parts: Sequence[Snapshot]) -> Snapshot:
        """One snapshot of the customers of ``parts``, snapshots built with the same params and
        ``as_of`` on histories of disjoint sets of customers (a customer's whole history in one
        part): equal, customer by customer, to the snapshot built on the union of the histories.
        Spark builds one per bucket of whole customers and the driver joins them here."""
        if not parts:
            raise InsertrecError("Snapshot.concat: no snapshots to join")
        first = parts[0]
        if any(p.params != first.params or p.as_of_ns != first.as_of_ns for p in parts[1:]):
            raise InsertrecError("Snapshot.concat: the snapshots differ in feature params or as_of")
        ids = pa.concat_arrays([pa.array(p.customer_ids, type=pa.large_string()) for p in parts])
        order = pc.array_sort_indices(ids).to_numpy()   # customer_frame rows in id order, as `build` has them
        if len(order) > 1 and pc.any(pc.equal(ids.take(order[1:]), ids.take(order[:-1]))).as_py():
            raise InsertrecError("Snapshot.concat: a customer is in more than one snapshot")
        code = np.empty(len(order), dtype=np.int64)
        code[order] = np.arange(len(order))   # a part's customer i -> its code in the whole
        offsets = np.cumsum([0] + [len(p.customer_ids) for p in parts])
        type_code, types = _factorize(pa.concat_arrays([p.incident_types.cast(pa.large_string())
                                                        for p in parts]))
        type_offsets = np.cumsum([0] + [len(p.incident_types) for p in parts])

        def events(name: str, recode: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]) -> _Events:
            evs = [getattr(p, name) for p in parts]
            g = np.concatenate([code[offsets[k] + ev.g] for k, ev in enumerate(evs)])
            cols = {c: np.concatenate([recode(k, ev.cols)[c] for k, ev in enumerate(evs)]) for c in evs[0].cols}
            keep = np.argsort(g, kind="stable")   # a customer's events are all in one part, in time order
            return _Events(g[keep], np.concatenate([ev.ts for ev in evs])[keep], {c: v[keep] for c, v in cols.items()},
                           np.arange(len(g)))

        def same(k: int, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return cols

        def typed(k: int, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"type": type_code[type_offsets[k] + cols["type"]]}

        base = _Totals(**{f.name: np.concatenate([getattr(p.base, f.name) for p in parts])[order]
                          for f in dataclasses.fields(_Totals)})
        ctx = pd.concat([p.ctx for p in parts], ignore_index=True).iloc[order].reset_index(drop=True)
        return cls(first.params, first.as_of_ns, ids.take(order).to_numpy(zero_copy_only=False), base,
                   events("recent", same), events("nps", same), events("incidents", typed), types, ctx)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.customer_ids.tolist())}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_index"}  # rebuilt on first use

    def state(self, customer_id: str) -> CustomerState:
        """The customer's state to score and update online (a fresh one if never seen)."""
        state = CustomerState.empty(self.params)
        i = self._index.get(str(customer_id))
        if i is None:
            return state
        b = self.base
        state.n, state.gifts, first, last = b.n[i].item(), b.gifts[i].item(), b.first_ts[i].item(), b.last_ts[i].item()
        state.spend = state.matured_value = b.spend[i].item()
        state.matured_returned = b.returned[i].item()
        state.cats, state.chans = tuple(b.cats[i].tolist()), tuple(b.chans[i].tolist())
        state.recv = tuple(b.recv[i].tolist())
        state.recv_last = tuple(b.recv_last[i].tolist())   # _NO_TS where never received, as online
        state.first_ts, state.last_ts = (None if first == _NO_TS else first), (None if last == _NO_TS else last)
        lo, hi = self.recent.bounds(i)
        if hi > lo:  # the few recent orders of one customer
            c = {k: v[lo:hi].tolist() for k, v in self.recent.cols.items()}
            for j, ts in enumerate(self.recent.ts[lo:hi].tolist()):
                state._fold(ts, c["value"][j], c["returned"][j], c["gift"][j],
                            [k for k, has in enumerate(c["cats"][j]) if has], c["chan"][j],
                            [a for a, got in enumerate(c["recv"][j]) if got], c["order_id"][j])
        lo, hi = self.nps.bounds(i)
        state.nps = tuple(zip(self.nps.ts[lo:hi].tolist(), self.nps.cols["score"][lo:hi].tolist()))
        lo, hi = self.incidents.bounds(i)
        if hi > lo:
            types = self.incident_types
            state.incidents = tuple((t, types[k].as_py()) for t, k in
                                    zip(self.incidents.ts[lo:hi].tolist(), self.incidents.cols["type"][lo:hi].tolist()))
        return state

    def _ledger(self, new: _Orders | None = None, g: np.ndarray | None = None) -> _Ledger:
        """The recent orders, followed by ``new`` orders of customers ``g`` (all after them)."""
        r = self.recent
        rank = np.empty(len(r), dtype=np.int64)
        rank[np.argsort(r.ts, kind="stable")] = np.arange(len(r))
        if new is None:
            ev = _Events.of(r.g, r.ts, rank, **{k: r.cols[k] for k in _LEDGER_COLUMNS})
        else:
            ev = _Events.of(np.r_[r.g, g], np.r_[r.ts, new.ts], np.r_[rank, len(r) + new.seq],
                            **{k: np.concatenate([r.cols[k], v]) for k, v in new.ledger_columns().items()})
        return _Ledger(ev, self.params._layout)


def features_for_orders(snapshot: Snapshot, orders: pd.DataFrame) -> pd.DataFrame:
    """Features of new orders placed after the snapshot (same columns as :func:`order_features`);
    a customer's earlier orders in the batch count as prior orders of the later ones."""
    layout = snapshot.params._layout
    new = _Orders.of(orders, layout, None)
    early = np.flatnonzero(new.ts < snapshot.as_of_ns)
    if len(early):
        shown = orders["order_ts"].iloc[early[:20]].astype(str).to_numpy()
        listed = [Problem("orders", int(i) + 2, "order_ts",
                          f"order {new.order_id[int(i)].as_py()!r} is before the snapshot's end "
                          f"{snapshot.as_of}: its features would see later history", value)
                  for i, value in zip(early[:20], shown)]
        if len(early) > len(listed):
            listed.append(Problem("orders", None, "order_ts", f"{len(early) - len(listed)} more orders are "
                                  "before the snapshot's end (not listed)"))
        raise DataError(listed)
    g = _lookup(new.customer_id, pa.array(snapshot.customer_ids, type=pa.large_string()))
    unseen = g < 0
    if unseen.any():
        fresh, _ = _factorize(new.customer_id.filter(unseen))
        g[unseen] = len(snapshot.customer_ids) + fresh
    ledger = snapshot._ledger(new, g)
    start = ledger.ev.start(g)
    c = ledger.ev.position[len(snapshot.recent):] - start
    hist, _ = _history(g, new.ts, start, c, ledger, snapshot.base, snapshot.nps, snapshot.incidents,
                       snapshot.incident_types)
    return _frame(new, hist, layout, orders.index)


def customer_frame(snapshot: Snapshot, as_of: Any) -> pd.DataFrame:
    """One row per customer with orders: their state at ``as_of`` (what a next order at that
    instant would see), for the customer-level models."""
    p = snapshot.params
    layout = p._layout
    at = _ns_scalar(as_of, "as_of")
    if at < snapshot.as_of_ns:
        raise InsertrecError(f"as_of {as_of} is before the snapshot's end {snapshot.as_of}")
    ledger = snapshot._ledger()
    g = np.arange(len(snapshot.customer_ids))
    start = ledger.ev.start(g)
    hist, tot = _history(g, np.full(len(g), at), start, ledger.ev.end(g) - start, ledger, snapshot.base,
                         snapshot.nps, snapshot.incidents, snapshot.incident_types)
    keep = tot.n > 0
    columns = CUSTOMER_COLUMNS[1:] + layout.cat_columns + layout.chan_columns
    out = pd.DataFrame({"customer_id": pd.array(snapshot.customer_ids, dtype="str")}
                       | {c: _values(hist[c]) for c in columns}
                       | {c: snapshot.ctx[c].to_numpy() for c in p.ctx_columns}
                       | {"first_order_ts": pd.to_datetime(np.where(keep, tot.first_ts, 0), utc=True),
                          "last_order_ts": pd.to_datetime(np.where(keep, tot.last_ts, 0), utc=True)})
    return out[keep].reset_index(drop=True)


__all__ = ["CUSTOMER_COLUMNS", "Snapshot", "customer_frame", "features_for_orders"]
