"""Frequency x monetary: the logged reward with the basket's chance taken out of it.

The logged reward is the customer's net revenue over the next 60 days less the
box's cost, and the revenue is zero unless the customer came back, so
E[revenue | x, a] = P(came | x, a) x E[revenue | x, a, came] exactly.
`split_target` replaces each returning order's revenue by a cross-fitted
estimate of its expectation (`MonetaryModel`), so that a box model fitted to
``came x monetary(x, a) - cost`` learns through the coin flip of coming back
but not through the noise of what a returning customer happens to spend.

Measured (default world, 30,000 customers, seed 1, bench/results/monetary_split.md):
the sd of (target - the simulator's expected reward of the logged box) is 25.2
against 36.0 for the logged reward (variance ratio 0.49), its mean differs from
the reward's by +0.05 per order, and the ridge box model on it captured 0.508 of
the uplift greedy against 0.425 on the logged reward.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from insertrec.blocks import in_blocks
from insertrec.ope import LoggedFeedback

__all__ = ["FOLDS", "KEPT_SE", "MAX_ROWS", "MonetaryModel", "split_target"]

FOLDS = 3             # cross-fitting: no returning order's estimate comes from a model that saw it
MAX_ROWS = 50_000     # each fold's monetary model learns from at most this many returning orders
# A spending factor is kept only this many (sandwich) standard errors from 0: the noise factors (se
# 0.015-0.05 at 30,000 customers) are biases every order shares, and keeping them all cost the
# small-effects world (greedy -0.490 against -0.264 of the uplift; monetary_split.md's variants).
KEPT_SE = 3.0


class MonetaryModel:
    """A returning customer's expected spending: a boosted base g(x) times ``1 + sum_s
    factor_s[a_s]``, one factor per action (0 for the slot defaults).

    Why this form: the actions shift value per order (the coupons' discounts, a fit guide that
    cuts returns), and an unweighted model of spending on [features, box] learns them confounded
    with the logging policy (the 10% coupon's factor -0.058 unweighted, -0.107 weighted by 1 / the
    logged propensity, on the noise-free spending of the small-effects world at 30,000 customers).
    So each slot's factors come from a regression of spending on g(x) x [1, one-hot action]
    weighted by 1 / that slot's logged propensity; the base is then refitted on spending divided
    by the factors (so it is the spending with the slot defaults) and the factors estimated again."""

    def __init__(self, sizes: tuple[int, ...], defaults: tuple[int, ...], seed: int = 0):
        self.sizes, self.defaults, self.seed = sizes, defaults, seed

    def fit(self, phi: np.ndarray, actions: np.ndarray, spend: np.ndarray, pscores: np.ndarray) -> MonetaryModel:
        """``spend``: the returning orders' net revenue; ``pscores``: (n, n_slots) logged propensities."""
        if len(spend) > MAX_ROWS:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(spend), MAX_ROWS, replace=False))
            phi, actions, spend, pscores = phi[keep], actions[keep], spend[keep], pscores[keep]
        self.factors_ = [np.zeros(n) for n in self.sizes]
        self.se_ = [np.zeros(n) for n in self.sizes]
        for _ in range(2):
            self.base_ = self._boosted(phi, spend / self._multiplier(actions))
            self._estimate_factors(self._predict_base(phi), actions, spend, pscores)
        return self

    def _boosted(self, phi: np.ndarray, y: np.ndarray) -> Any:
        from sklearn.ensemble import HistGradientBoostingRegressor

        model = HistGradientBoostingRegressor(max_iter=150, learning_rate=0.08, max_leaf_nodes=15,
                                              min_samples_leaf=40, random_state=self.seed)
        with threadpool_limits(1):
            return model.fit(phi, y)

    def _predict_base(self, phi: np.ndarray) -> np.ndarray:
        with threadpool_limits(1):
            return in_blocks(self.base_.predict, phi)

    def _multiplier(self, actions: np.ndarray) -> np.ndarray:
        return 1.0 + sum(f[a] for f, a in zip(self.factors_, actions.T))

    def _estimate_factors(self, base: np.ndarray, actions: np.ndarray, spend: np.ndarray,
                          pscores: np.ndarray) -> None:
        """Per slot: weighted least squares of spending on base x [1, one-hot of the logged
        non-default actions], weights 1 / the slot's propensity; factor = the action's
        coefficient over the intercept, kept where the coefficient is `KEPT_SE` sandwich standard
        errors from 0."""
        for s, (size, default) in enumerate(zip(self.sizes, self.defaults)):
            others = [a for a in range(size) if a != default and (actions[:, s] == a).any()]
            x = base[:, None] * np.column_stack([np.ones(len(base)), *[actions[:, s] == a for a in others]])
            w = 1.0 / pscores[:, s]
            bread = np.linalg.pinv((x * w[:, None]).T @ x)
            coef = bread @ ((x * w[:, None]).T @ spend)
            score = x * (w * (spend - x @ coef))[:, None]
            se = np.sqrt(np.maximum(np.diag(bread @ (score.T @ score) @ bread), 0.0))
            factors, errors = np.zeros(size), np.zeros(size)
            for j, a in enumerate(others, start=1):
                errors[a] = se[j] / abs(coef[0])
                factors[a] = coef[j] / coef[0] if abs(coef[j]) > KEPT_SE * se[j] else 0.0
            self.factors_[s], self.se_[s] = factors, errors

    def predict(self, phi: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(n,) expected spending of each order's customer with its box, given they come back."""
        return self._predict_base(phi) * self._multiplier(actions)


def split_target(phi: np.ndarray, feedback: LoggedFeedback, costs: list[np.ndarray], sizes: tuple[int, ...],
                 defaults: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(n,) ``came x monetary(x, a) - cost`` of each logged order: ``costs`` per slot, by action
    index. ``came`` is read off the reward (revenue = reward + the box's catalog cost, non-zero),
    so it works with rewards the shop gave; ``monetary`` is a `MonetaryModel` of the other
    `FOLDS` folds' returning orders. Orders whose customer did not come back keep their reward."""
    actions = feedback.actions
    cost = np.sum([c[a] for c, a in zip(costs, actions.T)], axis=0)
    revenue = feedback.rewards + cost
    came = np.abs(revenue) > 1e-6   # not 0: the sum's rounding (~1e-16) of a reward of minus the cost
    fold = np.random.default_rng(seed).integers(0, FOLDS, len(revenue))
    monetary = np.zeros(len(revenue))
    for f in range(FOLDS):
        learn, score = came & (fold != f), came & (fold == f)
        if learn.sum() < 2 or not score.any():
            monetary[score] = revenue[score]
            continue
        model = MonetaryModel(sizes, defaults, seed + f).fit(phi[learn], actions[learn], revenue[learn],
                                                             feedback.pscores[learn])
        monetary[score] = model.predict(phi[score], actions[score])
    return np.where(came, monetary - cost, feedback.rewards)
