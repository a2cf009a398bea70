"""The run contract: the one description of a run that the console, the CLI and the exports share."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
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
    (one sort and one window over the run's attempts). Its second column counts the attempts
    that failed transiently. The definition the other ways of computing it are tested against:
    :func:`run_contract` runs :func:`_loading_statement` (the same sweep, cheaper), :mod:`loader.run_metrics`
    keeps both current without a full pass.
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


# ---------------------------------------------------------------- the same figures, cheaper (run_contract)
#
# ``_metrics_query`` and ``loading_ms_query`` say what the figures are; without a cache, run_contract gets
# the same numbers from two cheaper statements (tests/test_contract_figures.py compares them after random
# commits, failures and retries). At 100k batches they cost about half as much:
#
# - the batch aggregate groups by status instead of filtering each count and sum by it (one hash lookup a
#   row instead of nine filters), and the p95 reads the two durations it interpolates between from the top
#   of ``batches_status_duration_idx`` (about 5 % of the succeeded batches) instead of sorting them all;
# - the attempts' sweep adds intervals (exact microseconds) instead of numeric epochs, and sorts in memory.

#: The fraction of the batch duration percentile the contract gives (``batch_duration_ms_p95``).
P95 = 0.95
#: Settings of the contract's read transaction (SET LOCAL). work_mem: the attempts' sort of a 100k-batch run
#: (about 10 MB) stays in memory instead of spilling to disk under the server's default (4 MB). No parallel
#: workers: the durations are then added in the order ``_metrics_query`` adds them (its percentile keeps it
#: serial), so their average is the same float, and a 2-core server is not asked for three processes.
READ_SETTINGS = {"work_mem": "32MB", "max_parallel_workers_per_gather": "0"}


@dataclass(frozen=True)
class BatchFigures:
    """What ``_metrics_query`` returns for a run, field by field (:class:`loader.run_metrics.Figures` adds
    the loading time and the transient attempts)."""

    rows_inserted: int
    rows_updated: int
    rows_validated: int
    rows_superseded: int
    rows_attempted: int
    rows_planned: int
    validation_failures: int
    required_field_errors: int
    json_shape_errors: int
    batches_total: int
    batches_succeeded: int
    batches_failed: int
    batches_running: int
    batches_pending: int
    batches_retried: int
    batches_canceled: int
    retries: int
    avg_ms: float | None
    p95_ms: float | None
    last_commit: datetime | None
    change_seq: int | None


#: The integer columns the batch figures sum, by the name ``_metrics_query`` gives their sum.
_SUMMED = ("rows_inserted", "rows_updated", "rows_validated", "rows_superseded", "rows_attempted",
           "validation_failures", "required_field_errors", "json_shape_errors")


def _batch_statement() -> sa.Select[Any]:
    """One row per batch status of the run: its counts and sums, and for the succeeded batches the (at most
    two) durations ``percentile_cont(P95)`` interpolates between (``around``)."""
    b = batches.c
    key = sa.and_(b.etl_job_id == sa.bindparam("job"), b.etl_run_id == sa.bindparam("run"))
    groups = sa.select(
        b.status, sa.func.count().label("n"), sa.func.count(b.duration_ms).label("timed"),
        *[sa.func.sum(b[c]).label(c) for c in _SUMMED],
        sa.func.sum(sa.func.greatest(b.attempts - 1, 0)).label("retries"),
        # avg(duration_ms) is this sum over the count (float8_avg: Sx / N), without avg's sum of squares.
        sa.func.sum(b.duration_ms).label("duration_sum"),
        sa.func.max(b.committed_at).label("last_commit"), sa.func.max(b.change_seq).label("change_seq"),
    ).where(key).group_by(b.status).cte("per_status")
    g = groups.c
    # The ascending positions floor(P95 * (timed - 1)) and ceil(...): counted from the top, a backward
    # index-only scan reaches them after about 5 % of the succeeded batches.
    from_top = sa.cast(g.timed - 1 - sa.func.ceil(sa.literal(P95, sa.Float) * (g.timed - 1)), sa.BigInteger)
    top = batches.alias("top")
    t = top.c
    near = (sa.select(t.duration_ms).where(t.etl_job_id == sa.bindparam("job"), t.etl_run_id == sa.bindparam("run"),
                                           t.status == BatchStatus.SUCCEEDED.value, t.duration_ms.is_not(None))
            .order_by(t.duration_ms.desc()).offset(from_top).limit(2).correlate(groups).subquery("near"))
    around = sa.select(sa.func.array_agg(near.c.duration_ms)).scalar_subquery()
    ok = g.status == BatchStatus.SUCCEEDED.value
    return sa.select(groups, sa.case((sa.and_(ok, g.timed > 0), around)).label("around"))


def p95_between(timed: int, around: list[float]) -> float:
    """``percentile_cont(P95)`` of ``timed`` values from the two it interpolates between (its arithmetic).

    ``around``: the values at the ascending positions ``ceil(P95 * (timed - 1))`` and the one before (or
    the only one, when ``timed`` is 1). PostgreSQL's ``percentile_cont_final_common`` and ``float8_lerp``,
    step by step, so the result is the same float.

    Example::

        >>> p95_between(21, [18.0, 19.0])  # of 0.0, 1.0, ... 20.0: position 0.95 * 20 = 19, no interpolation
        19.0
        >>> p95_between(4, [4.0, 8.0])  # of 1.0, 2.0, 4.0, 8.0: position 2.85, between the last two
        7.399999999999999
    """
    position = P95 * (timed - 1)
    first, second = math.floor(position), math.ceil(position)
    high = max(around)
    if first == second:
        return high
    low = min(around)
    return low + (position - first) * (high - low)


_BATCHES = _batch_statement()  # built once: SQLAlchemy finds its compiled form in its cache


def batch_figures(conn: sa.Connection, job: str, run: str) -> BatchFigures:
    """``_metrics_query``'s figures for the run, from :func:`_batch_statement` (one statement)."""
    sums = dict.fromkeys(_SUMMED, 0)
    by_status: dict[str, int] = {}
    retries, ok_attempted = 0, 0
    avg_ms: float | None = None
    p95_ms: float | None = None
    last_commit: datetime | None = None
    change_seq: int | None = None
    for r in conn.execute(_BATCHES, {"job": job, "run": run}):
        by_status[r.status] = int(r.n)
        for c in _SUMMED:
            sums[c] += int(getattr(r, c))
        retries += int(r.retries)
        if r.last_commit is not None and (last_commit is None or r.last_commit > last_commit):
            last_commit = r.last_commit
        change_seq = max(int(r.change_seq), change_seq or 0)
        if r.status == BatchStatus.SUCCEEDED.value:
            ok_attempted = int(r.rows_attempted)
            avg_ms = r.duration_sum / int(r.timed) if r.timed else None
            p95_ms = p95_between(int(r.timed), r.around) if r.around else None
    return BatchFigures(
        rows_inserted=sums["rows_inserted"], rows_updated=sums["rows_updated"],
        rows_validated=sums["rows_validated"], rows_superseded=sums["rows_superseded"],
        rows_attempted=ok_attempted, rows_planned=sums["rows_attempted"],
        validation_failures=sums["validation_failures"], required_field_errors=sums["required_field_errors"],
        json_shape_errors=sums["json_shape_errors"], batches_total=sum(by_status.values()),
        batches_succeeded=by_status.get(BatchStatus.SUCCEEDED.value, 0),
        batches_failed=by_status.get(BatchStatus.FAILED.value, 0),
        batches_running=by_status.get(BatchStatus.RUNNING.value, 0),
        batches_pending=by_status.get(BatchStatus.PENDING.value, 0),
        batches_retried=by_status.get(BatchStatus.RETRIED.value, 0),
        batches_canceled=by_status.get(BatchStatus.CANCELED.value, 0),
        retries=retries, avg_ms=avg_ms, p95_ms=p95_ms, last_commit=last_commit, change_seq=change_seq)


