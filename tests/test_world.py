"""The simulated world: its data is consistent with its truth, and its truth is world.json's."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insertrec.data import load_data
from insertrec.errors import InsertrecError
from insertrec.features import FeatureParams, order_features
from insertrec.world import World, WorldError
from insertrec.world.simulation import _Run


@pytest.fixture(scope="module")
def world() -> World:
    return World.default()


@pytest.fixture(scope="module")
def history(world):
    """~7,000 logged orders of the default world."""
    return world.generate(3000, seed=11)


@pytest.fixture(scope="module")
def evaluation(world):
    return world.evaluation_set(1000, seed=5)


def _combo_index(world: World, data) -> np.ndarray:
    """Row of world.combos() that each order of ``data`` received (orders' row order)."""
    wide = data.exposures.pivot(index="order_id", columns="slot", values="action_id").loc[data.orders["order_id"]]
    idx = np.zeros(len(wide), dtype=np.intp)
    for name, slot in world.catalog.slots.items():
        idx = idx * len(slot.actions) + wide[name].map({a: j for j, a in enumerate(slot.action_ids)}).to_numpy()
    return idx


def _values(world: World, ev) -> dict[str, np.ndarray]:
    """True per-order value of the oracle and of the reference policies on an evaluation set."""
    combos = world.combos()
    truth = world.expected_reward(ev.hidden, combos)
    eligible = world.catalog.eligible(ev.features)
    rules = world.catalog.rules_choice(ev.features)
    ok = np.ones(truth.shape, dtype=bool)
    for s, name in enumerate(world.slots):
        ok &= eligible[name][:, combos[:, s]]

    def product_policy(probs: dict[str, np.ndarray]) -> np.ndarray:
        weight = np.ones_like(truth)
        for s, name in enumerate(world.slots):
            weight *= probs[name][:, combos[:, s]]
        return (weight * truth).sum(axis=1)

    def onehot(choice: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.eye(len(slot.actions))[choice[name]] for name, slot in world.catalog.slots.items()}

    n = len(ev.order_ids)
    default = {name: np.full(n, slot.default_index) for name, slot in world.catalog.slots.items()}
    return {
        "oracle": np.where(ok, truth, -np.inf).max(axis=1),
        "rules": product_policy(onehot(rules)),
        "default": product_policy(onehot(default)),
        "logging": product_policy(ev.logging_propensities()),
        "random": product_policy({k: e / e.sum(axis=1, keepdims=True) for k, e in eligible.items()}),
    }


# ------------------------------------------------------------------ generation

def test_generation_is_deterministic_per_seed(world):
    a, b, c = world.generate(400, seed=3), world.generate(400, seed=3), world.generate(400, seed=4)
    for name in ("orders", "nps", "exposures", "incidents", "hidden"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert not a.orders["order_value"].equals(c.orders["order_value"])


def test_demo_data_directory_passes_the_loader(world, tmp_path):
    world.write_demo_data(tmp_path, customers=600, seed=2)
    data = load_data(tmp_path)
    generated = world.generate(600, seed=2)
    assert len(data.rejected) == 0
    for name in ("orders", "nps", "exposures", "incidents"):
        assert len(getattr(data, name)) == len(getattr(generated, name)), name
    assert len(data.exposures) == 3 * len(data.orders)
    assert data.catalog is not None and data.catalog.sha256 == world.catalog.sha256
    # every order's three rows carry the same realized reward; propensities are probabilities
    assert (data.exposures.groupby("order_id")["reward"].nunique() == 1).all()
    assert data.exposures["propensity"].between(0, 1, inclusive="right").all()
    assert (data.orders["returned_value"] <= data.orders["order_value"]).all()
    reloaded = World.load(tmp_path / "world.json")
    assert reloaded.to_json() == world.to_json()


def test_propensities_are_the_logging_policys_exact_probabilities(world, history):
    """Logged propensity == 1-eps+eps/k for the rules' choice, eps/k otherwise, as the engine sees it."""
    data = history.to_dataset()
    feats = order_features(data, FeatureParams.fit(data))
    eligible, rules = world.catalog.eligible(feats), world.catalog.rules_choice(feats)
    eps = world.epsilon
    for name, slot in world.catalog.slots.items():
        logged = history.exposures[history.exposures["slot"] == name].set_index("order_id").loc[feats["order_id"]]
        chosen = logged["action_id"].map({a: j for j, a in enumerate(slot.action_ids)}).to_numpy()
        k = eligible[name].sum(axis=1)
        is_rule = chosen == rules[name]
        assert eligible[name][np.arange(len(chosen)), chosen].all(), name
        expected = np.where(is_rule, 1 - eps + eps / k, eps / k)
        np.testing.assert_allclose(logged["propensity"].to_numpy(), expected, rtol=1e-9, err_msg=name)
        # and the policy really draws with those probabilities
        p_rule = 1 - eps + eps / k
        se = np.sqrt((p_rule * (1 - p_rule)).sum()) / len(k)
        assert abs(is_rule.mean() - p_rule.mean()) < 4 * se + 1e-9, name


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), customers=st.integers(1, 150), nps_ttl=st.integers(1, 400),
       lapse=st.integers(1, 200), return_window=st.integers(1, 60), incident_window=st.integers(1, 120),
       nps_rate=st.floats(0.0, 1.0))
