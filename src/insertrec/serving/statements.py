"""The decision log's statements, each compiled once for the log's dialect and named for what it does.

SQLAlchemy's per-execution machinery costs tens of microseconds per
statement, several times the statement itself on SQLite, and a decision runs
four or five. Compiling once keeps the SQL portable (the dialect renders it
and its parameter style) while the request path pays only the driver.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from insertrec.logschema import control, decisions, inventory, outcomes

__all__ = ["CounterRow", "EventRow", "Prepared", "Raw", "Statements", "StoredRow"]

_P = sa.bindparam
_UPSERT: dict[str, Any] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class Prepared:
    """A Core statement compiled for one dialect, run on a raw DBAPI cursor."""

    def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect, column_keys: list[str] | None = None):
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=column_keys))
        self.sql = compiled.string
        self.defaults = dict(compiled.params)
        self.order = compiled.positiontup if compiled.positional else None

    def args(self, values: dict[str, Any]) -> tuple | dict[str, Any]:
        """The driver's parameters for ``values`` (by name or by position, as the dialect wants)."""
        merged = {**self.defaults, **values}
        return tuple(merged[n] for n in self.order) if self.order is not None else merged


class Raw:
    """A statement the same in every dialect (savepoints)."""

    def __init__(self, sql: str):
        self.sql = sql

    def args(self, _: dict[str, Any]) -> tuple:
        return ()


class EventRow(NamedTuple):
    """A row of `Statements.events`: a decided order (``kind`` 0) or an outcome (``kind`` 1)."""

    kind: int
    row_id: int
    ts_ns: int
    order_json: str | None     # a decision's
    box_json: str | None       # a decision's
    outcome_type: str | None   # an outcome's: "nps" or "returned"
    order_id: str | None       # an outcome's
    value: float | None        # an outcome's: the NPS score or the returned value
    customer_id: str


class StoredRow(NamedTuple):
    """A row of `Statements.stored`."""

    response_json: str
    customer_id: str
    body_sha256: str | None   # None: logged before bodies were fingerprinted


class CounterRow(NamedTuple):
    """A row of `Statements.counters`."""

    action_id: str
    stock: int | None
    used: int
    budget: float | None
    spent: float


DECISION_KEYS = ["decision_id", "order_id", "customer_id", "order_ts_ns", "logged_ns", "model_version", "policy",
                 "order_json", "box_json", "response_json", "body_sha256"]
OUTCOME_KEYS = ["outcome_key", "order_id", "customer_id", "type", "ts_ns", "score", "value", "action_id",
                "logged_ns"]


def _events(of_customer: bool) -> sa.CompoundSelect:
    text_null, float_null = sa.cast(sa.null(), sa.Text), sa.cast(sa.null(), sa.Float)
    customer = (decisions.c.customer_id == _P("cid"),) if of_customer else ()
    outcome_customer = (outcomes.c.customer_id == _P("cid"),) if of_customer else ()
    return sa.union_all(
        sa.select(sa.literal(0).label("kind"), decisions.c.id.label("row_id"),
                  decisions.c.order_ts_ns.label("ts_ns"), decisions.c.order_json, decisions.c.box_json,
                  text_null.label("outcome_type"), text_null.label("order_id"), float_null.label("value"),
                  decisions.c.customer_id)
        .where(*customer, decisions.c.id > _P("after_d"), decisions.c.order_ts_ns >= _P("since")),
        sa.select(sa.literal(1), outcomes.c.id, outcomes.c.ts_ns, text_null, text_null, outcomes.c.type,
                  outcomes.c.order_id, sa.func.coalesce(outcomes.c.value, outcomes.c.score), outcomes.c.customer_id)
        .where(*outcome_customer, outcomes.c.id > _P("after_o"), outcomes.c.ts_ns >= _P("since"),
               sa.or_(outcomes.c.type == "nps", outcomes.c.type == "returned")),
    )


def _customer_lock() -> sa.Select:
    """PostgreSQL's transaction-scoped advisory lock on the customer id's 64-bit hash. Two customers
    with one hash only wait for each other; no row is needed, so a customer's first order locks too."""
    key = sa.func.hashtextextended(_P("cid", type_=sa.Text), sa.literal_column("0"))
    return sa.select(sa.func.pg_advisory_xact_lock(key))


def _within_limits() -> sa.ColumnElement[bool]:
    return sa.and_(sa.or_(inventory.c.stock.is_(None), inventory.c.used < inventory.c.stock),
                   sa.or_(inventory.c.budget.is_(None),
                          inventory.c.spent + inventory.c.cost <= inventory.c.budget + 1e-9))


