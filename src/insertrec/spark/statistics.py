"""The value model fitted on Spark: per-partition sufficient statistics, summed on the driver.

`insertrec.valuemodel.ValueModel` is a ridge fit from per-fold statistics (X^T W X, X^T W y,
y^T W y), which are sums over rows: each partition computes its own with
`valuemodel.FoldStatistics.of` (the local code, per box, without the design matrix) and the
driver adds them up and solves with `ValueModel.fit_statistics`. The boosted baseline, a
nuisance, learns on the driver from the same bounded samples of rows as the local fit
(`ValueModel.offset_rows`), and its fold models are shipped to the partitions to make the
offsets. Rows are identified by their position in the local row order (``_row``), so that the
cross-validation folds, the samples and therefore the coefficients are the local ones. Given the
`FeatureEncoder`, the rows carry the order features instead of the design row ``phi``, and each
partition encodes its own (a design row is ~100 doubles: shipping it would cost more than the fit).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from insertrec.encoding import FeatureEncoder
from insertrec.errors import InsertrecError
from insertrec.valuemodel import ActionSpace, FoldStatistics, ValueModel

__all__ = ["ROW_COLUMNS", "fit_value_model"]

ROW_COLUMNS = ("_row", "phi", "actions", "rules", "reward", "pscore")
_STATS = T.StructType([T.StructField("stats", T.BinaryType())])


def fit_value_model(model: ValueModel, rows: DataFrame, space: ActionSpace,
                    encoder: tuple[FeatureEncoder, Callable[[pd.DataFrame], pd.DataFrame]] | None = None
                    ) -> ValueModel:
    """``model`` fitted on ``rows`` (`ROW_COLUMNS`: ``_row`` the position 0..n-1 in the local
    order, ``phi`` an array of doubles, ``actions``/``rules`` arrays of action indices per
    slot, ``reward``, ``pscore`` the joint logged propensity); equal to ``model.fit`` on the
    same rows in that order, up to the order of floating-point sums. With ``encoder`` (the
    fitted encoder, and the function that gives a batch of rows the local features' types), the
    rows carry the order features instead of ``phi``, encoded where they are."""
    needed = [c for c in ROW_COLUMNS if c != "phi" or encoder is None]
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise InsertrecError(f"value model rows: columns missing: {', '.join(missing)}")
    checked = rows.agg(F.count("*"), F.min("_row"), F.max("_row"), F.countDistinct("_row"),
                       F.avg(1.0 / F.col("pscore"))).first()
    n = 0 if checked is None else int(checked[0])
    if n == 0:
        raise InsertrecError("value model fit: no logged rows")
    if tuple(checked)[1:4] != (0, n - 1, n):   # type: ignore[arg-type]
        raise InsertrecError(f"value model rows: _row must number the {n} rows 0..{n - 1}, each once")

    def design(batch: pd.DataFrame) -> np.ndarray:
        if encoder is None:
            return np.stack(list(batch["phi"])).astype(np.float64)
        return encoder[0].transform(encoder[1](batch))

    spark = rows.sparkSession
    fold = model.folds_of(n).astype(np.int8)
    model.offset_ = []
    if model.boosted_baseline:
        samples = model.offset_rows(fold)
        wanted = np.unique(np.concatenate(samples))
        keys = spark.createDataFrame(pd.DataFrame({"_row": wanted.astype(np.int64)}))
        got = rows.join(F.broadcast(keys), "_row").toPandas()
        got = got.set_index("_row", drop=False).loc[wanted]
        phi = design(got)
        reward = got["reward"].to_numpy(dtype=np.float64)
        model.fit_offset([(phi[at], reward[at]) for at in (np.searchsorted(wanted, s) for s in samples)])
    mean_inverse = None if model.max_weight is None else float(checked[4])   # type: ignore[index]
    shared = spark.sparkContext.broadcast((fold, model, mean_inverse))

    def partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        fold, model, mean_inverse = shared.value
        total = None
        for batch in batches:
            phi = design(batch)
            f = fold[batch["_row"].to_numpy(dtype=np.int64)].astype(np.int64)
            rewards = batch["reward"].to_numpy(dtype=np.float64)
            target = rewards - model.fold_offset(phi, f) if model.offset_ else rewards
            w = model.importance_weights(batch["pscore"].to_numpy(dtype=np.float64), mean_inverse)
            stats = FoldStatistics.of(phi, np.stack(list(batch["actions"])).astype(np.int64),
                                      np.stack(list(batch["rules"])).astype(np.int64), rewards, target,
                                      np.ones(len(rewards)) if w is None else w, space, f, model.folds)
            total = stats if total is None else total + stats
        if total is not None:
            yield pd.DataFrame({"stats": [pickle.dumps(total)]})

    parts = rows.mapInPandas(partition, _STATS).collect()
    stats = [pickle.loads(r["stats"]) for r in parts]
    summed = stats[0]
    for more in stats[1:]:
        summed = summed + more
    return model.fit_statistics(summed, space)
