"""Keeping runs moving when workers die or the queue is lost: the ledger is the source of truth.

Every worker process beats a row in the ``workers`` table. The reconciler (run by the workers
themselves, one at a time) finds batches held by a worker whose heartbeat stopped, marks their
attempt abandoned and puts them back to pending; the caller (jobs.reconciler) then re-queues them
and any pending batch or queued run whose RQ job no longer exists.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from . import config, db, states
from .db import ledger_table, next_change
from .events import log_event
from .loading import finish_run_if_done

#: A worker that has not beaten for this long is presumed dead (the default of ETL_WORKER_STALE_SECONDS).
STALE_AFTER_SECONDS = 15.0
#: The shortest stale window allowed: two heartbeats (3 s apart) may be missed under load.
MIN_STALE_SECONDS = 6.0


def stale_seconds() -> float:
    """Seconds without a heartbeat after which a worker is presumed lost (ETL_WORKER_STALE_SECONDS)."""
    return max(MIN_STALE_SECONDS, config.get_float("ETL_WORKER_STALE_SECONDS"))
#: A pending batch or queued run is only "orphaned" once it has waited this long for its RQ job.
ORPHAN_GRACE_SECONDS = 10.0
#: Reconcilers take this advisory lock so only one runs at a time, whichever worker holds it.
LOCK_KEY = "dataloader.reconcile"  # + the queue name


@dataclass
class Reconciled:
    """What one reconcile pass found."""

    abandoned: list[tuple[str, str, int]] = field(default_factory=list)
    #: The windows the pass used: :func:`pending_batches` reads the pending batches with them, a chunk at a time.
    grace: float = ORPHAN_GRACE_SECONDS
    stale_after: float = STALE_AFTER_SECONDS
    canceled: list[tuple[str, str, int]] = field(default_factory=list)
    plannable: list[tuple[str, str, bool]] = field(default_factory=list)
    finished: list[tuple[str, str, str]] = field(default_factory=list)


def beat(conn: psycopg.Connection[Any], name: str, batch: tuple[str, str, int] | None = None) -> None:
    """Record that worker ``name`` is alive, and the batch it is executing (call every few seconds)."""
    job, run, index = batch if batch is not None else (None, None, None)
    conn.execute(sql.SQL(
        "INSERT INTO {} (name, queue, host, pid, batch_job, batch_run, batch_index) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), "
        "batch_job = excluded.batch_job, batch_run = excluded.batch_run, batch_index = excluded.batch_index"
    ).format(ledger_table("workers")), [name, config.get("ETL_QUEUE"), socket.gethostname(), os.getpid(),
                                        job, run, index])


def forget(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DELETE FROM {} WHERE name = %s").format(ledger_table("workers")), [name])


#: The names of the queue's workers that beat within the stale window (params: queue, stale seconds): what
#: "alive" means for the CLI's warning (:func:`live_workers`) and for a reconcile pass (:class:`PendingPage`).
_LIVE_WORKERS = sql.SQL(
    "SELECT name FROM {} WHERE queue = %s AND heartbeat_at > now() - make_interval(secs => %s)")


def live_workers(conn: psycopg.Connection[Any] | None = None) -> int:
    """Workers of this queue that beat within the stale window (from the ledger, not Redis)."""
    query = sql.SQL("SELECT count(*) FROM ({}) w").format(_LIVE_WORKERS.format(ledger_table("workers")))
    params = [config.get("ETL_QUEUE"), stale_seconds()]
    if conn is not None:
        row = conn.execute(query, params).fetchone()
    else:
        with db.connection() as c:
            row = c.execute(query, params).fetchone()
    return int(row[0]) if row else 0


#: Batches not yet ended that no live worker is executing: (job, run, batch, delivery, the run's batch size,
#: which says the RQ job of a first delivery: ``queue.group_size``). The caller
#: re-queues those whose RQ delivery is gone (a flushed Redis, or an execution that gave up while the
#: database was unreachable and could not record it). The ledger's heartbeat is trusted first: a batch a
#: live worker says it is executing is never queued again, however long it runs and whatever RQ says.
#: Read a page at a time after the key ``(after_job, after_run, after_index)``: see :func:`pending_batches`.
PENDING = sql.SQL("""
    SELECT b.etl_job_id, b.etl_run_id, b.batch_index, b.deliveries, r.batch_size
    FROM {batches} b JOIN {runs} r USING (etl_job_id, etl_run_id)
    WHERE r.status = 'loading' AND r.queue = %(queue)s AND b.status IN ('pending', 'retried', 'running')
      AND (b.etl_job_id, b.etl_run_id, b.batch_index) > (%(after_job)s, %(after_run)s, %(after_index)s)
      AND greatest(b.queued_at, b.started_at) < now() - make_interval(secs => %(grace)s)
      AND NOT EXISTS (SELECT 1 FROM {workers} w WHERE w.batch_job = b.etl_job_id AND w.batch_run = b.etl_run_id
                      AND w.batch_index = b.batch_index
                      AND w.heartbeat_at > now() - make_interval(secs => %(stale)s))
    ORDER BY b.etl_job_id, b.etl_run_id, b.batch_index
    LIMIT %(limit)s""")

#: Pending batches read (and checked against the queue) at a time. A pass runs every few seconds and, at a
#: 10k-batch run's start, finds every batch pending: read whole, that list and its Redis pipeline raised each
#: worker's peak RSS by 14 MiB (issue 18: 82 -> 96 MiB at 10M records); a page of 500 keeps it flat.
PENDING_CHUNK = 500

PendingBatch = tuple[str, str, int, int, int]

@dataclass
class PendingPage:
    """One page of :func:`pending_batches`, and the queue's workers alive when it was read."""

    batches: list[PendingBatch]
    #: Workers of the queue that beat within the stale window, read right after the page: an RQ job a worker
    #: not named here started will not go on (a group job's batches after the one its worker died in). Read
    #: with each page, so a worker that started since the pass began is not taken for a dead one.
    live_workers: set[str]


