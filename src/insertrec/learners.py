"""The learner families a training run chooses among, behind one small interface.

Each `Learner` turns logged orders (their feature rows and bandit feedback) into
a `Policy` that scores boxes through `valuemodel.BoxGrid`: whatever a family
learns, it is served in the box grid's form, so one order's 144 boxes stay a
few mat-vecs and the model directory, determinism and exploration are those of
every other policy. The families:

- ``ridge_box`` (`BoxLearner()`): the ridge box model on the encoder's
  features.
- ``spline_box`` (`BoxLearner(knots=4)`): the same model over a richer
  featurisation (`SplineEncoder`: hinge functions of every numeric input at its
  training quantiles), so an action's effect can bend with order value,
  recency or spend instead of being a straight line in their logs: the
  box model's form, not its data, capped it at about 55% of the uplift.
- ``boosted`` (`BoostedLearner`): a gradient-boosted direct model of the
  reward over [features, one-hot box] (`BoostedDirect`, also the peer in
  bench/quality.py), distilled onto the box grid over the spline features:
  scoring 144 boxes with 400 trees costs milliseconds per order and
  minutes per 100,000, far past serving's budgets, while the distilled grid
  costs what the ridge's does.
- ``blend`` (`BlendLearner`): the ridge box model and the distilled boosted
  model averaged on the box grid (`valuemodel.blend`): both are linear in the
  same grid form, so the average is one grid, served at the distilled
  model's cost (its spline features).
  They err differently (the boosted peer beat the ridge on some histories of
  the default world and lost on others), and the average keeps part of each
  one's right answers. The tournament's incumbent; the ridge alone where its
  cross-validation finds no action effect beyond the noise (`blended`).
- ``split_box`` (`SplitLearner`): the ridge box model fitted to the frequency x
  monetary target (`monetary.split_target`) instead of the logged reward: half
  its noise. The blend's third part (`blended`'s ``split``).

Judging them is `tournament`'s job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from insertrec.blocks import in_blocks
from insertrec.catalog import Catalog
from insertrec.encoding import FeatureEncoder
from insertrec.evaluation import rules_actions
from insertrec.monetary import split_target
from insertrec.ope import LoggedFeedback
from insertrec.policy import Policy
from insertrec.valuemodel import ActionSpace, FoldStatistics, ValueModel, blend, box_statistics

__all__ = ["BLEND_WEIGHT", "BlendLearner", "BoostedDirect", "BoostedLearner", "BoxLearner", "FitValueModel",
           "Learner", "SplineEncoder", "SplitLearner", "blended", "box_eligible", "orders_shares"]

# The ridge box model's share of a two-part blend, the distilled boosted model's the rest; with the
# split box model as a third part (`BlendLearner`, the incumbent) each part has a third.
BLEND_WEIGHT = 0.5


# How a `BoxLearner` fits its ridge (model, feats, encoder, actions, rewards, space, rules, pscore; the
# design rows are encoded where the features are): in this
# process by default; training passes `Computation.fit_value_model`, so that the Spark engine
# fits the incumbent on Spark.
FitValueModel = Callable[[ValueModel, pd.DataFrame, Any, np.ndarray, np.ndarray, ActionSpace, np.ndarray,
                          np.ndarray], ValueModel]


def _fit_here(model: ValueModel, feats: pd.DataFrame, encoder: Any, actions: np.ndarray, rewards: np.ndarray,
              space: ActionSpace, rules: np.ndarray, pscore: np.ndarray) -> ValueModel:
    return model.fit(encoder.transform(feats), actions, rewards, space, rules, pscore)


class Learner(ABC):
    """A learner family: logged orders in, a policy (encoder and value model set) out."""

    name: str

    @abstractmethod
    def fit(self, feats: pd.DataFrame, feedback: LoggedFeedback, encoder: FeatureEncoder, policy: Policy,
            seed: int) -> Policy:
        """``feats``: the logged orders' feature rows, aligned with ``feedback``; ``policy``: the
        template whose catalog, epsilon and version the result keeps."""


def box_eligible(catalog: Catalog, feats: pd.DataFrame, combos: np.ndarray) -> np.ndarray:
    """(n, n_combos) bool: every slot's action of the box is eligible for the order."""
    eligible, _ = catalog.assess(feats)
    ok = np.ones((len(feats), len(combos)), dtype=bool)
    for s, col in enumerate(catalog.columns):
        ok &= eligible[:, col + combos[:, s]]
    return ok