class Statements:
    """Every statement the log runs on its request path, compiled for ``dialect``.

    Parameters are passed by name: ``cid`` a customer id, ``since`` the
    model's snapshot end (ns), ``oid`` an order id, ``aid`` an action id.
    """

    def __init__(self, dialect: sa.Dialect):
        def prepare(statement: sa.ClauseElement, keys: list[str] | None = None) -> Prepared:
            return Prepared(statement, dialect, keys)

        self.returning = bool(dialect.insert_returning)
        insert = decisions.insert()
        #: whether `insert_decision` stores nothing (and returns no row) for an order decided before,
        #: instead of failing on its unique ``order_id``: no savepoint is needed to go on after it
        self.upsert = dialect.name in _UPSERT and self.returning
        if self.upsert:
            insert = _UPSERT[dialect.name](decisions).on_conflict_do_nothing(index_elements=["order_id"])
        #: the customer's events (``EventRow``) at or after ``since``, newer than ``after_d``/``after_o``
        self.events = prepare(_events(of_customer=True))
        #: every customer's events (``EventRow``) at or after ``since``, newer than ``after_d``/``after_o``
        self.tail = prepare(_events(of_customer=False))
        #: the newest decision and outcome row ids
        self.newest = prepare(sa.select(sa.select(sa.func.max(decisions.c.id)).scalar_subquery(),
                                        sa.select(sa.func.max(outcomes.c.id)).scalar_subquery()))
        #: the customer's newest decision row of an order at or after ``since``
        self.last_decision = prepare(sa.select(sa.func.max(decisions.c.id))
                                     .where(decisions.c.customer_id == _P("cid"),
                                            decisions.c.order_ts_ns >= _P("since")))
        #: one unit of ``aid`` (and its cost), if stock and budget allow: rowcount 1 when taken
        self.take = prepare(inventory.update().where(inventory.c.action_id == _P("aid"), _within_limits())
                            .values(used=inventory.c.used + 1, spent=inventory.c.spent + inventory.c.cost))
        #: action ids whose stock or budget is used up
        self.exhausted = prepare(sa.select(inventory.c.action_id).where(sa.not_(_within_limits())))
        #: what a retry of order ``oid`` is compared with, as a ``StoredRow``
        self.stored = prepare(sa.select(decisions.c.response_json, decisions.c.customer_id, decisions.c.body_sha256)
                              .where(decisions.c.order_id == _P("oid")))
        #: a new decision (returns its row id where the dialect can; see ``upsert``)
        self.insert_decision = prepare(insert.returning(decisions.c.id) if self.returning else insert,
                                       DECISION_KEYS)
        #: the customer of order ``oid``
        self.customer_of = prepare(sa.select(decisions.c.customer_id).where(decisions.c.order_id == _P("oid")))
        self.insert_outcome = prepare(outcomes.insert(), OUTCOME_KEYS)
        #: the model generation every worker should serve
        self.generation = prepare(sa.select(control.c.value).where(control.c.key == "model_generation"))
        self.set_generation = prepare(control.update().where(control.c.key == "model_generation")
                                      .values(value=_P("value")))
        self.first_generation = prepare(control.insert().values(key="model_generation", value=1))
        self.ping = prepare(sa.select(sa.literal(1)))
        #: a one-row write that proves the log can be written again after a failed write
        self.probe_write = prepare(control.update().where(control.c.key == "write_probe").values(value=_P("value")))
        self.first_probe_write = prepare(control.insert().values(key="write_probe", value=_P("value")))
        #: every counter as a ``CounterRow``
        self.counters = prepare(sa.select(inventory.c.action_id, inventory.c.stock, inventory.c.used,
                                          inventory.c.budget, inventory.c.spent))
        #: wait for, and hold until commit, the right to check and extend customer ``cid``'s history
        #: (None: the database holds one writer at a time anyway, as SQLite's BEGIN IMMEDIATE does)
        self.lock_customer = prepare(_customer_lock()) if dialect.name == "postgresql" else None
        #: wait for, and hold until commit, the counter row of action ``aid``
        self.lock_counter = None if dialect.name == "sqlite" else prepare(
            sa.select(inventory.c.action_id).where(inventory.c.action_id == _P("aid")).with_for_update())
        self.savepoint = Raw("SAVEPOINT decision")
        self.release = Raw("RELEASE SAVEPOINT decision")
        self.undo = Raw("ROLLBACK TO SAVEPOINT decision")
