"""A loaded model version, ready to decide: what `serve`, `recommend` and MLflow's pyfunc call.

The engine owns the policy, the catalog and the customers' state as of the
training snapshot. Callers that have seen newer events (the service, through
its decision log) pass an up-to-date `CustomerState`; everyone else gets the
snapshot's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from insertrec import modeldir
from insertrec.catalog import Catalog
from insertrec.errors import ModelError
from insertrec.features import CustomerState, FeatureParams, Snapshot, features_for_orders
from insertrec.policy import Decision, Policy

__all__ = ["Engine"]


class Engine:
    """One model version: policy + catalog + customer snapshot + segment names."""

    def __init__(self, policy: Policy, params: FeatureParams, snapshot: Snapshot | None = None,
                 segments: dict[str, str] | None = None, manifest: dict[str, Any] | None = None):
        self.policy = policy
        self.params = params
        self.snapshot = snapshot
        self.segments = segments or {}
        self.manifest = manifest or {}

    @property
    def version(self) -> str:
        return self.policy.version

    @property
    def catalog(self) -> Catalog:
        return self.policy.catalog

    @classmethod
    def load(cls, path: str | Path) -> Engine:
        """Load a verified model directory (raises ModelError if missing or altered, or if it
        was trained without a catalog and so has nothing to decide with)."""
        manifest = modeldir.verify(path)
        if not modeldir.has_policy(manifest):
            raise ModelError(f"{path}: trained without catalog.yaml, so it has segments and repurchase "
                             "propensity but no policy to decide with; add a catalog (insertrec init-catalog "
                             "--out DATA/catalog.yaml) and train again")
        parts = modeldir.load(path, "engine", manifest)
        return cls(parts["policy"], parts["params"], parts["snapshot"], parts["segments"], manifest)

    @classmethod
    def rules_only(cls, catalog: Catalog, params: FeatureParams | None = None,
                   epsilon: float = 0.1) -> Engine:
        """The playbook plus exploration: a new shop's start, and the fallback when a model fails."""
        if params is None:
            params = FeatureParams(action_ids=tuple(sorted(catalog.action_ids)),
                                   cap_windows=catalog.cap_windows())
        return cls(Policy(catalog, epsilon=epsilon, version="rules"), params)

    def state(self, customer_id: str) -> CustomerState:
        """The customer as of the snapshot (empty for a customer never seen)."""
        if self.snapshot is None:
            return CustomerState.empty(self.params)
        return self.snapshot.state(customer_id)

    def decide(self, order: dict[str, Any], state: CustomerState | None = None,
               unavailable: frozenset[str] = frozenset()) -> Decision:
        """One order (a dict with the orders columns) -> its box."""
        state = self.state(str(order["customer_id"])) if state is None else state
        return self.policy.decide_one(state.features(order), unavailable,
                                      self.segments.get(str(order["customer_id"])))

    def decide_many(self, orders: list[dict[str, Any]], states: list[CustomerState],
                    unavailable: list[frozenset[str]]) -> list[Decision]:
        """Several orders, each with its customer's state and its own unavailable actions, decided
        together (`Policy.decide_many`): the same boxes as `decide` of each."""
        return self.policy.decide_many([state.features(order) for order, state in zip(orders, states)],
                                       unavailable, [self.segments.get(str(o["customer_id"])) for o in orders])

    def decide_batch(self, orders: pd.DataFrame, unavailable: frozenset[str] = frozenset()) -> pd.DataFrame:
        """Many orders -> one row per order and slot: order_id, slot, action_id, propensity, policy."""
        snapshot = Snapshot.build_empty(self.params) if self.snapshot is None else self.snapshot
        feats = features_for_orders(snapshot, orders)
        batch = self.policy.decide_frame(feats, unavailable)
        n, k = batch.actions.shape
        # object arrays of str: pandas takes them as text far faster than NumPy's fixed-width strings
        labels = np.array([self.policy.name, "explore"], dtype=object)[batch.explored.any(axis=1).astype(int)]
        return pd.DataFrame({
            "order_id": np.repeat(batch.order_ids, k),
            "slot": np.array(self.policy.slot_names, dtype=object)[np.tile(np.arange(k), n)],
            "action_id": self.policy.action_ids(batch.actions).ravel(),
            "propensity": batch.propensities.ravel(),
            "policy": np.repeat(labels, k),
        })
