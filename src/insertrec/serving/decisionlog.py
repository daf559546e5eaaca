"""The decision log: every answer the service gave, its stock and budget counters, and outcomes.

It is the service's memory across workers and restarts, and the next
model's training data. Three guarantees rest on it:

- *Durable before answered*: a decision is committed before its response
  leaves. SQLite runs in WAL mode; with ``synchronous=NORMAL`` (default) a
  committed transaction survives a crash or SIGKILL of the server process
  (the WAL is in the OS's hands at commit), and only a power loss or kernel
  crash can lose the last ones; ``FULL`` adds an fsync per commit for those.
  Checkpoints (which do fsync) run in a background thread, off the request path.
- *Idempotent*: ``order_id`` is unique; a second insert fails inside the
  transaction that would have used stock, so a retried or concurrent
  duplicate gets the stored response, verbatim, and uses nothing.
- *No oversell*: stock and budget are counters moved by a conditional
  ``UPDATE ... WHERE used < stock`` in the decision's transaction; contact caps
  rest on the customer's history, checked unchanged inside the same
  transaction. SQLite transactions start with ``BEGIN IMMEDIATE`` (one writer
  at a time across processes); on PostgreSQL a transaction first locks the
  customers and counters it will touch (`DecisionLog._lock`), so both checks
  are exact on both. On other databases the counters stay exact (the
  conditional update is atomic) and the cap check is as strong as the
  isolation level.

Decisions are committed in groups (`DecisionLog.record_many`): one
transaction, in which one decision's conflict (stock ran out, the customer
moved, the order was decided before) undoes only that decision: a decision
that moves a counter has a savepoint of its own; one that does not needs
none on SQLite and PostgreSQL, whose insert of a reused ``order_id`` stores
nothing (``ON CONFLICT DO NOTHING``) where it would fail. Writers of one SQLite file take turns
(`insertrec.serving.writers`); the tables are `insertrec.logschema`'s, the
statements `insertrec.serving.statements`', and training reads the log back
through `insertrec.logged`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from insertrec.catalog import Action, Catalog
from insertrec.errors import InsertrecError
from insertrec.logschema import LogUnavailable, decisions, inventory, metadata, redacted, tables_exist
from insertrec.serving.statements import CounterRow, EventRow, Prepared, Raw, Statements, StoredRow
from insertrec.serving.writers import WriterTurn

__all__ = ["CustomerMoved", "DecisionLog", "Entry", "Event", "LogUnavailable", "OrderConflict", "OutOfStock", "Recorded",
           "UnknownOrder", "limited_actions", "retried"]


class UnknownOrder(InsertrecError):
    """An outcome for an order the service never decided."""


class OutOfStock(Exception):
    """An action's stock or budget ran out between choosing it and committing it."""

    def __init__(self, action_id: str):
        self.action_id = action_id
        super().__init__(action_id)


class OrderConflict(InsertrecError):
    """An ``order_id`` decided before for another customer or with another body: a new order
    needs a new id, and a retry must repeat the request as it was."""

    def __init__(self, order_id: str, what: str):
        self.order_id, self.what = order_id, what
        super().__init__(f"order_id {order_id!r} was decided before with a different {what}; "
                         "a retry must send the same order, a new order needs a new order_id")


class CustomerMoved(Exception):
    """Another decision for the same customer committed since their state was read."""


@dataclass(frozen=True)
class Event:
    """One logged event of a customer: a decided order, an NPS answer or a return."""

    kind: str          # "order", "nps", "returned"
    id: int            # row id within its table (decisions or outcomes)
    ts_ns: int
    order: dict | None = None
    actions: dict[str, str] | None = None
    order_id: str | None = None
    value: float | None = None


