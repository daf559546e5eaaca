"""Micro-batching: the orders ready within two turns of a worker's event loop are decided together.

The model decides one order in ~100 us of CPU, most of it the fixed cost of NumPy calls on tiny
arrays; decided together (`Decider.decide_many`), a few orders share those calls. Under load a
worker has many requests in flight, and those whose customer state is ready by the next turn of
the event loop wait for each other's decision the way they wait for each other's commit
(`GroupCommit`): nothing waits for a timer, so an order alone is decided at once, by the one-order
path. The answers are the same as each order decided alone, to the bit, and failures stay per
order (see `Decider.decide_many`).

Why the next turn, not this one: a request whose bytes the loop reads in the turn an order is
submitted starts its handler only in the turn after, so a batch run in that turn misses it and
the two go in batches of their own. Under uvicorn (2 workers, 64 connections) batches run one turn
later held 11-22 orders instead of 6-7, and the model's CPU per order fell from ~190 to ~105-140
us: under load its fixed cost per batch is paid with cold caches, so it weighs more than in process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from insertrec.decide import Decider
from insertrec.features import CustomerState
from insertrec.policy import Decision
from insertrec.serving.metrics import Metrics

__all__ = ["MicroBatch"]


class MicroBatch:
    """Decides the orders submitted in one turn of the event loop, or the next, together.

    The first submission schedules the batch two turns of the loop ahead (``call_soon`` twice): it
    runs once every request that was ready in this turn, or whose bytes arrived by the next poll of
    the loop's sockets, has submitted its order too; each then gets its own decision, or its own
    exception. Orders submitted under different deciders (a model swapped in meanwhile) are
    decided by their own. The sizes are observed in ``metrics.decide_batch``.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._pending: list[tuple[Decider, dict[str, Any], CustomerState, frozenset[str], asyncio.Future]] = []

    async def decide(self, decider: Decider, order: dict[str, Any], state: CustomerState,
                     unavailable: frozenset[str], alone: bool = False) -> Decision:
        """The order's decision; ``alone``: no other order is in flight in this worker, so none can
        join it and it is decided at once, without a turn of the loop."""
        if alone and not self._pending:
            self.metrics.decide_batch.observe(1)
            return decider.decide(order, state, unavailable)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(loop.call_soon, self._run)
        self._pending.append((decider, order, state, unavailable, future))
        return await future

    def _run(self) -> None:
        pending, self._pending = self._pending, []
        by_decider: dict[int, list] = {}
        for item in pending:
            by_decider.setdefault(id(item[0]), []).append(item)
        for group in by_decider.values():
            self.metrics.decide_batch.observe(len(group))
            decider = group[0][0]
            try:
                results: list[Decision | Exception] = list(decider.decide_many(
                    [g[1] for g in group], [g[2] for g in group], [g[3] for g in group]))
            except Exception:   # an order the rules cannot decide either: each alone, so only it fails
                results = [_alone(decider, *g[1:4]) for g in group]
            for (*_, future), result in zip(group, results):
                if future.done():   # cancelled: the client went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _alone(decider: Decider, order: dict[str, Any], state: CustomerState,
           unavailable: frozenset[str]) -> Decision | Exception:
    try:
        return decider.decide(order, state, unavailable)
    except Exception as exc:
        return exc
