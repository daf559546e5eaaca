"""Off-policy estimators: what a policy would have earned on logged orders.

Split as in Open Bandit Pipeline: the logged feedback (rewards, the actions
received, their logged propensities), the target policy (the probability it
gives each action), and estimators behind one interface. Here a box has
several slots; the logging policy randomises slots independently, so an
importance weight can be taken over all slots (the joint decision) or over
one slot (that slot's policy, the other slots as logged). For the joint
decision the exact weight, the product of the slots' ratios, has a heavy
tail: a policy that departs from the logging policy in three slots at once
matches a logged box so rarely that a handful of orders carry the estimate
(an effective sample of 19 out of 14,710 was measured on the simulated
shop, and DR missed the truth by 64%). Joint weights are therefore clipped:
a little bias for DR, whose value model covers what the clipped weights
leave out, against far less variance. The bias is the clipped share of the
target's mass times the value model's error on those boxes, so the clip and
the value model are chosen together (bench/dr_bias.py: the learned policy on
the latest fifth of a 30k-customer history, never trained on, against its
true value on the same orders; the default world and a perturbed one, seeds
4242, 1, 2, 3, 5, 6). With the judge's value model shrunk as hard as a
decision model's cross-validation picks (it held every action effect near
zero: the target judged worth what the logging policy is, -2..+1%, where
the truth said +4.5..+7%) and a clip of 30, which removed 5-60% of the
weight mass, DR ran low: mean error -3.1% (rms 6.0%), 7 of 12 within 5%, down to
-10.5%. With the judge shrunk far less (evaluation.JUDGE_ACTION_ALPHAS)
the clip's bias given the value model fell from -2.9% to -1.0% on average,
and a clip of 10 for DR (DR_CLIP) halved the spread (a bootstrap sd of
1.7% against 3.0% at 30) for little more bias: mean error -1.3% (rms 4.0%), 10 of 12
within 5%; the misses are +5.8% and -8.2%, the latter a policy with 47% of
the weight mass past the clip whose boxes the linear value model gets 7%
too low. Reward noise alone moves these holdout means by up to 2%. IPS
and SNIPS keep the clip of 30 (JOINT_CLIP): a lower clip costs IPS its
mass (its errors went from -7..-52% to -27..-69% at 10). The
pseudo-inverse weight for slates (Swaminathan et al. 2017) used as IPS
missed by +1.0% and +10.6% on two worlds: its additivity assumption the
worlds' interactions break. Used as DR (`DRPI`), only the value model's
residual need be additive (the value model carries the slot pairs), and
no weight is clipped. Measured with bench/dr_bias.py on five worlds
(default, perturbed, small effects, playbook wrong, coupons waste), seeds
1 and 2, 30,000 customers (bench/results/dr_bias_pseudo_inverse.json),
the lift of the learned policy over the playbook minus the true lift:
clipped DR -9.2..+5.8 points (rms 4.9, 3 of 10 within 3), its paired 95%
interval (+-2.9..4.8) holding the truth in 4 of 10, the clip's bias
unseen by the bootstrap (70-82% of the weight mass clipped on the changed
worlds); DR-PI -7.8..+9.9 points (rms 5.4, 4 of 10 within 3), its
interval (+-6.6..15.5) holding the truth in 10 of 10, and its value's
interval the true value in 10 of 10. The two errors move together (-6.0
and -5.9 on one history): most of either is the holdout's reward noise
(sd 43 per order on a mean of 35), which no estimator removes; DR-PI's
interval accounts for all of its error (no clip's bias hides outside it),
so `evaluation.evaluate` reports DR-PI and prints a lift only where that
interval is narrow. With 11-15k holdout
orders its effective sample was 350-1,260.

Each estimator (`IPS`, `SNIPS`, `DR`, `DRPI`) is a small frozen dataclass holding its
settings (its clip), behind one interface (`Estimator`): it turns the logged
feedback, the target's per-slot probabilities and the value model's
predictions into per-order terms and combines their sums into a value. The
clip rule lives in one place, `LoggedFeedback.weights`: a weight over more
than one slot is clipped at the estimator's clip, a one-slot weight never is.
Point values, bootstrap intervals (a Poisson bootstrap over orders, the
replicates shared by every policy judged on the same orders) and paired
differences are computed once for all estimators, so a new one (switch-DR,
say) is one class. The effective sample size (sum w)^2 / sum w^2 says how
many logged orders an estimate really rests on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from insertrec.errors import InsertrecError

__all__ = [
    "DEFAULT_ESTIMATORS", "DR", "DRPI", "DR_CLIP", "IPS", "JOINT_CLIP", "SNIPS", "Bootstrap", "Estimate",
    "Estimator", "LoggedFeedback", "PolicyEstimates", "clipped_share", "difference", "effective_sample_size",
    "estimate", "expected_value", "onehot",
]

JOINT_CLIP = 30.0   # IPS and SNIPS: their bias is the clipped mass, which a lower clip raises
DR_CLIP = 10.0      # DR: its value model covers what the clip leaves out; see the module docstring


def _fail(field: str, reason: str) -> None:
    raise InsertrecError(f"off-policy estimate: {field} {reason}")


@dataclass(frozen=True)
class LoggedFeedback:
    """Logged orders: reward, received action index per slot, its logged propensity.

    Checked when built, since every estimate divides by the propensities and
    averages the rewards: a propensity of 0 or a NaN reward would otherwise
    come out as an infinite or NaN policy value with no word of why.
    """

    rewards: np.ndarray      # (n,)
    actions: np.ndarray      # (n, n_slots) int
    pscores: np.ndarray      # (n, n_slots) float in (0, 1]

    def __post_init__(self) -> None:
        r, a, p = self.rewards, self.actions, self.pscores
        if r.ndim != 1:
            _fail("rewards", f"must be one value per order, got shape {r.shape}")
        if a.ndim != 2 or a.shape[0] != len(r):
            _fail("actions", f"must be (orders, slots) = ({len(r)}, k), got shape {a.shape}")
        if p.shape != a.shape:
            _fail("pscores", f"must have the actions' shape {a.shape}, got {p.shape}")
        if not np.isfinite(r).all():
            _fail("rewards", f"must be finite ({int((~np.isfinite(r)).sum())} are not)")
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0):
            _fail("actions", "must be non-negative action indices")
        bad = ~((p > 0) & (p <= 1))
        if bad.any():
            _fail("pscores", f"must be in (0, 1] ({int(bad.sum())} are not, e.g. {p[bad][0]!r})")

    def weights(self, target: list[np.ndarray], slots: list[int] | None = None,
                clip: float | None = JOINT_CLIP) -> np.ndarray:
        """pi(A|x) / mu(A|x) over the given slots (all by default; the others as logged),
        clipped at ``clip`` when more than one slot is weighted (None: exact).

        The one clip rule of every estimator: a joint weight's tail is what the
        clip is for (module docstring), while a one-slot weight is bounded by
        the logging policy's exploration and stays exact.
        """
        ratios = self.slot_ratios(target, slots)
        w = ratios.prod(axis=1)
        return w if clip is None or ratios.shape[1] < 2 else np.minimum(w, clip)

    def slot_ratios(self, target: list[np.ndarray], slots: list[int] | None = None) -> np.ndarray:
        """(n, len(slots)): pi_s(a_s|x) / mu_s(a_s|x) of each weighted slot (all by default)."""
        slots = list(range(self.actions.shape[1])) if slots is None else list(slots)
        n = len(self.rewards)
        rows = np.arange(n)
        return np.column_stack([target[s][rows, self.actions[:, s]] / self.pscores[:, s] for s in slots])

    def pseudo_inverse_weights(self, target: list[np.ndarray], slots: list[int] | None = None) -> np.ndarray:
        """sum_s pi_s(a_s|x) / mu_s(a_s|x) - (K - 1) over the K weighted slots (`DRPI`)."""
        ratios = self.slot_ratios(target, slots)
        return ratios.sum(axis=1) - (ratios.shape[1] - 1)


def onehot(actions: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """A deterministic policy's per-slot probabilities (n, n_actions) from its actions (n, n_slots)."""
    return [np.eye(size)[actions[:, s]] for s, size in enumerate(sizes)]


