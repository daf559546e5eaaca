"""The decision API as fulfillment software sees it, in process (FastAPI TestClient)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from serving_helpers import ADMIN, DECIDE, FEEDBACK, KEYS, SCARCE_CATALOG, auth, order, query, settings

from insertrec import modeldir
from insertrec.engine import Engine
from insertrec.logged import read_logged
from insertrec.serving.app import create_app, run
from insertrec.serving.hotswap import Loaded
from insertrec.serving.settings import Settings, SettingsError


@pytest.fixture
def client(tmp_path: Path):
    with TestClient(create_app(settings(tmp_path))) as c:
        yield c


def decide(c: TestClient, body: dict, key: str = DECIDE):
    return c.post("/v1/recommendations", json=body, headers=auth(key))


def test_a_decision_has_every_slot_and_is_logged(client, tmp_path):
    r = decide(client, order(1))
    assert r.status_code == 200
    body = r.json()
    assert body["order_id"] == "o-1" and body["policy"] in ("rules", "explore")
    assert set(body["slots"]) == {"packaging", "insert", "coupon"}
    for choice in body["slots"].values():
        assert 0 < choice["propensity"] <= 1 and choice["pick_note"]
        assert choice["action_id"] in [a["action_id"] for a in choice["alternatives"]]
    orders, exposures, _ = read_logged(f"sqlite:///{tmp_path / 'log.db'}")
    assert orders["order_id"].tolist() == ["o-1"]
    logged = dict(zip(exposures["slot"], exposures["action_id"]))
    assert logged == {s: c["action_id"] for s, c in body["slots"].items()}


def test_a_retried_order_gets_the_stored_decision_and_uses_no_stock(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    with TestClient(create_app(settings(tmp_path, catalog))) as c:
        first = decide(c, order(1))
        again = decide(c, dict(reversed(order(1).items())))  # the same order, its keys in another order
        assert again.status_code == 200 and again.text == first.text
        assert again.headers["Idempotent-Replayed"] == "true"
        used = c.app.state.service.log.counters()["sample"]["used"]
        assert used == (first.json()["slots"]["insert"]["action_id"] == "sample")


def test_stock_and_budget_run_out_and_the_default_takes_over(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    with TestClient(create_app(settings(tmp_path, catalog))) as c:
        boxes = [decide(c, order(i)).json()["slots"] for i in range(30)]
        counters = c.app.state.service.log.counters()
    inserts = [b["insert"]["action_id"] for b in boxes]
    coupons = [b["coupon"]["action_id"] for b in boxes]
    assert inserts.count("sample") == 5 == counters["sample"]["used"]
    assert coupons.count("ten_off") == 3 == counters["ten_off"]["used"]  # budget 9 at cost 3
    assert set(inserts) == {"sample", "none"} and set(coupons) == {"ten_off", "no_coupon"}


def test_contact_cap_holds_for_a_returning_customer(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    with TestClient(create_app(settings(tmp_path, catalog))) as c:
        coupons = [decide(c, order(i, customer="same")).json()["slots"]["coupon"]["action_id"] for i in range(4)]
    assert coupons.count("ten_off") <= 1  # max_per_customer: 1 in 30 days


def test_the_service_state_follows_the_customer(client):
    first = decide(client, order(1, customer="anna")).json()
    assert first["slots"]["insert"]["action_id"] == "thank_you_card" or first["policy"] == "explore"  # new
    second = decide(client, order(2, customer="anna")).json()
    assert second["slots"]["insert"]["action_id"] == "survey_card" or second["policy"] == "explore"  # developing
    r = client.post("/v1/outcomes", json={"order_id": "o-2", "type": "nps", "score": 2}, headers=auth(FEEDBACK))
    assert r.status_code == 200 and r.json()["recorded"] is True
    third = decide(client, order(3, customer="anna")).json()
    assert third["slots"]["insert"]["action_id"] == "apology_note"  # the playbook's detractor rule


def test_an_nps_score_in_the_request_is_used_for_that_order(client):
    body = decide(client, order(1, nps_score=1)).json()
    assert body["slots"]["insert"]["action_id"] == "apology_note"


def test_outcomes_are_stored_once_and_need_a_decided_order(client, tmp_path):
    decide(client, order(1))
    post = lambda body: client.post("/v1/outcomes", json=body, headers=auth(FEEDBACK))
    first = post({"order_id": "o-1", "type": "returned", "returned_value": 12.5})
    again = post({"order_id": "o-1", "type": "returned", "returned_value": 12.5})
    assert first.json()["recorded"] is True and again.json()["recorded"] is False
    assert post({"order_id": "o-1", "type": "nps", "score": 9, "outcome_id": "survey-7"}).json()["outcome_id"] == "survey-7"
    unknown = post({"order_id": "never", "type": "reordered"})
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "order_id"
    bad = post({"order_id": "o-1", "type": "nps", "score": 11})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "score"
    orders, _, nps = read_logged(f"sqlite:///{tmp_path / 'log.db'}")
    assert orders.loc[0, "returned_value"] == 12.5 and nps["score"].tolist() == [9]


@pytest.mark.parametrize("body, field", [
    ({"customer_id": "c", "order_value": 1}, "order_id"),
    ({"order_id": "o", "customer_id": "c", "order_value": -1}, "order_value"),
    ({"order_id": "o", "customer_id": "c", "order_value": 1, "order_ts": "yesterday"}, "order_ts"),
    ({"order_id": "o", "customer_id": "c", "order_value": 1, "order_ts": "3001-01-01"}, "order_ts"),
    ({"order_id": "o", "customer_id": "c", "order_value": 1, "categories": ["a|b"]}, "categories.0"),
    ({"order_id": "o\n", "customer_id": "c", "order_value": 1}, "order_id"),
    ({"order_id": "o", "customer_id": "c", "order_value": 1, "ctx_age": {"nested": 1}}, "ctx_age"),
    ({"order_id": "o", "customer_id": "c", "order_value": 1, "nps_score": 12}, "nps_score"),
])
def test_bad_input_is_a_422_naming_the_field(client, body, field):
    r = decide(client, body)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == field and r.json()["error"]["reason"]


def test_unparseable_and_oversized_bodies(client):
    r = client.post("/v1/recommendations", content=b"{not json", headers=auth(DECIDE))
    assert r.status_code == 422 and "JSON" in r.json()["error"]["reason"]
    r = client.post("/v1/recommendations", content=b" " * 70_000, headers=auth(DECIDE))
    assert r.status_code == 413


def test_batch_reports_errors_per_order(client):
    r = client.post("/v1/recommendations:batch", headers=auth(DECIDE), json={"orders": [
        order(1), {"order_id": "o-2", "customer_id": "c"}, order(3, is_gift="yes"), order(1)]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 422, 422, 200]
    assert results[2]["error"]["field"] == "orders.2.is_gift"
    assert results[1]["error"]["field"] == "orders.1.order_value"
    assert results[3]["decision"] == results[0]["decision"]  # same order, same decision
    too_many = client.post("/v1/recommendations:batch", headers=auth(DECIDE),
                           json={"orders": [order(i) for i in range(1001)]})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "orders"


ROUTES = [("post", "/v1/recommendations", "decide"), ("post", "/v1/recommendations:batch", "decide"),
          ("get", "/v1/segments", "decide"), ("post", "/v1/outcomes", "feedback"),
          ("post", "/v1/admin/reload", "admin")]
ROLE_KEYS = {"decide": DECIDE, "feedback": FEEDBACK, "admin": ADMIN}


@pytest.mark.parametrize("method, path, role", ROUTES)
def test_every_protected_route_refuses_missing_bad_and_wrong_keys(client, method, path, role):
    call = getattr(client, method)
    for headers in ({}, {"Authorization": "Bearer not-a-key-at-all-000"}, {"Authorization": "Basic abc"},
                    {"Authorization": f"Bearer {ROLE_KEYS[role]}x"}):
        r = call(path, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    for other, key in ROLE_KEYS.items():
        if other not in (role, "admin"):
            assert call(path, headers=auth(key)).status_code == 403
    assert call(path, headers=auth(ROLE_KEYS[role])).status_code not in (401, 403)
    assert call(path, headers=auth(ADMIN)).status_code not in (401, 403)  # admin may do everything


def test_a_failing_model_is_answered_from_the_rules(client):
    class Broken(Engine):
        def decide(self, *args, **kwargs):
            raise RuntimeError("model exploded")

    holder = client.app.state.service.holder
    rules = holder.current.fallback
    holder.current = Loaded(Broken(rules.policy, rules.params), rules)
    r = decide(client, order(1))
    assert r.status_code == 200 and r.json()["policy"] == "fallback"
    assert "insertrec_fallbacks_total 1.0" in client.get("/metrics").text


def test_a_corrupt_model_directory_serves_fallback_and_reports_degraded(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "catalog.yaml").write_text(Path(settings(tmp_path).catalog).read_text())
    (model / "engine.joblib").write_bytes(b"garbage")
    (model / "manifest.json").write_text(json.dumps({"format": 1, "artifacts": {"engine.joblib": "0" * 64}}))
    modeldir.sign(model)    # signed by the key holder, yet corrupt
    s = Settings.load(environ={}, model=str(model), db_url=f"sqlite:///{tmp_path / 'log.db'}", api_keys=KEYS)
    with TestClient(create_app(s)) as c:
        ready = c.get("/readyz", headers=auth(ADMIN)).json()
        assert ready["status"] == "degraded" and "engine.joblib" in ready["reason"]
        anyone = c.get("/readyz").json()   # no file names or error types without an admin key
        assert anyone["status"] == "degraded" and "joblib" not in anyone["reason"] and str(model) not in anyone["reason"]
        r = decide(c, order(1))
        assert r.status_code == 200 and r.json()["policy"] == "fallback"


def test_reload_keeps_serving_and_bumps_the_generation(client):
    before = client.app.state.service.holder.current
    r = client.post("/v1/admin/reload", headers=auth(ADMIN))
    assert r.status_code == 202 and r.json()["generation"] == 1
    assert decide(client, order(1)).status_code == 200  # served by the old or the new engine, never refused
    for _ in range(100):
        if client.app.state.service.holder.current is not before:
            break
        __import__("time").sleep(0.05)
    assert client.app.state.service.holder.current.generation == 1


def test_metrics_break_requests_down_by_stage(client):
    decide(client, order(1))
    text = client.get("/metrics").text
    for stage in ("validation", "features", "scoring", "logging"):
        assert f'insertrec_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert 'insertrec_requests_total{route="/v1/recommendations",status="200"} 1.0' in text
    assert 'insertrec_decisions_total{policy=' in text


def test_errors_do_not_leak_internals(client, tmp_path):
    """A log that cannot be written (as a full disk) is answered from the rules and spooled, and
    /readyz says degraded, still 200; a worker that cannot spool either is 503, and neither
    names files or error types without an admin key."""
    client.app.state.service.log.close()
    (tmp_path / "log.db").unlink()
    (tmp_path / "log.db").mkdir()  # the log's file is now a directory: every write fails
    r = decide(client, order(1))
    assert r.status_code == 200 and r.json()["policy"] == "fallback"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert ready.json()["reason"].startswith("the decision log cannot be reached; answering from the catalog's rules")
    assert "1 spooled decisions" in ready.json()["reason"] and "Error" not in ready.json()["reason"]
    assert "Error" in client.get("/readyz", headers=auth(ADMIN)).json()["reason"]  # the type, for an admin
    spool = client.app.state.service.spool
    spool.close()
    spool.directory = tmp_path / "not-a-directory"
    spool.directory.write_text("")   # the spool cannot be written either
    r = decide(client, order(2))
    assert r.status_code == 503 and r.json() == {"error": {"field": None, "reason":
                                                           "decisions cannot be recorded right now; retry shortly"}}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    assert ready.json()["reason"] == "neither the decision log nor the spool can be written"


def test_settings_come_from_file_then_env_then_flags(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nworkers: 3\ndb_url: sqlite:///x.db\n")
    s = Settings.load(config, environ={"INSERTREC_PORT": "9002", "INSERTREC_API_KEYS": KEYS}, workers=2)
    assert (s.port, s.workers, s.db_url) == (9002, 2, "sqlite:///x.db")
    assert s.keys[DECIDE] == {"decide"}
    assert Settings.load(environ=s.to_environ()) == s
    with pytest.raises(SettingsError, match="INSERTREC_API_KEYS item 1: unknown role 'root'"):
        Settings.load(environ={"INSERTREC_API_KEYS": "abcdefghijklmnopqrstu:root"})
    with pytest.raises(SettingsError, match="'workers'"):
        Settings.load(environ={"INSERTREC_WORKERS": "many"})
    keyfile = tmp_path / "keys"
    keyfile.write_text("# ops\nabcdefghijklmnopqrstu:admin\nshort:decide\n")
    with pytest.raises(SettingsError, match="keys line 3: key too short"):
        Settings.load(environ={"INSERTREC_API_KEYS_FILE": str(keyfile)})


def test_the_server_refuses_to_start_without_keys(tmp_path, monkeypatch):
    for name in ("INSERTREC_API_KEYS", "INSERTREC_API_KEYS_FILE", "INSERTREC_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError, match="refusing to start without API keys"):
        run(model=None, config=None)


def test_merge_logged_feeds_training_with_logged_propensities(client, tmp_path):
    from insertrec.data import Dataset
    from insertrec.logged import merge_logged

    decide(client, order(1, categories=["apparel", "shoes"], ctx_age=31))
    orders, exposures, _ = read_logged(f"sqlite:///{tmp_path / 'log.db'}")
    assert orders.loc[0, "categories"] == "apparel|shoes" and orders.loc[0, "ctx_age"] == 31
    assert str(orders["order_ts"].dtype) == "datetime64[ns, UTC]"
    assert exposures["propensity"].between(0, 1).all() and len(exposures) == 3
    merged = merge_logged(Dataset(orders=orders.iloc[:0].drop(columns=["ctx_age"])), f"sqlite:///{tmp_path / 'log.db'}")
    assert merged.orders["order_id"].tolist() == ["o-1"] and len(merged.exposures) == 3


@pytest.mark.parametrize("extra, field, reason", [
    ({"ctx_" + "n" * 60_000: 1}, "ctx_" + "n" * 57 + "...", "1 to 60 letters, digits or '_'"),
    ({"ctx_a-b": 1}, "ctx_a-b", "1 to 60 letters, digits or '_'"),
    ({f"ctx_f{i}": i for i in range(3000)}, "ctx_f32", "at most 32 ctx_* names"),
])
def test_ctx_field_names_and_their_number_are_bounded(tmp_path, extra, field, reason):
    s = settings(tmp_path, max_body_bytes=1 << 20)
    with TestClient(create_app(s)) as c:
        r = decide(c, order(1, **extra))
        assert r.status_code == 422
        assert r.json()["error"]["field"] == field and reason in r.json()["error"]["reason"]
        batch = c.post("/v1/recommendations:batch", headers=auth(DECIDE),
                       json={"orders": [order(2), order(3, **extra)]}).json()["results"]
        assert batch[0]["status"] == 200
        assert batch[1]["status"] == 422 and batch[1]["error"]["field"] == f"orders.1.{field}"
        assert decide(c, order(4, **{f"ctx_f{i}": i for i in range(32)})).status_code == 200


def test_training_refuses_a_log_whose_ctx_names_are_unbounded(client, tmp_path):
    """Orders logged before the API's bounds (or written around it) cannot blow up training."""
    import sqlite3

    from insertrec.data import Dataset
    from insertrec.errors import DataError
    from insertrec.logged import merge_logged

    url = f"sqlite:///{tmp_path / 'log.db'}"
    for i in range(40):
        decide(client, order(i, **{f"ctx_o{i}_{k}": k for k in range(20)}))  # 20 each, 800 in all
    with pytest.raises(DataError, match=r"decision log 'sqlite:///.*log\.db' column 'ctx_.*': too many context "
                                        r"fields: at most 32"):
        read_logged(url)
    with sqlite3.connect(tmp_path / "log.db") as db:
        db.execute("DELETE FROM decisions WHERE order_id != 'o-0'")
        db.execute("UPDATE decisions SET order_json = json_set(order_json, '$.\"ctx_bad name\"', 1)")
    with pytest.raises(DataError, match=r"column 'ctx_bad name': a context field's name must be"):
        read_logged(url)
    with sqlite3.connect(tmp_path / "log.db") as db:
        db.execute("UPDATE decisions SET order_json = json_remove(order_json, '$.\"ctx_bad name\"')")
    orders, _, _ = read_logged(url)
    assert sum(c.startswith("ctx_") for c in orders.columns) == 20
    own = orders.iloc[:0].drop(columns=[c for c in orders.columns if c.startswith("ctx_")])
    for k in range(13):
        own[f"ctx_shop_{k}"] = pd.Series(dtype="float64")    # 13 of the shop's own + 20 logged = 33
    with pytest.raises(DataError, match="too many context fields"):
        merge_logged(Dataset(orders=own), url)


