"""The decision log's group commit: decisions share a transaction, yet each fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from serving_helpers import ADMIN, DECIDE, KEYS, POISON, SCARCE_CATALOG, PickyModel, auth, order, query, settings

from insertrec.catalog import Catalog
from insertrec.cli import main
from insertrec.engine import Engine
from insertrec.serving.app import create_app
from insertrec.serving.decisionlog import CustomerMoved, DecisionLog, Entry, OrderConflict, OutOfStock, Recorded
from insertrec.serving.settings import Settings


def entry(order_id: str, customer: str, last_id: int = 0, limited: tuple[str, ...] = ()) -> Entry:
    return Entry(f"d-{order_id}-{last_id}", order_id, customer, 0, "v1", "model",
                 '{"order_id":"%s"}' % order_id, {"insert": ("sample" if limited else "none", 0.9)},
                 '{"answer":"%s"}' % order_id, last_id, 0, limited)


def log_with_stock(tmp_path: Path, stock: int, db_url: str | None = None, deadline_ms: int = 50) -> DecisionLog:
    path = tmp_path / "catalog.yaml"
    path.write_text(SCARCE_CATALOG.replace("stock: 5", f"stock: {stock}"))
    log = DecisionLog(db_url or f"sqlite:///{tmp_path / 'log.db'}", deadline_ms=deadline_ms)
    log.create()
    log.sync_inventory(Catalog.load(path))
    return log


def test_each_decision_of_a_group_fails_alone(tmp_path, db_url):
    log = log_with_stock(tmp_path, stock=1, db_url=db_url)
    try:
        results = log.record_many([
            entry("o-1", "c-1", limited=("sample",)),   # takes the last sample
            entry("o-2", "c-2", limited=("sample",)),   # none left
            entry("o-1", "c-9"),                        # o-1 again, for another customer: refused, nothing used
            entry("o-3", "c-1"),                        # decided without knowing o-1 of the same customer
            entry("o-4", "c-4"),
        ])
        assert isinstance(results[0], Recorded) and results[0].row_id is not None
        assert isinstance(results[1], OutOfStock) and results[1].action_id == "sample"
        assert isinstance(results[2], OrderConflict) and results[2].what == "customer_id"
        assert isinstance(results[3], CustomerMoved)
        assert isinstance(results[4], Recorded) and results[4].row_id is not None
        # knowing o-1, the customer's next order goes through
        o3, = log.record_many([entry("o-3", "c-1", last_id=results[0].row_id)])
        assert isinstance(o3, Recorded) and o3.row_id is not None
        # o-1 again, as it was: its stored answer, nothing used
        assert log.record_many([entry("o-1", "c-1", last_id=o3.row_id)]) == [Recorded('{"answer":"o-1"}', None)]
        assert log.counters()["sample"]["used"] == 1
    finally:
        log.close()
    logged = [r[0] for r in query(db_url, "SELECT order_id FROM decisions ORDER BY id")]
    assert logged == ["o-1", "o-4", "o-3"]


def test_concurrent_requests_share_commits_and_never_oversell(tmp_path, db_url):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    app = create_app(settings(tmp_path, catalog, db_url=db_url))
    # 40 orders at once: 30 customers, one of whom places 10 of them (contact cap: one coupon in 30 days)
    bodies = [order(i, customer="same" if i < 10 else None) for i in range(40)]

    async def run() -> tuple[list[httpx.Response], str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=auth(DECIDE)) as c:
                responses = await asyncio.gather(*(c.post("/v1/recommendations", json=b) for b in bodies))
                return list(responses), (await c.get("/metrics")).text

    responses, metrics = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 40
    boxes = [r.json()["slots"] for r in responses]
    assert [b["insert"]["action_id"] for b in boxes].count("sample") == 5          # stock 5
    assert [b["coupon"]["action_id"] for b in boxes].count("ten_off") == 3         # budget 9 at 3
    assert [b["coupon"]["action_id"] for b in boxes[:10]].count("ten_off") <= 1    # the cap holds
    assert query(db_url, "SELECT count(*), count(DISTINCT order_id) FROM decisions") == [(40, 40)]
    groups = float(re.search(r"^insertrec_commit_group_size_count (\S+)$", metrics, re.M).group(1))
    assert groups < 40  # decisions made in the same turn of the event loop were committed together


def test_a_worker_keeps_its_customers_current_with_what_other_workers_logged(tmp_path, db_url):
    """Worker B keeps a customer's state; worker A then decides their next order and logs an NPS
    answer. B's next order of that customer is decided knowing both (on SQLite from the log's
    tail, elsewhere by the customer's own query), so its commit finds nothing it missed: no redo."""
    a, b = (create_app(settings(tmp_path, db_url=db_url)) for _ in range(2))
    feedback = {"Authorization": f"Bearer {ADMIN}"}

    async def run() -> tuple[list[int], str]:
        async with a.router.lifespan_context(a), b.router.lifespan_context(b):
            clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                         headers=auth(DECIDE)) for app in (a, b)]
            on_a, on_b = clients
            statuses = [(await on_b.post("/v1/recommendations", json=order(1, customer="kept"))).status_code]
            for i in range(2, 5):   # others' orders, so that B's tail has rows it does not keep too
                statuses.append((await on_a.post("/v1/recommendations", json=order(i))).status_code)
            statuses.append((await on_a.post("/v1/recommendations", json=order(5, customer="kept"))).status_code)
            statuses.append((await on_a.post("/v1/outcomes", json={"order_id": "o-5", "type": "nps", "score": 1},
                                             headers=feedback)).status_code)
            statuses.append((await on_b.post("/v1/recommendations", json=order(6, customer="kept"))).status_code)
            metrics = (await on_b.get("/metrics")).text
            for client in clients:
                await client.aclose()
            service = b.state.service
            known = service._known.get(service.holder.current, "kept")   # B folded the answer in
            return statuses + [known.last_outcome > 0], metrics

    results, metrics = asyncio.run(run())
    assert results == [200] * 7 + [True]
    assert 'insertrec_decision_retries_total{reason="customer"}' not in metrics   # no redo
    assert query(db_url, "SELECT count(*) FROM decisions WHERE customer_id = 'kept'") == [(3,)]


