"""Repurchase propensity: will a customer order again in the next ``horizon_days``, and how often?

Two numbers per customer, both for the horizon after a cutoff:

- ``p_repeat``: the calibrated probability of at least one order. It feeds the
  segments and the marketer report, so a 0.3 has to mean "three in ten of
  these customers come back", not just a good ranking.
- ``expected_orders``: the expected number of orders, built as
  ``p_repeat * E[orders | at least one]`` so that ``expected_orders >= p_repeat``
  always holds and the total over the base inherits the calibration of
  ``p_repeat``.

The model is learnt the only honest way for a forecast: from the past of the
same shop, with features frozen at an anchor date and labels counted after it
(see :func:`fit_repeat`). Besides the customer frame it uses the ratios that
make the classic BG/NBD model work (purchase rate, time since the last order
relative to the customer's usual gap), which trees do not build by themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1, lambertw
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import BaggingRegressor, HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from insertrec import features
from insertrec.blocks import in_blocks
from insertrec.data import Dataset
from insertrec.encoding import FeatureEncoder
from insertrec.errors import DataError, Problem

__all__ = ["BGNBD", "REQUIRED_COLUMNS", "RepeatModel", "RepeatResult", "fit_repeat", "order_counts",
           "repeat_metrics"]

# Columns the model needs; everything else in the frame is optional context.
REQUIRED_COLUMNS: tuple[str, ...] = ("customer_id", "prior_orders", "recency_days", "tenure_days")
_NOT_INPUTS = ("customer_id", "first_order_ts", "last_order_ts")
# Day counts that only grow with the calendar: a model trained at an early anchor meets larger
# values at prediction time than it ever saw, and trees do not extrapolate.
_ABSOLUTE_TIMES = ("recency_days", "tenure_days", "active_span_days")
_BGNBD_FIT_CUSTOMERS = 20_000
# Customers the holdout model is scored on (`fit_repeat`'s metrics; a random sample above this). The
# scores feed only the four holdout figures: on the million-order demo history (372,000 customers)
# 100,000 gave an AUC of 0.9223 for 0.9226 and a Brier score of 0.0394 for 0.0399, and the step
# 42.2 CPU s for 46.9 (bench/results/budget.md §5).
_CHECK_CUSTOMERS = 100_000


def _rfm(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BG/NBD's summary of each customer, in days: repeat orders x, first-to-last t_x, age T."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError([Problem("customer frame", None, c, "required column is missing")
                         for c in missing])
    orders = frame["prior_orders"].to_numpy(dtype="float64").clip(min=1.0)  # in the frame = ordered once
    tenure = frame["tenure_days"].to_numpy(dtype="float64").clip(min=0.0)
    span = (tenure - frame["recency_days"].to_numpy(dtype="float64")).clip(min=0.0, max=tenure)
    return orders - 1.0, span, tenure


class BGNBD:
    """The BG/NBD model (Fader, Hardie & Lee 2005), fitted by maximum likelihood on (x, t_x, T).

    Why here: its two summaries of a customer, the expected orders in a
    window and P(still active), are exactly what trees struggle to build
    from recency and frequency alone; fitted on the training frame (history
    before the anchor only), they enter the repurchase model as features.
    Times are in weeks inside (days / 7) to keep alpha of order one.
    """

    def fit(self, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> BGNBD:
        x, t_x, t = x, t_x / 7.0, np.maximum(t / 7.0, 1e-6)

        def nll(log_params: np.ndarray) -> float:
            r, alpha, a, b = np.exp(log_params)
            common = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
            alive = betaln(a, b + x) - betaln(a, b) - (r + x) * np.log(alpha + t)
            died = np.where(x > 0, betaln(a + 1, np.maximum(b + x - 1, 1e-12)) - betaln(a, b)
                            - (r + x) * np.log(alpha + t_x), -np.inf)
            return -float(np.mean(common + np.logaddexp(alive, died)))

        start = np.log([0.5, max(float(np.mean(t)), 1.0), 1.0, 2.0])
        fit = minimize(nll, start, method="Nelder-Mead",
                       options={"maxiter": 4000, "xatol": 1e-6, "fatol": 1e-9})
        self.r_, self.alpha_, self.a_, self.b_ = (float(v) for v in np.exp(fit.x))
        return self

    def _odds_dead(self, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> np.ndarray:
        r, alpha, a, b = self.r_, self.alpha_, self.a_, self.b_
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_odds = np.log(a / np.maximum(b + x - 1.0, 1e-12)) + (r + x) * np.log((alpha + t) / (alpha + t_x))
        return np.where(x > 0, np.exp(np.minimum(log_odds, 700.0)), 0.0)

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """P(the customer has not dropped out) at age ``t`` (days)."""
        return 1.0 / (1.0 + self._odds_dead(x, t_x / 7.0, t / 7.0))

    def expected(self, days: float, x: np.ndarray, t_x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """E[orders in the next ``days`` | x, t_x, T] (the paper's equation 10)."""
        r, alpha, a, b = self.r_, self.alpha_, self.a_, self.b_
        h, t_x, t = days / 7.0, t_x / 7.0, t / 7.0
        z = h / (alpha + t + h)
        tail = 1.0 - ((alpha + t) / (alpha + t + h)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1.0, z)
        return (a + b + x - 1.0) / (a - 1.0) * tail / (1.0 + self._odds_dead(x, t_x, t))


def _design(frame: pd.DataFrame, bgnbd: BGNBD | None = None, window_days: float = 0.0) -> pd.DataFrame:
    """The customer frame plus BG/NBD-style ratios (and BG/NBD's own summaries when given),
    without ids and timestamps."""
    x, span, tenure = _rfm(frame)
    out = frame.drop(columns=[c for c in _NOT_INPUTS if c in frame.columns])
    orders = x + 1.0
    recency = out["recency_days"].to_numpy(dtype="float64")
    mean_gap = np.where(orders > 1, span / np.maximum(orders - 1.0, 1.0), np.nan)  # NaN: one order
    if bgnbd is not None:
        out = out.assign(bgnbd_expected=bgnbd.expected(window_days, x, span, tenure),
                         bgnbd_p_alive=bgnbd.p_alive(x, span, tenure))
    return out.assign(
        repeat_orders=x,
        active_span_days=span,
        orders_per_year=365.0 * orders / (tenure + 30.0),  # +30: a week-old customer is not "52 a year"
        recency_share=recency / (tenure + 1.0),
        overdue_ratio=recency / (mean_gap + 1.0),
    )


def _horizon_shift(p: np.ndarray, m: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Carry (P(N>=1), E[N]) over a window to a window ``ratio`` times as long.

    Each customer is read as "active with probability a, then Poisson with
    rate z per window": a(1 - e^-z) = p and a z = m. z solves z / (1 - e^-z)
    = m / p, whose non-trivial root is m/p + W0(-(m/p) e^(-m/p)). When the
    implied a exceeds 1 the customer is certainly active and z comes from p
    alone. Used only when the history is too short to label a full horizon.
    """
    if ratio == 1.0:
        return p, m
    c = np.maximum(m / np.maximum(p, 1e-12), 1.0 + 1e-9)
    z = np.maximum(np.real(c + lambertw(-c * np.exp(-c))), 1e-9)
    a = p / -np.expm1(-z)
    z = np.where(a > 1.0, -np.log1p(-np.minimum(p, 1.0 - 1e-12)), z)
    a = np.minimum(a, 1.0)
    p_h = a * -np.expm1(-z * ratio)
    return p_h, np.maximum(m * ratio, p_h)


def _bin_edges(x: np.ndarray, bins: int = 255) -> list[np.ndarray]:
    """Per column, the inner quantiles that cut it into at most ``bins`` bins.

    Why: the count model is bagged, and bagging hands each boosted model its
    bootstrap as sample weights; below 200,000 rows scikit-learn (1.9) then
    bins every feature with one weighted-percentile call per bin edge, which
    took most of the repurchase step on a million-order history. Binned once
    here, every column has at most ``bins`` distinct values, which the
    boosting keeps as they are: the same kind of trees, cut on unweighted
    quantiles of the buyers, at a fraction of the cost.
    """
    cuts = np.quantile(x, np.linspace(0.0, 1.0, bins + 1)[1:-1], axis=0)
    return [np.unique(col) for col in cuts.T]


def _binned(x: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Each value replaced by the index of its bin, ``(edge[i-1], edge[i]]`` (the encoding is finite)."""
    codes = [np.searchsorted(e, col, side="left") for e, col in zip(edges, x.T)]
    return np.column_stack(codes).astype("float64")


class RepeatModel(BaseEstimator):
    """Calibrated P(order in the horizon) and expected orders, from a customer frame.

    Parameters
    ----------
    horizon_days : float
        The horizon the predictions are for. When the labels given to ``fit``
        cover a different window (a short history), predictions are carried
        over to this horizon by :func:`_horizon_shift`.
    max_iter, learning_rate, max_leaf_nodes, min_samples_leaf, l2_regularization :
        Gradient boosting capacity (shallow, regularised trees: a customer
        frame is noisy and a few hundred thousand rows at most). A fixed
        number of rounds rather than early stopping: the same data gives the
        same p_repeat, which early stopping's random validation split did not.
        60 rounds at 0.08 scored as 100 at 0.05 did (CDNOW and the demo
        world's holdout), with 40% fewer trees to run for every customer.
    n_bags : int
        Bootstrap replicas averaged for the count model: the heaviest buyers
        are few, and one boosted model's count for them was noisy.
    min_class_count : int
        Fewer buyers (or non-buyers) than this in training and boosting would
        memorise them: a regularised logistic model is used instead. With no
        buyer or no non-buyer at all the model is the smoothed base rate.
    max_customers : int or None
        The classifier learns from at most this many customers, a random
        subsample (None: all): on the million-order demo world (372k
        customers) 100k moved the holdout AUC by -0.0005 and the Brier score
        by +0.0001, at a third of the cost. The count model, which learns
        from buyers only, keeps them all.
    bgnbd_features : bool
        Add BG/NBD's expected orders in the label window and P(active),
        from a :class:`BGNBD` fitted on the training frame, as features.
    absolute_times : bool
        Keep the day counts that grow with the calendar (recency, tenure,
        active span) as features. Off when the model is trained at an early
        anchor and used at a much later one (a short history), where trees
        would meet values they never saw; the ratios stay either way.
    calibration : {"auto", "isotonic", "sigmoid"}
        How the boosted classifier's scores become probabilities; "auto" is
        isotonic with at least 1,000 buyers and non-buyers, else sigmoid.
    carry_over : {"customer", "ranked"}
        How predictions for a label window shorter than the horizon are
        carried over (:func:`_horizon_shift`). "customer": each customer's
        own (p, m) pair. "ranked": the same set of carried-over
        probabilities, handed out in the order of the window's calibrated
        probability, so that the count model's noise does not reorder
        customers (on CDNOW it ranked better and had the lower Brier score
        on the inner split and the holdout alike; bench/repeat_vs_bgnbd.py).
    random_state : int
        Seeds the subsample, the calibration folds and the bagging.
    """

    def __init__(self, horizon_days: float = 60.0, *, max_iter: int = 60,
                 learning_rate: float = 0.08, max_leaf_nodes: int = 15,
                 min_samples_leaf: int = 50, l2_regularization: float = 1.0,
                 min_class_count: int = 50, n_bags: int = 5, max_customers: int | None = 100_000,
                 bgnbd_features: bool = False, absolute_times: bool = True, calibration: str = "auto",
                 carry_over: str = "ranked", random_state: int = 0):
        self.horizon_days = horizon_days
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.min_class_count = min_class_count
        self.n_bags = n_bags
        self.max_customers = max_customers
        self.bgnbd_features = bgnbd_features
        self.absolute_times = absolute_times
        self.calibration = calibration
        self.carry_over = carry_over
        self.random_state = random_state

    def _boosting(self, loss: str) -> HistGradientBoostingClassifier | HistGradientBoostingRegressor:
        kw = dict(learning_rate=self.learning_rate, max_iter=self.max_iter,
                  max_leaf_nodes=self.max_leaf_nodes, min_samples_leaf=self.min_samples_leaf,
                  l2_regularization=self.l2_regularization, early_stopping=False,
                  random_state=self.random_state)
        if loss == "log_loss":
            return HistGradientBoostingClassifier(**kw)
        return HistGradientBoostingRegressor(loss=loss, **kw)

    def fit(self, frame: pd.DataFrame, n_orders: np.ndarray | pd.Series, *,
            window_days: float | None = None) -> RepeatModel:
        """Learn from customers' state at an anchor date and their order count after it.

        ``n_orders[i]`` is the number of orders customer ``frame.iloc[i]``
        placed in the ``window_days`` (default: ``horizon_days``) after the anchor.
        """
        y = np.asarray(n_orders, dtype="float64")
        if y.shape != (len(frame),):
            raise DataError([Problem("labels", None, "n_orders",
                                     f"expected {len(frame)} counts, one per customer, got shape {y.shape}")])
        if not np.all(np.isfinite(y)) or (y < 0).any():
            raise DataError([Problem("labels", None, "n_orders", "counts must be finite and >= 0")])
        self.window_days_ = float(window_days or self.horizon_days)
        self.bgnbd_ = None
        if self.bgnbd_features and len(frame):
            # Four population parameters: 20,000 customers pin them down; all of a large shop cost minutes.
            rfm = np.column_stack(_rfm(frame))
            rows = np.random.default_rng(self.random_state).permutation(len(rfm))[:_BGNBD_FIT_CUSTOMERS]
            self.bgnbd_ = BGNBD().fit(*rfm[np.sort(rows)].T)
        design = self._design(frame)
        self.encoder_ = FeatureEncoder().fit(design)
        x = self.encoder_.transform(design)
        base = self._count_baseline(design)
        buyer = y > 0
        self.n_train_, self.n_positive_ = len(y), int(buyer.sum())
        # Half a buyer in one pseudo-customer: a history with no buyer does not claim p = 0.
        self.base_rate_ = (self.n_positive_ + 0.5) / (len(y) + 1.0)
        sample: slice | np.ndarray = slice(None)
        if self.max_customers is not None and len(y) > self.max_customers:
            rng = np.random.default_rng(self.random_state)
            sample = np.sort(rng.choice(len(y), self.max_customers, replace=False))
        n_pos, n_neg = int(buyer[sample].sum()), int((~buyer[sample]).sum())
        self.n_classifier_train_ = n_pos + n_neg
        self.classifier_: CalibratedClassifierCV | LogisticRegression | None = None
        with threadpool_limits(1):
            if n_pos == 0 or n_neg == 0:
                self.kind_ = "constant"
            elif min(n_pos, n_neg) < self.min_class_count:
                self.kind_ = "logistic"
                self.classifier_ = LogisticRegression(C=0.1, max_iter=1000).fit(x[sample], buyer[sample])
            else:
                self.kind_ = "boosting"
                method = self.calibration if self.calibration != "auto" else (
                    "isotonic" if min(n_pos, n_neg) >= 1000 else "sigmoid")
                # Shuffled folds: frames come sorted by id, which often follows the join date.
                folds = StratifiedKFold(3, shuffle=True, random_state=self.random_state)
                self.classifier_ = CalibratedClassifierCV(self._boosting("log_loss"), method=method,
                                                          cv=folds).fit(x[sample], buyer[sample])
            # Orders beyond the first, among buyers: >= 0 by construction, so E[N | N>=1] >= 1.
            # Boosted as a multiple of the customer's own past rate (a Poisson offset, via
            # target/base with weight base): trees cannot extrapolate, and the heaviest
            # buyers at prediction time are heavier than any seen in training.
            extra, base = y[buyer] - 1.0, base[buyer]
            self.extra_mean_ = float(extra.sum() / base.sum()) if self.n_positive_ else 0.0
            self.extra_model_ = None
            if self.n_positive_ >= self.min_class_count and extra.any():
                self.count_edges_ = _bin_edges(x[buyer])
                self.extra_model_ = BaggingRegressor(self._boosting("poisson"), n_estimators=self.n_bags,
                                                     random_state=self.random_state).fit(
                    _binned(x[buyer], self.count_edges_), extra / base, sample_weight=base)
        return self

    def _count_baseline(self, design: pd.DataFrame) -> np.ndarray:
        """The customer's smoothed past order rate over one label window."""
        return design["orders_per_year"].to_numpy(dtype="float64") * self.window_days_ / 365.0

    def _design(self, frame: pd.DataFrame) -> pd.DataFrame:
        design = _design(frame, self.bgnbd_, self.window_days_)
        return design if self.absolute_times else design.drop(columns=list(_ABSOLUTE_TIMES))

    def _window_predictions(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        design = self._design(frame)
        x = self.encoder_.transform(design)
        classifier, extra = self.classifier_, self.extra_model_
        with threadpool_limits(1):
            p = (np.full(len(x), self.base_rate_) if classifier is None
                 else in_blocks(lambda rows: classifier.predict_proba(rows)[:, 1], x))
            ratio = (in_blocks(extra.predict, _binned(x, self.count_edges_)) if extra is not None
                     else self.extra_mean_)
        return p, p * (1.0 + ratio * self._count_baseline(design))

    def _predict(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        p, m = self._window_predictions(frame)
        ratio = float(self.horizon_days) / self.window_days_
        p_h, m_h = _horizon_shift(p, m, ratio)
        if self.carry_over == "ranked" and ratio != 1.0:
            # The carried-over probabilities, handed out in the order of the window's own.
            p_h = np.sort(p_h)[np.argsort(np.argsort(p, kind="stable"), kind="stable")]
            m_h = np.maximum(m_h, p_h)
        return p_h, m_h

    def predict_p_repeat(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated probability of at least one order in the ``horizon_days`` after the frame's date."""
        return self._predict(frame)[0]

    def predict_expected_orders(self, frame: pd.DataFrame) -> np.ndarray:
        """Expected number of orders in the ``horizon_days`` after the frame's date."""
        return self._predict(frame)[1]

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``customer_id, p_repeat, expected_orders`` in one pass (the model is scored once)."""
        p, m = self._predict(frame)
        return pd.DataFrame({"customer_id": frame["customer_id"].to_numpy(),
                             "p_repeat": p, "expected_orders": m})


def order_counts(orders: pd.DataFrame, customer_ids: pd.Series | np.ndarray,
                 start: pd.Timestamp, days: float) -> np.ndarray:
    """Orders each customer placed in ``[start, start + days)``: the label for an anchor at ``start``.

    Half-open so that it starts exactly where a snapshot ``as_of=start`` (which
    holds everything strictly before ``start``) stops.
    """
    end = start + pd.Timedelta(days=days)
    ts = orders["order_ts"]
    counts = orders.loc[(ts >= start) & (ts < end), "customer_id"].value_counts()
    return counts.reindex(pd.Index(customer_ids), fill_value=0).to_numpy(dtype="float64")


def repeat_metrics(n_orders: np.ndarray, p_repeat: np.ndarray,
                   expected_orders: np.ndarray) -> dict[str, float]:
    """Holdout quality: ranking (AUC), calibration (Brier), counts (RMSE) and the total.

    AUC is NaN when the holdout has only buyers or only non-buyers: there is
    nothing to rank, and a made-up 0.5 would look like a real figure.
    """
    y = np.asarray(n_orders, dtype="float64")
    buyer = y > 0
    auc = roc_auc_score(buyer, p_repeat) if 0 < buyer.sum() < len(y) else float("nan")
    total = float(y.sum())
    return {
        "repeat_auc": float(auc),
        "repeat_brier": float(brier_score_loss(buyer, p_repeat)) if len(y) else float("nan"),
        "repeat_count_rmse": float(np.sqrt(np.mean((y - expected_orders) ** 2))) if len(y) else float("nan"),
        "repeat_total_error": float((expected_orders.sum() - total) / total) if total else float("nan"),
    }


@dataclass
class RepeatResult:
    """What training learns about repurchase, and how well it did on an honest holdout.

    ``scores`` has ``customer_id, p_repeat, expected_orders`` for every
    customer known at ``cutoff``, for the ``horizon_days`` after it.
    ``metrics`` are those of :func:`repeat_metrics` on the holdout, plus the
    training sizes. ``window_days`` is the label window actually used:
    shorter than the horizon when the history before the cutoff is short.
    """

    model: RepeatModel
    scores: pd.DataFrame
    metrics: dict[str, float]
    cutoff: pd.Timestamp
    horizon_days: float
    window_days: float


def fit_repeat(data: Dataset, params: features.FeatureParams, cutoff: pd.Timestamp | str,
               horizon_days: float = 60.0, *, model: RepeatModel | None = None,
               current: pd.DataFrame | None = None,
               snapshot_at: Callable[[pd.Timestamp], features.Snapshot] | None = None) -> RepeatResult:
    """Evaluate on a time-based holdout, then refit on the latest window and score everyone at ``cutoff``.

    With ``W`` the label window (the horizon, or a third of the history
    before the cutoff if that is shorter):

    1. holdout: train on features at ``cutoff - 2W`` with orders in the next
       ``W`` days, score features at ``cutoff - W`` (at most ``_CHECK_CUSTOMERS``
       customers, drawn at random) against orders in ``[cutoff - W, cutoff)``.
       Nothing after the cutoff is ever read.
    2. final: train on features at ``cutoff - W`` with those same orders, and
       predict for every customer at ``cutoff`` over ``horizon_days``.

    ``current`` is the customer frame at ``cutoff`` when the caller already
    has it (``train`` does): scored as it is instead of built again.
    ``snapshot_at``: `features.Snapshot.builder` of ``data`` when the caller
    has it (``train`` does), so that the orders are read once.
    """
    cutoff = pd.Timestamp(cutoff)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    orders = data.orders
    first = orders["order_ts"].min() if len(orders) else pd.NaT
    history_days = (cutoff - first) / pd.Timedelta(days=1) if pd.notna(first) else 0.0
    window = min(float(horizon_days), float(np.floor(history_days / 3.0)))
    if window < 1.0:
        raise DataError([Problem("orders", None, "order_ts",
                                 f"repurchase needs at least 3 days of orders before the cutoff "
                                 f"{cutoff.date()} (found {max(history_days, 0.0):.1f})")])
    span = pd.Timedelta(days=window)
    template = model if model is not None else RepeatModel(horizon_days=horizon_days)
    build = snapshot_at if snapshot_at is not None else features.Snapshot.builder(data, params)

    def frame_at(as_of: pd.Timestamp) -> pd.DataFrame:
        return features.customer_frame(build(as_of), as_of)

    def fitted(anchor: pd.Timestamp) -> tuple[RepeatModel, pd.DataFrame]:
        frame = frame_at(anchor)
        labels = order_counts(orders, frame["customer_id"], anchor, window)
        est = clone(template).set_params(horizon_days=window)
        return est.fit(frame, labels, window_days=window), frame

    holdout_model, _ = fitted(cutoff - 2 * span)
    final_model, recent = fitted(cutoff - span)
    if len(recent) > _CHECK_CUSTOMERS:
        rows = np.random.default_rng(template.random_state).choice(len(recent), _CHECK_CUSTOMERS, replace=False)
        recent = recent.iloc[np.sort(rows)]
    truth = order_counts(orders, recent["customer_id"], cutoff - span, window)
    check = holdout_model.predict_frame(recent)
    metrics = repeat_metrics(truth, check["p_repeat"].to_numpy(), check["expected_orders"].to_numpy())
    metrics.update(repeat_train_customers=float(final_model.n_train_),
                   repeat_train_buyers=float(final_model.n_positive_))
    final_model.set_params(horizon_days=horizon_days)
    scores = final_model.predict_frame(frame_at(cutoff) if current is None else current)
    return RepeatResult(final_model, scores, metrics, cutoff, float(horizon_days), window)
