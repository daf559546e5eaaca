"""Off-policy estimators against a bandit whose true policy values are known."""

import re

import numpy as np
import pytest

from insertrec.ope import (
    DR,
    DRPI,
    IPS,
    JOINT_CLIP,
    SNIPS,
    Bootstrap,
    LoggedFeedback,
    clipped_share,
    difference,
    estimate,
)

EXACT = (IPS(clip=None), SNIPS(clip=None), DR(clip=None))   # no clip: the weights as they are


def _bandit(n: int, seed: int):
    """Two slots (3 and 2 actions), logging depends on x, reward mean known per (x, box)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    logits = np.stack([np.zeros(n), x, -x], axis=1)
    mu0 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mu1 = np.stack([np.full(n, 0.7), np.full(n, 0.3)], axis=1)
    a0 = (rng.random(n)[:, None] > np.cumsum(mu0, axis=1)).sum(axis=1)
    a1 = (rng.random(n) < mu1[:, 1]).astype(int)

    def mean_reward(b0, b1):
        return 5 + x + np.where(b0 == 1, 2 * x, 0) + np.where(b0 == 2, 1.0, 0) - 0.5 * b1 + 0.8 * (b0 == 2) * b1

    r = mean_reward(a0, a1) + rng.normal(scale=2.0, size=n)
    feedback = LoggedFeedback(r, np.stack([a0, a1], axis=1),
                              np.stack([mu0[np.arange(n), a0], mu1[np.arange(n), a1]], axis=1))
    return x, feedback, mean_reward


def _deterministic(choice: np.ndarray, size: int) -> np.ndarray:
    return np.eye(size)[choice]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimators_cover_the_true_value_of_a_target_policy(seed):
    x, fb, mean_reward = _bandit(40_000, seed)
    t0 = np.where(x > 0, 1, 2)           # the target: action 1 for x > 0, else 2
    t1 = np.ones(len(x), dtype=int)
    truth = mean_reward(t0, t1).mean()
    target = [_deterministic(t0, 3), _deterministic(t1, 2)]
    # exact weights: this reward has a slot interaction
    # a deliberately poor value model: DR must still be unbiased through the weights
    q_logged = np.full(len(x), 5.0)
    est = estimate(fb, target, q_logged, np.full(len(x), 5.0), seed=seed, estimators=EXACT)
    for e in (est.ips, est.snips, est.dr):
        assert e.low <= truth <= e.high, (e, truth)
    assert 0 < est.ess < len(x)


def test_dr_with_a_good_value_model_is_tighter_than_ips():
    x, fb, mean_reward = _bandit(40_000, 3)
    t0, t1 = np.where(x > 0, 1, 2), np.zeros(len(x), dtype=int)
    target = [_deterministic(t0, 3), _deterministic(t1, 2)]
    truth = mean_reward(t0, t1).mean()
    est = estimate(fb, target, mean_reward(fb.actions[:, 0], fb.actions[:, 1]),
                   mean_reward(t0, t1), seed=3, estimators=EXACT)
    assert est.dr.low <= truth <= est.dr.high
    assert (est.dr.high - est.dr.low) < 0.5 * (est.ips.high - est.ips.low)


def test_single_slot_weights_leave_the_other_slot_as_logged():
    x, fb, mean_reward = _bandit(40_000, 4)
    t0 = np.where(x > 0, 1, 2)
    target = [_deterministic(t0, 3), _deterministic(np.zeros(len(x), dtype=int), 2)]
    # slot 1 keeps its logged distribution: 0.7 / 0.3
    truth = (0.7 * mean_reward(t0, 0) + 0.3 * mean_reward(t0, 1)).mean()
    est = estimate(fb, target, np.zeros(len(x)), np.zeros(len(x)), slots=[0], seed=4)
    assert est.snips.low <= truth <= est.snips.high


def test_paired_difference_detects_a_better_policy_and_its_size():
    x, fb, mean_reward = _bandit(40_000, 5)
    good = [_deterministic(np.where(x > 0, 1, 2), 3), _deterministic(np.zeros(len(x), dtype=int), 2)]
    worse = [_deterministic(np.zeros(len(x), dtype=int), 3), _deterministic(np.ones(len(x), dtype=int), 2)]
    q = mean_reward(fb.actions[:, 0], fb.actions[:, 1])
    qa = mean_reward(np.where(x > 0, 1, 2), 0)
    qb = mean_reward(np.zeros(len(x), dtype=int), 1)
    d = difference(fb, good, qa, worse, qb, q, seed=5, estimator=DR(clip=None))
    true_gap = (qa - qb).mean()
    assert d.low > 0
    assert d.low <= true_gap <= d.high


def test_clipped_joint_weights_keep_dr_on_the_truth_with_a_far_narrower_interval():
    rng = np.random.default_rng(6)
    n, sizes = 60_000, (4, 4, 4)
    mu = [np.full((n, k), 0.3 / k) for k in sizes]
    for m in mu:
        m[:, 0] += 0.7                     # the logging policy mostly plays action 0
    actions = np.stack([(rng.random(n)[:, None] > np.cumsum(m, axis=1)).sum(axis=1) for m in mu], axis=1)
    effect = np.array([0.0, 1.0, -0.5, 2.0])
    mean = 10 + sum(effect[actions[:, s]] for s in range(3))
    r = mean + rng.normal(scale=3.0, size=n)
    fb = LoggedFeedback(r, actions, np.stack([mu[s][np.arange(n), actions[:, s]] for s in range(3)], axis=1))
    target = [_deterministic(np.full(n, 3), 4)] * 3        # always action 3: far from logging
    truth = 10 + 3 * 2.0
    q_logged, q_target = mean, np.full(n, truth)           # a good value model, as DR is meant to have
    exact = estimate(fb, target, q_logged, q_target, seed=6, estimators=EXACT)
    clipped = estimate(fb, target, q_logged, q_target, seed=6, estimators=(IPS(), SNIPS(), DR(JOINT_CLIP)))
    assert clipped.dr.low <= truth <= clipped.dr.high
    assert exact.dr.low <= truth <= exact.dr.high
    assert (clipped.dr.high - clipped.dr.low) < 0.2 * (exact.dr.high - exact.dr.low)
    single = fb.weights(target, slots=[0])                 # one slot: never clipped
    assert single.max() == pytest.approx(1 / (0.3 / 4))


def test_dr_may_clip_its_weights_harder_than_ips_and_snips_without_moving_them():
    x, fb, mean_reward = _bandit(20_000, 8)
    target = [_deterministic(np.where(x > 0, 1, 2), 3), _deterministic(np.ones(len(x), dtype=int), 2)]
    w, q = fb.weights(target), mean_reward(fb.actions[:, 0], fb.actions[:, 1])
    qt = mean_reward(np.where(x > 0, 1, 2), 1)
    same = estimate(fb, target, q, qt, seed=3, estimators=(IPS(), SNIPS(), DR(JOINT_CLIP)))
    hard = estimate(fb, target, q, qt, seed=3, estimators=(IPS(), SNIPS(), DR(clip=2.0)))
    assert hard.ips == same.ips and hard.snips == same.snips and hard.ess == same.ess
    r = fb.rewards
    assert same.dr.value == pytest.approx(np.mean(qt + w * (r - q)))   # DR on IPS's weights
    assert hard.dr.value == pytest.approx(np.mean(qt + np.minimum(w, 2.0) * (r - q)))
    assert hard.dr.value != pytest.approx(same.dr.value)


def test_one_bootstrap_shared_by_several_policies_gives_each_the_intervals_of_its_own_draw():
    """Training judges many policies on one holdout with one set of replicates: the intervals
    must be those each policy gets alone from the same seed, paired differences included."""
    x, fb, mean_reward = _bandit(20_000, 7)
    q = mean_reward(fb.actions[:, 0], fb.actions[:, 1])
    shared = Bootstrap(len(x), seed=11)
    for t0 in (np.where(x > 0, 1, 2), np.zeros(len(x), dtype=int)):
        target = [_deterministic(t0, 3), _deterministic(np.zeros(len(x), dtype=int), 2)]
        qt = mean_reward(t0, 0)
        alone = estimate(fb, target, q, qt, seed=11).as_dict()
        together = estimate(fb, target, q, qt, bootstrap=shared).as_dict()
        for name in ("ips", "snips", "dr"):
            assert together[name] == pytest.approx(alone[name], rel=1e-12)
        base = [_deterministic(np.zeros(len(x), dtype=int), 3), target[1]]
        qb = mean_reward(np.zeros(len(x), dtype=int), 0)
        assert (difference(fb, target, qt, base, qb, q, bootstrap=shared).as_dict()
                == pytest.approx(difference(fb, target, qt, base, qb, q, seed=11).as_dict(), rel=1e-12))


def test_a_new_estimator_is_one_class_sharing_the_bootstrap_and_the_paired_difference():
    """Switch-DR (Wang, Agarwal & Dudik 2017) written against the interface: DR where the weight
    is at most tau, the value model alone beyond it."""
    from dataclasses import dataclass

    from insertrec.ope import Estimator

    @dataclass(frozen=True)
    class SwitchDR(Estimator):
        tau: float = 5.0
        clip: float | None = None

        def terms(self, weights, rewards, q_logged, q_target):
            return (q_target + np.where(weights <= self.tau, weights, 0.0) * (rewards - q_logged))[:, None]

        def combine(self, sums, totals):
            return sums[..., 0] / totals

    x, fb, mean_reward = _bandit(40_000, 9)
    t0 = np.where(x > 0, 1, 2)
    target = [_deterministic(t0, 3), _deterministic(np.zeros(len(x), dtype=int), 2)]
    q, qt = mean_reward(fb.actions[:, 0], fb.actions[:, 1]), mean_reward(t0, 0)
    truth = qt.mean()
    est = SwitchDR().estimate(fb, target, q, qt, bootstrap=Bootstrap(len(x), seed=2))
    assert est.low <= truth <= est.high
    assert SwitchDR(tau=np.inf).estimate(fb, target, q, qt) == DR(clip=None).estimate(fb, target, q, qt)
    assert SwitchDR().difference(fb, target, qt, target, qt, q).as_dict() == {"value": 0.0, "low": 0.0, "high": 0.0}


def _slate_bandit(n: int, seed: int):
    """Three slots (4, 3 and 3 actions) drawn independently, each its playbook's action (which depends
    on x) with probability 0.8, else uniform; the mean reward is a baseline, an effect of each slot's
    action that depends on x, and one slot-pair interaction. Returns x, the feedback, the mean reward
    of boxes (b0, b1, b2), and its additive part (the interaction left out)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    sizes, eps = (4, 3, 3), 0.2
    rules = [np.where(x > 0, 1, 0), np.zeros(n, dtype=int), (x > 1).astype(int)]
    mu = [np.full((n, k), eps / k) + 0.8 * np.eye(k)[rule] for k, rule in zip(sizes, rules)]
    actions = np.stack([(rng.random(n)[:, None] > np.cumsum(m, axis=1)).sum(axis=1) for m in mu], axis=1)
    effects = [np.array([0.0, 1.0, -0.5, 2.0]), np.array([0.0, -1.0, 1.5]), np.array([0.0, 0.5, 1.0])]

    def additive(b0, b1, b2):
        return 20 + 2 * x + effects[0][b0] * (1 + 0.5 * x) + effects[1][b1] + effects[2][b2] * x

    def mean_reward(b0, b1, b2):
        return additive(b0, b1, b2) - 2.5 * ((b0 == 3) & (b1 == 2))

    r = mean_reward(*actions.T) + rng.normal(scale=4.0, size=n)
    pscores = np.stack([mu[s][np.arange(n), actions[:, s]] for s in range(3)], axis=1)
    return x, LoggedFeedback(r, actions, pscores), mean_reward, additive