class SplineEncoder:
    """A `FeatureEncoder`'s features plus linear-spline (hinge) terms of its numeric inputs:
    ``max(0, x - knot)`` at ``knots`` training quantiles of each. Computed from the base
    encoding, so a batch and one order (`transform_one`, the serving path) are encoded alike."""

    def __init__(self, base: FeatureEncoder, knots: int = 4):
        self.base, self.knots = base, knots

    def fit(self, frame: pd.DataFrame) -> SplineEncoder:
        phi = self.base.transform(frame)
        names = self.base.feature_names_
        numeric = {n.name for n in self.base.numerics_}
        quantiles = np.arange(1, self.knots + 1) / (self.knots + 1)
        columns, knots, extra = [], [], []
        for j, name in enumerate(names):
            if name not in numeric:
                continue
            for knot in np.unique(np.quantile(phi[:, j], quantiles)):
                if (phi[:, j] > knot).mean() > 0.01:   # a hinge that (almost) never bends is noise
                    columns.append(j)
                    knots.append(float(knot))
                    extra.append(f"{name}>{knot:+.2f}sd")
        self.columns_, self.knots_ = np.array(columns, dtype=int), np.array(knots)
        self.feature_names_: list[str] = [*names, *extra]
        return self

    @property
    def n_features_(self) -> int:
        return len(self.feature_names_)

    def expand(self, phi: np.ndarray) -> np.ndarray:
        return np.hstack([phi, np.maximum(phi[:, self.columns_] - self.knots_, 0.0)])

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        return self.expand(self.base.transform(frame))

    def transform_one(self, record: dict[str, Any]) -> np.ndarray:
        return self.expand(self.base.transform_one(record)[None, :])[0]

    def transform_many(self, records: list[dict[str, Any]]) -> np.ndarray:
        """`transform_one` of each order, row for row to the bit (the hinges are elementwise)."""
        return self.expand(self.base.transform_many(records))


class BoxLearner(Learner):
    """The ridge box model (`ValueModel`), over the encoder's features (``knots=0``) or over
    its `SplineEncoder` expansion."""

    def __init__(self, knots: int = 0, fit_value_model: FitValueModel = _fit_here):
        self.knots, self.fit_value_model = knots, fit_value_model
        self.name = "spline_box" if knots else "ridge_box"

    def fit(self, feats: pd.DataFrame, feedback: LoggedFeedback, encoder: FeatureEncoder, policy: Policy,
            seed: int) -> Policy:
        enc: FeatureEncoder | SplineEncoder = SplineEncoder(encoder, self.knots).fit(feats) if self.knots \
            else encoder
        # the spline model tries a shorter grid: its solves are ~2.5x the incumbent's (a third more
        # features), and the incumbent's cross-validation picked the strongest baseline ridge and
        # action ridges of 1-10 on the default world at 5,000 and 30,000 customers
        model = ValueModel(alphas=(1e-2, 1.0), action_alphas=(1e-1, 1.0, 10.0), random_state=seed) \
            if self.knots else ValueModel(random_state=seed)
        model = self.fit_value_model(model, feats, enc, feedback.actions,
                                     feedback.rewards, policy.space, rules_actions(policy.catalog, feats),
                                     feedback.pscores.prod(axis=1))
        return policy.replace(encoder=enc, value_model=model)