@dataclass(frozen=True)
class Entry:
    """A decision to log, and what must still hold for it to be committed.

    ``customer_last_id`` is the customer's newest decision row (of an order at
    or after ``since_ns``) the decision was made knowing, or None for a
    decision made without the log (spooled, `insertrec.serving.spool`): it is
    stored without that check, which it could only fail; ``limited`` the chosen
    actions whose stock or budget is counted.
    """

    decision_id: str
    order_id: str
    customer_id: str
    order_ts_ns: int
    model_version: str
    policy: str
    order_json: str
    box: dict[str, tuple[str, float]]
    response_json: str
    customer_last_id: int | None = 0
    since_ns: int = -(2**63)
    limited: tuple[str, ...] = ()
    body_sha256: str | None = None

    @property
    def in_history(self) -> bool:
        """Whether the log counts this order in the customer's history (`DecisionLog.events` and the
        commit's check): orders from the snapshot's end on. An order dated before it (a late import,
        a time-zone slip) is logged and answered, but the snapshot, not the log, speaks for that time."""
        return self.order_ts_ns >= self.since_ns


@dataclass(frozen=True)
class Recorded:
    """The response for a logged order: the new row's id, or None when the order was decided before
    and ``response_json`` is the stored answer."""

    response_json: str
    row_id: int | None


COMMIT_DEADLINES = 4      # a commit (several statements and locks) may take this many deadlines
SETUP_DEADLINE_S = 30.0   # tables and counters at startup: every worker waits its turn for them

# The advisory lock key of the log's own setup (an arbitrary constant; a customer whose id hashes
# to it would only wait for a worker's startup).
_SCHEMA_LOCK = sa.select(sa.func.pg_advisory_xact_lock(sa.literal_column("7367811519823411")))


_T = TypeVar("_T")


class _Run(Protocol):
    """Runs a statement inside `DecisionLog._transaction` and returns the cursor."""

    def __call__(self, statement: Prepared | Raw, /, **params: Any) -> Any: ...


