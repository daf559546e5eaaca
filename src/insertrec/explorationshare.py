"""How large a share of each slot's decisions should explore: a recommendation from the run's evidence.

Exploring costs now and pays later. The rule is explore-then-commit
(Lattimore & Szepesvari, *Bandit Algorithms*, 2020, ch. 6, eq. 6.5): to tell
two options whose values differ by ``delta`` apart, with per-order noise
``sigma``, over a horizon of ``H`` orders, it pays to try each about

    m = 4 sigma^2 / delta^2 * log(H delta^2 / (4 sigma^2))        (0 where the log is not positive)

times before committing. Per slot the two options are the model's choice and
its fallback (the playbook, or the slot default where training doubts the
playbook: `evaluation.slot_deciders`), and the holdout measured both on ``n`` orders:
the paired gain ``d`` with an interval of half-width ``h`` at level ``level``
(z its normal quantile), so, as intervals shrink with 1/sqrt(n),

    sigma^2 = n (h / z)^2,    delta = max(|d|, h)

(the gain at stake is the estimate or, where that is within the noise, as
large as the noise still allows: the value of the information). The orders
still needed are ``m - n``; spread over the horizon ``H = orders per month x
HORIZON_MONTHS``, the recommended share is

    epsilon = clip((m - n) / H, MIN_EPSILON, MAX_EPSILON)

with three exceptions that give the minimum: a slot the gate fixed to the
playbook or the default (its exploring draw is the floor alone, and the
evidence there is settled against the model), and a share whose cost per
order, ``epsilon x gap``, is at least the gain at stake ``delta`` (it cannot
pay), or one that needs more than ``MAX_EPSILON x H`` orders (it cannot
be settled within the horizon). ``gap`` is what one exploring decision in the slot gives up: the
expected value of the greedy box minus that of the exploring draw in that
slot, both from the cross-fitted judge's value model on the holdout orders.
A settled slot (a narrow interval: m <= n) and a slot where the horizon is
too short to resolve the doubt (log <= 0) explore at the minimum; an
unsettled one on a small history more.

The assumption to know: one more logged order informs the comparison as much
as one holdout order did (logged under the shop's exploration then); a policy
that explores less than its logging did learns more slowly than this says.

``MIN_EPSILON`` is never 0: exploration's floor is spread uniformly over a
slot's ``k`` eligible actions, so every action keeps probability at least
``MIN_EPSILON x exploration.FLOOR / k`` (1 in 1,250 orders at k = 5). The
logged propensities stay positive for every action, which the next run's DR
needs, and a shop of 10,000 orders a month still logs each action about 8
times a month, enough for a change in what works to show within a year.

Served by default: ``train --epsilon auto`` (the default) has each slot of the
model explore its recommended share (`Policy`'s per-slot ``epsilon``; the
manifest's ``served_epsilon``); ``train --epsilon SHARE`` serves that one share
in every slot and leaves this a recommendation for people (ope.json, report,
MLflow metrics). Measured against the single 0.1 it replaced, on the same
histories and fresh orders: bench/results/share.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from insertrec.evaluation import Judge, SlotDeciders
from insertrec.policy import Policy

__all__ = ["HORIZON_MONTHS", "MAX_EPSILON", "MIN_EPSILON", "SlotAdvice", "exploration_advice", "monthly_orders",
           "orders_per_month", "slot_advice"]

MIN_EPSILON = 0.02     # never 0: every action keeps a positive propensity (module docstring)
MAX_EPSILON = 0.5      # past half, exploring is the policy and the model's choice the exception
HORIZON_MONTHS = 12    # the time a decision is expected to be paid back in


@dataclass(frozen=True)
class SlotAdvice:
    """One slot's recommended exploration share, what it costs, and why (`exploration_advice`)."""

    recommended_epsilon: float
    cost_per_order: float          # recommended_epsilon x gap: value given up per order
    gap: float                     # value one exploring decision in this slot gives up (judge's q)
    gain: float                    # the model's paired gain over the fallback on the holdout
    half_width: float              # that gain's interval half-width
    fallback: str                  # playbook | default
    orders_needed: float           # explore-then-commit's m, the judged orders included
    judged_orders: int             # n, the holdout orders the gain was measured on
    horizon_orders: float
    reason: str                    # a sentence for the marketer

    def as_dict(self) -> dict:
        return asdict(self)


def orders_per_month(order_ts: pd.Series) -> float:
    """The shop's orders per month over the span ``order_ts`` covers (at least one day)."""
    return monthly_orders(len(order_ts), order_ts.min(), order_ts.max())


