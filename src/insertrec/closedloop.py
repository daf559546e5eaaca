"""`insertrec simulate --rounds K`: the closed loop (deploy, log, retrain) in a world whose truth is known.

`simulate` judges one model on fresh orders; a shop lives with its model
month after month, and every month's log is what the next model learns from,
so exploration pays (or not) in what is learned later. This plays that out:

* the shop starts as it does in ``demo-data``: the world's logging policy
  (the playbook with the world's exploration) decides every order before the
  loop, on a fresh history of ``customers`` customers (the customers
  ``World.generate`` draws for the seed; not MODEL's own history, which the
  loop could not continue: MODEL gives the learner's settings);
* the last ``rounds`` months of the world's ``days`` are the loop: before each
  month the learner is given the log as the shop knows it then (rewards only
  once their horizon has passed) and returns the policy deployed for the month;
  the month's orders are decided by it, the world draws their outcomes, and
  the decisions are logged with their exact propensities;
* each month is judged by the world's truth: the deployed policy's expected
  value on the month's own orders (exploration included), the oracle's (the
  best eligible box per order), the all-default box's and the logging
  policy's, the uplift captured and the regret against the oracle, summed
  over orders and cumulated over months. Beside it, so that a short month can
  be read apart from what was learned: the greedy policy's value (the box the
  deployed policy most likely chose: for exploration by a share epsilon < 1/2
  of each slot, the greedy box), the standard error of the uplift captured as
  a property of the policy (the month's orders are one sample of the shop's),
  and the number of orders with a known reward the learner was given;
* optionally (``judge_customers``) the same policies are judged on a twin
  shop: another ``judge_customers`` customers of the world (seed
  ``seed + JUDGE_SEED``) living the same months under the same deployed
  policies but never logged for the learner. The value of a policy is a
  property of the policy; the twin's larger month measures it more precisely
  (keys ``judge_*``); the regret stays the one on the orders actually decided.

The learner of `insertrec` is :func:`retrained`: ``insertrec train`` itself
(``training.train``, in-process, into a temporary model directory) on all the
logs so far, with the settings of the model given to the CLI. The learner
never sees the world: only the logged tables, as ``train`` would read them.
The policy decides from the shop's features as the world's systems compute
them (``insertrec.features`` with the world's ``observed`` windows), which is
what the engine computes from the tables when the model's windows are the
world's (as with the default settings on the default world). The world draws
the box from the policy's probabilities rather than hashing the order id: the
same distribution, and the propensities logged are exact.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from insertrec.engine import Engine
from insertrec.errors import InsertrecError
from insertrec.ope import expected_value
from insertrec.policy import Policy
from insertrec.training import TrainConfig, train
from insertrec.world import Month, World
from insertrec.world.simulation import Decide

#: a learner of the loop: given the log as the shop knows it before a month (the previous month's
#: ``Month``: ``data`` is the whole log), the policy deployed for the month
Learner = Callable[[Month], Decide]

MONTH_DAYS = 30.0
#: the twin shop's seed is the loop's plus this (another draw of the world's customers)
JUDGE_SEED = 10_000
#: what the twin shop reports of each month (``judge_<key>``)
JUDGED = ("orders", "value_deployed", "value_greedy", "value_oracle", "value_control", "uplift_capture",
          "uplift_capture_se", "uplift_capture_greedy")


def deployed(policy: Policy) -> Decide:
    """A trained policy as the world's run calls it: its probabilities of every action, exploration
    included (drawn by the world rather than hashed per order id: the same distribution)."""
    def decide(frame: pd.DataFrame) -> dict[str, np.ndarray]:
        batch = policy.decide_frame(frame.assign(order_id=np.arange(len(frame)).astype(str)))
        return dict(zip(policy.slot_names, policy.probabilities(batch)))
    return decide


def retrained(config: TrainConfig, inspect: Callable[[Path], None] = lambda model: None) -> Learner:
    """``insertrec train`` on all the logs so far, the policy of the model it writes deployed;
    ``inspect`` is shown each model directory before it is removed (what training chose, for a bench)."""
    def learn(month: Month) -> Decide:
        with tempfile.TemporaryDirectory(prefix="insertrec-loop-") as tmp:
            train(month.data, Path(tmp) / "model", config)
            inspect(Path(tmp) / "model")
            return deployed(Engine.load(Path(tmp) / "model").policy)
    return learn


def month_values(world: World, month: Month) -> dict[str, float]:
    """The world's truth about one month: per-order means of the deployed, greedy, oracle, all-default
    and logging policies' expected values, the uplift captured (deployed and greedy) with the deployed
    one's standard error over the month's orders, and the month's regret (summed over its orders)."""
    combos = world.combos()
    truth = world.expected_reward(month.hidden, combos)
    eligible = world.catalog.eligible(month.features)
    ok = np.ones_like(truth, dtype=bool)
    for s, slot in enumerate(world.slots):
        ok &= eligible[slot][:, combos[:, s]]
    default = (combos == np.array([s.default_index for s in world.catalog.slots.values()])).all(axis=1)
    oracle = np.where(ok, truth, -np.inf).max(axis=1)
    value = (truth * month.probs).sum(axis=1)
    greedy = truth[np.arange(len(truth)), month.probs.argmax(axis=1)]
    control = truth[:, default].ravel()
    logging = month.logging_propensities()
    out = {"orders": float(len(truth)), "value_deployed": float(value.mean()), "value_greedy": float(greedy.mean()),
           "value_oracle": float(oracle.mean()), "value_control": float(control.mean()),
           "value_logging": float(expected_value(truth, [logging[s] for s in world.slots]).mean()),
           "regret": float((oracle - value).sum())}
    span = oracle - control
    out["uplift_capture"], out["uplift_capture_se"] = _capture(value - control, span)
    out["uplift_capture_greedy"] = _capture(greedy - control, span)[0]
    return out


