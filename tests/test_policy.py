"""The decision core on a trained demo model: the single-order path and the batch agree, propensities
are exact, exploration is deterministic and fair, stock and eligibility are respected, and every
decision explains itself in valid JSON."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from insertrec.data import load_data
from insertrec.engine import Engine
from insertrec.exploration import FLOOR, draw, explore_probabilities
from insertrec.features import features_for_orders
from insertrec.policy import Policy, _One, _uniform_one, exploration_uniforms
from insertrec.training import TrainConfig, train
from insertrec.world import World

N_ORDERS = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, pd.DataFrame]:
    """A model trained on a small demo shop, and feature rows of new orders placed after it; the
    estimates decide (pessimism 0, not the default `auto`, which may doubt a slot of a shop this small), so
    that every path of a decision is taken."""
    tmp = tmp_path_factory.mktemp("policy")
    World.default().write_demo_data(tmp / "data", customers=1200, seed=3)
    data = load_data(tmp / "data")
    train(data, tmp / "model", TrainConfig(min_logged_orders=100, pessimism=0.0))
    engine = Engine.load(tmp / "model")
    assert engine.policy.value_model is not None, "the fixture must train a model, not fall back to rules"
    rng = np.random.default_rng(0)
    orders = data.orders.iloc[rng.integers(0, len(data.orders), N_ORDERS)].reset_index(drop=True)
    orders = orders.drop(columns=["returned_value"]).assign(
        order_id=[f"o-{i}" for i in range(N_ORDERS)],
        order_ts=engine.snapshot.as_of + pd.to_timedelta(np.arange(N_ORDERS) + 1, unit="s"))
    return engine, features_for_orders(engine.snapshot, orders)


def variants(engine: Engine) -> dict[str, Policy]:
    """The policy as trained, the model deciding every slot, the same deciding on lower confidence
    bounds (`Policy.pessimism`; z=0.3, at which this small fixture still spends in every slot, on
    about half the orders it does at 0: at 1 it spends nowhere), the same with every slot doubted
    (`--pessimism auto` where the log does not show the playbook paying, `Policy.doubted_slots`), the
    model exploring a share of its own in each slot (`--epsilon auto`'s per-slot shares, here set
    far apart so that a slot taking another's share shows), and the playbook alone."""
    policy = engine.policy
    return {"as_trained": policy, "model": policy.replace(playbook_slots=(), default_slots=()),
            "per_slot": policy.replace(playbook_slots=(), default_slots=(),
                                       epsilon=dict(zip(policy.slot_names, (0.5, 0.02, 0.25)))),
            "pessimistic": policy.replace(playbook_slots=(), default_slots=(), pessimism=0.3),
            "doubted": policy.replace(playbook_slots=(), default_slots=(), pessimism=0.3,
                                      doubted_slots=tuple(policy.slot_names)),
            "rules": Policy(policy.catalog, epsilon=policy.epsilon, version=policy.version)}


@pytest.fixture(scope="module", params=["as_trained", "model", "per_slot", "pessimistic", "doubted", "rules"])
def policy(request: pytest.FixtureRequest, trained: tuple[Engine, pd.DataFrame]) -> Policy:
    return variants(trained[0])[request.param]


def records(feats: pd.DataFrame) -> list[dict]:
    return feats.to_dict("records")


def test_single_and_batch_decide_alike(policy: Policy, trained: tuple[Engine, pd.DataFrame]) -> None:
    feats = trained[1]
    batch = policy.decide_frame(feats)
    ids = policy.action_ids(batch.actions)
    for i, record in enumerate(records(feats)):
        one = policy.decide_one(record)
        assert [one.slots[s].action_id for s in policy.slot_names] == list(ids[i]), record["order_id"]
        assert [one.slots[s].propensity for s in policy.slot_names] == batch.propensities[i].tolist()
        assert one.policy == ("explore" if batch.explored[i].any() else policy.name)


def test_propensities_are_exact(policy: Policy, trained: tuple[Engine, pd.DataFrame]) -> None:
    """(1 - eps) [chosen is the best] + eps q(chosen), q the exploring draw: uniform among the
    eligible actions for the playbook, a softmax over the estimated gaps with a floor for a model."""
    batch = policy.decide_frame(trained[1])
    rows = np.arange(len(batch.actions))
    for s, (eligible, eps) in enumerate(zip(batch.eligible, policy.slot_epsilon.values(), strict=True)):
        k = eligible.sum(axis=1)
        sl = slice(policy.catalog.columns[s], policy.catalog.columns[s] + eligible.shape[1])
        q = eligible / k[:, None] if policy.value_model is None else batch.explore_probs[:, sl]
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
        assert (q[~eligible] == 0).all()
        assert (q[eligible] >= (FLOOR / np.repeat(k, eligible.sum(axis=1)) - 1e-12)).all()  # every action tried
        chosen_is_greedy = batch.actions[:, s] == batch.greedy[:, s]
        expected = np.where(k > 1, (1 - eps) * chosen_is_greedy + eps * q[rows, batch.actions[:, s]], 1.0)
        np.testing.assert_allclose(batch.propensities[:, s], expected, rtol=0, atol=1e-15)
        np.testing.assert_allclose(policy.probabilities(batch)[s][rows, batch.actions[:, s]],
                                   batch.propensities[:, s], rtol=0, atol=1e-12)
        assert np.all(batch.propensities[:, s] > 0)


def test_an_exploring_draw_gives_up_less_than_a_uniform_one_and_tries_every_action() -> None:
    """By the estimates it is given: the expected gap of the draw is at most the uniform draw's,
    the best action is the likeliest, every eligible action keeps at least FLOOR / k, and draws
    follow the probabilities exactly."""
    rng = np.random.default_rng(3)
    n, slices = 20_000, [slice(0, 4), slice(4, 13)]
    eligible = rng.random((n, 13)) < 0.7
    eligible[:, [0, 4]] = True                                   # the defaults
    scores = np.where(eligible, rng.normal(0, 2, (n, 13)), -np.inf)
    q = explore_probabilities(scores, eligible, slices, tau=0.5)
    for sl in slices:
        ok, p, sc = eligible[:, sl], q[:, sl], scores[:, sl]
        k = ok.sum(axis=1)
        gap = np.where(ok, sc.max(axis=1, keepdims=True) - sc, 0.0)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
        assert (p[~ok] == 0).all() and (p >= np.where(ok, FLOOR / k[:, None], 0) - 1e-12).all()
        assert ((p * gap).sum(axis=1) <= gap.sum(axis=1) / k + 1e-12).all()
        assert (p[np.arange(n), sc.argmax(axis=1)] >= p.max(axis=1) - 1e-12).all()
    u = rng.random((n, 2))
    drawn = draw(q, u, slices)
    for s, sl in enumerate(slices):
        assert eligible[:, sl][np.arange(n), drawn[:, s]].all()
        freq = np.bincount(drawn[:, s], minlength=sl.stop - sl.start) / n
        np.testing.assert_allclose(freq, q[:, sl].mean(axis=0), atol=0.01)
    assert (explore_probabilities(None, eligible, slices, 1.0)[:, :4] == eligible[:, :4] / eligible[:, :4].sum(
        axis=1, keepdims=True)).all()                           # no estimates: uniform, as the playbook explores


@pytest.mark.parametrize("how", ["gated", "doubted"])
def test_a_slot_the_gate_fixed_or_training_doubted_explores_only_at_the_floor(
        how: str, trained: tuple[Engine, pd.DataFrame]) -> None:
    """Where training gave a slot to the default (or the playbook), or doubted it (the log did not
    show the playbook paying there), the model's estimates there are unproven: an exploring decision
    keeps the slot's greedy action but for the floor, spread uniformly, so every eligible action is
    still tried with probability epsilon * FLOOR / k and no more."""
    engine, feats = trained
    base = engine.policy.replace(playbook_slots=(), default_slots=(), epsilon=0.5, pessimism=0.3)
    slot = base.slot_names[2]
    fixed = base.replace(default_slots=(slot,)) if how == "gated" else base.replace(doubted_slots=(slot,))
    batch = fixed.decide_frame(feats)
    p, elig = fixed.probabilities(batch)[2], batch.eligible[2]
    rows, k = np.arange(len(p)), elig.sum(axis=1, keepdims=True)
    expected = np.where(elig, 0.5 * FLOOR / k, 0.0)
    expected[rows, batch.greedy[:, 2]] += 1.0 - 0.5 * FLOOR
    np.testing.assert_allclose(p, expected, atol=1e-12)
    free = base.decide_frame(feats)
    p_free = base.probabilities(free)[2][rows, free.greedy[:, 2]]
    assert (p_free < 1.0 - 0.5 * FLOOR + 0.5 * FLOOR / k[:, 0] - 1e-6).any()   # left to the estimates: more


def test_a_slot_with_one_available_action_is_certain(trained: tuple[Engine, pd.DataFrame]) -> None:
    engine, feats = trained
    packaging = engine.catalog.slots["packaging"]
    out = frozenset(a for i, a in enumerate(packaging.action_ids) if i != packaging.default_index)
    batch = engine.policy.decide_frame(feats, unavailable=out)
    s = engine.policy.slot_names.index("packaging")
    assert np.all(batch.actions[:, s] == packaging.default_index)
    assert np.all(batch.propensities[:, s] == 1.0)
    assert not batch.explored[:, s].any()


def test_unavailable_actions_are_never_chosen_and_the_default_stands_in(
        policy: Policy, trained: tuple[Engine, pd.DataFrame]) -> None:
    feats = trained[1]
    before = policy.decide_frame(feats, explore=False)
    taken = policy.action_ids(before.greedy)
    # the most chosen non-default action of each slot runs out
    out = set()
    for s, slot in enumerate(policy.catalog.slots.values()):
        picks = pd.Series(taken[:, s])
        picks = picks[picks != slot.action_ids[slot.default_index]]
        if len(picks):
            out.add(picks.value_counts().index[0])
    assert out, "the fixture should choose some non-default action"
    after = policy.decide_frame(feats, unavailable=frozenset(out))
    assert not np.isin(policy.action_ids(after.actions), list(out)).any()
    if policy.value_model is None:  # the playbook's pick ran out: the slot default, not another action
        lost = np.isin(taken, list(out))
        assert np.all(after.greedy[lost] == np.broadcast_to(policy.space.defaults, taken.shape)[lost])
    record = records(feats)[int(np.flatnonzero(np.isin(taken, list(out)).any(axis=1))[0])]
    one = policy.decide_one(record, unavailable=frozenset(out))
    assert not {c.action_id for c in one.slots.values()} & out
    assert not {a for c in one.slots.values() for a, _ in c.alternatives} & out


def test_ineligible_actions_are_never_chosen(policy: Policy, trained: tuple[Engine, pd.DataFrame]) -> None:
    feats = trained[1]
    eligible = policy.catalog.eligible(feats)
    batch = policy.decide_frame(feats)
    for s, name in enumerate(policy.slot_names):
        rows = np.arange(len(feats))
        assert eligible[name][rows, batch.actions[:, s]].all()
        assert eligible[name][rows, batch.greedy[:, s]].all()
    assert (~eligible["packaging"]).any(), "the demo catalog has conditional actions"


def test_decisions_are_deterministic_per_order_and_version(trained: tuple[Engine, pd.DataFrame]) -> None:
    engine, feats = trained
    policy = engine.policy
    first, again = policy.decide_frame(feats), policy.decide_frame(feats)
    np.testing.assert_array_equal(first.actions, again.actions)
    np.testing.assert_array_equal(first.explored, again.explored)
    other = policy.replace(version="another-version").decide_frame(feats)
    assert (other.explored != first.explored).any()
    record = records(feats)[0]
    assert policy.decide_one(record).as_dict() == policy.decide_one(record).as_dict()


def test_uniforms_of_one_order_equal_its_row_in_a_batch() -> None:
    ids = np.array(["a", "o-1", "o-10", "order-123456789012345", "ünïcødé-订单", "", "o-1 "], dtype=object)
    batch = exploration_uniforms(ids, "v1", 3)
    assert batch.shape == (len(ids), 3, 2) and ((batch >= 0) & (batch < 1)).all()
    for i, oid in enumerate(ids):
        np.testing.assert_array_equal(exploration_uniforms(np.array([oid]), "v1", 3)[0], batch[i])
        assert [_uniform_one(oid, "v1", 3)(lane) for lane in range(6)] == batch[i].ravel().tolist()  # decide_one's
    assert len({tuple(row.ravel()) for row in batch}) == len(ids)   # every id draws its own numbers
    assert not np.array_equal(exploration_uniforms(ids, "v2", 3), batch)


def test_exploration_share_is_epsilon() -> None:
    u = exploration_uniforms(np.array([f"order-{i}" for i in range(60_000)], dtype=object), "v", 3)
    assert abs((u[:, :, 0] < 0.1).mean() - 0.1) < 0.005
    counts = np.bincount((u[:, :, 1] * 7).astype(int).ravel(), minlength=7) / u[:, :, 1].size
    assert np.abs(counts - 1 / 7).max() < 0.005                            # picks among 7 eligible are fair
    assert abs(np.corrcoef(u[:, 0, 0], u[:, 1, 0])[0, 1]) < 0.02           # slots explore independently


def test_explored_share_on_orders(policy: Policy, trained: tuple[Engine, pd.DataFrame]) -> None:
    """Each slot explores its own share of the orders where it has a choice."""
    batch = policy.decide_frame(trained[1])
    for s, eps in enumerate(policy.slot_epsilon.values()):
        choice = batch.eligible[s].sum(axis=1) > 1
        share = batch.explored[choice, s].mean()
        assert abs(share - eps) < 4 * np.sqrt(eps * (1 - eps) / choice.sum()) + 1e-9, (s, share, eps)


def test_one_share_decides_as_that_share_named_for_every_slot(trained: tuple[Engine, pd.DataFrame]) -> None:
    """`train --epsilon 0.3` (one number) and the same share given per slot are one policy, to the bit."""
    engine, feats = trained
    one = engine.policy.replace(playbook_slots=(), default_slots=(), epsilon=0.3)
    named = one.replace(epsilon=dict.fromkeys(one.slot_names, 0.3))
    a, b = one.decide_frame(feats), named.decide_frame(feats)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.propensities.tolist() == b.propensities.tolist()
    for p, q in zip(one.probabilities(a), named.probabilities(b), strict=True):
        assert p.tolist() == q.tolist()
    assert named.slot_epsilon == one.slot_epsilon == dict.fromkeys(one.slot_names, 0.3)


def test_shares_must_name_every_slot_and_lie_in_0_1(trained: tuple[Engine, pd.DataFrame]) -> None:
    base = trained[0].policy
    names = base.slot_names
    for shares in (dict.fromkeys(names[:-1], 0.1), dict.fromkeys([*names, "gift"], 0.1), 1.5, -0.1,
                   dict.fromkeys(names, 2.0)):
        with pytest.raises(ValueError, match="epsilon"):
            base.replace(epsilon=shares)


def test_alternatives_are_ranked_eligible_and_explained(policy: Policy,
                                                        trained: tuple[Engine, pd.DataFrame]) -> None:
    for record in records(trained[1])[:150]:
        decision = policy.decide_one(record)
        json.dumps(decision.as_dict(), allow_nan=False)        # what the service answers: no inf/NaN
        eligible = {slot: ok[0] for slot, ok in policy.catalog.eligible(pd.DataFrame([record])).items()}
        for s, (name, choice) in enumerate(decision.slots.items()):
            ids = [a for a, _ in choice.alternatives]
            scores = [score for _, score in choice.alternatives]
            allowed = {a for a, ok in zip(policy.catalog.slots[name].action_ids, eligible[name]) if ok}
            assert set(ids) == allowed and len(ids) == len(allowed)
            assert scores == sorted(scores, reverse=True)
            assert choice.action_id in allowed
            assert choice.pick_note and choice.reasons
            explored = choice.reasons[0].startswith("exploring")
            fixed = (*policy.playbook_slots, *policy.default_slots)   # the gate's, not the model's, choice
            if not explored and policy.value_model is not None and name not in fixed:
                assert dict(choice.alternatives)[choice.action_id] == scores[0]   # the model's pick is the best box's
                assert any(r.startswith("estimated value") for r in choice.reasons)


def test_pick_notes_describe_the_item_for_the_packer_never_the_customer(policy: Policy,
                                                                        trained: tuple[Engine, pd.DataFrame]) -> None:
    labels = {str(v) for column in ("journey_stage", "nps_tier") for v in trained[1][column].unique()}
    for record in records(trained[1])[:150]:
        for name, choice in policy.decide_one(record).slots.items():
            action = policy.catalog.slots[name].actions[policy.catalog.slots[name].index_of(choice.action_id)]
            assert choice.pick_note == action.note
            assert not any(label in choice.pick_note.split() for label in labels), choice.pick_note


def test_only_a_slot_whose_action_exploration_changed_says_exploring(policy: Policy,
                                                                     trained: tuple[Engine, pd.DataFrame]) -> None:
    batch = policy.decide_frame(trained[1])
    kept = 0
    for i, record in enumerate(records(trained[1])):
        for s, choice in enumerate(policy.decide_one(record).slots.values()):
            changed = batch.actions[i, s] != batch.greedy[i, s]
            assert any(r.startswith("exploring") for r in choice.reasons) == changed, (record["order_id"], s)
            kept += bool(batch.explored[i, s] and not changed)
    assert kept > 0, "no exploration draw landed on the top pick: the test checks nothing"


def test_reasons_name_the_features_that_moved_the_choice_most(trained: tuple[Engine, pd.DataFrame]) -> None:
    """A driver is "feature (+0.12)": the feature's value times the chosen action's weight over the
    slot default's, the largest of those in size, best first."""
    policy = trained[0].policy
    names = policy.encoder.feature_names_
    checked = 0
    for record in records(trained[1])[:150]:
        phi = policy.encoder.transform_one(record)
        for s, (slot, choice) in enumerate(policy.decide_one(record).slots.items()):
            default = policy.catalog.slots[slot].actions[policy.space.defaults[s]].id
            if choice.action_id == default or slot in (*policy.playbook_slots, *policy.default_slots):
                continue
            a = policy.catalog.slots[slot].action_ids.index(choice.action_id)
            w = policy.value_model.W_[s]
            contrib = phi * (w[:, a] - w[:, policy.space.defaults[s]])
            drivers = [r for r in choice.reasons if r.endswith(")") and not r.startswith("exploring")]
            expected = [f"{names[j]} ({contrib[j]:+.2f})" for j in np.argsort(-np.abs(contrib))[:3]
                        if abs(contrib[j]) > 1e-3 and names[j] != "intercept"]
            assert drivers == expected
            checked += 1
    assert checked > 20


def test_the_chosen_box_is_the_best_eligible_one_by_the_value_models_own_design(
        trained: tuple[Engine, pd.DataFrame]) -> None:
    """Checked through `ValueModel.predict` (the design matrix), not the grid the policy scores with;
    without pessimism, so that the best box is the best estimated one (`test_valuemodel` checks
    the pessimistic scores against the design)."""
    engine, feats = trained
    policy = engine.policy.replace(epsilon=0.0, playbook_slots=(), default_slots=(), pessimism=0.0)
    sample = feats.iloc[:40].reset_index(drop=True)
    batch = policy.decide_frame(sample)
    phi = policy.encoder.transform(sample)
    eligible, rules = policy.catalog.assess(sample)
    for i in range(len(sample)):
        boxes = np.array([c for c in policy.combos
                          if all(eligible[i, policy.catalog.columns[s] + a] for s, a in enumerate(c))])
        values = policy.value_model.predict(np.repeat(phi[i:i + 1], len(boxes), axis=0), boxes,
                                            np.repeat(rules[i:i + 1], len(boxes), axis=0))
        chosen = policy.value_model.predict(phi[i:i + 1], batch.greedy[i:i + 1], rules[i:i + 1])[0]
        assert chosen == pytest.approx(values.max(), abs=1e-6)


def test_policy_survives_pickling_after_use(trained: tuple[Engine, pd.DataFrame]) -> None:
    engine, feats = trained
    record = records(feats)[1]
    before = engine.policy.decide_one(record)           # compiles the catalog's conditions
    clone = pickle.loads(pickle.dumps(engine.policy))
    assert clone.decide_one(record).as_dict() == before.as_dict()


def test_an_empty_batch_decides_nothing(policy: Policy, trained: tuple[Engine, pd.DataFrame]) -> None:
    batch = policy.decide_frame(trained[1].head(0))
    assert batch.actions.shape == batch.propensities.shape == (0, len(policy.slot_names))


def test_one_order_is_decided_exactly_as_in_a_batch_on_random_orders_and_states(
        trained: tuple[Engine, pd.DataFrame]) -> None:
    """The service's path (`Engine.decide`: the customer's `CustomerState`, `Policy.decide_one`)
    against the reference, `Policy._decide` over all orders at once on `features_for_orders`:
    the same boxes, exploration flags and propensities to the bit, the same reasons, notes and
    ranked alternatives, scores and uplift to 1e-12. Random orders of known and new customers
    (one order per customer, so the batch's features see the same history), random order ids,
    random stock-outs, and policies that explore often, never or always, with the playbook or
    the slot default fixing some slots."""
    engine, feats = trained
    rng = np.random.default_rng(7)
    known = feats.drop_duplicates("customer_id")
    n = len(known)
    orders = known[["customer_id", "order_ts", "order_value", "n_items", "channel", "region", "is_gift",
                    "categories"]].reset_index(drop=True).assign(
        order_id=[f"{rng.choice(['o', 'ördër-订单', 'x' * 40])}-{rng.integers(1 << 40)}" for _ in range(n)],
        order_value=rng.lognormal(3.5, 1.0, n).round(2), n_items=rng.integers(1, 8, n),
        is_gift=rng.random(n) < 0.3, channel=rng.choice(["web", "app", "marketplace", "kiosk"], n))
    new = rng.random(n) < 0.2
    orders.loc[new, "customer_id"] = [f"new-{i}" for i in np.flatnonzero(new)]
    batch_feats = features_for_orders(engine.snapshot, orders)
    singles = [engine.state(str(o["customer_id"])).features(o) for o in orders.to_dict("records")]
    base = engine.policy
    slots = base.slot_names
    policies = [base, base.replace(epsilon=0.6), base.replace(epsilon=0.0), base.replace(epsilon=1.0),
                base.replace(playbook_slots=(), default_slots=()),
                base.replace(playbook_slots=(slots[1],), default_slots=(slots[2],), epsilon=0.5),
                base.replace(playbook_slots=(), default_slots=(), epsilon=dict(zip(slots, (0.02, 0.7, 0.3)))),
                base.replace(playbook_slots=(slots[0],), epsilon=dict(zip(slots, (0.4, 0.0, 0.9)))),
                base.replace(playbook_slots=tuple(slots), default_slots=()),
                Policy(base.catalog, epsilon=0.5, version=base.version)]
    action_ids = sorted(base.catalog.action_ids)
    explored = 0
    for policy in policies:
        unavailable = frozenset(rng.choice(action_ids, 3, replace=False)) if rng.random() < 0.5 else frozenset()
        eligible, rules = policy.catalog.assess(batch_feats)
        phi = None if policy.encoder is None else policy.encoder.transform(batch_feats)
        batch = policy._decide(batch_feats["order_id"].astype(str).to_numpy(), phi, eligible, rules,
                               unavailable, True, alternatives=True)
        for i, (row, want) in enumerate(zip(singles, _One.rows(batch))):
            one_eligible, one_rules = policy.catalog.assess_one(row)
            if unavailable:
                one_eligible = one_eligible & ~policy._out_of(unavailable)
            one_phi = None if policy.encoder is None else policy.encoder.transform_one(row)
            got = policy._decide_one(str(row["order_id"]), one_phi, one_eligible, one_rules)
            where = (policy.epsilon, policy.playbook_slots, row["order_id"])
            assert (got.order_id, got.actions, got.greedy, got.explored, got.eligible) == \
                (want.order_id, want.actions, want.greedy, want.explored, want.eligible), where
            assert got.propensities == want.propensities, where          # to the bit: they are logged
            np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-12, err_msg=str(where))
            assert (got.uplift is None) == (want.uplift is None), where
            if want.uplift is not None:
                assert got.uplift == pytest.approx(want.uplift, abs=1e-12), where
            decision = policy.decide_one(row, unavailable).as_dict()
            reference = policy._explain(want, policy._drivers(None if phi is None else phi[i:i + 1],
                                                              [want.actions])[0]).as_dict()
            for name in slots:   # scores compared above; rounded for the answer, they may differ in the last digit
                for body in (decision, reference):
                    body["slots"][name]["alternatives"] = [a["action_id"] for a in body["slots"][name]["alternatives"]]
            decision["expected_uplift"] = reference["expected_uplift"] = None
            assert decision == reference, where
            explored += any(got.explored)
    assert explored > len(singles), "exploration must be exercised"


