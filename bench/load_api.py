"""Throughput and latency of POST /v1/recommendations beside a hand-built peer and a no-op endpoint.

Starts, each on 127.0.0.1 with uvicorn and the same worker count:
  (a) the real service (`insertrec.serving.app.run`), decision log on a temp SQLite file;
  (b) a no-op FastAPI app whose POST /v1/recommendations validates the same body
      (`OrderIn`, FastAPI's usual typed-body way) and returns a constant;
  (p) the hand-built peer, what a team would write in an afternoon instead of
      insertrec (issue #12): FastAPI, the same `OrderIn` body, a NumPy linear
      score over every box of the catalog (all joint packaging x insert x
      coupon combinations; fixed random weights of the right shape), and one
      durable SQLite insert and commit per request (WAL, synchronous NORMAL);
  (c) with --fixed-decision, the real service with the model taken out: every
      request answered with one real decision made once (its order id changed),
      but the customer's state still read from the log, the decision still
      committed durably and the response still built. Its ratio to (b) is the
      most any model, however fast, could reach on this service.
All are loaded with wrk (C, Lua request script: every request a new order_id,
customers recurring so the service folds their history), at the same
connections for the same duration, alternating the arms `--rounds` times so
that a noisy shared machine hits all alike. Besides requests per second it
records the servers' own CPU time per request (all worker processes, from
/proc), which other work on the machine does not inflate: the ratio of the
two CPU costs is what the throughput ratio would be on a machine of its own.

Then each arm is offered an open-loop load (`--rate`, default 500 orders/s,
for `--open-duration` seconds): requests leave on a fixed schedule whatever
the server's pace, and each latency is measured from its scheduled send time,
so a stalled server is charged for the requests it held up (no coordinated
omission; wrk2 is not in Debian, so the schedule is kept by `open_loop` here).
Every request slower than 10 ms is listed with its send time, so that with `--stall-probe DIR`
(every server run with bench/stallprobe, which records what each process did when slow)
bench/stall_report.py can say what the servers were doing then. `--rounds 0` skips the closed
loop; `--open-rounds N` repeats the open loop, the arms alternating.
Prints and writes bench/results/load_api.json.

Usage: python bench/load_api.py [--model DIR] [--workers 2] [--connections 64] [--duration 10] [--rate 500]
       [--open-rounds 3] [--stall-probe DIR]
Needs `wrk` (Debian: apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from insertrec.catalog import Catalog
from insertrec.serving.payloads import OrderIn

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789abcdef"
noop_app = FastAPI()


@noop_app.post("/v1/recommendations")
async def noop(order: OrderIn) -> dict[str, str]:
    return {"order_id": order.order_id}


@noop_app.get("/readyz")
async def noop_ready() -> dict[str, str]:
    return {"status": "ready"}


def fixed_decision_app() -> FastAPI:
    """Arm (c), each worker's factory: the service's own app, its model's decision replaced by
    one decision made once by that model and reused (its order id changed)."""
    from dataclasses import replace

    from insertrec.decide import Decider
    from insertrec.serving.app import app_from_env

    made: dict[str, Any] = {}
    model_decide = Decider.decide

    def decide(self, order, state=None, unavailable=frozenset()):
        if "decision" not in made:
            made["decision"] = model_decide(self, order, state, unavailable)
        return replace(made["decision"], order_id=order["order_id"])

    def decide_many(self, orders, states, unavailable):
        return [decide(self, *args) for args in zip(orders, states, unavailable)]

    Decider.decide, Decider.decide_many = decide, decide_many
    return app_from_env()


def serve_fixed_decision(port: int, workers: int) -> None:
    """Start arm (c) as `insertrec serve` would, from the INSERTREC_* environment."""
    import uvicorn

    from insertrec.serving.decisionlog import DecisionLog
    from insertrec.serving.logs import uvicorn_log_config
    from insertrec.serving.settings import Settings

    log = DecisionLog(Settings.load().db_url)
    log.create()
    log.close()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="insertrec-bench-metrics-")
    uvicorn.run("load_api:fixed_decision_app", factory=True, app_dir=str(ROOT / "bench"), host="127.0.0.1",
                port=port, workers=workers, access_log=False, server_header=False,
                log_config=uvicorn_log_config("WARNING"), timeout_graceful_shutdown=10)


PEER_CHANNELS = ("web", "app", "store")
PEER_FEATURES = 8 + len(PEER_CHANNELS)


def peer_app() -> FastAPI:
    """Arm (p), each worker's factory: the hand-built peer. Its catalog is $BENCH_PEER_CATALOG,
    its log the SQLite file $BENCH_PEER_DB (created by `serve_peer`)."""
    catalog = Catalog.load(os.environ["BENCH_PEER_CATALOG"])
    boxes = list(itertools.product(*(slot.action_ids for slot in catalog.slots.values())))
    slots = list(catalog.slots)
    weights = np.random.default_rng(0).normal(size=(PEER_FEATURES, len(boxes)))
    db = sqlite3.connect(os.environ["BENCH_PEER_DB"], timeout=5, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    app = FastAPI()

    @app.post("/v1/recommendations")
    async def recommend(order: OrderIn) -> dict[str, Any]:
        categories = order.categories or []
        x = np.array([1.0, order.order_value / 100, math.log1p(order.order_value), order.n_items or 1.0,
                      float(bool(order.is_gift)), len(categories), float(order.returned_value or 0.0),
                      float(order.region is not None), *(order.channel == c for c in PEER_CHANNELS)])
        scores = x @ weights
        best = int(np.argmax(scores))
        decision_id = str(uuid.uuid4())
        box = dict(zip(slots, boxes[best]))
        db.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                   (decision_id, order.order_id, order.customer_id, order.model_dump_json(), json.dumps(box),
                    float(scores[best])))
        db.commit()
        return {"decision_id": decision_id, "order_id": order.order_id, "box": box, "score": float(scores[best])}

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def serve_peer(port: int, workers: int) -> None:
    """Start arm (p): its table created once, then uvicorn with the same settings as the others."""
    import uvicorn

    from insertrec.serving.logs import uvicorn_log_config

    with sqlite3.connect(os.environ["BENCH_PEER_DB"]) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS decisions (decision_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, "
                   "customer_id TEXT NOT NULL, body TEXT NOT NULL, box TEXT NOT NULL, score REAL NOT NULL)")
    uvicorn.run("load_api:peer_app", factory=True, app_dir=str(ROOT / "bench"), host="127.0.0.1",
                port=port, workers=workers, access_log=False, server_header=False,
                log_config=uvicorn_log_config("WARNING"), timeout_graceful_shutdown=10)


WRK_SCRIPT = r"""
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  n = 0
  tag = args[1] or "x"