def _capture(gain: np.ndarray, span: np.ndarray) -> tuple[float, float]:
    """mean(gain) / mean(span) and its standard error over the orders (delta method, a ratio of means)."""
    if not span.mean() > 0:
        return float("nan"), float("nan")
    ratio = gain.mean() / span.mean()
    se = (gain - ratio * span).std(ddof=1) / np.sqrt(len(gain)) / span.mean() if len(gain) > 1 else float("nan")
    return float(ratio), float(se)


def logged_orders(month: Month) -> int:
    """Orders in the month's log whose reward is known (what a learner given it can learn from)."""
    exposures = month.data.exposures
    return int(exposures.loc[exposures["reward"].notna(), "order_id"].nunique())


def closed_loop(world: World, rounds: int, learner: Learner, *, customers: int = 5000, seed: int = 0,
                judge_customers: int = 0,
                progress: Callable[[dict[str, float]], None] = lambda row: None) -> list[dict[str, float]]:
    """Per month of the loop, the world's truth about the policy ``learner`` deployed for it (see the
    module docstring); ``cumulative_regret`` sums the months' regrets so far, ``logged_orders`` counts
    the orders the learner could learn from; with ``judge_customers`` the ``judge_*`` keys are the
    same month's values on the twin shop."""
    if rounds < 1:
        raise InsertrecError(f"--rounds: expected at least 1 (got {rounds})")
    if judge_customers < 0:
        raise InsertrecError(f"judge_customers: expected 0 (no twin shop) or more (got {judge_customers})")
    start = world.days - rounds * MONTH_DAYS
    if start < world.horizon:
        raise InsertrecError(f"--rounds: {rounds} months of {MONTH_DAYS:g} days leave less than the horizon "
                             f"({world.horizon:g} days) of the world's {world.days:g} days to log before the loop")
    run = world.shop_run(customers, seed)
    month = run.advance(start)
    twin = world.shop_run(judge_customers, seed + JUDGE_SEED) if judge_customers else None
    if twin is not None:
        twin.advance(start)
    rows, total = [], 0.0
    for k in range(rounds):
        logged = logged_orders(month)
        decide = learner(month)
        until = start + (k + 1) * MONTH_DAYS
        month = run.advance(until, decide)
        row = {"round": float(k + 1), "logged_orders": float(logged), **month_values(world, month)}
        total += row["regret"]
        row["cumulative_regret"] = total
        if twin is not None:
            judged = month_values(world, twin.advance(until, decide))
            row |= {f"judge_{key}": judged[key] for key in JUDGED}
        rows.append(row)
        progress(row)
    return rows


__all__ = ["JUDGED", "JUDGE_SEED", "MONTH_DAYS", "Learner", "closed_loop", "deployed", "logged_orders", "month_values",
           "retrained"]
