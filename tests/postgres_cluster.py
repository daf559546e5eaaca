"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, loopback only, a non-root user.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster
belongs to the ``postgres`` system user (Debian's package creates it; else
``nobody``) and every server command runs through ``runuser``. The cluster
trusts local connections (it listens on 127.0.0.1 only and lives for one
test session) and runs with ``fsync=off``: the tests kill the service, never
PostgreSQL, so what PostgreSQL has committed is what the tests check.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["Cluster", "find_bin_dir"]

_SUPERUSER = "insertrec"


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has initdb, pg_ctl and postgres (or
    ``INSERTREC_PG_BIN``), None when there is none."""
    forced = os.environ.get("INSERTREC_PG_BIN")
    candidates = [forced] if forced else sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                                key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for directory in reversed(candidates):
        if all((Path(directory) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL server on 127.0.0.1; `database()` hands out fresh, empty databases.

    Every command has a deadline (``pg_ctl -w -t 30``, subprocess timeouts).
    """

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.user = self._os_user()
        self.root = Path(tempfile.mkdtemp(prefix="insertrec-pg-"))  # under /tmp: reachable by that user
        self.data = self.root / "data"
        self.port = 0
        self._chown(self.root)

    @staticmethod
    def _os_user() -> str | None:
        """None: run as ourselves. As root: the ``postgres`` user, else ``nobody``."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                return name
        raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")
        return done

    def start(self, attempts: int = 3) -> Cluster:
        self._run("initdb", "-D", str(self.data), "-U", _SUPERUSER, "--auth=trust", "--no-sync",
                  "--encoding=UTF8", "--locale=C", timeout=120)
        for attempt in range(attempts):
            self.port = _free_port()  # another process may take it before the server binds: try again
            try:
                self.resume()
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    log = self.root / "server.log"
                    raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-2000:] if log.exists() else ''}")
                time.sleep(0.5)
        return self

    def resume(self) -> None:
        """Start the server (again) on ``self.port``: after `halt`, the same URLs work again."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "30",
                  "-o", options, "start", timeout=60)

    def halt(self) -> None:
        """Stop the server as an operator would (``pg_ctl stop -m fast``: sessions cut, data kept)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={_SUPERUSER} dbname=postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def database(self) -> str:
        """A new empty database; its name."""
        name = "t_" + uuid.uuid4().hex[:16]
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
