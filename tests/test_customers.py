"""Repurchase propensity on populations whose true purchase rates are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from insertrec import features
from insertrec.customers import BGNBD, RepeatModel, fit_repeat, order_counts, repeat_metrics
from insertrec.data import ORDER_DTYPES, Dataset
from insertrec.errors import DataError, InsertrecError


def population(n: int, seed: int, horizon: float = 60.0) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Customers with a known Poisson purchase rate and lifetime, seen at an anchor date.

    Returns the customer frame at the anchor, the orders each places in the
    ``horizon`` days after it, and the truth: daily ``rate`` and whether the
    customer is still ``alive`` at the anchor.
    """
    rng = np.random.default_rng(seed)
    rate = rng.gamma(1.0, 1 / 40, n)                     # orders per day
    tenure = rng.uniform(30, 400, n)                     # days since the first order
    death = rng.exponential(300, n)                      # days after the first order the customer leaves
    active = np.minimum(tenure, death)
    repeats = rng.poisson(rate * active)
    last = active * rng.uniform(size=n) ** (1 / np.maximum(repeats, 1)) * (repeats > 0)
    recency = tenure - last
    alive_days = np.clip(death - tenure, 0, horizon)
    future = rng.poisson(rate * alive_days).astype(float)
    prior = repeats + 1.0
    stage = np.select([prior == 1, prior <= 3], ["new", "developing"], "loyal")
    stage = np.where(recency > 180, "lapsed", stage)
    frame = pd.DataFrame({
        "customer_id": [f"c{seed}-{i}" for i in range(n)],
        "prior_orders": prior, "recency_days": recency, "tenure_days": tenure,
        "monetary": rng.lognormal(3.5, 0.5, n),
        "return_rate": np.where(rng.uniform(size=n) < 0.2, np.nan, rng.beta(1, 8, n)),
        "nps_tier": rng.choice(["promoter", "passive", "detractor", "unknown"], n),
        "journey_stage": stage,
        "ctx_device": rng.choice(["mobile", "desktop"], n),
    })
    frame["total_spend"] = frame["monetary"] * prior
    return frame, future, pd.DataFrame({"rate": rate, "alive": death > tenure})


# Smaller than the defaults: these tests check behaviour, not the last point of accuracy.
FAST = dict(max_iter=60, n_bags=2)


@pytest.fixture(scope="module")
def trained() -> RepeatModel:
    frame, future, _ = population(6000, seed=1)
    return RepeatModel(horizon_days=60, **FAST).fit(frame, future)


def test_ranks_and_calibrates_on_fresh_customers(trained: RepeatModel) -> None:
    frame, future, truth = population(4000, seed=2)
    p = trained.predict_p_repeat(frame)
    m = trained.predict_expected_orders(frame)
    buyer = future > 0
    assert roc_auc_score(buyer, p) > 0.75
    # Calibrated: the base's mean probability is the share who come back...
    assert abs(p.mean() - buyer.mean()) < 0.03
    # ... also within deciles of the prediction, not just on average.
    deciles = pd.qcut(p, 10, labels=False, duplicates="drop")
    by_decile = pd.DataFrame({"p": p, "y": buyer, "d": deciles}).groupby("d").mean()
    assert (by_decile["p"] - by_decile["y"]).abs().max() < 0.08
    # Counts: the total of expected orders matches the orders placed.
    assert abs(m.sum() / future.sum() - 1) < 0.1
    assert (m >= p - 1e-12).all()
    # Among customers who have not left, those who truly buy more often get a higher propensity.
    alive = truth["alive"].to_numpy()
    assert spearmanr(truth["rate"][alive], p[alive]).statistic > 0.5


def test_a_classifier_learning_from_a_subsample_still_ranks_and_calibrates() -> None:
    frame, future, _ = population(6000, seed=13)
    model = RepeatModel(horizon_days=60, max_customers=2500, **FAST).fit(frame, future)
    assert (model.n_classifier_train_, model.n_train_) == (2500, 6000)
    fresh, fresh_future, _ = population(4000, seed=14)
    p = model.predict_p_repeat(fresh)
    assert roc_auc_score(fresh_future > 0, p) > 0.75
    assert abs(p.mean() - (fresh_future > 0).mean()) < 0.03


def test_unseen_text_values_and_extra_columns_are_fine(trained: RepeatModel) -> None:
    frame, _, _ = population(50, seed=3)
    frame["ctx_device"] = "smart-fridge"
    frame["nps_tier"] = np.nan
    frame["something_new"] = "x"
    p = trained.predict_p_repeat(frame)
    assert p.shape == (50,) and np.all((p >= 0) & (p <= 1))


def test_missing_required_column_is_named(trained: RepeatModel) -> None:
    frame, _, _ = population(10, seed=4)
    with pytest.raises(DataError, match="recency_days"):
        trained.predict_p_repeat(frame.drop(columns="recency_days"))


