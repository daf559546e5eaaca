"""Every training run in MLflow: params, SPEC's metrics, the artifacts, a registered pyfunc.

The store is ``MLFLOW_TRACKING_URI`` when set, else MLflow's embedded SQLite
store ``mlflow.db`` in the working directory (artifacts under ``./mlruns``),
so a data scientist needs no server and ``mlflow ui`` in the same directory
shows the runs. The model registry lives in the same store.

MLflow is imported inside the functions that use it, never at module level:
``import mlflow`` costs about 2 s, which ``insertrec --help``, ``recommend``
and the server must not pay.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import pandas as pd

from insertrec import modeldir
from insertrec.data import ORDER_DTYPES
from insertrec.errors import InsertrecError, ModelError
from insertrec.schema import TABLES

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_MODEL_NAME",
    "MODEL_DIR_ARTIFACT",
    "Progress",
    "RunInfo",
    "client",
    "load_mlflow",
    "log_training_run",
    "tracking_uri",
]

DEFAULT_EXPERIMENT = "insertrec"
DEFAULT_MODEL_NAME = "insertrec"
MODEL_DIR_ARTIFACT = "model_dir"    # the model directory's key among the pyfunc's artifacts
_RUN_ARTIFACTS = ("manifest.json", "catalog.yaml", "segments.csv", "report.html", "ope.json")
_MLFLOW_TYPES = {"str": "string", "float64": "double", "bool": "boolean"}
_NOT_AT_DECISION_TIME = ("returned_value",)  # known only weeks after the parcel left


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, as MLflow's own default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def load_mlflow() -> ModuleType:
    """Import MLflow pointed at :func:`tracking_uri`, its informational chatter turned down.

    MLflow's own INFO lines (database migrations, experiment creation, input
    example validation) drown insertrec's progress lines; warnings and errors
    still show. ``MLFLOW_LOGGING_LEVEL`` set by the user wins.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def client() -> Any:
    """An ``MlflowClient`` on :func:`tracking_uri` (tracking and registry)."""
    mlflow = load_mlflow()
    return mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())


class Progress:
    """Stage timings of a long run: one stderr line as each stage starts, seconds per stage after.

    Pass it as ``train(..., progress=Progress())``; ``seconds()`` then gives
    the ``seconds_<stage>`` metrics that make slow stages visible when runs
    are compared in the MLflow UI.
    """

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self._start = time.perf_counter()
        self._current: tuple[str, float] | None = None
        self._seconds: dict[str, float] = {}

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self._close(now)
        self._current = (step, now)
        print(f"[insertrec {now - self._start:7.1f}s] {step}...", file=self._stream or sys.stderr, flush=True)

    def _close(self, now: float) -> None:
        if self._current is not None:
            step, began = self._current
            key = "seconds_" + "_".join(step.lower().replace("-", " ").split())
            self._seconds[key] = self._seconds.get(key, 0.0) + now - began
            self._current = None

    def seconds(self) -> dict[str, float]:
        """Seconds spent per stage so far (the current stage ends here), plus ``seconds_total``."""
        now = time.perf_counter()
        self._close(now)
        return {**self._seconds, "seconds_total": now - self._start}


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    experiment_id: str
    model_uri: str | None   # the logged model (``models:/m-...``); None without a policy (no catalog)
    version: str | None     # registered version, None when not registered (or nothing to register)


def log_training_run(model_dir: str | Path, params: dict[str, Any], metrics: dict[str, float],
                     experiment: str | None = None, register_as: str | None = DEFAULT_MODEL_NAME, *,
                     input_example: pd.DataFrame | None = None) -> RunInfo:
    """Log one training run, its model as a pyfunc, and register it as a new version of ``register_as``.

    ``params`` may nest (``{"learner": {"max_iter": 200}}`` becomes
    ``learner.max_iter``); the manifest's ``version``, ``cutoff`` (as
    resolved), ``catalog_sha256`` and ``data_fingerprint`` are always logged,
    so runs trained on the same history and catalog can be found by their
    hashes; and ``served_epsilon``, each slot's exploration share as served (``served_epsilon.<slot>``,
    whatever ``epsilon`` asked for). Pass ``data`` (the data directory) too: promotion falls back on it.
    Non-finite and non-numeric metrics are left out (MLflow refuses ``None``;
    a NaN metric hides real ones in the UI's charts). Inside ``mlflow run``
    (``MLFLOW_RUN_ID`` set) the run it created is used, in its experiment;
    otherwise a new run in ``experiment`` (default ``insertrec``).
    A model trained without a catalog has no policy: its run gets the params,
    metrics and artifacts (segments.csv, report.html), and nothing is logged
    as a model or registered.
    ``input_example``: a few real orders to show in the model's page
    (default: one made-up order at the model's cutoff).
    """
    root = Path(model_dir)
    manifest = modeldir.verify(root)
    mlflow = load_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = None if os.environ.get("MLFLOW_RUN_ID") else _experiment_id(experiment)
        with mlflow.start_run(experiment_id=experiment_id, run_name=manifest.get("version")) as run:
            if experiment_id is None:
                _warn_if_misplaced(run.info.experiment_id, experiment)
            resolved = {key: manifest[key] for key in ("version", "cutoff", "catalog_sha256", "data_fingerprint",
                                                       "served_epsilon") if key in manifest}
            mlflow.log_params(_unlogged(_flatten(params | resolved), run.data.params))
            logged = _log_pyfunc(mlflow, root, manifest, input_example) if modeldir.has_policy(manifest) else None
            finite = _finite(metrics)
            if finite:
                mlflow.log_metrics(finite, model_id=logged.model_id if logged else None)
            for name in _RUN_ARTIFACTS:
                if (root / name).is_file():
                    mlflow.log_artifact(str(root / name))
        version = _register(register_as, logged.model_uri, manifest, finite) \
            if register_as and logged else None
    except MlflowException as err:
        raise ModelError(f"MLflow at {tracking_uri()}: {_first_line(err)}") from None
    return RunInfo(run.info.run_id, run.info.experiment_id, logged.model_uri if logged else None, version)


