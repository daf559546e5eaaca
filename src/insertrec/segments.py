"""Customer segments a marketer can act on: k groups, each with a name in plain words.

The clustering space is deliberately small and behavioural (spend, frequency,
recency, tenure, returns, NPS, lapse, repurchase propensity) so that the
groups differ in ways a marketer recognises, and each name is read off the
group's profile. Value and frequency words are *relative to the whole base*
("high-value" means well above this shop's average); the word for coming
back is absolute as well, because a marketer reads "likely to return" as a
probability: a segment where one in ten comes back is never called that,
however low the shop's average is.

A customer's journey stage here is the stage of their latest order (SPEC:
first order "new", 2nd-3rd "developing", 4th or later "loyal", "lapsed"
when the last order is more than ``lapse_days`` old), so that a one-order
customer is "new". The customer frame's ``journey_stage`` is the stage a
*next* order would have (what the policy sees), one step ahead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from insertrec.errors import DataError, Problem
from insertrec.schema import JOURNEY_STAGES, NPS_TIERS

__all__ = ["LIKELY", "REQUIRED_COLUMNS", "SEGMENTS_CSV_COLUMNS", "UNLIKELY", "SegmentModel", "customer_stage"]

REQUIRED_COLUMNS: tuple[str, ...] = ("customer_id", "prior_orders", "recency_days", "tenure_days",
                                     "total_spend", "nps_tier", "journey_stage", "p_repeat",
                                     "expected_orders")
SEGMENTS_CSV_COLUMNS: tuple[str, ...] = ("customer_id", "segment_id", "segment_name", "nps_tier",
                                         "journey_stage", "p_repeat", "expected_orders")
_NPS_VALUE = {"promoter": 1.0, "passive": 0.0, "detractor": -1.0}
LIKELY, UNLIKELY = 0.5, 0.2   # P(order again within the horizon) behind "likely" / "unlikely to return"


def customer_stage(frame: pd.DataFrame) -> pd.Series:
    """Each customer's journey stage by the orders placed so far (see the module docstring)."""
    orders = pd.to_numeric(frame["prior_orders"], errors="coerce").fillna(1.0).to_numpy()
    lapsed = (frame["journey_stage"].astype("string") == "lapsed").fillna(False).to_numpy(dtype=bool)
    stage = np.select([lapsed, orders <= 1, orders <= 3], ["lapsed", "new", "developing"], "loyal")
    return pd.Series(stage, index=frame.index, dtype="string")
_PLURAL = {"promoter": "promoters", "passive": "passives", "detractor": "detractors"}


