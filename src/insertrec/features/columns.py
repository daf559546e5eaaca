"""Input columns as arrays: timestamps as UTC nanoseconds, strings as Arrow, numbers and flags.

A ``Dataset`` from ``data.load_data`` arrives typed and validated (refusals by
file line there), so on it these conversions refuse nothing. They refuse only
frames built in code (a ``Dataset(orders=frame)`` of a caller or a test), where
no file lines exist: a problem names row ``i`` as line ``i + 2``, the line it
would have in a CSV written with a header.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from insertrec.errors import DataError, InsertrecError, Problem

DAY_NS = 86_400 * 10**9
_NO_TS = int(np.iinfo(np.int64).min)   # "no such event"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ns(column: pd.Series, file: str, name: str) -> np.ndarray:
    """UTC nanoseconds since the epoch; unparseable or missing values are refused by line."""
    ts = pd.Series(pd.to_datetime(column, utc=True, format="ISO8601", errors="coerce"))
    bad = np.flatnonzero(ts.isna().to_numpy())
    if len(bad):
        raise DataError([Problem(file, int(i) + 2, name, "missing or not an ISO 8601 timestamp",
                                 str(column.iloc[i])) for i in bad[:20]])
    return ts.dt.as_unit("ns").to_numpy(dtype=np.int64)


def _ns_scalar(value: Any, name: str = "order_ts") -> int:
    """One timestamp (tz-aware datetime, ISO string, pandas Timestamp) as UTC nanoseconds;
    naive ones are UTC. Plain Python: the service calls this once per request."""
    if isinstance(value, pd.Timestamp):
        return int(value.value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InsertrecError(f"{name}: not an ISO 8601 timestamp (got {value!r})") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        d = value - _EPOCH
        return (d.days * 86_400 + d.seconds) * 10**9 + d.microseconds * 1000
    if isinstance(value, np.datetime64):
        return int(value.astype("datetime64[ns]").astype(np.int64))
    raise InsertrecError(f"{name}: expected a timestamp (got {value!r})")


def _datetime(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _arrow(values: pd.Series | np.ndarray | pa.Array) -> pa.Array:
    """Strings as one Arrow array: pandas' default ``str`` columns convert without copying,
    and Arrow's kernels split, look up and encode a million strings in milliseconds."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values
    else:
        series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
        arr = pa.array(series.astype("str"))
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return arr.cast(pa.large_string())


def _strings(frame: pd.DataFrame, name: str, default: str) -> pa.Array:
    if name not in frame:
        return pa.array(np.full(len(frame), default, dtype=object), type=pa.large_string())
    return pc.fill_null(_arrow(frame[name]), default)


def _lookup(values: pa.Array, vocabulary: pa.Array | tuple[str, ...] | np.ndarray) -> np.ndarray:
    """Position of each value in ``vocabulary`` (unique), -1 when absent."""
    vocab = _arrow(pa.array(list(vocabulary), type=pa.large_string())
                   if not isinstance(vocabulary, pa.Array) else vocabulary)
    return pc.index_in(values, value_set=vocab).fill_null(-1).to_numpy().astype(np.int64)


def _factorize(values: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Codes in order of first appearance, and the distinct values."""
    encoded = pc.dictionary_encode(values)
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary


def _number_column(frame: pd.DataFrame, name: str, default: float, file: str) -> np.ndarray:
    if name not in frame:
        return np.full(len(frame), default)
    raw = frame[name]
    values = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() & raw.notna().to_numpy())
    if len(bad):
        raise DataError([Problem(file, int(i) + 2, name, "not a number", str(raw.iloc[i])) for i in bad[:20]])
    return values.fillna(default).to_numpy(dtype=np.float64)


def _flag_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame:
        return np.zeros(len(frame), dtype=bool)
    col = frame[name]
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(dtype=np.float64, na_value=0.0) != 0
    return col.astype(str).str.strip().str.lower().isin(("true", "1", "yes", "y", "t")).to_numpy()


def _str_column(arr: pa.Array) -> pd.Series:
    return pd.Series(pd.array(arr, dtype="str"))


def _take(vocabulary: tuple[str, ...] | np.ndarray | pa.Array, codes: np.ndarray) -> pd.Series:
    """Strings from a small vocabulary by code (-1: the last one), as a ``str`` column without
    a Python string per row."""
    vocab = vocabulary if isinstance(vocabulary, pa.Array) else pa.array(list(vocabulary), type=pa.large_string())
    return _str_column(vocab.take(pa.array(np.where(codes < 0, len(vocab) + codes, codes))))


def _order_ranks(ts: np.ndarray, ids: pa.Array) -> np.ndarray:
    """Rank of each order by (order_ts, order_id): sort by time, then only the ties by id."""
    order = np.argsort(ts, kind="stable")
    sts = ts[order]
    tied = np.r_[False, sts[1:] == sts[:-1]] | np.r_[sts[1:] == sts[:-1], False]
    if tied.any():
        sub = order[tied]
        id_rank = np.empty(len(sub), dtype=np.int64)
        id_rank[pc.array_sort_indices(ids.take(pa.array(sub))).to_numpy()] = np.arange(len(sub))
        order[tied] = sub[np.lexsort((id_rank, ts[sub]))]
    rank = np.empty(len(ts), dtype=np.int64)
    rank[order] = np.arange(len(ts))
    return rank


__all__ = ["DAY_NS"]
