"""The real server in processes: no acknowledged decision lost to SIGKILL, no oversell across workers."""

from __future__ import annotations

import json
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
