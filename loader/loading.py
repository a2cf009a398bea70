"""Loading one batch: exactly once, in one transaction with its ledger row, retrying transient errors."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import config, db, lineage, states
from .catalog import JobSpec
from .db import ledger_table
from .errors import JobTimeout, LoaderError, TransientDbError, TransientSourceError
from .events import log_event, record_event
from .retrying import backoff_delay
from .sources import OversizedRecord, PlannedBatch, from_ledger, read_batch
from .states import AttemptStatus, BatchStatus, RunStatus
from .upsert import (
    StageRow,
    ensure_stage,
    is_record_refusal,
    stage_isolating,
    staging,
    upsert_isolating,
    upsert_stage,
)
from .validation import ErrorClass, RecordChecker, RecordProblem, sample_raw

#: Raw text kept for a rejected record (bytes); longer records are cut and flagged.
REJECT_RECORD_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class BatchOutcome:
    """What one execution of a batch job did (the ledger has the details)."""

    status: str  # succeeded, failed, skipped, canceled
    attempts: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    validation_failures: int = 0
    reason: str = ""


COPY_REJECTS = sql.SQL(
    "COPY {} (etl_job_id, etl_run_id, batch_index, source_file, line_no, error_class, path, message, "
    "sample_value, problems, record, record_truncated) FROM STDIN")


@lru_cache(maxsize=32)
def _checker(spec_json: bytes) -> RecordChecker:
    """One compiled checker per job spec per process: the JSON Schema is compiled once."""
    spec = JobSpec.from_dict(orjson.loads(spec_json))
    return RecordChecker(spec.source_id, spec.required, spec.schema)


@lru_cache(maxsize=32)
def _spec(job: str, run: str) -> tuple[JobSpec, bytes]:
    with db.connection() as conn:
        row = conn.execute(sql.SQL("SELECT spec FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
            ledger_table("runs")), [job, run]).fetchone()
    if row is None:
        raise LoaderError(f"run {job}/{run} is not in the ledger", job=job, run=run)
    raw = orjson.dumps(row[0], option=orjson.OPT_SORT_KEYS)
    return JobSpec.from_dict(row[0]), raw


#: The batch this process is executing now (job, run, batch), or None: the worker's heartbeat writes
#: it to the ledger, and the reconciler never queues again a batch a live worker is executing.
_executing: tuple[str, str, int] | None = None


def executing() -> tuple[str, str, int] | None:
    """The batch this process is loading right now, or None."""
    return _executing


def load_batch(job: str, run: str, batch: int, *, worker: str | None = None, trigger: str = "auto") -> BatchOutcome:
    """Load batch ``batch`` of a run, retrying transient database errors with backoff.

    Safe to call more than once for the same batch (RQ delivers at least once): a batch that has
    committed is never loaded or counted again, and two concurrent executions cannot both commit.
    After the batch ends, the run is finished if it was the last one.

    Example::

        load_batch("orders", "2f1c...", 0)
    """
    global _executing
    _executing = (job, run, batch)
    try:
        return _load_batch(job, run, batch, worker=worker, trigger=trigger)
    finally:
        _executing = None


def _load_batch(job: str, run: str, batch: int, *, worker: str | None, trigger: str) -> BatchOutcome:
    failures = 0  # consecutive failures, for the backoff
    used = 0  # attempts that started and failed transiently: bounded by max_attempts
    outage_since: float | None = None  # the database unreachable before an attempt could start
    unchecked = True  # borrow a connection given back moments ago without the pool's check
    while True:
        started = time.perf_counter()
        attempt: int | None = None
        max_attempts = config.get_int("ETL_MAX_ATTEMPTS", minimum=1)
        try:
            spec, spec_json = _spec(job, run)
            max_attempts = spec.max_attempts or max_attempts
            # Unchecked when given back moments ago (the batch before): a session ended since fails the
            # claim, before any attempt started, as a transient error (the outage path below).
            with db.connection(skip_fresh_check=unchecked) as conn:
                began = states.claim_batch(conn, job, run, batch, worker=worker, trigger=trigger)
                if began is None:
                    return _not_started(conn, job, run, batch)
                attempt = int(began["attempts"])
                max_attempts = int(began["max_attempts"])
                outcome = _attempt(conn, spec, spec_json, job, run, batch, attempt, began, started)
                if outcome.status not in ("skipped", "canceled"):
                    finish_run_if_done(job, run, conn)  # on the same connection: no second borrow and check
            return outcome
        except Exception as exc:  # noqa: BLE001 - every failure is recorded in the ledger, then handled
            if attempt is None and unchecked and db.is_session_lost(exc):
                # The unchecked connection's session had ended (a restart, a terminated backend): borrow
                # again at once, checked, as the pool would have done; nothing to record or wait for.
                unchecked = False
                continue
            failures += 1
            error = exc if isinstance(exc, LoaderError) else (
                db.wrap_db_error(exc, batch=batch) if isinstance(exc, psycopg.Error) or db.is_transient(exc)
                else None)
            transient = isinstance(error, TransientDbError | JobTimeout | TransientSourceError)
            if isinstance(exc, JobTimeout):
                # The queue's job timeout stopped this attempt: it counts, and the job must end now (no
                # new attempt in a job whose time is up). A batch left 'retried' is queued again by the
                # reconciler once this RQ job has ended.
                used = max(used + 1, attempt or 0)
                retry = used < max_attempts
                message = db.redact(f"{exc}: the attempt was stopped (ETL_JOB_TIMEOUT); "
                                    + ("the batch is queued again" if retry else "no attempt left"))
                _record_failure(job, run, batch, attempt, retry=retry, code=JobTimeout.code, message=message,
                                stack=db.redact(traceback.format_exc()), ms=(time.perf_counter() - started) * 1000)
                if not retry:
                    finish_run_if_done(job, run)
                raise
            if transient and attempt is None:
                # The attempt never started (the database is restarting, the pool cannot connect):
                # wait for the database, up to ETL_DB_OUTAGE_SECONDS, without spending attempts.
                outage_since = outage_since or time.monotonic()
                retry = time.monotonic() - outage_since < config.get_float("ETL_DB_OUTAGE_SECONDS")
            else:
                # Attempts lost with their worker count too: the batch's own number, not this job's.
                used = max(used + 1, attempt or 0)
                retry = transient and used < max_attempts
            code = _error_code(exc, error)
            message = db.redact(str(error) if error is not None else f"{type(exc).__name__}: {exc}")
            stack = db.redact(traceback.format_exc())
            ms = (time.perf_counter() - started) * 1000
            recorded = _record_failure(job, run, batch, attempt, retry=retry, code=code, message=message,
                                       stack=stack, ms=ms)
            if retry:
                time.sleep(backoff_delay(failures))
                continue
            if recorded:
                finish_run_if_done(job, run)
                return BatchOutcome("failed", attempts=used, reason=message)
            # The ledger cannot record the outcome: fail the RQ job; the reconciler re-queues the
            # batch once the database is back (it is still pending, retried or running there).
            raise


def _error_code(exc: BaseException, error: LoaderError | None) -> str:
    sqlstate = (error.context.get("sqlstate") if error is not None else None) or getattr(exc, "sqlstate", None)
    if sqlstate:
        return str(sqlstate)
    if error is not None:
        return error.code
    return "internal"


def _not_started(conn: psycopg.Connection[Any], job: str, run: str, batch: int) -> BatchOutcome:
    row = conn.execute(sql.SQL(
        "SELECT r.status, b.status FROM {} r LEFT JOIN {} b ON b.etl_job_id = r.etl_job_id "
        "AND b.etl_run_id = r.etl_run_id AND b.batch_index = %s WHERE r.etl_job_id = %s AND r.etl_run_id = %s"
    ).format(ledger_table("runs"), ledger_table("batches")), [batch, job, run]).fetchone()
    run_status, batch_status = (row or (None, None))
    if batch_status == BatchStatus.SUCCEEDED.value:
        reason = "already committed (duplicate delivery): nothing done"
        finish_run_if_done(job, run, conn)  # in case the execution that committed it died before finishing
    elif run_status == RunStatus.CANCELED.value:
        # The cancel recorded its unstarted batches already and logged once for all of them: a queued job
        # of a canceled run ends here quietly, unless its batch was still open (it failed an attempt while
        # the cancel committed): that one is recorded as never to run now.
        if not states.cancel_batches(conn, job, run, batch):
            return BatchOutcome("skipped", reason="run canceled: batch not started")
        reason = "run canceled: batch not started"
    else:
        reason = f"not startable (run {run_status}, batch {batch_status})"
    log_event(conn, job, run, "batch_skipped", batch=batch, reason=reason)
    return BatchOutcome("skipped", reason=reason)


def _attempt(conn: psycopg.Connection[Any], spec: JobSpec, spec_json: bytes, job: str, run: str, batch: int,
             attempt: int, began: dict[str, Any], started: float) -> BatchOutcome:
    payload = None
    if began["has_payload"]:
        row = conn.execute(sql.SQL(
            "SELECT payload FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s").format(
                ledger_table("batch_payloads")), [job, run, batch]).fetchone()
        payload = bytes(row[0]) if row else None
    planned = from_ledger(batch, began["source_file"], began["file_size"], began["file_mtime_ns"],
                          began["byte_start"], began["byte_end"], began["line_start"], began["line_count"],
                          began["rows_attempted"], began["ord_start"], payload, began["checksum"])

    checker = _checker(spec_json)
    ord_base = planned.ord_start - planned.line_start
    ensure_stage(conn)  # outside the transaction, so that the connection remembers it has the stage
    try:
        try:
            return _load_in_transaction(conn, spec, job, run, batch, attempt, began, started, planned, checker,
                                        ord_base)
        except _RecordRefused:
            # PostgreSQL refused a record's data in the stage (a number jsonb cannot hold) or in the upsert (a
            # generated column, an expression index): the batch again, in one transaction, staging its records
            # and upserting its keys in halves to find the records at fault.
            return _load_in_transaction(conn, spec, job, run, batch, attempt, began, started, planned, checker,
                                        ord_base, isolate=True)
    except _NotCommitted:
        with conn.transaction():
            if not states.holds_batch(conn, job, run, batch, attempt):
                # Another execution took this batch over (or committed it) while this one loaded.
                _end_attempt(conn, job, run, batch, attempt, AttemptStatus.SKIPPED, started)
                log_event(conn, job, run, "batch_skipped", batch=batch, attempt=attempt,
                          reason="another execution of this batch took over")
                return BatchOutcome("skipped", attempts=attempt, reason="taken over")
            # Still this attempt's batch, so the run is no longer loading: canceled while the batch loaded.
            states.cancel_attempt(conn, job, run, batch, attempt, ms=(time.perf_counter() - started) * 1000)
            log_event(conn, job, run, "batch_canceled", level="warning", batch=batch, attempt=attempt,
                      reason="the run was canceled before this batch committed: its rows were rolled back")
        return BatchOutcome("canceled", attempts=attempt, reason="run canceled at commit")


class _NotCommitted(Exception):
    """The batch's commit row did not match (taken over, or the run canceled): the transaction rolls back.

    Found at the commit rather than by locking the batch row before the upsert: one round trip a batch
    fewer, and a stale execution's rows were never to be committed either way.
    """


class _RecordRefused(Exception):
    """The stage or the upsert hit a record's data error: the transaction rolls back and the batch goes again,
    isolating (rare: so the usual path needs no savepoint around its COPY, two round trips a batch)."""


def _load_in_transaction(conn: psycopg.Connection[Any], spec: JobSpec, job: str, run: str, batch: int,
                         attempt: int, began: dict[str, Any], started: float, planned: PlannedBatch,
                         checker: RecordChecker, ord_base: int, *, isolate: bool = False) -> BatchOutcome:
    """One try at the batch in one transaction. ``isolate``: the rare path where the records PostgreSQL
    refuses (in the stage or in the upsert) are found and rejected one by one.

    The usual path's round trips: BEGIN, the COPY, the upsert, then the attempt's end, its event and the
    commit row pipelined into one, and COMMIT.
    """
    rejected: list[tuple[int, bytes, list[RecordProblem]]] = []
    raws: dict[int, bytes] = {}
    with conn.transaction():
        # Validate while copying: accepted records stream into the temp stage in chunks, so
        # PostgreSQL parses one chunk into jsonb while this process checks the next (one worker
        # keeps two cores busy). The stage is this session's own temp table: no lock is taken and
        # nothing is visible to anyone until the upsert below, and a rollback empties it.
        if isolate:
            # PostgreSQL is the last validator: it refused a record our checks accepted. Read the batch
            # again and stage it in halves, leaving out only the records it refuses (rare: see
            # validation's numeric check). They become json_shape rejects with its message.
            rejected, valid, raws = _stage_refusing(conn, planned, checker, ord_base, spec.storage_options)
        else:
            try:
                with staging(conn) as stage:
                    for line_no, raw in read_batch(planned, spec.storage_options):
                        record, problems = checker.check(raw)
                        if record is None:
                            rejected.append((line_no, raw, problems))
                        else:
                            stage.add(ord_base + line_no, record.source_id, record.text)
            except psycopg.Error as exc:
                if is_record_refusal(exc):
                    raise _RecordRefused from exc  # the whole transaction rolls back; isolating goes next
                raise
            valid = stage.rows
        attempted = valid + len(rejected)
        if isolate and not states.holds_batch(conn, job, run, batch, attempt):
            raise _NotCommitted  # taken over while it was read: nothing more to do in this transaction
        inserted = updated = 0
        if valid and isolate:
            inserted, updated, refused = upsert_isolating(conn, spec.target_schema, spec.target_table, job=job,
                                                          run=run, run_seq=int(began["run_seq"]))
            for r in refused:
                raw = raws[r.pos - ord_base]
                rejected.append((r.pos - ord_base, raw,
                                 [RecordProblem(ErrorClass.JSON_SHAPE, "$", r.message, sample_raw(raw))]))
            rejected.sort(key=lambda x: x[0])
            valid -= len(refused)
        elif valid:
            try:
                inserted, updated = upsert_stage(conn, spec.target_schema, spec.target_table, job=job, run=run,
                                                 run_seq=int(began["run_seq"]))
            except psycopg.Error as exc:
                if is_record_refusal(exc):
                    raise _RecordRefused from exc
                raise
        if rejected:
            _write_rejects(conn, job, run, batch, planned.file, rejected)
        required = sum(1 for _, _, p in rejected if p[0].error_class == ErrorClass.REQUIRED_FIELD)
        ms = (time.perf_counter() - started) * 1000
        # One round trip: the commit row (the batch row locked first, as every writer of a batch does), the
        # attempt's end and its event. If the commit row matches nothing, the rollback takes the other two
        # back and the event is never logged.
        with conn.pipeline():
            committed = states.commit_batch_sent(conn, job, run, batch, attempt, inserted=inserted,
                                                 updated=updated, valid=valid, rejected=len(rejected),
                                                 required=required, ms=ms)
            _end_attempt(conn, job, run, batch, attempt, AttemptStatus.SUCCEEDED, started)
            echo = record_event(conn, job, run, "batch_committed", batch=batch, attempt=attempt,
                                rows_attempted=attempted, rows_inserted=inserted, rows_updated=updated,
                                rows_validated=valid, validation_failures=len(rejected), duration_ms=round(ms, 1))
        if not committed():
            # The commit row matches only the attempt holding the batch of a loading run: another execution
            # took the batch over while this one loaded, or the run was canceled (the cancel is a barrier).
            # Either way this attempt's rows roll back; _attempt finds out which it was.
            raise _NotCommitted
    echo()
    return BatchOutcome("succeeded", attempts=attempt, rows_inserted=inserted, rows_updated=updated,
                        validation_failures=len(rejected))


class _Isolate(Exception):
    """Stage the batch the slow way from the start (see _load_in_transaction's ``isolate``)."""


def _stage_refusing(conn: psycopg.Connection[Any], planned: PlannedBatch, checker: RecordChecker, ord_base: int,
                    options: dict[str, Any] | None
                    ) -> tuple[list[tuple[int, bytes, list[RecordProblem]]], int, dict[int, bytes]]:
    """The batch staged again without the records PostgreSQL refuses: (rejected records, rows staged, the
    staged records' raw text by line number)."""
    rejected: list[tuple[int, bytes, list[RecordProblem]]] = []
    rows: list[StageRow] = []
    raws: dict[int, bytes] = {}
    for line_no, raw in read_batch(planned, options):
        record, problems = checker.check(raw)
        if record is None:
            rejected.append((line_no, raw, problems))
        else:
            rows.append(StageRow(ord_base + line_no, record.source_id, record.text, line_no))
            raws[line_no] = raw
    refused = stage_isolating(conn, rows)
    for row, message in refused:
        raw = raws[row.line_no]
        rejected.append((row.line_no, raw, [RecordProblem(ErrorClass.JSON_SHAPE, "$", message, sample_raw(raw))]))
    rejected.sort(key=lambda r: r[0])
    return rejected, len(rows) - len(refused), raws


def _end_attempt(conn: psycopg.Connection[Any], job: str, run: str, batch: int, attempt: int,
                 status: AttemptStatus, started: float, code: str | None = None, message: str | None = None,
                 stack: str | None = None) -> None:
    states.end_attempt(conn, job, run, batch, attempt, status, ms=(time.perf_counter() - started) * 1000,
                       code=code, message=message, stack=stack)


def _write_rejects(conn: psycopg.Connection[Any], job: str, run: str, batch: int, file: str,
                   rejected: list[tuple[int, bytes, list[RecordProblem]]]) -> None:
    with conn.cursor().copy(COPY_REJECTS.format(ledger_table("rejects"))) as copy:
        for line_no, raw, problems in rejected:
            first = problems[0]
            cut = raw[:REJECT_RECORD_MAX_BYTES]
            text = cut.decode("utf-8", errors="replace").replace("\x00", "\\u0000")
            clean = [p.to_dict() for p in problems]
            copy.write_row((job, run, batch, file, line_no, first.error_class.value, clean[0]["path"],
                            clean[0]["message"], clean[0]["sample_value"], Jsonb(clean), text,
                            len(raw) > REJECT_RECORD_MAX_BYTES or isinstance(raw, OversizedRecord)))


def _record_failure(job: str, run: str, batch: int, attempt: int | None, *, retry: bool, code: str,
                    message: str, stack: str, ms: float) -> bool:
    """Write a failed attempt to the ledger; False when the database cannot be reached."""
    level = "warning" if retry else "error"
    event = "attempt_failed_will_retry" if retry else "batch_failed"
    try:
        with db.connection() as conn, conn.transaction():
            if attempt is not None:
                states.fail_attempt(conn, job, run, batch, attempt, retry=retry, code=code, message=message,
                                    stack=stack, ms=ms)
            elif not retry:
                # The attempt never started (the database was unreachable): fail the batch as it stands.
                states.fail_unstarted(conn, job, run, batch, code=code, message=message, stack=stack)
            log_event(conn, job, run, event, level=level, batch=batch, attempt=attempt, error_code=code,
                      error=message)
        return True
    except Exception:  # noqa: BLE001 - the database is down too; the process log keeps it
        log_event(None, job, run, event, level=level, batch=batch, attempt=attempt, error_code=code,
                  error=message)
        return False


def finish_run_if_done(job: str, run: str, conn: psycopg.Connection[Any] | None = None) -> str | None:
    """Move a run whose batches have all ended to committing, then to its final state.

    Called after every batch (on the batch's own connection when given, outside any transaction); safe
    when several batches end at once (one caller wins). Returns the final status when this call finished
    the run.
    """
    if conn is None:
        with db.connection() as own:
            return finish_run_if_done(job, run, own)
    if not states.start_committing(conn, job, run):
        return None
    with conn.transaction():
        row = states.finalize_run(conn, job, run)
        if row is None:
            return None
        status = str(row[0])
        log_event(conn, job, run, "run_completed", level="info" if status == "success" else "warning",
                  status=status, batches_succeeded=row[1], batches_failed=row[2])
    lineage.run_event(job, run, status)
    return status
