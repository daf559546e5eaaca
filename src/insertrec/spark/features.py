"""Feature parameters from Spark aggregations; features and rewards from the project's own code.

A customer's point-in-time features depend only on that customer's own orders, exposures, NPS
answers and incidents, so the tables are grouped by a hash of the customer id into buckets of
whole customers and `insertrec.features.order_features` / `order_rewards` run on each bucket
as they run on a whole shop (``applyInPandas``): one implementation, the same numbers. Two
things are global and are computed on Spark first: the `FeatureParams` (vocabularies by
frequency) and the last order's timestamp, which decides whether an order's reward window is
censored (passed to each bucket as a stand-in order of a customer of its own, which adds
nothing to anyone's revenue).

Rows come back with ``order_ts`` as int64 UTC nanoseconds, as `tables` keeps it;
`to_pandas` turns a result into the local frames, in the local row order.
"""

from __future__ import annotations

import pickle
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from insertrec import features
from insertrec.catalog import Catalog
from insertrec.data import Dataset
from insertrec.errors import InsertrecError
from insertrec.evaluation import logged_actions, rules_actions
from insertrec.spark.tables import POSITION, TIMESTAMPS, SparkTables, to_dataset

__all__ = ["REWARD_COLUMNS", "SCRATCH_CONF", "feature_params", "features_and_rewards", "local_types", "logged_columns",
           "scratch_dir", "snapshot", "snapshot_and", "to_pandas"]

REWARD_COLUMNS = ("revenue", "action_cost", "reward", "reward_complete")
ORDERS_PER_BUCKET = 100_000   # bounds a Python worker's memory: one bucket is one pandas frame
SCRATCH_CONF = "spark.insertrec.scratchDir"   # see `scratch_dir`
_TAG = "_table"
_LAST = "\x00last order"      # the stand-in order's ids: no real id is a NUL
_LOGGED = "_logged_"          # `logged_columns`' prefix


def feature_params(tables: SparkTables, catalog: Catalog | None = None, top_categories: int = 12,
                   top_channels: int = 12, **overrides: Any) -> features.FeatureParams:
    """`FeatureParams.fit`'s parameters, counted on Spark: a category counts once per order that
    has it, a channel once per order; most frequent first, ties by name (as ``fit`` ranks)."""
    orders = tables.orders
    catalog = tables.catalog if catalog is None else catalog
    cats = (orders.select("order_id", F.explode(F.split(F.coalesce("categories", F.lit("")), r"\|", -1)).alias("v"))
            .distinct().groupBy("v").count().collect())
    chans = orders.groupBy(F.coalesce("channel", F.lit("unknown")).alias("v")).count().collect()

    def ranked(rows: list, top: int) -> tuple[str, ...]:
        return tuple(v for _, v in sorted((-r["count"], r["v"]) for r in rows if r["v"])[:top])

    found: dict[str, Any] = {"categories": ranked(cats, top_categories), "channels": ranked(chans, top_channels),
                             "ctx_columns": tuple(tables.ctx_numeric)}
    if catalog is not None:
        found["action_ids"] = tuple(a for slot in catalog.slots.values() for a in slot.action_ids)
        found["cap_windows"] = catalog.cap_windows()
    return features.FeatureParams(**(found | overrides))


def features_and_rewards(tables: SparkTables, params: features.FeatureParams, *, horizon_days: float = 60,
                         costs: Mapping[str, float] | None = None,
                         orders_per_bucket: int = ORDERS_PER_BUCKET, logged: bool = False) -> DataFrame:
    """One row per order: `features.order_features` columns and `REWARD_COLUMNS`, each computed
    by the local code on a bucket of whole customers (see the module docstring). With ``logged``
    (the tables have a catalog), also per catalog slot ``s`` the logged action's index and
    propensity (`evaluation.logged_actions`) and the playbook's action (`evaluation.rules_actions`):
    `logged_columns`."""
    totals = tables.orders.agg(F.count("*").alias("n"), F.max("order_ts").alias("last")).first()
    n_orders, last = (0, None) if totals is None else (totals["n"], totals["last"])
    if logged and tables.catalog is None:
        raise InsertrecError("features_and_rewards: the logged actions need the data directory's catalog.yaml")
    slots = len(tables.catalog.slots) if logged and tables.catalog is not None else 0
    schema = _schema(params, tables, slots)
    run = _bucket_runner(params, tables.catalog, tables.ctx_numeric, int(last or 0), horizon_days,
                         dict(costs or {}), [f.name for f in schema.fields], slots)
    return _bucketed(tables, int(n_orders), orders_per_bucket).groupBy("_bucket").applyInPandas(run, schema)


def snapshot(tables: SparkTables, params: features.FeatureParams, as_of: pd.Timestamp,
             orders_per_bucket: int = ORDERS_PER_BUCKET) -> features.Snapshot:
    """`features.Snapshot.build(history, params, as_of)`: one snapshot per bucket of whole
    customers, built by the local code, written to Parquet, read back on the driver one bucket
    at a time and joined (`Snapshot.concat`); the driver holds the snapshot (the model's), never
    the history."""
    return snapshot_and(tables, params, as_of, None, orders_per_bucket)[0]


