"""Micro-batches: which orders a worker decides together, and that each gets its own decision."""

from __future__ import annotations

import asyncio
from typing import Any

from serving_helpers import EXAMPLE_CATALOG

from insertrec.catalog import Catalog
from insertrec.decide import Decider
from insertrec.engine import Engine
from insertrec.policy import Decision
from insertrec.serving.metrics import Metrics
from insertrec.serving.microbatch import MicroBatch


class _Counting(Decider):
    """The rules' decisions, and the order ids of every call that decided orders together."""

    def __init__(self) -> None:
        super().__init__(Engine.rules_only(Catalog.load(EXAMPLE_CATALOG), epsilon=0.0))
        self.batches: list[list[str]] = []

    def decide_many(self, orders: list[dict[str, Any]], states: list[Any],
                    unavailable: list[frozenset[str]]) -> list[Decision]:
        self.batches.append([order["order_id"] for order in orders])
        return super().decide_many(orders, states, unavailable)


def _order(i: int) -> dict[str, Any]:
    return {"order_id": f"o-{i}", "customer_id": f"c-{i}", "order_ts": "2024-03-01T10:00:00+00:00",
            "order_value": 40.0 + i, "n_items": 2, "channel": "web", "categories": ["apparel"]}


def test_an_order_whose_request_starts_a_turn_later_joins_the_batch():
    """Under load a request read from its socket while a batch is being gathered starts its handler
    only in the next turn of the event loop; it must still join that batch (in batches of their own,
    measured under uvicorn, orders cost the model ~1.5x the CPU each). Each gets its own decision."""
    decider = _Counting()
    assert decider.model is not None
    state = decider.model.state

    async def run() -> list[Decision]:
        batch = MicroBatch(Metrics())
        first = asyncio.ensure_future(batch.decide(decider, _order(0), state("c-0"), frozenset()))
        await asyncio.sleep(0)   # the first order's handler runs and submits; this turn reads the next request
        later = [asyncio.ensure_future(batch.decide(decider, _order(i), state(f"c-{i}"), frozenset()))
                 for i in (1, 2)]   # their handlers start in the turn after
        return list(await asyncio.gather(first, *later))

    decisions = asyncio.run(run())
    assert decider.batches == [["o-0", "o-1", "o-2"]]
    assert [d.order_id for d in decisions] == ["o-0", "o-1", "o-2"]
    assert decisions == [decider.decide(_order(i), state(f"c-{i}")) for i in range(3)]