class DecisionLog:
    """One process's handle on the log: a reader and a writer connection.

    The service uses it from its event loop's thread, but it is safe from any
    thread: each connection is held by one thread at a time (a lock each). Two
    threads on the one reused read cursor crashed the process (SIGSEGV), which
    a test harness serving requests and the lifespan from different threads did.

    Parameters
    ----------
    url : SQLAlchemy URL (``INSERTREC_DB_URL``).
    synchronous : SQLite ``PRAGMA synchronous`` (``NORMAL`` or ``FULL``); see the module docstring.
    deadline_ms : how long an operation on the request path may wait for the writer's turn,
        a lock or a slow statement (SQLite's busy timeout; PostgreSQL's ``lock_timeout`` and
        ``statement_timeout``) before it fails with LogUnavailable; on a server, a read waits
        for an answer at most that long and a commit `COMMIT_DEADLINES` times it (see
        `_within_deadline`). Setting up the tables and counters (`create`, `sync_inventory`)
        waits up to `SETUP_DEADLINE_S`.
    """

    def __init__(self, url: str, synchronous: str = "NORMAL", deadline_ms: int = 50):
        try:
            # PostgreSQL: READ COMMITTED whatever the server's default, as the commit's checks must see
            # what the transaction they waited for (`_lock`) committed; and the deadline on the server
            options = {} if url.startswith("sqlite") else {
                "pool_pre_ping": True, "isolation_level": "READ COMMITTED",
                "connect_args": {"options": f"-c lock_timeout={int(deadline_ms)} -c statement_timeout={int(deadline_ms)}"}}
            self.engine = sa.create_engine(url, **options)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise LogUnavailable(f"INSERTREC_DB_URL: cannot use {redacted(url)} ({type(exc).__name__})") from None
        dialect = self.engine.dialect
        self.sqlite = dialect.name == "sqlite"
        if self.sqlite:
            _sqlite_pragmas(self.engine, synchronous.upper(), deadline_ms)
        self.deadline_ms = deadline_ms
        self._dbapi = dialect.loaded_dbapi
        self._errors = (SQLAlchemyError, self._dbapi.Error)
        self._sql = Statements(dialect)
        self._reader: Any = None
        self._read_cursor: Any = None
        self._writer: Any = None
        self._read_lock, self._write_lock = threading.RLock(), threading.RLock()
        self._turn = WriterTurn(self.engine.url.database if self.sqlite else None, deadline_ms / 1000)
        # a database server can stop answering (stopped, cut off): its calls wait in a thread of their own
        self._read_worker: ThreadPoolExecutor | None = None
        self._write_worker: ThreadPoolExecutor | None = None
        if not self.sqlite:
            self._read_worker = ThreadPoolExecutor(1, thread_name_prefix="log-read")
            self._write_worker = ThreadPoolExecutor(1, thread_name_prefix="log-write")
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._write_failed = False   # since the last write failed, until one succeeds (see ping)

    # -- lifecycle ----------------------------------------------------------------
    def create(self) -> None:
        """Create missing tables (safe to run from every worker at once)."""
        try:
            with self._alone() as conn:
                metadata.create_all(conn, checkfirst=True)
                _add_missing_columns(conn)
        except SQLAlchemyError as exc:
            if not tables_exist(self.engine):  # another worker creating them at the same time is fine
                raise LogUnavailable(f"decision log: cannot create tables ({type(exc).__name__})") from None

    def start_checkpoints(self, every_seconds: float = 1.0, wal_limit_bytes: int = 64 << 20) -> None:
        """Move SQLite's WAL checkpoints (which fsync) to a background thread.

        A checkpoint that runs beside writers never catches up with them, and
        the WAL is only rewound once one has; under steady load it would grow
        without end (SQLite's "checkpoint starvation"). So when what the WAL
        holds passes ``wal_limit_bytes``, the checkpoint takes the writers'
        turn (they wait a moment) and rewinds it: RESTART, which copies what
        the passive checkpoint just before it left (little) and syncs, so that
        the next writer starts the WAL file over. The file keeps its size (about
        the limit) and is written over, never truncated: TRUNCATE freed the
        file's blocks inside the writers' turn, and every worker waited for it
        (26-69 ms at 52 MB beside other jobs, RESTART 4-15 ms; issue #12). Nor
        does it wait for a reader in the turn (SQLite's busy handler sleeps 1, 2,
        5, 10... ms): a reader mid-read makes it a passive one, tried again next
        round.
        """
        if not self.sqlite or self._checkpointer is not None or self._turn.path is None:
            return
        turn = WriterTurn(self.engine.url.database)   # its own descriptor: flock excludes per descriptor

        def loop() -> None:
            while not self._stop.wait(every_seconds):
                try:
                    with self.engine.connect() as conn:
                        _, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
                        page = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
                        if frames * page > wal_limit_bytes:
                            _busy_timeout(conn, 0)   # a reader mid-read: retried next round, not waited for
                            try:
                                with turn:
                                    conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)")
                            finally:
                                _busy_timeout(conn, self.deadline_ms)
                except (SQLAlchemyError, OSError):
                    pass  # the next round tries again; requests are unaffected
            turn.close()

        self._checkpointer = threading.Thread(target=loop, name="wal-checkpoint", daemon=True)
        self._checkpointer.start()

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
        for worker in (self._read_worker, self._write_worker):
            if worker is not None:
                worker.shutdown(wait=False, cancel_futures=True)
        for lock, attr in ((self._read_lock, "_reader"), (self._write_lock, "_writer")):
            if lock.acquire(timeout=1.0):  # else a call stuck on a server that stopped answering holds it
                try:
                    conn = getattr(self, attr)
                    if conn is not None:
                        conn.close()
                    setattr(self, attr, None)
                finally:
                    lock.release()
        self._turn.close()
        self.engine.dispose()

    # -- decisions ------------------------------------------------------------------
    def events(self, customer_id: str, since_ns: int, after_decision: int = 0,
               after_outcome: int = 0) -> list[Event]:
        """The customer's logged orders, NPS answers and returns at or after ``since_ns``,
        newer than the given row ids, in row order: what a snapshot has not seen."""
        rows = self._fetch(self._sql.events, {"cid": customer_id, "since": since_ns, "after_d": after_decision,
                                              "after_o": after_outcome})
        return [_event(row) for row in sorted(map(EventRow._make, rows), key=lambda r: (r.kind, r.row_id))]

    def newest(self) -> tuple[int, int]:
        """The newest decision and outcome row ids (0 for none): where a `tail` starts."""
        (decision, outcome), = self._fetch(self._sql.newest, {})
        return decision or 0, outcome or 0

    def tail(self, since_ns: int, after_decision: int, after_outcome: int,
             keep: Callable[[str, int, int], bool]) -> tuple[list[tuple[str, Event]], int, int]:
        """Every customer's events as `events` gives one's, newer than the given row ids: those
        ``keep(customer_id, kind, row_id)`` wants (kind 0 a decision, 1 an outcome), each with its
        customer, in row order; and the newest row ids read, where the next tail starts. Only on
        SQLite do row ids follow commit order (one writer at a time), so that no row committed
        later can fall behind where a tail stopped."""
        rows = sorted(map(EventRow._make, self._fetch(self._sql.tail, {
            "since": since_ns, "after_d": after_decision, "after_o": after_outcome})),
            key=lambda r: (r.kind, r.row_id))
        for row in rows:
            if row.kind == 0:
                after_decision = max(after_decision, row.row_id)
            else:
                after_outcome = max(after_outcome, row.row_id)
        kept = [(row.customer_id, _event(row)) for row in rows if keep(row.customer_id, row.kind, row.row_id)]
        return kept, after_decision, after_outcome

    def exhausted(self) -> set[str]:
        """Actions whose stock or budget is used up."""
        return {action_id for action_id, in self._fetch(self._sql.exhausted, {})}

    def record_many(self, entries: Sequence[Entry]) -> list[Recorded | CustomerMoved | OutOfStock | OrderConflict]:
        return self._within_deadline(self._write_worker, COMMIT_DEADLINES * self.deadline_ms,
                                     lambda: self._record_many(entries))

    def _record_many(self, entries: Sequence[Entry]) -> list[Recorded | CustomerMoved | OutOfStock | OrderConflict]:
        """Commit decisions in one transaction; per entry, what became of it.

        An entry fails alone, leaving nothing written: CustomerMoved if the
        customer has a decision newer than ``customer_last_id`` (an earlier
        entry of the same group counts), OutOfStock if one of its ``limited``
        actions ran out. An order decided before gives its stored response
        (``row_id`` None), or OrderConflict if the customer or the body differs.
        Raises LogUnavailable, for all, if the log fails.
        """
        out: list[Recorded | CustomerMoved | OutOfStock | OrderConflict] = []
        try:
            with self._transaction() as run:
                self._lock(run, entries)
                for entry in entries:
                    # A savepoint only where a later statement can fail after the insert (a counter),
                    # or the insert itself (without an upsert, on a reused order_id): the check
                    # before the insert writes nothing, and an upsert of a reused order_id neither.
                    # (Left to fail without one: a decision_id, a uuid4, drawn twice. SQLite undoes
                    # just the statement; PostgreSQL fails the group, which is then spooled.)
                    undoable = bool(entry.limited) or not self._sql.upsert
                    if undoable:
                        run(self._sql.savepoint)
                    try:
                        out.append(self._record(run, entry))
                        if undoable:
                            run(self._sql.release)
                    except (CustomerMoved, OutOfStock) as failed:
                        if undoable:
                            run(self._sql.undo)
                        out.append(failed)
                    except self._dbapi.IntegrityError:
                        if undoable:
                            run(self._sql.undo)
                        out.append(retried(entry, run(self._sql.stored, oid=entry.order_id).fetchone()))
            return out
        except self._errors as exc:
            raise self._failed("write", exc) from None

    def _lock(self, run: _Run, entries: Sequence[Entry]) -> None:
        """Lock what the group will check and move, in one order every worker follows (customers,
        then counters, each sorted): concurrent groups then wait for each other instead of
        deadlocking, and no other transaction extends a customer's history between the check
        and the commit. Under READ COMMITTED each later statement sees what the waited-for
        transaction committed. SQLite's BEGIN IMMEDIATE already holds the whole database."""
        if self._sql.lock_customer is not None:
            for customer_id in sorted({entry.customer_id for entry in entries}):
                run(self._sql.lock_customer, cid=customer_id)
        if self._sql.lock_counter is not None:
            for action_id in sorted({action_id for entry in entries for action_id in entry.limited}):
                run(self._sql.lock_counter, aid=action_id)

    def _record(self, run: _Run, entry: Entry) -> Recorded | CustomerMoved | OrderConflict:
        if entry.customer_last_id is not None:
            last = run(self._sql.last_decision, cid=entry.customer_id, since=entry.since_ns).fetchone()[0] or 0
            if last != entry.customer_last_id:
                raise CustomerMoved()
        cursor = run(self._sql.insert_decision, **_row(entry))
        if self._sql.upsert:
            inserted = cursor.fetchone()
            if inserted is None:   # decided before: nothing was written
                return retried(entry, run(self._sql.stored, oid=entry.order_id).fetchone())
            row_id = inserted[0]
        else:
            row_id = cursor.fetchone()[0] if self._sql.returning else cursor.lastrowid
        for action_id in entry.limited:
            if run(self._sql.take, aid=action_id).rowcount != 1:
                raise OutOfStock(action_id)
        return Recorded(entry.response_json, int(row_id))

    # -- outcomes -------------------------------------------------------------------
    def record_outcome(self, key: str, order_id: str, type: str, ts_ns: int,
                       score: int | None = None, value: float | None = None,
                       action_id: str | None = None) -> bool:
        """Store an outcome of a decided order; False if the same outcome was stored before."""
        rows = self._fetch(self._sql.customer_of, {"oid": order_id})
        if not rows:
            raise UnknownOrder(f"order_id {order_id!r}: no decision was logged for this order")
        (customer_id,), = rows
        row = {"outcome_key": key, "order_id": order_id, "customer_id": customer_id, "type": type, "ts_ns": ts_ns,
               "score": score, "value": value, "action_id": action_id, "logged_ns": time.time_ns()}
        return self._within_deadline(self._write_worker, COMMIT_DEADLINES * self.deadline_ms,
                                     lambda: self._insert_outcome(row))

    def _insert_outcome(self, row: dict[str, Any]) -> bool:
        try:
            with self._transaction() as run:
                run(self._sql.insert_outcome, **row)
            return True
        except self._dbapi.IntegrityError:
            return False
        except self._errors as exc:
            raise self._failed("write", exc) from None

    # -- counters and control --------------------------------------------------------
    def sync_inventory(self, catalog: Catalog) -> None:
        """Align the stock and budget counters with the catalog.

        A counter restarts from zero when its action's ``stock`` or ``budget``
        changes in the catalog: the marketer's number is what is left as of
        that catalog (a recount, a new budget). An unchanged catalog (a
        retrained model, a restart, another worker) keeps the counts.
        """
        wanted = limited_actions(catalog)
        try:  # rare, and in the model-loading thread: its own connection, through SQLAlchemy
            with self._alone() as conn:
                self._sync(conn, wanted)
        except SQLAlchemyError as exc:
            raise LogUnavailable(f"decision log: cannot update stock counters ({type(exc).__name__})") from None

    @staticmethod
    def _sync(conn: sa.Connection, wanted: dict[str, Action]) -> None:
        have = {r.action_id: r for r in conn.execute(sa.select(inventory))}
        for action_id, a in wanted.items():
            row = have.get(action_id)
            limits = {"stock": a.stock, "budget": a.budget, "cost": float(a.cost)}
            where = inventory.c.action_id == action_id
            if row is None:
                conn.execute(inventory.insert(), {"action_id": action_id, **limits, "used": 0, "spent": 0.0})
            elif (row.stock, row.budget) != (a.stock, a.budget):
                conn.execute(inventory.update().where(where), {**limits, "used": 0, "spent": 0.0})
            elif row.cost != float(a.cost):
                conn.execute(inventory.update().where(where), {"cost": float(a.cost)})

    def counters(self) -> dict[str, dict[str, Any]]:
        """Stock and budget use per limited action (for operators and tests)."""
        rows = map(CounterRow._make, self._fetch(self._sql.counters, {}))
        return {r.action_id: {"stock": r.stock, "used": r.used, "budget": r.budget, "spent": r.spent} for r in rows}

    def generation(self) -> int:
        """The model generation every worker should serve (bumped by a reload request)."""
        rows = self._fetch(self._sql.generation, {})
        return int(rows[0][0]) if rows else 0

    def bump_generation(self) -> int:
        return self._within_deadline(self._write_worker, COMMIT_DEADLINES * self.deadline_ms, self._bump_generation)

    def _bump_generation(self) -> int:
        try:
            with self._transaction() as run:
                row = run(self._sql.generation).fetchone()
                if row is None:
                    run(self._sql.first_generation)
                    return 1
                generation = int(row[0]) + 1
                run(self._sql.set_generation, value=generation)
                return generation
        except self._errors as exc:
            raise self._failed("write", exc) from None

    def ping(self) -> None:
        """Raise LogUnavailable if the log cannot be read, or cannot be written since a write failed.

        A full disk or a read-only file fails every write while reads still
        work, so a read alone would call the log ready. After a failed write
        the log counts as down until a write succeeds; this retries one (a
        one-row update) so that readiness comes back without waiting for a
        decision, which would not come while the service is not ready.
        """
        self._fetch(self._sql.ping, {})
        if self._write_failed:
            self._within_deadline(self._write_worker, COMMIT_DEADLINES * self.deadline_ms, self._probe_write)

    def _probe_write(self) -> None:
        try:
            with self._transaction() as run:
                if run(self._sql.probe_write, value=int(time.time())).rowcount == 0:
                    run(self._sql.first_probe_write, value=int(time.time()))
        except self._errors as exc:
            raise self._failed("write", exc) from None

    # -- plumbing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _alone(self) -> Iterator[sa.Connection]:
        """A rare write through SQLAlchemy (tables, counters) that no other worker's runs beside:
        SQLite's BEGIN IMMEDIATE, PostgreSQL's transaction-scoped advisory lock. Workers starting
        together on a fresh database create the tables and insert the counters one after another
        instead of colliding on them, and a counter is reset at most once per catalog change."""
        with self.engine.connect() as conn:
            setup_ms = int(SETUP_DEADLINE_S * 1000)
            if self.sqlite:
                _busy_timeout(conn, setup_ms)
                conn.execution_options(insertrec_writer=True)
            try:
                with conn.begin():
                    if self.engine.dialect.name == "postgresql":
                        for name in ("lock_timeout", "statement_timeout"):
                            conn.exec_driver_sql(f"SET LOCAL {name} = {setup_ms}")
                        conn.execute(_SCHEMA_LOCK)
                    yield conn
            finally:
                if self.sqlite:
                    _busy_timeout(conn, self.deadline_ms)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Run]:
        """One write transaction on the writer: ``run(statement, **params)`` executes a prepared statement.
        SQLite's starts with BEGIN IMMEDIATE: the write lock first, so what is read inside holds."""
        with self._write_lock:
            if self._writer is None:
                self._writer = self.engine.raw_connection()
            conn = self._writer
            with self._turn:
                cursor = conn.cursor()

                def run(statement: Prepared | Raw, /, **params: Any) -> Any:
                    cursor.execute(statement.sql, statement.args(params))
                    return cursor

                try:
                    if self.sqlite:
                        cursor.execute("BEGIN IMMEDIATE")
                    yield run
                    conn.commit()
                    self._write_failed = False
                except BaseException:
                    with contextlib.suppress(*self._errors):
                        conn.rollback()
                    raise
                finally:
                    cursor.close()

    def _within_deadline(self, worker: ThreadPoolExecutor | None, deadline_ms: float, call: Callable[[], _T]) -> _T:
        """``call()``, given up with LogUnavailable after ``deadline_ms`` when the log is a server.

        A server that stops answering (stopped, cut off by the network) is not
        bounded by its own timeouts, and a blocked call would hold the worker's
        event loop, /healthz included. The call goes on in its thread and ends
        when the server answers or the connection breaks; calls queued behind
        it time out too, and are dropped before they start.
        """
        if worker is None:
            return call()
        future = worker.submit(call)
        try:
            return future.result(timeout=deadline_ms / 1000)
        except FutureTimeout:
            future.cancel()
            raise LogUnavailable(f"decision log: no answer within the deadline ({deadline_ms:.0f} ms)") from None

    def _fetch(self, statement: Prepared, params: dict[str, Any]) -> list[tuple]:
        return self._within_deadline(self._read_worker, self.deadline_ms, lambda: self._fetch_now(statement, params))

    def _fetch_now(self, statement: Prepared, params: dict[str, Any]) -> list[tuple]:
        with self._read_lock:
            try:
                if self._reader is None:
                    self._reader = self.engine.raw_connection()
                    self._read_cursor = self._reader.driver_connection.cursor()  # one cursor, reused: reads are hot
                self._read_cursor.execute(statement.sql, statement.args(params))
                rows = self._read_cursor.fetchall()
                self._reader.driver_connection.rollback()  # end the read snapshot: see other workers' commits
                return rows
            except self._errors as exc:
                raise self._failed("read", exc) from None

    def _failed(self, what: str, exc: BaseException) -> LogUnavailable:
        """Drop the connection that failed (the next call reconnects) and say why, without internals."""
        attr = "_reader" if what == "read" else "_writer"
        self._write_failed = self._write_failed or what == "write"
        with self._read_lock if what == "read" else self._write_lock:
            conn = getattr(self, attr)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.invalidate()
                setattr(self, attr, None)
        return LogUnavailable(f"decision log: {what} failed ({type(exc).__name__})")


