"""Feature parameters and the column layout they imply, shared by every features path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from insertrec.data import Dataset
from insertrec.errors import InsertrecError
from insertrec.features.columns import DAY_NS, _factorize, _strings
from insertrec.schema import FEATURES

if TYPE_CHECKING:
    from insertrec.catalog import Catalog

_WINDOW_PARAMS = ("nps_ttl_days", "lapse_days", "return_window_days", "incident_window_days")


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

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_layout"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The layout is derived, so rebuilt on first use: a model saved with an older layout
        (pickled with its params) gets the current one."""
        self.__dict__.update({k: v for k, v in state.items() if k != "_layout"})

    @cached_property
    def _layout(self) -> _ColumnLayout:
        return _ColumnLayout(self)


def _check_days(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InsertrecError(f"feature parameter {name} must be a positive whole number of days "
                             f"(got {value!r})")
    return int(value)


def _most_frequent(values: pa.Array, counts: np.ndarray, top: int) -> tuple[str, ...]:
    """The ``top`` most frequent non-empty values; ties by name so that a refit is stable."""
    ranked = sorted((-n, v) for v, n in zip(values.to_pylist(), counts.tolist()) if v)
    return tuple(v for _, v in ranked[:top])


class _ColumnLayout:
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
        # for the online path (`CustomerState.features`): names and windows in the row's order
        self.share_columns = (*self.cat_columns, *self.chan_columns)
        self.no_shares = dict.fromkeys(self.share_columns, float("nan"))   # a customer with no order yet
        # per action: (received column, days_since column, ((window column, days), ...))
        self.received_columns = tuple((r, d, tuple((name, self.windows[w]) for name, w in ws))
                                      for r, d, ws in self.action_columns)
        self.never_received = {c: v for r, d, ws in self.action_columns
                               for c, v in ((r, 0.0), (d, math.nan), *((w, 0.0) for w, _ in ws))}
        self.columns = ("order_id", "customer_id", "order_ts", *FEATURES, *p.ctx_columns,
                        *self.cat_columns, *self.chan_columns, *per_action)
        # an order older than this is past every window: only its totals still matter
        self.memory_ns = max((p.return_window_days, *self.windows)) * DAY_NS


__all__ = ["FeatureParams"]
