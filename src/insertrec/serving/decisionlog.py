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
  at a time across processes), so both checks are exact; on other databases
  the counters stay exact (the conditional update is atomic) and the cap
  check is as strong as the isolation level.

Decisions are committed in groups (`DecisionLog.record_many`): one
transaction, each decision inside its own savepoint, so one decision's
conflict (stock ran out, the customer moved, the order was decided before)
undoes only that decision. A commit costs far more than the statements in
it, so a group of decisions costs little more than one. Writers of one
SQLite file take turns through an OS file lock (``<file>.writer-lock``)
before ``BEGIN IMMEDIATE``: the kernel wakes the next writer the moment the
lock is free, where SQLite's own busy handler would sleep (1, 2, 5... ms)
and retry, which under load stalls a worker's whole event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from insertrec.catalog import Action, Catalog
from insertrec.data import EXPOSURE_DTYPES, NPS_DTYPES, ORDER_DTYPES, Dataset
from insertrec.errors import DataError, InsertrecError, Problem
from insertrec.schema import MAX_CTX_FIELDS, context_problems

_md = sa.MetaData()
decisions = sa.Table(
    "decisions", _md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.String(36), nullable=False, unique=True),
    sa.Column("order_id", sa.String(128), nullable=False, unique=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("order_ts_ns", sa.BigInteger, nullable=False),
    sa.Column("logged_ns", sa.BigInteger, nullable=False),
    sa.Column("model_version", sa.String(128), nullable=False),
    sa.Column("policy", sa.String(16), nullable=False),
    sa.Column("order_json", sa.Text, nullable=False),     # the order as decided on (for state and training)
    sa.Column("box_json", sa.Text, nullable=False),       # {slot: [action_id, propensity]}
    sa.Column("response_json", sa.Text, nullable=False),  # the answer, replayed verbatim on retries
    sa.Index("ix_decisions_customer", "customer_id", "id"),
)
outcomes = sa.Table(
    "outcomes", _md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("outcome_key", sa.String(64), nullable=False, unique=True),
    sa.Column("order_id", sa.String(128), nullable=False, index=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("ts_ns", sa.BigInteger, nullable=False),
    sa.Column("score", sa.Integer),            # nps
    sa.Column("value", sa.Float),              # returned: the order's returned value so far
    sa.Column("action_id", sa.String(128)),    # redeemed: which coupon
    sa.Column("logged_ns", sa.BigInteger, nullable=False),
    sa.Index("ix_outcomes_customer", "customer_id", "id"),
)
inventory = sa.Table(
    "inventory", _md,
    sa.Column("action_id", sa.String(128), primary_key=True),
    sa.Column("stock", sa.Integer),     # units at the last catalog change (None: unlimited)
    sa.Column("budget", sa.Float),      # money at the last catalog change (None: unlimited)
    sa.Column("cost", sa.Float, nullable=False),
    sa.Column("used", sa.Integer, nullable=False),
    sa.Column("spent", sa.Float, nullable=False),
)
control = sa.Table(
    "control", _md,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)

_P = sa.bindparam
_MAX_ID = sa.select(sa.func.max(decisions.c.id)).where(decisions.c.customer_id == _P("cid"),
                                                       decisions.c.order_ts_ns >= _P("since"))
_TAKE = (inventory.update()
         .where(inventory.c.action_id == _P("aid"),
                sa.or_(inventory.c.stock.is_(None), inventory.c.used < inventory.c.stock),
                sa.or_(inventory.c.budget.is_(None),
                       inventory.c.spent + inventory.c.cost <= inventory.c.budget + 1e-9))
         .values(used=inventory.c.used + 1, spent=inventory.c.spent + inventory.c.cost))
_EXHAUSTED = sa.select(inventory.c.action_id).where(sa.or_(
    sa.and_(inventory.c.stock.is_not(None), inventory.c.used >= inventory.c.stock),
    sa.and_(inventory.c.budget.is_not(None),
            inventory.c.spent + inventory.c.cost > inventory.c.budget + 1e-9)))
_REPLAY = sa.select(decisions.c.response_json).where(decisions.c.order_id == _P("oid"))
_EVENTS = sa.union_all(
    sa.select(sa.literal(0).label("kind"), decisions.c.id, decisions.c.order_ts_ns.label("ts"),
              decisions.c.order_json.label("a"), decisions.c.box_json.label("b"),
              sa.cast(sa.null(), sa.Float).label("x"))
    .where(decisions.c.customer_id == _P("cid"), decisions.c.id > _P("after_d"),
           decisions.c.order_ts_ns >= _P("since")),
    sa.select(sa.literal(1).label("kind"), outcomes.c.id, outcomes.c.ts_ns, outcomes.c.type,
              outcomes.c.order_id, sa.func.coalesce(outcomes.c.value, outcomes.c.score))
    .where(outcomes.c.customer_id == _P("cid"), outcomes.c.id > _P("after_o"),
           outcomes.c.ts_ns >= _P("since"), sa.or_(outcomes.c.type == "nps", outcomes.c.type == "returned")),
)


class LogUnavailable(InsertrecError):
    """The decision log cannot be read or written: no decision can be made durable, so none is given."""


class UnknownOrder(InsertrecError):
    """An outcome for an order the service never decided."""


class OutOfStock(Exception):
    """An action's stock or budget ran out between choosing it and committing it."""

    def __init__(self, action_id: str):
        self.action_id = action_id
        super().__init__(action_id)


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
    or after ``since_ns``) the decision was made knowing; ``limited`` the
    chosen actions whose stock or budget is counted.
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
    customer_last_id: int = 0
    since_ns: int = -(2**63)
    limited: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recorded:
    """The response for a logged order: the new row's id, or None when the order was decided before
    and ``response_json`` is the stored answer."""

    response_json: str
    row_id: int | None


