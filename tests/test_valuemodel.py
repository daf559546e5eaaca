"""The box value model recovers who gains from what, under confounded logging."""

import numpy as np
import pytest

from insertrec.valuemodel import DOUBTED_SHARE, ActionSpace, ValueModel, box_statistics

SPACE = ActionSpace(sizes=(3, 4, 3), defaults=(0, 0, 0))


def _world(n: int, seed: int, confounded: bool = True):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 2, n)                       # a customer group, e.g. promoters vs detractors
    v = rng.normal(size=n)                          # a value-like covariate
    phi = np.column_stack([np.ones(n), g, v, g * v])
    acts = np.stack([rng.integers(0, k, n) for k in SPACE.sizes], axis=1)
    p = np.full((n, 3), 1.0)
    if confounded:  # the "rules" give insert 2 mostly to group 1, who would have done better anyway
        favour = rng.random(n) < 0.8
        acts[:, 1] = np.where(g == 1, np.where(favour, 2, rng.integers(0, 4, n)), acts[:, 1])
        p[:, 1] = np.where(g == 1, np.where(acts[:, 1] == 2, 0.8 + 0.2 / 4, 0.2 / 4), 1 / 4)
        p[:, 0], p[:, 2] = 1 / 3, 1 / 3
    else:
        p[:] = [1 / 3, 1 / 4, 1 / 3]

    def truth(a):
        return (10 + 4 * g + 2 * v + 3 * g * v ** 2                     # non-linear baseline
                + np.where(a[:, 1] == 2, np.where(g == 1, -1.0, 1.5), 0)  # insert 2: good for g=0 only
                + np.where(a[:, 1] == 3, 0.8 * v, 0)                     # insert 3: good for high v
                - 0.3 * (a[:, 2] > 0)                                    # coupons cost margin
                + np.where((a[:, 0] == 1) & (a[:, 1] == 1), 1.2, 0))     # a packaging/insert pairing
    y = truth(acts) + rng.normal(scale=3.0, size=n)
    rules = np.zeros_like(acts)
    return phi, acts, y, p.prod(axis=1), rules, truth, g, v


def _regret(model, phi, rules, truth, n):
    combos = SPACE.combos
    best_by_model = combos[model.combo_scores(phi, rules, combos).argmax(axis=1)]
    all_true = np.stack([truth(np.tile(c, (n, 1))) for c in combos], axis=1)
    return all_true.max(axis=1).mean() - truth(best_by_model).mean(), all_true


def test_recovers_heterogeneous_effects_and_slot_interactions_under_confounding():
    phi, acts, y, ps, rules, truth, g, v = _world(30_000, 0)
    model = ValueModel().fit(phi, acts, y, SPACE, rules, ps)
    regret, all_true = _regret(model, phi, rules, truth, len(y))
    control = truth(np.zeros_like(acts)).mean()
    oracle = all_true.max(axis=1).mean()
    # at least 90% of the attainable uplift over the all-default box
    assert regret < 0.1 * (oracle - control)
    s1 = model.slot_scores(phi, rules)[1]
    assert (s1[g == 0, 2] > 0).mean() > 0.9 and (s1[g == 1, 2] < 0).mean() > 0.9
    assert model.P_[(0, 1)][1, 1] > 0.6


def test_when_actions_do_not_matter_their_effects_shrink_to_nearly_nothing():
    rng = np.random.default_rng(1)
    n = 400
    phi = np.column_stack([np.ones(n), rng.normal(size=(n, 3))])
    acts = np.stack([rng.integers(0, k, n) for k in SPACE.sizes], axis=1)
    y = 10 + 2 * phi[:, 1] + rng.normal(scale=3.0, size=n)     # no action has any effect
    rules = np.tile([1, 3, 0], (n, 1))                          # the playbook's box
    model = ValueModel().fit(phi, acts, y, SPACE, rules)
    scores = model.combo_scores(phi, rules, SPACE.combos)
    spread = scores.max(axis=1) - scores.min(axis=1)
    assert model.alpha_[1] >= 0.1
    assert np.median(spread) < 0.3 * y.std()   # what is left is noise, a fraction of its sd