@pytest.mark.parametrize("seed", [0, 1])
def test_pseudo_inverse_dr_finds_a_slate_far_from_logging_where_clipped_dr_cannot(seed):
    """A target that leaves the playbook in all three slots matches a logged box with probability
    about 0.05 * 0.067 * 0.067 (joint weights in the thousands): a clip of 10 leaves almost all of
    its mass to a value model that here knows the baseline and the slot-pair interaction but not the
    slots' effects, and DR stays on that model's opinion. The pseudo-inverse weight, a sum of the
    slots' ratios, needs only the residual to be additive, which it is: DR-PI covers the truth."""
    n = 60_000
    x, fb, mean_reward, additive = _slate_bandit(n, seed)
    t = [np.full(n, 3), np.full(n, 2), np.where(x > 0, 2, 0)]
    target = [_deterministic(t[0], 4), _deterministic(t[1], 3), _deterministic(t[2], 3)]
    truth = mean_reward(*t).mean()
    q = 20 + 2 * x - 2.5 * ((fb.actions[:, 0] == 3) & (fb.actions[:, 1] == 2))   # no slot effects
    q_target = 20 + 2 * x - 2.5
    assert clipped_share(fb, target) > 0.9
    pi = DRPI().estimate(fb, target, q, q_target, bootstrap=Bootstrap(n, seed=seed))
    dr = DR().estimate(fb, target, q, q_target, bootstrap=Bootstrap(n, seed=seed))
    assert pi.low <= truth <= pi.high, (pi, truth)
    assert abs(pi.value - truth) < 0.03 * truth
    assert not dr.low <= truth <= dr.high, (dr, truth)     # the clip's bias: what DR-PI removes
    # Without the interaction in the value model the residual is no longer additive: DR-PI is off
    # by what the pseudo-inverse weight makes of the interaction, as the docstring says.
    base = 20 + 2 * x
    blind = DRPI().estimate(fb, target, base, base, bootstrap=Bootstrap(n, seed=seed))
    assert not blind.low <= truth <= blind.high, (blind, truth)


