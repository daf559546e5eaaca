"""A model directory as an MLflow pyfunc: ``predict(orders) -> decisions``.

MLflow's own tools (``mlflow.pyfunc.load_model``, ``mlflow models serve``,
batch scoring) load a registered version through this file. It is logged as
"models from code": MLflow stores this source, not a pickle of the class, and
runs it at load time; the only pickle read is the engine, which
``Engine.load`` checks against the manifest's SHA-256 first. insertrec's own
server does not come through here: it reads the model directory directly,
so that MLflow stays off the request path.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from insertrec.decide import Decider
from insertrec.engine import Engine
from insertrec.errors import InsertrecError
from insertrec.tracking import MODEL_DIR_ARTIFACT

__all__ = ["LAYOUTS", "InsertrecModel", "per_order"]

LAYOUTS = ("per_slot", "per_order")   # the ``layout`` param: one row per order and slot (default), or per order


class InsertrecModel(PythonModel):
    """One order per input row; one decision per order and slot out (see ``Decider.decide_batch``),
    or with ``params={"layout": "per_order"}`` one row per input row, in input order: what
    ``mlflow.pyfunc.spark_udf`` needs (see `per_order`)."""

    def load_context(self, context: Any) -> None:
        engine = Engine.load(context.artifacts[MODEL_DIR_ARTIFACT])
        self.decider, self.slots = Decider(engine), engine.policy.slot_names

    # A DataFrame hint tells MLflow there is no schema to infer from it: the logged signature rules.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        layout = (params or {}).get("layout", LAYOUTS[0])
        if layout not in LAYOUTS:
            raise InsertrecError(f"params layout: expected one of {', '.join(LAYOUTS)} (got {layout!r})")
        decisions = self.decider.decide_batch(pd.DataFrame(model_input))
        return decisions if layout == "per_slot" else per_order(decisions, self.slots)


def per_order(decisions: pd.DataFrame, slots: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """``Decider.decide_batch``'s rows (each order's slots together, in slot order) as one row per
    order: ``order_id``, ``policy``, and per slot ``<slot>`` (the action id) and
    ``<slot>_propensity``."""
    k = len(slots)
    out = {"order_id": decisions["order_id"].to_numpy()[::k], "policy": decisions["policy"].to_numpy()[::k]}
    for s, slot in enumerate(slots):
        out[slot] = decisions["action_id"].to_numpy()[s::k]
        out[f"{slot}_propensity"] = decisions["propensity"].to_numpy()[s::k]
    return pd.DataFrame(out)


set_model(InsertrecModel())
