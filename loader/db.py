"""Connections: one psycopg pool and one SQLAlchemy engine per process, and database error triage."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg_pool import ConnectionPool

from . import config
from .errors import LoaderError, PermanentDbError, TransientDbError

#: SQLSTATEs worth another attempt: the server or the connection went away, or two writers collided.
TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "57014",  # query_canceled (statement_timeout, pg_cancel_backend)
    "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up / shutting down)
    "53300",  # too_many_connections
    "53400",  # configuration_limit_exceeded
})
TRANSIENT_CLASSES = ("08",)  # connection exceptions

_lock = threading.Lock()
_pools: dict[tuple[int, str], ConnectionPool] = {}
_engines: dict[tuple[int, str, str], sa.engine.Engine] = {}


def libpq_url(url: str) -> str:
    """Accept postgres://, postgresql:// and SQLAlchemy's postgresql+psycopg:// forms."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg://" + libpq_url(url)[len("postgresql://"):]


def redact(text: str) -> str:
    """Replace the passwords of DATABASE_URL and REDIS_URL (and of any URL in ``text``) with ***."""
    for name in ("DATABASE_URL", "REDIS_URL"):
        url = os.environ.get(name, "")
        password = urlsplit(url).password if "://" in url else None
        if password:
            text = text.replace(password, "***")
    return re.sub(r"(\w+://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)


def ledger_schema() -> str:
    return config.get("ETL_LEDGER_SCHEMA")


def ledger_table(name: str) -> sql.Identifier:
    """``sql.Identifier(<ledger schema>, name)`` for the psycopg hot path."""
    return sql.Identifier(ledger_schema(), name)


def next_change() -> sql.Composed:
    """``nextval(...)`` of the ledger's change sequence: every ledger write takes a new number, so
    "what changed since N" (the console's cheap poll) is one index lookup."""
    return sql.SQL("nextval({})").format(sql.Literal(f'"{ledger_schema()}".ledger_change_seq'))


def get_pool(url: str | None = None) -> ConnectionPool:
    """This process's connection pool (a new one after fork: sockets are never shared)."""
    url = libpq_url(url or config.database_url())
    key = (os.getpid(), url)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = ConnectionPool(
                url, min_size=0, max_size=config.get_int("ETL_DB_POOL_SIZE", minimum=1),
                kwargs={"autocommit": True, "application_name": "dataloader"},
                check=ConnectionPool.check_connection, open=True, timeout=30, reconnect_timeout=60,
            )
            _pools[key] = pool
        return pool


@contextmanager
def connection(url: str | None = None) -> Iterator[psycopg.Connection[Any]]:
    """A pooled autocommit connection; use ``with conn.transaction():`` for atomic work."""
    with get_pool(url).connection() as conn:
        yield conn


def get_engine(url: str | None = None) -> sa.engine.Engine:
    """This process's SQLAlchemy engine, with the ledger's schema mapped in."""
    url = url or config.database_url()
    schema = ledger_schema()
    key = (os.getpid(), url, schema)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = sa.create_engine(
                sqlalchemy_url(url), pool_pre_ping=True, pool_size=2, max_overflow=4,
                connect_args={"application_name": "dataloader"},
            ).execution_options(schema_translate_map={None: schema})
            _engines[key] = engine
        return engine


def close_all() -> None:
    """Close this process's pools and engines (tests, and workers on shutdown)."""
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientDbError):
        return True
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    if isinstance(orig, psycopg.Error):
        exc = orig
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # No SQLSTATE: the connection broke (server gone, socket closed, pool timeout).
            return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        return state in TRANSIENT_SQLSTATES or state.startswith(TRANSIENT_CLASSES)
    from psycopg_pool import PoolTimeout

    return isinstance(exc, PoolTimeout | ConnectionError | TimeoutError)


def wrap_db_error(exc: BaseException, **context: object) -> LoaderError:
    """Turn a driver error into TransientDbError or PermanentDbError, password-free."""
    orig = getattr(exc, "orig", None)
    err = orig if isinstance(orig, psycopg.Error) else exc
    sqlstate = getattr(err, "sqlstate", None) or ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    message = redact(first)
    if is_transient(err):
        return TransientDbError(f"database error, will retry: {message}", sqlstate=sqlstate, **context)
    return PermanentDbError(f"database error {sqlstate or ''}: {message}".replace("  ", " "),
                            sqlstate=sqlstate, **context)