def test_the_wal_is_rewound_once_it_passes_its_limit_and_its_file_never_truncated(tmp_path):
    """Checkpoints that run beside writers never let SQLite rewind the WAL; past the limit the
    checkpointer takes the writers' turn and rewinds it, so that writers start the file over.
    It does not truncate the file: freeing its blocks inside the writers' turn stalled every
    worker for tens of milliseconds (issue #12, the open loop's p99)."""
    log = log_with_stock(tmp_path, stock=1)
    wal = tmp_path / "log.db-wal"

    def frames() -> int:   # what the WAL holds (a passive checkpoint's count), not its file's size
        with contextlib.closing(sqlite3.connect(tmp_path / "log.db")) as conn:
            return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]

    try:
        for i in range(200):   # a commit each, as a worker under light load makes them
            log.record_many([entry(f"o-{i}", f"c-{i}")])
        size, full = wal.stat().st_size, frames()
        assert full > 200
        log.start_checkpoints(every_seconds=0.02, wal_limit_bytes=0)
        deadline, written, held = time.monotonic() + 10, 0, full
        while not 0 <= held <= full // 10 and time.monotonic() < deadline:   # -1: a checkpoint was busy
            assert isinstance(log.record_many([entry(f"o-after-{written}", f"c-after-{written}")])[0], Recorded)
            written += 1
            time.sleep(0.02)
            held = frames()
        assert 0 <= held <= full // 10   # rewound: writers carried on from the file's start
        assert wal.stat().st_size == size
    finally:
        log.close()
    with sqlite3.connect(tmp_path / "log.db") as conn:
        assert conn.execute("SELECT count(*) FROM decisions").fetchone() == (200 + written,)