def _log_pyfunc(mlflow: ModuleType, root: Path, manifest: dict[str, Any], input_example: pd.DataFrame | None) -> Any:
    """The model directory as a pyfunc that decides, with its signature and an input example."""
    from insertrec.engine import Engine

    engine = Engine.load(root)
    example = _example_orders(engine, manifest) if input_example is None else input_example
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("pyfunc.py")),
        artifacts={MODEL_DIR_ARTIFACT: str(root)}, signature=_signature(engine),
        input_example=example, pip_requirements=_requirements(manifest))


def _experiment_id(name: str | None) -> str:
    c = client()
    name = name or DEFAULT_EXPERIMENT
    found = c.get_experiment_by_name(name)
    if found is None:
        return c.create_experiment(name)
    if found.lifecycle_stage == "deleted":
        raise InsertrecError(f"MLflow experiment {name!r} is deleted; restore it in the MLflow UI "
                             "or pass another --experiment")
    return found.experiment_id


def _warn_if_misplaced(experiment_id: str, wanted: str | None) -> None:
    """``mlflow run`` creates the run before insertrec starts, in MLflow's Default experiment unless
    told otherwise; the run cannot be moved, so say how to put the next one with the others."""
    if client().get_experiment(experiment_id).name == "Default":
        print(f"[insertrec] warning: `mlflow run` put this run in MLflow's Default experiment; pass "
              f"--experiment-name {wanted or DEFAULT_EXPERIMENT} to mlflow run to keep runs together",
              file=sys.stderr)


def _register(name: str, model_uri: str, manifest: dict[str, Any], metrics: dict[str, float]) -> str:
    """A new version of ``name`` carrying what promotion and audits look up without opening the run."""
    mlflow = load_mlflow()
    tags: dict[str, str] = {key: str(manifest[key]) for key in ("catalog_sha256", "data_fingerprint", "cutoff")
            if key in manifest}
    tags |= {"insertrec_version": str(manifest.get("version", "")),
             **{f"metric.{key}": repr(value) for key, value in metrics.items()}}
    version = mlflow.register_model(model_uri, name, tags=tags)
    client().update_model_version(name, str(version.version),
                                  description=f"insertrec model {manifest.get('version', '')}, trained on "
                                              f"history before {manifest.get('cutoff', '?')}")
    return str(version.version)


def _signature(engine: Any) -> Any:
    """Orders in (the ``orders`` columns a decision can use; ``ctx_*`` as the shop sends them),
    decisions out. ``order_ts`` is ISO 8601 text: MLflow's datetime type drops time zones."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    orders = TABLES["orders"]
    columns: list[ColSpec | TensorSpec] = [ColSpec("string" if name == "order_ts" else _MLFLOW_TYPES[ORDER_DTYPES[name]], name,
                       required=name in orders["required"])
               for name in (*orders["required"], *orders["optional"]) if name not in _NOT_AT_DECISION_TIME]
    columns += [ColSpec(AnyType(), name, required=False) for name in engine.params.ctx_columns]
    outputs: list[ColSpec | TensorSpec] = [
        ColSpec("string", "order_id"), ColSpec("string", "slot"), ColSpec("string", "action_id"),
        ColSpec("double", "propensity"), ColSpec("string", "policy")]
    # ``layout``: "per_order" gives one row per input row (for ``mlflow.pyfunc.spark_udf``), see pyfunc.py
    return ModelSignature(inputs=Schema(columns), outputs=Schema(outputs),
                          params=ParamSchema([ParamSpec("layout", "string", "per_slot")]))


def _example_orders(engine: Any, manifest: dict[str, Any]) -> pd.DataFrame:
    """One plausible order, placed at the model's cutoff (the engine refuses orders before it)."""
    when = manifest.get("cutoff") or pd.Timestamp.now(tz="UTC").isoformat()
    return pd.DataFrame({"order_id": ["example-order"], "customer_id": ["example-customer"],
                         "order_ts": [pd.Timestamp(when).isoformat()], "order_value": [49.9],
                         "n_items": [2.0], "channel": ["web"], "is_gift": [False]})


def _requirements(manifest: dict[str, Any]) -> list[str]:
    """Pinned from the manifest, so MLflow does not spend seconds re-importing the model to guess."""
    libs = manifest.get("libraries", {})
    pinned = [f"{name}=={libs[name]}" for name in ("numpy", "pandas", "scikit-learn", "joblib")
              if libs.get(name, "unknown") != "unknown"]
    ours = libs.get("insertrec", "unknown")
    return ["insertrec" if ours == "unknown" else f"insertrec=={ours}", *pinned]


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flatten(value, name + ".")
        else:
            out[name] = str(value)
    return out


def _unlogged(params: dict[str, str], logged: dict[str, str]) -> dict[str, str]:
    """What is left to log on a run that may already hold params (``mlflow run`` logs the project's).

    MLflow refuses to change a param. A launcher logs what the user typed
    (``cutoff=''``), training what it resolved that to; the resolved value
    goes in beside it as ``<key>.resolved``.
    """
    return {(key if key not in logged else f"{key}.resolved"): value for key, value in params.items()
            if logged.get(key) != value}


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