class _Prepared:
    """A Core statement compiled once for the log's dialect and run on a raw DBAPI cursor.

    SQLAlchemy's per-execution machinery costs tens of microseconds per
    statement, several times the statement itself on SQLite, and a decision
    runs four or five. Compiling once keeps the SQL portable (the dialect
    renders it and its parameter style) while the request path pays only the
    driver.
    """

    def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect, column_keys: list[str] | None = None):
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = compiled.string
        self.defaults = dict(compiled.params)
        self.order = compiled.positiontup if compiled.positional else None

    def args(self, values: dict[str, Any]) -> tuple | dict[str, Any]:
        merged = {**self.defaults, **values}
        return tuple(merged[n] for n in self.order) if self.order is not None else merged


class _Raw:
    """A statement the same in every dialect (savepoints)."""

    def __init__(self, sql: str):
        self.sql = sql

    def args(self, _: dict[str, Any]) -> tuple:
        return ()


class _WriterTurn:
    """Writers of one SQLite file, in any process, take turns: an exclusive ``flock`` held across
    the write transaction. Other databases queue writers themselves, and an in-memory SQLite has
    one process: no turn (``database`` None)."""

    def __init__(self, database: str | None):
        self.path = f"{database}.writer-lock" if database and database != ":memory:" else None
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self.path is None:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_INSERT_KEYS = ["decision_id", "order_id", "customer_id", "order_ts_ns", "logged_ns", "model_version", "policy",
                "order_json", "box_json", "response_json"]
_OUTCOME_KEYS = ["outcome_key", "order_id", "customer_id", "type", "ts_ns", "score", "value", "action_id",
                 "logged_ns"]
