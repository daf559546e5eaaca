"""Training on logged data of any shape the SPEC allows, not only the demo world's."""

import dataclasses

import pandas as pd
import pytest
import yaml

from insertrec import modeldir
from insertrec.catalog import Catalog
from insertrec.engine import Engine
from insertrec.errors import InsertrecError, ModelError
from insertrec.ope import Estimate
from insertrec.policy import Policy
from insertrec.training import TrainConfig, _doubted_slots, history_before, train
from insertrec.world import World


@pytest.fixture(scope="module")
def history():
    return World.default().generate(customers=3000, seed=21).to_dataset()


def test_history_before_a_cutoff_keeps_only_the_exposures_of_the_orders_before_it(history):
    cutoff = history.orders["order_ts"].quantile(0.5)
    past = history_before(history, cutoff)
    kept = set(history.orders.loc[history.orders["order_ts"] < cutoff, "order_id"])
    assert set(past.orders["order_id"]) == kept
    expected = history.exposures[history.exposures["order_id"].map(kept.__contains__)]
    assert 0 < len(past.exposures) < len(history.exposures)
    pd.testing.assert_frame_equal(past.exposures, expected.reset_index(drop=True))


def test_without_exposures_a_new_shop_gets_the_playbook_with_exploration(history, tmp_path):
    data = dataclasses.replace(history, exposures=history.exposures.iloc[0:0])
    result = train(data, tmp_path / "m", TrainConfig())
    assert any("cold start" in note for note in result.notes)
    assert "policy_value_dr" not in result.metrics and "repeat_auc" in result.metrics
    engine = Engine.load(tmp_path / "m")
    assert engine.policy.value_model is None
    later = data.orders["order_ts"].max() + pd.Timedelta(days=1)
    decisions = engine.decide_batch(data.orders.head(300).assign(order_id=lambda f: "n" + f["order_id"],
                                                                 order_ts=later))
    assert set(decisions["policy"]) <= {"rules", "explore"} and "explore" in set(decisions["policy"])


def test_one_slot_derived_rewards_and_estimated_propensities(history, tmp_path):
    """A shop that logs only its coupon, no reward and no propensity: the run learns and says so."""
    spec = yaml.safe_load(history.catalog.text)
    spec["slots"] = {"coupon": spec["slots"]["coupon"]}
    spec["rules"] = [r | {"choose": {"coupon": r["choose"]["coupon"]}} for r in spec.get("rules", [])
                     if "coupon" in r["choose"]]
    catalog = Catalog.from_yaml(yaml.safe_dump(spec))
    exposures = history.exposures[history.exposures["slot"] == "coupon"].assign(
        propensity=float("nan"), reward=float("nan"))
    data = dataclasses.replace(history, exposures=exposures, catalog=catalog)
    result = train(data, tmp_path / "m", TrainConfig(horizon_days=60))
    assert any("estimated" in note for note in result.notes)
    engine = Engine.load(tmp_path / "m")
    assert engine.policy.value_model is not None and engine.policy.slot_names == ["coupon"]
    assert {"policy_value_dr", "rules_policy_value", "ess"} <= set(result.metrics)
    decision = engine.decide({"order_id": "x1", "customer_id": history.orders["customer_id"].iloc[-1],
                              "order_ts": history.orders["order_ts"].max() + pd.Timedelta(days=2),
                              "order_value": 80.0, "channel": "web"})
    assert list(decision.slots) == ["coupon"]
    assert decision.slots["coupon"].action_id in catalog.slots["coupon"].action_ids