def test_readyz_is_degraded_while_the_sqlite_log_cannot_write(tmp_path):
    """A full disk, made real for this process: RLIMIT_FSIZE stops every file from growing (the kernel
    answers EFBIG, as ENOSPC on a full disk), so SQLite's writes fail while its reads still work.
    Orders are answered from the rules and spooled (the spool, a new file, still has room), /readyz
    says degraded (200, the write failure named for an admin), and ready again once the log can be
    written and the spool is replayed into it."""
    import os
    import resource

    db = tmp_path / "log.db"
    with TestClient(create_app(settings(tmp_path))) as c:
        assert decide(c, order(0)).status_code == 200 and c.get("/readyz").status_code == 200
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = max(os.path.getsize(f) for f in (db, f"{db}-wal") if os.path.exists(f)) + 16_384
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            for i in range(1, 3000):
                decide(c, order(i))
                ready = c.get("/readyz", headers=auth(ADMIN))   # an admin sees the reason
                if ready.json()["status"] != "ready":
                    break
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", i
        assert "write failed" in ready.json()["reason"]
        assert decide(c, order("during")).json()["policy"] == "fallback"
        # space again: readiness comes back without a decision having to succeed first
        for _ in range(100):
            if c.get("/readyz").json()["status"] == "ready":
                break
            time.sleep(0.1)
        assert c.get("/readyz").json()["status"] == "ready"
        assert decide(c, order("after")).status_code == 200
    logged = [order_id for order_id, in query(f"sqlite:///{db}", "SELECT order_id FROM decisions")]
    assert sorted(logged) == sorted({*(f"o-{n}" for n in range(i + 1)), "o-during", "o-after"})