def monthly_orders(count: int, first: pd.Timestamp, last: pd.Timestamp) -> float:
    """``count`` orders from ``first`` to ``last`` as orders per month (the span at least one day):
    what Spark computes from its aggregates, where the order times are not in one Series."""
    days = max((last - first) / pd.Timedelta(days=1), 1.0)
    return count * 30.44 / days


def _gaps(policy: Policy, feats: pd.DataFrame, judge: Judge) -> np.ndarray:
    """Per slot, the mean over the judge's orders of q(greedy box) - q(that slot drawn as exploring)."""
    sub = feats.iloc[judge.logged.rows]
    decisions = policy.replace(epsilon=1.0).decide_frame(sub)
    greedy = policy.replace(epsilon=0.0).probabilities(decisions)
    exploring = policy.replace(epsilon=1.0).probabilities(decisions)
    best = judge.expected_q(greedy)
    return np.array([float(np.mean(best - judge.expected_q([exploring[t] if t == s else p
                                                                for t, p in enumerate(greedy)])))
                     for s in range(len(greedy))])


def slot_advice(n: int, gain: float, half_width: float, gap: float, fallback: str, monthly_orders: float,
                fixed_to: str | None = None, level: float = 0.8) -> SlotAdvice:
    """One slot's share by the module's rule: ``gain`` the model's paired gain over ``fallback`` on
    ``n`` holdout orders, its interval's ``half_width`` at ``level``, ``gap`` what one exploring
    decision gives up, ``fixed_to`` the playbook or default where the gate fixed the slot."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    horizon = monthly_orders * HORIZON_MONTHS
    d, h = gain, half_width
    delta, sigma2 = max(abs(d), h), n * (h / z) ** 2
    ratio = horizon * delta ** 2 / (4 * sigma2) if sigma2 > 0 else 0.0     # sigma2 > 0: h > 0, delta > 0
    m = 4 * sigma2 / delta ** 2 * math.log(ratio) if ratio > 1 else 0.0
    eps = min(max((m - n) / horizon, MIN_EPSILON), MAX_EPSILON)
    figures = f"the model's gain over the {fallback} is {d:+.2f} per order, give or take {h:.2f}"
    floor = f"Explore the minimum, {MIN_EPSILON:.0%} of orders, so that every option keeps being tried."
    if fixed_to is not None:
        eps, why = MIN_EPSILON, f"The evidence settled this slot: the {fixed_to} decides it. {floor}"
    elif h == 0 and d == 0:
        eps, why = MIN_EPSILON, f"The model sends what the {fallback} sends on every order judged. {floor}"
    elif m <= n and (d - h > 0 or d + h < 0):
        eps, why = MIN_EPSILON, f"Settled: {figures}. {floor}"
    elif m <= n:
        eps, why = MIN_EPSILON, (f"Undecided ({figures}), but {HORIZON_MONTHS} months of orders add too little "
                                 f"to the {n:,} already judged for more exploring to pay. {floor}")
    elif m - n > MAX_EPSILON * horizon:
        eps, why = MIN_EPSILON, (f"Undecided ({figures}), and not to be settled within {HORIZON_MONTHS} "
                                 f"months at any share. {floor}")
    elif eps * max(gap, 0.0) >= delta:
        eps, why = MIN_EPSILON, (f"Undecided ({figures}), but exploring would cost more per order than "
                                 f"the choice is worth. {floor}")
    else:
        why = (f"Undecided: {figures}. Exploring {eps:.0%} of orders over the next {HORIZON_MONTHS} months "
               f"would settle it, at about {eps * max(gap, 0.0):.2f} per order.")
    return SlotAdvice(eps, eps * gap, gap, d, h, fallback, m, n, horizon, why)


def exploration_advice(policy: Policy, feats: pd.DataFrame, judge: Judge, deciders: SlotDeciders,
                       monthly_orders: float, level: float = 0.8) -> dict[str, SlotAdvice]:
    """Per slot the recommended exploration share (`slot_advice`; module docstring: the rule and why).

    ``policy`` is the gated policy as it will be served; ``judge`` holds the holdout orders the
    gate was decided on and ``deciders`` its per-slot gains (intervals at ``level``);
    ``monthly_orders`` the shop's orders per month (`orders_per_month`).
    """
    fixed = {**dict.fromkeys(deciders.playbook_slots, "playbook"), **dict.fromkeys(deciders.default_slots, "default")}
    out: dict[str, SlotAdvice] = {}
    for name, gap in zip(policy.slot_names, _gaps(policy, feats, judge), strict=True):
        gains = deciders.gains[name]
        fallback = gains["fallback"]
        est = gains[f"model_vs_{fallback}"]
        out[name] = slot_advice(len(judge.logged), float(est["value"]), (float(est["high"]) - float(est["low"])) / 2,
                                float(gap), fallback, monthly_orders, fixed.get(name), level)
    return out
