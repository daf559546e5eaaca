"""Point-in-time features of orders, customer state for serving, and rewards.

Every number here describes a customer *as the shop knew them when the order
was placed*. A feature that peeks past that instant (a later NPS answer, a
return not yet made, the order itself) silently inflates every offline
estimate, so all paths share one definition of "before":

- an order's prior orders are the customer's orders with an earlier
  ``(order_ts, order_id)``; two orders at the same instant are ordered by id.
  For orders scored from a :class:`Snapshot`, every order in the snapshot is prior;
- an NPS answer or an incident is known only when its timestamp is strictly
  before the order's;
- a prior order's ``returned_value`` is known once the order is
  ``return_window_days`` old;
- a window of ``D`` days includes an event exactly ``D`` days old.

The offline frame (:func:`order_features`), the batch path
(:func:`features_for_orders`) and the customer frame (:func:`customer_frame`)
are one vectorised computation over a *ledger* of orders sorted by customer
and time, plus per-customer totals of the orders too old to matter for any
window (a snapshot's base). :class:`CustomerState` is the same arithmetic for
one customer in plain Python, for the service's budget of a fraction of a
millisecond per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from insertrec.data import Dataset
from insertrec.errors import DataError, InsertrecError, Problem
from insertrec.schema import FEATURES, TABLES

if TYPE_CHECKING:
    from insertrec.catalog import Catalog

DAY_NS = 86_400 * 10**9
_NO_TS = int(np.iinfo(np.int64).min)   # "no such event"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIER_OF_SCORE = ("detractor",) * 7 + ("passive",) * 2 + ("promoter",) * 2
_TIERS = (*_TIER_OF_SCORE, "unknown")               # index -1 (no answer) -> unknown
_STAGES = ("new", "developing", "loyal", "lapsed")
_WINDOW_PARAMS = ("nps_ttl_days", "lapse_days", "return_window_days", "incident_window_days")
_LEDGER_COLUMNS = ("value", "returned", "gift", "cats", "chan", "recv")

CUSTOMER_COLUMNS: tuple[str, ...] = (
    "customer_id", "prior_orders", "recency_days", "tenure_days", "monetary", "total_spend",
    "return_rate", "gift_share", "nps_tier", "nps_score", "journey_stage", "incidents_90d",
    "days_since_incident")


# ---------------------------------------------------------------------------
# Parameters and the column layout they imply
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureParams:
    """Everything that fixes the feature columns, so training and serving build the same ones.

    ``categories``/``channels`` are the vocabularies of the ``cat_share_<c>`` and
    ``channel_share_<c>`` columns; ``ctx_columns`` the shop's ``ctx_*`` context
    passed through; ``action_ids``/``cap_windows`` come from the catalog.
    """

    nps_ttl_days: int = 365
    lapse_days: int = 180
    return_window_days: int = 30
    incident_window_days: int = 90
    categories: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    action_ids: tuple[str, ...] = ()
    cap_windows: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ctx_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _WINDOW_PARAMS:
            _check_days(getattr(self, name), name)
        for name in ("categories", "channels", "action_ids", "ctx_columns"):
            values = tuple(str(v) for v in getattr(self, name))
            if len(set(values)) < len(values):
                raise InsertrecError(f"feature parameter {name}: values repeat ({', '.join(values)})")
            object.__setattr__(self, name, values)
        bad_ctx = [c for c in self.ctx_columns if not c.startswith("ctx_")]
        if bad_ctx:
            raise InsertrecError(f"feature parameter ctx_columns: {bad_ctx[0]!r} does not start with 'ctx_'")
        windows = {str(a): tuple(sorted({_check_days(d, f"cap_windows[{a!r}]") for d in days}))
                   for a, days in self.cap_windows.items()}
        object.__setattr__(self, "cap_windows", windows)

    @classmethod
    def fit(cls, data: Dataset, catalog: Catalog | None = None, top_categories: int = 12,
            top_channels: int = 12, **overrides: Any) -> FeatureParams:
        """Learn the vocabularies from the orders (most frequent first, ties by name) and take
        the actions from the catalog (``data.catalog`` when not given)."""
        orders = data.orders
        catalog = data.catalog if catalog is None else catalog
        parts = pc.split_pattern(_strings(orders, "categories", ""), "|")
        code, names = _factorize(pc.list_flatten(parts))
        once = np.unique(pc.list_parent_indices(parts).to_numpy() * len(names) + code) % max(len(names), 1)
        channel_code, channels = _factorize(_strings(orders, "channel", "unknown"))
        found: dict[str, Any] = {
            "categories": _most_frequent(names, np.bincount(once, minlength=len(names)), top_categories),
            "channels": _most_frequent(channels, np.bincount(channel_code, minlength=len(channels)), top_channels),
            "ctx_columns": tuple(c for c in orders.columns if str(c).startswith("ctx_")),
        }
        if catalog is not None:
            found["action_ids"] = tuple(a for slot in catalog.slots.values() for a in slot.action_ids)
            found["cap_windows"] = catalog.cap_windows()
        return cls(**(found | overrides))

    @cached_property
    def _layout(self) -> _Layout:
        return _Layout(self)


def _check_days(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InsertrecError(f"feature parameter {name} must be a positive whole number of days "
                             f"(got {value!r})")
    return int(value)


def _most_frequent(values: pa.Array, counts: np.ndarray, top: int) -> tuple[str, ...]:
    """The ``top`` most frequent non-empty values; ties by name so that a refit is stable."""
    ranked = sorted((-n, v) for v, n in zip(values.to_pylist(), counts.tolist()) if v)
    return tuple(v for _, v in ranked[:top])


class _Layout:
    """The column names and lookup tables derived from the params, shared by every path."""

    def __init__(self, p: FeatureParams):
        self.params = p
        self.cat_index = {c: i for i, c in enumerate(p.categories)}
        self.chan_index = {c: i for i, c in enumerate(p.channels)}
        self.action_index = {a: i for i, a in enumerate(p.action_ids)}
        self.windows = tuple(sorted({d for a in p.action_ids for d in p.cap_windows.get(a, ())}))
        window_pos = {d: i for i, d in enumerate(self.windows)}
        self.cat_columns = tuple(f"cat_share_{c}" for c in p.categories)
        self.chan_columns = tuple(f"channel_share_{c}" for c in p.channels)
        # per action: (received column, days_since column, ((window column, window position), ...))
        self.action_columns = tuple(
            (f"received_{a}", f"days_since_{a}",
             tuple((f"received_{a}_{d}d", window_pos[d]) for d in p.cap_windows.get(a, ())))
            for a in p.action_ids)
        per_action = [c for r, s, ws in self.action_columns for c in (r, s, *(w for w, _ in ws))]
        self.columns = ("order_id", "customer_id", "order_ts", *FEATURES, *p.ctx_columns,
                        *self.cat_columns, *self.chan_columns, *per_action)
        # an order older than this is past every window: only its totals still matter
        self.memory_ns = max((p.return_window_days, *self.windows)) * DAY_NS


# ---------------------------------------------------------------------------
# Columns in: timestamps, strings, numbers
# ---------------------------------------------------------------------------


def _ns(column: pd.Series, file: str, name: str) -> np.ndarray:
    """UTC nanoseconds since the epoch; unparseable or missing values are refused by line."""
    ts = pd.Series(pd.to_datetime(column, utc=True, format="ISO8601", errors="coerce"))
    bad = np.flatnonzero(ts.isna().to_numpy())
    if len(bad):
        raise DataError([Problem(file, int(i) + 2, name, "missing or not an ISO 8601 timestamp",
                                 str(column.iloc[i])) for i in bad[:20]])
    return ts.dt.as_unit("ns").array.asi8


def _ns_scalar(value: Any, name: str = "order_ts") -> int:
    """One timestamp (tz-aware datetime, ISO string, pandas Timestamp) as UTC nanoseconds;
    naive ones are UTC. Plain Python: the service calls this once per request."""
    if isinstance(value, pd.Timestamp):
        return int(value.value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InsertrecError(f"{name}: not an ISO 8601 timestamp (got {value!r})") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        d = value - _EPOCH
        return (d.days * 86_400 + d.seconds) * 10**9 + d.microseconds * 1000
    if isinstance(value, np.datetime64):
        return int(value.astype("datetime64[ns]").astype(np.int64))
    raise InsertrecError(f"{name}: expected a timestamp (got {value!r})")


def _datetime(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _arrow(values: pd.Series | np.ndarray | pa.Array) -> pa.Array:
    """Strings as one Arrow array: pandas' default ``str`` columns convert without copying,
    and Arrow's kernels split, look up and encode a million strings in milliseconds."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values
    else:
        series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
        arr = pa.array(series.astype("str"))
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return arr.cast(pa.large_string())


