"""Run control in the ledger: create a run, cancel it, reset its failed batches for a retry."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from . import audit, config, db, lineage, states
from .catalog import JobSpec
from .db import ledger_table
from .errors import ConfigError, RunConflict, RunNotFound, ServiceError
from .events import log_event
from .states import ACTIVE_RUN_STATES, RETRYABLE_RUN_STATES, RunStatus

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class RunRef:
    """The lineage of a run: what to show people right after it starts."""

    etl_job_id: str
    etl_run_id: str
    status: str
    batch_size: int


def new_run_id() -> str:
    return str(uuid.uuid4())


def check_run_id(value: str) -> str:
    """A run id is a UUID (normalised to lower case) or a slug ``[a-z0-9][a-z0-9_-]{0,62}``.

    Example::

        >>> check_run_id("nightly-2026-11-27")
        'nightly-2026-11-27'
    """
    text = value.strip()
    if UUID_RE.match(text):
        return str(uuid.UUID(text))
    if SLUG_RE.match(text):
        return text
    raise ConfigError(
        f"run id {value!r} must be a UUID or a slug: lower-case letters, digits, '-' and '_', "
        "starting with a letter or digit, at most 63 characters", run=value)


def create_run(spec: JobSpec, *, actor: str, run_id: str | None = None, batch_size: int | None = None,
               force: bool = False) -> RunRef:
    """Insert a queued run; refuses a second active run of the same job unless ``force``.

    ``actor`` (who starts it) is recorded as the run's ``started_by`` and in the audit trail, in the same
    transaction: ``forced_start`` when ``force`` let it start beside a run in progress.
    """
    actor = audit.check_actor(actor)
    run = check_run_id(run_id) if run_id else new_run_id()
    size = config.check_batch_size(batch_size) if batch_size is not None else (
        spec.batch_size or config.default_batch_size())
    max_attempts = spec.max_attempts or config.get_int("ETL_MAX_ATTEMPTS", minimum=1)
    runs = ledger_table("runs")
    with db.connection() as conn, conn.transaction():
        # Serialises starts of one job, so two starts cannot both pass the in-progress check.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"dataloader.start.{spec.name}"])
        active = conn.execute(sql.SQL(
            "SELECT etl_run_id, status FROM {} WHERE etl_job_id = %s AND status = ANY(%s) "
            "ORDER BY started_at DESC LIMIT 1").format(runs),
            [spec.name, [s.value for s in ACTIVE_RUN_STATES]]).fetchone()
        if not force:
            if active is not None:
                raise RunConflict(
                    f"job {spec.name!r} already has a run in progress ({active[0]}, {active[1]}); "
                    "wait for it, cancel it, or force a concurrent run", job=spec.name, run=active[0])
        try:
            with conn.transaction():
                states.create_run(conn, spec.name, run, batch_size=size, max_attempts=max_attempts,
                                  target=spec.target, spec=spec.to_dict(), forced=force, queue=config.get("ETL_QUEUE"),
                                  started_by=actor)
        except psycopg.errors.UniqueViolation:
            raise RunConflict(f"run id {run!r} is already used by job {spec.name!r}; choose another",
                              job=spec.name, run=run) from None
        # A forced start is one that overrode a run in progress (force with none in progress is a plain start).
        if force and active is not None:
            audit.record(conn, spec.name, run, actor, audit.Action.FORCED_START, batch_size=size,
                         run_in_progress=active[0], its_status=active[1])
        else:
            audit.record(conn, spec.name, run, actor, audit.Action.START, batch_size=size)
        log_event(conn, spec.name, run, "run_queued", batch_size=size, forced=force, target=spec.target, actor=actor)
    lineage.run_event(spec.name, run, RunStatus.QUEUED.value)
    return RunRef(spec.name, run, RunStatus.QUEUED.value, size)


def fail_queued_run(job: str, run: str, message: str) -> None:
    """A run that could not even be queued (Redis down) must not stay 'queued' for ever."""
    with db.connection() as conn, conn.transaction():
        moved = states.fail_queued(conn, job, run, message)
        log_event(conn, job, run, "run_failed", level="error", error_code="queue", error=message)
    lineage.run_event(job, run, RunStatus.FAILED.value, moved=moved)


@dataclass(frozen=True)
class Cancellation:
    """What canceling a run did. The ledger says the run is canceled, whatever the queue said.

    ``dequeued`` jobs of the run left the queue; ``queue_error`` says why the queue (Redis) could
    not be reached, in which case its jobs of the run stay queued and each ends at once, loading
    nothing, when a worker takes it: the queue drains itself. ``status`` is ``canceled``, or the run's
    final state when every batch had already ended (the cancel came too late to stop anything: the run
    finishes as its batches say, ``note`` says so).
    """

    status: str
    dequeued: int
    queue_error: str | None = None
    note: str | None = None


QUEUE_DRAINS_ITSELF = ("its batch jobs stay queued and each ends at once, loading nothing, when a worker takes "
                       "it: the queue drains itself")


def cancel(job: str, run: str, *, actor: str) -> Cancellation:
    """Cancel an active run: batches not yet started never start; committed ones stay.

    The cancel is a barrier. It locks the run row, which waits only for batch commits in flight (each
    holds the row share-locked to its end, see ``states.commit_batch``); once it commits, no batch of
    the run commits: a batch that reaches its commit later rolls back and is recorded canceled. Unstarted
    batches are recorded ``canceled`` (never to run) in the same transaction, then their RQ jobs leave the
    queue, so a canceled 10k-batch run does not leave 10k jobs behind. Planning never holds the run row,
    so a cancel during planning returns at once and the planner stops. Redis being unreachable does not
    undo or fail the cancel. A run whose batches have all ended is not canceled but finished. ``actor``
    is recorded in the audit trail in the cancel's transaction, with what came of it (``outcome``).

    Example::

        >>> cancel("orders", "nightly-1", actor="ana@example.com").status  # doctest: +SKIP
        'canceled'
    """
    from .queue import group_size, remove_run_jobs

    actor = audit.check_actor(actor)
    runs = ledger_table("runs")
    with db.connection() as conn, lineage.after_commit(job, run) as lineage_run, conn.transaction():
        row = conn.execute(sql.SQL(
            "SELECT status, queue, batches_total, batch_size FROM {} WHERE etl_job_id = %s AND etl_run_id = %s "
            "FOR NO KEY UPDATE"
        ).format(runs), [job, run]).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run!r} for job {job!r}", job=job, run=run)
        status, queue, total, batch_size = row
        if status not in {s.value for s in ACTIVE_RUN_STATES}:
            raise RunConflict(f"run {job}/{run} is {status}: only a queued, validating, loading or committing run "
                              "can be canceled", job=job, run=run, status=status)
        if status in (RunStatus.LOADING.value, RunStatus.COMMITTING.value) and not _has_open_batches(conn, job, run):
            # Every batch ended before the cancel got the run: nothing is left to stop. The run ends as its
            # batches say (a run whose batches all committed is a success), as its last batch would have.
            if status == RunStatus.LOADING.value:
                states.start_committing(conn, job, run)
            final = states.finalize_run(conn, job, run)
            final_status = str(final[0]) if final else status
            note = f"every batch of the run had already ended: the run finished as {final_status}, not canceled"
            audit.record(conn, job, run, actor, audit.Action.CANCEL, outcome=final_status, status_before=status)
            log_event(conn, job, run, "cancel_too_late", level="warning", status=final_status, note=note, actor=actor)
            if final:
                lineage_run.moved_to(final_status)
                log_event(conn, job, run, "run_completed", status=final_status, batches_succeeded=final[1],
                          batches_failed=final[2])
            return Cancellation(final_status, 0, note=note)
        states.cancel_run(conn, job, run)
        lineage_run.moved_to(RunStatus.CANCELED.value)
        unstarted = states.cancel_batches(conn, job, run)
        audit.record(conn, job, run, actor, audit.Action.CANCEL, outcome=RunStatus.CANCELED.value,
                     status_before=status, unstarted_batches=len(unstarted))
        log_event(conn, job, run, "run_canceled", level="warning", unstarted_batches=len(unstarted),
                  batches_planned=total, actor=actor)
    try:
        dequeued = remove_run_jobs(job, run, unstarted, queue=queue, group=group_size(batch_size),
                                   plan=status in (RunStatus.QUEUED.value, RunStatus.VALIDATING.value))
    except ServiceError as exc:
        with db.connection() as conn:
            log_event(conn, job, run, "queue_not_cleared", level="warning", error=str(exc),
                      note=f"the run is canceled; {QUEUE_DRAINS_ITSELF}")
        return Cancellation(RunStatus.CANCELED.value, 0, str(exc))
    with db.connection() as conn:
        log_event(conn, job, run, "queue_cleared", jobs_removed=dequeued)
    return Cancellation(RunStatus.CANCELED.value, dequeued)


def _has_open_batches(conn: psycopg.Connection[Any], job: str, run: str) -> bool:
    return conn.execute(sql.SQL(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = ANY(%s))").format(
            ledger_table("batches")), [job, run, [s.value for s in states.OPEN_BATCH_STATES]]).fetchone() == (True,)


def batch_size(job: str, run: str) -> int | None:
    """The run's batch size (None: no such run), which says how its planned batches go to the queue
    (``queue.group_size``)."""
    with db.connection() as conn:
        row = conn.execute(sql.SQL("SELECT batch_size FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
            ledger_table("runs")), [job, run]).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def is_canceled(job: str, run: str) -> bool:
    """True when the run is canceled (the planner asks after queueing its batches)."""
    with db.connection() as conn:
        row = conn.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
            ledger_table("runs")), [job, run]).fetchone()
    return row is not None and row[0] == RunStatus.CANCELED.value


def reset_failed_batches(job: str, run: str, batches: list[int] | None = None, *, actor: str) -> dict[int, int]:
    """Put failed batches (all, or those named) back to pending and the run back to loading.

    Returns {batch: delivery}: each is queued as a new delivery, under an RQ job id of its own. ``actor``
    is recorded in the audit trail in the same transaction, with the batches retried (``batches``) and
    whether they were named or all the failed ones (``asked``).
    """
    actor = audit.check_actor(actor)
    b_table = ledger_table("batches")
    with db.connection() as conn, conn.transaction():
        row = conn.execute(sql.SQL(
            "SELECT status, batches_total, error_message FROM {} WHERE etl_job_id = %s AND etl_run_id = %s "
            "FOR UPDATE").format(ledger_table("runs")), [job, run]).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run!r} for job {job!r}", job=job, run=run)
        status, total, run_error = row
        if status not in {s.value for s in RETRYABLE_RUN_STATES}:
            raise RunConflict(f"run {job}/{run} is {status}: only a failed or partial_success run can be retried",
                              job=job, run=run, status=status)
        failed = [r[0] for r in conn.execute(sql.SQL(
            "SELECT batch_index FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'failed' "
            "ORDER BY batch_index").format(b_table), [job, run])]
        if not total:
            raise RunConflict(f"run {job}/{run} failed before it had batches ({run_error}); start a new run",
                              job=job, run=run)
        if batches is not None:
            wanted = sorted(set(batches))
            not_failed = [b for b in wanted if b not in set(failed)]
            if not_failed:
                raise RunConflict(
                    f"batch {not_failed[0]} of run {job}/{run} has not failed; failed batches: "
                    f"{', '.join(map(str, failed)) or 'none'}", job=job, run=run, batch=not_failed[0])
            failed = wanted
        if not failed:
            raise RunConflict(f"run {job}/{run} has no failed batch to retry", job=job, run=run)
        deliveries = states.requeue_failed_batches(conn, job, run, failed)
        states.reopen_for_retry(conn, job, run)
        audit.record(conn, job, run, actor, audit.Action.RETRY, batches=failed,
                     asked="named" if batches is not None else "all_failed")
        log_event(conn, job, run, "retry_requested", batches=failed, actor=actor)
    lineage.run_event(job, run, RunStatus.LOADING.value, retry=True)
    return deliveries