def limited_actions(catalog: Catalog) -> dict[str, Action]:
    """Actions whose use is counted: those with stock or budget, never a slot's default (the
    control, which the policy treats as unlimited)."""
    return {a.id: a for slot in catalog.slots.values() for a in slot.actions
            if not a.default and (a.stock is not None or a.budget is not None)}


def retried(entry: Entry, stored: tuple | None) -> Recorded | CustomerMoved | OrderConflict:
    """What a second decision of an order gets: the stored answer (a `StoredRow`) if it is the
    same request."""
    if stored is None:  # not a stored order: a decision_id (uuid4) collision; deciding again draws a new one
        return CustomerMoved()
    row = StoredRow._make(stored)
    if row.customer_id != entry.customer_id:
        return OrderConflict(entry.order_id, "customer_id")
    if None not in (row.body_sha256, entry.body_sha256) and row.body_sha256 != entry.body_sha256:
        return OrderConflict(entry.order_id, "body")
    return Recorded(row.response_json, None)


def _event(row: EventRow) -> Event:
    if row.kind == 0:
        box = orjson.loads(cast(str, row.box_json))
        return Event("order", row.row_id, row.ts_ns, order=orjson.loads(cast(str, row.order_json)),
                     actions={slot: action_id for slot, (action_id, _) in box.items()})
    return Event(cast(str, row.outcome_type), row.row_id, row.ts_ns, order_id=row.order_id, value=row.value)


