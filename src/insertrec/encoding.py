"""Order features -> a numeric matrix, identically for a batch and for one order.

The value model is linear in this encoding so that one order can be scored in
microseconds; the non-linearity lives here (log scales, missing indicators,
one-hot categories) and in the interaction features the policy adds on top.
The single-order path (`transform_one`) works on a plain dict and never
touches pandas: an HTTP request's whole budget is a fraction of a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from insertrec.schema import FEATURES

__all__ = ["DEFAULT_EXCLUDE_PREFIXES", "FeatureEncoder"]

# Not model inputs: identifiers, timestamps, and the raw category set (its
# information reaches the model through main_category).
_EXCLUDED = {"order_id", "customer_id", "order_ts", "categories"}
# Left out by default: the value model multiplies every input by every action,
# so each input costs ~15 parameters; per-action history and mix shares add
# many inputs and, on the simulated worlds, no decision quality.
DEFAULT_EXCLUDE_PREFIXES = ("received_", "days_since_", "cat_share_", "channel_share_")
# Heavy-tailed counts and amounts are modelled on a log scale.
_LOG_PREFIXES = ("order_value", "monetary", "total_spend", "prior_orders", "recency_days",
                 "tenure_days", "days_since_", "received_", "n_items", "incidents_")


@dataclass(frozen=True)
class _Numeric:
    name: str
    log: bool
    fill: float      # value used when missing (the training median, after the log)
    mean: float
    scale: float
    has_missing: bool


@dataclass(frozen=True)
class _Categorical:
    name: str
    values: tuple[str, ...]   # kept levels; anything else is "other"


def _is_log(name: str) -> bool:
    return name.startswith(_LOG_PREFIXES)


def _categorical_columns(frame: pd.DataFrame) -> list[str]:
    out = []
    for col in frame.columns:
        if col in _EXCLUDED:
            continue
        kind = FEATURES.get(col)
        if kind == "category" or (kind is None and not (pd.api.types.is_numeric_dtype(frame[col])
                                                        or pd.api.types.is_bool_dtype(frame[col]))):
            out.append(col)
    return out


class FeatureEncoder:
    """Fit on a training frame of order features; transform batches or single orders.

    Parameters
    ----------
    max_levels : int
        Most frequent levels kept per categorical column; the rest share "other".
    min_count : int
        A level seen fewer times than this in training is "other": a one-hot
        column that fired for three orders only teaches the model noise.
    exclude_prefixes : tuple of str
        Feature columns starting with these are not encoded.
    """

    def __init__(self, max_levels: int = 12, min_count: int = 20,
                 exclude_prefixes: tuple[str, ...] = DEFAULT_EXCLUDE_PREFIXES):
        self.max_levels = max_levels
        self.min_count = min_count
        self.exclude_prefixes = exclude_prefixes

    def fit(self, frame: pd.DataFrame) -> FeatureEncoder:
        frame = frame[[c for c in frame.columns if not c.startswith(self.exclude_prefixes)]]
        cats = _categorical_columns(frame)
        self.categoricals_: list[_Categorical] = []
        for col in cats:
            counts = frame[col].astype("string").fillna("unknown").value_counts()
            kept = counts[counts >= self.min_count].index[: self.max_levels]
            self.categoricals_.append(_Categorical(col, tuple(str(v) for v in kept)))
        self.numerics_: list[_Numeric] = []
        seen_missing: set[bytes] = set()  # one indicator per distinct missingness pattern
        for col in frame.columns:
            if col in _EXCLUDED or col in cats:
                continue
            raw = pd.to_numeric(frame[col], errors="coerce").astype("float64").to_numpy()
            log = _is_log(col)
            vals = np.sign(raw) * np.log1p(np.abs(raw)) if log else raw
            finite = vals[np.isfinite(vals)]
            if finite.size == 0:
                continue
            fill = float(np.median(finite))
            filled = np.where(np.isfinite(vals), vals, fill)
            scale = float(filled.std()) or 1.0
            missing = ~np.isfinite(vals)
            pattern = np.packbits(missing).tobytes()
            flag = bool(missing.any()) and pattern not in seen_missing
            seen_missing.add(pattern)
            self.numerics_.append(_Numeric(col, log, fill, float(filled.mean()), scale, flag))
        names = ["intercept"]
        for n in self.numerics_:
            names.append(n.name)
            if n.has_missing:
                names.append(f"{n.name}=missing")
        for c in self.categoricals_:
            names.extend(f"{c.name}={v}" for v in c.values)
            names.append(f"{c.name}=other")
        self.feature_names_: list[str] = names
        self._index = {c.name: {v: i for i, v in enumerate(c.values)} for c in self.categoricals_}
        return self

    @property
    def n_features_(self) -> int:
        return len(self.feature_names_)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode a frame of order features (missing columns count as missing values)."""
        n = len(frame)
        out = np.zeros((n, self.n_features_))
        out[:, 0] = 1.0
        i = 1
        for spec in self.numerics_:
            col = frame[spec.name] if spec.name in frame else pd.Series(np.nan, index=frame.index)
            raw = pd.to_numeric(col, errors="coerce").astype("float64").to_numpy()
            vals = np.sign(raw) * np.log1p(np.abs(raw)) if spec.log else raw
            missing = ~np.isfinite(vals)
            out[:, i] = (np.where(missing, spec.fill, vals) - spec.mean) / spec.scale
            i += 1
            if spec.has_missing:
                out[:, i] = missing
                i += 1
        rows = np.arange(n)
        for cat in self.categoricals_:
            other = len(cat.values)
            if cat.name in frame:
                # few distinct values per column: look each up once, as transform_one does
                codes, uniques = pd.factorize(frame[cat.name])
                index = self._index[cat.name]
                level = np.array([index.get(str(u), other) for u in uniques] + [index.get("unknown", other)])
                codes = level[codes]   # factorize marks missing values -1: the last entry, "unknown"
            else:
                codes = np.full(n, self._index[cat.name].get("unknown", other))
            out[rows, i + codes] = 1.0
            i += other + 1
        return out

    def transform_one(self, record: dict[str, Any]) -> np.ndarray:
        """Encode one order given as a dict: the serving path, no pandas."""
        return np.array(self._row(record))

    def transform_many(self, records: list[dict[str, Any]]) -> np.ndarray:
        """(n, n_features): `transform_one` of each order, row for row to the bit, in one array."""
        return np.array([self._row(record) for record in records]).reshape(len(records), self.n_features_)

    @cached_property
    def _plan(self) -> tuple[tuple[tuple[str, bool, float, float, float, bool], ...],
                             tuple[tuple[str, dict[str, int], int], ...]]:
        """The fitted specs as plain tuples: `_row` runs per request, attribute look-ups add up."""
        return (tuple((n.name, n.log, n.fill, n.mean, n.scale, n.has_missing) for n in self.numerics_),
                tuple((c.name, self._index[c.name], len(c.values) + 1) for c in self.categoricals_))

    def _row(self, record: dict[str, Any]) -> list[float]:
        """One order's encoding as Python floats (the same IEEE arithmetic `transform` does)."""
        numerics, categoricals = self._plan
        out = [1.0]
        for name, log, fill, mean, scale, has_missing in numerics:
            raw = record.get(name)
            try:
                v = float(raw)  # type: ignore[arg-type]  # None and junk fall to NaN below
            except (TypeError, ValueError):
                v = math.nan
            if log and math.isfinite(v):
                v = math.copysign(math.log1p(abs(v)), v)
            missing = not math.isfinite(v)
            out.append(((fill if missing else v) - mean) / scale)
            if has_missing:
                out.append(1.0 if missing else 0.0)
        for name, index, width in categoricals:
            raw = record.get(name)
            key = "unknown" if raw is None or (isinstance(raw, float) and math.isnan(raw)) else str(raw)
            hot = [0.0] * width
            hot[index.get(key, width - 1)] = 1.0
            out.extend(hot)
        return out
