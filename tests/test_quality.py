"""Decision quality against worlds whose truth is known, and that the code has never seen.

Each test generates a fresh history from a world (the default one, and one
whose effects were re-dealt: which tier answers to which action, and how
strongly), trains on it exactly as `insertrec train` does, and then asks the
world what the learned policy is truly worth. Nothing here compares the model
with its own output.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from insertrec.engine import Engine
from insertrec.evaluation import MAX_VALUE_HALFWIDTH, evaluate, logged_orders, policy_probabilities
from insertrec.features import order_features, order_rewards
from insertrec.ope import expected_value
from insertrec.policy import Policy
from insertrec.simulation import simulate
from insertrec.training import TrainConfig, train
from insertrec.world import World

pytestmark = pytest.mark.slow

CUSTOMERS = 30_000
EXTRA_DR_CASES = [("default", 1), ("perturbed", 1), ("perturbed", 2)]


WORLDS = Path(__file__).resolve().parents[1] / "bench" / "worlds"


def _world(kind: str) -> World:
    """The default world, a perturbed one, or a changed world of bench/worlds/ by name."""
    if kind in ("default", "perturbed"):
        world = World.default()
        return world if kind == "default" else world.perturbed(seed=2026)
    return World.load(WORLDS / f"{kind}.json")


def _trained(kind: str, seed: int, tmp_path_factory) -> tuple:
    world = _world(kind)
    generated = world.generate(customers=CUSTOMERS, seed=seed)
    out = tmp_path_factory.mktemp(f"{kind}-{seed}") / "model"
    cutoff = generated.orders["order_ts"].quantile(0.8)   # the last fifth stays unseen, for OPE
    train(generated.to_dataset(), out, TrainConfig(cutoff=cutoff.isoformat()))
    return kind, world, generated, Engine.load(out), cutoff


@pytest.fixture(scope="module", params=["default", "perturbed"])
def trained(request, tmp_path_factory):
    return _trained(request.param, 4242, tmp_path_factory)


# DR on one history can pass by luck: on these holdouts its error has a bias of about -1% and a
# bootstrap sd of about 2%, and 10 of 12 histories measured were within 5% (bench/dr_bias.py:
# perturbed seeds 5 and 6 were not). Seeds 1 and 2 of the perturbed world missed by 7-9% before
# the judge was fixed. More histories, each trained once (~27 s), only for DR.
@pytest.fixture(scope="module", params=EXTRA_DR_CASES, ids=[f"{k}-{s}" for k, s in EXTRA_DR_CASES])
def trained_elsewhere(request, tmp_path_factory):
    return _trained(*request.param, tmp_path_factory)


def test_learned_policy_beats_the_playbook_the_logging_policy_and_doing_nothing(trained):
    kind, world, _, engine, _ = trained
    sim = simulate(engine, world, orders=4000, seed=99)
    print(kind, json.dumps(sim, indent=1))
    assert sim["value_model"] > 1.01 * sim["value_rules"]
    assert sim["value_model"] > 1.02 * sim["value_logging"]
    assert sim["value_model"] > sim["value_control"] > sim["value_random"]
    assert sim["uplift_capture"] > 0.25
    assert sim["value_oracle"] >= sim["value_model_greedy"] >= sim["value_model"]


def _dr_and_truth(world, generated, engine, cutoff) -> tuple[dict, dict, dict[str, float]]:
    """`evaluate`'s metrics and report on the orders after the cutoff (never trained on), and the
    true value on the same orders of the model (as deployed), the playbook and the logging policy."""
    data = generated.to_dataset()
    feats = order_features(data, engine.params)
    costs = {a.id: a.cost for slot in engine.catalog.slots.values() for a in slot.actions}
    logged = logged_orders(data, feats, order_rewards(data, horizon_days=60, costs=costs), engine.catalog)
    late = logged.subset((feats["order_ts"].iloc[logged.rows] >= cutoff).to_numpy())  # never trained on
    metrics, report = evaluate(engine.policy, feats, late, engine.policy.encoder)
    sub = feats.iloc[late.rows]
    truth = world.expected_reward(generated.hidden.iloc[late.rows].reset_index(drop=True), engine.policy.combos)
    policies = {"model": engine.policy, "rules": Policy(engine.catalog, epsilon=0.0),
                "logging": Policy(engine.catalog, epsilon=world.epsilon)}
    return metrics, report, {name: float(expected_value(truth, policy_probabilities(p, sub)).mean())
                             for name, p in policies.items()}


def _dr_value_agrees_or_is_withheld(case) -> None:
    """DR's value of the model: where evaluate prints it, its 95% interval holds the true value on the
    same orders and it is within 5% of it; where it withholds it (an interval wider than
    MAX_VALUE_HALFWIDTH of it, or actions the log never tried), it is NaN and the report says why.
    On the default world's 30,000-customer histories it is printed: a rule withholding everything fails."""
    kind, world, generated, engine, cutoff = case
    metrics, report, true = _dr_and_truth(world, generated, engine, cutoff)
    dr, value = report["model"]["dr"], report["value"]
    print(kind, json.dumps(dr), json.dumps(value), json.dumps(true))
    assert (metrics["policy_value_dr_low"], metrics["policy_value_dr_high"]) == (dr["low"], dr["high"])
    if kind == "default":
        assert not value["withheld"], value
    if value["withheld"]:
        assert np.isnan(metrics["policy_value_dr"]) and np.isnan(metrics["policy_value_ips"]), metrics
        too_wide = (dr["high"] - dr["low"]) / 2 > MAX_VALUE_HALFWIDTH * abs(dr["value"])
        assert "the model's value" in value["why"] and ("wider than" in value["why"]) == too_wide, value
        return
    assert dr["low"] <= true["model"] <= dr["high"], (dr, true)
    assert abs(metrics["policy_value_dr"] - true["model"]) < 0.05 * abs(true["model"]), (metrics, true)


