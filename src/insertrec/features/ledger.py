"""The per-customer event ledger: orders, NPS answers and incidents sorted by customer and time,
with running sums so that any customer's totals before an instant are two lookups."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from insertrec.data import Dataset
from insertrec.errors import DataError, Problem
from insertrec.features.columns import _NO_TS, _factorize, _flag_column, _lookup, _ns, _number_column, _order_ranks, _strings
from insertrec.features.params import _ColumnLayout
from insertrec.schema import TABLES

_LEDGER_COLUMNS = ("value", "returned", "gift", "cats", "chan", "recv")


@dataclass
class _Orders:
    """The orders columns as arrays, with what the ledger needs precomputed."""

    order_id: pa.Array
    customer_id: pa.Array
    ts: np.ndarray              # int64 UTC ns
    seq: np.ndarray             # rank by (order_ts, order_id): the tie-break between a customer's orders
    value: np.ndarray
    returned: np.ndarray
    n_items: np.ndarray
    channel: pa.Array
    region: pa.Array
    is_gift: np.ndarray
    categories: pa.Array
    main_category: pa.Array
    cats: np.ndarray            # bool (n, K): the order has vocabulary category k
    chan: np.ndarray            # int (n,): channel vocabulary index, -1 outside it
    recv: np.ndarray            # bool (n, A): the order received action a (exposures)
    ctx: dict[str, np.ndarray]

    @classmethod
    def of(cls, frame: pd.DataFrame, layout: _ColumnLayout, exposures: pd.DataFrame | None,
           file: str = "orders") -> _Orders:
        missing = [c for c in TABLES["orders"]["required"] if c not in frame]
        if missing:
            raise DataError([Problem(file, None, c, "required column is missing") for c in missing])
        p = layout.params
        n = len(frame)
        order_id = _strings(frame, "order_id", "")
        codes, distinct = _factorize(order_id)
        if len(distinct) < n:
            seen_first = np.zeros(n, dtype=bool)
            seen_first[np.unique(codes, return_index=True)[1]] = True
            dup = np.flatnonzero(~seen_first)
            raise DataError([Problem(file, int(i) + 2, "order_id", "duplicate order_id", order_id[int(i)].as_py())
                             for i in dup[:20]])
        ts = _ns(frame["order_ts"], file, "order_ts")
        value = _number_column(frame, "order_value", np.nan, file)
        if np.isnan(value).any():
            raise DataError([Problem(file, int(i) + 2, "order_value", "missing")
                             for i in np.flatnonzero(np.isnan(value))[:20]])
        categories = _strings(frame, "categories", "")
        parts = pc.split_pattern(categories, "|")
        first = pc.list_element(parts, 0)
        k = _lookup(pc.list_flatten(parts), p.categories)
        cats = np.zeros((n, len(p.categories)), dtype=bool)
        cats[pc.list_parent_indices(parts).to_numpy()[k >= 0], k[k >= 0]] = True
        channel = _strings(frame, "channel", "unknown")
        recv = np.zeros((n, len(p.action_ids)), dtype=bool)
        if exposures is not None and len(exposures) and n:
            row = _lookup(_strings(exposures, "order_id", ""), order_id)
            act = _lookup(_strings(exposures, "action_id", ""), p.action_ids)
            ok = (row >= 0) & (act >= 0)
            recv[row[ok], act[ok]] = True
        return cls(
            order_id=order_id, customer_id=_strings(frame, "customer_id", ""), ts=ts,
            seq=_order_ranks(ts, order_id), value=value,
            returned=_number_column(frame, "returned_value", 0.0, file),
            n_items=_number_column(frame, "n_items", 1.0, file), channel=channel,
            region=_strings(frame, "region", "unknown"), is_gift=_flag_column(frame, "is_gift"),
            categories=categories, main_category=pc.if_else(pc.equal(first, ""), "none", first),
            cats=cats, chan=_lookup(channel, p.channels), recv=recv,
            ctx={c: (frame[c].to_numpy() if c in frame else np.full(n, np.nan)) for c in p.ctx_columns})

    def ledger_columns(self, rows: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        return {"value": self.value[rows], "returned": self.returned[rows], "gift": self.is_gift[rows],
                "cats": self.cats[rows], "chan": self.chan[rows], "recv": self.recv[rows]}


@dataclass
class _Events:
    """Events of customers (integer codes), sorted by customer then time.

    ``position[i]`` is where input row ``i`` landed. Counting a customer's
    events before an instant is two binary searches on one int64 key
    (customer, rank of the time among all event times), not a search per customer.
    """

    g: np.ndarray
    ts: np.ndarray
    cols: dict[str, np.ndarray]
    position: np.ndarray

    @classmethod
    def of(cls, g: np.ndarray, ts: np.ndarray, rank: np.ndarray | None = None, **cols: np.ndarray) -> _Events:
        """``rank``: an order of the rows consistent with ``ts`` that breaks ties (default: as given)."""
        g = np.asarray(g, dtype=np.int64)
        if rank is None:
            rank = np.empty(len(ts), dtype=np.int64)
            rank[np.argsort(ts, kind="stable")] = np.arange(len(ts))
        order = np.argsort(g * (int(rank.max(initial=0)) + 1) + rank, kind="stable")
        position = np.empty(len(g), dtype=np.int64)
        position[order] = np.arange(len(g))
        return cls(g[order], ts[order], {k: v[order] for k, v in cols.items()}, position)

    def __len__(self) -> int:
        return len(self.g)

    def rows(self, mask: np.ndarray) -> _Events:
        return _Events(self.g[mask], self.ts[mask], {k: v[mask] for k, v in self.cols.items()},
                       np.arange(int(mask.sum())))

    @cached_property
    def _first(self) -> np.ndarray:
        """Index of each customer code's first event; codes past the last one have none."""
        return np.searchsorted(self.g, np.arange(int(self.g.max(initial=-1)) + 2))

    def start(self, qg: np.ndarray) -> np.ndarray:
        return self._first[np.minimum(qg, len(self._first) - 1)]

    def end(self, qg: np.ndarray) -> np.ndarray:
        return self._first[np.minimum(qg + 1, len(self._first) - 1)]

    def bounds(self, i: int) -> tuple[int, int]:
        """Rows of customer ``i``, as plain ints for the online path."""
        first = self._first_list
        return (first[i], first[i + 1]) if i + 1 < len(first) else (len(self.g), len(self.g))

    @cached_property
    def _first_list(self) -> list[int]:
        return self._first.tolist()

    @cached_property
    def _sorted_ts(self) -> np.ndarray:
        return np.sort(self.ts)

    @cached_property
    def _key(self) -> np.ndarray:
        return self.g * (len(self.ts) + 1) + np.searchsorted(self._sorted_ts, self.ts, side="left")

    def count_before(self, qg: np.ndarray, qts: np.ndarray, *, inclusive: bool = False,
                     start: np.ndarray | None = None) -> np.ndarray:
        """Per query, how many events of its customer have ``ts < qts`` (``<=`` if inclusive)."""
        rho = np.searchsorted(self._sorted_ts, qts, side="right" if inclusive else "left")
        below = np.searchsorted(self._key, qg * (len(self.ts) + 1) + rho, side="left")
        return below - (self.start(qg) if start is None else start)

    def latest_before(self, qg: np.ndarray, qts: np.ndarray, name: str, missing: Any) -> np.ndarray:
        """Per query, column ``name`` ("ts" or a column) of its customer's last event strictly
        before ``qts``, ``missing`` where there is none."""
        values = self.ts if name == "ts" else self.cols[name]
        start = self.start(qg)
        c = self.count_before(qg, qts, start=start)
        if not len(values):
            return np.full(len(qg), missing)
        return np.where(c > 0, values[np.maximum(start + c - 1, 0)], missing)


