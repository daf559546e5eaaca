"""The real server in processes: no acknowledged decision lost to SIGKILL, no oversell across workers."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving_helpers import DECIDE, EXAMPLE_CATALOG, SCARCE_CATALOG, Server, auth, order, query

# These tests count what was decided, not how long it waited: on a loaded CI machine a worker can be
# descheduled past the production deadline (50 ms), which would make a correct run a 503.
LOADED_MACHINE_DEADLINE_MS = "2000"


def logged_decision_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT decision_id FROM decisions")}


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_decision(tmp_path):
    acknowledged: dict[str, str] = {}
    stop = threading.Event()

    def fire(worker: int, url: str) -> None:
        with httpx.Client(base_url=url, headers=auth(DECIDE), timeout=5) as client:
            i = 0
            while not stop.is_set() and i < 5000:
                i += 1
                try:
                    r = client.post("/v1/recommendations", json=order(f"{worker}-{i}"))
                except httpx.HTTPError:
                    continue  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    acknowledged[r.json()["order_id"]] = r.json()["decision_id"]

    server = Server(tmp_path, EXAMPLE_CATALOG).start()
    threads = [threading.Thread(target=fire, args=(w, server.url)) for w in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) > 50, "the load did not get going before the kill"
    assert set(acknowledged.values()) <= logged_decision_ids(tmp_path / "log.db")

    with Server(tmp_path, EXAMPLE_CATALOG, workers=1) as again, \
            httpx.Client(base_url=again.url, headers=auth(DECIDE)) as client:
        for order_id in list(acknowledged)[-50:]:  # retried after the restart: the same decision
            worker_i = order_id.removeprefix("o-")
            r = client.post("/v1/recommendations", json=order(worker_i))
            assert r.json()["decision_id"] == acknowledged[order_id]
            assert r.headers["Idempotent-Replayed"] == "true"


@pytest.mark.slow
def test_concurrent_orders_across_two_workers_never_oversell(tmp_path, db_url):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    with Server(tmp_path, catalog, workers=2, db_url=db_url, db_deadline_ms=LOADED_MACHINE_DEADLINE_MS) as server:
        def one(i: int) -> dict:
            with httpx.Client(base_url=server.url, headers=auth(DECIDE), timeout=30) as client:
                r = client.post("/v1/recommendations", json=order(i))
                assert r.status_code == 200
                return r.json()["slots"]

        with ThreadPoolExecutor(max_workers=25) as pool:
            boxes = list(pool.map(one, range(50)))
        metrics = httpx.get(server.url + "/metrics").text
    inserts = [b["insert"]["action_id"] for b in boxes]
    coupons = [b["coupon"]["action_id"] for b in boxes]
    assert inserts.count("sample") == 5      # stock 5, everyone wanted one
    assert coupons.count("ten_off") == 3     # budget 9 at 3 each
    used = dict(query(db_url, "SELECT action_id, used FROM inventory"))
    assert used == {"sample": 5, "ten_off": 3}
    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('insertrec_requests_total{route="/v1/recommendations",status="200"}'))
    assert served == 50  # /metrics aggregates both workers


CAPPED_CATALOG = """
slots:
  packaging:
    actions:
      - {id: box, name: Box, cost: 0.4, default: true}
  insert:
    actions:
      - {id: none, name: No insert, cost: 0, default: true}
      - {id: gift, name: Gift, cost: 1.0, max_per_customer: {count: 1, days: 365}}
rules:
  - when: {order_value: {min: 0}}
    choose: {insert: gift}
"""


@pytest.mark.slow
def test_a_contact_cap_holds_across_two_workers(tmp_path, db_url):
    """40 customers place 20 orders each, all at once, on two workers: the gift (one per customer a
    year) reaches each customer once. On PostgreSQL 19 of 40 customers got it twice, when the
    commit's check of the customer's history ran beside the other worker's uncommitted decision."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CAPPED_CATALOG)
    bodies = [order(f"{c}-{i}", customer=f"c-{c}") for c in range(40) for i in range(20)]  # a customer's 20 at once
    with Server(tmp_path, catalog, workers=2, db_url=db_url, db_deadline_ms=LOADED_MACHINE_DEADLINE_MS) as server, \
            httpx.Client(base_url=server.url, headers=auth(DECIDE), timeout=60,
                         limits=httpx.Limits(max_connections=64)) as client, \
            ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(lambda body: client.post("/v1/recommendations", json=body).status_code, bodies))
    assert Counter(statuses) == {200: len(bodies)}
    gifts = Counter(customer for customer, box in query(db_url, "SELECT customer_id, box_json FROM decisions")
                    if json.loads(box)["insert"][0] == "gift")
    assert len(gifts) == 40 and set(gifts.values()) == {1}