def pending_batches(found: Reconciled, *, queue: str | None = None) -> Iterator[PendingPage]:
    """The pass's pending batches (:data:`PENDING`), :data:`PENDING_CHUNK` at a time, in key order.

    Each page is its own short query on a borrowed connection (keyset paging, no cursor held open), so
    the caller may ask Redis about a page between two reads; a batch that changes meanwhile is read as
    it is then, and one that ends is not read at all. Read them with the reconcile lock held
    (:func:`exclusive`), as the caller re-queues what it finds.
    """
    queue = queue or config.get("ETL_QUEUE")
    tables = {"batches": ledger_table("batches"), "runs": ledger_table("runs"), "workers": ledger_table("workers")}
    query = PENDING.format(**tables)
    live_query = _LIVE_WORKERS.format(tables["workers"])
    after: tuple[str, str, int] = ("", "", -1)
    while True:
        params = {"grace": found.grace, "queue": queue, "stale": found.stale_after, "limit": PENDING_CHUNK,
                  "after_job": after[0], "after_run": after[1], "after_index": after[2]}
        with db.connection() as conn:
            page: list[PendingBatch] = [(str(j), str(r), int(b), int(d), int(size))
                                        for j, r, b, d, size in conn.execute(query, params)]
            live = {str(r[0]) for r in conn.execute(live_query, [queue, found.stale_after])} if page else set()
        if not page:
            return
        yield PendingPage(page, live)
        if len(page) < PENDING_CHUNK:
            return
        after = page[-1][:3]

#: Runs waiting to be planned: (job, run, planner_lost). A lost planner (its worker stopped beating)
#: means "plan again now"; otherwise the caller plans again only if the RQ job is gone.
PLANNABLE = sql.SQL("""
    SELECT etl_job_id, etl_run_id, status = 'validating' AND NOT EXISTS (
               SELECT 1 FROM {workers} w WHERE w.name = r.plan_worker
               AND w.heartbeat_at > now() - make_interval(secs => %(stale)s)) AS planner_lost
    FROM {runs} r
    WHERE queue = %(queue)s AND status IN ('queued', 'validating')
      AND started_at < now() - make_interval(secs => %(grace)s)""")

UNFINISHED = sql.SQL("""
    SELECT r.etl_job_id, r.etl_run_id FROM {runs} r
    WHERE r.queue = %(queue)s AND r.status IN ('loading', 'committing') AND NOT EXISTS (
        SELECT 1 FROM {batches} b WHERE b.etl_job_id = r.etl_job_id AND b.etl_run_id = r.etl_run_id
        AND b.status NOT IN ('succeeded', 'failed'))""")


#: The lock connection between two passes, by process (never one a parent left behind after a fork);
#: a pass that finds it taken (a nested try, as tests make) opens another.
_idle_lock_conn: dict[tuple[int, str], psycopg.Connection[Any]] = {}
_lock_conn_guard = threading.Lock()


def _lock_key() -> tuple[int, str]:
    return os.getpid(), db.libpq_url(config.database_url())


