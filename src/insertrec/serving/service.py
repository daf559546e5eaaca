"""Deciding one order end to end: customer state, model (or rules), stock, the log.

HTTP-free, so the same path serves the single and the batch route. A
decision is *optimistic*: state is read and the box scored without holding
any lock, then one short transaction re-checks what could have changed
meanwhile (the order already decided, the customer's history, stock and
budget) and commits. If something changed, the decision is redone with the
news (an exhausted action made unavailable, the customer's new order folded
in); nothing is ever half-written.

When the log cannot be reached or misses its deadline, the order is answered
anyway, from the catalog's rules with only the actions nothing counts (no
stock, budget or contact cap: those counters cannot be checked), labelled
``fallback``, and the decision is written to the worker's spool (fsynced)
before the answer leaves. Until the spool is replayed into the log
(`DecisionService.replay_spool`) the worker does not ask the log again, so
the outage costs each order no deadline and no spooled decision is overtaken
by a logged one of the same order.

Orders whose state is ready in the same turn of the event loop, or the next, are decided
together (`MicroBatch`), each as it would be alone, and decisions are committed
in groups (`GroupCommit`): a request, its box chosen, waits for the commit of
every decision made in the same turn of the event loop, and is answered after it. Under load a worker's requests share
one transaction instead of queueing for one each; alone, a request commits
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson

from insertrec.features import CustomerState
from insertrec.policy import Decision
from insertrec.serving.customercache import CustomerCache, Known
from insertrec.serving.decisionlog import (
    CustomerMoved,
    DecisionLog,
    Entry,
    Event,
    LogUnavailable,
    OrderConflict,
    OutOfStock,
    Recorded,
    retried,
)
from insertrec.serving.hotswap import Loaded, ModelHolder
from insertrec.serving.metrics import Metrics, Stopwatch
from insertrec.serving.microbatch import MicroBatch
from insertrec.serving.payloads import NpsAnswer, OrderIn, OutcomeOut, Redeemed, Reordered, Returned
from insertrec.serving.spool import Spool
from insertrec.serving.statements import StoredRow
from insertrec.serving.writers import GroupCommit

__all__ = ["DecisionService"]

_log = logging.getLogger("insertrec.serving")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_ATTEMPTS = 24  # each retry learns one more exhausted action or one newer order; two workers deciding
#                    one customer's orders at once each lose a round with odds 1/2, so 8 rounds starved 3 in 800
_EXHAUSTED_TTL_S = 1.0     # how stale this worker's view of used-up stock may be (commits re-check)
_REPLAY_BATCH = 256        # spooled decisions per replay transaction


class DecisionService:
    """Decisions and outcomes of one worker.

    Parameters
    ----------
    holder : the worker's model (hot-swappable).
    log : the decision log.
    metrics : where stage timings, decisions and fallbacks are counted.
    spool : where decisions go while the log is unavailable.
    cache_size : customers whose folded state is kept between requests (~2 KB
        each); anything newer in the log is still read on every request (its
        tail, or the customer's own query), so the cache saves work, never
        correctness. A customer not in it costs a
        request ~50 us more (their whole history since the snapshot, read and
        folded): 4,096 missed on every order of bench/load_api.py's 6,000
        recurring customers.
    """

    def __init__(self, holder: ModelHolder, log: DecisionLog, metrics: Metrics, spool: Spool,
                 cache_size: int = 16384):
        self.holder, self.log, self.metrics, self.spool = holder, log, metrics, spool
        self.log_down: str | None = None   # why the log failed; set until the spool is replayed
        self.commits = GroupCommit(log, metrics)
        self.batch = MicroBatch(metrics)
        self._in_flight = 0   # orders being decided: one alone is not batched (`MicroBatch.decide`)
        self._deciding: dict[str, tuple[asyncio.Lock, int]] = {}
        self._known = CustomerCache(cache_size)
        self._exhausted: set[str] = set()
        self._exhausted_at = 0.0
        self._tail: tuple[int, int] | None = None   # the newest decision and outcome row ids folded in
        self._tail_read = False                      # in this turn of the event loop

    async def decide(self, order: OrderIn, watch: Stopwatch) -> tuple[str, bool]:
        """The response JSON for ``order`` and whether it is a stored one (a retry)."""
        loaded = self.holder.current
        if loaded is None:
            raise LogUnavailable("the service is still starting")
        self._known.follow(loaded)
        record = order.record(datetime.now(UTC))
        ts_ns = _ns(datetime.fromisoformat(record["order_ts"]))
        self._in_flight += 1
        try:
            async with self._one_at_a_time(order.customer_id):
                spooled = self.spool.get(order.order_id)
                if spooled is not None:
                    return _repeated(spooled, order)
                if self.log_down is None:
                    try:
                        unavailable = self._exhausted_now() & loaded.limited
                        return await self._decide(loaded, order, record, ts_ns, unavailable, watch)
                    except LogUnavailable as exc:
                        self.log_down = str(exc)
                        _log.error("decision log unavailable; spooling decisions", extra={
                            "event": "log_unavailable", "reason": str(exc)})
                return self._spool(loaded, order, record, ts_ns, watch)
        finally:
            self._in_flight -= 1

    async def _decide(self, loaded: Loaded, order: OrderIn, record: dict, ts_ns: int, unavailable: set[str],
                      watch: Stopwatch) -> tuple[str, bool]:
        """State -> decide -> commit, redone with the news when the commit finds an action used up
        (it becomes unavailable) or the customer moved on (their newer order is folded in)."""
        for attempt in range(_MAX_ATTEMPTS):
            known = self._state(loaded, order.customer_id, exact=attempt > 0)
            # the history this decision rests on (``known`` is this request's copy): if the log gains
            # another worker's decision of this customer meanwhile, the commit finds the customer moved
            last_decision = known.last_decision
            state = _with_fresher_nps(known.state, order, record)
            watch.lap("features")
            decision = await self.batch.decide(loaded.decider, record, state, frozenset(unavailable),
                                               alone=self._in_flight == 1)
            if decision.policy == "fallback":
                self.metrics.fallbacks.inc()
            decision_id, text = _body(decision)
            watch.lap("scoring")
            actions = {slot: c.action_id for slot, c in decision.slots.items()}
            entry = _entry(order, record, ts_ns, decision, decision_id, text, last_decision, loaded.as_of_ns,
                           tuple(a for a in actions.values() if a in loaded.limited))
            outcome = await self.commits.submit(entry)
            if isinstance(outcome, OutOfStock):
                unavailable.add(outcome.action_id)
                self._exhausted.add(outcome.action_id)
                self.metrics.retries.labels("stock").inc()
                continue
            if isinstance(outcome, CustomerMoved):
                self.metrics.retries.labels("customer").inc()
                continue
            watch.lap("logging")
            if outcome.row_id is None:
                return outcome.response_json, True
            # as another worker would read it back from the log, unless the log's tail, read while
            # the commit was awaited, already folded it in (SQLite's row ids follow commit order)
            kept = self._known.get(loaded, order.customer_id) if entry.in_history else None
            if kept is not None and kept.last_decision < outcome.row_id:
                kept.state.add_order(record, actions)
                kept.last_decision = outcome.row_id
                self._known.put(loaded, order.customer_id, kept)
            self.metrics.decided(decision.policy)
            if _log.isEnabledFor(logging.DEBUG):   # not building the record's fields for nothing
                _log.debug("decision", extra={"event": "decision", "decision_id": entry.decision_id,
                                              "order_id": order.order_id, "customer_id": order.customer_id,
                                              "policy": decision.policy,
                                              "model_version": decision.model_version})
            return outcome.response_json, False
        raise LogUnavailable(f"order_id {order.order_id!r}: too many concurrent changes to commit; retry")

    def _spool(self, loaded: Loaded, order: OrderIn, record: dict, ts_ns: int, watch: Stopwatch) -> tuple[str, bool]:
        """Decide without the log: the rules, on what this worker knows of the customer (its cache, else
        the snapshot), with no counted action; spooled durably before it is answered."""
        known = self._known.get(loaded, order.customer_id)
        state = known.state if known is not None else (loaded.engine or loaded.fallback).state(order.customer_id)
        state = _with_fresher_nps(state, order, record)
        watch.lap("features")
        decision = loaded.rules.decide(record, state, loaded.counted)
        self.metrics.fallbacks.inc()
        decision_id, text = _body(decision)
        watch.lap("scoring")
        self.spool.append(_entry(order, record, ts_ns, decision, decision_id, text, None, loaded.as_of_ns, ()))
        watch.lap("logging")
        self.metrics.spooled.inc()
        self.metrics.spool_depth.set(len(self.spool))
        self.metrics.decided(decision.policy)
        return text, False

    async def replay_spool(self) -> int:
        """Move spooled decisions (this worker's, and those of workers that died) into the log, in
        the order they were made, and return how many were stored. Idempotent: an order already in
        the log stores nothing. The log is used again for new decisions once everything is in (no
        await between the spool found empty and the switch) and it answers; until then, on
        LogUnavailable, the rest stays spooled for the next round."""
        stored = 0
        self.spool.adopt()
        if not len(self.spool) and self.log_down is None:
            return 0
        try:
            self.log.ping()
            while segments := self.spool.to_replay():   # decisions keep being spooled meanwhile
                for segment in segments:
                    while segment.replayed < len(segment.entries):
                        batch = segment.entries[segment.replayed:segment.replayed + _REPLAY_BATCH]
                        stored += self._replay(batch)
                        segment.replayed += len(batch)
                        await asyncio.sleep(0)   # let requests in between batches
                    self.spool.replayed(segment)
            if self.log_down is not None:
                self.log_down = None
                _log.warning("decision log back; spool replayed", extra={"event": "log_back"})
        except LogUnavailable as exc:
            self.log_down = self.log_down or str(exc)
        finally:
            self.metrics.spool_depth.set(len(self.spool))
        return stored

    def _replay(self, batch: list[Entry]) -> int:
        """Log one batch of spooled decisions; how many were new to the log."""
        stored = 0
        for entry, result in zip(batch, self.log.record_many(batch)):
            if isinstance(result, Recorded) and result.row_id is not None:
                stored += 1
            elif isinstance(result, Recorded) and result.response_json != entry.response_json:
                # a commit given up at its deadline that the server completed after all
                _log.warning("the log holds another decision of a spooled order; it keeps that one",
                             extra={"event": "spool_superseded", "order_id": entry.order_id})
            elif isinstance(result, OrderConflict):
                _log.warning("a spooled decision's order_id was decided before for another order; the log "
                             "keeps that one", extra={"event": "spool_conflict", "order_id": entry.order_id})
        self.metrics.spool_replayed.inc(len(batch))
        return stored

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, customer_id: str) -> AsyncIterator[None]:
        """A customer's orders are decided in turn within this worker: decided side by side, they
        would all be scored on the same state and all but one redone. (Across workers the commit's
        check catches it, and the loser is redone.)"""
        lock, users = self._deciding.get(customer_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._deciding[customer_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._deciding[customer_id]
            if users == 1:
                del self._deciding[customer_id]
            else:
                self._deciding[customer_id] = (lock, users - 1)

    def record_outcome(self, outcome: Redeemed | Reordered | Returned | NpsAnswer) -> OutcomeOut:
        """Store an outcome once (a retry with the same key, or the same body, is not stored again)."""
        key = outcome.outcome_id or "auto-" + hashlib.sha256(
            outcome.model_dump_json(exclude={"outcome_id"}).encode()).hexdigest()[:40]
        ts = outcome.ts or datetime.now(UTC)
        recorded = self.log.record_outcome(
            key, outcome.order_id, outcome.type, _ns(ts),
            score=outcome.score if isinstance(outcome, NpsAnswer) else None,
            value=outcome.returned_value if isinstance(outcome, Returned) else None,
            action_id=outcome.action_id if isinstance(outcome, Redeemed) else None)
        return OutcomeOut(outcome_id=key, order_id=outcome.order_id, type=outcome.type, recorded=recorded)

    def _state(self, loaded: Loaded, customer_id: str, exact: bool = False) -> Known:
        """The customer as of the model's snapshot plus everything the log has on them since.

        A customer kept from an earlier request is brought up to date from the log's tail
        (`_follow_tail`), read once per turn of the event loop for every kept customer,
        where SQLite's row ids follow commit order; else, or ``exact``, or a customer not
        kept, by a query of their own."""
        if self.log.sqlite:
            self._follow_tail(loaded)   # first: the tail's start then precedes any kept customer's own query
        known = self._known.get(loaded, customer_id, asked=True)
        if known is None:
            known = Known((loaded.engine or loaded.fallback).state(customer_id), 0, 0)
            exact = True
        if exact or not self.log.sqlite:
            for event in self.log.events(customer_id, loaded.as_of_ns, known.last_decision, known.last_outcome):
                _fold(known, event)
        self._known.put(loaded, customer_id, known)
        return known

    def _follow_tail(self, loaded: Loaded) -> None:
        """Fold what the log gained since this worker last looked (any worker's decisions and
        outcomes) into the customers it keeps, once per turn of the event loop; a row a kept
        customer already has (their own query saw it, or this worker committed it) is skipped."""
        if self._tail_read:
            return
        if self._tail is None:   # nothing is kept yet: every customer kept from now on is read after this
            self._tail = self.log.newest()
            return
        self._tail_read = True
        asyncio.get_running_loop().call_soon(self._tail_done)
        cache = self._known

        def keep(customer_id: str, kind: int, row_id: int) -> bool:
            last = cache.last(loaded, customer_id)
            return last is not None and row_id > last[kind]

        events, after_decision, after_outcome = self.log.tail(loaded.as_of_ns, *self._tail, keep)
        self._tail = (after_decision, after_outcome)
        folded: dict[str, Known] = {}
        for customer_id, event in events:
            known = folded.get(customer_id) or cache.get(loaded, customer_id)
            assert known is not None   # kept: ``keep`` said so, and nothing was dropped since
            _fold(known, event)
            folded[customer_id] = known
        for customer_id, known in folded.items():
            cache.put(loaded, customer_id, known)

    def _tail_done(self) -> None:
        self._tail_read = False

    def _exhausted_now(self) -> set[str]:
        now = time.monotonic()
        if now - self._exhausted_at > _EXHAUSTED_TTL_S:
            self._exhausted = self.log.exhausted()
            self._exhausted_at = now
        return set(self._exhausted)


def _fold(known: Known, event: Event) -> None:
    """One logged event into a customer's state."""
    if event.kind == "order":
        assert event.order is not None   # an order event carries its order (Event's contract)
        known.state.add_order(event.order, event.actions)
        known.last_decision = event.id
    else:
        assert event.value is not None   # an outcome event carries its score or amount
        if event.kind == "nps":
            known.state.add_nps(int(event.value), _from_ns(event.ts_ns))
        else:
            assert event.order_id is not None   # a return names its order
            known.state.add_return(event.order_id, event.value)
        known.last_outcome = event.id


def _with_fresher_nps(state: CustomerState, order: OrderIn, record: dict) -> CustomerState:
    """The caller's NPS answer sent with the order, known just before it (a copy: the cached
    state only takes what the log holds)."""
    if order.nps_score is None:
        return state
    state = copy.copy(state)
    state.add_nps(order.nps_score, datetime.fromisoformat(record["order_ts"]) - timedelta(microseconds=1))
    return state


def _repeated(spooled: Entry, order: OrderIn) -> tuple[str, bool]:
    """An order asked again while its decision is in the spool: that answer, if it is the same order."""
    entry = replace(spooled, customer_id=order.customer_id, body_sha256=order.fingerprint())
    result = retried(entry, StoredRow(spooled.response_json, spooled.customer_id, spooled.body_sha256))
    if isinstance(result, OrderConflict):
        raise result
    return spooled.response_json, True


def _entry(order: OrderIn, record: dict, ts_ns: int, decision: Decision, decision_id: str, text: str,
           customer_last_id: int | None, since_ns: int, limited: tuple[str, ...]) -> Entry:
    """The log's entry of a decided order (see `Entry` for what the commit checks)."""
    return Entry(decision_id, order.order_id, order.customer_id, ts_ns, decision.model_version, decision.policy,
                 orjson.dumps(record).decode(),
                 {slot: (c.action_id, c.propensity) for slot, c in decision.slots.items()}, text,
                 customer_last_id, since_ns, limited, order.fingerprint())


def _body(decision: Decision) -> tuple[str, str]:
    """A new decision id and the response JSON."""
    decision_id = str(uuid.uuid4())
    out = {"decision_id": decision_id}
    out.update(decision.as_dict())
    return decision_id, orjson.dumps(out).decode()


def _ns(ts: datetime) -> int:
    d = ts - _EPOCH
    return (d.days * 86_400 + d.seconds) * 10**9 + d.microseconds * 1000


def _from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)
