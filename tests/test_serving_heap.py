"""What a worker keeps of its customers between requests, as its garbage collector sees it.

A worker caches the folded state of its most recent customers. Every full collection of
CPython's cyclic garbage collector walks each tracked object the process holds, so the tracked
objects a cached customer costs are what a worker's pauses grow by with the customers it has
seen (issue #12: full collections of 9 ms growing to 68 ms under load, each freeing nothing).
Objects are counted, never timed.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections import Counter
from pathlib import Path

from serving_helpers import EXAMPLE_CATALOG, order

from insertrec.serving.decisionlog import DecisionLog
from insertrec.serving.hotswap import ModelHolder
from insertrec.serving.metrics import Metrics, Stopwatch
from insertrec.serving.payloads import OrderIn
from insertrec.serving.service import DecisionService
from insertrec.serving.spool import Spool


def _worker(tmp_path: Path, cache_size: int) -> DecisionService:
    log = DecisionLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.create()
    holder = ModelHolder(None, str(EXAMPLE_CATALOG))
    service = DecisionService(holder, log, Metrics(), Spool(tmp_path / "spool"), cache_size)
    holder.load(log.generation())
    return service


def _decide(service: DecisionService, customers: range, orders_each: int, tag: str) -> None:
    """Each customer's orders, one at a time, round after round (each order a new id)."""
    async def run() -> None:
        for r in range(orders_each):
            for c in customers:
                body = order(f"{tag}-{r}-{c}", f"c-{c}", order_value=10.5 + c % 90, categories=["apparel"],
                             n_items=2)
                await service.decide(OrderIn.model_validate(body), Stopwatch(service.metrics))
    asyncio.run(run())


def _tracked() -> Counter[str]:
    """The objects the cyclic GC tracks (outside the permanent generation), by type, after a full
    collection (which also stops tracking tuples that hold only numbers and strings)."""
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


def _blocks() -> int:
    """Memory blocks Python has allocated (objects the GC tracks or not), after a full collection."""
    gc.collect()
    return sys.getallocatedblocks()


def test_kept_customers_cost_the_collector_under_one_object_each_however_many_orders_they_placed(tmp_path):
    service = _worker(tmp_path, cache_size=1000)
    _decide(service, range(20), 2, "warm")   # the worker's own first-use objects
    before = _tracked()
    _decide(service, range(20, 320), 6, "run")
    after = _tracked()
    assert len(service._known) == 320
    grown = {kind: n - before[kind] for kind, n in after.items() if n > before[kind]}
    assert sum(grown.values()) < 300, f"tracked objects gained for 300 customers of 6 orders: {grown}"


def test_an_evicted_or_replaced_customer_is_freed(tmp_path):
    service = _worker(tmp_path, cache_size=50)
    _decide(service, range(300), 2, "first")
    assert len(service._known) == 50
    blocks = _blocks()
    _decide(service, range(300, 600), 2, "second")   # 300 more customers through a full cache
    assert len(service._known) == 50
    assert _blocks() - blocks < 300, "memory kept for customers no longer cached"
    replaced = weakref.ref(service.holder.current)
    service.holder.load(1)   # a new model: what was folded under the old one is never used again
    _decide(service, range(590, 600), 1, "reloaded")   # 10 of the 50 kept customers come back
    gc.collect()
    assert replaced() is None, "the replaced model is still held"
    assert len(service._known) == 10