def _loading_statement() -> sa.Select[Any, Any]:
    """``loading_ms_query``'s sweep with the parts added as intervals (exact microseconds, summed once into
    an epoch) instead of a numeric epoch per attempt; ``now`` and ``completed_at`` are parameters."""
    a = attempts.c
    cut = sa.func.least(sa.bindparam("now", type_=sa.DateTime(timezone=True)),
                        sa.bindparam("completed_at", type_=sa.DateTime(timezone=True)))
    spans = (sa.select(a.started_at.label("s"), sa.func.coalesce(a.ended_at, cut).label("e"), a.status)
             .where(a.etl_job_id == sa.bindparam("job"), a.etl_run_id == sa.bindparam("run")).subquery())
    reached = sa.select(spans.c.s, spans.c.e, spans.c.status, sa.func.max(spans.c.e).over(
        order_by=spans.c.s, rows=(None, -1)).label("reach")).subquery()
    r = reached.c
    zero = sa.literal_column("interval '0'", sa.Interval)
    new_part = sa.func.greatest(r.e - sa.func.greatest(r.s, sa.func.coalesce(r.reach, r.s)), zero, type_=sa.Interval)
    return sa.select(
        (sa.func.coalesce(sa.extract("epoch", sa.func.sum(new_part, type_=sa.Interval)), 0) * 1000).label("loading_ms"),
        sa.func.count().filter(r.status == AttemptStatus.RETRYING.value).label("transient"))