def test_orders_decided_together_are_decided_exactly_as_each_alone(trained: tuple[Engine, pd.DataFrame]) -> None:
    """The service's micro-batches (`Policy.decide_many`): each order with its own unavailable
    actions and segment gets the very `Decision` of `decide_one`, unrounded scores and uplift
    included, whatever the batch's size and the policy (a matrix product of many rows rounds
    differently from one row's: the scores must not depend on the company an order keeps)."""
    engine, feats = trained
    rng = np.random.default_rng(11)
    rows = records(feats)
    base = engine.policy
    action_ids = sorted(base.catalog.action_ids)
    policies = [base, base.replace(playbook_slots=(), default_slots=(), epsilon=0.5), base.replace(epsilon=0.0),
                base.replace(playbook_slots=(), default_slots=(), epsilon=dict(zip(base.slot_names, (0.6, 0.02, 0.3)))),
                Policy(base.catalog, epsilon=0.5, version=base.version)]
    for policy in policies:
        for size in (2, 7, 64, 100):
            picked = [rows[i] for i in rng.choice(len(rows), size, replace=False)]
            gone = [frozenset(rng.choice(action_ids, 2, replace=False)) if rng.random() < 0.3 else frozenset()
                    for _ in picked]
            segments = [str(rng.choice(["a", "b"])) if rng.random() < 0.5 else None for _ in picked]
            alone = [policy.decide_one(row, u, seg) for row, u, seg in zip(picked, gone, segments)]
            assert policy.decide_many(picked, gone, segments) == alone, (policy.version, size)


def test_orders_encoded_together_are_encoded_exactly_as_each_alone(trained: tuple[Engine, pd.DataFrame]) -> None:
    """`transform_many` (the micro-batches' encoding) gives each order the bits `transform_one`
    gives it alone, for the plain encoder and its spline expansion, missing and junk values included."""
    from insertrec.learners import SplineEncoder

    engine, feats = trained
    encoder = engine.policy.encoder
    base = encoder.base if isinstance(encoder, SplineEncoder) else encoder
    rng = np.random.default_rng(5)
    rows = records(feats.head(60))
    for row in rows[::2]:
        for name in rng.choice(sorted(row), 6, replace=False):
            row[name] = [None, np.nan, np.inf, -3.5, "junk", "12", True, 0, 1e300][rng.integers(9)]
    for enc in (base, SplineEncoder(base, knots=3).fit(feats)):
        together = enc.transform_many(rows)
        assert together.shape == (len(rows), enc.n_features_)
        for i, row in enumerate(rows):
            assert together[i].tobytes() == enc.transform_one(row).tobytes(), (type(enc).__name__, i)
        assert enc.transform_many([]).shape == (0, enc.n_features_)
