"""`insertrec simulate`: a model's policy against a world whose truth is known.

The world generates fresh orders (with their history) that the model has
never seen; the model decides each from its point-in-time features, exactly
as in production; the world says what every possible box is truly worth for
each order. So every policy's value is exact, not estimated: the model's
(as deployed, exploration included, and greedy), the oracle's (the best
eligible box per order, knowing the truth), the playbook's, the logging
policy's, random's and the all-default control's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insertrec.engine import Engine
from insertrec.features import order_features
from insertrec.ope import expected_value, onehot
from insertrec.policy import Policy
from insertrec.world import EvaluationSet, World

__all__ = ["FreshOrders", "fresh_orders", "policy_values", "simulate", "summary"]


@dataclass
class FreshOrders:
    """Fresh orders of a world as a model sees them, with the truth of every box for each.

    ``features`` are the orders' point-in-time features under the model's
    feature parameters, row-aligned with ``truth`` (n, n_combos, the policy's
    combos order); ``eligible`` (n, n_combos) marks the boxes the catalog
    allows. Built once, every policy (ours, a peer's) is judged on the same orders.
    """

    evaluation: EvaluationSet
    features: pd.DataFrame
    truth: np.ndarray
    eligible: np.ndarray


def fresh_orders(engine: Engine, world: World, orders: int = 5000, seed: int = 1,
                 evaluation: EvaluationSet | None = None,
                 progress: Callable[[str], None] = lambda step: None) -> FreshOrders:
    """``orders`` fresh orders of ``world`` (or the given evaluation set) seen through ``engine``;
    ``progress`` is told as each stage starts."""
    policy = engine.policy
    if evaluation is None:
        progress(f"simulating {orders} fresh orders and their customers' histories")
        evaluation = world.evaluation_set(orders, seed)
    progress("features")
    feats = order_features(evaluation.data, engine.params)
    feats = feats.set_index(feats["order_id"].astype(str)).loc[list(map(str, evaluation.order_ids))]
    feats = feats.reset_index(drop=True)
    combos = policy.combos
    eligible, _ = policy.catalog.assess(feats)
    ok = np.ones((len(feats), len(combos)), dtype=bool)
    for s, sl in enumerate(policy.catalog.columns):
        ok &= eligible[:, sl + combos[:, s]]
    progress("every box's true value")
    return FreshOrders(evaluation, feats, world.expected_reward(evaluation.hidden, combos), ok)


def policy_values(policy: Policy, fresh: FreshOrders) -> dict[str, np.ndarray]:
    """Per order, the true value of the model (deployed and greedy) and of the reference policies."""
    truth, feats, sizes = fresh.truth, fresh.features, policy.space.sizes
    batch = policy.decide_frame(feats)
    logging = fresh.evaluation.logging_propensities()
    uniform = [e / e.sum(axis=1, keepdims=True) for e in batch.eligible]
    default = np.tile(np.array(policy.space.defaults), (len(feats), 1))
    playbook = Policy(policy.catalog, epsilon=0.0).decide_frame(feats, explore=False).greedy
    return {
        "value_model": expected_value(truth, policy.probabilities(batch)),
        "value_model_greedy": expected_value(truth, onehot(batch.greedy, sizes)),
        "value_oracle": np.where(fresh.eligible, truth, -np.inf).max(axis=1),
        "value_rules": expected_value(truth, onehot(playbook, sizes)),
        "value_logging": expected_value(truth, [logging[s] for s in policy.slot_names]),
        "value_random": expected_value(truth, uniform),
        "value_control": expected_value(truth, onehot(default, sizes)),
    }


def summary(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean values per order, the oracle ratio and the share of the oracle's uplift captured."""
    out = {k: float(v.mean()) for k, v in values.items()}
    out["oracle_ratio"] = out["value_model"] / out["value_oracle"]
    span = out["value_oracle"] - out["value_control"]
    out["uplift_capture"] = (out["value_model"] - out["value_control"]) / span if span else float("nan")
    out["orders"] = float(len(values["value_model"]))
    return out


def simulate(engine: Engine, world: World, orders: int = 5000, seed: int = 1,
             progress: Callable[[str], None] = lambda step: None) -> dict[str, float]:
    """True per-order value of each policy on ``orders`` fresh orders (SPEC's `simulate` keys).

    ``progress`` is told as each stage starts (the CLI prints it: a run on many
    orders takes minutes, most of it simulating the customers' histories)."""
    return summary(policy_values(engine.policy, fresh_orders(engine, world, orders, seed, progress=progress)))
