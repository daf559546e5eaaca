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

import numpy as np

from insertrec.engine import Engine
from insertrec.features import order_features
from insertrec.ope import expected_value, onehot
from insertrec.policy import Policy
from insertrec.world import World


def simulate(engine: Engine, world: World, orders: int = 5000, seed: int = 1,
             progress: Callable[[str], None] = lambda step: None) -> dict[str, float]:
    """True per-order value of each policy on ``orders`` fresh orders (SPEC's `simulate` keys).

    ``progress`` is told as each stage starts (the CLI prints it: a run on many
    orders takes minutes, most of it simulating the customers' histories)."""
    policy = engine.policy
    progress(f"simulating {orders} fresh orders and their customers' histories")
    evaluation = world.evaluation_set(orders, seed)
    progress("features")
    feats = order_features(evaluation.data, engine.params)
    feats = feats.set_index(feats["order_id"].astype(str)).loc[list(map(str, evaluation.order_ids))]
    feats = feats.reset_index(drop=True)
    combos = policy.combos
    progress("every box's true value")
    truth = world.expected_reward(evaluation.hidden, combos)
    batch = policy.decide_frame(feats)
    logging = evaluation.logging_propensities()
    eligible = batch.eligible
    ok = np.ones_like(truth, dtype=bool)
    for s, e in enumerate(eligible):
        ok &= e[:, combos[:, s]]
    sizes = policy.space.sizes
    uniform = [e / e.sum(axis=1, keepdims=True) for e in eligible]
    default = np.tile(np.array(policy.space.defaults), (len(feats), 1))
    playbook = Policy(policy.catalog, epsilon=0.0).decide_frame(feats, explore=False).greedy
    values = {
        "value_model": expected_value(truth, policy.probabilities(batch)),
        "value_model_greedy": expected_value(truth, onehot(batch.greedy, sizes)),
        "value_oracle": np.where(ok, truth, -np.inf).max(axis=1),
        "value_rules": expected_value(truth, onehot(playbook, sizes)),
        "value_logging": expected_value(truth, [logging[s] for s in policy.slot_names]),
        "value_random": expected_value(truth, uniform),
        "value_control": expected_value(truth, onehot(default, sizes)),
    }
    out = {k: float(v.mean()) for k, v in values.items()}
    out["oracle_ratio"] = out["value_model"] / out["value_oracle"]
    span = out["value_oracle"] - out["value_control"]
    out["uplift_capture"] = (out["value_model"] - out["value_control"]) / span if span else float("nan")
    out["orders"] = float(len(feats))
    return out
