"""Shared by the serving tests: keys, a small catalog with scarce stock, a model that fails on some
orders, a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from insertrec.engine import Engine
from insertrec.policy import Decision
from insertrec.serving.settings import Settings

DECIDE, FEEDBACK, ADMIN = "decide-key-0123456789", "feedback-key-0123456789", "admin-key-01234567890"
KEYS = f"{DECIDE}:decide,{FEEDBACK}:feedback,{ADMIN}:admin"
EXAMPLE_CATALOG = Path(__file__).parent / "data" / "catalog_example.yaml"

POISON = 13.0   # the order_value a `PickyModel` fails on


class PickyModel(Engine):
    """A model that fails on orders of value `POISON` only: raising (for a whole `decide_many` that
    holds one), or with ``nan``, scoring them NaN."""

    def __init__(self, *args: Any, nan: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.nan = nan

    def decide(self, order: dict, *args: Any, **kwargs: Any) -> Decision:
        return self._spoiled([order], [super().decide(order, *args, **kwargs)])[0]

    def decide_many(self, orders: list[dict], *args: Any, **kwargs: Any) -> list[Decision]:
        return self._spoiled(orders, super().decide_many(orders, *args, **kwargs))

    def _spoiled(self, orders: list[dict], decisions: list[Decision]) -> list[Decision]:
        poisoned = [o["order_value"] == POISON for o in orders]
        if any(poisoned) and not self.nan:
            raise RuntimeError("model exploded")
        return [replace(d, expected_uplift=float("nan")) if bad else d for d, bad in zip(decisions, poisoned)]


# Every order wants the sample (the playbook's only rule); there are 5.
SCARCE_CATALOG = """
slots:
  packaging:
    actions:
      - {id: box, name: Box, cost: 0.4, default: true}
  insert:
    actions:
      - {id: none, name: No insert, cost: 0, default: true}
      - {id: sample, name: Sample, cost: 2.0, stock: 5}
  coupon:
    actions:
      - {id: no_coupon, name: No coupon, cost: 0, default: true}
      - {id: ten_off, name: Ten off, cost: 3.0, budget: 9.0, max_per_customer: {count: 1, days: 30}}
rules:
  - when: {order_value: {min: 0}}
    choose: {insert: sample, coupon: ten_off}
"""


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings(tmp_path: Path, catalog: Path = EXAMPLE_CATALOG, db_url: str | None = None,
             **overrides: object) -> Settings:
    overrides.setdefault("spool_dir", str(tmp_path / "spool"))
    return Settings.load(environ={}, catalog=str(catalog), db_url=db_url or f"sqlite:///{tmp_path / 'log.db'}",
                         api_keys=KEYS, **overrides)


def query(db_url: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` on the decision log at ``db_url`` (SQLite or PostgreSQL), read from outside
    the service."""
    db = sa.create_engine(db_url)
    try:
        with db.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]
    finally:
        db.dispose()


def order(i: int | str, customer: str | None = None, **fields: object) -> dict:
    return {"order_id": f"o-{i}", "customer_id": customer or f"c-{i}", "order_value": 42.0,
            "channel": "web", **fields}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``insertrec.serving.app.run`` in its own process group on 127.0.0.1 (stopped by its pgid)."""

    def __init__(self, tmp_path: Path, catalog: Path, workers: int = 2, db: Path | None = None,
                 db_url: str | None = None, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "INSERTREC_API_KEYS": KEYS, "INSERTREC_CATALOG": str(catalog),
                    "INSERTREC_DB_URL": db_url or f"sqlite:///{db or tmp_path / 'log.db'}",
                    "INSERTREC_LOG_LEVEL": "WARNING", "INSERTREC_SPOOL_DIR": str(tmp_path / "spool"),
                    "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{self.port}"),
                    **{f"INSERTREC_{name.upper()}": value for name, value in settings.items()}}
        Path(self.env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log = tmp_path / f"server-{self.port}.log"

    def start(self, timeout: float = 60.0) -> Server:
        code = (f"from insertrec.serving.app import run; "
                f"run(port={self.port}, workers={self.workers})")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the whole server (supervisor and workers) at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reap()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reap()

    def _reap(self) -> None:
        """Workers are in the server's group; make sure none outlives the test."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