class BoostedDirect:
    """A gradient-boosted model of the reward on [features, one-hot box]: the direct method a
    data scientist would reach for. One implementation for the tournament and the benchmark."""

    def __init__(self, space: ActionSpace, seed: int = 0):
        self.space, self.seed = space, seed
        self.combos = space.combos
        self._box = np.hstack([np.eye(n)[self.combos[:, s]] for s, n in enumerate(space.sizes)])

    def fit(self, phi: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> BoostedDirect:
        """``actions``: (n, n_slots) the box each logged order received."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        chosen = np.ravel_multi_index(tuple(actions.T), self.space.sizes)
        self.model_ = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05, max_leaf_nodes=31,
                                                    min_samples_leaf=50, early_stopping=True,
                                                    validation_fraction=0.15, random_state=self.seed)
        with threadpool_limits(1):
            self.model_.fit(np.hstack([phi, self._box[chosen]]), rewards)
        return self

    def scores(self, phi: np.ndarray, eligible: np.ndarray) -> np.ndarray:
        """(n, n_combos) predicted reward of every eligible box, -inf elsewhere."""
        rows, cols = np.nonzero(eligible)
        out = np.full(eligible.shape, -np.inf)
        with threadpool_limits(1):
            out[rows, cols] = in_blocks(lambda ix: self.model_.predict(np.hstack([phi[ix[:, 0]],
                                                                                   self._box[ix[:, 1]]])),
                                        np.stack([rows, cols], axis=1))
        return out

    def best(self, phi: np.ndarray, eligible: np.ndarray) -> np.ndarray:
        """(n,) the combo index of each order's best eligible box."""
        return self.scores(phi, eligible).argmax(axis=1)


class BoostedLearner(Learner):
    """`BoostedDirect`, served as its distillation onto the box grid over `SplineEncoder`
    features: a ridge fitted, without noise, to the boosted model's value of every eligible box
    of up to ``distil_orders`` orders. Decisions and judging use the distilled model, so the
    tournament judges exactly what would be served."""

    name = "boosted"

    def __init__(self, knots: int = 4, distil_orders: int = 4000):
        self.knots, self.distil_orders = knots, distil_orders

    def fit(self, feats: pd.DataFrame, feedback: LoggedFeedback, encoder: FeatureEncoder, policy: Policy,
            seed: int) -> Policy:
        space = policy.space
        phi = encoder.transform(feats)
        boosted = BoostedDirect(space, seed).fit(phi, feedback.actions, feedback.rewards)
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(feats), min(len(feats), self.distil_orders), replace=False))
        sample = feats.iloc[keep]
        target = boosted.scores(phi[keep], box_eligible(policy.catalog, sample, space.combos))
        order, box = np.nonzero(np.isfinite(target))
        student = SplineEncoder(encoder, self.knots).fit(feats)
        phi_s = student.transform(sample)
        folds = 3
        fold = rng.integers(0, folds, len(keep))[order]   # an order's boxes share a fold
        y = target[order, box]
        gram, moment = box_statistics(phi_s[order], space.combos[box], rules_actions(policy.catalog, sample)[order],
                                      y, np.ones(len(y)), space, fold, folds)
        r = feedback.rewards   # the reward's scale (playbook prior, exploration temperature) is the data's
        stats = FoldStatistics(gram, moment, np.bincount(fold, weights=y ** 2, minlength=folds), len(y),
                               float(r.mean()) * len(y), float((r ** 2).mean()) * len(y), phi_s.shape[1])
        model = ValueModel(alphas=(1e-6, 1e-4), action_alphas=(1e-5, 1e-4, 1e-3), boosted_baseline=False,
                           rule_prior=0.0, folds=folds, random_state=seed)
        model.offset_ = []
        return policy.replace(encoder=student, value_model=model.fit_statistics(stats, space))


def blended(ridge: Policy, boosted: Policy, weight: float | None = None, split: Policy | None = None,
            split_weight: float | None = None) -> Policy:
    """``ridge`` (a `BoxLearner` policy over the base encoder) and ``boosted`` (a `BoostedLearner`
    policy over a `SplineEncoder` of that encoder), and ``split`` (a `SplitLearner` policy over the
    base encoder) if given, as one policy on the boosted model's features: ``weight`` of the ridge's
    box values (default: an even share, `BLEND_WEIGHT` of two parts, a third of three), ``split_weight``
    of the split's (default: half the rest), the boosted model's the rest. The ridge alone where
    its cross-validation chose the strongest action ridge it tries: the log then shows no action
    effect beyond the noise, and the boosted model, unshrunk, serves the noise. Measured: on the
    small-effects world at 5,000 customers the blend lost 0.52% against sending nothing (seed 1,
    `--pessimism auto`; greedy -0.26%, the ridge alone -0.05% / +0.23%), sending the minimal mailer
    to 36% of the orders (the ridge 7%), and the ridge chose the strongest action ridge there (seeds
    1 and 11), while on the default world at 30,000 customers it chose 0.1 or 1 (bench/results/blend.md).
    Why the split as a third, equal part: on the default world at 30,000 customers (seeds 1-3, every
    logged order, greedy) the three-way blend captured 0.508 / 0.590 / 0.606 of the uplift against
    0.446 / 0.557 / 0.540 for the ridge and boosted halves (bench/results/blend3.md); the posterior
    errors (`decision_grid`) stay the ridge's."""
    assert ridge.value_model is not None and boosted.value_model is not None
    if _no_effect_beyond_noise(ridge):
        return ridge
    if split is None:
        others = boosted.value_model
        weight = BLEND_WEIGHT if weight is None else weight
    else:
        assert split.value_model is not None
        weight = 1.0 / 3.0 if weight is None else weight
        split_weight = (1.0 - weight) / 2.0 if split_weight is None else split_weight
        others = blend(split.value_model, boosted.value_model, split_weight / (1.0 - weight) if weight < 1.0 else 0.5)
    return boosted.replace(value_model=blend(ridge.value_model, others, weight))