_GENERATION = sa.select(control.c.value).where(control.c.key == "model_generation")


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
    busy_timeout_ms : how long a SQLite writer waits for another process's transaction.
    """

    def __init__(self, url: str, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000):
        try:
            self.engine = sa.create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise LogUnavailable(f"INSERTREC_DB_URL: cannot use {redacted(url)} ({type(exc).__name__})") from None
        dialect = self.engine.dialect
        self.sqlite = dialect.name == "sqlite"
        if self.sqlite:
            _sqlite_pragmas(self.engine, synchronous.upper(), busy_timeout_ms)
        self._dbapi = dialect.loaded_dbapi
        self._errors = (SQLAlchemyError, self._dbapi.Error)
        insert = decisions.insert()
        self._returning = bool(dialect.insert_returning)
        prepare = lambda st, keys=None: _Prepared(st, dialect, keys)
        self._q = {
            "events": prepare(_EVENTS), "max_id": prepare(_MAX_ID), "take": prepare(_TAKE),
            "exhausted": prepare(_EXHAUSTED), "replay": prepare(_REPLAY),
            "insert": prepare(insert.returning(decisions.c.id) if self._returning else insert, _INSERT_KEYS),
            "customer": prepare(sa.select(decisions.c.customer_id).where(decisions.c.order_id == _P("oid"))),
            "outcome": prepare(outcomes.insert(), _OUTCOME_KEYS),
            "generation": prepare(_GENERATION),
            "set_generation": prepare(control.update().where(control.c.key == "model_generation")
                                      .values(value=_P("value"))),
            "first_generation": prepare(control.insert(), ["key", "value"]),
            "ping": prepare(sa.select(sa.literal(1))),
            "probe": prepare(control.update().where(control.c.key == "write_probe").values(value=_P("value"))),
            "savepoint": _Raw("SAVEPOINT decision"), "release": _Raw("RELEASE SAVEPOINT decision"),
            "undo": _Raw("ROLLBACK TO SAVEPOINT decision"),
            "counters": prepare(sa.select(inventory.c.action_id, inventory.c.stock, inventory.c.used,
                                          inventory.c.budget, inventory.c.spent)),
        }
        self._reader: Any = None
        self._read_cursor: Any = None
        self._writer: Any = None
        self._read_lock, self._write_lock = threading.RLock(), threading.RLock()
        self._turn = _WriterTurn(self.engine.url.database if self.sqlite else None)
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._write_failed = False   # since the last write failed, until one succeeds (see ping)

    # -- lifecycle ----------------------------------------------------------------
    def create(self) -> None:
        """Create missing tables (safe to run from every worker at once)."""
        try:
            _md.create_all(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            if not _exists(self.engine):  # another worker creating them at the same time is fine
                raise LogUnavailable(f"decision log: cannot create tables ({type(exc).__name__})") from None

    def start_checkpoints(self, every_seconds: float = 1.0, wal_limit_bytes: int = 64 << 20) -> None:
        """Move SQLite's WAL checkpoints (which fsync) to a background thread.

        A checkpoint that runs beside writers never catches up with them, and
        the WAL is only rewound once one has; under steady load it would grow
        without end (SQLite's "checkpoint starvation"). So when the WAL passes
        ``wal_limit_bytes``, the checkpoint takes the writers' turn (they wait
        a moment) and empties it.
        """
        if not self.sqlite or self._checkpointer is not None or self._turn.path is None:
            return
        wal = Path(f"{self.engine.url.database}-wal")
        turn = _WriterTurn(self.engine.url.database)   # its own descriptor: flock excludes per descriptor

        def loop() -> None:
            while not self._stop.wait(every_seconds):
                try:
                    with self.engine.connect() as conn:
                        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                        if wal.exists() and wal.stat().st_size > wal_limit_bytes:
                            with turn:
                                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                except (SQLAlchemyError, OSError):
                    pass  # the next round tries again; requests are unaffected
            turn.close()

        self._checkpointer = threading.Thread(target=loop, name="wal-checkpoint", daemon=True)
        self._checkpointer.start()

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
        with self._read_lock, self._write_lock:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    conn.close()
            self._reader = self._writer = None
        self._turn.close()
        self.engine.dispose()

    # -- decisions ------------------------------------------------------------------
    def events(self, customer_id: str, since_ns: int, after_decision: int = 0,
               after_outcome: int = 0) -> list[Event]:
        """The customer's logged orders, NPS answers and returns at or after ``since_ns``,
        newer than the given row ids, in row order: what a snapshot has not seen."""
        rows = self._fetch("events", {"cid": customer_id, "since": since_ns, "after_d": after_decision,
                                      "after_o": after_outcome})
        out = []
        for kind, row_id, ts, a, b, x in sorted(rows, key=lambda r: (r[0], r[1])):
            if kind == 0:
                box = orjson.loads(b)
                out.append(Event("order", row_id, ts, order=orjson.loads(a),
                                 actions={s: v[0] for s, v in box.items()}))
            else:
                out.append(Event(a, row_id, ts, order_id=b, value=x))
        return out

    def exhausted(self) -> set[str]:
        """Actions whose stock or budget is used up."""
        return {r[0] for r in self._fetch("exhausted", {})}

    def replay(self, order_id: str) -> str | None:
        """The stored response for an order already decided."""
        rows = self._fetch("replay", {"oid": order_id})
        return rows[0][0] if rows else None

    def record_many(self, entries: Sequence[Entry]) -> list[Recorded | CustomerMoved | OutOfStock]:
        """Commit decisions in one transaction; per entry, what became of it.

        An entry fails alone, leaving nothing written: CustomerMoved if the
        customer has a decision newer than ``customer_last_id`` (an earlier
        entry of the same group counts), OutOfStock if one of its ``limited``
        actions ran out. An order decided before gives its stored response
        (``row_id`` None). Raises LogUnavailable, for all, if the log fails.
        """
        out: list[Recorded | CustomerMoved | OutOfStock] = []
        try:
            with self._transaction() as run:
                for entry in entries:
                    run("savepoint", {})
                    try:
                        out.append(self._record(run, entry))
                        run("release", {})
                    except (CustomerMoved, OutOfStock) as failed:
                        run("undo", {})
                        out.append(failed)
                    except self._dbapi.IntegrityError:
                        run("undo", {})
                        stored = run("replay", {"oid": entry.order_id}).fetchone()
                        # no stored order: a decision_id (uuid4) collision; deciding again draws a new one
                        out.append(Recorded(stored[0], None) if stored else CustomerMoved())
            return out
        except self._errors as exc:
            raise self._failed("write", exc) from None

    def _record(self, run: Callable[[str, dict[str, Any]], Any], entry: Entry) -> Recorded:
        last = run("max_id", {"cid": entry.customer_id, "since": entry.since_ns}).fetchone()[0] or 0
        if last != entry.customer_last_id:
            raise CustomerMoved()
        cursor = run("insert", _row(entry))
        row_id = cursor.fetchone()[0] if self._returning else cursor.lastrowid
        for action_id in entry.limited:
            if run("take", {"aid": action_id}).rowcount != 1:
                raise OutOfStock(action_id)
        return Recorded(entry.response_json, int(row_id))

    # -- outcomes -------------------------------------------------------------------
    def record_outcome(self, key: str, order_id: str, type: str, ts_ns: int,
                       score: int | None = None, value: float | None = None,
                       action_id: str | None = None) -> bool:
        """Store an outcome of a decided order; False if the same outcome was stored before."""
        rows = self._fetch("customer", {"oid": order_id})
        if not rows:
            raise UnknownOrder(f"order_id {order_id!r}: no decision was logged for this order")
        try:
            with self._transaction() as run:
                run("outcome", {"outcome_key": key, "order_id": order_id, "customer_id": rows[0][0],
                                "type": type, "ts_ns": ts_ns, "score": score, "value": value,
                                "action_id": action_id, "logged_ns": time.time_ns()})
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
            with self.engine.connect() as conn:
                if self.sqlite:
                    conn.execution_options(insertrec_writer=True)
                with conn.begin():
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
        return {a: {"stock": stock, "used": used, "budget": budget, "spent": spent}
                for a, stock, used, budget, spent in self._fetch("counters", {})}

    def generation(self) -> int:
        """The model generation every worker should serve (bumped by a reload request)."""
        rows = self._fetch("generation", {})
        return int(rows[0][0]) if rows else 0

    def bump_generation(self) -> int:
        try:
            with self._transaction() as run:
                row = run("generation", {}).fetchone()
                if row is None:
                    run("first_generation", {"key": "model_generation", "value": 1})
                    return 1
                run("set_generation", {"value": int(row[0]) + 1})
                return int(row[0]) + 1
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
        self._fetch("ping", {})
        if not self._write_failed:
            return
        try:
            with self._transaction() as run:
                if run("probe", {"value": int(time.time())}).rowcount == 0:
                    run("first_generation", {"key": "write_probe", "value": int(time.time())})
        except self._errors as exc:
            raise self._failed("write", exc) from None

    # -- plumbing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Callable[[str, dict[str, Any]], Any]]:
        """One write transaction on the writer: ``run(name, params)`` executes a prepared statement.
        SQLite's starts with BEGIN IMMEDIATE: the write lock first, so what is read inside holds."""
        with self._write_lock:
            if self._writer is None:
                self._writer = self.engine.raw_connection()
            conn = self._writer
            cursor = conn.cursor()

            def run(name: str, params: dict[str, Any]) -> Any:
                q = self._q[name]
                cursor.execute(q.sql, q.args(params))
                return cursor

            with self._turn:
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

    def _fetch(self, name: str, params: dict[str, Any]) -> list[tuple]:
        with self._read_lock:
            try:
                if self._reader is None:
                    self._reader = self.engine.raw_connection()
                    self._read_cursor = self._reader.driver_connection.cursor()  # one cursor, reused: reads are hot
                q = self._q[name]
                self._read_cursor.execute(q.sql, q.args(params))
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


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return repr(sa.engine.make_url(url).render_as_string(hide_password=True))
    except (sa.exc.ArgumentError, ValueError):
        return "(an unparseable URL)"


