"""The run and batch state machine: the states, the allowed transitions, and the guarded SQL of each.

Every status change of the ledger is one function here. Its ``WHERE`` clause is the fence: it names
the states the row may be in (and, for a batch, the attempt that must hold it), so a late, duplicate
or concurrent caller changes nothing instead of overwriting a newer state. That is what makes a
batch load exactly once while RQ delivers at least once, and why no other module writes a status.
The ledger's CHECK constraints (migration 0002) refuse any status not named here.

Runs (``idle`` is what the console shows before a run exists; it is never stored)::

    create       (new)                                  -> queued
    plan         queued | validating                    -> validating   (a lost planner is replaced)
    planned      validating                             -> loading | success (no records)
    plan_failed  queued | validating                    -> failed
    queue_failed queued                                 -> failed       (Redis down at start)
    cancel       queued | validating | loading | committing -> canceled
    drained      loading, no batch open                 -> committing   (one caller wins)
    finalize     committing                             -> success | partial_success | failed
    resume       committing                             -> loading      (the finisher died; reconciler)
    retry        failed | partial_success               -> loading

    the usual path: queued -> validating -> loading -> committing -> success

Batches (each attempt is a row of ``attempts``: running, then succeeded | retrying | failed |
abandoned | skipped | canceled)::

    plan           (new)                      -> pending
    claim          pending | retried | running -> running  (run loading; a new attempt takes over)
    commit         running, by its attempt    -> succeeded
    fail_attempt   running, by its attempt    -> retried | failed
    fail_unstarted pending | retried | running -> failed   (the database stayed unreachable)
    abandon        running | retried          -> pending | failed (its worker stopped beating; failed
                                                         as worker_lost in its last allowed attempt)
    requeue        failed                     -> pending   (retry)
    cancel         pending | retried          -> canceled  (with the run's cancel: never to run)
    cancel_attempt running, by its attempt    -> canceled  (its commit found the run canceled: rolled back)
    abandon_canceled pending | retried | running -> canceled (of a canceled run that nobody will end:
                                                         the reconciler; running only once its worker is lost)

    the usual path: pending -> running -> succeeded (or running -> retried -> running -> succeeded)

Example::

    with db.connection() as conn:
        began = states.claim_batch(conn, "orders", run_id, 0, worker="w1", trigger="auto")
        # None: the batch is not ours to load (committed, canceled, or the run is not loading)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .db import ledger_sql, ledger_table, next_change


class RunStatus(str, Enum):
    """Where a run is. Final states: success, partial_success, failed, canceled."""

    IDLE = "idle"  # shown by the console before any run exists; never stored
    QUEUED = "queued"
    VALIDATING = "validating"
    LOADING = "loading"
    COMMITTING = "committing"
    SUCCESS = "success"
    PARTIAL_SUCCESS = "partial_success"
    FAILED = "failed"
    CANCELED = "canceled"


class BatchStatus(str, Enum):
    """Where a batch is; ``retried`` means an attempt failed transiently and another is due."""

    PENDING = "pending"
    RUNNING = "running"
    RETRIED = "retried"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"  # never ran, or its commit was refused: the run was canceled (migration 0003)


class AttemptStatus(str, Enum):
    """How one attempt at a batch ended (``running`` while it runs)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the batch failed for good with this attempt
    RETRYING = "retrying"  # transient failure; another attempt follows
    ABANDONED = "abandoned"  # the worker died during the attempt
    SKIPPED = "skipped"  # a duplicate delivery of an already committed batch: nothing done
    CANCELED = "canceled"  # reached its commit after the run was canceled: rolled back (migration 0003)


ACTIVE_RUN_STATES = (RunStatus.QUEUED, RunStatus.VALIDATING, RunStatus.LOADING, RunStatus.COMMITTING)
FINAL_RUN_STATES = (RunStatus.SUCCESS, RunStatus.PARTIAL_SUCCESS, RunStatus.FAILED, RunStatus.CANCELED)
#: The channel a run's move into a final state is announced on (ledger 0007's trigger on ``runs``; payload:
#: JSON with the ledger ``schema``, ``job``, ``run`` and ``status``). ``wait_for_run`` listens on it.
RUN_END_CHANNEL = "dataloader_run_end"
#: Runs whose failed batches may be retried.
RETRYABLE_RUN_STATES = (RunStatus.FAILED, RunStatus.PARTIAL_SUCCESS)
#: The run states the ledger may hold (``idle`` is the console's word for "no run yet").
STORED_RUN_STATES = tuple(s for s in RunStatus if s is not RunStatus.IDLE)
#: Batches not yet ended: the run cannot finish while one of its batches is in one of these.
OPEN_BATCH_STATES = (BatchStatus.PENDING, BatchStatus.RUNNING, BatchStatus.RETRIED)