def test_a_slot_is_doubted_where_the_log_shows_the_playbook_losing_not_where_it_cannot_tell():
    """`--pessimism auto` doubts a slot by the whole log's DR of the playbook's gain over the slot
    default (80% interval) weighed against a small positive prior: an estimate below zero whose
    interval is wide (the insert slot on the closed loop's first log, truly +1.0 per order) leaves
    the slot alone, a narrower one below zero (the small-effects world's coupon, truly -0.58) doubts
    it, and nothing to judge by (NaN) doubts it too. Figures as measured, reward sd 43."""
    policy = Policy(World.default().catalog)
    assert policy.slot_names == ["packaging", "insert", "coupon"]
    gains = [Estimate(0.10, -1.51, 1.80), Estimate(-2.89, -9.03, 1.66), Estimate(-0.49, -1.37, 0.34)]
    assert _doubted_slots(policy, gains, reward_scale=43.0) == ("coupon",)
    nothing = Estimate(float("nan"), float("nan"), float("nan"))
    assert _doubted_slots(policy, [gains[0], nothing, gains[2]], reward_scale=43.0) == ("insert", "coupon")
    assert _doubted_slots(policy, [Estimate(-0.3, -0.5, -0.1)] * 3, reward_scale=43.0) == tuple(policy.slot_names)


def test_the_gate_falls_back_to_the_default_only_in_the_slots_training_doubts(history):
    """The holdout gate compares the model in a slot with its fallback, and the fallback is the
    default exactly where `--pessimism auto` doubts the playbook: a playbook estimated a hair below
    zero but not doubted (the default world's packaging, 30,000 customers, seed 3: -0.002 [-0.28,
    0.26]) keeps the playbook as the yardstick. Judged against the default there, the model's
    packaging was "shown" worse (-1.70 [-2.73, -0.79], truly +0.23) and the default went out, 8.4
    points of the uplift lost. Without doubted slots (an explicit `--pessimism`) the estimate's sign
    decides, as before. "Shown worse" is beyond the judge's bias allowance (`bias_allowance`)."""
    from insertrec.encoding import FeatureEncoder
    from insertrec.evaluation import bias_allowance, judge_for, logged_orders, slot_deciders
    from insertrec.features import FeatureParams, order_features, order_rewards
    from insertrec.training import fit_policy

    catalog = history.catalog
    feats = order_features(history, FeatureParams.fit(history, catalog=catalog))
    costs = {a.id: a.cost for slot in catalog.slots.values() for a in slot.actions}
    logged = logged_orders(history, feats, order_rewards(history, horizon_days=60, costs=costs), catalog)
    late = (feats["order_ts"].iloc[logged.rows] >= feats["order_ts"].iloc[logged.rows].quantile(0.8)).to_numpy()
    encoder = FeatureEncoder().fit(feats)
    fitted = fit_policy(feats, logged.subset(~late), encoder, Policy(catalog), seed=0)
    judge = judge_for(fitted, feats, logged.subset(late), encoder)
    playbook = [Estimate(-0.002, -0.28, 0.26), Estimate(0.7, 0.1, 1.3), Estimate(-0.2, -0.6, 0.2)]
    for doubted, fallbacks in (((), ["playbook"] * 3), (("coupon",), ["playbook", "playbook", "default"]),
                               (None, ["default", "playbook", "default"])):
        deciders = slot_deciders(fitted.replace(doubted_slots=doubted), feats, judge, playbook)
        assert [deciders.gains[name]["fallback"] for name in fitted.slot_names] == fallbacks, doubted
        for name, fallback in zip(fitted.slot_names, fallbacks):
            shown_worse = deciders.gains[name][f"model_vs_{fallback}"]["high"] < -bias_allowance(judge)
            assert (name in deciders.playbook_slots) == (shown_worse and fallback == "playbook")
            assert (name in deciders.default_slots) == (shown_worse and fallback == "default")