def _busy_timeout(conn: sa.Connection, ms: float) -> None:
    """SQLite's busy timeout, set on the driver's connection (through SQLAlchemy it would begin a transaction)."""
    driver = conn.connection.driver_connection
    assert driver is not None  # an open connection
    driver.execute(f"PRAGMA busy_timeout={int(ms)}")


def _row(entry: Entry) -> dict[str, Any]:
    return {"decision_id": entry.decision_id, "order_id": entry.order_id, "customer_id": entry.customer_id,
            "order_ts_ns": entry.order_ts_ns, "logged_ns": time.time_ns(),
            "model_version": entry.model_version, "policy": entry.policy, "order_json": entry.order_json,
            "box_json": orjson.dumps(entry.box).decode(), "response_json": entry.response_json,
            "body_sha256": entry.body_sha256}


def _sqlite_pragmas(engine: sa.Engine, synchronous: str, busy_timeout_ms: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not open transactions by itself: the writer opens them
        # with BEGIN IMMEDIATE (below) and reads run in autocommit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Turning a fresh file to WAL needs it to itself: workers starting together (and anything
        # reading it then) wait for each other within the setup deadline, not the request path's.
        # Once in WAL, which is persistent, this is a read that waits for no writer. SQLite can say
        # "locked" here without calling its busy handler (a neighbour switching the same fresh file:
        # 2 of 120 starts of eight workers), so the switch is retried until the deadline.
        cursor.execute(f"PRAGMA busy_timeout={int(SETUP_DEADLINE_S * 1000)}")
        deadline = time.monotonic() + SETUP_DEADLINE_S
        while True:
            try:
                if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in start_checkpoints' thread
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("insertrec_writer"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _add_missing_columns(conn: sa.Connection) -> None:
    """Columns added to the log after it was first created (nullable, so old rows stay valid)."""
    have = {column["name"] for column in sa.inspect(conn).get_columns(decisions.name)}
    for column in decisions.columns:
        if column.name not in have:
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {decisions.name} ADD COLUMN {column.name} {kind}")