@dataclass(frozen=True)
class Transition:
    """One guarded change: from any of ``sources`` (None: the row is created) to one of ``targets``."""

    name: str
    sources: frozenset[Any]
    targets: frozenset[Any]


def _t(name: str, sources: tuple[Any, ...], targets: tuple[Any, ...]) -> Transition:
    return Transition(name, frozenset(sources), frozenset(targets))


R, B = RunStatus, BatchStatus
RUN_TRANSITIONS = (
    _t("create", (None,), (R.QUEUED,)),
    _t("plan", (R.QUEUED, R.VALIDATING), (R.VALIDATING,)),
    _t("planned", (R.VALIDATING,), (R.LOADING, R.SUCCESS)),
    _t("plan_failed", (R.QUEUED, R.VALIDATING), (R.FAILED,)),
    _t("queue_failed", (R.QUEUED,), (R.FAILED,)),
    _t("cancel", ACTIVE_RUN_STATES, (R.CANCELED,)),
    _t("drained", (R.LOADING,), (R.COMMITTING,)),
    _t("finalize", (R.COMMITTING,), (R.SUCCESS, R.PARTIAL_SUCCESS, R.FAILED)),
    _t("resume", (R.COMMITTING,), (R.LOADING,)),
    _t("retry", RETRYABLE_RUN_STATES, (R.LOADING,)),
)
BATCH_TRANSITIONS = (
    _t("plan", (None,), (B.PENDING,)),
    _t("claim", (B.PENDING, B.RETRIED, B.RUNNING), (B.RUNNING,)),
    _t("commit", (B.RUNNING,), (B.SUCCEEDED,)),
    _t("fail_attempt", (B.RUNNING,), (B.RETRIED, B.FAILED)),
    _t("fail_unstarted", (B.PENDING, B.RETRIED, B.RUNNING), (B.FAILED,)),
    _t("abandon", (B.RUNNING, B.RETRIED), (B.PENDING, B.FAILED)),
    _t("requeue", (B.FAILED,), (B.PENDING,)),
    _t("cancel", (B.PENDING, B.RETRIED), (B.CANCELED,)),
    _t("cancel_attempt", (B.RUNNING,), (B.CANCELED,)),
    _t("abandon_canceled", (B.PENDING, B.RETRIED, B.RUNNING), (B.CANCELED,)),
)
del R, B


def _allowed(transitions: tuple[Transition, ...]) -> dict[Any, frozenset[Any]]:
    edges: dict[Any, set[Any]] = {}
    for t in transitions:
        for source in t.sources:
            edges.setdefault(source, set()).update(t.targets)
    return {k: frozenset(v) for k, v in edges.items()}


#: state -> the states it may move to (None: a new row). Everything else is forbidden.
ALLOWED_RUN: dict[RunStatus | None, frozenset[RunStatus]] = _allowed(RUN_TRANSITIONS)
ALLOWED_BATCH: dict[BatchStatus | None, frozenset[BatchStatus]] = _allowed(BATCH_TRANSITIONS)


@dataclass(frozen=True)
class Look:
    """How a state looks to people: never colour alone, always an icon and a word."""

    label: str
    icon: str  # a Streamlit material icon
    color: str
    glyph: str  # the CLI's one-character icon


RUN_LOOKS: dict[RunStatus, Look] = {
    RunStatus.IDLE: Look("Idle", ":material/radio_button_unchecked:", "gray", ""),
    RunStatus.QUEUED: Look("Queued", ":material/schedule:", "gray", "…"),
    RunStatus.VALIDATING: Look("Validating", ":material/fact_check:", "blue", "🔎"),
    RunStatus.LOADING: Look("Loading", ":material/sync:", "blue", "⏳"),
    RunStatus.COMMITTING: Look("Committing", ":material/save:", "blue", "⏳"),
    RunStatus.SUCCESS: Look("Success", ":material/check_circle:", "green", "✔"),
    RunStatus.PARTIAL_SUCCESS: Look("Partial success", ":material/warning:", "orange", "⚠"),
    RunStatus.FAILED: Look("Failed", ":material/cancel:", "red", "✖"),
    RunStatus.CANCELED: Look("Canceled", ":material/block:", "gray", "⊘"),
}
#: Batch labels are the status words themselves (the grid and the contract's ``status_label`` show them),
#: except ``canceled``, which says why the batch never ran.
BATCH_LOOKS: dict[BatchStatus, Look] = {
    BatchStatus.PENDING: Look("pending", ":material/schedule:", "gray", "…"),
    BatchStatus.RUNNING: Look("running", ":material/sync:", "blue", "⏳"),
    BatchStatus.RETRIED: Look("retried", ":material/replay:", "orange", "↻"),
    BatchStatus.SUCCEEDED: Look("succeeded", ":material/check_circle:", "green", "✔"),
    BatchStatus.FAILED: Look("failed", ":material/cancel:", "red", "✖"),
    BatchStatus.CANCELED: Look("not started (run canceled)", ":material/block:", "gray", "⊘"),
}
UNKNOWN_LOOK = Look("Unknown", ":material/help:", "gray", "?")


