"""The one place a box is decided: the rules answer for a model that fails, a batch job without
rules stops instead, and an action found unavailable is never chosen on the redo."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
from serving_helpers import EXAMPLE_CATALOG, POISON, PickyModel

from insertrec.catalog import Catalog
from insertrec.decide import Decider
from insertrec.engine import Engine
from insertrec.policy import Decision

GIFT = {"order_id": "o-1", "customer_id": "c-1", "order_ts": "2024-03-01T10:00:00+00:00", "order_value": 55.0,
        "n_items": 1, "channel": "web", "categories": ["apparel"], "is_gift": True}


@pytest.fixture(scope="module")
def rules() -> Engine:
    return Engine.rules_only(Catalog.load(EXAMPLE_CATALOG), epsilon=0.0)


class _Raising(Engine):
    def decide(self, *args: object, **kwargs: object) -> Decision:
        raise RuntimeError("model exploded")

    def decide_batch(self, *args: object, **kwargs: object) -> pd.DataFrame:
        raise RuntimeError("model exploded")


class _NotFinite(Engine):
    def decide(self, *args: object, **kwargs: object) -> Decision:
        return replace(super().decide(*args, **kwargs), expected_uplift=float("nan"))


@pytest.mark.parametrize("broken", [_Raising, _NotFinite])
def test_the_rules_answer_for_a_model_that_fails(rules, broken):
    model = broken(rules.policy, rules.params)
    decision = Decider(model, rules).decide(GIFT)
    assert decision.policy == "fallback"
    assert decision.slots["packaging"].action_id == "gift_wrap"   # the playbook's gift rule


def test_without_a_model_every_order_is_a_fallback_and_a_working_one_keeps_its_label(rules):
    assert Decider(None, rules).decide(GIFT).policy == "fallback"
    assert Decider(rules, rules).decide(GIFT).policy == "rules"


def test_a_batch_without_rules_stops_on_a_failing_model_and_with_rules_is_labelled_fallback(rules):
    orders = pd.DataFrame([GIFT | {"order_ts": pd.Timestamp(GIFT["order_ts"]), "categories": "apparel"}])
    model = _Raising(rules.policy, rules.params)
    with pytest.raises(RuntimeError, match="exploded"):
        Decider(model).decide_batch(orders)
    out = Decider(model, rules).decide_batch(orders)
    assert set(out["policy"]) == {"fallback"} and len(out) == len(rules.catalog.slots)


def test_the_redo_never_chooses_what_turned_out_unavailable(rules):
    decider = Decider(rules, rules)
    assert decider.decide(GIFT).slots["packaging"].action_id == "gift_wrap"
    redone = decider.decide(GIFT, unavailable=frozenset({"gift_wrap"}))
    assert redone.slots["packaging"].action_id == "standard_box"   # the playbook's pick gone: the default



@pytest.mark.parametrize("nan", [False, True])
def test_orders_decided_together_fall_back_one_by_one(rules, nan):
    """`Decider.decide_many`: each order gets what `decide` gives it alone; an order the model
    fails on (raising for the whole call, or a score that is not finite) is the only fallback."""
    model = PickyModel(rules.policy, rules.params, nan=nan)
    decider = Decider(model, rules)
    orders = [GIFT | {"order_id": f"o-{i}", "customer_id": f"c-{i}", "is_gift": i % 2 == 0,
                      "order_value": POISON if i == 3 else 20.0 + i} for i in range(6)]
    states = [rules.state(o["customer_id"]) for o in orders]
    gone = [frozenset({"gift_wrap"}) if i == 4 else frozenset() for i in range(6)]
    together = decider.decide_many(orders, states, gone)
    assert together == [decider.decide(*args) for args in zip(orders, states, gone)]
    assert [d.policy for d in together] == ["rules"] * 3 + ["fallback"] + ["rules"] * 2
    assert together[4].slots["packaging"].action_id != "gift_wrap"