def expected_value(box_values: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    """Per order, the expectation of box values (n, n_boxes in ``ActionSpace.combos`` order) under a
    product-form policy; the boxes are the slots' grid in C order, so one slot is contracted at a time."""
    q = box_values.reshape(len(box_values), *(p.shape[1] for p in probs))
    for p in reversed(probs):
        q = np.einsum("n...a,na->n...", q, p)
    return q


def effective_sample_size(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: how many logged orders an estimate with these weights rests on."""
    return float(weights.sum() ** 2 / max(float((weights ** 2).sum()), 1e-12))


def clipped_share(feedback: LoggedFeedback, target: list[np.ndarray], clip: float = DR_CLIP) -> float:
    """1 - sum min(w, clip) / sum w over all slots' exact weights: the share of the target's weight
    mass that the clip takes from the logged outcomes and leaves to the value model alone.

    Where it is large the estimate is the value model's opinion, however narrow its interval
    (module docstring: why `evaluation.evaluate` uses `DRPI`)."""
    w = feedback.weights(target, clip=None)
    total = float(w.sum())
    return 1.0 - float(np.minimum(w, clip).sum()) / total if total > 0 else 1.0


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class PolicyEstimates:
    """IPS, SNIPS and DR estimates of one policy's value per order, with intervals."""

    ips: Estimate
    snips: Estimate
    dr: Estimate
    ess: float
    n: int

    def as_dict(self) -> dict:
        return {"ips": self.ips.as_dict(), "snips": self.snips.as_dict(), "dr": self.dr.as_dict(),
                "ess": self.ess, "n": self.n}


class Bootstrap:
    """Poisson(1) bootstrap replicates over n orders: replicate b weighs order i by ``counts[b, i]``.

    Drawn once and shared by every estimate on the same orders: training
    judges a dozen policies (and their differences) on one holdout, and
    drawing the counts anew for each took most of the estimators' time.
    Kept as uint8 (a Poisson(1) count above 255 has probability below
    1e-500), drawn in chunks to bound the temporaries.
    """

    def __init__(self, n: int, n_boot: int = 200, seed: int = 0, chunk: int = 50):
        rng = np.random.default_rng(seed)
        self.counts = np.concatenate([rng.poisson(1.0, size=(min(chunk, n_boot - lo), n)).astype(np.uint8)
                                      for lo in range(0, n_boot, chunk)])
        self.totals = self.counts.sum(axis=1, dtype=float)
        self._chunk = chunk

    def sums(self, values: np.ndarray) -> np.ndarray:
        """(B, m): every replicate's count-weighted sums of the columns of ``values`` (n, m)."""
        return np.concatenate([self.counts[lo:lo + self._chunk].astype(float) @ values
                               for lo in range(0, len(self.counts), self._chunk)])


def _interval(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail], axis=-1)
    return low, high


class Estimator(ABC):
    """One off-policy estimator: per-order terms whose sums give the value.

    Written so because every estimator here is a function of a few column
    sums over the orders: the point value is ``combine`` of the sums over all
    orders, each bootstrap replicate ``combine`` of its count-weighted sums,
    and a paired difference the difference of two ``combine``s on the same
    replicate. Subclasses define ``terms`` and ``combine`` only.
    """

    clip: float | None

    @abstractmethod
    def terms(self, weights: np.ndarray, rewards: np.ndarray, q_logged: np.ndarray,
              q_target: np.ndarray) -> np.ndarray:
        """(n, m) per-order terms given the clipped importance weights."""

    @abstractmethod
    def combine(self, sums: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """Values from the column sums (..., m) of the terms over ``totals`` orders (broadcast
        against ``sums[..., 0]``)."""

    def weigh(self, feedback: LoggedFeedback, target: list[np.ndarray], slots: list[int] | None) -> np.ndarray:
        """Each logged order's importance weight for ``target``: the slots' ratios' product, clipped."""
        return feedback.weights(target, slots, self.clip)

    def _terms(self, feedback: LoggedFeedback, target: list[np.ndarray], q_logged: np.ndarray,
               q_target: np.ndarray, slots: list[int] | None) -> np.ndarray:
        return self.terms(self.weigh(feedback, target, slots), feedback.rewards, q_logged, q_target)

    def estimate(self, feedback: LoggedFeedback, target: list[np.ndarray], q_logged: np.ndarray,
                 q_target: np.ndarray, slots: list[int] | None = None, bootstrap: Bootstrap | None = None,
                 level: float = 0.95) -> Estimate:
        """The target policy's value per order with a bootstrap interval.

        ``target`` is the policy's per-slot probabilities (n, n_actions),
        ``slots`` the slots it is judged on (the others as logged; default
        all), ``q_logged`` the value model's prediction for each logged box and
        ``q_target`` its expectation under the target.
        """
        _check(feedback, target, q_logged, q_target, level)
        terms = self._terms(feedback, target, q_logged, q_target, slots)
        boot = Bootstrap(len(feedback.rewards)) if bootstrap is None else bootstrap
        point = self.combine(terms.sum(axis=0), np.asarray(float(len(terms))))
        low, high = _interval(self.combine(boot.sums(terms), boot.totals), level)
        return Estimate(float(point), float(low), float(high))

    def difference(self, feedback: LoggedFeedback, target_a: list[np.ndarray], q_target_a: np.ndarray,
                   target_b: list[np.ndarray], q_target_b: np.ndarray, q_logged: np.ndarray,
                   slots: list[int] | None = None, bootstrap: Bootstrap | None = None,
                   level: float = 0.95) -> Estimate:
        """value(a) - value(b) on the same orders, with a paired bootstrap interval.

        Pairing matters: both policies are judged on the same orders (and the
        same replicates), so the orders' shared noise cancels and the interval
        is far narrower than the two separate intervals suggest.
        """
        _check(feedback, target_a, q_logged, q_target_a, level)
        _check(feedback, target_b, q_logged, q_target_b, level)
        a = self._terms(feedback, target_a, q_logged, q_target_a, slots)
        b = self._terms(feedback, target_b, q_logged, q_target_b, slots)
        return _paired(a, self.combine, b, self.combine, bootstrap, level)

    def versus_logged(self, feedback: LoggedFeedback, target: list[np.ndarray], q_logged: np.ndarray,
                      q_target: np.ndarray, bootstrap: Bootstrap | None = None, level: float = 0.95) -> Estimate:
        """value(target) - the mean logged reward (the logging policy's value, observed) on the same
        orders, with a paired bootstrap interval: the lift over the logging policy needs no model
        of that policy's probabilities beyond the logged ones."""
        _check(feedback, target, q_logged, q_target, level)
        a = self._terms(feedback, target, q_logged, q_target, None)
        return _paired(a, self.combine, feedback.rewards[:, None], lambda sums, totals: sums[..., 0] / totals,
                       bootstrap, level)


def _paired(a: np.ndarray, combine_a: Callable[[np.ndarray, np.ndarray], np.ndarray], b: np.ndarray,
            combine_b: Callable[[np.ndarray, np.ndarray], np.ndarray], bootstrap: Bootstrap | None,
            level: float) -> Estimate:
    """combine_a(terms a) - combine_b(terms b) over the same orders and replicates."""
    m = a.shape[1]
    both = np.hstack([a, b])
    boot = Bootstrap(len(both)) if bootstrap is None else bootstrap
    sums, reps = both.sum(axis=0), boot.sums(both)
    n = np.asarray(float(len(both)))
    point = combine_a(sums[:m], n) - combine_b(sums[m:], n)
    totals = boot.totals
    low, high = _interval(combine_a(reps[:, :m], totals) - combine_b(reps[:, m:], totals), level)
    return Estimate(float(point), float(low), float(high))


@dataclass(frozen=True)
class IPS(Estimator):
    """Inverse propensity scoring (Horvitz & Thompson 1952; Precup, Sutton & Singh 2000):

        V = 1/n sum_i w_i r_i,   w_i = pi(a_i | x_i) / mu(a_i | x_i)

    Unbiased with exact weights, high variance when weights are large; its
    bias when clipped is the clipped share of the target's mass.
    """

    clip: float | None = JOINT_CLIP

    def terms(self, weights: np.ndarray, rewards: np.ndarray, q_logged: np.ndarray,
              q_target: np.ndarray) -> np.ndarray:
        return (weights * rewards)[:, None]

    def combine(self, sums: np.ndarray, totals: np.ndarray) -> np.ndarray:
        return sums[..., 0] / totals


@dataclass(frozen=True)
class SNIPS(Estimator):
    """Self-normalised IPS (Swaminathan & Joachims 2015, "The self-normalized estimator for
    counterfactual learning"):

        V = sum_i w_i r_i / sum_i w_i

    A little bias, far less variance than IPS when the weights' mean is off 1.
    """

    clip: float | None = JOINT_CLIP

    def terms(self, weights: np.ndarray, rewards: np.ndarray, q_logged: np.ndarray,
              q_target: np.ndarray) -> np.ndarray:
        return np.column_stack([weights * rewards, weights])

    def combine(self, sums: np.ndarray, totals: np.ndarray) -> np.ndarray:
        return sums[..., 0] / np.maximum(sums[..., 1], 1e-12)


@dataclass(frozen=True)
class DR(Estimator):
    """Doubly robust (Dudik, Langford & Li 2011, "Doubly robust policy evaluation and learning"):

        V = 1/n sum_i [ E_pi q(x_i, A) + w_i (r_i - q(x_i, a_i)) ]

    The value model's prediction for the target, corrected by the weighted
    residual on the logged box: unbiased if either the propensities or the
    value model are right, and the lowest variance of the three here. Its
    clip is lower than IPS's (DR_CLIP; see the module docstring): the value
    model covers what the clip leaves out.
    """

    clip: float | None = DR_CLIP

    def terms(self, weights: np.ndarray, rewards: np.ndarray, q_logged: np.ndarray,
              q_target: np.ndarray) -> np.ndarray:
        return (q_target + weights * (rewards - q_logged))[:, None]

    def combine(self, sums: np.ndarray, totals: np.ndarray) -> np.ndarray:
        return sums[..., 0] / totals


@dataclass(frozen=True)
class DRPI(DR):
    """Doubly robust with the pseudo-inverse weight for slates (Swaminathan, Krishnamurthy,
    Agarwal, Dudik, Langford, Jose & Zitouni 2017, "Off-policy evaluation for slate
    recommendation"; as a control variate, Vlassis, Chandrashekar, Amat Gil & Kallus 2021,
    "Control variates for slate off-policy evaluation"):

        V = 1/n sum_i [ E_pi q(x_i, A) + G_i (r_i - q(x_i, a_i)) ],
        G_i = sum_s pi_s(a_is | x_i) / mu_s(a_is | x_i) - (K - 1)

    over the K weighted slots. Where the logging policy draws the slots
    independently (it does here: the playbook per slot, uniform exploration
    per slot, the logged propensities per slot exact), E_mu[G g] = E_pi g for
    every g additive over slots, so the correction is unbiased whenever the
    value model's residual is additive: its slot-pair terms and the order's
    baseline carry the rest. No clip is needed, G being bounded by the sum of
    the slots' ratios instead of their product, so no weight mass is left to
    the value model alone; its bias is what the residual holds beyond
    additive terms, its variance that of one slot's weight at a time, not
    their product's (module docstring: what was measured). With one weighted
    slot it is DR. G is negative on orders whose box matches the target in
    few slots, which is how it stays unbiased; the effective sample of G
    says how many orders the correction rests on.
    """

    clip: float | None = None

    def weigh(self, feedback: LoggedFeedback, target: list[np.ndarray], slots: list[int] | None) -> np.ndarray:
        return feedback.pseudo_inverse_weights(target, slots)


def _check(feedback: LoggedFeedback, target: list[np.ndarray], q_logged: np.ndarray,
           q_target: np.ndarray, level: float) -> None:
    n, k = feedback.actions.shape
    if len(target) != k:
        _fail("target", f"must give probabilities for each of the {k} slots, got {len(target)}")
    for s, p in enumerate(target):
        if p.ndim != 2 or p.shape[0] != n or p.shape[1] <= feedback.actions[:, s].max(initial=-1):
            _fail(f"target[{s}]", f"must be (orders, actions of slot {s}) with {n} orders, got {p.shape}")
    for name, q in (("q_logged", q_logged), ("q_target", q_target)):
        if np.shape(q) != (n,):
            _fail(name, f"must be one value per order ({n}), got shape {np.shape(q)}")
        if not np.isfinite(q).all():
            _fail(name, "must be finite")
    if not 0 < level < 1:
        _fail("level", f"must be in (0, 1), got {level}")


DEFAULT_ESTIMATORS: tuple[Estimator, Estimator, Estimator] = (IPS(), SNIPS(), DR())


def estimate(feedback: LoggedFeedback, target: list[np.ndarray], q_logged: np.ndarray,
             q_target: np.ndarray, slots: list[int] | None = None, level: float = 0.95, seed: int = 0,
             bootstrap: Bootstrap | None = None,
             estimators: tuple[Estimator, Estimator, Estimator] = DEFAULT_ESTIMATORS) -> PolicyEstimates:
    """IPS, SNIPS and DR of one target policy on the same bootstrap replicates.

    ``target`` are the policy's per-slot probabilities, ``slots`` the slots
    weighted (default all; the others as logged). Intervals come from
    ``bootstrap`` (default: 200 replicates drawn from ``seed``); the effective
    sample size is that of the IPS estimator's weights.
    """
    boot = Bootstrap(len(feedback.rewards), seed=seed) if bootstrap is None else bootstrap
    ips, snips, dr = (e.estimate(feedback, target, q_logged, q_target, slots, boot, level) for e in estimators)
    ess = effective_sample_size(feedback.weights(target, slots, estimators[0].clip))
    return PolicyEstimates(ips, snips, dr, ess, len(feedback.rewards))


def difference(feedback: LoggedFeedback, target_a: list[np.ndarray], q_target_a: np.ndarray,
               target_b: list[np.ndarray], q_target_b: np.ndarray, q_logged: np.ndarray,
               slots: list[int] | None = None, level: float = 0.95, seed: int = 0,
               bootstrap: Bootstrap | None = None, estimator: Estimator = DEFAULT_ESTIMATORS[2]) -> Estimate:
    """``estimator``'s (default DR) value(a) - value(b) on the same orders, paired bootstrap interval."""
    boot = Bootstrap(len(feedback.rewards), seed=seed) if bootstrap is None else bootstrap
    return estimator.difference(feedback, target_a, q_target_a, target_b, q_target_b, q_logged, slots,
                                boot, level)
