"""Test services: real PostgreSQL and Redis (from the environment, else embedded), real workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent


_held: contextlib.ExitStack | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point every test (and every process they start) at real services, started here if unset.

    `make test` sets DATABASE_URL / REDIS_URL first; a bare `pytest` starts embedded servers under
    .data/test and stops them at the end of the session.
    """
    global _held
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        from devstack.services import held_services

        _held = contextlib.ExitStack()
        services = _held.enter_context(held_services(ROOT / ".data" / "test"))
        os.environ.update(services.env())
    # One ledger schema and one queue for this session: tests never see another session's runs.
    tag = uuid.uuid4().hex[:8]
    os.environ["ETL_LEDGER_SCHEMA"] = f"etl_test_{tag}"
    os.environ["ETL_QUEUE"] = f"test-{tag}"
    os.environ.setdefault("ETL_RETRY_BASE_SECONDS", "0.2")
    os.environ.setdefault("ETL_RETRY_MAX_SECONDS", "2")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _held is not None:
        _held.close()


@pytest.fixture(scope="session")
def ledger() -> Iterator[str]:
    from loader import db, initdb

    initdb()
    yield os.environ["ETL_LEDGER_SCHEMA"]
    db.close_all()
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        schema = sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"])
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))


@pytest.fixture
def pg() -> Iterator[psycopg.Connection]:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        yield conn


@pytest.fixture
def target_schema(pg: psycopg.Connection) -> Iterator[str]:
    """A fresh schema for this test's staging tables, dropped afterwards."""
    name = f"stg_{uuid.uuid4().hex[:8]}"
    yield name
    pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def redis_conn():
    from loader.queue import get_redis

    r = get_redis()
    yield r
    for key in r.scan_iter(f"rq:*{os.environ['ETL_QUEUE']}*"):
        r.delete(key)


class WorkerProcs:
    """Real `dataloader worker` processes, started and stopped by the tests.

    Their JSON log lines go to a file (a pipe nobody reads would fill up and block them).
    """

    def __init__(self, log_dir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_dir = log_dir

    def start(self, n: int = 1, burst: bool = False, *, cwd: Path = ROOT, env: dict[str, str] | None = None
              ) -> list[subprocess.Popen[bytes]]:
        """``cwd`` and ``env``: where the workers run and their whole environment (default: the repository and
        this process's environment)."""
        started = []
        for _ in range(n):
            args = [sys.executable, "-m", "loader.cli", "worker"] + (["--burst"] if burst else [])
            log = open(self.log_dir / f"worker-{len(self.procs)}.log", "ab")  # noqa: SIM115
            p = subprocess.Popen(args, cwd=cwd, env=os.environ.copy() if env is None else env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            self.procs.append(p)
            started.append(p)
        return started

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


@pytest.fixture(scope="session")
def workers(ledger: str, redis_conn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcs]:
    """Two long-running workers for the whole session (tests needing their own start them)."""
    procs = WorkerProcs(tmp_path_factory.mktemp("workers"))
    procs.start(2)
    yield procs
    procs.stop()


@pytest.fixture
def own_queue(monkeypatch: pytest.MonkeyPatch, redis_conn) -> Iterator[str]:
    """A queue of this test's own: only the workers this test starts (with its environment, and then killed,
    frozen or started late as it likes) serve it; the session's workers never take its jobs."""
    name = f"own-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ETL_QUEUE", name)
    yield name
    for key in redis_conn.scan_iter(f"rq:*{name}*"):
        redis_conn.delete(key)


@pytest.fixture
def own_workers(ledger: str, redis_conn, tmp_path: Path) -> Iterator[WorkerProcs]:
    procs = WorkerProcs(tmp_path)
    yield procs
    procs.stop()
