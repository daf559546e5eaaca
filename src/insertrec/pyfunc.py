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
from insertrec.tracking import MODEL_DIR_ARTIFACT

__all__ = ["InsertrecModel"]


class InsertrecModel(PythonModel):
    """One order per input row; one decision per order and slot out (see ``Decider.decide_batch``)."""

    def load_context(self, context: Any) -> None:
        self.decider = Decider(Engine.load(context.artifacts[MODEL_DIR_ARTIFACT]))

    # A DataFrame hint tells MLflow there is no schema to infer from it: the logged signature rules.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.decider.decide_batch(pd.DataFrame(model_input))


set_model(InsertrecModel())