def test_rewinding_the_wal_never_holds_the_writers_turn_waiting_for_a_reader(tmp_path):
    """A reader mid-read keeps the WAL from being rewound; the checkpointer then tries again next
    round instead of waiting for it (SQLite's busy handler, for up to the log's deadline) while
    every writer waits for the turn it holds."""
    log = log_with_stock(tmp_path, stock=1, deadline_ms=1000)
    try:
        for i in range(50):
            log.record_many([entry(f"o-{i}", f"c-{i}")])
        with contextlib.closing(sqlite3.connect(tmp_path / "log.db", isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM decisions").fetchone()   # holds its snapshot of the WAL
            log.start_checkpoints(every_seconds=0.01, wal_limit_bytes=0)
            slowest = 0.0
            for i in range(30):
                started = time.monotonic()
                assert isinstance(log.record_many([entry(f"o-r-{i}", f"c-r-{i}")])[0], Recorded)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.01)
            reader.execute("COMMIT")
        assert slowest < 0.3, f"a commit waited {slowest * 1000:.0f} ms for the checkpointer's turn"
    finally:
        log.close()


THREADS_SCRIPT = r'''
import sys, threading
sys.path.insert(0, sys.argv[2])
from test_decisionlog import entry, log_with_stock
from pathlib import Path
log = log_with_stock(Path(sys.argv[1]), stock=50)
results = []
def work(t):
    for i in range(300):
        log.generation(); log.exhausted(); log.events(f"c-{t}", 0)
        results.extend(log.record_many([entry(f"o-{t}-{i}", f"c-{t}-{i}", limited=("sample",) if i % 5 == 0 else ())]))
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(r.__class__.__name__ == "Recorded" for r in results), log.counters()["sample"]["used"])
'''


def test_one_log_shared_by_threads_neither_crashes_nor_loses_a_decision(tmp_path):
    """The service calls the log from one thread, but test clients, watchers and operators' scripts
    may not: four threads reading and writing through one DecisionLog at once crashed the process
    (SIGSEGV on the shared read cursor) before each connection got its lock. Run in a child process
    so that a crash is a failed test, not a dead test run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    recorded, used = map(int, done.stdout.split())
    assert (recorded, used) == (4 * 300 - (4 * 60 - 50), 50)   # 240 ask for the sample; 50 in stock


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A model trained on a small simulated shop: its customer snapshot ends on 2024-12-30."""
    root = tmp_path_factory.mktemp("shop")
    assert main(["demo-data", "--out", str(root / "data"), "--customers", "300", "--seed", "5"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "model"), "--no-mlflow"]) == 0
    return root / "model"


BACK_DATED = "2024-06-01T00:00:00Z"   # before the snapshot's end
LATE_2025, EARLY_2025 = "2025-03-01T00:00:00Z", "2025-02-01T00:00:00Z"


def test_a_back_dated_order_is_decided_and_never_blocks_the_customer(tmp_path, db_url, small_model):
    """A late import or a time-zone slip puts an order before the model's snapshot end, or before the
    customer's latest order: it is decided from what is known, and the customer's later orders
    (single or in a batch) are decided too. Before, every later order of the customer got 503."""
    s = Settings.load(environ={}, model=str(small_model), db_url=db_url, api_keys=KEYS)
    with TestClient(create_app(s)) as c:
        post = lambda body: c.post("/v1/recommendations", json=body, headers=auth(DECIDE))
        statuses = [post(order(i, customer="c000001", order_ts=ts)).status_code
                    for i, ts in enumerate([BACK_DATED, None, LATE_2025, EARLY_2025, None])]
        batch = c.post("/v1/recommendations:batch", headers=auth(DECIDE), json={"orders": [
            order(f"b{i}", customer="c000002", order_ts=ts) for i, ts in enumerate([None, BACK_DATED, None])]})
        again = post(order("after-batch", customer="c000002"))
    assert statuses == [200] * 5
    assert [r["status"] for r in batch.json()["results"]] == [200] * 3
    assert again.status_code == 200
    assert query(db_url, "SELECT count(*) FROM decisions") == [(9,)]