def logged_once(db_url: str, order_ids: set[str], timeout: float = 30.0) -> dict[str, list[str]]:
    """The log's decision ids per order id, once every one of ``order_ids`` is in it (the workers
    replay their spools) or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        rows: dict[str, list[str]] = {}
        for order_id, decision_id in query(db_url, "SELECT order_id, decision_id FROM decisions"):
            rows.setdefault(order_id, []).append(decision_id)
        if order_ids <= set(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


@pytest.mark.slow
def test_postgresql_stopped_mid_load_loses_no_acknowledged_decision(tmp_path, postgres_cluster):
    """PostgreSQL stopped (pg_ctl stop -m fast) under load from 4 clients on 2 workers, for 3 s,
    then started again: every order keeps getting an answer (no 5xx; from the rules, policy
    fallback, while it is down) and every acknowledged decision ends up in the log exactly once."""
    name = postgres_cluster.database()
    db_url = postgres_cluster.url(name)
    acknowledged: dict[str, dict] = {}
    statuses: Counter = Counter()
    stop = threading.Event()

    def fire(worker: int, url: str) -> None:
        with httpx.Client(base_url=url, headers=auth(DECIDE), timeout=10) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = client.post("/v1/recommendations", json=order(f"{worker}-{i}"))
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    acknowledged[r.json()["order_id"]] = r.json()
                time.sleep(0.005)

    try:
        with Server(tmp_path, EXAMPLE_CATALOG, workers=2, db_url=db_url) as server:
            threads = [threading.Thread(target=fire, args=(w, server.url)) for w in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.5)
            before = len(acknowledged)
            postgres_cluster.halt()
            try:
                time.sleep(3.0)
                during = len(acknowledged) - before
                ready = httpx.get(server.url + "/readyz", timeout=5)
            finally:
                postgres_cluster.resume()
            time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            rows = logged_once(db_url, set(acknowledged))
            metrics = httpx.get(server.url + "/metrics", timeout=5).text
    finally:
        stop.set()
        postgres_cluster.drop(name)
    assert set(statuses) == {200}, statuses
    assert before > 20 and during > 20, (before, during)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    fallback = [o for o, body in acknowledged.items() if body["policy"] == "fallback"]
    assert len(fallback) >= during / 2
    missing = set(acknowledged) - set(rows)
    assert not missing, f"{len(missing)} acknowledged decisions not in the log"
    assert {order_id: len(ids) for order_id, ids in rows.items() if len(ids) != 1} == {}
    spooled = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("insertrec_spooled_decisions_total"))
    assert spooled >= len(fallback) * 0.99 and spooled > 0
    as_answered = sum(rows[o] == [acknowledged[o]["decision_id"]] for o in acknowledged)
    print(f"acknowledged {len(acknowledged)} ({before} before the stop, {during} in 3 s down), "
          f"fallback {len(fallback)}, spooled {spooled:.0f}, logged as answered {as_answered}")


@pytest.mark.slow
def test_sigkill_during_an_outage_then_a_restart_replays_the_spool(tmp_path):
    """The log unwritable (its writer-lock held past the deadline), 20 orders answered from the
    spool, the server SIGKILLed; restarted, its workers adopt the dead workers' spool segments and,
    once the log is free, every acknowledged decision is in it exactly once, as answered."""
    db = tmp_path / "log.db"
    with Server(tmp_path, EXAMPLE_CATALOG, workers=2) as server, \
            httpx.Client(base_url=server.url, headers=auth(DECIDE), timeout=10) as client:
        assert client.post("/v1/recommendations", json=order(0)).status_code == 200
        fd = os.open(f"{db}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            answers = {f"o-{i}": client.post("/v1/recommendations", json=order(i)) for i in range(1, 21)}
            server.kill()
            assert {r.status_code for r in answers.values()} == {200}
            assert {r.json()["policy"] for r in answers.values()} == {"fallback"}
            assert list(tmp_path.joinpath("spool").glob("*.spool"))
            again = Server(tmp_path, EXAMPLE_CATALOG, workers=2).start()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    try:
        rows = logged_once(f"sqlite:///{db}", set(answers))
    finally:
        again.stop()
    assert {o: ids for o, ids in rows.items()} == {
        "o-0": rows["o-0"], **{o: [r.json()["decision_id"]] for o, r in answers.items()}}
    assert not list(tmp_path.joinpath("spool").glob("*.spool"))