end
function request()
  n = n + 1
  local body = string.format(
    '{"order_id":"%s-%d-%d","customer_id":"c-%d-%d","order_value":%d.5,"channel":"web",' ..
    '"categories":["apparel"],"n_items":2}', tag, tid, n, tid, n % 3000, 10 + n % 90)
  return wrk.format("POST", "/v1/recommendations", {
    ["Content-Type"] = "application/json", ["Authorization"] = "Bearer KEY"}, body)
end
""".replace("KEY", KEY)


def free_ports(names: list[str]) -> dict[str, int]:
    """A distinct free port per arm. Every socket is held until all are chosen: a port released and
    asked for again can come back, and it did (two arms got one port; the second arm's server could
    not bind it, the first answered its readiness check, and the run measured the first twice)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in names]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}


def start(cmd: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """Start a server and wait for its readiness; refused if the port already answers (the readiness
    check would then be another process's)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is already served by another process")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise SystemExit(f"server on port {port} not ready: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_seconds(group: int) -> float:
    """User + system CPU seconds of every live process in a process group (the server and its
    workers): CPU per request is a fair measure even when other work shares the machine."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:      # pgrp; utime and stime follow at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(port: int, connections: int, duration: float, script: Path, tag: str,
        server: subprocess.Popen | None = None) -> dict[str, float]:
    cpu_before = cpu_seconds(server.pid) if server is not None else 0.0
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/v1/recommendations", "--", tag],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    cpu = cpu_seconds(server.pid) - cpu_before if server is not None else math.nan
    return {"rps": rps, "p50_ms": pct["50"], "p90_ms": pct["90"], "p99_ms": pct["99"], "requests": total,
            "server_cpu_us_per_request": round(cpu / total * 1e6, 1),
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else ""}


