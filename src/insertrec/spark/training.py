"""`insertrec train --engine spark`: `insertrec.training.train` with its heavy steps on Spark.

The orchestration is the local `train`'s own. The driver holds a bounded history: a sample of
whole customers (those whose hashed id falls in a share of the hash range, about
``sample_orders`` orders; every customer when the history has no more). When it holds every
customer, the history is trained as the local path trains it, with the local `Computation` on
the driver's tables: Spark has read and checked them, and a Spark pass over a history the driver
already holds (features, fingerprint) only repeats the local code's work at a cost (at 1M orders
the features took 221 s on Spark against 25 s on the driver, the fingerprint 140 s against
10 s). Otherwise `train` fits on the sample what the local path already fits
on bounded samples or per customer (the repurchase classifier, the segments, the boosted
baseline's rows, the tournament's candidates (the ridge's too), the holdout's judge and OPE, the exploration
advice's gains, the report's figures). What grows with the whole history is computed on Spark
over all of it (`SparkComputation`): the cutoff's last order and the orders per month (Spark
aggregates), the feature parameters (Spark aggregations), every order's features and reward
(the project's feature code on buckets of whole customers, `spark.features`, kept on Spark; the
sample's rows collected), the model's snapshot of every customer and every customer's segment
(one snapshot per bucket, each bucket's customers scored by the repurchase and segment models
fitted on the sample, joined on the driver), the data fingerprint (hashed by partition), and
the final ridge value model over every logged order from per-partition sufficient statistics
(`spark.statistics`), each partition encoding its own orders' design rows from those features. The model directory is the
local one's format, so serving, MLflow and ``promote`` do not change.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from insertrec import features
from insertrec.catalog import Catalog
from insertrec.data import Dataset
from insertrec.encoding import FeatureEncoder
from insertrec.errors import InsertrecError
from insertrec.explorationshare import monthly_orders
from insertrec.spark.features import (
    feature_params,
    features_and_rewards,
    local_types,
    logged_columns,
    snapshot_and,
    to_pandas,
)
from insertrec.spark.session import spark_session
from insertrec.spark.statistics import fit_value_model
from insertrec.spark.tables import POSITION, SparkTables, fingerprint, read_tables, to_dataset
from insertrec.training import Computation, TrainConfig, TrainResult, train
from insertrec.valuemodel import ActionSpace, ValueModel

__all__ = ["SAMPLE_ORDERS", "SparkComputation", "train_on_spark"]


SAMPLE_ORDERS = 1_000_000   # orders of the driver's sample of whole customers (issue 13: 1M trains in ~3.3 GiB)
_HASH_RANGE = 1 << 20        # a customer is sampled by its id's hash modulo this
_ROWS_PER_RANGE = 50_000     # `_numbered`: rows of one range of order time, numbered in one task


@dataclasses.dataclass(frozen=True)
class SparkComputation(Computation):
    """`Computation` on Spark over the whole of the checked ``tables``; ``sampled`` is the
    condition on ``customer_id`` that picks the driver's sample of them."""

    tables: SparkTables
    sampled: Column = dataclasses.field(compare=False)
    held: dict[str, DataFrame] = dataclasses.field(default_factory=dict, compare=False)

    def _before(self, cutoff: pd.Timestamp) -> SparkTables:
        """The tables as known at ``cutoff`` (`training.history_before` on Spark)."""
        t, ns = self.tables, int(cutoff.value)
        orders = t.orders.where(F.col("order_ts") < ns)
        return dataclasses.replace(
            t, orders=orders,
            nps=None if t.nps is None else t.nps.where(F.col("response_ts") < ns),
            incidents=None if t.incidents is None else t.incidents.where(F.col("ts") < ns),
            exposures=None if t.exposures is None else t.exposures.join(orders.select("order_id"), "order_id",
                                                                        "left_semi"))

    def last_order(self, data: Dataset) -> pd.Timestamp:
        last = self.tables.orders.agg(F.max("order_ts")).first()
        return super().last_order(data) if last is None or last[0] is None else _time(last[0])

    def feature_params(self, history: Dataset, cutoff: pd.Timestamp, catalog: Catalog | None,
                       nps_ttl_days: int, lapse_days: int) -> features.FeatureParams:
        return feature_params(self._before(cutoff), catalog, nps_ttl_days=nps_ttl_days, lapse_days=lapse_days)

    def everyone(self, history: Dataset, cutoff: pd.Timestamp, snapshot: features.Snapshot, segments: pd.DataFrame,
                 segments_of: Callable[[features.Snapshot], pd.DataFrame]) -> tuple[features.Snapshot, pd.DataFrame]:
        """Built per bucket on Spark. `train` asks last, after the value model's fits: the
        features held on Spark are released first, so that the driver's heap serves the buckets'
        snapshots (at 10M orders, a 4g heap holding them ran out serving one)."""
        held = self.held.pop("features", None)
        if held is not None:
            held.unpersist()
        joined, rows = snapshot_and(self._before(cutoff), snapshot.params, cutoff, segments_of)
        assert rows is not None
        return joined, rows

    def fingerprint(self, history: Dataset, cutoff: pd.Timestamp) -> str:
        return fingerprint(self._before(cutoff))

    def orders_per_month(self, history: Dataset, cutoff: pd.Timestamp) -> float:
        got = self._before(cutoff).orders.agg(F.count("*"), F.min("order_ts"), F.max("order_ts")).first()
        assert got is not None
        return monthly_orders(int(got[0]), _time(got[1]), _time(got[2]))

    def features_and_rewards(self, history: Dataset, cutoff: pd.Timestamp, params: features.FeatureParams,
                             horizon_days: int, costs: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Every order's on Spark, the sample's collected; all of them are kept on Spark for
        `refit_value_model`."""
        rows = features_and_rewards(self._before(cutoff), params, horizon_days=horizon_days, costs=costs,
                                    logged=self.tables.catalog is not None)
        self.held["features"] = rows.cache()
        return to_pandas(rows.where(self.sampled))

    def refit_value_model(self, model: ValueModel, feats: pd.DataFrame, encoder: FeatureEncoder, actions: np.ndarray,
                          rewards: np.ndarray, space: ActionSpace, rules: np.ndarray,
                          pscore: np.ndarray) -> ValueModel:
        """On every logged order of the whole history (the driver's arrays are the sample's): the
        orders with an exposure in every slot and a complete reward window, numbered in the local
        order (`evaluation.logged_orders` on the whole), their logged actions, propensities and the
        playbook's actions computed with the features on Spark. Where a logged propensity is
        missing, `evaluation.logged_orders` estimates it with a model of the whole log, which this
        does not fit: the sample's orders, with the driver's estimates, are the fit's then. The
        value model's other fits are of orders the driver holds, and fitted there: shipping their
        features' design rows to Spark cost 5 to 10 times the fit (measured on 245k orders)."""
        taken, pscores, playbook = logged_columns(actions.shape[1])
        held = self.held["features"]
        complete = functools.reduce(operator.and_, [F.col(c) >= 0 for c in taken], F.col("reward_complete"))
        logged = held.where(complete)
        unknown = functools.reduce(operator.or_, [F.isnan(c) | F.col(c).isNull() for c in pscores])
        if logged.where(unknown).limit(1).count():
            return super().refit_value_model(model, feats, encoder, actions, rewards, space, rules, pscore)
        rows = (_numbered(logged)
                .withColumn("pscore", functools.reduce(operator.mul, [F.col(c) for c in pscores]))
                .withColumn("actions", F.array(*taken)).withColumn("rules", F.array(*playbook))
                .drop(*taken, *pscores, *playbook, "revenue", "action_cost", "reward_complete")
                .cache())   # joined once, read three times
        try:
            return fit_value_model(model, rows, space, (encoder, local_types))
        finally:
            rows.unpersist()


def _numbered(rows: DataFrame) -> DataFrame:
    """``rows`` with ``_row``, each one's position in the local order (by order time, then order
    id: the value model's folds and samples are drawn by position), without one task sorting
    every row (a window over the whole history has no partition key): the rows are cut into
    ranges of order time of about `_ROWS_PER_RANGE` rows on average, each range's rows counted
    (the counts, a few numbers, give each range's first position), and numbered within their
    range by a window partitioned by it."""
    got = rows.agg(F.count("*"), F.min("order_ts"), F.max("order_ts")).first()
    assert got is not None
    n, low = int(got[0]), int(got[1] or 0)
    ranges = max(1, -(-n // _ROWS_PER_RANGE))
    width = (int(got[2] or 0) - low + 1) / ranges
    # floor((t - low) / width) is non-decreasing in t (so is rounding to a double): ranges keep the order
    cut = rows.withColumn("_range", F.least(F.floor((F.col("order_ts") - low).cast("double") / width),
                                            F.lit(ranges - 1)).cast("long"))
    counts = np.array(sorted((int(r[0]), int(r[1])) for r in cut.groupBy("_range").count().collect()),
                      dtype=np.int64).reshape(-1, 2)
    firsts = pd.DataFrame({"_range": counts[:, 0], "_first": np.cumsum(counts[:, 1]) - counts[:, 1]})
    within = F.row_number().over(Window.partitionBy("_range").orderBy("order_ts", "order_id"))
    return (cut.join(F.broadcast(rows.sparkSession.createDataFrame(firsts, "_range long, _first long")), "_range")
            .withColumn("_row", F.col("_first") + within - 1).drop("_range", "_first"))


def _collected(frame: DataFrame | None) -> pd.DataFrame | None:
    """A checked table on the driver, its rows in file order (as the local loader keeps them)."""
    if frame is None:
        return None
    out = frame.toPandas()
    return out.sort_values(POSITION, kind="stable").drop(columns=POSITION).reset_index(drop=True)


def _time(ns: int) -> pd.Timestamp:
    return pd.Timestamp(int(ns), unit="ns", tz="UTC")


def _sample(tables: SparkTables, sample_orders: int) -> Column | None:
    """The condition on ``customer_id`` that keeps about ``sample_orders`` orders of whole
    customers (their hashed ids in the lowest share of the hash range); None when every order fits."""
    n = tables.orders.count()
    if n <= sample_orders:
        return None
    keep = max(1, int(_HASH_RANGE * sample_orders / n))
    return F.pmod(F.xxhash64("customer_id"), F.lit(_HASH_RANGE)) < keep


def _sampled(tables: SparkTables, sampled: Column | None) -> SparkTables:
    """The tables of the sampled customers (every table's rows of them)."""
    if sampled is None:
        return tables
    orders = tables.orders.where(sampled)
    return dataclasses.replace(
        tables, orders=orders,
        nps=None if tables.nps is None else tables.nps.where(sampled),
        incidents=None if tables.incidents is None else tables.incidents.where(sampled),
        exposures=None if tables.exposures is None else tables.exposures.join(orders.select("order_id"), "order_id",
                                                                              "left_semi"))


def train_on_spark(data: str | Path, out: str | Path, config: TrainConfig | None = None, *,
                   master: str = "local[*]", conf: Mapping[str, str] | None = None,
                   progress: Callable[[str], None] = lambda step: None,
                   sample_orders: int = SAMPLE_ORDERS) -> TrainResult:
    """Read and check ``data`` on Spark and train as `insertrec.training.train` does (see the
    module docstring); the same model directory."""
    if sample_orders < 1:
        raise InsertrecError(f"sample_orders: {sample_orders} is not a positive number of orders")
    progress("starting Spark")
    spark = spark_session(master, conf)
    progress("reading the data on Spark")
    tables = read_tables(spark, data)
    progress("collecting the driver's sample of customers")
    sampled = _sample(tables, sample_orders)
    on_driver = _sampled(tables, sampled)
    frames = {name: _collected(on_driver.table(name)) for name in ("orders", "nps", "exposures", "incidents")}
    history = to_dataset({n: f for n, f in frames.items() if f is not None}, tables.catalog, tables.ctx_numeric,
                         source=str(data))
    del frames
    computation = Computation() if sampled is None else SparkComputation(tables, sampled)
    return train(history, out, config or TrainConfig(), progress, computation)
