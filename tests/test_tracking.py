"""MLflow lifecycle: runs logged, versions registered, champion promoted, served by alias.

The models are real model directories (the catalog's playbook over a real
customer snapshot), logged to a real MLflow store: the embedded SQLite store
here, a real ``mlflow server`` on loopback in the slow tests.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from insertrec import modeldir
from insertrec.catalog import Catalog
from insertrec.data import ORDER_DTYPES, Dataset
from insertrec.engine import Engine
from insertrec.errors import InsertrecError, ModelError
from insertrec.features import FeatureParams, Snapshot
from insertrec.policy import Policy
from insertrec.registry import AliasWatcher, ModelRef, decide_promotion, promote, resolve_model
from insertrec.tracking import Progress, client, load_mlflow, log_training_run, tracking_uri

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "tests" / "data" / "catalog_example.yaml"
CUTOFF = "2024-04-01T00:00:00+00:00"
NEW_ORDERS = pd.DataFrame({"order_id": ["n1", "n2", "n3"], "customer_id": ["c1", "c2", "stranger"],
                           "order_ts": ["2024-05-01T10:00:00+02:00", "2024-05-02T09:00:00Z",
                                        "2024-05-03T12:30:00Z"],
                           "order_value": [30.0, 80.0, 15.0], "is_gift": [False, True, False]})


def make_model(out: Path, version: str, epsilon: float = 0.1) -> Path:
    """A model directory serving the catalog's playbook over a snapshot of three past orders."""
    catalog = Catalog.load(CATALOG)
    orders = pd.DataFrame({
        "order_id": ["o1", "o2", "o3"], "customer_id": ["c1", "c1", "c2"],
        "order_ts": pd.to_datetime(["2024-01-05", "2024-03-01", "2024-03-02"], utc=True),
        "order_value": [40.0, 55.0, 12.0], "n_items": [1.0, 2.0, 1.0], "channel": ["web"] * 3,
        "categories": ["apparel", "home", "apparel"], "is_gift": [False, False, True],
        "returned_value": [0.0] * 3, "region": ["north"] * 3}).astype(ORDER_DTYPES)
    data = Dataset(orders=orders, catalog=catalog)
    params = FeatureParams.fit(data, catalog=catalog)
    engine = {"policy": Policy(catalog, epsilon=epsilon, version=version), "params": params,
              "snapshot": Snapshot.build(data, params, as_of=CUTOFF), "segments": {"c1": "regulars"}}
    files = {"catalog.yaml": catalog.text, "segments.csv": "customer_id,segment_id\nc1,0\nc2,1\n",
             "report.html": "<!doctype html><title>segments</title>", "ope.json": "{}"}
    modeldir.save(out, {"engine": engine}, files,
                  {"version": version, "cutoff": CUTOFF, "catalog_sha256": catalog.sha256,
                   "data_fingerprint": data.fingerprint(), "metrics": {}, "params": {},
                   "served_epsilon": engine["policy"].slot_epsilon})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- without MLflow -----------------------------------------------------------------------------

def test_importing_the_modules_does_not_import_mlflow():
    code = ("import sys, insertrec.tracking, insertrec.registry, insertrec.cli; "
            "sys.exit(1 if 'mlflow' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_model_uris():
    assert ModelRef.parse("models:/insertrec@champion") == ModelRef("insertrec", alias="champion")
    assert ModelRef.parse("models:/insertrec/3") == ModelRef("insertrec", version="3")
    for bad in ("models:/insertrec", "models:/insertrec@", "models:/a/b/c", "runs:/abc/model"):
        with pytest.raises(ModelError, match="models:/NAME@ALIAS"):
            resolve_model(bad) if bad.startswith("models:/") else ModelRef.parse(bad)
    assert resolve_model("some/model-dir") == Path("some/model-dir")


def test_watcher_only_watches_aliases():
    with pytest.raises(ModelError, match="only an alias"):
        AliasWatcher("models:/insertrec/3", 1.0, lambda path: None)


def test_promotion_rule():
    interval = {"diff_dr": 0.5, "diff_low": 0.1, "diff_high": 0.9}
    assert decide_promotion(None, {}, force=False)[0]
    assert decide_promotion("1", interval, force=False)[0]
    better_in_point_only = {"diff_dr": 0.5, "diff_low": -0.2, "diff_high": 1.2}
    promoted, reason = decide_promotion("1", better_in_point_only, force=False)
    assert not promoted and "-0.2000" in reason
    assert not decide_promotion("1", {"diff_dr": 0.0, "diff_low": 0.0, "diff_high": 0.0}, force=False)[0]
    assert decide_promotion("1", better_in_point_only, force=True) == (True, "forced")


def test_progress_reports_each_stage_and_its_seconds(capsys):
    progress = Progress()
    progress("features")
    time.sleep(0.05)
    progress("Off-policy evaluation")
    seconds = progress.seconds()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].endswith("features...") and "Off-policy evaluation" in err[1]
    assert seconds["seconds_features"] >= 0.05
    assert set(seconds) == {"seconds_features", "seconds_off_policy_evaluation", "seconds_total"}