def test_dr_estimate_is_within_five_percent_of_the_true_value_of_the_same_policy_or_withheld(trained):
    _dr_value_agrees_or_is_withheld(trained)


def test_dr_estimate_is_within_five_percent_on_other_histories_too_or_withheld(trained_elsewhere):
    _dr_value_agrees_or_is_withheld(trained_elsewhere)


# A world where coupons pay only for lapsed price-sensitive customers: the model's coupons sit where
# the log rarely has them, 76% of its weight mass past DR's clip, and clipped DR's lift against the
# rules missed the truth by -9.2 points (seed 1) with an interval of +-3.4 that did not hold it.
@pytest.fixture(scope="module")
def trained_changed(tmp_path_factory):
    return _trained("coupons_waste", 1, tmp_path_factory)


def _lifts_agree_or_are_withheld(case) -> None:
    """#11.6: each lift's 95% interval (DR-PI, the one that decides whether it is printed) holds the
    true lift on the same orders; a printed lift is within 3 points of it; a withheld one is NaN."""
    _, world, generated, engine, cutoff = case
    metrics, report, true = _dr_and_truth(world, generated, engine, cutoff)
    print(json.dumps(metrics), json.dumps(report["lifts"]), json.dumps(true))
    for lift, base in (("lift_vs_rules", "rules"), ("lift_vs_logging", "logging")):
        truth, interval = true["model"] / true[base] - 1, report["lifts"][lift]
        assert interval["low"] <= truth <= interval["high"], (lift, interval, truth)
        if (interval["high"] - interval["low"]) / 2 > 0.03:
            assert np.isnan(metrics[lift]) and lift in report["lifts"]["why"], (lift, report["lifts"])
        else:
            assert abs(metrics[lift] - truth) < 0.03, (lift, metrics, true)


def test_dr_lifts_agree_with_the_truth_or_are_withheld(trained):
    _lifts_agree_or_are_withheld(trained)


def test_dr_lifts_agree_with_the_truth_or_are_withheld_on_other_histories(trained_elsewhere):
    _lifts_agree_or_are_withheld(trained_elsewhere)


def test_dr_lifts_agree_with_the_truth_or_are_withheld_where_coupons_mostly_waste(trained_changed):
    _lifts_agree_or_are_withheld(trained_changed)


