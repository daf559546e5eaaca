"""Batch decisions on Spark (`insertrec recommend --engine spark`) by the Engine's own batch decision.

An order's features depend on its customer's state in the model's snapshot and on that
customer's earlier orders in the same batch, and exploration is a hash of the order id: so
the orders are grouped into buckets of whole customers and `Engine.decide_batch` runs on each
bucket (``applyInPandas``), which gives each order the decision it gets from ``recommend``
on one machine. The engine is shipped to the workers once (a broadcast); the result is sorted
as the local output is (by order time, order id, then the catalog's slot order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from insertrec.engine import Engine
from insertrec.spark.tables import to_dataset

__all__ = ["DECISION_COLUMNS", "decide_batch", "recommend", "write_decisions"]

DECISION_COLUMNS = ("order_id", "slot", "action_id", "propensity", "policy")
ORDERS_PER_BUCKET = 100_000
_SCHEMA = T.StructType([T.StructField(c, T.DoubleType() if c == "propensity" else T.StringType())
                        for c in DECISION_COLUMNS]
                       + [T.StructField("_ts", T.LongType()), T.StructField("_slot", T.IntegerType())])


def decide_batch(engine: Engine, orders: DataFrame, ctx_numeric: dict[str, bool],
                 unavailable: frozenset[str] = frozenset(), orders_per_bucket: int = ORDERS_PER_BUCKET) -> DataFrame:
    """One row per order and slot, `DECISION_COLUMNS`, as `Engine.decide_batch` gives them
    (``orders`` typed as `tables.read_orders` leaves them), in the local row order."""
    buckets = max(1, -(-orders.count() // orders_per_bucket))
    shared = orders.sparkSession.sparkContext.broadcast(engine)
    slots = {name: k for k, name in enumerate(engine.policy.slot_names)}

    def run(bucket: pd.DataFrame) -> pd.DataFrame:
        batch = to_dataset({"orders": bucket}, None, ctx_numeric).orders
        out = shared.value.decide_batch(batch, unavailable)
        ts = batch["order_ts"].dt.as_unit("ns").astype(np.int64).to_numpy()
        return out.assign(_ts=np.repeat(ts, len(slots)), _slot=out["slot"].map(slots).astype(np.int32))

    return (orders.withColumn("_bucket", F.pmod(F.xxhash64("customer_id"), F.lit(buckets)))
            .groupBy("_bucket").applyInPandas(run, _SCHEMA)
            .orderBy("_ts", "order_id", "_slot").drop("_ts", "_slot"))


def write_decisions(decisions: DataFrame, out: str | Path) -> None:
    """Write ``out`` as a directory of part files, Parquet if it ends in ``.parquet``, else CSV
    with a header; the part files in name order hold the rows in order."""
    writer = decisions.write.mode("overwrite")
    if str(out).endswith(".parquet"):
        writer.parquet(str(out))
    else:
        writer.option("header", True).csv(str(out))


def recommend(model: str | Path, orders: str | Path, out: str | Path, master: str = "local[*]",
              conf: dict[str, str] | None = None) -> tuple[int, int]:
    """`insertrec recommend --engine spark`: decide every order of ``orders`` with the model
    directory ``model`` and write ``out``; returns the number of rows and of orders."""
    from insertrec.spark.session import spark_session
    from insertrec.spark.tables import read_orders

    engine = Engine.load(model)
    out = Path(out).resolve()   # the JVM would resolve a relative path against its own working directory
    spark = spark_session(master, conf)
    frame, ctx_numeric = read_orders(spark, orders)
    decisions = decide_batch(engine, frame, ctx_numeric)
    write_decisions(decisions, out)
    written = spark.read.parquet(str(out)) if str(out).endswith(".parquet") else \
        spark.read.option("header", True).csv(str(out))
    counts = written.agg(F.count("*").alias("rows"), F.countDistinct("order_id").alias("orders")).first()
    return (0, 0) if counts is None else (int(counts["rows"]), int(counts["orders"]))
