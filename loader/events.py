"""Structured log events: one JSON object per thing that happened, in the ledger and on stderr."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .db import ledger_sql, redact

logger = logging.getLogger("dataloader")

INSERT_EVENT = sql.SQL(
    "INSERT INTO {} (etl_job_id, etl_run_id, batch_index, attempt, level, event, details) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)")


def log_event(conn: psycopg.Connection[Any] | None, job: str, run: str, event: str, *, level: str = "info",
              batch: int | None = None, attempt: int | None = None, **details: Any) -> None:
    """Record an event in the ledger (inside the caller's transaction when there is one) and log it.

    With ``conn=None`` the event only goes to the process log (the database may be down).
    """
    record_event(conn, job, run, event, level=level, batch=batch, attempt=attempt, **details)()


def record_event(conn: psycopg.Connection[Any] | None, job: str, run: str, event: str, *, level: str = "info",
                 batch: int | None = None, attempt: int | None = None, **details: Any) -> Callable[[], None]:
    """Record an event in the ledger now, and return what writes its process log line, for a caller that logs
    only once its transaction is known to commit (the insert may ride a pipeline with the batch's commit row).

    Example::

        echo = record_event(conn, job, run, "batch_committed", batch=3)
        ...  # the rest of the transaction
        echo()
    """
    clean = orjson.loads(redact(orjson.dumps(details, default=str).decode()))
    if conn is not None:
        conn.execute(ledger_sql(INSERT_EVENT, "events"),
                     [job, run, batch, attempt, level, event, Jsonb(clean)])

    def echo() -> None:
        if logger.isEnabledFor(logging.INFO if level == "info" else logging.WARNING):
            line = {"level": level, "event": event, "job": job, "run": run, "batch": batch, "attempt": attempt,
                    "details": clean}
            logger.log(logging.ERROR if level == "error" else logging.WARNING if level == "warning"
                       else logging.INFO, orjson.dumps(line).decode())

    return echo


def setup_process_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for worker processes (collected by whatever runs them)."""
    if any(getattr(h, "_dataloader", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._dataloader = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