def test_mlproject_entry_point_arguments():
    spec = importlib.util.spec_from_file_location("mlproject_train", ROOT / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = module.train_argv(["--data", "/d", "--out", "/m", "--cutoff", "", "--horizon-days", "60.0",
                              "--seed", "3", "--register-as", ""])
    assert argv == ["train", "--data", "/d", "--out", "/m", "--horizon-days", "60", "--seed", "3",
                    "--register-as", ""]
    text = (ROOT / "training" / "MLproject").read_text()
    assert "train:" in text and "python train.py" in text


# --- the embedded SQLite store ------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("mlflow-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)   # the default: ./mlflow.db
        yield root


@pytest.fixture(scope="module")
def versions(store: Path) -> dict:
    one = make_model(store / "model-1", "v1")
    two = make_model(store / "model-2", "v2", epsilon=0.2)
    run1 = log_training_run(one, {"horizon_days": 60, "learner": {"max_iter": 5}},
                            {"policy_value_dr": 1.5, "ess": float("nan"), "repeat_auc": None}, None)
    run2 = log_training_run(two, {"horizon_days": 60}, {"policy_value_dr": 1.7}, "other-experiment")
    return {"dirs": (one, two), "runs": (run1, run2)}


def test_run_holds_params_metrics_artifacts_and_registered_version(versions, store):
    run_info = versions["runs"][0]
    assert (store / "mlflow.db").is_file() and (store / "mlruns").is_dir()
    c = client()
    run = c.get_run(run_info.run_id)
    manifest = modeldir.read_manifest(versions["dirs"][0])
    assert run.data.params["catalog_sha256"] == manifest["catalog_sha256"]
    assert run.data.params["data_fingerprint"] == manifest["data_fingerprint"]
    assert run.data.params["learner.max_iter"] == "5" and run.data.params["cutoff"] == CUTOFF
    # what was served, slot by slot, whatever the params asked for (`train --epsilon auto`)
    assert {k: v for k, v in run.data.params.items() if k.startswith("served_epsilon.")} == \
        {f"served_epsilon.{slot}": "0.1" for slot in manifest["served_epsilon"]}
    assert run.data.metrics == {"policy_value_dr": 1.5}          # NaN and None are left out
    logged = {a.path for a in c.list_artifacts(run_info.run_id)}
    assert {"segments.csv", "report.html", "catalog.yaml", "ope.json", "manifest.json"} <= logged
    assert c.get_experiment(run_info.experiment_id).name == "insertrec"
    assert c.get_experiment(versions["runs"][1].experiment_id).name == "other-experiment"

    version = c.get_model_version("insertrec", run_info.version)
    assert version.run_id == run_info.run_id
    assert version.tags["catalog_sha256"] == manifest["catalog_sha256"]
    assert float(version.tags["metric.policy_value_dr"]) == 1.5
    assert versions["runs"][1].version == str(int(run_info.version) + 1)


def test_logged_pyfunc_decides_like_the_engine(versions):
    mlflow = load_mlflow()
    uri = f"models:/insertrec/{versions['runs'][0].version}"
    model = mlflow.pyfunc.load_model(uri)
    expected = Engine.load(versions["dirs"][0]).decide_batch(NEW_ORDERS)
    got = model.predict(NEW_ORDERS)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    inputs = {c.name: c for c in model.metadata.get_input_schema().inputs}
    assert inputs["order_id"].required and not inputs["channel"].required
    assert "returned_value" not in inputs
    assert model.metadata.get_output_schema().input_names() == ["order_id", "slot", "action_id",
                                                               "propensity", "policy"]


def test_logged_pyfunc_gives_one_row_per_order_when_asked(versions):
    mlflow = load_mlflow()
    model = mlflow.pyfunc.load_model(f"models:/insertrec/{versions['runs'][0].version}")
    per_slot = model.predict(NEW_ORDERS).reset_index(drop=True)
    per_order = model.predict(NEW_ORDERS, params={"layout": "per_order"})
    assert list(per_order["order_id"]) == list(NEW_ORDERS["order_id"])
    for slot, rows in per_slot.groupby("slot"):
        assert list(per_order[slot]) == list(rows["action_id"])
        assert list(per_order[f"{slot}_propensity"]) == list(rows["propensity"])
    with pytest.raises(Exception, match="layout"):
        model.predict(NEW_ORDERS, params={"layout": "sideways"})


def test_promote_then_serve_by_alias_and_follow_its_moves(versions, store):
    v1, v2 = (r.version for r in versions["runs"])
    first = promote("insertrec", v1)
    assert first.promoted and first.champion is None and "no champion" in first.summary()

    cache = store / "cache"
    served = resolve_model("models:/insertrec@champion", cache)
    assert Engine.load(served).version == "v1"
    assert resolve_model("models:/insertrec@champion", cache) == served   # cached, still verified

    moved, seen = threading.Event(), []
    watcher = AliasWatcher("models:/insertrec@champion", 0.2,
                           lambda path: (seen.append(path), moved.set()), current=served,
                           cache_dir=cache).start()
    try:
        with pytest.raises(InsertrecError, match="--data"):     # a champion exists: evidence needed
            promote("insertrec", v2)
        assert str(client().get_model_version_by_alias("insertrec", "champion").version) == v1
        time.sleep(0.5)
        assert not moved.is_set()

        forced = promote("insertrec", v2, force=True)
        assert forced.promoted and forced.champion == v1 and forced.reason == "forced"
        assert moved.wait(20), "the watcher did not see the alias move"
    finally:
        watcher.stop()
    assert Engine.load(seen[0]).version == "v2" and watcher.current == seen[0]

    c = client()
    assert c.get_model_version("insertrec", v2).tags["promotion.decision"] == "promoted"
    assert c.get_model_version("insertrec", v1).tags[f"challenged_by.{v2}"] == "promoted"
    assert "replaced as champion" in c.get_model_version("insertrec", v1).description
    again = promote("insertrec", v2)
    assert not again.promoted and "already" in again.reason


def test_the_service_serves_the_champion_and_follows_the_alias_without_a_restart(versions, store):
    from fastapi.testclient import TestClient

    from insertrec.serving.app import create_app
    from insertrec.serving.settings import Settings

    champion = str(client().get_model_version_by_alias("insertrec", "champion").version)
    other = next(r.version for r in versions["runs"] if r.version != champion)
    settings = Settings.load(environ={}, model="models:/insertrec@champion", alias_poll_seconds=0.2,
                             db_url=f"sqlite:///{store / 'decisions.db'}", insecure_dev=True)
    order = {"order_id": "alias-1", "customer_id": "c1", "order_value": 30.0}

    def served_version(c: TestClient, order_id: str) -> str:
        response = c.post("/v1/recommendations", json=order | {"order_id": order_id})
        assert response.status_code == 200, response.text
        return response.json()["model_version"]

    with TestClient(create_app(settings)) as c:
        before = served_version(c, "alias-1")
        promote("insertrec", other, force=True)
        deadline = time.monotonic() + 30
        after = before
        while after == before and time.monotonic() < deadline:
            time.sleep(0.3)
            after = served_version(c, f"alias-{time.monotonic_ns()}")
    assert before == Engine.load(resolve_model(f"models:/insertrec/{champion}")).version
    assert after == Engine.load(resolve_model(f"models:/insertrec/{other}")).version


def test_promote_refuses_a_data_directory_that_does_not_exist(versions, store, capsys):
    from insertrec.cli import main

    c = client()
    version = str(max(int(v.version) for v in c.search_model_versions("name='insertrec'")))
    aliases, tags = c.get_registered_model("insertrec").aliases, c.get_model_version("insertrec", version).tags
    assert main(["promote", "--model-name", "insertrec", "--version", version, "--data", "missing/"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "insertrec: --data missing/: no such data directory"
    assert c.get_model_version("insertrec", version).tags == tags     # nothing decided, nothing recorded
    assert c.get_registered_model("insertrec").aliases == aliases


def test_missing_model_version_or_alias_is_a_clear_error(versions, store):
    with pytest.raises(ModelError, match="no alias 'nope'"):
        resolve_model("models:/insertrec@nope", store / "cache")
    with pytest.raises(ModelError, match="no version 99"):
        resolve_model("models:/insertrec/99", store / "cache")
    with pytest.raises(ModelError, match="no registered model 'nothing'"):
        resolve_model("models:/nothing@champion", store / "cache")


def test_unreachable_tracking_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ModelError, match="cannot reach the model registry at http://127.0.0.1"):
        resolve_model("models:/insertrec@champion", tmp_path)


# --- a real tracking server -------------------------------------------------------------------

@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port with its own SQLite store and artifact root."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_same_lifecycle_against_a_real_tracking_server(tmp_path, monkeypatch):
    with mlflow_server(tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.chdir(tmp_path)
        run = log_training_run(make_model(tmp_path / "m1", "s1"), {"horizon_days": 60},
                               {"policy_value_dr": 2.0}, "server-test")
        assert run.version == "1" and not (tmp_path / "mlflow.db").exists()
        assert promote("insertrec", run.version).promoted
        served = resolve_model("models:/insertrec@champion", tmp_path / "cache")
        assert Engine.load(served).version == "s1"

        moved = threading.Event()
        watcher = AliasWatcher("models:/insertrec@champion", 0.3, lambda path: moved.set(),
                               current=served, cache_dir=tmp_path / "cache").start()
        try:
            second = log_training_run(make_model(tmp_path / "m2", "s2"), {}, {}, "server-test")
            assert promote("insertrec", second.version, force=True).promoted
            assert moved.wait(30)
        finally:
            watcher.stop()
        assert Engine.load(watcher.current).version == "s2"
        assert any((tmp_path / "artifacts").rglob("manifest.json"))   # artifacts went through the server


@pytest.mark.slow
def test_mlflow_run_project_then_promotion_on_evidence(tmp_path, monkeypatch):
    """`mlflow run training -e train` twice on the same history: two versions of the same policy, so
    the second is not better beyond the interval and the champion stays. Without --data, promote
    judges them on their training data's orders after the cutoff, the ones neither has seen."""

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    subprocess.run([sys.executable, "-m", "insertrec.cli", "demo-data", "--out", "data", "--customers", "60",
                    "--seed", "3"], check=True, capture_output=True, timeout=300)
    for out in ("model-a", "model-b"):
        done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT / "training"), "-e", "train",
                               "--env-manager", "local", "--experiment-name", "project-test",
                               "-P", "data=data", "-P", f"out={tmp_path / out}", "-P", "cutoff=2024-06-01"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    c = client()
    runs = c.search_runs([c.get_experiment_by_name("project-test").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.params["cutoff"] == "2024-06-01" and "cutoff.resolved" in r.data.params for r in runs)

    assert promote("insertrec", "1").promoted
    decision = promote("insertrec", "2")              # the run's data, its orders after the cutoff
    assert not decision.promoted
    assert decision.figures["diff_low"] <= 0 <= decision.figures["diff_high"]
    assert decision.figures["judged_from"] == "2024-06-01T00:00:00+00:00"
    orders = pd.read_csv(tmp_path / "data" / "orders.csv", parse_dates=["order_ts"])
    before = orders["order_ts"] < pd.Timestamp("2024-06-01", tz="UTC")
    assert decision.figures["orders_left_out_inside_training"] == before.sum()
    assert 0 < decision.figures["orders"] <= (~before).sum()
    assert str(c.get_model_version_by_alias("insertrec", "champion").version) == "1"
    assert c.get_model_version("insertrec", "2").tags["promotion.decision"] == "rejected"
    assert float(c.get_model_version("insertrec", "2").tags["promotion.diff_low"]) == decision.figures["diff_low"]