def _lock_connection() -> psycopg.Connection[Any]:
    with _lock_conn_guard:
        conn = _idle_lock_conn.pop(_lock_key(), None)
    if conn is not None and not conn.closed:
        return conn
    return psycopg.connect(_lock_key()[1], autocommit=True, connect_timeout=10,
                           application_name="dataloader-reconcile",
                           options=f"-c statement_timeout={LOCK_TIMEOUT_MS}")


#: The lock statements' limit (ms): a server that stopped answering fails the pass, which is tried again.
LOCK_TIMEOUT_MS = 10_000


@contextmanager
def exclusive(queue: str | None = None) -> Iterator[bool]:
    """Whether this process is the queue's one reconciler, for the ``with`` block.

    Held from reading the ledger until what it found is queued again: two reconcilers one after the
    other inside that window would both see a batch's RQ job gone and queue it twice. A session
    advisory lock on a connection of its own (outside the pool, so the pass can borrow what it needs),
    kept for the next pass; if that connection breaks, the server releases the lock with it.
    """
    key = f"{LOCK_KEY}.{queue or config.get('ETL_QUEUE')}"
    try:
        conn = _lock_connection()
    except psycopg.Error as exc:
        raise db.wrap_db_error(exc) from exc
    got = False
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()
        got = bool(row and row[0])
        yield got
    except BaseException:
        conn.close()  # the lock, if held, goes with the session
        raise
    else:
        try:
            if got:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])
        except psycopg.Error:
            conn.close()
            return
        with _lock_conn_guard:
            kept = _idle_lock_conn.setdefault(_lock_key(), conn)
        if kept is not conn:
            conn.close()  # another pass's connection is kept already


def reconcile(*, stale_after: float | None = None, grace: float = ORPHAN_GRACE_SECONDS,
              locked: bool = False) -> Reconciled | None:
    """One pass over the runs of this process's queue; None when another process is reconciling.

    ``stale_after`` defaults to ETL_WORKER_STALE_SECONDS. ``locked``: the caller holds :func:`exclusive`.

    ``plannable`` and the batches :func:`pending_batches` reads after the pass are candidates: the caller
    re-queues those whose RQ job is gone.
    """
    with nullcontext(True) if locked else exclusive() as got:
        return _reconcile(stale_after, grace) if got else None


def _reconcile(stale_after: float | None, grace: float) -> Reconciled:
    queue = config.get("ETL_QUEUE")
    if stale_after is None:
        stale_after = stale_seconds()
    out = Reconciled(grace=grace, stale_after=stale_after)
    tables = {"batches": ledger_table("batches"), "runs": ledger_table("runs"), "attempts": ledger_table("attempts"),
              "workers": ledger_table("workers"), "next": next_change()}
    with db.connection() as conn:
        with conn.transaction():
            for job, run, batch, attempt, worker, spent in states.abandon_stale_batches(
                    conn, queue=queue, stale_after=stale_after):
                if spent:  # failed for good: the run ends below (UNFINISHED) once its other batches have
                    log_event(conn, job, run, "batch_failed", level="error", batch=batch, attempt=attempt,
                              worker=worker, error_code="worker_lost",
                              error="the worker stopped beating in the batch's last allowed attempt")
                    continue
                out.abandoned.append((job, run, batch))
                log_event(conn, job, run, "batch_abandoned", level="warning", batch=batch, attempt=attempt,
                          worker=worker, note="the worker stopped beating; the batch is queued again")
        with conn.transaction():
            for job, run, batch in states.abandon_canceled_batches(conn, queue=queue, stale_after=stale_after):
                out.canceled.append((job, run, batch))
                log_event(conn, job, run, "batch_canceled", level="warning", batch=batch,
                          note="the run was canceled and nobody was going to end this batch")
        # Workers that stopped beating a day ago are history (their attempts keep the name).
        conn.execute(sql.SQL("DELETE FROM {} WHERE heartbeat_at < now() - interval '1 day'").format(
            tables["workers"]))
        out.plannable = [tuple(r) for r in conn.execute(
            PLANNABLE.format(**tables), {"grace": grace, "stale": stale_after, "queue": queue})]
        for job, run in conn.execute(UNFINISHED.format(**tables), {"queue": queue}).fetchall():
            if conn.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
                    tables["runs"]), [job, run]).fetchone() == (states.RunStatus.COMMITTING.value,):
                # A finisher died between 'committing' and the final state: finish it again.
                states.resume_committing(conn, job, run)
            status = finish_run_if_done(job, run)
            if status:
                out.finished.append((job, run, status))
    return out