def test_the_gate_gives_a_slot_to_its_fallback_only_beyond_the_judges_bias_allowance() -> None:
    """The seed-1 packaging figures of the three-way blend's holdout (-1.12 [-1.94, -0.28] per order
    against the playbook, the ungated model truly 2.7 points better) keep the model; a model shown
    worse by more than the allowance (0.05 reward sd, ~2.1 per order at the default world's
    spread) is gated."""
    import numpy as np

    from insertrec.evaluation import LoggedOrders, bias_allowance, slot_deciders
    from insertrec.features import FeatureParams, order_features
    from insertrec.ope import LoggedFeedback

    data = World.default().generate(customers=200, seed=3).to_dataset()
    feats = order_features(data, FeatureParams.fit(data, catalog=data.catalog))
    n = len(feats)
    figures = {0: Estimate(-1.12, -1.94, -0.28), 1: Estimate(-3.9, -5.0, -2.8), 2: Estimate(0.3, -0.2, 0.8)}

    class Judge:
        logged = LoggedOrders(np.arange(n), LoggedFeedback(np.random.default_rng(0).normal(35, 42.7, n),
                                                           np.zeros((n, 3), dtype=int), np.ones((n, 3))), "logged")

        def judge_difference(self, a, b, seed=0, slot=None, level=0.8):
            return figures[slot]

    judge = Judge()
    assert 1.8 < bias_allowance(judge) < 2.4
    policy = Policy(data.catalog, epsilon=0.0, doubted_slots=())
    deciders = slot_deciders(policy, feats, judge, [Estimate(0.4, 0.1, 0.7)] * 3)
    assert deciders.playbook_slots == (policy.slot_names[1],) and deciders.default_slots == ()


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "1", True])
def test_pessimism_must_be_a_finite_number_of_standard_errors_not_below_zero(value):
    with pytest.raises(InsertrecError, match="--pessimism: .* is neither 'auto' nor a finite number >= 0"):
        TrainConfig(pessimism=value)


def test_a_model_pickled_before_classes_moved_is_refused_with_a_reason(tmp_path):
    """A model trained before ``features`` became a package names ``insertrec.features._Layout``;
    loading it must say to retrain, not fail with a traceback."""
    old = b"cinsertrec.features\n_Layout\n)\x81."    # pickle protocol 0: an instance of the old class
    modeldir.save(tmp_path, {}, {"engine.joblib": old}, {})
    with pytest.raises(ModelError, match="Retrain the model with this version"):
        Engine.load(tmp_path)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1", True])
def test_epsilon_must_be_auto_or_a_share_from_0_to_1(value):
    with pytest.raises(InsertrecError, match="--epsilon: .* is neither 'auto' nor a share of decisions from 0 to 1"):
        TrainConfig(epsilon=value)


def test_by_default_each_slot_explores_the_share_the_run_recommends(history, tmp_path):
    """`train --epsilon auto` (the default): the recommendation is what the engine serves, slot by
    slot, and the manifest and report say so."""
    import json

    result = train(history, tmp_path / "m", TrainConfig())
    recommended = {slot: a["recommended_epsilon"]
                   for slot, a in json.loads((tmp_path / "m" / "ope.json").read_text())["exploration"].items()}
    assert recommended.keys() == set(history.catalog.slots)
    assert Engine.load(tmp_path / "m").policy.slot_epsilon == recommended == result.manifest["served_epsilon"]
    assert result.manifest["params"]["epsilon"] == "auto"
    assert "Served: each slot explores the share recommended here" in (tmp_path / "m" / "report.html").read_text()


def test_a_cold_start_explores_the_cold_start_share_in_every_slot(history, tmp_path):
    from insertrec.training import COLD_START_EPSILON

    result = train(history, tmp_path / "m", TrainConfig(min_logged_orders=10**9))
    assert Engine.load(tmp_path / "m").policy.slot_epsilon == dict.fromkeys(history.catalog.slots, COLD_START_EPSILON)
    assert result.manifest["served_epsilon"] == dict.fromkeys(history.catalog.slots, COLD_START_EPSILON)


