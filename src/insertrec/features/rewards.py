"""Rewards: what each logged order was worth, the outcome the policy learns."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from insertrec.data import Dataset
from insertrec.errors import InsertrecError
from insertrec.features.columns import DAY_NS, _factorize, _lookup, _ns, _number_column, _str_column, _strings
from insertrec.features.ledger import _Events


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


__all__ = ["order_rewards"]