def test_predict_is_baseline_plus_combo_score():
    phi, acts, y, ps, rules, *_ = _world(5_000, 2)
    model = ValueModel().fit(phi, acts, y, SPACE, rules, ps)
    combos = SPACE.combos
    scores = model.combo_scores(phi[:50], rules[:50], combos)
    idx = np.array([np.flatnonzero((combos == a).all(axis=1))[0] for a in acts[:50]])
    expected = model.baseline(phi[:50]) + scores[np.arange(50), idx]
    np.testing.assert_allclose(model.predict(phi[:50], acts[:50], rules[:50]), expected)


def _dense_design(phi, actions, rules, space):
    """The value model's design written out column by column: phi, phi x each non-default
    action (feature-major), the playbook indicators, one cell per slot pair."""
    n = len(phi)
    blocks = [phi]
    for s, size in enumerate(space.sizes):
        onehot = np.delete(np.eye(size)[actions[:, s]], space.defaults[s], axis=1)
        blocks.append((phi[:, :, None] * onehot[:, None, :]).reshape(n, -1))
    blocks.append((actions == rules).astype(float))
    for s, t in space.pairs:
        blocks.append(np.eye(space.sizes[s] * space.sizes[t])[actions[:, s] * space.sizes[t] + actions[:, t]])
    return np.hstack(blocks)


