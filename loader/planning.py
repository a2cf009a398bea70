"""Planning a run: read the source once, cut it into batches the ledger can replay, queue them."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from . import db, lineage, states
from .catalog import JobSpec
from .db import ledger_table
from .errors import LoaderError, TransientDbError, TransientSourceError
from .events import log_event
from .retrying import backoff_delay
from .sources import plan_batches, resolve_source
from .states import BatchStatus
from .storage import SourceObject
from .upsert import ensure_target

BATCH_COLUMNS = ("etl_job_id", "etl_run_id", "batch_index", "status", "source_file", "file_size", "file_mtime_ns",
                 "byte_start", "byte_end", "line_start", "line_count", "ord_start", "has_payload",
                 "rows_attempted", "checksum")


def plan_run(job: str, run: str, worker: str | None = None) -> list[int]:
    """Plan a queued run: create its target table and batches; return the batch indexes to enqueue.

    Transient database and store errors are retried; any other problem (no source file, a truncated gzip,
    a bad target table) fails the run with a clear message. Returns [] when there is nothing to
    load (the run is then final) or the run was canceled or planned already.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return _plan_once(job, run, worker)
        except (LoaderError, psycopg.Error) as exc:
            error = exc if isinstance(exc, LoaderError) else db.wrap_db_error(exc)
            if isinstance(error, TransientDbError | TransientSourceError) and attempt < 6:
                log_event(None, job, run, "plan_retrying", level="warning", error=str(error))
                time.sleep(backoff_delay(attempt))
                continue
            # When even this cannot be written (the database is away), the RQ job fails and the
            # reconciler queues the planning again once the database is back.
            _fail_run(job, run, error)
            return []
        except Exception as exc:  # noqa: BLE001 - a bug or a source no check foresaw: the run must end, not loop
            # Left to RQ, the job would fail, the run would stay validating, and the reconciler would
            # plan it again and again.
            _fail_run(job, run, LoaderError(f"planning failed: {type(exc).__name__}: {str(exc)[:500]}",
                                            job=job, run=run))
            return []


def _plan_once(job: str, run: str, worker: str | None) -> list[int]:
    with db.connection() as conn:
        row = states.start_planning(conn, job, run, worker)
        if row is None:
            return []  # canceled, or planned already by an earlier delivery of this job
        spec = JobSpec.from_dict(row[0])
        batch_size = int(row[1])
        log_event(conn, job, run, "plan_started", source=spec.source, batch_size=batch_size)
        files = resolve_source(spec.source, spec.storage_options)
        ensure_target(conn, spec.target_schema, spec.target_table)

        try:
            with conn.transaction():
                if not states.holds_planning(conn, job, run):
                    # Another delivery of this planning job got here first and committed (the run is
                    # loading, or canceled): its batches may be loading already; never replan them.
                    return []
                for name in ("batch_payloads", "batches"):  # an interrupted earlier planning
                    conn.execute(sql.SQL("DELETE FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
                        ledger_table(name)), [job, run])
                total, rows = _write_batches(conn, job, run, files, batch_size, spec.storage_options)
                status = states.finish_planning(conn, job, run, batches=total, rows=rows)
                if status is None:
                    raise _PlanningCanceled
                log_event(conn, job, run, "plan_completed", batches=total, records=rows,
                          files=[f.name for f in files])
                if total == 0:
                    log_event(conn, job, run, "run_completed", status=status.value,
                              note="the source holds no records")
        except _PlanningCanceled:
            # The run was canceled while its source was read: nothing planned is kept (rolled back).
            log_event(conn, job, run, "plan_stopped", level="warning", reason="run canceled during planning")
            return []
    lineage.run_event(job, run, status.value)
    return list(range(total))


#: Seconds between two looks at the run while planning reads its source: a cancel stops the planner.
CANCEL_CHECK_SECONDS = 0.5


#: Batch rows written by one COPY while planning: the planner holds at most this many (a 10M-record source
#: at batch size 1000 kept all 10,000 until its end, 16 MiB of a worker's peak memory).
PLAN_COPY_ROWS = 1000


class _PlanningCanceled(Exception):
    """The run was canceled while it was being planned: the planning transaction rolls back."""


def _write_batches(conn: psycopg.Connection[Any], job: str, run: str, files: list[SourceObject], batch_size: int,
                   options: dict[str, Any] | None) -> tuple[int, int]:
    """Write one ledger row per batch (COPY) and the payloads of unseekable sources."""
    total = rows = 0
    batch_rows: list[tuple[object, ...]] = []
    insert_payload = sql.SQL(
        "INSERT INTO {} (etl_job_id, etl_run_id, batch_index, payload) VALUES (%s, %s, %s, %s)").format(
            ledger_table("batch_payloads"))
    next_check = time.monotonic() + CANCEL_CHECK_SECONDS
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in BATCH_COLUMNS)
    copy_batches = sql.SQL("COPY {} ({}) FROM STDIN").format(ledger_table("batches"), cols)

    def write_rows() -> None:
        with conn.cursor().copy(copy_batches) as copy:
            for r in batch_rows:
                copy.write_row(r)
        batch_rows.clear()

    for b in plan_batches(files, batch_size, options):
        if time.monotonic() >= next_check:
            # Read committed: a cancel that committed since the last look is seen here.
            if states.run_is(conn, job, run, states.RunStatus.CANCELED):
                raise _PlanningCanceled
            next_check = time.monotonic() + CANCEL_CHECK_SECONDS
        batch_rows.append((job, run, b.index, BatchStatus.PENDING.value, b.file, b.file_size, b.file_mtime_ns,
                           b.byte_start, b.byte_end, b.line_start, b.line_count, b.ord_start,
                           b.payload is not None, b.records, b.ledger_checksum()))
        if b.payload is not None:
            conn.execute(insert_payload, [job, run, b.index, b.payload])
        total += 1
        rows += b.records
        if len(batch_rows) >= PLAN_COPY_ROWS:
            write_rows()
    if batch_rows:
        write_rows()
    return total, rows


def _fail_run(job: str, run: str, exc: LoaderError) -> None:
    try:
        with db.connection() as conn, conn.transaction():
            moved = states.fail_planning(conn, job, run, code=exc.code, message=db.redact(str(exc)))
            log_event(conn, job, run, "run_failed", level="error", error_code=exc.code, error=str(exc))
    except psycopg.Error:
        log_event(None, job, run, "run_failed", level="error", error_code=exc.code, error=str(exc))
        raise
    lineage.run_event(job, run, states.RunStatus.FAILED.value, moved=moved)