def test_simulator_features_equal_order_features_on_the_same_history(world, seed, customers, nps_ttl, lapse,
                                                                    return_window, incident_window, nps_rate):
    """The features the world decided on are exactly the offline features of the history it wrote,
    column for column: every quality claim rests on the logging policy seeing what the engine sees."""
    spec = copy.deepcopy(world.spec)
    spec["observed"].update(nps_ttl_days=nps_ttl, lapse_days=lapse, return_window_days=return_window,
                            incident_window_days=incident_window)
    spec["nps"].update(responder_rate=nps_rate, other_rate=nps_rate / 2)
    run = _Run(World(spec), customers, seed, keep_features=True)
    data, simulated = run.run()
    offline = order_features(data.to_dataset(), run.params)
    assert list(simulated.columns) == list(offline.columns)
    for name in offline.columns:
        a, b = simulated[name].to_numpy(), offline[name].to_numpy()
        if pd.api.types.is_numeric_dtype(offline[name]) and not pd.api.types.is_bool_dtype(offline[name]):
            np.testing.assert_array_equal(a.astype(float), b.astype(float), err_msg=name)
        else:
            assert [str(v) for v in a] == [str(v) for v in b], name


def test_feature_windows_of_a_world_are_whole_days(world):
    spec = copy.deepcopy(world.spec)
    spec["observed"]["lapse_days"] = 7.5
    with pytest.raises(WorldError, match="whole number of days") as err:
        World(spec)
    assert err.value.field == "observed.lapse_days"


def test_logged_rewards_are_unbiased_draws_of_the_expected_reward(world, history):
    truth = world.expected_reward(history.hidden, world.combos())
    expected = truth[np.arange(len(truth)), _combo_index(world, history)]
    logged = history.exposures.groupby("order_id", sort=False)["reward"].first().loc[history.orders["order_id"]]
    resid = logged.to_numpy() - expected
    assert abs(resid.mean()) < 4 * resid.std() / np.sqrt(len(resid))
    # also within groups an action bias would show in: the coupon received (discount paid on return)
    coupon = history.exposures[history.exposures["slot"] == "coupon"].set_index("order_id").loc[
        history.orders["order_id"], "action_id"].to_numpy()
    for action in np.unique(coupon):
        r = resid[coupon == action]
        assert abs(r.mean()) < 4 * r.std() / np.sqrt(len(r)) + 0.05, action