def test_the_run_recommends_an_exploration_share_per_slot_and_a_number_serves_one_share(history, tmp_path):
    import json

    from insertrec.explorationshare import MAX_EPSILON, MIN_EPSILON

    result = train(history, tmp_path / "m", TrainConfig(epsilon=0.1))
    ope = json.loads((tmp_path / "m" / "ope.json").read_text())
    slots = list(history.catalog.slots)
    assert set(ope["exploration"]) == set(slots)
    gated = set(ope["slot_deciders"]["playbook_slots"]) | set(ope["slot_deciders"]["default_slots"])
    for slot, advice in ope["exploration"].items():
        assert MIN_EPSILON <= advice["recommended_epsilon"] <= MAX_EPSILON
        assert advice["reason"]
        if slot in gated:
            assert advice["recommended_epsilon"] == MIN_EPSILON
        assert result.metrics[f"exploration_recommended_epsilon_{slot}"] == advice["recommended_epsilon"]
    served = dict.fromkeys(slots, 0.1)                               # a recommendation, not applied
    assert Engine.load(tmp_path / "m").policy.slot_epsilon == served == result.manifest["served_epsilon"]
    page = (tmp_path / "m" / "report.html").read_text()
    assert "How much to explore" in page and "train with --epsilon auto to serve the recommended shares" in page


@pytest.mark.parametrize("gate_orders", [100_000, 1_000])
def test_a_holdout_of_gate_orders_or_more_judges_the_playbook_too(history, tmp_path, monkeypatch, gate_orders):
    """The playbook's evidence comes from the latest GATE_ORDERS logged orders (every one, on most
    shops); where the holdout alone holds that many, they are its latest and the holdout's judge
    judges them: one judge fewer (the budget of a million-order run, bench/results/budget.md §5)."""
    import json

    import insertrec.training as training

    judged: list[int] = []
    judge_for = training.judge_for

    def counted(policy, feats, logged, *args, **kwargs):
        judged.append(len(logged))
        return judge_for(policy, feats, logged, *args, **kwargs)

    gains = training.playbook_gains

    def judged_on(policy, feats, judge, *args, **kwargs):
        judged.append(-len(judge.logged))
        return gains(policy, feats, judge, *args, **kwargs)

    monkeypatch.setattr(training, "judge_for", counted)
    monkeypatch.setattr(training, "playbook_gains", judged_on)
    monkeypatch.setattr(training, "GATE_ORDERS", gate_orders)
    train(history, tmp_path / "m", TrainConfig())
    ope = json.loads((tmp_path / "m" / "ope.json").read_text())
    holdout, every = ope["orders"], ope["orders"] + ope["train_orders"]
    assert holdout >= 1_000 and every < 100_000
    # judges built (their orders), and the orders the playbook was judged on (negated)
    assert judged == ([every, -every, holdout] if gate_orders == 100_000 else [holdout, -gate_orders])


@pytest.mark.parametrize("prior_strength, z, said", [(0.0, 1.0, "standard error"), (float("inf"), 0.0, "without a penalty")])
def test_the_doubts_penalty_holds_only_where_the_ridge_shrinks_its_estimates_to_the_prior(
        history, tmp_path, monkeypatch, prior_strength, z, said):
    """In a doubted slot the penalty stands against the value model's playbook prior; where the ridge's
    cross-validation shrinks less than `PRIOR_STRENGTH` the data outweigh that prior, and the estimates
    decide without it (`training._estimates_are_the_prior`). The rest of the doubt stays: the default
    is the gate's fallback there and exploration its floor. The slots are doubted here whatever this
    history's evidence, and the strength is set either side of every strength the ridge can choose."""
    import json

    import insertrec.training as training

    slots = tuple(Policy(history.catalog).slot_names)
    monkeypatch.setattr(training, "_doubted_slots", lambda policy, playbook, reward_scale: slots)
    monkeypatch.setattr(training, "PRIOR_STRENGTH", prior_strength)
    result = train(history, tmp_path / "m", TrainConfig())
    policy = Engine.load(tmp_path / "m").policy
    assert (policy.pessimism, policy.doubted_slots) == (z, slots)
    ope = json.loads((tmp_path / "m" / "ope.json").read_text())
    assert ope["pessimism"] == {"z": z, "chosen": True, "doubted_slots": list(slots)}
    assert [g["fallback"] for g in ope["slot_deciders"]["gains"].values()] == ["default"] * len(slots)
    assert any(said in note for note in result.notes), result.notes
