"""Deciding a whole box per order: joint argmax, exploration, reasons.

One decision rule, two shapes: a batch of orders as a DataFrame
(`decide_frame`, for `recommend`, `evaluate`, `simulate`) goes through the
vectorised core (`Policy._decide`), the reference; one order as a dict
(`decide_one`, for the HTTP service) through the same steps specialised for
one row (`_decide_one`): its boxes scored by the same `BoxGrid`, and the
per-slot steps (playbook, exploration draw, propensity) on plain floats,
which for a handful of numbers cost less than NumPy calls. They give the same
boxes and propensities to the bit, which the tests check on random orders.

A share epsilon of each slot's decisions explores (one share for every slot,
or each slot its own: training serves the share the run's evidence recommends
per slot, `explorationshare`), decided by a hash of the order id and the model
version, so a retried order gets the same answer and the logged propensities
are exact: (1 - eps_s) * [a is the best] + eps_s * q(a), where q is the
exploring draw of `exploration` (a softmax over the estimated gaps with a
floor; uniform among the eligible actions for a rules-only policy).

Speed: one order must be decided in tens of microseconds, so everything that
depends only on the model (stacked action weights, the slot-pair table laid
out on the grid of boxes, column offsets) is computed once when the policy is
built or loaded, and the core works on flat arrays (actions of all slots side
by side, catalog order) with a fixed number of NumPy calls whatever n is.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import compress
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from insertrec.catalog import Catalog
from insertrec.encoding import FeatureEncoder
from insertrec.exploration import TEMPERATURE, draw, draw_one, explore_probabilities, explore_probabilities_one
from insertrec.valuemodel import ROWWISE, ActionSpace, ValueModel

__all__ = ["BatchDecisions", "Decision", "Policy", "SlotChoice", "exploration_uniforms"]

_ROW_CHUNK = 1 << 18  # orders x boxes scored at once: a chunk's grid (2 MB) stays in cache
_SCORE = operator.itemgetter(1)   # of an (action_id, score) alternative
# micro-batches smaller than this are decided one order at a time: the core's NumPy calls cost
# ~90 us per batch, one order's path ~95 us in all (measured: 2 orders 108-117 us each
# together, 97-101 alone; 3 orders 88 together, 100-109 alone)
_BATCH_FROM = 3


class SlotChoice(NamedTuple):
    """What goes into one slot of the box, and why (a named tuple: one is built per slot of every
    decision, at a third of a frozen dataclass's cost)."""

    action_id: str
    propensity: float
    pick_note: str
    reasons: tuple[str, ...]
    alternatives: tuple[tuple[str, float], ...]  # (action_id, score), best first, eligible only

    def as_dict(self) -> dict:
        return {"action_id": self.action_id, "propensity": round(self.propensity, 6),
                "pick_note": self.pick_note, "reasons": list(self.reasons),
                "alternatives": [{"action_id": a, "score": round(s, 4)} for a, s in self.alternatives]}


@dataclass(frozen=True)
class Decision:
    """One order's box: SPEC's response body, less what the service adds (decision_id)."""

    order_id: str
    policy: str                    # model | explore | rules | fallback
    model_version: str
    slots: dict[str, SlotChoice]
    segment: str | None = None
    expected_uplift: float | None = None   # estimated value over the all-default box

    def as_dict(self) -> dict:
        return {"order_id": self.order_id, "model_version": self.model_version, "policy": self.policy,
                "segment": self.segment, "expected_uplift": self.expected_uplift,
                "slots": {s: c.as_dict() for s, c in self.slots.items()}}


@dataclass
class BatchDecisions:
    """Decisions for many orders as arrays, in catalog slot order."""

    order_ids: np.ndarray
    actions: np.ndarray          # (n, n_slots) action index
    propensities: np.ndarray     # (n, n_slots) probability the chosen action had
    explored: np.ndarray         # (n, n_slots) bool
    greedy: np.ndarray           # (n, n_slots) the best eligible box before exploration
    eligible: list[np.ndarray] = field(repr=False, default_factory=list)
    # per slot (n, n_actions): each action's best box value; only to explain an order (`_One.rows`)
    alt_scores: list[np.ndarray] = field(repr=False, default_factory=list)
    uplift: np.ndarray | None = None
    # (n, n_actions) flat: the distribution an exploring slot draws from (None: uniform among eligible)
    explore_probs: np.ndarray | None = field(repr=False, default=None)


class _Best(NamedTuple):
    """The model's best eligible boxes for a chunk of orders (see `Policy._best`)."""

    greedy: np.ndarray          # (n, n_slots) action index per slot
    alt: np.ndarray | None      # (n, n_actions) flat: each action's best eligible box value, or None
    uplift: np.ndarray          # (n,) the box's value over the all-default box


class _One(NamedTuple):
    """One order's decision as plain lists, slots in catalog order: what `_explain` turns into a
    `Decision` (from `Policy._decide_one`, or from each row of a batch by `_One.rows`)."""

    order_id: str
    actions: list[int]
    greedy: list[int]
    propensities: list[float]
    explored: list[bool]
    eligible: list[bool]        # flat, ``Catalog.columns`` layout
    scores: list[float]         # flat: each action's best eligible box value (rules: the playbook's ranking)
    uplift: float | None

    @classmethod
    def rows(cls, batch: BatchDecisions) -> list[_One]:
        """Every order of a batch decided with ``alternatives``, each array converted once."""
        n = len(batch.order_ids)
        uplift = [None] * n if batch.uplift is None else batch.uplift.tolist()
        return [cls(*row) for row in zip(map(str, batch.order_ids.tolist()), batch.actions.tolist(),
                                          batch.greedy.tolist(), batch.propensities.tolist(),
                                          batch.explored.tolist(), np.hstack(batch.eligible).tolist(),
                                          np.hstack(batch.alt_scores).tolist(), uplift)]


_PARAMS = ("catalog", "encoder", "value_model", "epsilon", "version", "playbook_slots", "default_slots",
           "pessimism", "doubted_slots")
_U64 = np.uint64
_MASK = (1 << 64) - 1
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: every input bit moves every output bit (Python ints below 2**64)."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


_A30, _A27, _A31, _AM1, _AM2 = (_U64(c) for c in (30, 27, 31, _M1, _M2))


def _mix64_array(z: np.ndarray) -> np.ndarray:
    """`_mix64` of each element of a uint64 array (which wraps, so no mask), in place after the
    first step: a micro-batch's few dozen lanes cost the number of NumPy calls, not their size."""
    z = z ^ (z >> _A30)
    z *= _AM1
    z ^= z >> _A27
    z *= _AM2
    z ^= z >> _A31
    return z


@lru_cache(maxsize=64)
def _position_keys(length: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per character position of an order id."""
    return _mix64_array(np.arange(1, length + 1, dtype=_U64) * _GOLDEN) | 1


@lru_cache(maxsize=64)
def _lanes(salt: str, n_slots: int) -> np.ndarray:
    """One 64-bit key per (slot, draw), derived from the salt (the model version)."""
    seed = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")
    return _mix64_array(np.arange(1, 2 * n_slots + 1, dtype=_U64) * _GOLDEN + _U64(seed))


@lru_cache(maxsize=64)
def _int_keys(length: int) -> tuple[int, ...]:
    return tuple(_position_keys(length).tolist())


@lru_cache(maxsize=64)
def _int_lanes(salt: str, n_slots: int) -> tuple[int, ...]:
    return tuple(_lanes(salt, n_slots).tolist())


def exploration_uniforms(order_ids: np.ndarray, salt: str, n_slots: int) -> np.ndarray:
    """(n, n_slots, 2) uniforms in [0, 1), a pure function of (salt, order id, slot).

    Vectorised over orders (a batch of 100,000 ids hashes in milliseconds) and
    the very same code for one order, so the service and `recommend` draw
    identical numbers: the id's code points are hashed multilinearly with
    per-position keys, salted with the model version, and each (slot, draw)
    lane is finished with SplitMix64.
    """
    ids = np.ascontiguousarray(order_ids, dtype=str)   # fixed-width UCS-4: one uint32 per character
    points = ids.view(np.uint32).reshape(len(ids), ids.dtype.itemsize // 4)
    h = (points * _position_keys(points.shape[1])).sum(axis=1, dtype=_U64)
    z = _mix64_array(h[:, None] ^ _lanes(salt, n_slots))
    return ((z >> 11) * 2.0**-53).reshape(len(ids), n_slots, 2)


def _uniform_one(order_id: str, salt: str, n_slots: int) -> Callable[[int], float]:
    """``lane -> exploration_uniforms([order_id], salt, n_slots)[0].ravel()[lane]`` in Python
    ints: the same hash (a character's code point is its UCS-4 unit) at a fraction of the cost
    for one id, each lane computed only when asked for."""
    h = sum(map(operator.mul, map(ord, order_id), _int_keys(len(order_id)))) & _MASK
    lanes = _int_lanes(salt, n_slots)
    return lambda lane: (_mix64(h ^ lanes[lane]) >> 11) * 2.0**-53


def _slot_shares(epsilon: float | Mapping[str, float], slots: list[str]) -> list[float]:
    """Each slot's exploration share, catalog order: one number for all, or a mapping naming every slot."""
    if not isinstance(epsilon, Mapping):
        shares = [float(epsilon)] * len(slots)
    elif set(epsilon) != set(slots):
        raise ValueError(f"epsilon: per-slot shares must name the catalog's slots {slots} (got {sorted(epsilon)})")
    else:
        shares = [float(epsilon[name]) for name in slots]
    if not all(0.0 <= e <= 1.0 for e in shares):
        raise ValueError(f"epsilon: an exploration share must be in [0, 1] (got {epsilon!r})")
    return shares


class Policy:
    """The next-best-box policy of one model version.

    Parameters
    ----------
    catalog : the marketer's catalog (eligibility, caps, rules, costs).
    encoder : fitted feature encoder (None for a rules-only policy).
    value_model : fitted value model (None for a rules-only policy: the
        playbook plus exploration, which is how a new shop starts).
    epsilon : share of decisions that explore among eligible actions: one number for every
        slot, or a mapping slot name -> share (every slot named; training's ``--epsilon auto``).
    version : model version, part of the exploration hash.
    playbook_slots : slots where the model defers to the playbook, because
        off-policy evaluation on the holdout estimated it doing worse there
        (training decides; see `evaluation.slot_deciders`).
    default_slots : slots where the slot default goes out, because the
        evidence did not show the model or the playbook paying there: an
        action is not paid for without evidence it pays.
    pessimism : z >= 0: an action is scored on its estimated gain over its slot default less z
        standard errors of it (`ValueModel.decision_grid`), so that nothing is spent where the
        evidence is thin; 0, the estimates themselves. Every action of every slot (the user's
        `insertrec train --pessimism Z`), or, with ``doubted_slots``, only the actions of those.
    doubted_slots : None, or the slots where the log does not show the playbook paying (training's
        `--pessimism auto`): there the playbook's action for an order must show its gain beyond z standard
        errors, the slot's other actions beyond `valuemodel.DOUBTED_SHARE` of that, an exploring
        draw there is the floor alone (`exploration`), and the other slots are scored on the estimates.
    """

    def __init__(self, catalog: Catalog, encoder: FeatureEncoder | None = None,
                 value_model: ValueModel | None = None, epsilon: float | Mapping[str, float] = 0.1,
                 version: str = "rules",
                 playbook_slots: tuple[str, ...] = (), default_slots: tuple[str, ...] = (),
                 pessimism: float = 0.0, doubted_slots: tuple[str, ...] | None = None):
        self.catalog = catalog
        self.pessimism = pessimism
        self.doubted_slots = doubted_slots
        self.playbook_slots = playbook_slots
        self.default_slots = default_slots
        self.encoder = encoder
        self.value_model = value_model
        self.epsilon = epsilon
        self.version = version
        self.slot_names = list(catalog.slots)
        # each slot's share, catalog order (the same float in every slot for one number: the same bits)
        self._eps_list = _slot_shares(epsilon, self.slot_names)
        self._eps = np.array(self._eps_list)
        self._exploring = max(self._eps_list) > 0
        self.space = ActionSpace(tuple(len(s.actions) for s in catalog.slots.values()),
                                 tuple(s.default_index for s in catalog.slots.values()))
        self.combos = self.space.combos
        self._notes = [[a.note for a in s.actions] for s in catalog.slots.values()]
        self._ids = [list(s.action_ids) for s in catalog.slots.values()]
        # constants of the decision core, computed once per policy
        self._columns = np.array(catalog.columns)
        self._sizes = np.array(self.space.sizes)
        self._defaults = np.array(self.space.defaults)
        self._flat_ids = np.array([a for ids in self._ids for a in ids], dtype=object)
        self._default_combo = int(np.ravel_multi_index(self.space.defaults, self.space.sizes))
        self._slices = [slice(c, c + size) for c, size in zip(catalog.columns, self.space.sizes)]
        self._strides = np.array([int(np.prod(self.space.sizes[s + 1:])) for s in range(len(self._sizes))])
        # per action (flat), the boxes holding it, padded with its own first box (max is unchanged);
        # laid out (width, n_actions): each action's best box is a maximum over axis 0, elementwise
        # over contiguous rows, which for a few orders costs a fifth of a maximum along the last axis
        holding = [np.flatnonzero(self.combos[:, s] == a) for s, size in enumerate(self.space.sizes)
                   for a in range(size)]
        width = max(len(h) for h in holding)
        self._holding = np.ascontiguousarray(np.array([np.resize(h, width) for h in holding]).T)
        # per slot, row a: 0 for action a, -inf for the others (fixes the slot to a playbook choice)
        self._fixed = [np.where(np.eye(size, dtype=bool), 0.0, -np.inf) for size in self.space.sizes]
        # slots whose action is fixed: to the playbook's, or to the default (its own "playbook" there)
        self._playbook = [s for s, name in enumerate(self.slot_names) if name in (*playbook_slots, *default_slots)]
        # slots whose exploring draw is the floor alone around the greedy action (`exploration`): those fixed
        # above, and the doubted ones, where the log did not show the playbook paying and the estimates
        # are not trusted to say which other action is worth the exploration
        self._floor_only = [s for s, name in enumerate(self.slot_names)
                            if s in self._playbook or name in (doubted_slots or ())]
        self._silent_list = [name in default_slots for name in self.slot_names]
        self._silent = np.array(self._silent_list)
        self._scorer = None if value_model is None else value_model.decision_grid(
            pessimism, None if doubted_slots is None else
            tuple(s for s, name in enumerate(self.slot_names) if name in doubted_slots))
        # per action (flat), its weights less its slot default's: what each feature adds to its value
        self._gains = None if self._scorer is None else np.ascontiguousarray(
            (self._scorer.weights - self._scorer.weights[:, np.repeat(self._columns + self._defaults, self._sizes)]).T)
        self._tau = 1.0 if value_model is None else TEMPERATURE * value_model.reward_scale_
        # for the reasons: slots where the model decides (its estimate and the drivers explain them)
        self._explained_list = [value_model is not None and name not in (*playbook_slots, *default_slots)
                                for name in self.slot_names]
        self._explaining = list(zip(self.slot_names, self.space.defaults, self._slices, self._ids, self._notes,
                                    self._silent_list, self._explained_list))
        self._explained_slots = [(s, self.space.defaults[s], catalog.columns[s])
                                 for s, explained in enumerate(self._explained_list) if explained]
        self._exploring_note = "" if self._scorer is None else ", those estimated close to the best likelier"

    def __getstate__(self) -> dict[str, Any]:
        """Only the constructor's parameters: the derived constants are rebuilt on load."""
        return {k: getattr(self, k) for k in _PARAMS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also reads model directories pickled before the constants (or a parameter) existed
        Policy.__init__(self, **{k: state[k] for k in _PARAMS if k in state})

    def replace(self, **changes) -> Policy:
        """A copy with some constructor parameters changed (the fitted parts are shared)."""
        return Policy(**(self.__getstate__() | changes))

    @property
    def slot_epsilon(self) -> dict[str, float]:
        """Each slot's exploration share, as served (catalog order)."""
        return dict(zip(self.slot_names, self._eps_list, strict=True))

    @property
    def name(self) -> str:
        return "rules" if self.value_model is None else "model"

    def action_ids(self, actions: np.ndarray) -> np.ndarray:
        """Action ids (object array) of action indices (n, n_slots), slots in catalog order."""
        return self._flat_ids[actions + self._columns]

    # -- batch ----------------------------------------------------------------
    def decide_frame(self, features: pd.DataFrame, unavailable: frozenset[str] = frozenset(),
                     explore: bool = True) -> BatchDecisions:
        """Decide every order of a feature frame (see `features.order_features`)."""
        eligible, rules = self.catalog.assess(features)
        phi = None if self.encoder is None else self.encoder.transform(features)
        return self._decide(features["order_id"].astype(str).to_numpy(), phi, eligible, rules,
                            unavailable, explore)

    def probabilities(self, decisions: BatchDecisions) -> list[np.ndarray]:
        """Per slot (n, n_actions): the probability this policy gives each action (the
        exploration rule of `_explore`, for every action rather than the chosen one)."""
        out = []
        for s, (elig, eps) in enumerate(zip(decisions.eligible, self._eps_list)):
            k = elig.sum(axis=1, keepdims=True)
            p = eps * (elig / k if decisions.explore_probs is None else decisions.explore_probs[:, self._slices[s]])
            p[np.arange(len(p)), decisions.greedy[:, s]] += 1.0 - eps
            out.append(p)
        return out

    # -- one order ------------------------------------------------------------
    def decide_one(self, row: dict, unavailable: frozenset[str] = frozenset(),
                   segment: str | None = None) -> Decision:
        """Decide one order given its feature row as a dict (`CustomerState.features`): the
        service's fast path, the decision `decide_frame` gives the order in a batch."""
        eligible, rules = self.catalog.assess_one(row)
        if unavailable:
            eligible = eligible & ~self._out_of(unavailable)
        phi = None if self.encoder is None else self.encoder.transform_one(row)
        one = self._decide_one(str(row["order_id"]), phi, eligible, rules)
        return self._explain(one, self._drivers(None if phi is None else phi[None], [one.actions])[0], segment)

    def decide_many(self, rows: list[dict], unavailable: list[frozenset[str]],
                    segments: list[str | None]) -> list[Decision]:
        """`decide_one` of each order (its feature row, its own unavailable actions and segment),
        the orders decided together: the service's micro-batches. The same decisions, propensities
        and reasons as each order alone, to the bit (the core is `_decide`, which `_decide_one`
        equals; scores are products row by row, see `BoxGrid.per_action`), at less CPU per order
        from `_BATCH_FROM` orders on; fewer go `decide_one`'s way, one at a time."""
        if len(rows) < _BATCH_FROM:
            return list(map(self.decide_one, rows, unavailable, segments))
        out: list[Decision] = []
        for lo in range(0, len(rows), ROWWISE):
            part = rows[lo:lo + ROWWISE]
            eligible, rules = self.catalog.assess_many(part)
            for i, gone in enumerate(unavailable[lo:lo + ROWWISE]):
                if gone:
                    eligible[i] &= ~self._out_of(gone)
            phi = None if self.encoder is None else self.encoder.transform_many(part)
            batch = self._decide(np.array([str(row["order_id"]) for row in part], dtype=object), phi, eligible,
                                 rules, frozenset(), True, alternatives=True)
            out.extend(map(self._explain, _One.rows(batch), self._drivers(phi, batch.actions.tolist()),
                           segments[lo:lo + ROWWISE]))
        return out

    def _decide_one(self, order_id: str, phi: np.ndarray | None, eligible: np.ndarray, rules: np.ndarray) -> _One:
        """`_decide` for one order (``explore``, ``alternatives``) with ``unavailable`` already
        applied to ``eligible``, specialised: the box grid and each action's best box
        (`_best_one`) in NumPy, the per-slot steps, a handful of numbers each, in plain Python on
        the same floats (a NumPy call on a tiny array costs more than its arithmetic). Equal to
        the order's row of `_decide` over many orders, which the tests check on random orders."""
        elig = eligible.tolist()
        playbook = [r if elig[c + r] and not silent else d
                    for r, c, silent, d in zip(rules.tolist(), self.catalog.columns, self._silent_list,
                                               self.space.defaults)]
        uplift = None
        if self._scorer is None:
            greedy, estimates = playbook, None
            scores = [float(e) for e in elig]   # the playbook's pick first, then the other eligible actions
            for c, g in zip(self.catalog.columns, greedy):
                scores[c + g] += 1.0
        else:
            assert phi is not None   # a policy with a value model has an encoder
            greedy, scores, uplift = self._best_one(phi, rules + self._columns, eligible, playbook)
            estimates = scores
        n = len(greedy)
        if not self._exploring:
            return _One(order_id, greedy, greedy, [1.0] * n, [False] * n, elig, scores, uplift)
        u = _uniform_one(order_id, self.version, n)
        probs = explore_probabilities_one(estimates, elig, self._slices, self._tau, greedy=greedy,
                                          fixed=self._floor_only)
        actions, explored, props = [], [], []
        for s, (sl, eps) in enumerate(zip(self._slices, self._eps_list)):   # as `_explore`, one slot at a time
            k, g = sum(elig[sl]), greedy[s]
            explores = k > 1 and u(2 * s) < eps
            a = draw_one(probs[sl], u(2 * s + 1)) if explores else g
            actions.append(a)
            explored.append(explores)
            props.append((1.0 - eps if a == g else 0.0) + eps * probs[sl.start + a] if k > 1 else 1.0)
        return _One(order_id, actions, greedy, props, explored, elig, scores, uplift)

    # -- core -----------------------------------------------------------------
    def _decide(self, order_ids: np.ndarray, phi: np.ndarray | None, eligible: np.ndarray,
                rules: np.ndarray, unavailable: frozenset[str], explore: bool,
                alternatives: bool = False) -> BatchDecisions:
        """The one decision core. ``eligible`` is bool (n, n_actions) flat (``Catalog.columns``),
        ``rules`` the playbook's action index per slot (n, n_slots). ``alternatives``: also each
        action's best box value, for `_explain` (three more passes over every box of every order,
        which batch callers do not need)."""
        n = len(order_ids)
        rows = np.arange(n)[:, None]
        if unavailable:
            eligible = eligible & ~self._out_of(unavailable)
        rule_columns = rules + self._columns
        # the playbook's action, unless it ran out: then the slot default stands in
        playbook = np.where(eligible[rows, rule_columns] & ~self._silent, rules, self._defaults)
        exploring = explore and self._exploring
        if self._scorer is None:
            greedy, uplift, alt = playbook, None, None
            if alternatives:  # the playbook's pick first, then the other eligible actions
                alt = eligible.astype(float)
                alt[rows, greedy + self._columns] += 1.0
        else:
            assert phi is not None   # a policy with a value model has an encoder
            scored = alternatives or exploring   # each action's best box: explanations and exploring draws
            step = max(1, _ROW_CHUNK // len(self.combos))
            parts = [self._best(phi, rule_columns, eligible, playbook, scored)] if n <= step else \
                [self._best(phi[lo:lo + step], rule_columns[lo:lo + step], eligible[lo:lo + step],
                            playbook[lo:lo + step], scored) for lo in range(0, n, step)]
            greedy, alt, uplift = parts[0] if len(parts) == 1 else _Best(
                np.concatenate([part.greedy for part in parts]),
                np.concatenate([part.alt for part in parts if part.alt is not None]) if scored else None,
                np.concatenate([part.uplift for part in parts]))
        probs = None
        if exploring:
            estimates = None if self._scorer is None else alt   # a playbook's ranking is no estimate
            actions, explored, props, probs = self._explore(order_ids, eligible, greedy, estimates)
        else:
            actions, explored, props = greedy, np.zeros(greedy.shape, dtype=bool), np.ones(greedy.shape)
        return BatchDecisions(order_ids, actions, props, explored, greedy, self._by_slot(eligible),
                              self._by_slot(alt) if alt is not None and alternatives else [], uplift, probs)

    def _by_slot(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[:, sl] for sl in self._slices]

    def _out_of(self, unavailable: frozenset[str]) -> np.ndarray:
        out = np.array([a in unavailable for a in self._flat_ids.tolist()])
        out[self._columns + self._defaults] = False  # the control action never runs out
        return out

    def _best(self, phi: np.ndarray, rule_columns: np.ndarray, eligible: np.ndarray, playbook: np.ndarray,
              alternatives: bool) -> _Best:
        """Best eligible box per order (the playbook's action fixed in its slots), each action's
        best eligible box value (flat, -inf when ineligible; None unless ``alternatives``), and the
        box's value over the all-default box."""
        scorer = self._scorer
        assert scorer is not None   # only called for a policy with a value model
        grid = scorer.grid(phi, rule_columns, eligible)
        n = len(grid)
        flat = grid.reshape(n, len(self.combos))
        alt = flat.T.take(self._holding, axis=0).max(axis=0).T if alternatives else None
        if len(self._playbook) == len(self.slot_names):  # nothing left to choose
            best = playbook @ self._strides
        else:
            restricted = grid.copy()
            for s in self._playbook:
                restricted += self._fixed[s][playbook[:, s]].reshape((n, *scorer.shapes[s]))
            best = restricted.reshape(n, len(self.combos)).argmax(axis=1)
        uplift = flat[np.arange(n), best] - flat[:, self._default_combo]
        return _Best(self.combos[best], alt, uplift)

    def _best_one(self, phi: np.ndarray, rule_columns: np.ndarray, eligible: np.ndarray,
                  playbook: list[int]) -> tuple[list[int], list[float], float]:
        """`_best` (with alternatives) of one order, on its grid of boxes (*slot sizes): the best
        box's actions, each action's best box value (flat) and the uplift."""
        scorer = self._scorer
        assert scorer is not None   # only called for a policy with a value model
        grid = scorer.grid(phi, rule_columns, eligible)
        flat = grid.ravel()
        if len(self._playbook) == len(self.slot_names):  # nothing left to choose
            best = int(np.dot(playbook, self._strides))
        else:
            restricted = grid
            for s in self._playbook:
                restricted = restricted + self._fixed[s][playbook[s]].reshape(scorer.shapes[s])
            best = int(restricted.argmax())
        return (self.combos[best].tolist(), flat.take(self._holding).max(axis=0).tolist(),
                float(flat[best]) - float(flat[self._default_combo]))

    def _explore(self, order_ids: np.ndarray, eligible: np.ndarray, greedy: np.ndarray,
                 scores: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A share epsilon (the slot's own) of each slot explores, drawing from `exploration.explore_probabilities`
        (``scores``: each action's best box value; None: uniform): the actions, which slots explored,
        each chosen action's exact propensity, and the exploring distribution (flat).

        The one place where exploration changes a box; `probabilities` is the same rule written
        as every action's probability (for off-policy evaluation), so a new exploration rule
        changes these two methods and nothing else."""
        u = exploration_uniforms(order_ids, self.version, len(self.slot_names))
        k = np.add.reduceat(eligible, self._columns, axis=1, dtype=np.intp)   # eligible per slot
        explored = (u[:, :, 0] < self._eps) & (k > 1)
        probs = explore_probabilities(scores, eligible, self._slices, self._tau, greedy=greedy, fixed=self._floor_only)
        actions = np.where(explored, draw(probs, u[:, :, 1], self._slices), greedy)
        drawn = probs[np.arange(len(actions))[:, None], actions + self._columns]
        props = np.where(actions == greedy, 1.0 - self._eps, 0.0) + self._eps * drawn
        return actions, explored, np.where(k > 1, props, 1.0), probs

    # -- reasons --------------------------------------------------------------
    def _explain(self, one: _One, drivers: dict[int, list[str]], segment: str | None = None) -> Decision:
        """Turn one order's decision into a Decision with notes, reasons and alternatives;
        ``drivers`` is its row of `_drivers`.

        The pick note is for the warehouse packer: it describes the item (the catalog's ``note``),
        never the customer. A slot says it explored only when the draw changed its action: an
        exploration draw that lands on the best action leaves the box as the model chose it."""
        actions, greedy, propensities = one.actions, one.greedy, one.propensities
        slots = {}
        for s, (name, d, sl, ids, notes, silent, explained) in enumerate(self._explaining):
            a = actions[s]
            scores, eligible = one.scores[sl], one.eligible[sl]
            ranked = sorted(compress(zip(ids, scores), eligible), key=_SCORE, reverse=True)   # stable: ties in catalog order
            reasons = [f"exploring: drawn among {sum(eligible)} eligible actions{self._exploring_note}"] \
                if a != greedy[s] else []
            if silent:
                reasons.append("slot default: the evidence did not show the model or the playbook paying here")
            elif not explained:
                reasons.append("marketer's playbook rule" if a != d else "slot default")
            else:
                reasons.append(f"estimated value {scores[a] - scores[d]:+.2f} over {ids[d]}")
                reasons.extend(drivers.get(s, ()))
            slots[name] = SlotChoice(ids[a], propensities[s], notes[a], tuple(reasons), tuple(ranked))
        label = "explore" if any(one.explored) else self.name
        uplift = None if one.uplift is None else round(one.uplift, 4)
        return Decision(one.order_id, label, self.version, slots, segment, uplift)

    def _drivers(self, phi: np.ndarray | None, actions: list[list[int]]) -> list[dict[int, list[str]]]:
        """Per order, slot -> the (at most three) features that moved the value of its action over
        the slot default's the most, as "name (+0.12)", largest first; only the slots whose reasons
        name drivers (the model decides the slot, and its default did not go out).
        ``phi`` (n, n_features), None for a rules-only policy; ``actions`` per order and slot.
        All orders' explained slots in one product and one sort (row by row, the same bits)."""
        out: list[dict[int, list[str]]] = [{} for _ in actions]
        if phi is None or self._gains is None or self.encoder is None:
            return out
        picks = [(i, s, row[s] + c) for i, row in enumerate(actions) for s, d, c in self._explained_slots if row[s] != d]
        if not picks:
            return out
        rows, slots, columns = zip(*picks)
        contrib = (phi if len(phi) == 1 else phi[list(rows)]) * self._gains[list(columns)]   # one order: broadcast
        top = np.argsort(-np.abs(contrib), axis=1)[:, :3]
        names = self.encoder.feature_names_
        values = contrib[np.arange(len(contrib))[:, None], top].tolist()   # only the three each row names
        for i, s, js, vs in zip(rows, slots, top.tolist(), values):
            out[i][s] = [f"{names[j]} ({v:+.2f})" for j, v in zip(js, vs) if abs(v) > 1e-3 and names[j] != "intercept"]
        return out