def orders_shares(*orders: int) -> tuple[float, ...]:
    """Each part's share of a `blended` mix, given the logged orders each part learned from: even
    where all learned from as many, and otherwise in proportion to them (each part's error taken to
    fall as one over its orders: inverse variance). Why: above `tournament.FINAL_ORDERS` the ridge
    and the split box model are refitted on every order and the boosted model is the tournament's
    fit on at most `tournament.CANDIDATE_ORDERS`; at an even weight there, on the default world at
    100,000 customers (~244,000 orders, seeds 1-3, greedy), the two-part blend captured less of the
    uplift than the ridge alone, and more with the ridge's share raised to 0.75-0.9
    (bench/results/w100k.md)."""
    total = sum(orders)
    return tuple(n / total for n in orders) if total > 0 else tuple(1.0 / len(orders) for _ in orders)


def _no_effect_beyond_noise(ridge: Policy) -> bool:
    """The ridge's cross-validation chose the strongest action ridge it tries."""
    model = ridge.value_model
    assert model is not None
    return model.alpha_[1] >= max(model.action_alphas)


class SplitLearner(Learner):
    """The ridge box model (`ValueModel`, unchanged) fitted to `monetary.split_target` rather than
    the logged reward: on the default world at 30,000 customers (seeds 1-3, greedy) 0.508 / 0.536 /
    0.585 of the uplift against 0.425 / 0.521 / 0.492, but alone it lost on the coupons-waste and
    small-effects worlds (bench/results/monetary_split.md), so it serves as a part of the blend.
    Fitted in this process (also on the Spark engine): its target is computed here."""

    name = "split_box"

    def fit(self, feats: pd.DataFrame, feedback: LoggedFeedback, encoder: FeatureEncoder, policy: Policy,
            seed: int) -> Policy:
        space = policy.space
        costs = [policy.catalog.slots[name].costs for name in policy.slot_names]
        phi = encoder.transform(feats)
        target = split_target(phi, feedback, costs, space.sizes, space.defaults, seed)

        def fit_encoded(model: ValueModel, feats: pd.DataFrame, encoder: Any, actions: np.ndarray,
                        rewards: np.ndarray, space: ActionSpace, rules: np.ndarray, pscore: np.ndarray) -> ValueModel:
            return model.fit(phi, actions, rewards, space, rules, pscore)   # the target's encoding, not a second

        return BoxLearner(fit_value_model=fit_encoded).fit(
            feats, LoggedFeedback(target, feedback.actions, feedback.pscores), encoder, policy, seed)


class BlendLearner(Learner):
    """The incumbent's three parts (the ridge box model, the distilled boosted model and the split
    box model), all on every order given, `blended`. With ``boosted``, a boosted part already
    fitted on ``boosted_orders`` orders is served instead of a fit of its own, each part at its
    share of the orders it learned from (`orders_shares`): the final fit of a log above
    `tournament.FINAL_ORDERS`, whose boosted fit on every order a million-order budget cannot pay."""

    name = "blend"

    def __init__(self, fit_value_model: FitValueModel = _fit_here, boosted: Policy | None = None,
                 boosted_orders: int = 0):
        self.fit_value_model, self.boosted, self.boosted_orders = fit_value_model, boosted, boosted_orders

    def fit(self, feats: pd.DataFrame, feedback: LoggedFeedback, encoder: FeatureEncoder, policy: Policy,
            seed: int) -> Policy:
        ridge = BoxLearner(fit_value_model=self.fit_value_model).fit(feats, feedback, encoder, policy, seed)
        if _no_effect_beyond_noise(ridge):   # what `blended` would return: no other fit to pay for
            return ridge
        split = SplitLearner().fit(feats, feedback, encoder, policy, seed)
        if self.boosted is None:
            return blended(ridge, BoostedLearner().fit(feats, feedback, encoder, policy, seed), split=split)
        ridge_share, _, split_share = orders_shares(len(feats), self.boosted_orders, len(feats))
        return blended(ridge, self.boosted, ridge_share, split=split, split_weight=split_share)