def test_workers_starting_together_on_a_fresh_database_all_start(tmp_path, db_url):
    """Every worker creates the tables and the stock counters at startup. On a fresh PostgreSQL
    database two of them inserted the same counter row and one failed on the primary key, which
    stopped the whole server (1 start in 13); here eight start at once, each with its own log."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    barrier, failures = threading.Barrier(8), []

    def start() -> None:
        log = DecisionLog(db_url)
        try:
            barrier.wait(timeout=30)
            log.create()
            log.sync_inventory(Catalog.load(catalog))
        except Exception as exc:  # any failure fails the test
            failures.append(repr(exc))
        finally:
            log.close()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    assert sorted(query(db_url, "SELECT action_id, used FROM inventory")) == [("sample", 0), ("ten_off", 0)]


def test_a_fresh_sqlite_file_briefly_held_by_another_reader_still_starts(tmp_path):
    """Turning a fresh SQLite file to WAL needs it to itself. A worker whose neighbour (or a
    backup, or a person with the sqlite3 shell) held it for longer than the request deadline
    failed to start with "cannot create tables"; it now waits within the setup deadline."""
    path, ready = tmp_path / "log.db", threading.Event()

    def hold() -> None:
        holder = sqlite3.connect(path, isolation_level=None)   # a rollback journal, as a fresh file has
        holder.execute("CREATE TABLE other (x)")
        holder.execute("BEGIN")
        holder.execute("SELECT * FROM other").fetchall()        # a shared lock, for 0.3 s
        ready.set()
        time.sleep(0.3)
        holder.execute("COMMIT")
        holder.close()

    holder = threading.Thread(target=hold)
    holder.start()
    ready.wait(timeout=10)
    log = DecisionLog(f"sqlite:///{path}", deadline_ms=50)
    try:
        log.create()
    finally:
        log.close()
        holder.join(timeout=10)
    assert query(f"sqlite:///{path}", "PRAGMA journal_mode") == [("wal",)]


def test_a_reused_order_id_with_another_customer_or_body_is_a_conflict(tmp_path, db_url):
    """A retry (the same body) gets the stored decision; the same order_id with another customer or
    body is 409 naming the conflict, single or in a batch. Before, it got the other order's decision."""
    with TestClient(create_app(settings(tmp_path, db_url=db_url))) as c:
        post = lambda body: c.post("/v1/recommendations", json=body, headers=auth(DECIDE))
        first = post(order(1))
        assert post(order(1)).text == first.text
        other_customer, other_body = post(order(1, customer="someone-else")), post(order(1, order_value=999.0))
        batch = c.post("/v1/recommendations:batch", headers=auth(DECIDE),
                       json={"orders": [order(1), order(1, order_value=7.0), order(2)]}).json()["results"]
    for r, what in ((other_customer, "customer_id"), (other_body, "body")):
        assert r.status_code == 409 and r.json()["error"]["field"] == "order_id"
        assert f"different {what}" in r.json()["error"]["reason"]
    assert [r["status"] for r in batch] == [200, 409, 200]
    assert batch[0]["decision"] == first.json() and "different body" in batch[1]["error"]["reason"]
    assert query(db_url, "SELECT count(*) FROM decisions") == [(2,)]


