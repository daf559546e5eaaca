"""Writer coordination: whose turn it is to write the log, and which decisions share a commit.

Writers of one SQLite file take turns through an OS file lock
(``<file>.writer-lock``) before ``BEGIN IMMEDIATE``: the kernel wakes the
next writer the moment the lock is free, where SQLite's own busy handler
would sleep (1, 2, 5... ms) and retry, which under load stalls a worker's
whole event loop.

A commit costs far more than the statements in it, so a worker commits the
decisions made in one turn of its event loop together (`GroupCommit`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from typing import TYPE_CHECKING

from insertrec.errors import InsertrecError
from insertrec.logschema import LogUnavailable

if TYPE_CHECKING:
    from insertrec.serving.decisionlog import CustomerMoved, DecisionLog, Entry, OutOfStock, Recorded
    from insertrec.serving.metrics import Metrics

__all__ = ["GroupCommit", "WriterTurn"]

_RETRY_S = 0.0002   # between attempts at a busy writer's turn: a commit takes about a millisecond


class WriterTurn:
    """Writers of one SQLite file, in any process, take turns: an exclusive ``flock`` held across
    the write transaction. Other databases queue writers themselves, and an in-memory SQLite has
    one process: no turn (``database`` None).

    With a ``deadline_s`` the turn is tried without blocking, again every `_RETRY_S`, and given up
    with LogUnavailable at the deadline: a process that holds the lock (stopped, or someone's
    script) costs a request its deadline, never the worker's event loop. Without, it waits.
    """

    def __init__(self, database: str | None, deadline_s: float | None = None):
        self.path = f"{database}.writer-lock" if database and database != ":memory:" else None
        self.deadline_s = deadline_s
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self.path is None:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if self.deadline_s is None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            return
        give_up = time.monotonic() + self.deadline_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    raise LogUnavailable(f"decision log: another process held the writer's turn past the "
                                         f"deadline ({self.deadline_s * 1000:.0f} ms)") from None
                time.sleep(_RETRY_S)

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None



class GroupCommit:
    """Commits the decisions submitted in one turn of the event loop together.

    The first submission schedules the commit with ``call_soon``: it runs
    once every request that was ready in this turn has chosen its box and
    submitted too. Each waits for its own result; nothing is answered
    before its commit. A request whose client went away is still committed
    (a retry gets the stored answer). A log that failed, or an order id reused
    for another order (`OrderConflict`), is raised in the request.

    Parameters
    ----------
    log : the decision log the groups are committed to.
    metrics : where the group sizes are observed.
    """

    def __init__(self, log: DecisionLog, metrics: Metrics):
        self.log, self.metrics = log, metrics
        self._pending: list[tuple[Entry, asyncio.Future]] = []

    async def submit(self, entry: Entry) -> Recorded | CustomerMoved | OutOfStock:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._commit)
        self._pending.append((entry, future))
        return await future

    def _commit(self) -> None:
        group, self._pending = self._pending, []
        self.metrics.commit_group.observe(len(group))
        try:
            results: list = self.log.record_many([entry for entry, _ in group])
        except LogUnavailable as exc:
            results = [exc] * len(group)
        for (_, future), result in zip(group, results):
            if future.done():  # cancelled: the client went away
                continue
            if isinstance(result, InsertrecError):  # LogUnavailable, OrderConflict
                future.set_exception(result)
            else:
                future.set_result(result)