def test_pseudo_inverse_weight_is_the_slots_ratios_summed_less_the_slots_but_one():
    f = LoggedFeedback(np.zeros(2), np.zeros((2, 3), dtype=int), np.array([[0.5, 0.25, 1.0], [1.0, 1.0, 0.5]]))
    target = [np.array([[1.0, 0.0], [0.5, 0.5]])] * 3
    assert f.pseudo_inverse_weights(target) == pytest.approx([2 + 4 + 1 - 2, 0.5 + 0.5 + 1 - 2])
    assert f.pseudo_inverse_weights(target, slots=[1]) == pytest.approx(f.weights(target, slots=[1]))
    assert DRPI().weigh(f, target, None) == pytest.approx(f.pseudo_inverse_weights(target))


def test_lift_over_the_logging_policy_is_paired_with_the_logged_rewards():
    """DR-PI's value minus the mean logged reward, on the same replicates: its interval holds the
    true gain over the logging policy and is narrower than the value's own interval."""
    n = 60_000
    x, fb, mean_reward, _ = _slate_bandit(n, 3)
    t = [np.full(n, 3), np.full(n, 2), np.where(x > 0, 2, 0)]
    target = [_deterministic(t[0], 4), _deterministic(t[1], 3), _deterministic(t[2], 3)]
    q = 20 + 2 * x - 2.5 * ((fb.actions[:, 0] == 3) & (fb.actions[:, 1] == 2))   # no slot effects
    q_target = 20 + 2 * x - 2.5
    boot = Bootstrap(n, seed=3)
    gain = DRPI().versus_logged(fb, target, q, q_target, bootstrap=boot)
    value = DRPI().estimate(fb, target, q, q_target, bootstrap=boot)
    rules = [np.where(x > 0, 1, 0), np.zeros(n, dtype=int), (x > 1).astype(int)]   # as _slate_bandit logs
    mu = [np.full((n, k), 0.2 / k) + 0.8 * np.eye(k)[rule] for k, rule in zip((4, 3, 3), rules)]
    logging_truth = sum((mu[0][:, b0] * mu[1][:, b1] * mu[2][:, b2] * mean_reward(b0, b1, b2)).mean()
                        for b0 in range(4) for b1 in range(3) for b2 in range(3))
    true_gain = mean_reward(*t).mean() - logging_truth
    assert gain.value == pytest.approx(value.value - fb.rewards.mean())
    assert gain.low <= true_gain <= gain.high, (gain, true_gain)
    assert gain.high - gain.low < value.high - value.low