def test_a_batch_entry_that_is_not_an_object_fails_alone(tmp_path, db_url):
    with TestClient(create_app(settings(tmp_path, db_url=db_url))) as c:
        r = c.post("/v1/recommendations:batch", headers=auth(DECIDE),
                   json={"orders": [order(1), "not an order", None, 7, order(2)]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 422, 422, 422, 200]
    assert [x["error"]["field"] for x in results[1:4]] == ["orders.1", "orders.2", "orders.3"]
    assert all(x["error"]["reason"] for x in results[1:4])


def test_a_log_from_before_body_fingerprints_gains_the_column(tmp_path, db_url):
    log = log_with_stock(tmp_path, stock=1, db_url=db_url)
    try:
        first, = log.record_many([entry("o-old", "c-1")])
        with sa.create_engine(db_url).begin() as conn:
            conn.exec_driver_sql("ALTER TABLE decisions DROP COLUMN body_sha256")
        log.close()
        log = DecisionLog(db_url)
        log.create()
        stored, new = log.record_many([replace(entry("o-old", "c-1", first.row_id), body_sha256="b" * 64),
                                       replace(entry("o-new", "c-2"), body_sha256="a" * 64)])
        assert stored == Recorded('{"answer":"o-old"}', None)   # logged without a fingerprint: a retry
        assert isinstance(new, Recorded) and new.row_id is not None
    finally:
        log.close()
    assert query(db_url, "SELECT order_id, body_sha256 FROM decisions ORDER BY id") == [("o-old", None),
                                                                                       ("o-new", "a" * 64)]


@contextlib.contextmanager
def writer_held(db_url: str, tmp_path: Path, how: str) -> Iterator[None]:
    """Another process's hold on the log's writing: SQLite's writer-lock file or its own write lock,
    a PostgreSQL session's exclusive lock on the decisions table. Released after 5 s at the latest,
    so that a service without deadlines makes this test fail rather than hang."""
    if how == "writer-lock":
        fd = os.open(f"{tmp_path / 'log.db'}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        timer = threading.Timer(5, fcntl.flock, (fd, fcntl.LOCK_UN))
        release = lambda: (timer.cancel(), fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd))
    else:
        conn = sa.create_engine(db_url).connect()
        conn.exec_driver_sql("BEGIN IMMEDIATE" if db_url.startswith("sqlite") else
                             "BEGIN; LOCK TABLE decisions IN EXCLUSIVE MODE")
        timer = threading.Timer(5, conn.rollback)
        release = lambda: (timer.cancel(), conn.rollback(), conn.close())
    timer.start()
    try:
        yield
    finally:
        release()


def spool_replayed(c: TestClient, timeout: float = 15.0) -> bool:
    """Wait until the worker has replayed its spool into the log and uses the log again."""
    service = c.app.state.service
    deadline = time.monotonic() + timeout
    while (len(service.spool) or service.log_down) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not len(service.spool) and service.log_down is None


@pytest.mark.parametrize("how", ["writer-lock", "database lock"])
def test_a_held_write_lock_costs_a_request_its_deadline_and_the_answer_is_spooled(tmp_path, db_url, how):
    """A writer that does not let go (a stopped process, an operator's script, a long transaction)
    costs a decision at most ``db_deadline_ms``: it is answered from the rules (policy fallback,
    no counted action) and spooled; the worker answers other requests meanwhile, the same order
    asked again gets the same answer, and once the lock is free every answered decision is in the
    log exactly once, as answered. Before the spool, each was a 503; before the deadline, the
    request and the worker waited as long as the lock was held."""
    if how == "writer-lock" and not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL queues writers itself: no writer-lock file")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SCARCE_CATALOG)
    with TestClient(create_app(settings(tmp_path, catalog, db_url=db_url, db_deadline_ms=50))) as c:
        post = lambda i: c.post("/v1/recommendations", json=order(i), headers=auth(DECIDE))
        assert post(0).status_code == 200   # tables created, connections open
        with writer_held(db_url, tmp_path, how):
            started = time.monotonic()
            held = [post(i) for i in range(1, 11)]
            waited = time.monotonic() - started
            again = post(3)
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            for i in range(12, 16):   # replay rounds that find the log still held: no new spool file each
                time.sleep(0.6)
                assert post(i).json()["policy"] == "fallback"
            assert len(list((tmp_path / "spool").glob("*.spool"))) <= 2
        assert [r.status_code for r in held] == [200] * 10
        assert {r.json()["policy"] for r in held} == {"fallback"}
        assert {r.json()["slots"]["insert"]["action_id"] for r in held} == {"none"}        # stock: not checked
        assert {r.json()["slots"]["coupon"]["action_id"] for r in held} == {"no_coupon"}   # budget and cap
        assert again.text == held[2].text and again.headers["Idempotent-Replayed"] == "true"
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert waited < 2.0, f"waited {waited:.2f} s for a lock with a 50 ms deadline"
        assert spool_replayed(c)
        after = post(16)
        assert after.status_code == 200 and after.json()["policy"] != "fallback"
        assert c.get("/readyz").json()["status"] == "ready"
    logged = dict(query(db_url, "SELECT order_id, response_json FROM decisions"))
    assert len(query(db_url, "SELECT order_id FROM decisions")) == len(logged) == 16   # o-0 .. o-10, o-12 .. o-16, once each
    assert all(same_json(logged[f"o-{i}"], held[i - 1].text) for i in range(1, 11))


def same_json(a: str, b: str) -> bool:
    return json.loads(a) == json.loads(b)


def test_a_postgresql_that_stops_answering_costs_a_request_its_deadline(tmp_path, db_url):
    """The service's PostgreSQL sessions stopped (SIGSTOP, as a frozen server or a cut network looks
    from the client): a decision is answered from the rules and spooled within its deadline and
    /healthz answers, where before every request and /healthz hung as long as the server did; once
    it answers, the spool is replayed and the service decides with the log again."""
    if db_url.startswith("sqlite"):
        pytest.skip("a SQLite file cannot stop answering; its waits are the lock deadlines above")
    with TestClient(create_app(settings(tmp_path, db_url=db_url, db_deadline_ms=50))) as c:
        post = lambda i: c.post("/v1/recommendations", json=order(i), headers=auth(DECIDE))
        assert post(0).status_code == 200
        sessions = [pid for pid, in query(db_url, "SELECT pid FROM pg_stat_activity "
                                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")]
        resume = lambda: [os.kill(pid, signal.SIGCONT) for pid in sessions]
        timer = threading.Timer(5, resume)   # never left stopped, whatever happens here
        for pid in sessions:
            os.kill(pid, signal.SIGSTOP)
        timer.start()
        try:
            started = time.monotonic()
            frozen = post(1)
            waited = time.monotonic() - started
            alive = c.get("/healthz").status_code
        finally:
            timer.cancel()
            resume()
        assert sessions and frozen.status_code == 200 and frozen.json()["policy"] == "fallback" and alive == 200
        assert waited < 2.0, f"waited {waited:.2f} s on a stopped server with a 50 ms deadline"
        assert spool_replayed(c)
        assert post(2).json()["policy"] != "fallback"
    assert sorted(query(db_url, "SELECT order_id FROM decisions")) == [("o-0",), ("o-1",), ("o-2",)]


def _decide_each(app, bodies: list[dict], together: bool) -> tuple[list[httpx.Response], str]:
    """``bodies`` posted all at once (``together``) or one after the other, and the metrics after."""
    async def run() -> tuple[list[httpx.Response], str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=auth(DECIDE)) as c:
                post = lambda body: c.post("/v1/recommendations", json=body)
                responses = list(await asyncio.gather(*map(post, bodies))) if together else \
                    [await post(body) for body in bodies]
                return responses, (await c.get("/metrics")).text
    return asyncio.run(run())


def _batches(metrics: str) -> tuple[float, float]:
    """How many micro-batches the worker decided, and how many orders in them."""
    count, total = (float(re.search(rf"^insertrec_decide_batch_size_{what} (\S+)$", metrics, re.M).group(1))
                    for what in ("count", "sum"))
    return count, total


def test_orders_decided_together_get_the_answers_each_gets_alone(tmp_path, db_url, small_model):
    """Orders in flight at once are decided in micro-batches; every answer (box, propensities,
    reasons, alternatives and their scores) is the one the same order gets sent on its own. One
    customer's three orders among them are still decided in turn, each knowing the one before."""
    bodies = [order(i, customer=f"c{1 + (i if i < 25 else 0):06d}", order_ts=LATE_2025, order_value=20.0 + 7 * i,
                    channel=("web", "app")[i % 2]) for i in range(27)]
    answers = {}
    for together in (True, False):
        s = Settings.load(environ={}, model=str(small_model), api_keys=KEYS, spool_dir=str(tmp_path / f"spool{together}"),
                          db_url=db_url if together else f"sqlite:///{tmp_path / 'alone.db'}")
        responses, metrics = _decide_each(create_app(s), bodies, together)
        assert [r.status_code for r in responses] == [200] * len(bodies)
        answers[together] = [{k: v for k, v in r.json().items() if k != "decision_id"} for r in responses]
        count, total = _batches(metrics)
        assert total == len(bodies) and (count < total) == together
    assert answers[True] == answers[False]
    assert {a["policy"] for a in answers[True]} >= {"model"}
    assert 'reason="customer"' not in metrics   # the same customer's orders were never decided side by side


@pytest.mark.parametrize("nan", [False, True])
def test_a_model_failing_on_one_order_of_a_batch_fails_only_that_order(tmp_path, small_model, nan):
    """One order the model fails on (raising, or a score that is not finite), decided together with
    others: it alone is answered from the rules (``fallback``); the others are the model's."""
    s = Settings.load(environ={}, model=str(small_model), db_url=f"sqlite:///{tmp_path / 'log.db'}",
                      api_keys=KEYS, spool_dir=str(tmp_path / "spool"))
    app = create_app(s)
    engine = Engine.load(small_model)
    bodies = [order(i, customer=f"c{1 + i:06d}", order_value=POISON if i == 5 else 30.0 + i) for i in range(12)]

    async def run() -> tuple[list[httpx.Response], str]:
        async with app.router.lifespan_context(app):
            holder = app.state.service.holder
            holder.current = replace(holder.current, engine=PickyModel(
                engine.policy, engine.params, engine.snapshot, engine.segments, engine.manifest, nan=nan))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=auth(DECIDE)) as c:
                responses = await asyncio.gather(*(c.post("/v1/recommendations", json=b) for b in bodies))
                return list(responses), (await c.get("/metrics")).text

    responses, metrics = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert [r.json()["policy"] == "fallback" for r in responses] == [i == 5 for i in range(len(bodies))]
    count, total = _batches(metrics)
    assert count < total   # decided in batches, not one by one