def test_plausible_magnitudes(world, history):
    o = history.orders
    per_customer = o.groupby("customer_id").size()
    first = o.groupby("customer_id")["order_ts"].min()
    early = first[first < world.start + pd.Timedelta(days=365)].index   # a year to come back
    assert 0.25 <= (per_customer.loc[early] > 1).mean() <= 0.45
    assert 1.8 <= per_customer.mean() <= 5
    apparel = o["categories"].str.startswith("apparel")
    apparel_returns = o.loc[apparel, "returned_value"].sum() / o.loc[apparel, "order_value"].sum()
    assert 0.25 <= apparel_returns <= 0.45
    assert 0.10 <= o["returned_value"].sum() / o["order_value"].sum() <= 0.25
    assert 0.08 <= len(history.nps) / len(o) <= 0.25
    assert history.nps["customer_id"].nunique() / o["customer_id"].nunique() < 0.5   # only some ever answer
    assert 0.03 <= len(history.incidents) / len(o) <= 0.08
    assert 30 <= o["order_value"].mean() <= 120


# ------------------------------------------------------------------ truth and oracle

def test_expected_reward_is_vectorized_and_fast(world, history):
    hidden = pd.concat([history.hidden] * 2, ignore_index=True).iloc[:5000]
    combos = world.combos()
    world.expected_reward(hidden.iloc[:10], combos)
    start = time.perf_counter()
    truth = world.expected_reward(hidden, combos)
    assert time.perf_counter() - start < 1.0        # tens of ms normally; loose for a shared machine
    assert truth.shape == (5000, len(combos)) and np.isfinite(truth).all()
    np.testing.assert_allclose(world.expected_reward(hidden.iloc[7:8], combos[5:9]), truth[7:8, 5:9])


def test_oracle_beats_every_policy_and_clearly_beats_rules_and_control(world, evaluation):
    values = _values(world, evaluation)
    for name in ("rules", "default", "logging", "random"):
        assert (values["oracle"] >= values[name] - 1e-9).all(), name
    means = {k: v.mean() for k, v in values.items()}
    assert means["oracle"] >= 1.08 * means["rules"]
    assert means["oracle"] >= 1.08 * means["default"]


def test_evaluation_set_holds_only_the_past_of_its_orders(world, evaluation):
    ev = evaluation
    assert len(ev.order_ids) == 1000 == len(ev.hidden) == len(ev.features)
    assert (ev.hidden["order_id"].to_numpy() == ev.order_ids).all()
    orders = ev.data.orders
    assert orders["order_id"].isin(ev.order_ids).sum() == 1000
    assert not ev.data.exposures["order_id"].isin(ev.order_ids).any()
    at = orders.set_index("order_id").loc[ev.order_ids, ["customer_id", "order_ts"]]
    cut = dict(zip(at["customer_id"], at["order_ts"]))
    later = orders["customer_id"].map(cut).lt(orders["order_ts"])
    assert not later.any()
    assert not ev.data.nps["customer_id"].map(cut).le(ev.data.nps["response_ts"]).any()
    probs = ev.logging_propensities()
    eligible = world.catalog.eligible(ev.features)
    for name, p in probs.items():
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        assert (p[~eligible[name]] == 0).all()


def _edited(world: World, edit) -> World:
    spec = copy.deepcopy(world.spec)
    edit(spec)
    return World(spec)