def run_look(status: str | None) -> Look:
    """The look of a run status (None: no run yet, ``idle``); an unknown word looks unknown."""
    try:
        return RUN_LOOKS[RunStatus(status or RunStatus.IDLE.value)]
    except ValueError:
        return UNKNOWN_LOOK


def batch_status_label(status: str, attempts: int) -> str:
    """``retried(n)`` for a batch waiting for its next attempt, else the batch's label.

    Example::

        >>> batch_status_label("retried", 2)
        'retried(2)'
    """
    if status == BatchStatus.RETRIED.value:
        return f"{BATCH_LOOKS[BatchStatus.RETRIED].label}({max(attempts, 1)})"
    try:
        return BATCH_LOOKS[BatchStatus(status)].label
    except ValueError:
        return status


def check_constraint(column: str, states: tuple[Enum, ...]) -> str:
    """The CHECK expression that keeps ``column`` to ``states`` (migration 0002 and its test use it)."""
    return f"{column} IN ({', '.join(repr(str(s.value)) for s in states)})"


Conn = psycopg.Connection[Any]


# ---- runs ---------------------------------------------------------------------------------------

_CREATE_RUN = sql.SQL(
    "INSERT INTO {} (etl_job_id, etl_run_id, status, batch_size, max_attempts, target_table, "
    "spec, forced, queue, started_by) VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s)")


def create_run(conn: Conn, job: str, run: str, *, batch_size: int, max_attempts: int, target: str,
               spec: dict[str, Any], forced: bool, queue: str, started_by: str) -> None:
    """(start) -> queued. A duplicate run id raises psycopg's UniqueViolation."""
    conn.execute(_CREATE_RUN.format(ledger_table("runs")),
                 [job, run, batch_size, max_attempts, target, Jsonb(spec), forced, queue, started_by])


_PLAN = sql.SQL(
    "UPDATE {} SET status = 'validating', plan_worker = %s, change_seq = {} WHERE etl_job_id = %s "
    "AND etl_run_id = %s AND status IN ('queued', 'validating') RETURNING spec, batch_size")


def start_planning(conn: Conn, job: str, run: str, worker: str | None) -> tuple[Any, ...] | None:
    """queued | validating -> validating; returns (spec, batch_size), None when canceled or planned already.

    ``validating`` again is allowed: a planner that died is replaced by the next delivery.
    """
    return conn.execute(_PLAN.format(ledger_table("runs"), next_change()), [worker, job, run]).fetchone()