def _check(frame: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError([Problem("customer frame", None, c, "required column is missing") for c in missing])


def _space(frame: pd.DataFrame) -> pd.DataFrame:
    """Behavioural coordinates: heavy-tailed amounts on a log scale, NPS as -1/0/+1."""
    num = {c: pd.to_numeric(frame[c], errors="coerce").astype("float64")
           for c in ("prior_orders", "recency_days", "tenure_days", "total_spend", "p_repeat")}
    returns = (pd.to_numeric(frame["return_rate"], errors="coerce") if "return_rate" in frame
               else pd.Series(np.nan, index=frame.index)).astype("float64")
    tier = frame["nps_tier"].astype("string")
    return pd.DataFrame({
        "value": np.log1p(num["total_spend"].clip(lower=0)),
        "frequency": np.log1p(num["prior_orders"].clip(lower=0)),
        "recency": np.log1p(num["recency_days"].clip(lower=0)),
        "tenure": np.log1p(num["tenure_days"].clip(lower=0)),
        "returns": returns,
        "nps": tier.map(_NPS_VALUE).astype("float64"),   # unknown -> NaN -> filled with the base's mean
        "nps_known": tier.isin(list(_NPS_VALUE)).astype("float64"),
        "lapsed": (frame["journey_stage"].astype("string") == "lapsed").astype("float64"),
        "p_repeat": num["p_repeat"],
    }, index=frame.index)


def _mix(values: pd.Series, labels: np.ndarray, levels: tuple[str, ...]) -> pd.DataFrame:
    """Share of each level within each segment (rows: segment ids, columns: levels)."""
    tab = pd.crosstab(labels, values.astype("string").fillna("unknown").to_numpy(), normalize="index")
    return tab.reindex(columns=list(levels), fill_value=0.0)


class SegmentModel(BaseEstimator):
    """KMeans segments with k chosen by silhouette, and marketer names.

    Parameters
    ----------
    k_range : (int, int)
        Smallest and largest number of segments tried (inclusive). Fewer than
        3 is rarely actionable, more than 8 is more than a marketer can treat
        differently.
    sample_size : int
        Customers used to choose k: silhouette is quadratic in the sample.
    n_init : int
        KMeans restarts per k.
    random_state : int
    """

    def __init__(self, k_range: tuple[int, int] = (3, 8), *, sample_size: int = 4000, n_init: int = 3,
                 random_state: int = 0):
        self.k_range = k_range
        self.sample_size = sample_size
        self.n_init = n_init
        self.random_state = random_state

    def _matrix(self, frame: pd.DataFrame) -> np.ndarray:
        x = _space(frame).fillna(self.fill_)
        return ((x - self.mean_) / self.scale_).to_numpy()

    def fit(self, frame: pd.DataFrame) -> SegmentModel:
        """Learn the segments from a customer frame with ``p_repeat`` and ``expected_orders``."""
        _check(frame)
        if frame.empty:
            raise DataError([Problem("customer frame", None, None, "no customers to segment")])
        space = _space(frame)
        self.fill_ = space.mean().fillna(0.0)
        filled = space.fillna(self.fill_)
        self.mean_, self.scale_ = filled.mean(), filled.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
        x = self._matrix(frame)
        rng = np.random.default_rng(self.random_state)
        sample = x[rng.choice(len(x), size=min(self.sample_size, len(x)), replace=False)]
        distinct = len(np.unique(sample.round(6), axis=0))
        lo, hi = self.k_range
        ks = [k for k in range(lo, hi + 1) if k < distinct]
        with threadpool_limits(1):
            scores = {}
            for k in ks:
                labels = KMeans(k, n_init=self.n_init, random_state=self.random_state).fit_predict(sample)
                scores[k] = silhouette_score(sample, labels) if len(np.unique(labels)) > 1 else -1.0
            # Too few distinct customers for the range: one segment, no silhouette to speak of.
            self.k_ = max(scores, key=lambda k: scores[k]) if scores else 1
            self.silhouette_ = float(scores[self.k_]) if scores else float("nan")
            self.kmeans_ = KMeans(self.k_, n_init=self.n_init, random_state=self.random_state).fit(x)
        labels = self.kmeans_.labels_
        self.profile_, self.base_ = self._profile(frame, labels)
        self.names_ = _names(self.profile_, self.base_)
        self.profile_.insert(1, "segment_name", self.names_)
        self.profile_["description"] = _descriptions(self.profile_, self.base_)
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Segment id (0..k-1) of each customer."""
        _check(frame)
        with threadpool_limits(1):
            return self.kmeans_.predict(self._matrix(frame)).astype("int64")

    def profiles(self) -> pd.DataFrame:
        """One row per segment, as learnt: who they are, what they are worth, whether they come back.

        Columns: segment_id, segment_name, customers, share, mean_value,
        mean_order_value, orders_per_customer, median_recency_days, p_repeat,
        expected_orders, return_rate, nps_<tier> and stage_<stage> shares,
        description.
        """
        return self.profile_.copy()

    def segments_csv(self, frame: pd.DataFrame) -> pd.DataFrame:
        """SPEC's ``segments.csv``: one row per customer."""
        seg = self.predict(frame)
        out = frame.loc[:, ["customer_id", "nps_tier", "p_repeat", "expected_orders"]].copy()
        out["journey_stage"] = customer_stage(frame)
        out.insert(1, "segment_id", seg)
        out.insert(2, "segment_name", np.asarray(self.names_, dtype=object)[seg])
        return out.loc[:, list(SEGMENTS_CSV_COLUMNS)].reset_index(drop=True)

    def _profile(self, frame: pd.DataFrame, labels: np.ndarray) -> tuple[pd.DataFrame, dict[str, float]]:
        """Per-segment profile, and the same figures for the whole base (for relative wording)."""
        num = frame.assign(
            **{c: pd.to_numeric(frame[c], errors="coerce") for c in
               ("prior_orders", "recency_days", "total_spend", "p_repeat", "expected_orders")},
            return_rate=(pd.to_numeric(frame["return_rate"], errors="coerce") if "return_rate" in frame
                         else np.nan),
        )
        g = num.groupby(labels)
        out = pd.DataFrame({
            "customers": g.size(),
            "mean_value": g["total_spend"].mean(),
            "orders_per_customer": g["prior_orders"].mean(),
            "median_recency_days": g["recency_days"].median(),
            "p_repeat": g["p_repeat"].mean(),
            "expected_orders": g["expected_orders"].mean(),
            "return_rate": g["return_rate"].mean(),
        })
        out.insert(1, "share", out["customers"] / len(frame))
        out.insert(3, "mean_order_value", out["mean_value"] / out["orders_per_customer"])
        nps = _mix(frame["nps_tier"], labels, NPS_TIERS).add_prefix("nps_")
        stage = _mix(customer_stage(frame), labels, JOURNEY_STAGES).add_prefix("stage_")
        out = out.join(nps).join(stage).reindex(range(self.k_)).fillna({"customers": 0, "share": 0.0})
        out.index.name = None
        out.insert(0, "segment_id", np.arange(self.k_))
        base = {
            "mean_value": float(num["total_spend"].mean()),
            "orders_per_customer": float(num["prior_orders"].mean()),
            "p_repeat": float(num["p_repeat"].mean()),
            "return_rate": float(num["return_rate"].mean()) if num["return_rate"].notna().any() else np.nan,
        }
        return out.reset_index(drop=True), base


def _ratio(value: float, base: float) -> float:
    return value / base if base and np.isfinite(base) and np.isfinite(value) else 1.0


def _names(profile: pd.DataFrame, base: dict[str, float]) -> list[str]:
    """A unique, plain-words name per segment: "<Stage> <value> <NPS group>[, <qualifier>]".

    The stage and NPS words appear only when most of the segment shares them;
    qualifiers are ordered by how far the segment sits from the base, and
    added until every name is distinct.
    """
    heads, extras = [], []
    for _, seg in profile.iterrows():
        stage_shares = seg[[f"stage_{s}" for s in JOURNEY_STAGES]].astype(float)
        stage = str(stage_shares.idxmax()).removeprefix("stage_")
        stage_word = stage.capitalize() if stage_shares.max() >= 0.5 else "Mixed"
        known = seg[[f"nps_{t}" for t in _PLURAL]].astype(float)
        tier = str(known.idxmax()).removeprefix("nps_")
        value = _ratio(seg["mean_value"], base["mean_value"])
        value_word = "high-value " if value >= 1.5 else "low-value " if value <= 0.6 else ""
        if known.max() >= 0.4:
            group = _PLURAL[tier]
        elif stage == "new" and seg["orders_per_customer"] < 1.5:
            group = "first-time buyers"
        else:
            group = "customers"
        heads.append(f"{stage_word} {value_word}{group}")
        qualifiers = []
        freq = _ratio(seg["orders_per_customer"], base["orders_per_customer"])
        if freq >= 1.5:
            qualifiers.append((np.log(freq), "frequent"))
        returns = _ratio(seg["return_rate"], base["return_rate"])
        if returns >= 1.5 and seg["return_rate"] > 0.05:
            qualifiers.append((np.log(returns), "high returns"))
        back = _return_word(seg["p_repeat"], base["p_repeat"])
        if back:
            qualifiers.append(back)
        if value_word == "" and (value >= 1.2 or value <= 0.8):
            qualifiers.append((abs(np.log(value)), "above-average spend" if value > 1 else "below-average spend"))
        extras.append([word for _, word in sorted(qualifiers, reverse=True)])
    names = [h + (f", {e[0]}" if e else "") for h, e in zip(heads, extras)]
    used = 1
    while len(set(names)) < len(names) and any(len(e) > used for e in extras):
        used += 1
        names = [h + (f", {', '.join(e[:used])}" if e else "") for h, e in zip(heads, extras)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:   # last resort: identical profiles in words, told apart by number
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _return_word(p: float, base: float) -> tuple[float, str] | None:
    """The qualifier for coming back, with its weight: absolute words where the figure earns them
    (at least ``LIKELY``, below ``UNLIKELY``), else relative to the base; None if unremarkable."""
    if not np.isfinite(p):
        return None
    ratio = _ratio(p, base)
    weight = abs(np.log(ratio)) if ratio > 0 else 1.0
    if p >= LIKELY:
        return max(weight, 0.3), "likely to return"
    if p < UNLIKELY and ratio <= 1.0:
        return max(weight, 0.3), "unlikely to return"
    if ratio >= 1.3:
        return weight, "more likely than most to return"
    if ratio <= 0.7:
        return weight, "less likely than most to return"
    return None


def _descriptions(profile: pd.DataFrame, base: dict[str, float]) -> list[str]:
    """One sentence per segment, in the marketer's terms."""
    out = []
    for _, seg in profile.iterrows():
        stage = seg[[f"stage_{s}" for s in JOURNEY_STAGES]].astype(float)
        nps = seg[[f"nps_{t}" for t in NPS_TIERS]].astype(float)
        tier = str(nps.idxmax()).removeprefix("nps_")
        nps_words = (f"{nps.max():.0%} never answered the NPS survey" if tier == "unknown"
                     else f"{nps.max():.0%} {_PLURAL[tier]}")
        value = _ratio(seg["mean_value"], base["mean_value"])
        out.append(
            f"{seg['orders_per_customer']:.1f} orders and {seg['mean_value']:,.0f} spent per customer "
            f"({value:.1f}x the average); {stage.max():.0%} {str(stage.idxmax()).removeprefix('stage_')}; "
            f"{nps_words}; {seg['p_repeat']:.0%} likely to order again within the horizon."
        )
    return out
