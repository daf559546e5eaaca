"""Registered versions: fetch one by alias or number, watch an alias, promote a challenger.

``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` resolve to a plain model
directory in a local cache, checked against its manifest, so that serving
loads it like any other directory and never calls MLflow per request. The
cache is keyed by tracking store, name and version: a version's content never
changes, so a cached copy that still verifies is reused.

Promotion moves the ``champion`` alias only on evidence: the paired DR
difference between challenger and champion on the same logged orders, and its
bootstrap interval, must be above zero (or the user forces it). The decision
and its figures are written on both versions, so the registry shows why the
alias is where it is.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import yaml

from insertrec import modeldir
from insertrec.errors import InsertrecError, ModelError
from insertrec.tracking import MODEL_DIR_ARTIFACT, client, load_mlflow, tracking_uri

__all__ = ["CHAMPION", "AliasWatcher", "ModelRef", "PromotionResult", "decide_promotion", "promote", "resolve_model"]

CHAMPION = "champion"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")
_log = logging.getLogger(__name__)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "insertrec" / "models"


@dataclass(frozen=True)
class ModelRef:
    """A registry reference: ``name`` and either an ``alias`` or a ``version``."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        m = _URI.match(uri)
        if m is None:
            raise ModelError(f"model {uri!r}: expected a model directory, models:/NAME@ALIAS "
                             "or models:/NAME/VERSION")
        return cls(m["name"], m["alias"], m["version"])

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def resolve_model(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local model directory behind ``uri``: a directory as given, or a registered version fetched.

    Raises ``ModelError`` naming the URI when the model, version or alias does
    not exist, or when the tracking server cannot be reached.
    """
    text = str(uri)
    if not text.startswith("models:/"):
        return Path(text)
    ref = ModelRef.parse(text)
    c = _registry_client()
    return _fetch(ref.name, _lookup(c, ref), cache_dir)


class AliasWatcher:
    """Background thread that polls ``models:/NAME@ALIAS`` and hands each new version's directory to
    ``on_change``.

    ``current`` is the directory being served (what :func:`resolve_model`
    returned at start); ``on_change`` is called only when the alias points
    elsewhere. Without ``current`` the first poll adopts the alias's version
    silently. While the tracking server is unreachable the watcher logs a
    warning and keeps the current model. A version ``on_change`` raises on is
    not offered again until the alias moves once more.
    """

    def __init__(self, uri: str, interval_s: float, on_change: Callable[[Path], None], *,
                 current: Path | None = None, cache_dir: str | Path | None = None):
        self.ref = ModelRef.parse(uri)
        if self.ref.alias is None:
            raise ModelError(f"model {uri!r}: only an alias (models:/NAME@ALIAS) can move; "
                             "a numbered version never changes")
        if not interval_s > 0:
            raise InsertrecError(f"alias poll interval must be positive seconds (got {interval_s!r})")
        self.interval_s = float(interval_s)
        self.on_change = on_change
        self.current = current
        self.cache_dir = cache_dir
        self._refused: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"insertrec-watch-{self.ref.name}@{self.ref.alias}")

    def start(self) -> AliasWatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> Path | None:
        """One poll: the new directory if the alias moved and ``on_change`` took it, else None."""
        c = _registry_client()
        version = _lookup(c, self.ref)
        if _cache_path(self.ref.name, version, self.cache_dir) in (self.current, self._refused):
            return None
        path = _fetch(self.ref.name, version, self.cache_dir)
        if self.current is None:
            self.current = path
            return None
        try:
            self.on_change(path)
        except Exception:  # the serving side refused it; keep serving what works
            _log.exception("%s moved to version %s but it could not be swapped in; still serving %s",
                           self.ref, version, self.current)
            self._refused = path
            return None
        _log.info("%s moved to version %s: now serving %s", self.ref, version, path)
        self.current = path
        return path

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except InsertrecError as err:
                _log.warning("%s: %s; still serving %s", self.ref, err, self.current)
            self._stop.wait(self.interval_s)


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    challenger: str                 # version number
    champion: str | None            # the champion before this decision, None if there was none
    promoted: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """What the CLI prints: the decision, then the figures it rests on."""
        verb = "now champion" if self.promoted else "not promoted"
        lines = [f"{self.model_name} version {self.challenger}: {verb} ({self.reason})"]
        if "judged_from" in self.figures:
            left_out = self.figures.get("orders_left_out_inside_training", 0)
            lines.append(f"judged on {self.figures['orders']} logged orders at or after {self.figures['judged_from']}, "
                         "the later of the two training cutoffs" + (
                             f"; warning: {left_out} orders of the data fall inside a training period and were "
                             "left out" if left_out else ""))
        lines += [f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}"
                  for key, value in self.figures.items()]
        return "\n".join(lines)


def promote(model_name: str, version: str | int, data_dir: str | Path | None = None, *,
            force: bool = False, alias: str = CHAMPION, cache_dir: str | Path | None = None,
            seed: int = 0) -> PromotionResult:
    """Compare version ``version`` with the current ``alias`` holder and move the alias if it is better.

    Better means the lower end of the paired bootstrap interval of the DR
    difference (challenger minus champion) is above zero; ``force`` moves the
    alias regardless (the comparison still runs and is recorded when there is
    data). With no champion yet the challenger becomes champion. ``data_dir``
    is recent logged data; without it the challenger's own training data
    (its run's ``data`` param) is used. Either way only orders at or after
    both versions' training cutoffs are judged (a model looks better on orders
    it learned from); none there is an error, and so is a ``data_dir`` that
    does not exist.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise InsertrecError(f"--data {data_dir}: no such data directory")
    c = _registry_client()
    version = str(version)
    _lookup(c, ModelRef(model_name, version=version))
    champion = _current(c, ModelRef(model_name, alias=alias))
    if champion == version:
        return PromotionResult(model_name, version, champion, False, f"already the {alias}")
    figures: dict[str, Any] = {}
    if champion is not None and (data_dir is not None or not force):
        challenger_dir = _fetch(model_name, version, cache_dir)
        champion_dir = _fetch(model_name, champion, cache_dir)
        data = Path(data_dir) if data_dir is not None else _training_data(c, model_name, version)
        figures = _compare(challenger_dir, champion_dir, data, seed)
    promoted, reason = decide_promotion(champion, figures, force, alias)
    _record(c, model_name, version, champion, promoted, reason, figures, alias)
    if promoted:
        c.set_registered_model_alias(model_name, alias, version)
    return PromotionResult(model_name, version, champion, promoted, reason, figures)


def decide_promotion(champion: str | None, figures: dict[str, Any], force: bool,
                     alias: str = CHAMPION) -> tuple[bool, str]:
    """The rule, apart from the registry: (move the alias?, why).

    A point estimate above the champion's is not enough: only when the whole
    interval of the paired difference (``diff_low``..``diff_high``) is above
    zero is the challenger better beyond the noise of the logged data.
    """
    if champion is None:
        return True, f"no {alias} yet"
    if force:
        return True, "forced"
    low = figures["diff_low"]
    if low > 0:
        return True, f"better than version {champion}: the difference's interval is above zero"
    return False, (f"not shown better than version {champion}: the difference's interval "
                   f"[{low:.4f}, {figures['diff_high']:.4f}] includes or is below zero")


def _compare(challenger_dir: Path, champion_dir: Path, data_dir: Path, seed: int) -> dict[str, Any]:
    """Both versions judged by the same DR yardstick on the same logged orders, those neither saw
    in training: at or after the later of their two training cutoffs."""
    from insertrec.data import load_data
    from insertrec.encoding import FeatureEncoder
    from insertrec.engine import Engine
    from insertrec.evaluation import compare, training_cutoff, unseen_orders

    challenger, champion = Engine.load(challenger_dir), Engine.load(champion_dir)
    since = max(training_cutoff(challenger.manifest, challenger_dir), training_cutoff(champion.manifest, champion_dir))
    horizon = float(challenger.manifest.get("params", {}).get("horizon_days", 60))
    unseen = unseen_orders(load_data(data_dir), challenger.params, challenger.catalog, horizon, since,
                           challenger.policy.encoder)
    encoder = challenger.policy.encoder or FeatureEncoder().fit(unseen.feats)
    result = compare(challenger.policy, champion.policy, unseen.feats, unseen.logged, encoder, seed=seed)
    return {"orders": int(result["orders"]), "data": str(data_dir), "judged_from": since.isoformat(),
            "orders_left_out_inside_training": unseen.inside,
            "challenger_dr": result["challenger"]["dr"]["value"],
            "champion_dr": result["champion"]["dr"]["value"],
            "diff_dr": result["diff"]["value"], "diff_low": result["diff"]["low"],
            "diff_high": result["diff"]["high"]}


def _training_data(c: Any, model_name: str, version: str) -> Path:
    """The data directory the challenger was trained on (its run's ``data`` param): its orders after
    the training cutoff, if it was trained with one, are what the two versions have not seen."""
    run_id = c.get_model_version(model_name, version).run_id
    params = c.get_run(run_id).data.params if run_id else {}
    data = params.get("data.resolved") or params.get("data")   # `mlflow run` logs data as typed
    if not data or not Path(data).is_dir():
        raise InsertrecError(f"version {version} of {model_name!r}: its training data is not known here "
                             f"({'run param data=' + data if data else 'no data param on its run'}); "
                             "pass --data with recent logged data to compare on")
    return Path(data)


def _record(c: Any, name: str, challenger: str, champion: str | None, promoted: bool, reason: str,
            figures: dict[str, Any], alias: str) -> None:
    """The decision on both versions: tags to filter on, a sentence in the description to read."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    outcome = "promoted" if promoted else "rejected"
    line = f"{when}: {outcome} as {alias} against version {champion or '-'}: {reason}" + \
        (f" ({shown})" if shown else "")
    tags = {f"promotion.{k}": v if isinstance(v, str) else repr(v) for k, v in figures.items()}
    tags |= {"promotion.decision": outcome, "promotion.against": champion or "", "promotion.at": when}
    for key, value in tags.items():
        c.set_model_version_tag(name, challenger, key, value)
    _append_description(c, name, challenger, line)
    if champion is not None:
        c.set_model_version_tag(name, champion, "challenged_by." + challenger, outcome)
        _append_description(c, name, champion, f"{when}: challenged by version {challenger}, "
                            f"{'replaced' if promoted else 'kept'} as {alias}: {reason}"
                            + (f" ({shown})" if shown else ""))


def _append_description(c: Any, name: str, version: str, line: str) -> None:
    before = c.get_model_version(name, version).description or ""
    c.update_model_version(name, version, description=(before + "\n" if before else "") + line)


def _registry_client() -> Any:
    """A client that gives up on an unreachable server in seconds, not MLflow's default minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return client()


def _current(c: Any, ref: ModelRef) -> str | None:
    """The version ``ref``'s alias points to, None when the alias (not the model) is missing."""
    try:
        return _lookup(c, ref)
    except ModelError:
        _registered(c, ref)
        return None


def _lookup(c: Any, ref: ModelRef) -> str:
    """The version number ``ref`` stands for; ModelError when it, or the store, is not there."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.get_model_version_by_alias(ref.name, ref.alias) if ref.alias else \
            c.get_model_version(ref.name, ref.version)
        return str(found.version)
    except MlflowException as err:
        _registered(c, ref)
        what = f"no alias {ref.alias!r}" if ref.alias else f"no version {ref.version}"
        raise ModelError(f"{ref}: registered model {ref.name!r} has {what} in {tracking_uri()}") from err


def _registered(c: Any, ref: ModelRef) -> None:
    """Raise the precise error: store unreachable, or no such registered model."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(ref.name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ModelError(f"{ref}: no registered model {ref.name!r} in {tracking_uri()}") from None
        raise ModelError(f"{ref}: cannot reach the model registry at {tracking_uri()} "
                         f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") \
            from None


def _cache_path(name: str, version: str, cache_dir: str | Path | None) -> Path:
    store = sha256(tracking_uri().encode()).hexdigest()[:12]
    return Path(cache_dir or _default_cache_dir()) / store / name / version


def _fetch(name: str, version: str, cache_dir: str | Path | None) -> Path:
    """The version's model directory in the cache, downloaded unless a verified copy is there.

    Downloads go to a temporary directory beside the target and are renamed
    into place only once verified, so a server worker never sees half a model
    and two workers fetching at once do not collide.
    """
    target = _cache_path(name, version, cache_dir)
    if target.is_dir():
        try:
            modeldir.verify(target)
            return target
        except ModelError:
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    mlflow = load_mlflow()
    from mlflow.exceptions import MlflowException

    scratch = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                             dst_path=str(scratch)))
        except MlflowException as err:
            raise ModelError(f"models:/{name}/{version}: download from {tracking_uri()} failed "
                             f"({str(err).strip().splitlines()[0]})") from None
        found = local / _model_dir_path(local, f"models:/{name}/{version}")
        modeldir.verify(found)
        try:
            found.rename(target)
        except OSError:  # another worker put a copy in place first
            modeldir.verify(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _model_dir_path(local: Path, uri: str) -> str:
    """Where the pyfunc keeps the model directory, as its MLmodel file says."""
    try:
        spec = yaml.safe_load((local / "MLmodel").read_text())
        return spec["flavors"]["python_function"]["artifacts"][MODEL_DIR_ARTIFACT]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise ModelError(f"{uri}: not an insertrec model (its MLmodel has no "
                         f"{MODEL_DIR_ARTIFACT!r} artifact)") from None