@dataclass
class _Totals:
    """What a customer's prior orders add up to, one row per customer or per query."""

    n: np.ndarray
    spend: np.ndarray
    returned: np.ndarray
    gifts: np.ndarray
    cats: np.ndarray
    chans: np.ndarray
    recv: np.ndarray
    recv_last: np.ndarray       # int64 ns of the last order that received each action, _NO_TS if none
    first_ts: np.ndarray
    last_ts: np.ndarray

    @classmethod
    def empty(cls, rows: int, layout: _ColumnLayout) -> _Totals:
        p = layout.params
        zeros = np.zeros(rows, dtype=np.int64)
        return cls(zeros, np.zeros(rows), np.zeros(rows), zeros, np.zeros((rows, len(p.categories)), np.int64),
                   np.zeros((rows, len(p.channels)), np.int64), np.zeros((rows, len(p.action_ids)), np.int64),
                   np.full((rows, len(p.action_ids)), _NO_TS), np.full(rows, _NO_TS), np.full(rows, _NO_TS))

    def take(self, idx: np.ndarray, layout: _ColumnLayout) -> _Totals:
        """Rows ``idx``; an index past the end (a customer the base never saw) is an empty row."""
        blank = _Totals.empty(1, layout)
        idx = np.minimum(idx, len(self.n))
        return _Totals(**{f.name: np.concatenate([getattr(self, f.name), getattr(blank, f.name)])[idx]
                          for f in fields(self)})

    def then(self, later: _Totals) -> _Totals:
        """These orders followed by ``later`` ones of the same customers."""
        return _Totals(
            n=self.n + later.n, spend=self.spend + later.spend, returned=self.returned + later.returned,
            gifts=self.gifts + later.gifts, cats=self.cats + later.cats, chans=self.chans + later.chans,
            recv=self.recv + later.recv,
            recv_last=np.where(later.recv_last != _NO_TS, later.recv_last, self.recv_last),
            first_ts=np.where(self.n > 0, self.first_ts, later.first_ts),
            last_ts=np.where(later.n > 0, later.last_ts, self.last_ts))


