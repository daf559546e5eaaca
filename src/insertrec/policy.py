"""Deciding a whole box per order: joint argmax, exploration, reasons.

One decision core (`Policy._decide`) serves both paths: a batch of orders as
a DataFrame (`decide_frame`, for `recommend`, `evaluate`, `simulate`) and one
order as a dict (`decide_one`, for the HTTP service). They differ only in how
features are encoded and eligibility evaluated, never in how boxes are scored.

Exploration is epsilon-greedy per slot, decided by a hash of the order id and
the model version, so a retried order gets the same answer and the logged
propensities are exact: (1 - eps) * [a is the best] + eps / |eligible|.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from insertrec.catalog import Catalog
from insertrec.encoding import FeatureEncoder
from insertrec.valuemodel import ActionSpace, ValueModel

_ROW_CHUNK = 2_000_000  # orders x combinations scored at once, to bound memory


@dataclass(frozen=True)
class SlotChoice:
    """What goes into one slot of the box, and why."""

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
    alt_scores: list[np.ndarray] = field(repr=False, default_factory=list)  # per slot (n, n_actions)
    uplift: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.where(self.explored.any(axis=1), "explore", "greedy")


def exploration_uniforms(order_ids: np.ndarray, salt: str, n_slots: int) -> np.ndarray:
    """(n, n_slots, 2) uniforms in [0, 1), a pure function of (salt, order id, slot)."""
    out = np.empty((len(order_ids), n_slots, 2))
    for i, oid in enumerate(order_ids):
        digest = hashlib.blake2b(f"{salt}|{oid}".encode(), digest_size=8 * n_slots).digest()
        words = np.frombuffer(digest, dtype="<u4").reshape(n_slots, 2)
        out[i] = words / 2.0**32
    return out


class Policy:
    """The next-best-box policy of one model version.

    Parameters
    ----------
    catalog : the marketer's catalog (eligibility, caps, rules, costs).
    encoder : fitted feature encoder (None for a rules-only policy).
    value_model : fitted value model (None for a rules-only policy: the
        playbook plus exploration, which is how a new shop starts).
    epsilon : share of decisions, per slot, that explore among eligible actions.
    version : model version, part of the exploration hash.
    playbook_slots : slots where the model defers to the playbook, because
        off-policy evaluation could not show it does better there (training
        decides; see `training.fit_policy`).
    """

    def __init__(self, catalog: Catalog, encoder: FeatureEncoder | None = None,
                 value_model: ValueModel | None = None, epsilon: float = 0.1, version: str = "rules",
                 playbook_slots: tuple[str, ...] = ()):
        self.catalog = catalog
        self.playbook_slots = playbook_slots
        self.encoder = encoder
        self.value_model = value_model
        self.epsilon = epsilon
        self.version = version
        self.slot_names = list(catalog.slots)
        self.space = ActionSpace(tuple(len(s.actions) for s in catalog.slots.values()),
                                 tuple(s.default_index for s in catalog.slots.values()))
        self.combos = self.space.combos
        self._notes = [[a.note for a in s.actions] for s in catalog.slots.values()]
        self._ids = [list(s.action_ids) for s in catalog.slots.values()]

    def replace(self, **changes) -> Policy:
        """A copy with some constructor parameters changed (the fitted parts are shared)."""
        params = {"catalog": self.catalog, "encoder": self.encoder, "value_model": self.value_model,
                  "epsilon": self.epsilon, "version": self.version, "playbook_slots": self.playbook_slots}
        return Policy(**(params | changes))

    @property
    def name(self) -> str:
        return "rules" if self.value_model is None else "model"

    # -- batch ----------------------------------------------------------------
    def decide_frame(self, features: pd.DataFrame, unavailable: frozenset[str] = frozenset(),
                     explore: bool = True) -> BatchDecisions:
        """Decide every order of a feature frame (see `features.order_features`)."""
        eligible = self.catalog.eligible(features)
        rules = np.stack([self.catalog.rules_choice(features)[s] for s in self.slot_names], axis=1)
        phi = None if self.encoder is None else self.encoder.transform(features)
        return self._decide(features["order_id"].astype(str).to_numpy(), phi,
                            [eligible[s] for s in self.slot_names], rules, unavailable, explore)

    def probabilities(self, decisions: BatchDecisions) -> list[np.ndarray]:
        """Per slot (n, n_actions): the probability this policy gives each action."""
        out = []
        for s, elig in enumerate(decisions.eligible):
            k = elig.sum(axis=1, keepdims=True)
            p = self.epsilon * elig / k
            p[np.arange(len(p)), decisions.greedy[:, s]] += 1.0 - self.epsilon
            out.append(p)
        return out

    # -- one order ------------------------------------------------------------
    def decide_one(self, record: dict, unavailable: frozenset[str] = frozenset(),
                   segment: str | None = None) -> Decision:
        """Decide one order given its features as a dict: the service's fast path."""
        elig = self.catalog.eligible_one(record)
        rules_one = self.catalog.rules_choice_one(record)
        rules = np.array([[rules_one[s] for s in self.slot_names]])
        phi = None if self.encoder is None else self.encoder.transform_one(record)[None, :]
        batch = self._decide(np.array([str(record["order_id"])]), phi,
                             [elig[s][None, :] for s in self.slot_names], rules, unavailable, True)
        return self.explain(batch, 0, record, segment)

    # -- core -----------------------------------------------------------------
    def _decide(self, order_ids: np.ndarray, phi: np.ndarray | None, eligible: list[np.ndarray],
                rules: np.ndarray, unavailable: frozenset[str], explore: bool) -> BatchDecisions:
        n, n_slots = len(order_ids), len(self.slot_names)
        eligible = [self._available(s, e, unavailable) for s, e in enumerate(eligible)]
        if self.value_model is None:
            allowed = np.stack([e[np.arange(n), rules[:, s]] for s, e in enumerate(eligible)], axis=1)
            greedy = np.where(allowed, rules, np.array(self.space.defaults)[None, :])
            alt = [e.astype(float) + (np.arange(e.shape[1])[None, :] == greedy[:, [s]])
                   for s, e in enumerate(eligible)]
            uplift = None
        else:
            allowed = [e & (np.arange(e.shape[1])[None, :] == rules[:, [s]])
                       if self.slot_names[s] in self.playbook_slots else e for s, e in enumerate(eligible)]
            for s, e in enumerate(allowed):  # the playbook's action ran out: the slot default stands in
                e[~e.any(axis=1), self.space.defaults[s]] = True
            greedy, alt, uplift = self._argmax(phi, rules, allowed)
        actions, explored = greedy.copy(), np.zeros((n, n_slots), dtype=bool)
        props = np.ones((n, n_slots))
        k = np.stack([e.sum(axis=1) for e in eligible], axis=1)
        if explore and self.epsilon > 0:
            u = exploration_uniforms(order_ids, self.version, n_slots)
            explored = (u[:, :, 0] < self.epsilon) & (k > 1)
            for s, e in enumerate(eligible):
                # the j-th eligible action, j drawn uniformly
                j = np.minimum((u[:, s, 1] * k[:, s]).astype(int), k[:, s] - 1)
                pick = np.argmax(np.cumsum(e, axis=1) > j[:, None], axis=1)
                actions[:, s] = np.where(explored[:, s], pick, greedy[:, s])
            props = np.where(actions == greedy, 1.0 - self.epsilon, 0.0) + self.epsilon / k
            props = np.where(k > 1, props, 1.0)
        return BatchDecisions(order_ids, actions, props, explored, greedy, eligible, alt, uplift)

    def _available(self, s: int, eligible: np.ndarray, unavailable: frozenset[str]) -> np.ndarray:
        if not unavailable:
            return eligible
        out_of = np.array([a in unavailable for a in self._ids[s]])
        out_of[self.space.defaults[s]] = False  # the control action never runs out
        return eligible & ~out_of[None, :]

    def _argmax(self, phi: np.ndarray, rules: np.ndarray,
                eligible: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Best eligible box per order, each action's best box value, and the box's uplift."""
        n = len(phi)
        combos, n_slots = self.combos, len(self.slot_names)
        greedy = np.empty((n, n_slots), dtype=int)
        alt = [np.full((n, size), -np.inf) for size in self.space.sizes]
        uplift = np.empty(n)
        default_combo = int(np.flatnonzero((combos == np.array(self.space.defaults)).all(axis=1))[0])
        step = max(1, _ROW_CHUNK // len(combos))
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            scores = self.value_model.combo_scores(phi[sl], rules[sl], combos)
            ok = np.ones_like(scores, dtype=bool)
            for s, e in enumerate(eligible):
                ok &= e[sl][:, combos[:, s]]
            scores = np.where(ok, scores, -np.inf)
            best = scores.argmax(axis=1)
            greedy[sl] = combos[best]
            uplift[sl] = scores[np.arange(len(best)), best] - scores[:, default_combo]
            for s, size in enumerate(self.space.sizes):
                for a in range(size):
                    cols = combos[:, s] == a
                    alt[s][sl, a] = scores[:, cols].max(axis=1)
        return greedy, alt, uplift

    # -- reasons --------------------------------------------------------------
    def explain(self, batch: BatchDecisions, i: int, record: dict, segment: str | None = None) -> Decision:
        """Turn row ``i`` of a batch into a Decision with notes, reasons and alternatives."""
        slots = {}
        for s, name in enumerate(self.slot_names):
            a = int(batch.actions[i, s])
            scores = batch.alt_scores[s][i]
            order = [j for j in np.argsort(-scores, kind="stable") if batch.eligible[s][i, j]]
            alternatives = tuple((self._ids[s][j], float(scores[j])) for j in order)
            slots[name] = SlotChoice(self._ids[s][a], float(batch.propensities[i, s]),
                                     self._pick_note(s, a, record),
                                     self._reasons(s, a, i, batch, record), alternatives)
        if self.value_model is None:
            label = "explore" if batch.explored[i].any() else "rules"
        else:
            label = "explore" if batch.explored[i].any() else "model"
        uplift = None if batch.uplift is None else round(float(batch.uplift[i]), 4)
        return Decision(str(batch.order_ids[i]), label, self.version, slots, segment, uplift)

    def _pick_note(self, s: int, a: int, record: dict) -> str:
        who = [str(record.get("journey_stage", "")), str(record.get("nps_tier", ""))]
        who = " ".join(w for w in who if w and w != "unknown")
        return f"{self._notes[s][a]}: {who}" if who and a != self.space.defaults[s] else self._notes[s][a]

    def _reasons(self, s: int, a: int, i: int, batch: BatchDecisions, record: dict) -> tuple[str, ...]:
        out = []
        if batch.explored[i, s]:
            out.append(f"exploring: picked at random among {int(batch.eligible[s][i].sum())} eligible actions")
        if self.value_model is None or self.slot_names[s] in self.playbook_slots:
            out.append("marketer's playbook rule" if a != self.space.defaults[s] else "slot default")
            return tuple(out)
        d = self.space.defaults[s]
        gain = batch.alt_scores[s][i, a] - batch.alt_scores[s][i, d]
        out.append(f"estimated value {gain:+.2f} over {self._ids[s][d]}")
        if a != d and self.encoder is not None:
            phi = self.encoder.transform_one(record)
            contrib = phi * (self.value_model.W_[s][:, a] - self.value_model.W_[s][:, d])
            names = self.encoder.feature_names_
            for j in np.argsort(-np.abs(contrib))[:3]:
                if abs(contrib[j]) > 1e-3 and names[j] != "intercept":
                    out.append(f"{names[j]} ({contrib[j]:+.2f})")
        return tuple(out)