_LOADING = _loading_statement()
_SET_LOCAL = sa.select(sa.func.set_config(sa.bindparam("name"), sa.bindparam("value"), True))  # is_local


def set_local(conn: sa.Connection, settings: dict[str, str]) -> None:
    """SET LOCAL each setting: until the connection's transaction ends (SQLAlchemy's, rolled back on close)."""
    for name, value in settings.items():
        conn.execute(_SET_LOCAL, {"name": name, "value": value})


def loading_figures(conn: sa.Connection, job: str, run: str, now: datetime, completed_at: datetime | None
                    ) -> tuple[float, int]:
    """``loading_ms_query``'s loading time (ms) and transient attempts, from :func:`_loading_statement`."""
    row = conn.execute(_LOADING, {"job": job, "run": run, "now": now, "completed_at": completed_at}).one()
    return float(row.loading_ms), int(row.transient)


#: How long the attempts' sweep may wait for a second connection of the pool (opening a new one takes a few
#: ms). Once the batch aggregate is done, its connection runs the sweep if none was lent yet: a connection
#: lent later goes straight back.
SPARE_WAIT = 0.25


def cold_figures(conn: sa.Connection, job: str, run: str, now: datetime, completed_at: datetime | None
                 ) -> tuple[BatchFigures, float, int]:
    """The run's figures without a cache: :func:`batch_figures` on ``conn`` and, at the same time, the
    attempts' sweep (:func:`loading_figures`) on a second connection when the pool lends one at once.

    The two read different tables and each is one statement, seen by its own snapshot as before (the
    connection reads in READ COMMITTED). Whoever starts the sweep first runs it: a thread that has its
    connection, or this one after the aggregate (no connection to spare: it never waits for one).
    Returns the batch figures, the loading time (ms) and the transient attempts.
    """
    claim = threading.Lock()  # held by whichever thread runs the sweep
    outcome: list[tuple[float, int] | BaseException] = []

    def sweep_aside() -> None:
        claimed = False
        try:
            with db.spare_connection(SPARE_WAIT) as spare:
                if spare is None or not claim.acquire(blocking=False):
                    return
                claimed = True
                set_local(spare, READ_SETTINGS)
                outcome.append(loading_figures(spare, job, run, now, completed_at))
        except BaseException as exc:  # noqa: BLE001 - raised again by the caller's thread, which waits for it
            if claimed and not outcome:
                outcome.append(exc)

    helper = threading.Thread(target=sweep_aside, name=f"sweep {run}", daemon=True)
    helper.start()
    set_local(conn, READ_SETTINGS)
    figures = batch_figures(conn, job, run)
    if claim.acquire(blocking=False):  # no thread has started it: here, now
        loading_ms, transient = loading_figures(conn, job, run, now, completed_at)
        return figures, loading_ms, transient
    helper.join()
    got = outcome[0]
    if isinstance(got, BaseException):
        raise got
    return figures, got[0], got[1]


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
    the attempts: :func:`batch_figures`, :func:`loading_figures`), so the numbers are the same wherever they
    are shown. ``include_batches=False`` leaves
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
            m, loading_ms, transient = cold_figures(conn, job, run, now, run_row.completed_at)
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