def _row(entry: Entry) -> dict[str, Any]:
    return {"decision_id": entry.decision_id, "order_id": entry.order_id, "customer_id": entry.customer_id,
            "order_ts_ns": entry.order_ts_ns, "logged_ns": time.time_ns(),
            "model_version": entry.model_version, "policy": entry.policy, "order_json": entry.order_json,
            "box_json": orjson.dumps(entry.box).decode(), "response_json": entry.response_json}


def _sqlite_pragmas(engine: sa.Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not open transactions by itself: the writer opens them
        # with BEGIN IMMEDIATE (below) and reads run in autocommit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in start_checkpoints' thread
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("insertrec_writer"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _exists(engine: sa.Engine) -> bool:
    try:
        return set(_md.tables) <= set(sa.inspect(engine).get_table_names())
    except SQLAlchemyError:
        return False


# -- reading the log back for training ------------------------------------------------

def read_logged(url: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The log as input tables: (orders, exposures, nps), with the dtypes of `insertrec.data`.

    ``orders`` are the decided orders with the returned value last reported
    for each; ``exposures`` one row per order and slot with the propensity the
    serving policy logged (``reward`` NaN: derived by training); ``nps`` the
    answers posted as outcomes.
    """
    log = DecisionLog(url)
    try:
        with log.engine.connect() as conn:
            if not _exists(log.engine):
                raise LogUnavailable(f"{redacted(url)}: not an insertrec decision log")
            d = pd.read_sql(sa.select(decisions.c.order_id, decisions.c.order_json, decisions.c.box_json)
                            .order_by(decisions.c.id), conn)
            o = pd.read_sql(sa.select(outcomes.c.order_id, outcomes.c.customer_id, outcomes.c.type,
                                      outcomes.c.ts_ns, outcomes.c.score, outcomes.c.value)
                            .where(outcomes.c.type.in_(("nps", "returned")))
                            .order_by(outcomes.c.ts_ns, outcomes.c.id), conn)
    except SQLAlchemyError as exc:
        raise LogUnavailable(f"decision log {redacted(url)}: cannot read ({type(exc).__name__})") from None
    finally:
        log.close()
    return _orders_frame(d, o, f"decision log {redacted(url)}"), _exposures_frame(d), _nps_frame(o)


def merge_logged(data: Dataset, url: str) -> Dataset:
    """``data`` plus what the service decided: logged orders the shop's export lacks, and the
    logged exposures (with their propensities) in place of the export's for the same orders."""
    orders, exposures, nps = read_logged(url)
    new_orders = orders[~orders["order_id"].isin(data.orders["order_id"])]
    merged_orders = (pd.concat([data.orders, new_orders], ignore_index=True)
                     .sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True))
    _refuse_bad_context(merged_orders.columns, f"{data.source or 'the data'} with decision log {redacted(url)}")
    kept = data.exposures[~data.exposures["order_id"].isin(exposures["order_id"])]
    merged_nps = pd.concat([data.nps, nps], ignore_index=True).drop_duplicates(ignore_index=True)
    return replace(data, orders=merged_orders,
                   exposures=pd.concat([kept, exposures], ignore_index=True).astype(EXPOSURE_DTYPES),
                   nps=merged_nps.astype(NPS_DTYPES))


def _refuse_bad_context(columns: Iterable[str], source: str) -> None:
    """Logged ctx_* fields obey the orders file's bounds, or training is refused (none is dropped)."""
    problems = context_problems(columns)
    if problems:
        raise DataError([Problem(source, None, name, reason) for name, reason in problems])


def _orders_frame(d: pd.DataFrame, o: pd.DataFrame, source: str) -> pd.DataFrame:
    records = [json.loads(s) for s in d["order_json"]]
    ctx_names: set[str] = set()
    for record in records:   # checked before a frame is built: its columns are the union of all names
        ctx_names.update(k for k in record if k.startswith("ctx_"))
        if len(ctx_names) > MAX_CTX_FIELDS:
            break
    _refuse_bad_context(sorted(ctx_names), source)
    raw = pd.DataFrame(records, columns=None)
    if raw.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in ORDER_DTYPES.items()})
    returned = o[o["type"] == "returned"].groupby("order_id")["value"].last()
    defaults = {"n_items": 1.0, "channel": "unknown", "categories": "", "is_gift": False,
                "returned_value": 0.0, "region": "unknown"}
    for column, default in defaults.items():
        raw[column] = raw[column].fillna(default) if column in raw else default
    raw["returned_value"] = raw["order_id"].map(returned).fillna(raw["returned_value"]).astype(float)
    raw["order_ts"] = pd.to_datetime(raw["order_ts"], utc=True, format="ISO8601")
    ctx = sorted(c for c in raw.columns if c.startswith("ctx_"))
    out = raw[list(ORDER_DTYPES) + ctx].astype(ORDER_DTYPES)
    return out.sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True)


def _exposures_frame(d: pd.DataFrame) -> pd.DataFrame:
    rows: Iterable[tuple[str, str, str, float]] = (
        (order_id, slot, action_id, propensity)
        for order_id, box in zip(d["order_id"], d["box_json"])
        for slot, (action_id, propensity) in json.loads(box).items())
    out = pd.DataFrame(list(rows), columns=["order_id", "slot", "action_id", "propensity"])
    out["reward"] = np.nan
    return out.astype(EXPOSURE_DTYPES)


def _nps_frame(o: pd.DataFrame) -> pd.DataFrame:
    nps = o[o["type"] == "nps"]
    return pd.DataFrame({"customer_id": nps["customer_id"].astype(str),
                         "response_ts": pd.to_datetime(nps["ts_ns"].astype("int64"), unit="ns", utc=True),
                         "score": nps["score"].astype("int64")}).reset_index(drop=True).astype(NPS_DTYPES)