def holds_planning(conn: Conn, job: str, run: str) -> bool:
    """Take the run's planning lock (inside a transaction); True when the run is still validating, so ours
    to plan.

    The lock is a transaction-scoped advisory lock, not the run row: two deliveries of the planning job
    take turns, while a cancel (which locks the run row) never waits for a planner reading its source.
    False means another delivery got there first (the run is loading, or canceled): its batches may be
    loading already and must never be planned again.
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"dataloader.plan.{job}/{run}"])
    return run_is(conn, job, run, RunStatus.VALIDATING)


def run_is(conn: Conn, job: str, run: str, status: RunStatus) -> bool:
    """True when the run is in ``status`` now (a plain read: no lock)."""
    row = conn.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
        ledger_table("runs")), [job, run]).fetchone()
    return row is not None and row[0] == status.value


_PLANNED = sql.SQL(
    "UPDATE {} SET status = %s, batches_total = %s, rows_planned = %s, planned_at = clock_timestamp(), "
    "completed_at = CASE WHEN %s THEN clock_timestamp() END, change_seq = {} "
    "WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'validating'")


def finish_planning(conn: Conn, job: str, run: str, *, batches: int, rows: int) -> RunStatus | None:
    """validating -> loading, or success when the source held no records; None when the run was canceled
    meanwhile (the caller rolls its batches back)."""
    status = RunStatus.LOADING if batches else RunStatus.SUCCESS
    moved = conn.execute(_PLANNED.format(ledger_table("runs"), next_change()),
                         [status.value, batches, rows, batches == 0, job, run]).rowcount > 0
    return status if moved else None


_FAIL_PLANNING = sql.SQL(
    "UPDATE {} SET status = 'failed', error_code = %s, error_message = %s, completed_at = clock_timestamp(), "
    "change_seq = {} WHERE etl_job_id = %s AND etl_run_id = %s AND status IN ('queued', 'validating')")


def fail_planning(conn: Conn, job: str, run: str, *, code: str, message: str) -> bool:
    """queued | validating -> failed (the source or the target table is broken)."""
    return conn.execute(_FAIL_PLANNING.format(ledger_table("runs"), next_change()),
                        [code, message, job, run]).rowcount > 0


_FAIL_QUEUED = sql.SQL(
    "UPDATE {} SET status = 'failed', error_code = 'queue', error_message = %s, "
    "completed_at = clock_timestamp(), change_seq = {} WHERE etl_job_id = %s AND etl_run_id = %s "
    "AND status = 'queued'")


def fail_queued(conn: Conn, job: str, run: str, message: str) -> bool:
    """queued -> failed: the run could not even be queued (Redis down)."""
    return conn.execute(_FAIL_QUEUED.format(ledger_table("runs"), next_change()), [message, job, run]).rowcount > 0


_CANCEL = sql.SQL(
    "UPDATE {} SET status = 'canceled', canceled_at = clock_timestamp(), completed_at = clock_timestamp(), "
    "change_seq = {} WHERE etl_job_id = %s AND etl_run_id = %s "
    "AND status IN ('queued', 'validating', 'loading', 'committing')")


def cancel_run(conn: Conn, job: str, run: str) -> bool:
    """queued | validating | loading | committing -> canceled; False when the run had ended already."""
    return conn.execute(_CANCEL.format(ledger_table("runs"), next_change()), [job, run]).rowcount > 0


_DRAINED = sql.SQL("""
    UPDATE {runs} SET status = 'committing', change_seq = {next}
    WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s AND status = 'loading'
      AND NOT EXISTS (SELECT 1 FROM {batches} WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s
                      AND status IN ('pending', 'running', 'retried'))
    RETURNING 1""")  # IN, not NOT IN: three index probes instead of a scan of every batch of the run


def start_committing(conn: Conn, job: str, run: str) -> bool:
    """loading -> committing, only once no batch of the run is pending, running or retried.

    When several batches end at once, exactly one caller gets True and goes on to :func:`finalize_run`.
    """
    return conn.execute(ledger_sql(_DRAINED, runs="runs", batches="batches"),
                        {"job": job, "run": run}).fetchone() is not None


_FINALIZE = sql.SQL("""
    WITH c AS (
        SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok, count(*) FILTER (WHERE status = 'failed') AS bad,
               max(committed_at) AS loaded_at
        FROM {batches} WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s
    )
    UPDATE {runs} r SET status = CASE WHEN c.bad = 0 THEN 'success' WHEN c.ok = 0 THEN 'failed'
                                      ELSE 'partial_success' END,
           completed_at = clock_timestamp(), loaded_at = c.loaded_at, change_seq = {next}
    FROM c WHERE r.etl_job_id = %(job)s AND r.etl_run_id = %(run)s AND r.status = 'committing'
    RETURNING r.status, c.ok, c.bad""")


def finalize_run(conn: Conn, job: str, run: str) -> tuple[Any, ...] | None:
    """committing -> success | partial_success | failed by the batches' outcome: (status, ok, bad)."""
    return conn.execute(_FINALIZE.format(runs=ledger_table("runs"), batches=ledger_table("batches"),
                                         next=next_change()), {"job": job, "run": run}).fetchone()


_RESUME = sql.SQL(
    "UPDATE {} SET status = 'loading' WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'committing'")


def resume_committing(conn: Conn, job: str, run: str) -> bool:
    """committing -> loading: a finisher died between the two steps; the reconciler finishes it again."""
    return conn.execute(_RESUME.format(ledger_table("runs")), [job, run]).rowcount > 0


_REOPEN = sql.SQL(
    "UPDATE {} SET status = 'loading', completed_at = NULL, change_seq = {} "
    "WHERE etl_job_id = %s AND etl_run_id = %s AND status IN ('failed', 'partial_success')")


def reopen_for_retry(conn: Conn, job: str, run: str) -> bool:
    """failed | partial_success -> loading, with :func:`requeue_failed_batches` in the same transaction."""
    return conn.execute(_REOPEN.format(ledger_table("runs"), next_change()), [job, run]).rowcount > 0


# ---- batches ------------------------------------------------------------------------------------

