"""The split box model: its frequency x monetary target, the monetary model's factors, and its
third of the incumbent blend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from insertrec.encoding import FeatureEncoder
from insertrec.evaluation import logged_orders, rules_actions
from insertrec.features import FeatureParams, order_features, order_rewards
from insertrec.learners import BoostedLearner, BoxLearner, SplineEncoder, SplitLearner, blended, orders_shares
from insertrec.monetary import MonetaryModel, split_target
from insertrec.ope import LoggedFeedback
from insertrec.policy import Policy
from insertrec.world import World


@dataclass
class History:
    feedback: LoggedFeedback
    truth: np.ndarray          # the simulator's expected reward of each logged order's box
    phi: np.ndarray
    costs: list[np.ndarray]
    policy: Policy
    feats: object
    encoder: FeatureEncoder


@pytest.fixture(scope="module")
def history() -> History:
    world = World.default()
    generated = world.generate(customers=3000, seed=21)
    data = generated.to_dataset()
    feats = order_features(data, FeatureParams.fit(data, catalog=data.catalog))
    costs = {a.id: a.cost for slot in data.catalog.slots.values() for a in slot.actions}
    logged = logged_orders(data, feats, order_rewards(data, horizon_days=60, costs=costs), data.catalog)
    sub = feats.iloc[logged.rows].reset_index(drop=True)
    policy = Policy(data.catalog, epsilon=0.0, version="t")
    position = dict(zip(data.orders["order_id"].astype(str), range(len(data.orders))))
    hidden = generated.hidden.iloc[[position[o] for o in sub["order_id"].astype(str)]].reset_index(drop=True)
    chosen = np.ravel_multi_index(tuple(logged.feedback.actions.T), policy.space.sizes)
    truth = world.expected_reward(hidden, policy.combos)[np.arange(len(chosen)), chosen]
    encoder = FeatureEncoder().fit(feats)
    return History(logged.feedback, truth, encoder.transform(sub),
                   [data.catalog.slots[name].costs for name in policy.slot_names], policy, sub, encoder)


def test_the_split_target_keeps_the_non_returning_orders_reward_and_quiets_the_returning_ones(history) -> None:
    """revenue = came x spending: an order whose customer did not come back keeps its reward (minus
    the box's cost); a returning one gets its cross-fitted expected spending, which takes the
    basket's noise out (default world, 30,000 customers: the variance against the truth halved)."""
    f, space = history.feedback, history.policy.space
    target = split_target(history.phi, f, history.costs, space.sizes, space.defaults, seed=21)
    cost = np.sum([c[a] for c, a in zip(history.costs, f.actions.T)], axis=0)
    came = np.abs(f.rewards + cost) > 1e-6
    assert 0.3 < came.mean() < 0.7
    np.testing.assert_array_equal(target[~came], f.rewards[~came])
    assert (target[came] + cost[came] > 0).all()        # a returning customer's expected spending
    assert abs(target.mean() - f.rewards.mean()) < 0.05 * f.rewards.std()
    assert (target - history.truth).var() < 0.8 * (f.rewards - history.truth).var()


def test_the_monetary_factors_are_the_actions_effects_on_spending_beyond_three_standard_errors() -> None:
    """A logging policy that sends the discount to the big spenders confounds an unweighted
    regression; weighted by 1 / the logged propensity the factor is the discount's, and an
    action without an effect gets none."""
    rng = np.random.default_rng(3)
    n = 30_000
    phi = rng.normal(size=(n, 3))
    base = 50.0 * np.exp(0.4 * phi[:, 0])
    p_discount = 1 / (1 + np.exp(-1.5 * phi[:, 0]))                  # big spenders get the discount
    coupon = np.where(rng.random(n) < p_discount, 1, np.where(rng.random(n) < 0.5, 0, 2))
    p_coupon = np.where(coupon == 1, p_discount, (1 - p_discount) / 2)
    card = rng.integers(0, 2, n)
    factors = (np.array([0.0, -0.2, 0.0]), np.array([0.0, 0.15]))
    spend = base * (1 + factors[0][coupon] + factors[1][card]) * rng.lognormal(-0.125, 0.5, n)
    model = MonetaryModel((3, 2), (0, 0), seed=3).fit(phi, np.stack([coupon, card], axis=1), spend,
                                                       np.stack([p_coupon, np.full(n, 0.5)], axis=1))
    assert model.factors_[0][1] == pytest.approx(-0.2, abs=0.04)
    assert model.factors_[0][2] == 0.0                                # no effect: not kept
    assert model.factors_[1][1] == pytest.approx(0.15, abs=0.04)
    assert model.factors_[0][0] == model.factors_[1][0] == 0.0        # the defaults


def test_the_incumbent_blend_weighs_ridge_split_and_boosted_a_third_each(history) -> None:
    """The three-way blend's box values are the mean of its parts' (the ridge's and the split's on
    the base features, the boosted model's on its spline features); the ridge alone where its
    cross-validation found no action effect beyond the noise, as for the two-part blend."""
    import copy

    f, feats, enc, policy = history.feedback, history.feats, history.encoder, history.policy
    ridge = BoxLearner().fit(feats, f, enc, policy, 21)
    split = SplitLearner().fit(feats, f, enc, policy, 21)
    boosted = BoostedLearner().fit(feats, f, enc, policy, 21)
    assert ridge.value_model is not None and split.value_model is not None and boosted.value_model is not None
    model = copy.copy(ridge.value_model)
    model.alpha_ = (model.alpha_[0], 0.1)                              # an effect beyond the noise
    ridge = ridge.replace(value_model=model)
    mixed = blended(ridge, boosted, split=split)
    assert isinstance(mixed.encoder, SplineEncoder) and mixed.value_model is not None
    rules, combos = rules_actions(policy.catalog, feats), policy.combos
    phi, phi_s = enc.transform(feats), mixed.encoder.transform(feats)
    parts = (ridge.value_model.combo_scores(phi, rules, combos) + split.value_model.combo_scores(phi, rules, combos)
             + boosted.value_model.combo_scores(phi_s, rules, combos)) / 3
    np.testing.assert_allclose(mixed.value_model.combo_scores(phi_s, rules, combos), parts, atol=1e-8)
    weighed = blended(ridge, boosted, 0.5, split=split, split_weight=0.3)   # the shares given, the rest boosted
    assert weighed.value_model is not None
    parts = (0.5 * ridge.value_model.combo_scores(phi, rules, combos)
             + 0.3 * split.value_model.combo_scores(phi, rules, combos)
             + 0.2 * boosted.value_model.combo_scores(phi_s, rules, combos))
    np.testing.assert_allclose(weighed.value_model.combo_scores(phi_s, rules, combos), parts, atol=1e-8)
    model = copy.copy(model)
    model.alpha_ = (model.alpha_[0], max(model.action_alphas))       # no effect beyond the noise
    alone = ridge.replace(value_model=model)
    assert blended(alone, boosted, split=split) is alone


def test_with_the_split_each_of_three_parts_shares_in_the_orders_it_learned_from() -> None:
    """A third each where all learned from as many orders; above FINAL_ORDERS the ridge and the
    split learned from every order and the boosted part from at most CANDIDATE_ORDERS, so theirs grow."""
    assert orders_shares(72_000, 72_000, 72_000) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert orders_shares(244_000, 50_000, 244_000) == pytest.approx((244 / 538, 50 / 538, 244 / 538))
    assert orders_shares(984_000, 50_000, 984_000)[0] > orders_shares(244_000, 50_000, 244_000)[0]
