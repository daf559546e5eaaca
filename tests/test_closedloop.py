"""The closed loop: a world continued month by month under the deployed policy, judged by its truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from insertrec.closedloop import closed_loop, retrained
from insertrec.errors import InsertrecError
from insertrec.training import TrainConfig
from insertrec.world import World


def test_a_month_logs_the_deployed_policys_choices_and_only_what_the_shop_knows_by_its_end():
    world = World.default()
    run = world.shop_run(1500, seed=4)
    before = run.advance(300.0)
    defaults = {slot: np.eye(len(s.actions))[s.default_index] for slot, s in world.catalog.slots.items()}
    month = run.advance(330.0, lambda frame: {slot: np.tile(p, (len(frame), 1)) for slot, p in defaults.items()})

    data, ts = month.data, month.data.orders["order_ts"]
    end = world.start + pd.Timedelta(days=330)
    assert len(month.rows) > 50 and (ts < end).all()
    # the earlier log is kept as it was; this month's orders come after it
    assert list(data.orders["order_id"][: len(before.data.orders)]) == list(before.data.orders["order_id"])
    assert (ts.iloc[month.rows] >= world.start + pd.Timedelta(days=300)).all()
    ours = data.exposures[data.exposures["order_id"].isin(data.orders["order_id"].iloc[month.rows])]
    default_ids = {s.actions[s.default_index].id for s in world.catalog.slots.values()}
    assert set(ours["action_id"]) == default_ids and (ours["propensity"] == 1.0).all()
    assert np.allclose(month.probs.sum(axis=1), 1.0)
    # a reward is known once its horizon has passed, not before; nothing after the month's end is known
    order_ts = data.exposures["order_id"].map(dict(zip(data.orders["order_id"], ts)))
    mature = order_ts + pd.Timedelta(days=world.horizon) <= end
    assert data.exposures.loc[mature, "reward"].notna().all() and data.exposures.loc[~mature, "reward"].isna().all()
    assert (data.nps["response_ts"] < end).all() and (data.incidents["ts"] < end).all()


def test_rounds_that_leave_no_history_before_the_loop_are_refused():
    with pytest.raises(InsertrecError, match="--rounds"):
        closed_loop(World.default(), 30, lambda month: None)


@pytest.mark.slow
def test_the_retrained_policy_is_judged_each_round_and_is_no_worse_than_the_shops_logging_policy():
    models: list[set[str]] = []
    rows = closed_loop(World.default(), 3, retrained(TrainConfig(), lambda model: models.append(
        {p.name for p in model.iterdir()})), customers=2500, seed=2)

    assert [r["round"] for r in rows] == [1.0, 2.0, 3.0]
    assert len(models) == 3 and all({"manifest.json", "ope.json"} <= files for files in models)
    for r in rows:
        assert r["orders"] > 200
        assert r["value_control"] <= r["value_oracle"] and r["value_deployed"] <= r["value_oracle"]
        assert r["regret"] >= 0.0
    cumulative = [r["cumulative_regret"] for r in rows]
    assert cumulative == sorted(cumulative) and cumulative[-1] == pytest.approx(sum(r["regret"] for r in rows))
    # after learning from its own logs the deployed policy is worth at least the playbook it replaced
    deployed = np.mean([r["value_deployed"] for r in rows[1:]])
    logging = np.mean([r["value_logging"] for r in rows[1:]])
    assert deployed >= logging - 0.1


def _mostly_default(world: World):
    """A learner deploying, in every slot, the default action with 0.9 plus 0.1 spread over the eligible ones."""
    seen = []

    def learn(month):
        seen.append(month.data.orders["order_ts"].copy())

        def decide(frame: pd.DataFrame) -> dict[str, np.ndarray]:
            eligible = world.catalog.eligible(frame)
            out = {}
            for name, slot in world.catalog.slots.items():
                p = 0.1 * eligible[name] / eligible[name].sum(axis=1, keepdims=True)
                p[:, slot.default_index] += 0.9
                out[name] = p
            return out
        return decide
    return learn, seen


def test_each_round_reports_the_greedy_box_the_logged_orders_and_a_twin_shops_judgement_without_changing_the_loop():
    world = World.default()
    learner, seen = _mostly_default(world)
    plain = closed_loop(world, 2, learner, customers=1500, seed=3)
    learner, seen = _mostly_default(world)
    judged = closed_loop(world, 2, learner, customers=1500, seed=3, judge_customers=6000)

    # the twin shop never touches the loop: the orders decided, their values and the regret are the same
    assert [{k: v for k, v in r.items() if not k.startswith("judge_")} for r in judged] == plain
    for r in judged:
        # the greedy box of "0.9 default, 0.1 explore" is the default box; what exploring costs shows beside it
        assert r["value_greedy"] == r["value_control"] and r["uplift_capture_greedy"] == 0.0
        assert r["value_deployed"] != r["value_control"]
        assert r["judge_value_greedy"] == r["judge_value_control"] and r["judge_uplift_capture_greedy"] == 0.0
        # four times the customers: about four times the orders, half the standard error
        assert 3.0 < r["judge_orders"] / r["orders"] < 5.0
        assert 0.0 < r["judge_uplift_capture_se"] < r["uplift_capture_se"]
    # the learner could learn from the orders whose reward horizon had passed by the month's start
    for r, ts, k in zip(judged, seen, range(2)):
        start = world.start + pd.Timedelta(days=world.days - (2 - k) * 30.0 - world.horizon)
        assert r["logged_orders"] == (ts <= start).sum() > 0


def test_a_negative_twin_shop_is_refused():
    with pytest.raises(InsertrecError, match="judge_customers"):
        closed_loop(World.default(), 2, lambda month: None, judge_customers=-1)