class _Ledger:
    """Orders as events with running sums, so any customer's prior totals are two lookups."""

    def __init__(self, ev: _Events, layout: _ColumnLayout):
        self.ev, self.layout = ev, layout
        m = len(ev)
        c = ev.cols
        k, h = c["cats"].shape[1], len(layout.params.channels)
        counts = np.zeros((m + 1, 1 + k + h + c["recv"].shape[1]), dtype=np.int32)
        counts[1:, 0] = c["gift"]
        counts[1:, 1:1 + k] = c["cats"]
        counts[1 + np.flatnonzero(c["chan"] >= 0), 1 + k + c["chan"][c["chan"] >= 0]] = 1
        counts[1:, 1 + k + h:] = c["recv"]
        self.counts = np.cumsum(counts, axis=0, dtype=np.int32)   # exact: row i = sum of rows < i
        self.k, self.h = k, h
        # money restarts at each customer so that sums do not lose digits to other customers'
        money = pd.DataFrame({"value": c["value"], "returned": c["returned"]}).groupby(ev.g, sort=False).cumsum()
        self.money = np.vstack([money.to_numpy(dtype=np.float64), np.zeros((1, 2))])
        marks = np.where(c["recv"], np.arange(m)[:, None], -1)
        self.last_recv = np.vstack([np.maximum.accumulate(marks, axis=0), np.full((1, marks.shape[1]), -1)])
        self.ts = np.r_[ev.ts, _NO_TS]

    def money_before(self, start: np.ndarray, c: np.ndarray) -> np.ndarray:
        """(value, returned) summed over each customer's first ``c`` ledger orders."""
        return np.where((c > 0)[:, None], self.money[np.where(c > 0, start + c - 1, -1)], 0.0)

    def received_between(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self.counts[hi, 1 + self.k + self.h:] - self.counts[lo, 1 + self.k + self.h:]

    def totals(self, start: np.ndarray, c: np.ndarray) -> _Totals:
        """Totals over each customer's first ``c`` ledger orders."""
        has = c > 0
        last = np.where(has, start + c - 1, -1)
        sums = (self.counts[start + c] - self.counts[start]).astype(np.int64)
        money = self.money_before(start, c)
        li = self.last_recv[last]
        got = has[:, None] & (li >= start[:, None])
        k, h = self.k, self.h
        return _Totals(
            n=c, spend=money[:, 0], returned=money[:, 1], gifts=sums[:, 0], cats=sums[:, 1:1 + k],
            chans=sums[:, 1 + k:1 + k + h], recv=sums[:, 1 + k + h:],
            recv_last=np.where(got, self.ts[li], _NO_TS),
            first_ts=np.where(has, self.ts[np.where(has, start, -1)], _NO_TS),
            last_ts=np.where(has, self.ts[last], _NO_TS))


@dataclass
class _Side:
    """NPS answers and incidents before a cut, keyed by customer id until coded."""

    nps_ids: pa.Array
    nps_ts: np.ndarray
    score: np.ndarray
    inc_ids: pa.Array
    inc_ts: np.ndarray
    inc_type: np.ndarray
    types: pa.Array

    @classmethod
    def of(cls, data: Dataset, before: int | None) -> _Side:
        nps, inc = data.nps, data.incidents
        n_ts = _ns(nps["response_ts"], "nps", "response_ts")
        i_ts = _ns(inc["ts"], "incidents", "ts")
        score = pd.to_numeric(nps["score"], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isin(score, np.arange(11)))
        if len(bad):
            raise DataError([Problem("nps", int(i) + 2, "score", "must be a whole number from 0 to 10",
                                     str(nps["score"].iloc[i])) for i in bad[:20]])
        type_code, types = _factorize(_strings(inc, "type", ""))
        n_keep = np.ones(len(n_ts), bool) if before is None else n_ts < before
        i_keep = np.ones(len(i_ts), bool) if before is None else i_ts < before
        return cls(_strings(nps, "customer_id", "").filter(n_keep), n_ts[n_keep], score.astype(np.int64)[n_keep],
                   _strings(inc, "customer_id", "").filter(i_keep), i_ts[i_keep], type_code[i_keep], types)

    def events(self, customers: pa.Array) -> tuple[_Events, _Events]:
        """As events of ``customers`` (codes = positions); other customers' are dropped."""
        n_g, i_g = _lookup(self.nps_ids, customers), _lookup(self.inc_ids, customers)
        return (_Events.of(n_g[n_g >= 0], self.nps_ts[n_g >= 0], score=self.score[n_g >= 0]),
                _Events.of(i_g[i_g >= 0], self.inc_ts[i_g >= 0], type=self.inc_type[i_g >= 0]))


def _last_before(ev: _Events, cut: int) -> np.ndarray:
    """Each customer's last event before ``cut``: what any later instant still needs of the older ones."""
    before = ev.ts < cut
    return before & ~np.r_[(ev.g[1:] == ev.g[:-1]) & before[1:], False]


__all__: list[str] = []   # package-internal: the other features modules import its classes by name