def _strings(frame: pd.DataFrame, name: str, default: str) -> pa.Array:
    if name not in frame:
        return pa.array(np.full(len(frame), default, dtype=object), type=pa.large_string())
    return pc.fill_null(_arrow(frame[name]), default)


def _lookup(values: pa.Array, vocabulary: pa.Array | tuple | np.ndarray) -> np.ndarray:
    """Position of each value in ``vocabulary`` (unique), -1 when absent."""
    vocab = _arrow(pa.array(list(vocabulary), type=pa.large_string())
                   if not isinstance(vocabulary, pa.Array) else vocabulary)
    return pc.index_in(values, value_set=vocab).fill_null(-1).to_numpy().astype(np.int64)


def _factorize(values: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Codes in order of first appearance, and the distinct values."""
    encoded = pc.dictionary_encode(values)
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary


def _number_column(frame: pd.DataFrame, name: str, default: float, file: str) -> np.ndarray:
    if name not in frame:
        return np.full(len(frame), default)
    raw = frame[name]
    values = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() & raw.notna().to_numpy())
    if len(bad):
        raise DataError([Problem(file, int(i) + 2, name, "not a number", str(raw.iloc[i])) for i in bad[:20]])
    return values.fillna(default).to_numpy(dtype=np.float64)


def _flag_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame:
        return np.zeros(len(frame), dtype=bool)
    col = frame[name]
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(dtype=np.float64, na_value=0.0) != 0
    return col.astype(str).str.strip().str.lower().isin(("true", "1", "yes", "y", "t")).to_numpy()


def _str_column(arr: pa.Array) -> pd.Series:
    return pd.Series(pd.array(arr, dtype="str"))


def _take(vocabulary: tuple[str, ...] | np.ndarray | pa.Array, codes: np.ndarray) -> pd.Series:
    """Strings from a small vocabulary by code (-1: the last one), as a ``str`` column without
    a Python string per row."""
    vocab = vocabulary if isinstance(vocabulary, pa.Array) else pa.array(list(vocabulary), type=pa.large_string())
    return _str_column(vocab.take(pa.array(np.where(codes < 0, len(vocab) + codes, codes))))


def _order_ranks(ts: np.ndarray, ids: pa.Array) -> np.ndarray:
    """Rank of each order by (order_ts, order_id): sort by time, then only the ties by id."""
    order = np.argsort(ts, kind="stable")
    sts = ts[order]
    tied = np.r_[False, sts[1:] == sts[:-1]] | np.r_[sts[1:] == sts[:-1], False]
    if tied.any():
        sub = order[tied]
        id_rank = np.empty(len(sub), dtype=np.int64)
        id_rank[pc.array_sort_indices(ids.take(pa.array(sub))).to_numpy()] = np.arange(len(sub))
        order[tied] = sub[np.lexsort((id_rank, ts[sub]))]
    rank = np.empty(len(ts), dtype=np.int64)
    rank[order] = np.arange(len(ts))
    return rank


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
    def of(cls, frame: pd.DataFrame, layout: _Layout, exposures: pd.DataFrame | None,
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


# ---------------------------------------------------------------------------
# Events sorted by customer and time, and the orders ledger
# ---------------------------------------------------------------------------


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
    def empty(cls, rows: int, layout: _Layout) -> _Totals:
        p = layout.params
        zeros = np.zeros(rows, dtype=np.int64)
        return cls(zeros, np.zeros(rows), np.zeros(rows), zeros, np.zeros((rows, len(p.categories)), np.int64),
                   np.zeros((rows, len(p.channels)), np.int64), np.zeros((rows, len(p.action_ids)), np.int64),
                   np.full((rows, len(p.action_ids)), _NO_TS), np.full(rows, _NO_TS), np.full(rows, _NO_TS))

    def take(self, idx: np.ndarray, layout: _Layout) -> _Totals:
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

    def __init__(self, ev: _Events, layout: _Layout):
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


def _share(count: np.ndarray, n: np.ndarray) -> np.ndarray:
    n = n.reshape(n.shape + (1,) * (count.ndim - 1)).astype(np.float64)
    return np.divide(count, n, out=np.full(count.shape, np.nan), where=n > 0)


def _days(t: np.ndarray, ts: np.ndarray) -> np.ndarray:
    t = t.reshape(t.shape + (1,) * (ts.ndim - 1))
    return np.where(ts != _NO_TS, (t - np.where(ts != _NO_TS, ts, t)) / DAY_NS, np.nan)


def _history(g: np.ndarray, t: np.ndarray, start: np.ndarray, c: np.ndarray, ledger: _Ledger,
             base: _Totals | None, nps: _Events, incidents: _Events, incident_types: pa.Array
             ) -> tuple[dict[str, Any], _Totals]:
    """The customer-history columns of orders at ``t`` whose prior ledger orders are each
    customer's first ``c`` (from ``start``), plus ``base``: per customer code, the orders older
    than every window (all past the return window)."""
    layout = ledger.layout
    p = layout.params
    tot = ledger.totals(start, c)
    mature = ledger.ev.count_before(g, t - p.return_window_days * DAY_NS, inclusive=True, start=start)
    matured = ledger.money_before(start, mature)
    if base is not None:
        old = base.take(g, layout)
        tot = old.then(tot)
        matured = matured + np.column_stack([old.spend, old.returned])
    lapsed = (tot.n > 0) & (t - np.where(tot.n > 0, tot.last_ts, t) > p.lapse_days * DAY_NS)
    stage = np.select([tot.n == 0, lapsed, tot.n < 3], [0, 3, 1], 2)

    answered = nps.latest_before(g, t, "ts", _NO_TS)
    known = (answered != _NO_TS) & (t - answered <= p.nps_ttl_days * DAY_NS)
    score = np.where(known, nps.latest_before(g, t, "score", -1), -1)

    last_incident = incidents.latest_before(g, t, "ts", _NO_TS)
    last_type = incidents.latest_before(g, t, "type", -1)
    inc_start = incidents.start(g)
    recent_inc = (incidents.count_before(g, t, start=inc_start)
                  - incidents.count_before(g, t - p.incident_window_days * DAY_NS, start=inc_start))

    cols: dict[str, Any] = {
        "nps_tier": _take(_TIERS, score),
        "nps_score": np.where(score >= 0, score, np.nan).astype(np.float64),
        "journey_stage": _take(_STAGES, stage),
        "prior_orders": tot.n.astype(np.float64),
        "recency_days": _days(t, tot.last_ts),
        "tenure_days": np.where(tot.n > 0, _days(t, tot.first_ts), 0.0),
        "monetary": _share(tot.spend, tot.n),
        "total_spend": tot.spend.astype(np.float64),
        "return_rate": np.divide(matured[:, 1], matured[:, 0], out=np.full(len(g), np.nan),
                                 where=matured[:, 0] > 0),
        "gift_share": _share(tot.gifts, tot.n),
        "incidents_90d": recent_inc.astype(np.float64),
        "days_since_incident": _days(t, last_incident),
        "last_incident_type": _take(pa.concat_arrays([incident_types.cast(pa.large_string()),
                                                      pa.array(["none"], pa.large_string())]), last_type),
    }
    shares = _share(tot.cats, tot.n)
    cols |= {name: shares[:, i] for i, name in enumerate(layout.cat_columns)}
    shares = _share(tot.chans, tot.n)
    cols |= {name: shares[:, i] for i, name in enumerate(layout.chan_columns)}
    if layout.action_columns:
        in_window = [ledger.received_between(
            start + ledger.ev.count_before(g, t - d * DAY_NS, start=start), start + c) for d in layout.windows]
        since = _days(t, tot.recv_last)
        for a, (received, days_since, windowed) in enumerate(layout.action_columns):
            cols[received] = tot.recv[:, a].astype(np.float64)
            cols[days_since] = since[:, a]
            cols |= {name: in_window[w][:, a].astype(np.float64) for name, w in windowed}
    return cols, tot


def _frame(orders: _Orders, hist: dict[str, Any], layout: _Layout, index: pd.Index) -> pd.DataFrame:
    own = {"order_id": _str_column(orders.order_id), "customer_id": _str_column(orders.customer_id),
           "order_ts": pd.to_datetime(orders.ts, utc=True), "order_value": orders.value,
           "n_items": orders.n_items, "channel": _str_column(orders.channel), "region": _str_column(orders.region),
           "is_gift": orders.is_gift, "categories": _str_column(orders.categories),
           "main_category": _str_column(orders.main_category)}
    data = own | hist | orders.ctx
    return pd.DataFrame({c: _values(data[c]) for c in layout.columns}, index=index)


def _values(column: Any) -> Any:
    """A column's values without its index, so that frames take the caller's index."""
    return column.array if isinstance(column, pd.Series) else column


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


# ---------------------------------------------------------------------------
# Offline features
# ---------------------------------------------------------------------------


def order_features(data: Dataset, params: FeatureParams) -> pd.DataFrame:
    """One row per ``data.orders`` row (same index and order): the order and its customer as
    known strictly before it. The frame every model trains on and every estimate is made from."""
    layout = params._layout
    orders = _Orders.of(data.orders, layout, data.exposures)
    g, customers = _factorize(orders.customer_id)
    ledger = _Ledger(_Events.of(g, orders.ts, orders.seq, **orders.ledger_columns()), layout)
    start = ledger.ev.start(g)
    nps, incidents = (side := _Side.of(data, None)).events(customers)
    hist, _ = _history(g, orders.ts, start, ledger.ev.position - start, ledger, None, nps, incidents, side.types)
    return _frame(orders, hist, layout, data.orders.index)


# ---------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------


def order_rewards(data: Dataset, *, horizon_days: float = 60,
                  costs: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Per order (aligned with ``data.orders``): what it was worth, the outcome the policy learns.

    ``revenue`` is the customer's net revenue (value minus returns) over their
    orders in ``(t, t + horizon]``; ``action_cost`` the cost of what the order
    received (actions missing from ``costs`` cost 0); ``reward`` their
    difference, unless the exposures give the order's reward (the first one
    given, in file order). A window that runs past the last order in the data
    is censored: ``reward_complete`` is False, unless the reward was given.
    """
    if not horizon_days > 0:
        raise InsertrecError(f"horizon_days must be positive (got {horizon_days!r})")
    frame = data.orders
    ts = _ns(frame["order_ts"], "orders", "order_ts")
    ids = _strings(frame, "order_id", "")
    net = (_number_column(frame, "order_value", 0.0, "orders")
           - _number_column(frame, "returned_value", 0.0, "orders"))
    g, _ = _factorize(_strings(frame, "customer_id", ""))
    ev = _Events.of(g, ts, net=net)
    cum = np.r_[pd.Series(ev.cols["net"]).groupby(ev.g, sort=False).cumsum().to_numpy(dtype=np.float64), 0.0]
    start = ev.start(g)
    horizon = round(horizon_days * DAY_NS)
    upto_t = start + ev.count_before(g, ts, inclusive=True, start=start) - 1   # the order itself is there
    upto_h = start + ev.count_before(g, ts + horizon, inclusive=True, start=start) - 1
    revenue = cum[upto_h] - cum[upto_t]

    exp = data.exposures
    row = _lookup(_strings(exp, "order_id", ""), ids)
    known = row >= 0
    price = pd.Series(dict(costs or {}), dtype=np.float64)
    cost = np.nan_to_num(price.reindex(pd.Index(_strings(exp, "action_id", "").to_pylist())).to_numpy(), nan=0.0) \
        if len(price) else np.zeros(len(exp))
    action_cost = np.bincount(row[known], weights=cost[known], minlength=len(ts))
    given = exp["reward"].to_numpy(dtype=np.float64, na_value=np.nan) if "reward" in exp else np.full(len(exp), np.nan)
    has = known & ~np.isnan(given)
    first_given = np.full(len(ts), np.nan)
    rows_with, first = np.unique(row[has], return_index=True)
    first_given[rows_with] = given[has][first]
    reward_given = ~np.isnan(first_given)
    last = ts.max(initial=0)
    return pd.DataFrame({
        "order_id": _str_column(ids).array,
        "revenue": revenue,
        "action_cost": action_cost,
        "reward": np.where(reward_given, first_given, revenue - action_cost),
        "reward_complete": reward_given | (ts + horizon <= last),
    }, index=frame.index)


# ---------------------------------------------------------------------------
# Snapshots: customer state for serving and batch scoring
# ---------------------------------------------------------------------------


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
        layout = params._layout
        cut = None if as_of is None else _ns_scalar(as_of, "as_of")
        orders = _Orders.of(data.orders, layout, data.exposures)
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
        state.cats, state.chans, state.recv = b.cats[i].tolist(), b.chans[i].tolist(), b.recv[i].tolist()
        state.recv_last = [None if v == _NO_TS else v for v in b.recv_last[i].tolist()]
        state.first_ts, state.last_ts = (None if first == _NO_TS else first), (None if last == _NO_TS else last)
        lo, hi = self.recent.bounds(i)
        if hi > lo:  # the few recent orders of one customer
            c = {k: v[lo:hi].tolist() for k, v in self.recent.cols.items()}
            for j, ts in enumerate(self.recent.ts[lo:hi].tolist()):
                state._fold(ts, c["value"][j], c["returned"][j], c["gift"][j],
                            [k for k, has in enumerate(c["cats"][j]) if has], c["chan"][j],
                            [a for a, got in enumerate(c["recv"][j]) if got], c["order_id"][j])
        lo, hi = self.nps.bounds(i)
        state.nps = list(zip(self.nps.ts[lo:hi].tolist(), self.nps.cols["score"][lo:hi].tolist()))
        lo, hi = self.incidents.bounds(i)
        if hi > lo:
            types = self.incident_types
            state.incidents = [(t, types[k].as_py()) for t, k in
                               zip(self.incidents.ts[lo:hi].tolist(), self.incidents.cols["type"][lo:hi].tolist())]
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


# ---------------------------------------------------------------------------
# One customer, online
# ---------------------------------------------------------------------------



def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "y", "t")
    return bool(value) if value is not None and value == value else False


