"""One customer's state online, in plain Python: the service's features path."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

from insertrec.errors import InsertrecError
from insertrec.features.columns import DAY_NS, _datetime, _ns_scalar
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
        "recv_ts",
        "spend",
    )

    def __init__(self, layout: _ColumnLayout):
        p = layout.params
        self._layout = layout
        self.n, self.spend, self.gifts = 0, 0.0, 0
        self.cats, self.chans = [0] * len(p.categories), [0] * len(p.channels)
        self.recv = [0] * len(p.action_ids)
        self.recv_last: list[int | None] = [None] * len(p.action_ids)
        # per action counted in windows (contact caps), its receipt instants sorted
        self.recv_ts: dict[int, list[int]] = {a: [] for a, (_, _, windowed) in enumerate(layout.received_columns)
                                               if windowed}
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
        twin.recv_ts = {a: [*times] for a, times in self.recv_ts.items()}
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
            last = self.recv_last[a]
            self.recv_last[a] = ts if last is None else max(last, ts)   # folded in any order, like last_ts
            if a in self.recv_ts:
                insort(self.recv_ts[a], ts)
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

    def _received(self, row: dict[str, Any], t: int) -> None:
        """The per-action columns of the actions this customer has received, over the layout's
        never-received values (`_ColumnLayout.never_received`, already in ``row``): times received,
        days since the last receipt, and the receipts in each of its windows before ``t``, counted
        on the receipt instants kept sorted as orders fold in (a binary search, not a pass over
        the customer's recent orders)."""
        columns = self._layout.received_columns
        for a, got_at in enumerate(self.recv_last):
            if got_at is not None:
                received, days_since, windowed = columns[a]
                row[received] = float(self.recv[a])
                row[days_since] = float(t - got_at) / DAY_NS
                if windowed:
                    times = self.recv_ts[a]
                    for name, days in windowed:
                        row[name] = float(len(times) - bisect_left(times, t - days * DAY_NS))

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
            value = order.get(c)
            row[c] = math.nan if value is None else value
        row.update(zip(L.share_columns, [k / n for k in (*self.cats, *self.chans)]) if n else L.no_shares)
        row.update(L.never_received)
        self._received(row, t)
        return row


def _order_value(order: Mapping[str, Any]) -> float:
    try:
        value = float(order["order_value"])
    except (KeyError, TypeError, ValueError):
        raise InsertrecError(f"order_value: expected a number (got {order.get('order_value')!r})") from None
    if value != value:
        raise InsertrecError("order_value: missing")
    return value


__all__ = ["CustomerState"]
