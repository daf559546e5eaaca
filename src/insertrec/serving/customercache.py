"""The customers a worker keeps between requests, where the garbage collector does not look.

A worker keeps the folded state of its most recent customers, so that their next order does not
read and fold their history again. CPython's cyclic garbage collector walks every object it
tracks at each full collection: kept as objects, customers made a worker's full collections grow
with the customers it had seen, to 68 ms under load (issue #12). Here a customer is one tuple:
the row ids folded up to, then `CustomerState.packed` (numbers, strings and flat tuples of them).
The collector stops tracking a tuple of such things when it sees it, one level of nesting per
collection, outer levels last; at two levels, the young generations' collections untrack a
customer before it reaches the old one, and the table itself, made before a worker's heap is
frozen (`hotswap._settle_heap`), is never walked. A request takes a customer out as a `Known` to
read and change, and puts it back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from insertrec.features import CustomerState
from insertrec.serving.hotswap import Loaded

__all__ = ["CustomerCache", "Known"]


@dataclass(slots=True)
class Known:
    """A customer's state as folded from the log up to given row ids: a copy, kept by `CustomerCache.put`."""

    state: CustomerState
    last_decision: int
    last_outcome: int


class CustomerCache:
    """Up to ``size`` customers, the least recently asked for dropped first, all under one `Loaded`:
    the worker's current one (`follow`), so that a replaced model's states go with it."""

    def __init__(self, size: int):
        self.size = size
        self.loaded: Loaded | None = None
        self._rows: OrderedDict[str, tuple[Any, ...]] = OrderedDict()   # (last_decision, last_outcome, *packed)

    def __len__(self) -> int:
        return len(self._rows)

    def follow(self, loaded: Loaded) -> None:
        """Keep customers under ``loaded`` (the worker's current model) from now on; what was kept
        under another is dropped. Requests still in flight under that one find nothing kept."""
        if loaded is not self.loaded:
            self._rows.clear()
            self.loaded = loaded

    def last(self, loaded: Loaded, customer_id: str) -> tuple[int, int] | None:
        """The newest decision and outcome row ids folded into a kept customer (None: not kept)."""
        row = self._rows.get(customer_id) if loaded is self.loaded else None
        return None if row is None else (row[0], row[1])

    def get(self, loaded: Loaded, customer_id: str, asked: bool = False) -> Known | None:
        """A kept customer (None: not kept under ``loaded``); ``asked``: by an order, which makes
        them the most recently asked for."""
        row = self._rows.get(customer_id) if loaded is self.loaded else None
        if row is None:
            return None
        if asked:
            self._rows.move_to_end(customer_id)
        params = (loaded.engine or loaded.fallback).params
        return Known(CustomerState.unpacked(params, row[2:]), row[0], row[1])

    def put(self, loaded: Loaded, customer_id: str, known: Known) -> None:
        """Keep ``known`` (a customer new to the cache as the most recently asked for; beyond
        ``size``, the least recently asked for is dropped). Nothing is kept under another `Loaded`."""
        if loaded is not self.loaded:
            return
        self._rows[customer_id] = (known.last_decision, known.last_outcome, *known.state.packed())
        if len(self._rows) > self.size:
            self._rows.popitem(last=False)