@pytest.mark.parametrize("buyers,kind", [(0, "constant"), (4, "logistic")])
def test_small_data_gives_a_simpler_model_not_a_crash(buyers: int, kind: str) -> None:
    frame, _, _ = population(40, seed=5)
    labels = np.zeros(40)
    labels[:buyers] = 1.0
    model = RepeatModel(horizon_days=30).fit(frame, labels)
    p = model.predict_p_repeat(frame)
    assert model.kind_ == kind
    assert np.all((p > 0) & (p < 1))
    assert abs(p.mean() - (buyers + 0.5) / 41) < 0.05


def test_bad_labels_are_refused() -> None:
    frame, _, _ = population(10, seed=6)
    with pytest.raises(InsertrecError, match="n_orders"):
        RepeatModel().fit(frame, np.arange(9))
    with pytest.raises(InsertrecError, match="n_orders"):
        RepeatModel().fit(frame, -np.ones(10))


def test_short_label_window_is_carried_to_the_horizon() -> None:
    """Trained on 20-day labels, predicting 60 days: close to the truth for 60 days."""
    frame, future20, _ = population(6000, seed=7, horizon=20.0)
    model = RepeatModel(horizon_days=60, **FAST).fit(frame, future20, window_days=20)
    fresh, future60, _ = population(4000, seed=8, horizon=60.0)
    p, m = model.predict_p_repeat(fresh), model.predict_expected_orders(fresh)
    assert abs(p.mean() - (future60 > 0).mean()) < 0.05
    assert abs(m.sum() / future60.sum() - 1) < 0.25
    short = model.set_params(horizon_days=20).predict_p_repeat(fresh)
    assert (p >= short - 1e-12).all()


def test_ranked_carry_over_keeps_the_carried_probabilities_in_the_window_order() -> None:
    frame, future20, _ = population(6000, seed=7, horizon=20.0)
    model = RepeatModel(horizon_days=60, **FAST).fit(frame, future20, window_days=20)
    fresh, future60, _ = population(4000, seed=8, horizon=60.0)
    own = model.set_params(carry_over="customer").predict_frame(fresh)
    ranked = model.set_params(carry_over="ranked").predict_frame(fresh)
    window = model.set_params(horizon_days=20).predict_p_repeat(fresh)
    # The same probabilities (so the same share coming back), in the window's order.
    assert np.allclose(np.sort(ranked["p_repeat"]), np.sort(own["p_repeat"]))
    assert spearmanr(ranked["p_repeat"], window).statistic > 0.999
    assert (ranked["expected_orders"] >= ranked["p_repeat"] - 1e-12).all()
    assert roc_auc_score(future60 > 0, ranked["p_repeat"]) > 0.75


