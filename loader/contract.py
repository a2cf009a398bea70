"""The run contract: the one description of a run that the console, the CLI and the exports share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import sqlalchemy as sa

from . import config, db
from .audit import run_actions
from .errors import RunNotFound
from .ledger import attempts, batches, events, rejects, runs
from .states import ACTIVE_RUN_STATES, AttemptStatus, BatchStatus, batch_status_label

if TYPE_CHECKING:  # numpy is imported only by the processes that keep metrics (the console)
    from .run_metrics import MetricsCache

EXAMPLES_LIMIT = 10
LOG_FRAGMENT_EVENTS = 5


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z, or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def run_urls(job: str, run: str) -> dict[str, str]:
    """logs_url and metrics_download_url: served by the console, streamed from the ledger."""
    base = config.get("ETL_CONSOLE_URL").rstrip("/")
    path = f"{base}/etl/data-loader/api/runs/{quote(job, safe='')}/{quote(run, safe='')}"
    return {"logs_url": f"{path}/logs.ndjson", "metrics_download_url": f"{path}/metrics.csv"}


def _key(table: sa.Table, job: str, run: str) -> sa.ColumnElement[bool]:
    return sa.and_(table.c.etl_job_id == job, table.c.etl_run_id == run)


def _metrics_query(job: str, run: str) -> sa.Select[Any]:
    b = batches.c
    ok = b.status == BatchStatus.SUCCEEDED.value
    return sa.select(
        sa.func.coalesce(sa.func.sum(b.rows_inserted), 0).label("rows_inserted"),
        sa.func.coalesce(sa.func.sum(b.rows_updated), 0).label("rows_updated"),
        sa.func.coalesce(sa.func.sum(b.rows_validated), 0).label("rows_validated"),
        sa.func.coalesce(sa.func.sum(b.rows_superseded), 0).label("rows_superseded"),
        sa.func.coalesce(sa.func.sum(b.rows_attempted).filter(ok), 0).label("rows_attempted"),
        sa.func.coalesce(sa.func.sum(b.rows_attempted), 0).label("rows_planned"),
        sa.func.coalesce(sa.func.sum(b.validation_failures), 0).label("validation_failures"),
        sa.func.coalesce(sa.func.sum(b.required_field_errors), 0).label("required_field_errors"),
        sa.func.coalesce(sa.func.sum(b.json_shape_errors), 0).label("json_shape_errors"),
        sa.func.count().label("batches_total"),
        sa.func.count().filter(ok).label("batches_succeeded"),
        sa.func.count().filter(b.status == BatchStatus.FAILED.value).label("batches_failed"),
        sa.func.count().filter(b.status == BatchStatus.RUNNING.value).label("batches_running"),
        sa.func.count().filter(b.status == BatchStatus.PENDING.value).label("batches_pending"),
        sa.func.count().filter(b.status == BatchStatus.RETRIED.value).label("batches_retried"),
        sa.func.count().filter(b.status == BatchStatus.CANCELED.value).label("batches_canceled"),
        sa.func.coalesce(sa.func.sum(sa.func.greatest(b.attempts - 1, 0)), 0).label("retries"),
        sa.func.avg(b.duration_ms).filter(ok).label("avg_ms"),
        sa.func.percentile_cont(0.95).within_group(b.duration_ms).filter(ok).label("p95_ms"),
        sa.func.max(b.committed_at).label("last_commit"),
        sa.func.max(b.change_seq).label("change_seq"),
    ).where(_key(batches, job, run))


def get_run_row(conn: sa.Connection, job: str, run: str) -> sa.Row[Any]:
    row = conn.execute(sa.select(runs).where(_key(runs, job, run))).first()
    if row is None:
        raise RunNotFound(f"no run {run!r} for job {job!r}", job=job, run=run)
    return row




def loading_ms_query(job: str, run: str, now: datetime, completed_at: datetime | None) -> sa.Select[Any]:
    """The run's loading time: the union of its batch attempts' intervals, in ms.

    Idle time between attempts (a retry minutes after the run ended) is not loading time, and
    attempts that overlap (parallel workers) count once. An attempt still open counts until ``now``
    (or until the run completed, for an attempt whose worker vanished without closing it). One sweep
    in start order: each attempt adds the part of it that ends beyond every earlier attempt's end
    (one sort and one window over the run's attempts: 220-330 ms for 100k attempts on the shared 2-core
    test machine under load, the order of the metrics aggregate). Its second column counts the attempts
    that failed transiently. :mod:`loader.run_metrics` keeps both current without this full pass.
    """
    a = attempts.c
    end = sa.func.coalesce(a.ended_at, sa.func.least(sa.literal(now), sa.literal(completed_at)))
    spans = sa.select(a.started_at.label("s"), end.label("e"), a.status).where(_key(attempts, job, run)).subquery()
    reached = sa.select(spans.c.s, spans.c.e, spans.c.status, sa.func.max(spans.c.e).over(  # the furthest end
        order_by=spans.c.s, rows=(None, -1)).label("reach")).subquery()  # of earlier spans
    r = reached.c
    new_part = sa.extract("epoch", r.e) - sa.extract("epoch", sa.func.greatest(r.s, sa.func.coalesce(r.reach, r.s)))
    return sa.select(
        (sa.func.coalesce(sa.func.sum(sa.func.greatest(new_part, 0)), 0) * 1000).label("loading_ms"),
        # The same pass counts the attempts that failed transiently (the contract's transient_errors).
        sa.func.count().filter(r.status == AttemptStatus.RETRYING.value).label("transient"))


def build_metrics(run_row: sa.Row[Any], m: sa.Row[Any], now: datetime, loading_ms: float = 0.0
                  ) -> dict[str, Any]:
    """The metrics of the contract. ``elapsed_ms`` is wall time (start to completion, or now);
    ``loading_ms`` the union of the batch attempts' intervals, over which ``throughput_rps`` is counted."""
    end = run_row.completed_at or now
    elapsed_s = max(0.0, (end - run_row.started_at).total_seconds())
    throughput = round(m.rows_attempted * 1000 / loading_ms, 1) if loading_ms > 0 else 0.0
    return {
        "rows_inserted": int(m.rows_inserted),
        "rows_updated": int(m.rows_updated),
        "rows_validated": int(m.rows_validated),
        "batches_total": int(run_row.batches_total or m.batches_total),
        "batches_succeeded": int(m.batches_succeeded),
        "batches_failed": int(m.batches_failed),
        "retries": int(m.retries),
        "throughput_rps": throughput,
        "batch_duration_ms_avg": round(float(m.avg_ms), 1) if m.avg_ms is not None else None,
        "batch_duration_ms_p95": round(float(m.p95_ms), 1) if m.p95_ms is not None else None,
        # Beyond the spec's list, for the console's cards and the CLI summary:
        "rows_attempted": int(m.rows_attempted),
        "rows_planned": int(run_row.rows_planned or 0),
        "rows_superseded": int(m.rows_superseded),
        "validation_failures": int(m.validation_failures),
        "batches_running": int(m.batches_running),
        "batches_pending": int(m.batches_pending),
        "batches_retried": int(m.batches_retried),
        "batches_canceled": int(m.batches_canceled),
        "elapsed_ms": round(elapsed_s * 1000),
        "loading_ms": round(loading_ms),
    }