def snapshot_and(tables: SparkTables, params: features.FeatureParams, as_of: pd.Timestamp,
                 describe: Callable[[features.Snapshot], pd.DataFrame] | None,
                 orders_per_bucket: int = ORDERS_PER_BUCKET) -> tuple[features.Snapshot, pd.DataFrame | None]:
    """`snapshot`, and ``describe`` run on each bucket's snapshot (one row per customer, a
    ``customer_id`` column): its rows for every customer, in the snapshot's customer order."""
    catalog, ctx_numeric = tables.catalog, tables.ctx_numeric   # the closure must not hold a DataFrame

    def run(bucket: pd.DataFrame) -> pd.DataFrame:
        part = features.Snapshot.build(_bucket_data(bucket, catalog, ctx_numeric), params, as_of=as_of)
        rows = None if describe is None else describe(part)
        return pd.DataFrame({"snapshot": [pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)],
                             "rows": [pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)]})

    n_orders = tables.orders.count()
    schema = T.StructType([T.StructField("snapshot", T.BinaryType()), T.StructField("rows", T.BinaryType())])
    # one bucket per task (not spark.sql.shuffle.partitions' few): a task's output stays one bucket's
    parts = (_bucketed(tables, n_orders, orders_per_bucket)
             .repartition(_bucket_count(tables.orders, n_orders, orders_per_bucket), "_bucket")
             .groupBy("_bucket").applyInPandas(run, schema))
    found, described = [], []
    for snap, rows in _written_and_read(parts):
        found.append(pickle.loads(snap))
        described.append(pickle.loads(rows))
    if not found:   # no events at all: the empty shop's snapshot
        empty = features.Snapshot.build(to_dataset({}, tables.catalog, tables.ctx_numeric), params, as_of=as_of)
        return empty, None if describe is None else describe(empty)
    joined = features.Snapshot.concat(found)
    del found
    if describe is None:
        return joined, None
    rows = pd.concat(described, ignore_index=True)
    order = pc.array_sort_indices(pa.array(rows["customer_id"].astype(str), type=pa.large_string())).to_numpy()
    return joined, rows.iloc[order].reset_index(drop=True)


def _written_and_read(parts: DataFrame) -> Iterator[tuple[bytes, bytes]]:
    """``parts``' rows (one bucket's snapshot and described rows each), written to Parquet by the
    executors in `scratch_dir` and read back here one row at a time: the driver's JVM never holds
    a result (serving partitions with ``toLocalIterator``, it materialised a whole partition of
    snapshots in its heap and ran out of it at 10M orders), and its Python process one bucket's
    bytes beyond what it keeps. The directory is removed afterwards."""
    base = scratch_dir(parts.sparkSession)
    where = f"{base.rstrip('/')}/insertrec-snapshot-{uuid.uuid4().hex}"
    fs, path = pafs.FileSystem.from_uri(where if "://" in where else Path(where).resolve().as_uri())
    try:
        parts.write.parquet(where)
        files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path))
                       if f.is_file and f.base_name.endswith(".parquet"))
        for name in files:
            with fs.open_input_file(name) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=1, columns=["snapshot", "rows"]):
                    yield from zip(batch.column("snapshot").to_pylist(), batch.column("rows").to_pylist(),
                                   strict=True)
    finally:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def scratch_dir(spark: SparkSession) -> str:
    """Where the snapshot pass writes its buckets: ``spark.insertrec.scratchDir`` (a directory
    every executor and the driver reach, e.g. ``s3://bucket/tmp`` or ``hdfs:///tmp``); on a
    local master, the driver's temporary directory unless that is set."""
    given = spark.conf.get(SCRATCH_CONF, None)
    if given:
        return given
    master = str(spark.sparkContext.master)
    if master.startswith("local"):
        return tempfile.gettempdir()
    raise InsertrecError(f"--spark-conf {SCRATCH_CONF}=DIR is needed on master {master!r}: "
                         "the model's snapshot is written there per customer bucket, a directory the driver "
                         "and every executor can reach (e.g. s3://bucket/tmp, hdfs:///tmp)")


def _bucketed(tables: SparkTables, n_orders: int, orders_per_bucket: int) -> DataFrame:
    """The tables' rows side by side (``_TAG`` names the table), each with its customer's bucket
    (``_bucket``): every event of a customer in the same bucket, about ``orders_per_bucket``
    orders in each."""
    orders = tables.orders
    buckets = _bucket_count(orders, n_orders, orders_per_bucket)
    owner = orders.select("order_id", "customer_id")
    parts: dict[str, DataFrame] = {"orders": orders}
    if tables.exposures is not None:   # file order kept: the first reward given per order counts
        parts["exposures"] = tables.exposures.join(owner, "order_id")
    for name in ("nps", "incidents"):
        side = tables.table(name)
        if side is not None:
            parts[name] = side
    wide = None
    for name, frame in parts.items():
        tagged = frame.withColumn(_TAG, F.lit(name))
        wide = tagged if wide is None else wide.unionByName(tagged, allowMissingColumns=True)
    assert wide is not None
    # no nulls in whole-number columns: Arrow would hand them over as float64, losing nanoseconds
    fill: dict[str, bool | float | int | str] = {f.name: 0 for f in wide.schema.fields if isinstance(f.dataType, T.LongType)}
    fill |= {f.name: False for f in wide.schema.fields if isinstance(f.dataType, T.BooleanType)}
    return wide.fillna(fill).withColumn("_bucket", F.pmod(F.xxhash64("customer_id"), F.lit(buckets)))