_CLAIM = sql.SQL("""
    WITH b AS (
        UPDATE {batches} b SET status = 'running', attempts = b.attempts + 1, started_at = clock_timestamp(),
               worker = %(worker)s, change_seq = {next}
        FROM {runs} r
        WHERE b.etl_job_id = %(job)s AND b.etl_run_id = %(run)s AND b.batch_index = %(batch)s
          AND r.etl_job_id = b.etl_job_id AND r.etl_run_id = b.etl_run_id
          AND r.status = 'loading' AND b.status IN ('pending', 'retried', 'running')
        RETURNING b.attempts, b.started_at, b.source_file, b.file_size, b.file_mtime_ns, b.byte_start,
                  b.byte_end, b.line_start, b.line_count, b.ord_start, b.has_payload, b.rows_attempted,
                  b.checksum, r.run_seq, r.max_attempts
    ), a AS (
        INSERT INTO {attempts} (etl_job_id, etl_run_id, batch_index, attempt, status, trigger, worker, started_at)
        SELECT %(job)s, %(run)s, %(batch)s, attempts, 'running', %(trigger)s, %(worker)s, started_at FROM b
    ), taken AS (
        UPDATE {attempts} t SET status = 'abandoned', ended_at = clock_timestamp(), error_code = 'taken_over',
            error_message = 'a new attempt took the batch over before this one ended'
        FROM b WHERE t.etl_job_id = %(job)s AND t.etl_run_id = %(run)s AND t.batch_index = %(batch)s
          AND t.attempt < b.attempts AND t.status = 'running'
    )
    SELECT * FROM b""")


