"""One customer's state online, in plain Python: the service's features path."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import numpy as np

from insertrec.errors import InsertrecError
from insertrec.features.columns import _NO_TS, DAY_NS, _datetime, _ns_scalar
from insertrec.features.history import _TIER_OF_SCORE
from insertrec.features.params import FeatureParams, _ColumnLayout


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
    first/last order and last receipt of each action, the sorted receipt instants
    of each action a contact cap counts in windows), the returned value of
    orders already past the return window, the younger orders one by one (for
    the return and contact-cap windows), the last two NPS answers (the latest,
    and the one an order at exactly the latest's instant sees) and the
    incidents that can still count. ``features`` assumes the order comes after
    everything folded in, which the service's clock guarantees.

    Every field is a number, a string or a tuple of them, replaced (never changed in
    place) by an event, and an order's event makes no nested tuple (the recent orders
    and the receipt instants are flat columns): the cyclic garbage collector stops
    tracking such tuples the first time it sees them (a level of nesting per
    collection), so that a worker can keep thousands of customers between requests
    at no cost to its full collections (`packed`). Kept as lists, they grew with the
    customers a worker had seen, to 68 ms (issue #12).
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
        "recent_order",
        "recent_returned",
        "recent_ts",
        "recent_value",
        "recv",
        "recv_last",
        "recv_ts",
        "recv_ts_end",
        "spend",
    )

    def __init__(self, layout: _ColumnLayout):
        p = layout.params
        self._layout = layout
        self.n, self.spend, self.gifts = 0, 0.0, 0
        self.cats: tuple[int, ...] = (0,) * len(p.categories)
        self.chans: tuple[int, ...] = (0,) * len(p.channels)
        self.recv: tuple[int, ...] = (0,) * len(p.action_ids)
        self.recv_last: tuple[int, ...] = (_NO_TS,) * len(p.action_ids)   # _NO_TS: never received
        # the receipt instants of the actions a contact cap counts in windows, by action, each
        # action's sorted; action a's end at recv_ts_end[a] (its start: the previous action's end)
        self.recv_ts: tuple[int, ...] = ()
        self.recv_ts_end: tuple[int, ...] = (0,) * len(p.action_ids)
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.matured_value, self.matured_returned = 0.0, 0.0
        # the younger orders, one column each: placed at, value, returned value, order id
        self.recent_ts: tuple[int, ...] = ()
        self.recent_value: tuple[float, ...] = ()
        self.recent_returned: tuple[float, ...] = ()
        self.recent_order: tuple[str, ...] = ()
        self.nps: tuple[tuple[int, int], ...] = ()   # (ts, score) by time; the latest before an order counts
        self.incidents: tuple[tuple[int, str], ...] = ()

    @classmethod
    def empty(cls, params: FeatureParams) -> CustomerState:
        """A customer never seen: every order of theirs is a first order."""
        return cls(params._layout)

    def __copy__(self) -> CustomerState:
        """An independent copy (``copy.copy``), so that a caller can try an event on it, such as
        a fresher NPS answer known for one request only, without changing this state (an event
        replaces fields, never changes one in place: sharing them is safe)."""
        twin = CustomerState.__new__(CustomerState)
        for name in self.__slots__:
            setattr(twin, name, getattr(self, name))
        return twin

    def packed(self) -> tuple[Any, ...]:
        """Every field but the layout, in one tuple: numbers, strings and tuples of them, none
        made by an order's event nested (`insertrec.serving.customercache` keeps customers so)."""
        return _pack(self)

    @classmethod
    def unpacked(cls, params: FeatureParams, packed: tuple[Any, ...]) -> CustomerState:
        """The state ``packed`` was made from, under the same feature params."""
        state = cls.__new__(cls)
        state._layout = params._layout
        for name, value in zip(_PACKED, packed):
            setattr(state, name, value)
        return state

    def _fold(self, ts: int, value: float, returned: float, gift: bool, cats: list[int], chan: int,
              actions: list[int], order_id: str) -> None:
        self.n += 1
        self.spend += value
        self.gifts += gift
        self.cats = _counted(self.cats, cats)
        if chan >= 0:
            self.chans = _counted(self.chans, (chan,))
        if actions:
            self.recv = _counted(self.recv, actions)
            last, windowed = [*self.recv_last], self._layout.received_columns
            for a in actions:
                last[a] = max(last[a], ts)   # folded in any order, like last_ts
                if windowed[a][2]:
                    ends = self.recv_ts_end
                    at = bisect_right(self.recv_ts, ts, ends[a - 1] if a else 0, ends[a])
                    self.recv_ts = (*self.recv_ts[:at], ts, *self.recv_ts[at:])
                    self.recv_ts_end = (*ends[:a], *(end + 1 for end in ends[a:]))
            self.recv_last = tuple(last)
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        self.recent_ts += (ts,)
        self.recent_value += (value,)
        self.recent_returned += (returned,)
        self.recent_order += (order_id,)

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
        # stable: of two at one instant, the later told wins; kept: the latest, and the one before
        # for an order at exactly the latest's instant
        self.nps = tuple(sorted((*self.nps, (_ns_scalar(ts, "response_ts"), int(score))),
                                key=lambda answer: answer[0]))[-2:]

    def add_incident(self, type: str, ts: Any) -> None:
        """Something that went wrong for the customer (late, damaged, ...)."""
        self.incidents = tuple(sorted((*self.incidents, (_ns_scalar(ts, "ts"), str(type))),
                                      key=lambda incident: incident[0]))

    def add_return(self, order_id: str, returned_value: float) -> None:
        """The order's returned value (its total so far). For an order already folded into the
        totals past the return window, the amount is added to the returned total."""
        if str(order_id) in self.recent_order:
            k, returned = self.recent_order.index(str(order_id)), self.recent_returned
            self.recent_returned = (*returned[:k], float(returned_value), *returned[k + 1:])
            return
        self.matured_returned += float(returned_value)

    def _received(self, row: dict[str, Any], t: int) -> None:
        """The per-action columns of the actions this customer has received, over the layout's
        never-received values (`_ColumnLayout.never_received`, already in ``row``): times received,
        days since the last receipt, and the receipts in each of its windows before ``t``, counted
        on the receipt instants kept sorted as orders fold in (a binary search, not a pass over
        the customer's recent orders)."""
        columns, times, ends = self._layout.received_columns, self.recv_ts, self.recv_ts_end
        for a, got_at in enumerate(self.recv_last):
            if got_at != _NO_TS:
                received, days_since, windowed = columns[a]
                row[received] = float(self.recv[a])
                row[days_since] = float(t - got_at) / DAY_NS
                if windowed:
                    start, end = ends[a - 1] if a else 0, ends[a]
                    for name, days in windowed:
                        row[name] = float(end - bisect_left(times, t - days * DAY_NS, start, end))

    def features(self, order: Mapping[str, Any]) -> dict[str, Any]:
        """The order's feature row, equal to the one :func:`order_features` would give it."""
        L = self._layout
        p = L.params
        t = _ns_scalar(order["order_ts"]) if order.get("order_ts") is not None \
            else _ns_scalar(datetime.now(UTC))
        categories = _categories(order.get("categories"))
        n = self.n
        last = t if self.last_ts is None else self.last_ts    # both set by the first order: n > 0
        first = t if self.first_ts is None else self.first_ts
        recency = float(t - last) / DAY_NS if n else math.nan
        stage = "new" if n == 0 else "lapsed" if t - last > p.lapse_days * DAY_NS \
            else "developing" if n < 3 else "loyal"
        score, tier = math.nan, "unknown"
        answer = next((a for a in reversed(self.nps) if a[0] < t), None)
        if answer is not None and t - answer[0] <= p.nps_ttl_days * DAY_NS:
            score, tier = float(answer[1]), _TIER_OF_SCORE[answer[1]]
        mv, mr = self.matured_value, self.matured_returned
        mature_by = t - p.return_window_days * DAY_NS
        for ts, value, returned in zip(self.recent_ts, self.recent_value, self.recent_returned):
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
            "tenure_days": float(t - first) / DAY_NS if n else 0.0,
            "monetary": self.spend / n if n else math.nan,
            "total_spend": self.spend,
            "return_rate": mr / mv if mv > 0 else math.nan,
            "gift_share": self.gifts / n if n else math.nan,
            "incidents_90d": float(sum(1 for ts, _ in known if ts >= since)),
            "days_since_incident": float(t - known[-1][0]) / DAY_NS if known else math.nan,
            "last_incident_type": known[-1][1] if known else "none",
        }
        for c in p.ctx_columns:
            given = order.get(c)
            row[c] = math.nan if given is None else given
        row.update(zip(L.share_columns, [k / n for k in (*self.cats, *self.chans)]) if n else L.no_shares)
        row.update(L.never_received)
        self._received(row, t)
        return row


_PACKED = CustomerState.__slots__[1:]   # every field but the layout
_pack = attrgetter(*_PACKED)


def _counted(counts: tuple[int, ...], at: Iterable[int]) -> tuple[int, ...]:
    """``counts`` with one more at each index of ``at``."""
    out = [*counts]
    for k in at:
        out[k] += 1
    return tuple(out)


def _order_value(order: Mapping[str, Any]) -> float:
    try:
        value = float(order["order_value"])
    except (KeyError, TypeError, ValueError):
        raise InsertrecError(f"order_value: expected a number (got {order.get('order_value')!r})") from None
    if value != value:
        raise InsertrecError("order_value: missing")
    return value


__all__ = ["CustomerState"]