def test_per_box_statistics_equal_the_dense_design_products_and_predict_uses_the_same_terms():
    space = ActionSpace(sizes=(3, 4, 2), defaults=(1, 0, 1))    # defaults not always first
    rng = np.random.default_rng(3)
    n = 3_000
    phi = np.column_stack([np.ones(n), rng.normal(size=(n, 4))])
    acts = np.stack([rng.integers(0, k, n) for k in space.sizes], axis=1)
    rules = np.stack([rng.integers(0, k, n) for k in space.sizes], axis=1)
    y, w, fold = rng.normal(size=n), rng.uniform(0.5, 2.0, n), rng.integers(0, 3, n)
    gram, moment = box_statistics(phi, acts, rules, y, w, space, fold, 3)
    z = _dense_design(phi, acts, rules, space)
    for f in range(3):
        zf = z[fold == f]
        np.testing.assert_allclose(gram[f], (zf * w[fold == f, None]).T @ zf, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(moment[f], zf.T @ (w * y)[fold == f], rtol=1e-10, atol=1e-9)
    model = ValueModel(boosted_baseline=False).fit(phi, acts, y, space, rules)
    np.testing.assert_allclose(model.predict(phi, acts, rules), z @ model.theta_, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("field, change", [
    ("rewards", lambda a: {**a, "rewards": np.where(np.arange(len(a["rewards"])) == 2, np.nan, a["rewards"])}),
    ("actions", lambda a: {**a, "actions": a["actions"] + 5}),
    ("rules", lambda a: {**a, "rules": a["rules"][:, :2]}),
    ("pscore", lambda a: {**a, "pscore": np.zeros(len(a["rewards"]))}),
    ("phi", lambda a: {**a, "phi": a["phi"][:, 0]}),
])
def test_fit_refuses_bad_inputs_naming_the_field(field, change):
    from insertrec.errors import InsertrecError
    rng = np.random.default_rng(0)
    n = 60
    args = {"phi": np.column_stack([np.ones(n), rng.normal(size=n)]),
            "actions": np.stack([rng.integers(0, k, n) for k in SPACE.sizes], axis=1),
            "rewards": rng.normal(size=n), "space": SPACE, "rules": np.zeros((n, 3), dtype=int),
            "pscore": np.full(n, 0.5)}
    with pytest.raises(InsertrecError, match=field):
        ValueModel(boosted_baseline=False).fit(**change(args))


def _best_boxes(model, phi, rules, pessimistic: bool):
    grid = model.decision_grid(1.0) if pessimistic else model.box_grid
    return SPACE.combos[grid.grid(phi, rules + grid.columns).reshape(len(phi), -1).argmax(axis=1)]


def test_pessimism_keeps_actions_whose_gain_is_noise_out_and_lets_real_gains_through():
    """#11.2: an action whose estimated gain over the slot default is not positive beyond its
    uncertainty is not chosen. Where no action matters, the estimated best box is mostly some
    action's noise and the pessimistic one the all-default box; where one truly pays (insert 2 for
    group 0, +1.5 against a noise sd of 3), it is still chosen."""
    rng = np.random.default_rng(4)
    n = 3000
    phi = np.column_stack([np.ones(n), rng.normal(size=(n, 3))])
    acts = np.stack([rng.integers(0, k, n) for k in SPACE.sizes], axis=1)
    y = 10 + 2 * phi[:, 1] + rng.normal(scale=3.0, size=n)     # no action has any effect
    rules = np.zeros_like(acts)
    model = ValueModel(alphas=(1e-4,), action_alphas=(1e-3,), boosted_baseline=False).fit(
        phi, acts, y, SPACE, rules)
    assert (_best_boxes(model, phi, rules, False) != 0).any(axis=1).mean() > 0.5   # noise, taken for gains
    assert (_best_boxes(model, phi, rules, True) != 0).any(axis=1).mean() < 0.05

    phi, acts, y, ps, rules, truth, g, v = _world(30_000, 0)
    model = ValueModel().fit(phi, acts, y, SPACE, rules, ps)
    best = _best_boxes(model, phi, rules, True)
    assert (best[g == 0, 1] == 2).mean() > 0.8 and (best[g == 1, 1] == 2).mean() < 0.05


def test_the_pessimistic_score_is_the_gain_less_z_standard_errors_of_the_posterior():
    """The penalty of action a in slot s for an order is z sqrt(sigma^2 x' (G + Lambda)^-1 x), x the
    order's phi in the columns of a's W block, G the dense design's Gram, Lambda the chosen ridge."""
    phi, acts, y, ps, rules, *_ = _world(3_000, 5)
    model = ValueModel(boosted_baseline=False).fit(phi, acts, y, SPACE, rules)
    X = _dense_design(phi, acts, rules, SPACE)
    d, n = phi.shape[1], len(y)
    lam = n * np.where(np.arange(X.shape[1]) >= d, model.alpha_[1], model.alpha_[0])
    lam[0] = 0.0
    inverse = np.linalg.inv(X.T @ X + np.diag(lam + 1e-9))
    columns = model.box_grid.columns
    penalty = model.box_grid.per_action(phi[:20], rules[:20] + columns) \
        - model.decision_grid(1.5).per_action(phi[:20], rules[:20] + columns)
    start = d
    for s, size in enumerate(SPACE.sizes):
        for a in range(size):
            col = columns[s] + a
            if a == SPACE.defaults[s]:
                np.testing.assert_array_equal(penalty[:, col], 0.0)
                continue
            cells = start + np.arange(d) * (size - 1) + a - (a > SPACE.defaults[s])
            cov = model.noise_ * inverse[np.ix_(cells, cells)]
            expected = 1.5 * np.sqrt(np.einsum("ni,ij,nj->n", phi[:20], cov, phi[:20]))
            np.testing.assert_allclose(penalty[:, col], expected, rtol=1e-6)
        start += d * (size - 1)


def test_in_a_doubted_slot_the_playbooks_action_pays_the_full_penalty_and_the_others_a_share():
    """Training's default (`Policy.doubted_slots`): where the log does not show the playbook paying,
    the playbook's action for an order pays the full penalty of `decision_grid(z)`, the slot's other
    actions `DOUBTED_SHARE` of theirs; every action of the other slots is scored on its estimate."""
    phi, acts, y, ps, _, *_ = _world(3_000, 5)
    rules = np.stack([np.random.default_rng(1).integers(0, k, len(y)) for k in SPACE.sizes], axis=1)
    model = ValueModel(boosted_baseline=False).fit(phi, acts, y, SPACE, rules)
    columns = model.box_grid.columns
    rule_columns = rules[:50] + columns
    plain = model.box_grid.per_action(phi[:50], rule_columns)
    full = plain - model.decision_grid(1.0).per_action(phi[:50], rule_columns)
    doubted = plain - model.decision_grid(1.0, doubted=(1,)).per_action(phi[:50], rule_columns)
    expected = np.zeros_like(full)
    rows = np.arange(50)
    insert = model.box_grid.slices[1]
    expected[:, insert] = DOUBTED_SHARE * full[:, insert]
    expected[rows, rule_columns[:, 1]] = full[rows, rule_columns[:, 1]]
    assert (expected[rows, rule_columns[:, 1]] > 0).any() and (full[:, insert] > 0).any()
    np.testing.assert_allclose(doubted, expected, atol=1e-12)
    one = plain[7] - model.decision_grid(1.0, doubted=(1,)).per_action(phi[7], rule_columns[7])
    np.testing.assert_allclose(one, expected[7], atol=1e-12)
    assert model.decision_grid(1.0, doubted=()) is model.box_grid


def test_a_blend_scores_every_box_and_baseline_as_the_weighted_sum_of_its_two_models():
    """The ridge and a model over more features (its leading columns the ridge's, as a spline
    encoding's are) averaged on the grid: the same boxes' values as averaging their scores, with
    the decision's standard errors the first model's. Defaults not first, so that the W blocks'
    layout (the default's column left out) is exercised."""
    from insertrec.errors import InsertrecError
    from insertrec.valuemodel import blend

    space = ActionSpace(sizes=(3, 4, 2), defaults=(1, 0, 1))
    phi, acts, y, ps, _, *_ = _world(4_000, 5)
    acts = np.minimum(acts, np.array(space.sizes) - 1)
    rules = np.tile([0, 2, 0], (len(y), 1))
    wide = np.column_stack([phi, np.maximum(phi[:, 2] - 0.5, 0.0), np.maximum(phi[:, 2] + 0.5, 0.0)])
    first = ValueModel().fit(phi, acts, y, space, rules)
    second = ValueModel(boosted_baseline=False).fit(wide, acts, y + 2.0 * (acts[:, 1] == 3), space, rules)
    mixed = blend(first, second, 0.3)
    combos = space.combos
    np.testing.assert_allclose(mixed.combo_scores(wide[:200], rules[:200], combos),
                               0.3 * first.combo_scores(phi[:200], rules[:200], combos)
                               + 0.7 * second.combo_scores(wide[:200], rules[:200], combos), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mixed.baseline(wide[:200]),
                               0.3 * first.baseline(phi[:200]) + 0.7 * second.baseline(wide[:200]), rtol=1e-9)
    z = 1.5
    np.testing.assert_allclose(first.box_grid.per_action(phi[:100], rules[:100] + first.box_grid.columns)
                               - first.decision_grid(z).per_action(phi[:100], rules[:100] + first.box_grid.columns),
                               mixed.box_grid.per_action(wide[:100], rules[:100] + mixed.box_grid.columns)
                               - mixed.decision_grid(z).per_action(wide[:100], rules[:100] + mixed.box_grid.columns),
                               rtol=1e-9, atol=1e-9)
    assert not np.allclose(mixed.combo_scores(wide[:50], rules[:50], combos),
                           first.combo_scores(phi[:50], rules[:50], combos))
    with pytest.raises(InsertrecError, match="weight must be in"):
        blend(first, second, 1.5)
    with pytest.raises(InsertrecError, match="must lead"):
        blend(second, first, 0.5)
