"""The decision log's tables: written by the service, read back by training.

They live below both (not in ``serving``) so that training can read what the
service logged without importing the service.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from insertrec.errors import InsertrecError

__all__ = ["LogUnavailable", "control", "decisions", "inventory", "metadata", "outcomes", "redacted",
           "tables_exist"]

metadata = sa.MetaData()
decisions = sa.Table(
    "decisions", metadata,
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
    sa.Column("body_sha256", sa.String(64)),  # the request as sent, canonical: a reused order_id must match it
    sa.Index("ix_decisions_customer", "customer_id", "id"),
)
outcomes = sa.Table(
    "outcomes", metadata,
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
    "inventory", metadata,
    sa.Column("action_id", sa.String(128), primary_key=True),
    sa.Column("stock", sa.Integer),     # units at the last catalog change (None: unlimited)
    sa.Column("budget", sa.Float),      # money at the last catalog change (None: unlimited)
    sa.Column("cost", sa.Float, nullable=False),
    sa.Column("used", sa.Integer, nullable=False),
    sa.Column("spent", sa.Float, nullable=False),
)
control = sa.Table(
    "control", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)


class LogUnavailable(InsertrecError):
    """The decision log cannot be read or written: no decision can be made durable, so none is given."""


def tables_exist(engine: sa.Engine) -> bool:
    """Whether every table of the log is there (False also when the database cannot be asked)."""
    try:
        return set(metadata.tables) <= set(sa.inspect(engine).get_table_names())
    except SQLAlchemyError:
        return False


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return repr(sa.engine.make_url(url).render_as_string(hide_password=True))
    except (sa.exc.ArgumentError, ValueError):
        return "(an unparseable URL)"