def claim_batch(conn: Conn, job: str, run: str, batch: int, *, worker: str | None,
                trigger: str) -> dict[str, Any] | None:
    """pending | retried | running -> running as a new attempt, only while the run is loading.

    Returns the batch's plan and the new attempt number (``attempts``), or None when the batch is not
    startable (committed, failed, the run canceled). ``running`` is claimable because RQ may deliver a
    batch again while (or after) an earlier execution holds it: the newer attempt takes over, and the
    older one's :func:`commit_batch` matches nothing, so it rolls back. The attempt taken over ends here,
    ``abandoned`` with code ``taken_over``: its worker may be dead (killed, or its failure could not be
    recorded), and nobody else would end it.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(ledger_sql(_CLAIM, batches="batches", runs="runs", attempts="attempts"),
                    {"job": job, "run": run, "batch": batch, "worker": worker, "trigger": trigger})
        return cur.fetchone()


_HOLDS = sql.SQL(
    "SELECT status, attempts FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s FOR UPDATE")


def holds_batch(conn: Conn, job: str, run: str, batch: int, attempt: int) -> bool:
    """Lock the batch row (inside a transaction); True when ``attempt`` still holds it.

    After a commit row matched nothing, it tells a batch taken over since its claim (a redelivery, the
    reconciler) from a run canceled while it loaded; the isolating path also asks before its upserts.
    """
    row = conn.execute(ledger_sql(_HOLDS, "batches"), [job, run, batch]).fetchone()
    return row is not None and row[0] == BatchStatus.RUNNING.value and row[1] == attempt


_COMMIT = sql.SQL("""
    WITH r AS (  -- the cancel barrier: held to this transaction's end; the cancel's FOR NO KEY UPDATE waits
        -- for it (not KEY SHARE: foreign-key checks take that, and would deadlock with the cancel)
        SELECT 1 FROM {runs} WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s AND status = 'loading'
        FOR SHARE
    )
    UPDATE {batches} SET status = 'succeeded', rows_inserted = %(ins)s, rows_updated = %(upd)s,
        rows_validated = %(valid)s, rows_superseded = %(superseded)s, validation_failures = %(rejected)s,
        required_field_errors = %(req)s, json_shape_errors = %(shape)s, duration_ms = %(ms)s,
        committed_at = clock_timestamp(), ended_at = clock_timestamp(), error_code = NULL,
        error_message = NULL, error_stack = NULL, change_seq = {next}
    WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s AND batch_index = %(batch)s
      AND status = 'running' AND attempts = %(attempt)s AND EXISTS (SELECT 1 FROM r)
    RETURNING 1""")


def commit_batch(conn: Conn, job: str, run: str, batch: int, attempt: int, *, inserted: int, updated: int,
                 valid: int, rejected: int, required: int, ms: float) -> bool:
    """running (by ``attempt``) -> succeeded, with its counts; in the transaction that upserted its rows.

    Only while the run is ``loading``: the run row stays share-locked until the transaction ends, so a
    cancel (which locks the run FOR NO KEY UPDATE) waits for commits in flight and no batch commits after it.
    False: another attempt took the batch over, or the run is no longer loading (canceled); the caller
    rolls back and asks :func:`holds_batch` which, then ends its attempt skipped or :func:`cancel_attempt`.
    """
    return commit_batch_sent(conn, job, run, batch, attempt, inserted=inserted, updated=updated, valid=valid,
                             rejected=rejected, required=required, ms=ms)()


def commit_batch_sent(conn: Conn, job: str, run: str, batch: int, attempt: int, *, inserted: int, updated: int,
                      valid: int, rejected: int, required: int, ms: float) -> Callable[[], bool]:
    """:func:`commit_batch`'s statement sent now, its answer (RETURNING) read when the result is called.

    In a pipeline, the attempt's end and its event are queued after it and ride the same round trip, while
    the batch row is locked first: every writer of a batch locks its ``batches`` row before its ``attempts``
    row (the claim, the reconciler, a failure), so a commit racing a redelivery's claim cannot deadlock.
    """
    cur = conn.execute(ledger_sql(_COMMIT, batches="batches", runs="runs"), {
        "ins": inserted, "upd": updated, "valid": valid, "superseded": valid - inserted - updated,
        "rejected": rejected, "req": required, "shape": rejected - required, "ms": ms,
        "job": job, "run": run, "batch": batch, "attempt": attempt})
    return lambda: cur.fetchone() is not None


_FAIL_ATTEMPT = sql.SQL("""
    UPDATE {batches} SET status = %(status)s, duration_ms = %(ms)s, ended_at = clock_timestamp(),
        error_code = %(code)s, error_message = %(message)s, error_stack = %(stack)s, change_seq = {next}
    WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s AND batch_index = %(batch)s
      AND attempts = %(attempt)s AND status = 'running'""")


def fail_attempt(conn: Conn, job: str, run: str, batch: int, attempt: int, *, retry: bool, code: str,
                 message: str, stack: str, ms: float) -> bool:
    """running (by ``attempt``) -> retried (another attempt is due) or failed; ends the attempt too.

    The batch row first, then the attempt's (the order every writer of a batch keeps: no deadlock with a
    claim of the same batch).
    """
    moved = conn.execute(ledger_sql(_FAIL_ATTEMPT, batches="batches"), {
        "status": (BatchStatus.RETRIED if retry else BatchStatus.FAILED).value, "ms": ms, "code": code,
        "message": message, "stack": stack, "job": job, "run": run, "batch": batch, "attempt": attempt,
    }).rowcount > 0
    end_attempt(conn, job, run, batch, attempt, AttemptStatus.RETRYING if retry else AttemptStatus.FAILED,
                ms=ms, code=code, message=message, stack=stack)
    return moved


_FAIL_UNSTARTED = sql.SQL(
    "UPDATE {} SET status = 'failed', ended_at = clock_timestamp(), error_code = %s, "
    "error_message = %s, error_stack = %s, change_seq = {} WHERE etl_job_id = %s "
    "AND etl_run_id = %s AND batch_index = %s AND status IN ('pending', 'retried', 'running')")


def fail_unstarted(conn: Conn, job: str, run: str, batch: int, *, code: str, message: str, stack: str) -> bool:
    """pending | retried | running -> failed: no attempt could start (the database stayed unreachable)."""
    return conn.execute(_FAIL_UNSTARTED.format(ledger_table("batches"), next_change()),
                        [code, message, stack, job, run, batch]).rowcount > 0


_ABANDON = sql.SQL("""
    WITH stale AS (
        SELECT b.etl_job_id, b.etl_run_id, b.batch_index, b.attempts, b.worker, b.attempts >= r.max_attempts AS spent
        FROM {batches} b JOIN {runs} r USING (etl_job_id, etl_run_id)
        WHERE r.status = 'loading' AND r.queue = %(queue)s AND b.status IN ('running', 'retried')
          AND NOT EXISTS (SELECT 1 FROM {workers} w WHERE w.name = b.worker
                          AND w.heartbeat_at > now() - make_interval(secs => %(stale)s))
          AND b.started_at < now() - make_interval(secs => %(stale)s)
        FOR UPDATE OF b SKIP LOCKED
    ), reset AS (
        -- Every attempt counts: a batch whose worker was lost in its last allowed attempt fails for good
        -- (a batch that kills every worker that takes it must not loop); the others are queued again.
        UPDATE {batches} b SET status = CASE WHEN s.spent THEN 'failed' ELSE 'pending' END,
            queued_at = now(), change_seq = {next},
            ended_at = CASE WHEN s.spent THEN clock_timestamp() ELSE b.ended_at END,
            error_code = CASE WHEN s.spent THEN 'worker_lost' ELSE b.error_code END,
            error_message = CASE WHEN s.spent THEN format(
                'the worker stopped beating during attempt %%s of %%s (killed, out of memory, or its host was '
                'lost): no attempt left; retry the batch once the cause is found', s.attempts, r.max_attempts)
                ELSE b.error_message END
        FROM stale s JOIN {runs} r USING (etl_job_id, etl_run_id)
        WHERE (b.etl_job_id, b.etl_run_id, b.batch_index) = (s.etl_job_id, s.etl_run_id, s.batch_index)
        RETURNING b.etl_job_id, b.etl_run_id, b.batch_index, s.attempts, s.worker, s.spent
    ), gone AS (
        UPDATE {attempts} a SET status = 'abandoned', ended_at = clock_timestamp(),
            error_code = 'worker_lost', error_message = 'the worker stopped beating during this attempt'
        FROM reset r WHERE (a.etl_job_id, a.etl_run_id, a.batch_index, a.attempt)
                         = (r.etl_job_id, r.etl_run_id, r.batch_index, r.attempts) AND a.status = 'running'
    )
    SELECT etl_job_id, etl_run_id, batch_index, attempts, worker, spent FROM reset""")


def abandon_stale_batches(conn: Conn, *, queue: str, stale_after: float) -> list[tuple[Any, ...]]:
    """running | retried -> pending for batches of loading runs whose worker stopped beating, or -> failed
    (``worker_lost``) when that was the batch's last allowed attempt: every attempt counts.

    Their running attempt becomes ``abandoned``. Returns (job, run, batch, attempt, worker, failed) per batch.
    """
    return conn.execute(_ABANDON.format(batches=ledger_table("batches"), runs=ledger_table("runs"),
                                        attempts=ledger_table("attempts"), workers=ledger_table("workers"),
                                        next=next_change()), {"stale": stale_after, "queue": queue}).fetchall()


_CANCEL_BATCHES = sql.SQL("""
    UPDATE {batches} b SET status = 'canceled', ended_at = clock_timestamp(), change_seq = {next}
    FROM {runs} r
    WHERE b.etl_job_id = %(job)s AND b.etl_run_id = %(run)s AND b.status IN ('pending', 'retried')
      AND (%(batch)s::int IS NULL OR b.batch_index = %(batch)s)
      AND r.etl_job_id = b.etl_job_id AND r.etl_run_id = b.etl_run_id AND r.status = 'canceled'
    RETURNING b.batch_index, b.deliveries""")


def cancel_batches(conn: Conn, job: str, run: str, batch: int | None = None) -> list[tuple[int, int]]:
    """pending | retried -> canceled for a canceled run (or one ``batch`` of it): recorded as never to run.

    Returns (batch, delivery) of each, to take their RQ jobs off the queue.
    """
    return [(int(r[0]), int(r[1])) for r in conn.execute(
        _CANCEL_BATCHES.format(batches=ledger_table("batches"), runs=ledger_table("runs"), next=next_change()),
        {"job": job, "run": run, "batch": batch}).fetchall()]


_CANCEL_ATTEMPT = sql.SQL(
    "UPDATE {} SET status = 'canceled', ended_at = clock_timestamp(), duration_ms = %s, change_seq = {} "
    "WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s AND attempts = %s AND status = 'running' "
    "AND EXISTS (SELECT 1 FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'canceled')")


def cancel_attempt(conn: Conn, job: str, run: str, batch: int, attempt: int, *, ms: float) -> bool:
    """running (by ``attempt``) -> canceled: the attempt reached its commit after the run was canceled.

    Its rows were rolled back; the attempt ends ``canceled`` too.
    """
    moved = conn.execute(_CANCEL_ATTEMPT.format(ledger_table("batches"), next_change(), ledger_table("runs")),
                         [ms, job, run, batch, attempt, job, run]).rowcount > 0
    if moved:
        end_attempt(conn, job, run, batch, attempt, AttemptStatus.CANCELED, ms=ms, code="canceled",
                    message="the run was canceled before this batch committed: its rows were rolled back")
    return moved


_ABANDON_CANCELED = sql.SQL("""
    WITH stale AS (
        SELECT b.etl_job_id, b.etl_run_id, b.batch_index, b.attempts
        FROM {batches} b JOIN {runs} r USING (etl_job_id, etl_run_id)
        WHERE r.status = 'canceled' AND r.queue = %(queue)s AND (b.status IN ('pending', 'retried') OR (
            b.status = 'running'
            AND NOT EXISTS (SELECT 1 FROM {workers} w WHERE w.batch_job = b.etl_job_id AND w.batch_run = b.etl_run_id
                            AND w.batch_index = b.batch_index
                            AND w.heartbeat_at > now() - make_interval(secs => %(stale)s))
            AND b.started_at < now() - make_interval(secs => %(stale)s)))
        FOR UPDATE OF b SKIP LOCKED
    ), gone AS (
        UPDATE {attempts} a SET status = 'abandoned', ended_at = clock_timestamp(), error_code = 'worker_lost',
            error_message = CASE WHEN EXISTS (SELECT 1 FROM {workers} w WHERE w.name = a.worker
                                              AND w.heartbeat_at > now() - make_interval(secs => %(stale)s))
                THEN 'the worker gave this attempt up (it could not record its end) and went on with other work'
                ELSE 'the worker stopped beating during this attempt' END
        FROM stale s WHERE (a.etl_job_id, a.etl_run_id, a.batch_index, a.attempt)
                         = (s.etl_job_id, s.etl_run_id, s.batch_index, s.attempts) AND a.status = 'running'
    )
    UPDATE {batches} b SET status = 'canceled', ended_at = clock_timestamp(), change_seq = {next}
    FROM stale s WHERE (b.etl_job_id, b.etl_run_id, b.batch_index) = (s.etl_job_id, s.etl_run_id, s.batch_index)
    RETURNING b.etl_job_id, b.etl_run_id, b.batch_index""")


def abandon_canceled_batches(conn: Conn, *, queue: str, stale_after: float) -> list[tuple[Any, ...]]:
    """Batches of canceled runs that nobody will end, -> canceled: running ones that no live worker says it
    is executing (its worker stopped beating, or gave up on the batch while the ledger was unreachable and
    beats on for other work), and pending or retried ones (an attempt that failed while the cancel committed).

    A live worker ends its own at the commit (:func:`cancel_attempt`). Returns (job, run, batch) per batch.
    """
    return conn.execute(_ABANDON_CANCELED.format(batches=ledger_table("batches"), runs=ledger_table("runs"),
                                                 attempts=ledger_table("attempts"), workers=ledger_table("workers"),
                                                 next=next_change()),
                        {"stale": stale_after, "queue": queue}).fetchall()


_REQUEUE = sql.SQL(
    "UPDATE {} SET status = 'pending', queued_at = now(), error_code = NULL, error_message = NULL, "
    "error_stack = NULL, deliveries = deliveries + 1, change_seq = {} WHERE etl_job_id = %s AND etl_run_id = %s "
    "AND batch_index = ANY(%s) AND status = 'failed' RETURNING batch_index, deliveries")


def requeue_failed_batches(conn: Conn, job: str, run: str, batches: list[int]) -> dict[int, int]:
    """failed -> pending for the batches named (a retry), each as a new delivery: {batch: delivery}."""
    return {int(r[0]): int(r[1]) for r in conn.execute(
        _REQUEUE.format(ledger_table("batches"), next_change()), [job, run, batches]).fetchall()}


_NEXT_DELIVERIES = sql.SQL(
    "UPDATE {} SET deliveries = deliveries + 1, queued_at = now() WHERE etl_job_id = %s AND etl_run_id = %s "
    "AND batch_index = ANY(%s) AND status IN ('pending', 'retried', 'running') RETURNING batch_index, deliveries")


def next_deliveries(conn: Conn, job: str, run: str, batches: list[int]) -> dict[int, int]:
    """Number a new RQ delivery of each open batch named (not a state change): {batch: delivery}.

    The reconciler queues a batch again under a job id of its own (``queue.batch_job_id``); a batch that
    ended meanwhile is left out.
    """
    return {int(r[0]): int(r[1]) for r in conn.execute(
        _NEXT_DELIVERIES.format(ledger_table("batches")), [job, run, batches]).fetchall()}


_END_ATTEMPT = sql.SQL("""
    UPDATE {attempts} SET status = %(status)s, ended_at = clock_timestamp(), duration_ms = %(ms)s,
        error_code = %(code)s, error_message = %(message)s, error_stack = %(stack)s
    WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s AND batch_index = %(batch)s AND attempt = %(attempt)s
      AND status = 'running'""")


def end_attempt(conn: Conn, job: str, run: str, batch: int, attempt: int, status: AttemptStatus, *, ms: float,
                code: str | None = None, message: str | None = None, stack: str | None = None) -> None:
    """running -> ``status`` for one attempt (an attempt ends once; a later end changes nothing)."""
    conn.execute(ledger_sql(_END_ATTEMPT, attempts="attempts"), {
        "status": status.value, "ms": ms, "code": code, "message": message, "stack": stack,
        "job": job, "run": run, "batch": batch, "attempt": attempt})