def batch_rows_query(job: str, run: str) -> sa.Select[Any]:
    b = batches.c
    return sa.select(
        b.batch_index, b.status, b.attempts, b.rows_attempted, b.rows_inserted, b.rows_updated,
        b.rows_validated, b.rows_superseded, b.validation_failures, b.duration_ms, b.committed_at,
        b.started_at, b.error_code, b.error_message, b.source_file, b.line_start, b.line_count, b.worker,
    ).where(_key(batches, job, run))


#: How loader.db words a transient database error: true only while another attempt is due.
TRANSIENT_PREFIX = "database error, will retry: "
#: Batch and attempt states in which another attempt is still due (an attempt ``retrying``).
_RETRY_DUE = frozenset({BatchStatus.PENDING.value, BatchStatus.RUNNING.value, BatchStatus.RETRIED.value,
                        AttemptStatus.RETRYING.value})


def message_now(message: str | None, status: str, attempts: int) -> str | None:
    """An error message worded for the state its batch (or attempt) is in now.

    A transient error is recorded as "database error, will retry: ..."; once the batch failed for good
    (or its run was canceled) no retry follows, and the message says so.

    Example::

        >>> message_now("database error, will retry: deadlock detected", "failed", 4)
        'database error, failed for good after 4 attempt(s): deadlock detected'
        >>> message_now("database error, will retry: deadlock detected", "retried", 1)
        'database error, will retry: deadlock detected'
    """
    if not message or not message.startswith(TRANSIENT_PREFIX) or status in _RETRY_DUE:
        return message
    cause = message[len(TRANSIENT_PREFIX):]
    if status == BatchStatus.FAILED.value:
        return f"database error, failed for good after {attempts} attempt(s): {cause}"
    if status == BatchStatus.CANCELED.value:
        return f"database error, not retried (run canceled): {cause}"
    return f"database error: {cause}"