def _bucket_count(orders: DataFrame, n_orders: int, orders_per_bucket: int) -> int:
    # at least two buckets per core, so that a small history is not one task on one core
    return max(2 * orders.sparkSession.sparkContext.defaultParallelism, -(-n_orders // orders_per_bucket))


def _bucket_data(bucket: pd.DataFrame, catalog: Catalog | None, ctx_numeric: dict[str, bool]) -> Dataset:
    """One bucket of `_bucketed` rows as the local ``Dataset`` of its customers."""
    frames = {str(name): part for name, part in bucket.groupby(_TAG, sort=False)}
    if "exposures" in frames:
        frames["exposures"] = frames["exposures"].sort_values(POSITION, kind="stable")
    return to_dataset(frames, catalog, ctx_numeric)


def logged_columns(slots: int) -> tuple[list[str], list[str], list[str]]:
    """The columns `features_and_rewards` adds with ``logged``, per slot: the logged action's
    index (-1: none logged), its propensity (NaN: none given), the playbook's action index."""
    return ([f"{_LOGGED}action{s}" for s in range(slots)], [f"{_LOGGED}propensity{s}" for s in range(slots)],
            [f"{_LOGGED}rules{s}" for s in range(slots)])


def _schema(params: features.FeatureParams, tables: SparkTables, slots: int) -> T.StructType:
    empty = to_dataset({}, None, tables.ctx_numeric)
    frame = features.order_features(empty, params)
    out = []
    for name, dtype in frame.dtypes.items():
        name = str(name)
        if name in tables.ctx_numeric:
            kind: T.DataType = T.DoubleType() if tables.ctx_numeric[name] else T.StringType()
        elif name == "order_ts":
            kind = T.LongType()
        elif pd.api.types.is_bool_dtype(dtype):
            kind = T.BooleanType()
        elif pd.api.types.is_numeric_dtype(dtype):
            kind = T.DoubleType()
        else:
            kind = T.StringType()
        out.append(T.StructField(name, kind))
    out += [T.StructField(c, T.BooleanType() if c == "reward_complete" else T.DoubleType()) for c in REWARD_COLUMNS]
    actions, pscores, rules = logged_columns(slots)
    out += [T.StructField(c, T.LongType()) for c in actions] + [T.StructField(c, T.DoubleType()) for c in pscores]
    out += [T.StructField(c, T.LongType()) for c in rules]
    return T.StructType(out)


def _bucket_runner(params: features.FeatureParams, catalog: Catalog | None, ctx_numeric: dict[str, bool],
                   last_ns: int, horizon_days: float, costs: dict[str, float], columns: list[str], slots: int):
    def run(bucket: pd.DataFrame) -> pd.DataFrame:
        data = _bucket_data(bucket, catalog, ctx_numeric)
        feats = features.order_features(data, params)
        stand_in = pd.DataFrame({"order_id": [_LAST], "customer_id": [_LAST],
                                 "order_ts": [pd.Timestamp(last_ns, unit="ns", tz="UTC")],
                                 "order_value": [0.0], "returned_value": [0.0]})
        with_last = Dataset(orders=pd.concat([data.orders, stand_in.astype(data.orders.dtypes[stand_in.columns])],
                                             ignore_index=True), exposures=data.exposures)
        rewards = features.order_rewards(with_last, horizon_days=horizon_days, costs=costs).iloc[:len(data.orders)]
        out = feats.assign(**{c: rewards[c].to_numpy() for c in REWARD_COLUMNS})
        if slots and catalog is not None:
            actions, pscores = logged_actions(data, feats, catalog)
            given = (actions, pscores, rules_actions(catalog, feats))
            out = out.assign(**{c: v[:, s] for names, v in zip(logged_columns(slots), given, strict=True)
                                for s, c in enumerate(names)})
        out["order_ts"] = out["order_ts"].dt.as_unit("ns").astype(np.int64)
        return out[columns]
    return run


def local_types(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of a `features_and_rewards` result as pandas got them, with the local types (order
    times as UTC timestamps)."""
    return rows.assign(**{c: pd.to_datetime(rows[c].to_numpy(dtype=np.int64), unit="ns", utc=True)
                          for c in TIMESTAMPS["orders"] if c in rows})


def to_pandas(frame: DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A `features_and_rewards` result as the local ``(order_features, order_rewards)`` frames,
    rows in the local order (by order time, then order id)."""
    frame = frame.drop(*(c for c in frame.columns if c.startswith(_LOGGED)))
    out = local_types(frame.toPandas().sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True))
    feats = out.drop(columns=list(REWARD_COLUMNS))
    return feats, out[["order_id", *REWARD_COLUMNS]]
