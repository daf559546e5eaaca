"""Reading the decision log back as training data: what the service decided, with its propensities.

Training and the CLI read the log here, through its tables alone
(`insertrec.logschema`), never through the service that wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from insertrec.data import EXPOSURE_DTYPES, NPS_DTYPES, ORDER_DTYPES, Dataset
from insertrec.errors import DataError, Problem
from insertrec.logschema import LogUnavailable, decisions, outcomes, redacted, tables_exist
from insertrec.schema import MAX_CTX_FIELDS, context_problems

__all__ = ["merge_logged", "read_logged"]


def read_logged(url: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The log as input tables: (orders, exposures, nps), with the dtypes of `insertrec.data`.

    ``orders`` are the decided orders with the returned value last reported
    for each; ``exposures`` one row per order and slot with the propensity the
    serving policy logged (``reward`` NaN: derived by training); ``nps`` the
    answers posted as outcomes.
    """
    try:
        engine = sa.create_engine(url)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise LogUnavailable(f"cannot use {redacted(url)} ({type(exc).__name__})") from None
    try:
        with engine.connect() as conn:
            if not tables_exist(engine):
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
        engine.dispose()
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
    defaults: dict[str, Any] = {"n_items": 1.0, "channel": "unknown", "categories": "", "is_gift": False,
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