def batch_dict(r: sa.Row[Any], fragment: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A batch of the contract. ``attempts`` counts the attempts started (the ledger's attempt rows);
    ``retries`` those beyond the first; a ``retried`` batch's label is ``retried(attempts)``: that many
    attempts failed transiently and attempt ``attempts + 1`` is due (docs/console.md, "Attempts")."""
    return {
        "index": r.batch_index,
        "status": r.status,
        "status_label": batch_status_label(r.status, r.attempts),
        "attempts": r.attempts,
        "rows_attempted": r.rows_attempted,
        "rows_inserted": r.rows_inserted,
        "rows_updated": r.rows_updated,
        "validation_failures": r.validation_failures,
        "duration_ms": round(r.duration_ms, 1) if r.duration_ms is not None else None,
        "retries": max(r.attempts - 1, 0),
        "committed_at": iso(r.committed_at),
        "error_code": r.error_code,
        "error_message": message_now(r.error_message, r.status, r.attempts),
        "logs_fragment": fragment or [],
        "rows_validated": r.rows_validated,
        "rows_superseded": r.rows_superseded,
        "source_file": r.source_file,
        "first_line": r.line_start,
        "line_count": r.line_count,
    }


def event_dict(e: Any) -> dict[str, Any]:
    return {"ts": iso(e.ts), "level": e.level, "event": e.event, "job": e.etl_job_id, "run": e.etl_run_id,
            "batch": e.batch_index, "attempt": e.attempt, "details": e.details}


def log_fragments(conn: sa.Connection, job: str, run: str, indexes: list[int] | None = None
                  ) -> dict[int, list[dict[str, Any]]]:
    """The last few log events of each batch (all batches, or those listed), oldest first."""
    e = events.c
    cond = sa.and_(_key(events, job, run), e.batch_index.is_not(None))
    if indexes is not None:
        cond = sa.and_(cond, e.batch_index.in_(indexes))
    ranked = sa.select(events, sa.func.row_number().over(
        partition_by=e.batch_index, order_by=e.id.desc()).label("rn")).where(cond).subquery()
    rows = conn.execute(sa.select(ranked).where(ranked.c.rn <= LOG_FRAGMENT_EVENTS)
                        .order_by(ranked.c.batch_index, ranked.c.id))
    out: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.batch_index, []).append(event_dict(r))
    return out


def validation_examples(conn: sa.Connection, job: str, run: str, limit: int = EXAMPLES_LIMIT
                        ) -> list[dict[str, Any]]:
    r = rejects.c
    rows = conn.execute(sa.select(r.batch_index, r.source_file, r.line_no, r.error_class, r.path, r.message,
                                  r.sample_value).where(_key(rejects, job, run))
                        .order_by(r.batch_index, r.line_no).limit(limit))
    return [{"path": x.path, "message": x.message, "sample_value": x.sample_value, "error_class": x.error_class,
             "batch_index": x.batch_index, "source_file": x.source_file, "line_no": x.line_no} for x in rows]


def run_contract(job: str, run: str, *, include_batches: bool = True, metrics: MetricsCache | None = None,
                 signature: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Everything the spec's data contract names for one run, with those exact field names.

    Metrics are computed by PostgreSQL from the ledger (one aggregate query over the batches, one pass over
    the attempts), so the numbers are the same wherever they are shown. ``include_batches=False`` leaves
    ``batches`` empty for callers that page through batches themselves (the console's grid). ``metrics``:
    a :class:`~loader.run_metrics.MetricsCache` that keeps the same figures current by reading only what
    changed since its last read (the console's ticks: ``run_metrics.shared()``); the first read of a run
    through it costs more than the full recomputation, every later one far less.
    ``signature``: the run's
    :func:`change_signature` the caller read just before (the cache then does not read it again).

    Example::

        contract = run_contract("orders", "2f1c...")
        contract["metrics"]["rows_inserted"]
    """
    engine = db.get_engine()
    with engine.connect() as conn:
        run_row = get_run_row(conn, job, run)
        now = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()  # the clock of open attempts
        m: Any = metrics.figures(conn, run_row, now, signature) if metrics is not None else None
        if m is None:  # no cache, or the cache has yet to read the run
            m = conn.execute(_metrics_query(job, run)).one()
            loading = conn.execute(loading_ms_query(job, run, now, run_row.completed_at)).one()
            loading_ms, transient = float(loading.loading_ms), int(loading.transient)
        else:
            loading_ms, transient = m.loading_ms, m.transient
        examples = validation_examples(conn, job, run)
        history = run_actions(conn, job, run)
        batch_list: list[dict[str, Any]] = []
        if include_batches:
            fragments = log_fragments(conn, job, run)
            rows = conn.execute(batch_rows_query(job, run).order_by(batches.c.batch_index))
            batch_list = [batch_dict(r, fragments.get(r.batch_index)) for r in rows]
    figures = build_metrics(run_row, m, now, loading_ms)
    figures["transient_errors"] = int(transient)
    return {
        "etl_job_id": run_row.etl_job_id,
        "etl_run_id": run_row.etl_run_id,
        "batch_size": run_row.batch_size,
        "status": run_row.status,
        "started_at": iso(run_row.started_at),
        "completed_at": iso(run_row.completed_at),
        "loaded_at": iso(run_row.loaded_at or m.last_commit),
        "metrics": figures,
        "validation_summary": {
            "required_field_errors": int(m.required_field_errors),
            "json_shape_errors": int(m.json_shape_errors),
            "examples": examples,
        },
        "batches": batch_list,
        **run_urls(job, run),
        "target_table": run_row.target_table,
        "error_code": run_row.error_code,
        "error_message": run_row.error_message,
        "forced": run_row.forced,
        "started_by": run_row.started_by,
        "actions": history,
        "version": max(int(run_row.change_seq), int(m.change_seq or 0)),
    }


def ledger_version(job: str, run: str) -> int:
    """The run's newest change number: it grows whenever anything about the run changes.

    To tell whether a cached view is still current, compare :func:`change_signature` instead: the
    newest number alone can miss a commit that lands after a higher-numbered one.
    """
    run_seq, batch_top, _, _ = change_signature(job, run)
    return max(run_seq, batch_top)


def run_status(job: str, run: str) -> str:
    """The run's status alone: one primary-key lookup, cheap enough to poll ten times a second."""
    with db.get_engine().connect() as conn:
        status = conn.execute(sa.select(runs.c.status).where(_key(runs, job, run))).scalar()
    if status is None:
        raise RunNotFound(f"no run {run!r} for job {job!r}", job=job, run=run)
    return str(status)


def find_run(job: str, run: str) -> dict[str, Any] | None:
    """The run's id, status and start time, or None when the job has no run of that id (a primary-key lookup).

    Example::

        taken = find_run("orders", "nightly-1")  # {"etl_job_id": ..., "status": "success", "started_at": "...Z"}
    """
    with db.get_engine().connect() as conn:
        row = conn.execute(sa.select(runs.c.etl_job_id, runs.c.etl_run_id, runs.c.status, runs.c.started_at)
                           .where(_key(runs, job, run))).first()
    if row is None:
        return None
    return {"etl_job_id": row.etl_job_id, "etl_run_id": row.etl_run_id, "status": row.status,
            "started_at": iso(row.started_at)}


def active_run(job: str) -> dict[str, Any] | None:
    """The job's newest run in progress (queued, validating, loading, committing), or None.

    One lookup in the partial index of active runs: cheap enough to poll.
    """
    q = (sa.select(runs.c.etl_job_id, runs.c.etl_run_id, runs.c.status, runs.c.started_at)
         .where(runs.c.etl_job_id == job, runs.c.status.in_([s.value for s in ACTIVE_RUN_STATES]))
         .order_by(runs.c.started_at.desc()).limit(1))
    with db.get_engine().connect() as conn:
        row = conn.execute(q).first()
    if row is None:
        return None
    return {"etl_job_id": row.etl_job_id, "etl_run_id": row.etl_run_id, "status": row.status,
            "started_at": iso(row.started_at)}


#: How many of the run's newest batch change numbers :func:`change_signature` sums (and
#: :mod:`loader.run_metrics` re-reads at each refresh). A change number is taken by the statement that
#: makes the change, just before its transaction commits, so a commit that lands after a higher number's
#: lands among the newest few.
SIGNATURE_WINDOW = 1000


def change_signature(job: str, run: str, conn: sa.Connection | None = None) -> tuple[int, int, int, int]:
    """What a cached view of the run compares to know that nothing changed (one statement, index only).

    The newest change number alone (:func:`ledger_version`) can miss a change: two workers take 100 and
    101, 101 commits first, a reader sees 101; when 100 commits, the maximum stays 101. The sum of the
    run's :data:`SIGNATURE_WINDOW` newest batch change numbers grows when it lands (the batch's number
    rises, or it pushes a smaller one out). The run row's own number is part of it for the same reason.
    About 1 ms at 100k batches. Read it *before* the data it vouches for, so a change landing in between
    shows at the next comparison.
    """
    b = batches.c
    # ORDER BY ... LIMIT: a backward index-only scan of batches_change_idx whatever the statistics say
    # (a "> top - N" bound is a parameter the planner cannot estimate: it chose a 18 ms scan at 100k).
    tail = (sa.select(b.change_seq).where(_key(batches, job, run)).order_by(b.change_seq.desc())
            .limit(SIGNATURE_WINDOW).subquery("tail"))
    near = sa.select(sa.func.max(tail.c.change_seq).label("top"), sa.func.count().label("n"),
                     sa.func.coalesce(sa.func.sum(tail.c.change_seq), 0).label("s")).subquery("near")
    q = (sa.select(runs.c.change_seq, near.c.top, near.c.n, near.c.s)
         .select_from(runs.join(near, sa.true())).where(_key(runs, job, run)))
    if conn is None:
        with db.get_engine().connect() as own:
            row = own.execute(q).one_or_none()
    else:
        row = conn.execute(q).one_or_none()
    if row is None:
        raise RunNotFound(f"no run {run!r} for job {job!r}", job=job, run=run)
    return int(row.change_seq), int(row.top or 0), int(row.n), int(row.s)


def signature_token(signature: tuple[int, ...]) -> str:
    """The signature as the opaque string the grid compares (``/version`` and each page of batches)."""
    return "-".join(str(x) for x in signature)
