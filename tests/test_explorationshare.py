"""The recommended exploration share: more where the evidence is unsettled, the minimum where it is settled."""

import numpy as np
import pytest

from insertrec.explorationshare import MAX_EPSILON, MIN_EPSILON, slot_advice

MONTHLY = 3000          # orders per month of the simulated shop
TRUE_GAIN, SD = 0.3, 20.0  # the model's true gain over the playbook per order, and the paired noise


def _advice(months_of_holdout: float, seed: int = 0, fixed_to: str | None = None):
    """The advice from a holdout of simulated paired gains (80% normal interval, as the gate's)."""
    n = int(months_of_holdout * MONTHLY)
    gains = np.random.default_rng(seed).normal(TRUE_GAIN, SD, n)
    half = 1.2816 * gains.std() / np.sqrt(n)
    return slot_advice(n, float(gains.mean()), float(half), gap=0.4, fallback="playbook",
                       monthly_orders=MONTHLY, fixed_to=fixed_to)


@pytest.mark.parametrize("seed", range(5))
def test_a_short_history_explores_more_than_a_long_one_of_the_same_shop(seed):
    short, long = _advice(0.5, seed), _advice(20, seed)
    assert short.recommended_epsilon > long.recommended_epsilon == MIN_EPSILON
    assert "Undecided" in short.reason and "Settled" in long.reason


def test_a_slot_the_gate_fixed_explores_only_the_minimum():
    free, fixed = _advice(0.5), _advice(0.5, fixed_to="default")
    assert fixed.recommended_epsilon == MIN_EPSILON < free.recommended_epsilon
    assert "the default decides it" in fixed.reason


@pytest.mark.parametrize("months", [0.01, 0.1, 0.5, 2, 20, 200])
def test_the_share_is_never_zero_and_never_past_the_maximum(months):
    advice = _advice(months)
    assert 0 < MIN_EPSILON <= advice.recommended_epsilon <= MAX_EPSILON < 1
    assert advice.cost_per_order == pytest.approx(advice.recommended_epsilon * advice.gap)


def test_exploring_that_costs_more_than_the_choice_is_worth_is_not_recommended():
    cheap = slot_advice(1500, 0.1, 0.5, gap=0.4, fallback="playbook", monthly_orders=MONTHLY)
    dear = slot_advice(1500, 0.1, 0.5, gap=50.0, fallback="playbook", monthly_orders=MONTHLY)
    assert dear.recommended_epsilon == MIN_EPSILON < cheap.recommended_epsilon