def _scaled_effects(world: World, factor: float) -> World:
    """The world with every action effect (logit, return and satisfaction terms) and every slot
    interaction multiplied by ``factor``, through its world.json; costs and discounts unchanged."""
    def scale(node):
        if isinstance(node, dict):
            return {k: v if k.startswith("_") else scale(v) for k, v in node.items()}
        return node * factor if isinstance(node, float | int) and not isinstance(node, bool) else node

    spec = json.loads(world.to_json())
    effects = spec["effects"]
    effects["actions"] = scale(effects["actions"])
    effects["interactions"] = [{**inter, "logit": scale(inter["logit"])} for inter in effects["interactions"]]
    return World(spec)


# Where effects are small (all x0.25) the playbook loses money against sending nothing, and the model
# as it was gave a 10% coupon on a third of the orders: on this history its true value was 1.07% below
# the all-default box as deployed (0.18% greedy). On a small history (5,000 customers) the model cannot
# learn much and must not do worse than the playbook, nor than sending nothing where the playbook
# loses money (small effects; a world whose playbook is wrong, bench/worlds/playbook_wrong.json). The
# values are exact (the truth of every box on the same 4,000 fresh orders), so the margins are for the
# decisions' own errors, not for sampling: 0.5% for the greedy box (the gate decides each slot on
# estimates whose sd at these sizes is 1-2% of the value; one wrong call measured 0.6%), 0.75% as
# deployed (exploration, epsilon 0.1, measured 0.35-0.55% with the gap-weighted draw, 0.6-0.9%
# uniform). Before the gate required the model to earn its place where the playbook is shown to lose,
# and exploration there was cut to the floor, small effects at 5,000 customers measured
# -2.6% greedy / -3.0% deployed against the all-default box (seed 1).


# Not held with the estimates deciding everywhere (pessimism 0): small effects at 5,000 customers
# measured -2.8% greedy against the all-default box (seed 11). It is held by the default, `--pessimism
# auto`: where the log's evidence, weighed against a small prior in the playbook's favour, does not show
# the playbook paying, its action goes out only where its estimated gain clears one standard error and
# the slot's other actions a quarter of one (`Policy.doubted_slots`, `training._doubted_slots`), and
# exploration there is the floor alone; seed 11 measured greedy +0.07%, deployed -0.22% (-0.49% while
# the doubted slot's exploration still drew a softmax over its estimates, so 0.35% there fails without
# it). Before the doubt weighed the estimate's width, a short log the model wrote itself (the closed loop
# at 4,000 customers) doubted slots whose playbook pays and captured 0.03-0.22 of the uplift per round
# instead of 0.44-0.46 (bench/results/doubt_prior.md).
# Every action's gain less one standard error in every slot (`--pessimism 1`) holds it too but costs
# the worlds whose gains are real more. A gate that made the model earn its place wherever the
# playbook's estimate was not positive held it, but cost the perturbed world at 30,000 customers
# most of its uplift and the closed loop its first rounds, so it is taken out (`slot_deciders`).
@pytest.mark.parametrize("kind, customers, deployed_margin", [
    ("small_effects", 30_000, 0.0075), ("playbook_wrong", 5_000, 0.0075), ("default", 5_000, 0.0075),
    ("small_effects", 5_000, 0.0035)])
def test_the_deployed_policy_is_not_worse_than_doing_nothing_or_the_playbook(kind, customers, deployed_margin,
                                                                             tmp_path):
    """Trained as the README trains it (the default `--pessimism auto`)."""
    world = {"small_effects": lambda: _scaled_effects(World.default(), 0.25),
             "playbook_wrong": lambda: _world("playbook_wrong"),
             "default": World.default}[kind]()
    generated = world.generate(customers=customers, seed=11)
    train(generated.to_dataset(), tmp_path / "model", TrainConfig(seed=11))
    sim = simulate(Engine.load(tmp_path / "model"), world, orders=4000, seed=98)
    print(kind, customers, json.dumps(sim, indent=1))
    floor = max(sim["value_control"], sim["value_rules"])
    assert sim["value_model_greedy"] >= (1 - 0.005) * floor, sim
    assert sim["value_model"] >= (1 - deployed_margin) * floor, sim