def open_loop(port: int, rate: float, duration: float, tag: str, connections: int,
              server: subprocess.Popen | None = None, slow_ms: float = 10.0) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``duration`` s on a fixed schedule, whatever the server's pace;
    each latency runs from the request's scheduled send time (a request waiting for a free
    connection is charged the wait). Bodies as WRK_SCRIPT's: a new order_id each, customers recurring.

    The client's own cyclic garbage collector is off for the measured window (collected before and
    after): its full collections paused this loop 47-52 ms at a time (issue #12), delaying sends and
    reads, and every such pause was charged to the server as latency.

    Every request slower than ``slow_ms`` is listed (``slow``: its scheduled send time in unix
    seconds, its latency and how late the client sent it, in ms), to be lined up with what the
    servers recorded then (``--stall-probe``)."""
    cpu_before = cpu_seconds(server.pid) if server is not None else 0.0
    gc.collect()
    gc.disable()
    began = time.time()
    try:
        latencies, statuses, late, slow = asyncio.run(asyncio.wait_for(
            _open_loop(port, rate, duration, tag, connections, slow_ms / 1e3), timeout=duration + 60))
    finally:
        ended = time.time()
        gc.enable()
        gc.collect()
    cpu = cpu_seconds(server.pid) - cpu_before if server is not None else math.nan
    ms = np.sort(np.array(latencies)) * 1e3
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return {"offered_rps": rate, "requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms[-1]), 2), "non_2xx": len(ms) - ok,
            "sent_late_over_1ms": late, "server_cpu_us_per_request": round(cpu / len(ms) * 1e6, 1),
            "window_unix_s": [round(began, 3), round(ended, 3)],   # to line up with servers' own logs
            "slow": slow}


async def _open_loop(port: int, rate: float, duration: float, tag: str, connections: int,
                     slow_s: float) -> tuple[list[float], Counter, int, list[dict[str, float]]]:
    loop = asyncio.get_running_loop()
    wall = time.time() - loop.time()
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    statuses: Counter = Counter()
    slow: list[dict[str, float]] = []

    async def one(i: int, scheduled: float) -> None:
        sent = loop.time()
        reader, writer = await idle.get()
        body = (f'{{"order_id":"{tag}-{i}","customer_id":"c-{i % 2}-{i // 2 % 3000}","order_value":'
                f'{10 + i % 90}.5,"channel":"web","categories":["apparel"],"n_items":2}}').encode()
        writer.write(b"POST /v1/recommendations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        latencies.append(loop.time() - scheduled)
        if latencies[-1] > slow_s:
            slow.append({"scheduled_unix_s": round(wall + scheduled, 4), "ms": round(latencies[-1] * 1e3, 2),
                         "sent_late_ms": round((sent - scheduled) * 1e3, 2), "i": i})
        statuses[int(head.split(b" ", 2)[1])] += 1
        idle.put_nowait((reader, writer))

    start, late, tasks = loop.time() + 0.05, 0, []
    for i in range(int(rate * duration)):
        scheduled = start + i / rate
        if scheduled > loop.time():
            await asyncio.sleep(scheduled - loop.time())
        late += loop.time() - scheduled > 1e-3
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait()[1].close()
    return latencies, statuses, late, slow


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: rules only on the example catalog)")
    ap.add_argument("--catalog", default=str(ROOT / "tests" / "data" / "catalog_example.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop offered orders/s (0: skip)")
    ap.add_argument("--open-duration", type=float, default=10.0)
    ap.add_argument("--open-rounds", type=int, default=1,
                    help="open-loop windows per arm, the arms alternating (their p99s are listed, and the median)")
    ap.add_argument("--stall-probe", metavar="DIR", help="run every server with bench/stallprobe first on "
                    "PYTHONPATH, recording in DIR what each process did when slow (see bench/stall_report.py)")
    ap.add_argument("--fixed-decision", action="store_true",
                    help="also run the service with its model taken out (arm c): the ceiling for any model")
    ap.add_argument("--baseline-src", help="also run the service from this source tree (its src/ on "
                    "PYTHONPATH) as arm 'baseline': a change and its base side by side in one run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_api.json"))
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")

    tmp = Path(tempfile.mkdtemp(prefix="insertrec-bench-"))
    script = tmp / "orders.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "INSERTREC_API_KEYS": f"{KEY}:decide", "INSERTREC_CATALOG": args.catalog,
           "INSERTREC_DB_URL": f"sqlite:///{tmp / 'decisions.db'}", "INSERTREC_LOG_LEVEL": "WARNING",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           # a throughput benchmark, not a deadline test: on a loaded machine a group commit can miss
           # the default 50 ms, and the service then answers from the rules and spools (cheaper
           # decisions, a wrong figure); `fallbacks` below counts any that still happen
           "INSERTREC_DB_DEADLINE_MS": os.environ.get("INSERTREC_DB_DEADLINE_MS", "10000")}
    model = f"model={args.model!r}, " if args.model else ""
    peer_catalog = str(Path(args.model) / "catalog.yaml") if args.model else args.catalog
    ports = free_ports(["noop", "peer", "service", "baseline", "fixed_decision"])
    bench_import = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import load_api; load_api."
    commands = {
        "noop": [sys.executable, "-c", "import uvicorn; from insertrec.serving.logs import uvicorn_log_config; "
                 f"uvicorn.run('load_api:noop_app', app_dir={str(ROOT / 'bench')!r}, host='127.0.0.1', "
                 f"port={ports['noop']}, workers={args.workers}, access_log=False, server_header=False, "
                 "log_config=uvicorn_log_config('WARNING'), timeout_graceful_shutdown=10)"],
        "peer": [sys.executable, "-c", bench_import + f"serve_peer({ports['peer']}, {args.workers})"],
        "service": [sys.executable, "-c", "from insertrec.serving.app import run; "
                    f"run({model}port={ports['service']}, workers={args.workers})"],
        "baseline": [sys.executable, "-c", "from insertrec.serving.app import run; "
                     f"run({model}port={ports['baseline']}, workers={args.workers})"],
        "fixed_decision": [sys.executable, "-c",
                           bench_import + f"serve_fixed_decision({ports['fixed_decision']}, {args.workers})"],
    }
    envs = {"noop": env, "service": env,
            "peer": {**env, "BENCH_PEER_CATALOG": peer_catalog, "BENCH_PEER_DB": str(tmp / "peer.db")},
            "baseline": {**env, "INSERTREC_DB_URL": f"sqlite:///{tmp / 'baseline.db'}",
                         # first on the path, before the caller's entries (such as a sitecustomize probe)
                         "PYTHONPATH": os.pathsep.join([str(Path(args.baseline_src or ".") / "src"),
                                                        *filter(None, [os.environ.get("PYTHONPATH")])])},
            "fixed_decision": {**env, "INSERTREC_DB_URL": f"sqlite:///{tmp / 'fixed.db'}",
                               **({"INSERTREC_MODEL": args.model} if args.model else {})}}
    if args.stall_probe:
        Path(args.stall_probe).mkdir(parents=True, exist_ok=True)
        for name, arm_env in envs.items():
            path = [str(ROOT / "bench" / "stallprobe"), *filter(None, [arm_env.get("PYTHONPATH")])]
            envs[name] = {**arm_env, "STALLPROBE_DIR": str(Path(args.stall_probe).resolve()),
                          "STALLPROBE_ARM": name, "PYTHONPATH": os.pathsep.join(path)}
    names = (["noop", "peer", "service"] + (["baseline"] if args.baseline_src else [])
             + (["fixed_decision"] if args.fixed_decision else []))
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in names:
            procs[name] = start(commands[name], envs[name], ports[name], tmp / f"{name}.log")
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names:
                wrk(ports[name], args.connections, 2, script, f"warm{r}{name}")  # warm-up, discarded
                result = wrk(ports[name], args.connections, args.duration, script, f"run{r}{name}", procs[name])
                result["loadavg_1m_after"] = os.getloadavg()[0]
                runs[name].append(result)
                print(f"round {r + 1} {name:14s} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                      f"p99 {result['p99_ms']:.2f} ms  server CPU {result['server_cpu_us_per_request']:.0f} us/req  "
                      f"non-2xx {result['non_2xx']}  load {result['loadavg_1m_after']:.1f}", flush=True)
        windows: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.open_rounds if args.rate > 0 else 0):
            for name in names:
                window = open_loop(ports[name], args.rate, args.open_duration, f"open{r}{name}",
                                   args.connections, procs[name])
                window["loadavg_1m_after"] = os.getloadavg()[0]
                windows[name].append(window)
                print(f"open loop {args.rate:.0f}/s {name:14s} p50 {window['p50_ms']:.2f} ms  "
                      f"p99 {window['p99_ms']:.2f} ms  max {window['max_ms']:.0f} ms  "
                      f"server CPU {window['server_cpu_us_per_request']:.0f} us/req  "
                      f"non-2xx {window['non_2xx']}  load {window['loadavg_1m_after']:.1f}", flush=True)
        opened: dict[str, dict] = {name: ws[0] if len(ws) == 1 else {
            "p99_ms": statistics.median(w["p99_ms"] for w in ws), "p99_ms_windows": [w["p99_ms"] for w in ws],
            "max_ms_windows": [w["max_ms"] for w in ws], "windows": ws} for name, ws in windows.items() if ws}
        scraped = {name: httpx.get(f"http://127.0.0.1:{ports[name]}/metrics").text
                   for name in names if name in ("service", "baseline", "fixed_decision")}
        metrics = scraped["service"]
    finally:
        for proc in procs.values():
            stop(proc)

    summary = {name: {k: statistics.median(x[k] for x in rs)
                      for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_us_per_request")}
               for name, rs in runs.items() if rs}

    def ratios_to(base: str) -> dict[str, dict[str, float]]:
        return {name: {"rps": round(summary[name]["rps"] / summary[base]["rps"], 3),
                       "cpu_per_request": round(summary[base]["server_cpu_us_per_request"]
                                                / summary[name]["server_cpu_us_per_request"], 3)}
                for name in names if name != base and name in summary} if base in summary else {}

    to_peer, to_noop = ratios_to("peer"), ratios_to("noop")
    open_p99 = opened.get("service", {}).get("p99_ms", math.nan)
    stages = _stage_means(metrics)
    result = {"workers": args.workers, "connections": args.connections, "duration_s": args.duration,
              "rounds": args.rounds, "model": args.model or "rules only (example catalog)",
              "cpus": os.cpu_count(), "loadavg_before": load_before, "client": "wrk -t2 with a Lua body script",
              **summary, "ratios_to_peer": to_peer, "ratios_to_noop": to_noop,
              "open_loop": {"offered_rps": args.rate, "duration_s": args.open_duration,
                            "client": "bench/load_api.py open_loop (asyncio, fixed schedule)", **opened},
              "targets": {"ratio_to_peer_rps": 1.0, "open_loop_service_p99_ms": 15.0},
              "met": {"ratio_to_peer": to_peer["service"]["rps"] >= 1.0 if to_peer else None,
                      "open_loop_p99": open_p99 < 15.0},
              "service_stage_mean_us": stages, "fallbacks": {name: _fallbacks(text) for name, text in scraped.items()},
              "runs": runs}
    for name in summary:
        print(f"{name:14s} {summary[name]['rps']:6.0f} req/s, p50 {summary[name]['p50_ms']:.2f} ms, "
              f"p99 {summary[name]['p99_ms']:.2f} ms, server CPU {summary[name]['server_cpu_us_per_request']:.0f} us/req"
              + (f", to the peer {to_peer[name]['rps']:.2f} (by CPU per request {to_peer[name]['cpu_per_request']:.2f})"
                 if name in to_peer else ""))
    print(f"target: service >= 1.0x the peer, p99 < 15 ms at {args.rate:.0f}/s open loop "
          f"(now {open_p99:.1f} ms); service mean stage time (us): "
          + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print("decisions answered from the rules (model failed or log past its deadline), all rounds: "
          + ", ".join(f"{name} {count:.0f}" for name, count in result["fallbacks"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _fallbacks(metrics: str) -> float:
    """insertrec_fallbacks_total of a service arm's /metrics (0 when none was counted)."""
    found = re.search(r"^insertrec_fallbacks_total (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def _stage_means(metrics: str) -> dict[str, float]:
    """Mean microseconds per stage from the service's own histograms."""
    sums = dict(re.findall(r'^insertrec_stage_seconds_sum\{stage="(\w+)"\} (\S+)$', metrics, re.M))
    counts = dict(re.findall(r'^insertrec_stage_seconds_count\{stage="(\w+)"\} (\S+)$', metrics, re.M))
    return {s: round(float(sums[s]) / float(counts[s]) * 1e6, 1) for s in sums if float(counts.get(s, 0)) > 0}


if __name__ == "__main__":
    main()