def test_lifts_are_withheld_where_the_model_takes_actions_the_log_never_tried():
    """A slot whose logging policy never plays action 2: a target that does has ratios averaging
    below 1 there (it cannot be matched), and evaluate's sentence names that slot."""
    from insertrec.evaluation import lift_withheld, overlap
    from insertrec.ope import Estimate

    n = 20_000
    x, fb, _, _ = _slate_bandit(n, 5)
    narrow = np.array([0.9, 0.1, 0.0])
    actions = fb.actions.copy()
    actions[:, 2] = (np.random.default_rng(5).random(n) < 0.1).astype(int)
    fb = LoggedFeedback(fb.rewards, actions, np.column_stack([fb.pscores[:, :2], narrow[actions[:, 2]]]))
    playbook = [_deterministic(np.where(x > 0, 1, 0), 4), _deterministic(np.zeros(n, dtype=int), 3),
                _deterministic(np.zeros(n, dtype=int), 3)]
    tight = Estimate(0.02, 0.0, 0.04)
    assert lift_withheld("lift_vs_rules", tight, n, overlap(fb, playbook, ["box", "insert", "coupon"])) is None
    reaching = playbook[:2] + [_deterministic(np.where(x > 0, 2, 0), 3)]
    why = lift_withheld("lift_vs_rules", tight, n, overlap(fb, reaching, ["box", "insert", "coupon"]))
    assert why is not None and "in coupon" in why and "never tried" in why
    wide = lift_withheld("lift_vs_rules", Estimate(0.02, -0.04, 0.08), n, overlap(fb, playbook, ["a", "b", "c"]))
    assert wide is not None and "wider than +-3 points" in wide and f"about {4 * n:,} unseen orders" in wide