def test_changing_one_effect_changes_the_truth_and_the_oracle(world, history):
    hidden = history.hidden.iloc[:3000].reset_index(drop=True)
    combos = world.combos()
    insert = world.slots.index("insert")
    referral = world.catalog.slots["insert"].action_ids.index("referral_card")
    with_card = combos[:, insert] == referral

    def boost(spec):
        spec["effects"]["actions"]["insert"]["referral_card"]["logit"]["tier"]["detractor"] = 3.0

    changed = _edited(world, boost)
    before, after = world.expected_reward(hidden, combos), changed.expected_reward(hidden, combos)
    detractor = (hidden["tier"] == "detractor").to_numpy()
    assert (after[np.ix_(detractor, with_card)] > before[np.ix_(detractor, with_card)]).all()
    np.testing.assert_array_equal(after[~detractor], before[~detractor])
    np.testing.assert_array_equal(after[:, ~with_card], before[:, ~with_card])
    assert with_card[before[detractor].argmax(axis=1)].mean() < 0.2
    assert with_card[after[detractor].argmax(axis=1)].mean() > 0.9

    def free_coupon(spec):
        spec["reward"]["discount"]["next_order_20"] = 0.0

    cheaper = _edited(world, free_coupon).expected_reward(hidden, combos)
    coupon20 = combos[:, world.slots.index("coupon")] == world.catalog.slots["coupon"].action_ids.index("next_order_20")
    assert (cheaper[:, coupon20] > before[:, coupon20]).all()


def test_perturbed_worlds_reassign_the_truth(world, history):
    hidden = history.hidden.iloc[:3000].reset_index(drop=True)
    combos = world.combos()
    a, b = world.perturbed(1), world.perturbed(2)
    assert a.to_json() == world.perturbed(1).to_json()          # deterministic per seed
    assert a.catalog.sha256 == world.catalog.sha256              # same structure
    np.testing.assert_allclose(world.perturbed(9, strength=0.0).expected_reward(hidden, combos),
                               world.expected_reward(hidden, combos))
    best = [w.expected_reward(hidden, combos).argmax(axis=1) for w in (world, a, b)]
    assert (best[0] != best[1]).mean() > 0.3 and (best[1] != best[2]).mean() > 0.3
    assert json.loads(a.to_json())["_perturbation"] == {"seed": 1, "strength": 1.0}


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("edit, field", [
    (lambda s: s.pop("horizon_days"), "horizon_days"),
    (lambda s: s.update(colour="blue"), "colour"),
    (lambda s: s["customer_types"][1].update(eco=[2]), "customer_types[1].eco"),
    (lambda s: s["categories"]["apparel"].update(return_rate=1.5), "categories.apparel.return_rate"),
    (lambda s: s["effects"]["actions"]["insert"].update(magic_card={"logit": {"base": 1}}),
     "effects.actions.insert.magic_card"),
    (lambda s: s["effects"]["actions"]["coupon"]["next_order_10"]["logit"]["tier"].update(pasive=0.1),
     "effects.actions.coupon.next_order_10.logit.tier.pasive"),
    (lambda s: s["reward"]["discount"].update(bogus=0.1), "reward.discount.bogus"),
    (lambda s: s["effects"]["interactions"][0]["actions"].update(insert="nope"),
     "effects.interactions[0].actions.insert"),
    (lambda s: s["logging_policy"].update(epsilon="lots"), "logging_policy.epsilon"),
])
def test_malformed_world_names_the_field(world, edit, field):
    spec = copy.deepcopy(world.spec)
    edit(spec)
    with pytest.raises(WorldError) as err:
        World(spec)
    assert err.value.field == field
    assert field in str(err.value)


def test_a_catalog_error_in_world_json_names_the_catalog_field(world):
    spec = copy.deepcopy(world.spec)
    spec["catalog"]["slots"]["coupon"]["actions"][0]["default"] = False
    with pytest.raises(InsertrecError) as err:
        World(spec)
    assert "catalog" in str(err.value)


def test_load_refuses_invalid_json_with_the_line(tmp_path):
    path = tmp_path / "world.json"
    path.write_text('{\n  "horizon_days": 60,\n  oops\n}')
    with pytest.raises(InsertrecError, match="line 3"):
        World.load(path)


def test_bad_hidden_frame_or_combos_are_refused(world, history):
    with pytest.raises(WorldError, match="tier"):
        world.expected_reward(history.hidden.drop(columns="tier"), world.combos())
    with pytest.raises(WorldError, match="combos"):
        world.expected_reward(history.hidden, np.array([[0, 0, 99]]))