def _number(value: Any, default: float, name: str) -> float:
    if value is None or value != value:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InsertrecError(f"{name}: expected a number (got {value!r})") from None


def _text(value: Any, default: str) -> str:
    return default if value is None or value != value else str(value)


def _categories(value: Any) -> str:
    if value is None or value != value:
        return ""
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return str(value)


class CustomerState:
    """One customer's history in plain Python: the service's features path, no pandas on it.

    Holds running totals (orders, spend, gifts, category/channel/action counts,
    first/last order and last receipt of each action), the returned value of
    orders already past the return window, the younger orders one by one (for
    the return and contact-cap windows), the last two NPS answers (the latest,
    and the one an order at exactly the latest's instant sees) and the
    incidents that can still count. ``features`` assumes the order comes after
    everything folded in, which the service's clock guarantees.
    """

    __slots__ = (
        "_layout",
        "cats",
        "chans",
        "first_ts",
        "gifts",
        "incidents",
        "last_ts",
        "matured_returned",
        "matured_value",
        "n",
        "nps",
        "recent",
        "recv",
        "recv_last",
        "spend",
    )

    def __init__(self, layout: _Layout):
        p = layout.params
        self._layout = layout
        self.n, self.spend, self.gifts = 0, 0.0, 0
        self.cats, self.chans = [0] * len(p.categories), [0] * len(p.channels)
        self.recv, self.recv_last = [0] * len(p.action_ids), [None] * len(p.action_ids)
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.matured_value, self.matured_returned = 0.0, 0.0
        self.recent: list[list[Any]] = []       # [ts, value, returned, action indices, order_id]
        self.nps: list[tuple[int, int]] = []     # (ts, score) by time; the latest before an order counts
        self.incidents: list[tuple[int, str]] = []

    @classmethod
    def empty(cls, params: FeatureParams) -> CustomerState:
        """A customer never seen: every order of theirs is a first order."""
        return cls(params._layout)

    def __copy__(self) -> CustomerState:
        """An independent copy (``copy.copy``), so that a caller can try an event on it, such as
        a fresher NPS answer known for one request only, without changing this state."""
        twin = CustomerState.__new__(CustomerState)
        for name in self.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.cats, twin.chans = [*self.cats], [*self.chans]
        twin.recv, twin.recv_last = [*self.recv], [*self.recv_last]
        twin.recent = [[*row] for row in self.recent]
        twin.nps, twin.incidents = [*self.nps], [*self.incidents]
        return twin

    def _fold(self, ts: int, value: float, returned: float, gift: bool, cats: list[int], chan: int,
              actions: list[int], order_id: str) -> None:
        self.n += 1
        self.spend += value
        self.gifts += gift
        for k in cats:
            self.cats[k] += 1
        if chan >= 0:
            self.chans[chan] += 1
        for a in actions:
            self.recv[a] += 1
            self.recv_last[a] = ts
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        self.recent.append([ts, value, returned, actions, order_id])

    def add_order(self, order: Mapping[str, Any], actions: Mapping[str, str] | None = None) -> None:
        """Fold in an order (and the actions it received, slot -> action id) once it is placed."""
        L = self._layout
        cats = {L.cat_index[c] for c in _categories(order.get("categories")).split("|") if c in L.cat_index}
        received = sorted({L.action_index[a] for a in (actions or {}).values() if a in L.action_index})
        self._fold(_ns_scalar(order.get("order_ts")), _order_value(order),
                   _number(order.get("returned_value"), 0.0, "returned_value"), _flag(order.get("is_gift")),
                   sorted(cats), L.chan_index.get(_text(order.get("channel"), "unknown"), -1), received,
                   str(order.get("order_id")))

    def add_nps(self, score: int, ts: Any) -> None:
        """An NPS answer; the latest one is the customer's tier."""
        if isinstance(score, bool) or not isinstance(score, (int, np.integer)) or not 0 <= score <= 10:
            raise InsertrecError(f"nps score must be a whole number from 0 to 10 (got {score!r})")
        self.nps.append((_ns_scalar(ts, "response_ts"), int(score)))
        self.nps.sort(key=lambda answer: answer[0])   # stable: of two at one instant, the later told wins
        del self.nps[:-2]  # the latest, and the one before for an order at exactly the latest's instant

    def add_incident(self, type: str, ts: Any) -> None:
        """Something that went wrong for the customer (late, damaged, ...)."""
        self.incidents.append((_ns_scalar(ts, "ts"), str(type)))
        self.incidents.sort(key=lambda incident: incident[0])

    def add_return(self, order_id: str, returned_value: float) -> None:
        """The order's returned value (its total so far). For an order already folded into the
        totals past the return window, the amount is added to the returned total."""
        for row in self.recent:
            if row[4] == str(order_id):
                row[2] = float(returned_value)
                return
        self.matured_returned += float(returned_value)

    def features(self, order: Mapping[str, Any]) -> dict[str, Any]:
        """The order's feature row, equal to the one :func:`order_features` would give it."""
        L = self._layout
        p = L.params
        t = _ns_scalar(order["order_ts"]) if order.get("order_ts") is not None \
            else _ns_scalar(datetime.now(UTC))
        categories = _categories(order.get("categories"))
        n = self.n
        recency = float(t - self.last_ts) / DAY_NS if n else math.nan
        stage = "new" if n == 0 else "lapsed" if t - self.last_ts > p.lapse_days * DAY_NS \
            else "developing" if n < 3 else "loyal"
        score, tier = math.nan, "unknown"
        answer = next((a for a in reversed(self.nps) if a[0] < t), None)
        if answer is not None and t - answer[0] <= p.nps_ttl_days * DAY_NS:
            score, tier = float(answer[1]), _TIER_OF_SCORE[answer[1]]
        mv, mr = self.matured_value, self.matured_returned
        mature_by = t - p.return_window_days * DAY_NS
        for ts, value, returned, _, _ in self.recent:
            if ts <= mature_by:
                mv += value
                mr += returned
        known = [(ts, kind) for ts, kind in self.incidents if ts < t]
        since = t - p.incident_window_days * DAY_NS
        row: dict[str, Any] = {
            "order_id": str(order.get("order_id")),
            "customer_id": str(order.get("customer_id")),
            "order_ts": _datetime(t),
            "order_value": _order_value(order),
            "n_items": _number(order.get("n_items"), 1.0, "n_items"),
            "channel": _text(order.get("channel"), "unknown"),
            "region": _text(order.get("region"), "unknown"),
            "is_gift": _flag(order.get("is_gift")),
            "categories": categories,
            "main_category": categories.split("|", 1)[0] or "none",
            "nps_tier": tier,
            "nps_score": score,
            "journey_stage": stage,
            "prior_orders": float(n),
            "recency_days": recency,
            "tenure_days": float(t - self.first_ts) / DAY_NS if n else 0.0,
            "monetary": self.spend / n if n else math.nan,
            "total_spend": self.spend,
            "return_rate": mr / mv if mv > 0 else math.nan,
            "gift_share": self.gifts / n if n else math.nan,
            "incidents_90d": float(sum(1 for ts, _ in known if ts >= since)),
            "days_since_incident": float(t - known[-1][0]) / DAY_NS if known else math.nan,
            "last_incident_type": known[-1][1] if known else "none",
        }
        for c in p.ctx_columns:
            value = order.get(c)
            row[c] = math.nan if value is None else value
        for name, count in zip(L.cat_columns, self.cats):
            row[name] = count / n if n else math.nan
        for name, count in zip(L.chan_columns, self.chans):
            row[name] = count / n if n else math.nan
        for a, (received, days_since, windowed) in enumerate(L.action_columns):
            last = self.recv_last[a]
            row[received] = float(self.recv[a])
            row[days_since] = float(t - last) / DAY_NS if last is not None else math.nan
            for name, w in windowed:
                start = t - L.windows[w] * DAY_NS
                row[name] = float(sum(1 for r in self.recent if r[0] >= start and a in r[3]))
        return row


def _order_value(order: Mapping[str, Any]) -> float:
    try:
        value = float(order["order_value"])
    except (KeyError, TypeError, ValueError):
        raise InsertrecError(f"order_value: expected a number (got {order.get('order_value')!r})") from None
    if value != value:
        raise InsertrecError("order_value: missing")
    return value


__all__ = [
    "CUSTOMER_COLUMNS",
    "DAY_NS",
    "CustomerState",
    "FeatureParams",
    "Snapshot",
    "customer_frame",
    "features_for_orders",
    "order_features",
    "order_rewards",
]