def test_the_model_value_is_withheld_where_its_interval_is_too_wide_or_actions_were_never_tried():
    """evaluate's rule for the model's value: printed within +-MAX_VALUE_HALFWIDTH of it, else withheld
    with the interval and the unseen orders it would take; actions the log never tried withhold it too."""
    from insertrec.evaluation import MAX_VALUE_HALFWIDTH, value_withheld
    from insertrec.ope import Estimate

    fine = {"box": Estimate(1.0, 0.9, 1.1)}
    edge = 30 * MAX_VALUE_HALFWIDTH
    assert value_withheld(Estimate(30.0, 30.0 - edge, 30.0 + edge), 13_000, fine) is None
    why = value_withheld(Estimate(30.0, 30.0 - 2 * edge, 30.0 + 2 * edge), 13_000, fine)
    assert why is not None and why.startswith("the model's value (policy_value_dr, _ips, _snips) withheld")
    assert f"wider than +-{MAX_VALUE_HALFWIDTH:.0%} of it" in why and "about 52,000 unseen orders" in why
    unseen = value_withheld(Estimate(30.0, 29.0, 31.0), 13_000, {"coupon": Estimate(0.6, 0.5, 0.7)})
    assert unseen is not None and "in coupon" in unseen and "never tried" in unseen
    assert "more unseen orders" in value_withheld(Estimate(0.0, -1.0, 1.0), 13_000, fine)


@pytest.mark.parametrize("field, change, reason", [
    ("pscores", lambda r, a, p: (r, a, np.where(np.arange(len(p))[:, None] == 3, 0.0, p)), "in (0, 1]"),
    ("pscores", lambda r, a, p: (r, a, p * 2), "in (0, 1]"),
    ("rewards", lambda r, a, p: (np.where(np.arange(len(r)) == 5, np.nan, r), a, p), "finite"),
    ("actions", lambda r, a, p: (r, a[:-1], p), "(orders, slots)"),
    ("pscores", lambda r, a, p: (r, a, p[:, :1]), "actions' shape"),
])
def test_bad_logged_feedback_is_refused_naming_the_field(field, change, reason):
    from insertrec.errors import InsertrecError
    _, fb, _ = _bandit(100, 0)
    with pytest.raises(InsertrecError, match=rf"{field}.*{re.escape(reason)}"):
        LoggedFeedback(*change(fb.rewards, fb.actions, fb.pscores))


def test_estimate_refuses_a_target_or_value_model_of_the_wrong_shape():
    from insertrec.errors import InsertrecError
    x, fb, _ = _bandit(100, 0)
    target = [_deterministic(np.zeros(100, dtype=int), 3), _deterministic(np.zeros(100, dtype=int), 2)]
    q = np.zeros(100)
    with pytest.raises(InsertrecError, match="target.*2 slots"):
        estimate(fb, target[:1], q, q)
    with pytest.raises(InsertrecError, match=r"target\[0\]"):
        estimate(fb, [target[0][:50], target[1]], q, q)
    with pytest.raises(InsertrecError, match="q_target.*one value per order"):
        estimate(fb, target, q, q[:10])
    with pytest.raises(InsertrecError, match="q_logged.*finite"):
        estimate(fb, target, np.full(100, np.inf), q)


def test_clipped_share_is_the_share_of_the_weight_mass_the_clip_takes():
    """Three orders whose joint weights are 100, 1 and 1: a clip of 10 keeps 10 + 1 + 1 of 102, so
    88% of the target's mass rests on the value model."""
    f = LoggedFeedback(np.zeros(3), np.zeros((3, 2), dtype=int), np.array([[0.1, 0.1], [1.0, 1.0], [0.5, 0.5]]))
    target = [np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])] * 2
    assert clipped_share(f, target, clip=10.0) == pytest.approx(1 - 12 / 102)
    assert clipped_share(f, target, clip=200.0) == 0.0
    sure = [np.ones((3, 1)), np.ones((3, 1))]   # the logged boxes for certain: weights 100, 1 and 4
    assert clipped_share(f, sure, clip=10.0) == pytest.approx(1 - 15 / 105)
