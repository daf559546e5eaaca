"""Which action an exploring decision tries: a softmax over the estimated gaps, with a floor.

Uniform exploration spends the same on a 2.00 gift wrap the model is sure
loses money as on a card it is torn about; measured on the simulated worlds,
epsilon = 0.1 uniform cost 0.6-0.9% of the value per order. Here an exploring
slot draws action ``a`` with probability

    floor / k + (1 - floor) * exp(-gap_a / tau) / sum_b exp(-gap_b / tau)

over its ``k`` eligible actions, where ``gap_a`` is how far the best box
holding ``a`` is estimated below the best box of all (0 for the best) and
``tau`` is ``temperature`` times the model's reward scale. The exploration is
spent where the value is uncertain and the gap small (the idea of inverse-gap
weighting, SquareCB, Foster & Rakhlin 2020, with a softmax's smoothness), and
the floor keeps every eligible action tried with probability at least
``epsilon * floor / k``, so a wrong estimate can still be corrected. Without
estimates (a rules-only policy) the draw is uniform, as before.

In a slot the evidence took from the model (training's gate fixed it to the
playbook or the default: `evaluation.slot_deciders`) the model's estimates
were shown wrong or unproven, so a softmax over them would spend exploration
where it is least likely to pay: there the exploring draw is the floor alone,
uniform for a share ``floor`` of the exploring decisions and the fixed action
otherwise. Every action is still tried at the same floor; the slot just stops
paying for the model's guesses (measured on a world where the playbook is
wrong, 5,000 customers: exploration took the deployed policy from +0.01% to
-0.68% against the all-default box, most of it in the two gated slots). The same holds in a
slot training doubted (`Policy.doubted_slots`: the log did not show the playbook paying there), where
the estimates are the ones that followed a losing playbook: its exploring draw is the floor alone
around the action the doubted scores chose.

How often a slot explores (``epsilon``) and the hash that makes a decision a
pure function of the order id and model version stay in `policy`; this module
only says what is drawn and with which exact probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import accumulate
from typing import NamedTuple

import numpy as np

__all__ = ["FLOOR", "TEMPERATURE", "draw", "draw_one", "explore_probabilities", "explore_probabilities_one"]

FLOOR = 0.2          # share of the exploration spread uniformly over the eligible actions
TEMPERATURE = 0.01   # softmax temperature, in units of the reward's standard deviation


def explore_probabilities(scores: np.ndarray | None, eligible: np.ndarray, slices: list[slice],
                          tau: float, floor: float = FLOOR, greedy: np.ndarray | None = None,
                          fixed: Sequence[int] = ()) -> np.ndarray:
    """(n, n_actions) flat, per slot summing to 1: the distribution an exploring slot draws from.

    ``scores`` (n, n_actions): each action's best eligible box value (-inf where ineligible), or
    None for uniform; ``eligible`` bool, same layout; ``slices`` each slot's columns, side by side
    from column 0 (`Catalog.columns`). In the slots ``fixed`` (indices) the draw is the floor alone
    around ``greedy`` (n, n_slots), the action the slot was fixed to.

    All slots in one pass (a micro-batch pays a fixed number of NumPy calls, not a dozen per
    slot), with the arithmetic of one order's path: elementwise steps on the flat row, the
    exact per-slot counts and maxima by ``reduceat``, and each slot's sum of weights NumPy's
    own pairwise sum over that slot, as `explore_probabilities_one` takes it.
    """
    layout = _layout(tuple((sl.start, sl.stop) for sl in slices))
    elig = eligible.astype(float)
    uniform = elig / np.add.reduceat(elig, layout.starts, axis=1).take(layout.slot_of, axis=1)   # counts: exact
    if scores is None:
        return uniform
    # rounded: one order's scores and its row in a batch differ in the last bits (BLAS blocking),
    # and the logged propensity must not
    v = np.where(eligible, scores.round(6), -np.inf)
    w = np.exp((v - np.maximum.reduceat(v, layout.starts, axis=1).take(layout.slot_of, axis=1)) / tau)  # exp(-gap/tau)
    total = np.ones((len(w), len(slices)))
    for s, sl in enumerate(slices):
        if s in fixed:   # the floor alone around the fixed action (x + 0.0 is x: the bits of adding 1 - floor)
            assert greedy is not None, "a fixed slot needs the action it was fixed to"
            w[:, sl] = 0.0
            w[np.arange(len(w)), sl.start + greedy[:, s]] = 1.0
        else:
            total[:, s] = w[:, sl].sum(axis=1)
    return floor * uniform + (1.0 - floor) * w / total.take(layout.slot_of, axis=1)


def draw(probs: np.ndarray, u: np.ndarray, slices: list[slice]) -> np.ndarray:
    """(n, n_slots) action indices drawn from ``probs`` (flat, per slot) by inverse CDF with
    uniforms ``u`` (n, n_slots) in [0, 1): an action of probability 0 is never drawn.

    All slots at once, each padded with zeros to the widest: a cumulative sum adds in the same
    order, and past a slot's end it stays at the slot's total, which is exactly 1 after the
    division and so never counted below ``u``."""
    layout = _layout(tuple((sl.start, sl.stop) for sl in slices))
    cum = probs.take(layout.padded, axis=1)                     # (n, n_slots, widest)
    cum[:, layout.padding] = 0.0
    np.cumsum(cum, axis=2, out=cum)
    cum /= cum[:, :, -1:]                                       # the last step is exactly 1 > u
    return (cum <= u[:, :, None]).sum(axis=2)


class _Layout(NamedTuple):
    """Index arrays of a flat action layout (slots side by side), computed once per layout."""

    starts: list[int]        # each slot's first column
    slot_of: np.ndarray      # (n_actions,) each column's slot
    padded: np.ndarray       # (n_slots, widest) each slot's columns, padded with its last column
    padding: np.ndarray      # (n_slots, widest) bool: where the padding is


@lru_cache(maxsize=16)
def _layout(bounds: tuple[tuple[int, int], ...]) -> _Layout:
    widest = max(stop - start for start, stop in bounds)
    offsets = np.arange(widest)
    padded = np.array([np.minimum(start + offsets, stop - 1) for start, stop in bounds], dtype=np.intp)
    padding = np.array([start + offsets >= stop for start, stop in bounds])
    slot_of = np.repeat(np.arange(len(bounds)), [stop - start for start, stop in bounds])
    return _Layout([start for start, _ in bounds], slot_of, padded, padding)


def explore_probabilities_one(scores: list[float] | None, eligible: list[bool], slices: list[slice],
                              tau: float, floor: float = FLOOR, greedy: list[int] | None = None,
                              fixed: Sequence[int] = ()) -> list[float]:
    """`explore_probabilities` for one order, as flat lists (the service's path): the same
    numbers to the last bit, at a fraction of the cost (a dozen small NumPy calls cost more than
    the arithmetic on 17 actions). Plain floats do what NumPy's elementwise operations do (IEEE
    double, round half to even); the two steps whose bits depend on NumPy's own code, ``exp``
    and the pairwise sum, are NumPy's."""
    k = [sum(eligible[sl]) for sl in slices]
    if scores is None:
        return [e / k[s] for s, sl in enumerate(slices) for e in eligible[sl]]
    s = [round(x * 1e6) / 1e6 if e else -math.inf for x, e in zip(scores, eligible)]   # np.round(x, 6)
    top = [max(s[sl]) for sl in slices]
    w = np.exp([(x - top[j]) / tau for j, sl in enumerate(slices) for x in s[sl]])
    total = [float(w[sl].sum()) for sl in slices]
    w = w.tolist()
    if fixed:   # the floor alone around the fixed action (x + 0.0 is x: the batch's bits)
        assert greedy is not None, "a fixed slot needs the action it was fixed to"
        for j in fixed:
            sl = slices[j]
            w[sl] = [float(i == sl.start + greedy[j]) for i in range(sl.start, sl.stop)]
            total[j] = 1.0
    return [floor * (eligible[i] / k[j]) + (1.0 - floor) * w[i] / total[j]
            for j, sl in enumerate(slices) for i in range(sl.start, sl.stop)]


def draw_one(probs: list[float], u: float) -> int:
    """`draw` for one slot of one order: ``probs`` that slot's distribution, ``u`` in [0, 1)."""
    cum = list(accumulate(probs))          # NumPy's cumsum adds in the same order
    return sum(c / cum[-1] <= u for c in cum)
