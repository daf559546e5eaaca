"""`insertrec train --engine spark`: `insertrec.training.train` with its heavy steps on Spark.

The orchestration is the local `train`'s own; what it computes on Spark (`SparkComputation`):
the feature parameters from Spark aggregations, every order's features and reward from the
project's feature code on buckets of whole customers (`spark.features`), kept on Spark, the
model's snapshot of every customer at the cutoff (one per bucket, joined on the driver), the
data fingerprint (hashed by partition), and the ridge value model from per-partition sufficient
statistics (`spark.statistics`), each partition encoding its own orders' design rows from those
features (the driver sends only each logged order's position, actions, reward and propensity).
The rest runs on the driver as it does locally, on the samples the local path already bounds
(the repurchase classifier, the boosted baseline's rows, the holdout judge) and on the checked
tables collected there (the repurchase frames, the logged orders, the segments, the report):
so the driver still holds the whole history, which bounds the history this path can train on
(issue 13: a 10M-order history does not fit). The model directory is the local one's format,
so serving, MLflow and ``promote`` do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from insertrec import features
from insertrec.catalog import Catalog
from insertrec.data import Dataset
from insertrec.encoding import FeatureEncoder
from insertrec.spark.features import (
    REWARD_COLUMNS,
    feature_params,
    features_and_rewards,
    local_types,
    snapshot,
    to_pandas,
)
from insertrec.spark.session import spark_session
from insertrec.spark.statistics import fit_value_model
from insertrec.spark.tables import POSITION, SparkTables, fingerprint, read_tables, to_dataset
from insertrec.training import Computation, TrainConfig, TrainResult, train
from insertrec.valuemodel import ActionSpace, ValueModel

__all__ = ["SparkComputation", "train_on_spark"]


@dataclasses.dataclass(frozen=True)
class SparkComputation(Computation):
    """`Computation` on Spark, from the checked ``tables`` of the data directory."""

    tables: SparkTables
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

    def feature_params(self, history: Dataset, cutoff: pd.Timestamp, catalog: Catalog | None,
                       nps_ttl_days: int, lapse_days: int) -> features.FeatureParams:
        return feature_params(self._before(cutoff), catalog, nps_ttl_days=nps_ttl_days, lapse_days=lapse_days)

    def snapshot(self, history: Dataset, cutoff: pd.Timestamp, params: features.FeatureParams) -> features.Snapshot:
        return snapshot(self._before(cutoff), params, cutoff)

    def fingerprint(self, history: Dataset, cutoff: pd.Timestamp) -> str:
        return fingerprint(self._before(cutoff))

    def features_and_rewards(self, history: Dataset, cutoff: pd.Timestamp, params: features.FeatureParams,
                             horizon_days: int, costs: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
        rows = features_and_rewards(self._before(cutoff), params, horizon_days=horizon_days, costs=costs).cache()
        self.held["features"] = rows   # kept on Spark: the value model's design rows are built from them
        return to_pandas(rows)

    def fit_value_model(self, model: ValueModel, feats: pd.DataFrame, encoder: FeatureEncoder, actions: np.ndarray,
                        rewards: np.ndarray, space: ActionSpace, rules: np.ndarray, pscore: np.ndarray) -> ValueModel:
        """The orders' features are joined on Spark (by order id) to what the driver knows of each
        logged order (its position, actions, reward and propensity: a few numbers), and encoded there."""
        spark = self.tables.orders.sparkSession
        slots = range(actions.shape[1])
        known = pd.DataFrame({"order_id": feats["order_id"].astype(str).to_numpy(), "_row": np.arange(len(feats)),
                              "reward": np.asarray(rewards, dtype=np.float64),
                              "pscore": np.asarray(pscore, dtype=np.float64)}
                             | {f"_a{s}": actions[:, s].astype(np.int64) for s in slots}
                             | {f"_r{s}": rules[:, s].astype(np.int64) for s in slots})
        rows = (self.held["features"].drop(*REWARD_COLUMNS).join(spark.createDataFrame(known), "order_id")
                .withColumn("actions", F.array(*(F.col(f"_a{s}") for s in slots)))
                .withColumn("rules", F.array(*(F.col(f"_r{s}") for s in slots)))
                .drop(*(f"_{k}{s}" for k in "ar" for s in slots))).cache()   # joined once, read three times
        try:
            return fit_value_model(model, rows, space, (encoder, local_types))
        finally:
            rows.unpersist()


def _collected(frame: DataFrame | None) -> pd.DataFrame | None:
    """A checked table on the driver, its rows in file order (as the local loader keeps them)."""
    if frame is None:
        return None
    out = frame.toPandas()
    return out.sort_values(POSITION, kind="stable").drop(columns=POSITION).reset_index(drop=True)


def train_on_spark(data: str | Path, out: str | Path, config: TrainConfig | None = None, *,
                   master: str = "local[*]", conf: Mapping[str, str] | None = None,
                   progress: Callable[[str], None] = lambda step: None) -> TrainResult:
    """Read and check ``data`` on Spark and train as `insertrec.training.train` does (see the
    module docstring); the same model directory."""
    progress("starting Spark")
    spark = spark_session(master, conf)
    progress("reading the data on Spark")
    tables = read_tables(spark, data)
    progress("collecting the tables to the driver")
    frames = {name: _collected(tables.table(name)) for name in ("orders", "nps", "exposures", "incidents")}
    history = to_dataset({n: f for n, f in frames.items() if f is not None}, tables.catalog, tables.ctx_numeric,
                         source=str(data))
    return train(history, out, config or TrainConfig(), progress, SparkComputation(tables))
