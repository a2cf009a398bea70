"""Recent runs (loader.recent_runs.list_runs): ended runs' counts kept per process, runs in progress read
through the metrics cache; every count equals the sum over the run's batches."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa

import loader
from loader import db, states
from loader.ledger import batches
from loader.run_metrics import MetricsCache
from tests.test_run_metrics import plan_run

COUNTED = ("rows_inserted", "rows_updated", "validation_failures", "batches_failed")


def summed(job: str, run: str) -> dict[str, int]:
    """The counts as the ledger sums them now."""
    b = batches.c
    q = sa.select(sa.func.coalesce(sa.func.sum(b.rows_inserted), 0), sa.func.coalesce(sa.func.sum(b.rows_updated), 0),
                  sa.func.coalesce(sa.func.sum(b.validation_failures), 0),
                  sa.func.count().filter(b.status == "failed")).where(b.etl_job_id == job, b.etl_run_id == run)
    with db.get_engine().connect() as conn:
        row = conn.execute(q).one()
    return dict(zip(COUNTED, map(int, row), strict=True))


def listed(job: str, run: str, cache: MetricsCache | None) -> dict[str, int]:
    [row] = [r for r in loader.list_runs(job, limit=500, metrics=cache) if r["etl_run_id"] == run]
    return {c: row[c] for c in COUNTED}


def commit(pg: psycopg.Connection, job: str, run: str, batch: int, inserted: int) -> None:
    attempt = states.claim_batch(pg, job, run, batch, worker="w", trigger="auto")["attempts"]
    states.commit_batch(pg, job, run, batch, attempt, inserted=inserted, updated=1, valid=inserted + 1, rejected=2,
                        required=1, ms=5.0)


def fail(pg: psycopg.Connection, job: str, run: str, batch: int) -> None:
    attempt = states.claim_batch(pg, job, run, batch, worker="w", trigger="auto")["attempts"]
    states.fail_attempt(pg, job, run, batch, attempt, retry=False, code="x", message="m", stack="s", ms=1.0)


def finish(pg: psycopg.Connection, job: str, run: str) -> None:
    assert states.start_committing(pg, job, run)
    states.finalize_run(pg, job, run)


def test_an_ended_runs_counts_follow_its_retry(ledger: str, pg: psycopg.Connection) -> None:
    job, run = plan_run(pg, 3)
    commit(pg, job, run, 0, 10)
    fail(pg, job, run, 1)
    fail(pg, job, run, 2)
    finish(pg, job, run)
    for cache in (None, MetricsCache()):
        assert listed(job, run, cache) == summed(job, run) == {
            "rows_inserted": 10, "rows_updated": 1, "validation_failures": 2, "batches_failed": 2}
    # Retried: the kept counts are those of an older change number of the run; they are summed again.
    with pg.transaction():
        states.reopen_for_retry(pg, job, run)
        states.requeue_failed_batches(pg, job, run, [1, 2])
    commit(pg, job, run, 1, 20)
    assert listed(job, run, None) == summed(job, run)
    fail(pg, job, run, 2)
    finish(pg, job, run)
    assert listed(job, run, MetricsCache()) == listed(job, run, None) == summed(job, run) == {
        "rows_inserted": 30, "rows_updated": 2, "validation_failures": 4, "batches_failed": 1}


def test_a_run_in_progress_is_counted_through_the_metrics_cache_as_it_changes(
        ledger: str, pg: psycopg.Connection) -> None:
    cache = MetricsCache()
    job, run = plan_run(pg, 4)
    assert listed(job, run, cache) == summed(job, run)
    commit(pg, job, run, 0, 7)
    fail(pg, job, run, 3)
    assert listed(job, run, cache) == summed(job, run) == {
        "rows_inserted": 7, "rows_updated": 1, "validation_failures": 2, "batches_failed": 1}
    running = states.claim_batch(pg, job, run, 1, worker="w", trigger="auto")["attempts"]
    with pg.transaction():
        states.cancel_run(pg, job, run)
        states.cancel_batches(pg, job, run)
    assert listed(job, run, cache) == listed(job, run, None) == summed(job, run)
    # The batch running at the cancel fails afterwards: the canceled run's kept counts follow.
    states.fail_attempt(pg, job, run, 1, running, retry=False, code="x", message="m", stack="s", ms=1.0)
    assert listed(job, run, cache) == listed(job, run, None) == summed(job, run)
    assert summed(job, run)["batches_failed"] == 2
