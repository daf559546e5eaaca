"""Blend weight rules measured against the fixed weight and not served (bench/results/w100k.md).

Read by `uplift_limits.py` (``--evidence-blend``, ``--stacked-blend``): each
reads the ridge box model's share of `insertrec.learners.blended` off the log
alone, never off the truth. On the default world at 30,000 customers both lost
to the even blend (evidence 0.478, stacking 0.506, against 0.514 of the uplift,
greedy, seeds 1-3), so training does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from insertrec.evaluation import rules_actions
from insertrec.ope import LoggedFeedback
from insertrec.policy import Policy
from insertrec.valuemodel import ValueModel

__all__ = ["BlendEvidence", "blend_evidence", "stacked_weight"]


@dataclass(frozen=True)
class BlendEvidence:
    """What two fits say of their own errors on the actions' gains over the slot defaults, each a
    mean square over the orders the second model learned from and every action: ``variance``, the
    first model's posterior variance of its gains; ``disagreement``, the squared difference of the
    two models' gains; ``spread``, the first model's gains themselves."""

    variance: float
    disagreement: float
    spread: float

    @property
    def weight(self) -> float:
        """The first model's share in a `blend` by inverse variance, ``1 - variance / disagreement``
        clipped to [0, 1]. Why: if the two models' errors are independent, disagreement = variance +
        E, E what the second errs by, and the weights E / (variance + E) and variance / (variance + E)
        minimise the blend's error; the variance falls as the log grows, so the ridge's share would
        grow with the evidence. Any bias of the first model's form is counted in E, so the rule leans
        to the first. Measured: the posterior variance is largest where cross-validation chose a weak
        action ridge, and the weight swung to 0.10-0.16 on two of three 30,000-customer histories."""
        if self.disagreement <= 0.0:
            return 1.0
        return float(np.clip(1.0 - self.variance / self.disagreement, 0.0, 1.0))


def blend_evidence(first: ValueModel, second: ValueModel, phi: np.ndarray) -> BlendEvidence:
    """`BlendEvidence` of ``first`` (a ridge with a posterior) and ``second`` (on features whose
    leading columns are ``first``'s), from the two fits and ``phi``, ``second``'s features of the
    orders it learned from (their mean phi phi^T is what a gain's error averages over)."""
    d, d1 = second.n_features_, first.n_features_
    moment = phi.T @ phi / max(len(phi), 1)
    gains = np.pad(np.hstack(first.W_), ((0, d - d1), (0, 0)))
    gap = gains - np.hstack(second.W_)
    return BlendEvidence(variance=float(np.sum((moment[:d1, :d1] @ first.gain_factor_) * first.gain_factor_)),
                         disagreement=float(np.sum((moment @ gap) * gap)),
                         spread=float(np.sum((moment @ gains) * gains)))


def stacked_weight(ridge: Policy, boosted: Policy, feats: pd.DataFrame, feedback: LoggedFeedback) -> float:
    """The ridge's share of a `blended` pair by stacking on orders neither was fitted on (``feats``,
    aligned with ``feedback``): the least-squares weight w of the two models' values of each order's
    logged box over the all-default box, reward - b - g_boosted = w (g_ridge - g_boosted), b the two
    baselines' average, clipped to [0, 1]. The action part alone: the baselines' errors are
    larger than the gains and would choose the weight for the baseline. Measured signal: on the
    default world at 30,000 customers (seed 1, 3-fold cross-fitted, 72,664 orders) w = 0.33 with a
    standard error of 0.07 (bench/results/w100k.md)."""
    rules = rules_actions(ridge.catalog, feats)
    parts = []
    for policy in (ridge, boosted):
        model = policy.value_model
        assert model is not None
        phi, grid = policy.encoder.transform(feats), model.box_grid
        parts.append((grid.value(phi, rules + grid.columns, feedback.actions), model.baseline(phi)))
    (gain_r, base_r), (gain_b, base_b) = parts
    gap = gain_r - gain_b
    target = feedback.rewards - (base_r + base_b) / 2 - gain_b
    scale = float(gap @ gap)
    return 1.0 if scale <= 0.0 else float(np.clip(gap @ target / scale, 0.0, 1.0))
