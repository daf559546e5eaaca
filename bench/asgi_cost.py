"""CPU per fresh decision of the service's own ASGI app, driven in-process: no sockets, no uvicorn.

`load_api.py` measures the service as deployed, but on a shared machine its
figures move by 10% between rounds. This drives the same app (middleware,
routing, validation, state, model, group commit to a temp SQLite log) from
one process with ``--concurrency`` requests in flight (prometheus in
multiprocess mode, as with several workers, unless ``--metrics memory``), and reports the
process's CPU time per decision, the best of ``--rounds`` rounds: steady
enough to A/B a change of a few percent (run it once per source tree with
PYTHONPATH pointing at each). Also reports the WAL-checkpoint thread's own
CPU, which a sampling profiler over-counts (it samples the thread in fsync).

With ``--fixed-decision`` the model's decision is made once and reused (as
`load_api.py`'s arm of that name): what is left is the serving path alone.

Usage: PYTHONPATH=src python bench/asgi_cost.py --model DIR [--orders 3000] [--customers 3000] [--concurrency 32] [--rounds 3]
       [--fixed-decision]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from insertrec.serving.metrics import MULTIPROC_ENV

KEY = "bench-key-0123456789abcdef"


def _thread_cpu_seconds(name: str) -> float:
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


async def _one(app: Any, tag: str, i: int, customers: int) -> None:
    body = (f'{{"order_id":"{tag}-{i}","customer_id":"c-{i % customers}","order_value":{10 + i % 90}.5,'
            f'"channel":"web","categories":["apparel"],"n_items":2}}').encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/recommendations", "raw_path": b"/v1/recommendations",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode()),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays connected until the app is done
        return {}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise SystemExit(f"order {tag}-{i}: status {statuses}")


async def _measure(args: argparse.Namespace) -> None:
    if args.fixed_decision:
        sys.path.insert(0, str(Path(__file__).parent))
        from load_api import fixed_decision_app as app_from_env
    else:
        from insertrec.serving.app import app_from_env

    app = app_from_env()

    async def orders(tag: str, n: int) -> None:
        for lo in range(0, n, args.concurrency):
            await asyncio.gather(*(_one(app, tag, i, args.customers) for i in range(lo, min(n, lo + args.concurrency))))

    async with app.router.lifespan_context(app):
        await orders("warm", args.orders)
        per_round = []
        checkpoint_before = _thread_cpu_seconds("wal-checkpoint")
        for r in range(args.rounds):
            start = time.process_time()
            await orders(f"round{r}", args.orders)
            per_round.append((time.process_time() - start) / args.orders * 1e6)
        checkpoint = (_thread_cpu_seconds("wal-checkpoint") - checkpoint_before) / (args.rounds * args.orders) * 1e6
    print(f"CPU per decision: best {min(per_round):.0f} us, rounds {[round(x) for x in per_round]} us; "
          f"of which the WAL-checkpoint thread {checkpoint:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--orders", type=int, default=3000)
    ap.add_argument("--customers", type=int, default=3000, help="distinct customers, recurring in turn")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fixed-decision", action="store_true", help="the model's decision made once and reused")
    ap.add_argument("--metrics", choices=("multiprocess", "memory"), default="multiprocess",
                    help="prometheus mode: multiprocess, as `insertrec serve` with several workers (default)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="insertrec-asgi-cost-")
    os.environ.update({"INSERTREC_API_KEYS": f"{KEY}:decide", "INSERTREC_DB_URL": f"sqlite:///{tmp}/decisions.db",
                       "INSERTREC_MODEL": args.model, "INSERTREC_LOG_LEVEL": "WARNING"})
    # a CPU benchmark, not a deadline test: on a loaded machine a commit can miss the default 50 ms,
    # and the service then answers from the rules and spools (cheaper decisions, a wrong figure)
    os.environ.setdefault("INSERTREC_DB_DEADLINE_MS", "10000")
    if args.metrics == "multiprocess":
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="insertrec-asgi-cost-metrics-")
    asyncio.run(_measure(args))


if __name__ == "__main__":
    main()