def simulate_bgnbd(n: int, weeks: float, future: float, seed: int, r: float = 0.5, alpha: float = 4.0,
                   a: float = 0.8, b: float = 2.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BG/NBD's own story, in days: rate ~ Gamma(r, alpha) per week, after each order the customer
    leaves with p ~ Beta(a, b). Returns x, t_x, T at the end of ``weeks`` and the orders in ``future``."""
    rng = np.random.default_rng(seed)
    lam, drop = rng.gamma(r, 1 / alpha, n), rng.beta(a, b, n)
    age = rng.uniform(0.3, 1.0, n) * weeks     # customers joined at different times
    x, t_x, later = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        t, alive, horizon = 0.0, True, age[i] + future
        while alive:
            t += rng.exponential(1 / lam[i])
            if t > horizon:
                break
            if t <= age[i]:
                x[i], t_x[i] = x[i] + 1, t
            else:
                later[i] += 1
            alive = rng.uniform() > drop[i]
    return x, t_x * 7, age * 7, later


def test_bgnbd_recovers_its_parameters_and_forecasts_the_total() -> None:
    x, t_x, t, later = simulate_bgnbd(6000, weeks=40, future=30, seed=3)
    bg = BGNBD().fit(x, t_x, t)
    assert bg.r_ == pytest.approx(0.5, rel=0.25) and bg.alpha_ == pytest.approx(4.0, rel=0.3)
    assert bg.a_ == pytest.approx(0.8, rel=0.35) and bg.b_ == pytest.approx(2.5, rel=0.4)
    expected = bg.expected(30 * 7, x, t_x, t)
    assert expected.sum() / later.sum() == pytest.approx(1.0, abs=0.1)
    assert roc_auc_score(later > 0, expected) > 0.7
    alive = bg.p_alive(x, t_x, t)
    assert np.all((alive > 0) & (alive <= 1)) and (alive[x == 0] == 1).all()


def test_bgnbd_features_without_calendar_bound_days_still_rank_and_calibrate() -> None:
    frame, future, _ = population(6000, seed=1)
    model = RepeatModel(horizon_days=60, bgnbd_features=True, absolute_times=False, **FAST).fit(frame, future)
    assert {"bgnbd_expected", "bgnbd_p_alive"} <= set(model.encoder_.feature_names_)
    assert "tenure_days" not in model.encoder_.feature_names_
    fresh, later, _ = population(4000, seed=2)
    p = model.predict_p_repeat(fresh)
    assert roc_auc_score(later > 0, p) > 0.75 and abs(p.mean() - (later > 0).mean()) < 0.03


def test_order_counts_window_is_half_open() -> None:
    ts = pd.to_datetime(["2024-01-01", "2024-01-05", "2024-01-11", "2024-01-02"], utc=True)
    orders = pd.DataFrame({"customer_id": ["a", "a", "a", "b"], "order_ts": ts})
    counts = order_counts(orders, ["a", "b", "c"], pd.Timestamp("2024-01-01", tz="UTC"), 10)
    assert counts.tolist() == [2.0, 1.0, 0.0]


def test_auc_is_nan_when_nobody_or_everybody_buys() -> None:
    out = repeat_metrics(np.zeros(5), np.full(5, 0.2), np.full(5, 0.3))
    assert np.isnan(out["repeat_auc"]) and np.isnan(out["repeat_total_error"])
    assert out["repeat_brier"] == pytest.approx(0.04)


def shop(n_customers: int, days: int, seed: int) -> Dataset:
    """Order history of customers with known rates who join over time and may leave."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    joined = rng.uniform(0, days, n_customers)
    rate = rng.gamma(1.0, 1 / 30, n_customers)
    life = rng.exponential(200, n_customers)
    span = np.clip(np.minimum(joined + life, days) - joined, 0, None)
    repeats = rng.poisson(rate * span)
    owner = np.repeat(np.arange(n_customers), repeats + 1)
    first = np.r_[np.ones(1, bool), owner[1:] != owner[:-1]]
    at = joined[owner] + np.where(first, 0.0, rng.uniform(size=len(owner)) * span[owner])
    n = len(owner)
    orders = pd.DataFrame({
        "order_id": [f"o{i}" for i in range(n)], "customer_id": [f"c{c}" for c in owner],
        "order_ts": start + pd.to_timedelta(at, unit="D"), "order_value": rng.lognormal(3.5, 0.4, n),
        "n_items": 1.0, "channel": "web", "categories": "", "is_gift": False, "returned_value": 0.0,
        "region": "unknown",
    }).astype(ORDER_DTYPES).sort_values(["order_ts", "order_id"], ignore_index=True)
    return Dataset(orders=orders)


def test_fit_repeat_scores_everyone_and_reports_an_honest_holdout() -> None:
    data = shop(1500, 420, seed=11)
    cutoff = pd.Timestamp("2024-12-01", tz="UTC")
    result = fit_repeat(data, features.FeatureParams.fit(data), cutoff, horizon_days=60,
                        model=RepeatModel(**FAST))
    known = data.orders.loc[data.orders["order_ts"] < cutoff, "customer_id"].unique()
    assert sorted(result.scores["customer_id"]) == sorted(known)
    assert result.window_days == 60
    assert result.metrics["repeat_auc"] > 0.65
    assert 0 < result.metrics["repeat_brier"] < 0.25
    p, m = result.scores["p_repeat"], result.scores["expected_orders"]
    assert p.between(0, 1).all() and (m >= p - 1e-12).all()
    # The forecast for the horizon after the cutoff is right about the total it never saw.
    truth = order_counts(data.orders, result.scores["customer_id"], cutoff, 60)
    assert abs(m.sum() / truth.sum() - 1) < 0.25


def test_fit_repeat_with_short_history_shrinks_the_window_or_says_why() -> None:
    data = shop(300, 40, seed=12)
    params = features.FeatureParams.fit(data)
    result = fit_repeat(data, params, "2024-02-01", horizon_days=60, model=RepeatModel(**FAST))
    assert result.window_days < 60 and len(result.scores) > 0
    assert result.scores["p_repeat"].between(0, 1).all()
    with pytest.raises(InsertrecError, match="at least 3 days"):
        fit_repeat(data, params, data.orders["order_ts"].min() + pd.Timedelta(days=2), horizon_days=60)


def test_calibration_does_not_depend_on_row_order() -> None:
    """Frames often come sorted by id, i.e. by join date: folds must not follow that order."""
    frame, future, truth = population(4000, seed=9)
    order = np.argsort(truth["rate"].to_numpy())    # the most extreme case: sorted by the truth
    model = RepeatModel(horizon_days=60, **FAST).fit(frame.iloc[order], future[order])
    fresh, fresh_future, _ = population(3000, seed=10)
    assert abs(model.predict_p_repeat(fresh).mean() - (fresh_future > 0).mean()) < 0.03
