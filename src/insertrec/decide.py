"""The one place a box is decided: an order, the customer's state and what is unavailable -> the box.

Everything that can change a box is reached from `Decider`, in this order:

1. eligibility and the playbook's choice, from the catalog (`Catalog.assess_one`, or `assess` for a
   batch): `when` conditions and per-customer caps, read off the order's features;
2. what is unavailable (out of stock, over budget): those actions are made ineligible;
3. the model's best box (`Policy._best`), the playbook's choice fixed in its ``playbook_slots``;
4. exploration (`Policy._explore`): the only step where a box departs from the best one;
5. the catalog's rules answering, labelled ``fallback``, when the model is missing or fails
   (raises, or produces a score that is not a finite number).

An action that turns out unavailable only when the decision is committed (another worker took the
last unit meanwhile) is redone by asking the `Decider` again with that action in ``unavailable``:
the caller keeps the loop (state -> decide -> commit -> retry), this module keeps the rules.

One order (`decide`), several each with its own state (`decide_many`, the service's micro-batches)
and many from the snapshot (`decide_batch`, `recommend` and MLflow's pyfunc) go through the same
fallback here and the same decision rule in `Policy` (its one-order path
specialised for speed, equal to the batch's to the bit).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import pandas as pd

from insertrec.engine import Engine
from insertrec.features import CustomerState
from insertrec.policy import Decision

__all__ = ["Decider"]

_log = logging.getLogger("insertrec.decide")


class Decider:
    """A model and the catalog's rules that answer for it.

    Parameters
    ----------
    model : the model version to decide with (None when it could not be loaded: the rules answer
        every order, labelled ``fallback``). For a shop without a model, pass the rules engine
        itself: the playbook is then the policy, labelled ``rules``.
    rules : the rules engine that answers when the model fails (None: a failure raises, as a batch
        job should rather stop than quietly serve the playbook).
    """

    def __init__(self, model: Engine | None, rules: Engine | None = None):
        if model is None and rules is None:
            raise ValueError("a Decider needs a model, rules, or both")
        self.model, self.rules = model, rules

    def decide(self, order: dict[str, Any], state: CustomerState | None = None,
               unavailable: frozenset[str] = frozenset()) -> Decision:
        """One order (a dict with the orders columns) -> its box; ``state`` defaults to the customer
        as of the model's snapshot."""
        if self.model is not None:
            try:
                return _checked(self.model.decide(order, state, unavailable))
            except Exception as exc:
                self._model_failed(exc, order_id=str(order["order_id"]))
        return self._answer_for_model(order, state, unavailable)

    def decide_many(self, orders: list[dict[str, Any]], states: list[CustomerState],
                    unavailable: list[frozenset[str]]) -> list[Decision]:
        """`decide` of each order (with its customer's state and its own unavailable actions), the
        model asked once for them all (`Engine.decide_many`): the same boxes at less CPU per order.
        Fallback stays per order: a score that is not finite sends that order alone to the rules,
        and a model failing on the whole call is asked again one order at a time, so that only the
        orders it fails on are answered by the rules (without rules, the failure is raised)."""
        if len(orders) == 1 or self.model is None:
            return [self.decide(*args) for args in zip(orders, states, unavailable)]
        try:
            decisions = self.model.decide_many(orders, states, unavailable)
        except Exception:
            if self.rules is None:
                raise
            return [self.decide(*args) for args in zip(orders, states, unavailable)]
        out = []
        for order, state, gone, decision in zip(orders, states, unavailable, decisions):
            try:
                out.append(_checked(decision))
            except ValueError as exc:
                self._model_failed(exc, order_id=str(order["order_id"]))
                out.append(self._answer_for_model(order, state, gone))
        return out

    def _answer_for_model(self, order: dict[str, Any], state: CustomerState | None,
                          unavailable: frozenset[str]) -> Decision:
        """The rules' box for an order the model could not decide, labelled ``fallback``."""
        return replace(self._fallback.decide(order, state, unavailable), policy="fallback")

    def decide_batch(self, orders: pd.DataFrame, unavailable: frozenset[str] = frozenset()) -> pd.DataFrame:
        """Many orders -> one row per order and slot (see `Engine.decide_batch`)."""
        if self.model is not None:
            try:
                return self.model.decide_batch(orders, unavailable)
            except Exception as exc:
                self._model_failed(exc, orders=len(orders))
        return self._fallback.decide_batch(orders, unavailable).assign(policy="fallback")

    @property
    def _fallback(self) -> Engine:
        assert self.rules is not None   # a model failing without rules re-raised; the constructor wants one
        return self.rules

    def _model_failed(self, exc: Exception, **about: object) -> None:
        """Log a model failure the rules will answer for; without rules, let it propagate."""
        if self.rules is None:
            raise exc
        _log.error("model failed; answering from the rules", extra={
            "event": "model_failed", **about, "error_type": type(exc).__name__,
            "model_version": self.model.version if self.model is not None else None})


def _checked(decision: Decision) -> Decision:
    """The decision, or ValueError when a score is not a finite number: such a model has failed."""
    scores = [score for choice in decision.slots.values() for _, score in choice.alternatives]
    if not math.isfinite(sum(scores, decision.expected_uplift or 0.0)):
        raise ValueError("the model produced a score that is not a finite number")
    return decision
