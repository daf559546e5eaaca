"""Fixtures shared by the tests: a decision-log URL on SQLite and on a real PostgreSQL server.

``db_url`` runs a test once per database. The PostgreSQL cluster starts once
per session, on first use, and each test gets a database of its own. Without
PostgreSQL's server binaries or the psycopg driver the PostgreSQL runs are
skipped on a developer's machine and fail in CI (``CI=true``): CI must not
pass by skipping them (`.ci/system-packages` installs the server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_cluster import Cluster, find_bin_dir

DATABASES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session", autouse=True)
def model_key_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-user model key lives in a throwaway config directory, never the developer's own.

    No key is configured, as on a fresh machine: the first model trained
    creates the key, and every process the tests start (they inherit the
    environment) verifies with it.
    """
    home = tmp_path_factory.mktemp("config-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(home))
        mp.delenv("INSERTREC_MODEL_KEY", raising=False)
        mp.delenv("INSERTREC_MODEL_KEY_FILE", raising=False)
        yield home


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install 'insertrec[postgres]')")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    cluster = Cluster(bin_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A decision-log URL on an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'log.db'}"
        return
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    name = cluster.database()
    try:
        yield cluster.url(name)
    finally:
        cluster.drop(name)
