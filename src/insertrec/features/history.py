"""Point-in-time history features: every order's customer history as known strictly before it.

One computation (:func:`_history` over a ledger) for two kinds of input: tables
(:func:`order_features`, the offline frame) and arrays (:func:`history_features`,
the simulator's history so far), so that the world decides on exactly the
features the engine later learns from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from insertrec.data import Dataset
from insertrec.features.columns import _NO_TS, DAY_NS, _factorize, _str_column, _take
from insertrec.features.ledger import _LEDGER_COLUMNS, _Events, _Ledger, _Orders, _Side, _Totals
from insertrec.features.params import FeatureParams, _ColumnLayout
from insertrec.schema import JOURNEY_STAGES

_TIER_OF_SCORE = ("detractor",) * 7 + ("passive",) * 2 + ("promoter",) * 2
_TIERS = (*_TIER_OF_SCORE, "unknown")               # index -1 (no answer) -> unknown
_STAGES = JOURNEY_STAGES


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


def _frame(orders: _Orders, hist: dict[str, Any], layout: _ColumnLayout, index: pd.Index) -> pd.DataFrame:
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


@dataclass(frozen=True)
class ArrayHistory:
    """A history held as arrays rather than tables (the simulator's): customers are integer
    codes, instants int64 UTC nanoseconds, vocabularies those of the :class:`FeatureParams`.

    ``orders``: ``customer``, ``ts``, ``value``, ``returned`` (returned value), ``gift`` (bool),
    ``cats`` (bool, one column per ``params.categories``), ``chan`` (index in
    ``params.channels``, -1 outside) and ``recv`` (bool, one column per ``params.action_ids``);
    ``nps``: ``customer``, ``ts``, ``score`` (0..10); ``incidents``: ``customer``, ``ts``,
    ``type`` (index in ``incident_types``).
    """

    orders: Mapping[str, np.ndarray]
    nps: Mapping[str, np.ndarray]
    incidents: Mapping[str, np.ndarray]
    incident_types: tuple[str, ...]


def history_features(params: FeatureParams, history: ArrayHistory, customer: np.ndarray,
                     ts: np.ndarray) -> dict[str, Any]:
    """The customer-history columns of :func:`order_features` (everything but the order's own
    columns and context) for new orders of ``customer`` at ``ts``, each placed after every
    order of its customer in ``history``; NPS answers and incidents count when strictly before."""
    o, n, i = history.orders, history.nps, history.incidents
    customer = np.asarray(customer, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    ledger = _Ledger(_Events.of(o["customer"], o["ts"], **{k: o[k] for k in _LEDGER_COLUMNS}), params._layout)
    start = ledger.ev.start(customer)
    hist, _ = _history(customer, ts, start, ledger.ev.end(customer) - start, ledger, None,
                       _Events.of(n["customer"], n["ts"], score=n["score"]),
                       _Events.of(i["customer"], i["ts"], type=i["type"]),
                       pa.array(list(history.incident_types), type=pa.large_string()))
    return hist


__all__ = ["ArrayHistory", "history_features", "order_features"]
