"""The incremental run metrics (loader/run_metrics.py) equal the full recomputation, whatever the ledger went through.

Runs are driven through the state machine's own functions (loader/states.py) on the real ledger: claims,
commits, transient and final failures, failures before an attempt started, workers lost, retries, takeovers
by a second delivery, cancels. After each step one :class:`MetricsCache`, refreshed incrementally, must give
what ``contract._metrics_query`` and ``contract.loading_ms_query`` compute from every row, field by field.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from loader import db, states
from loader.contract import _metrics_query, get_run_row, loading_ms_query, run_contract
from loader.run_metrics import Figures, MetricsCache, percentile_cont
from loader.states import BatchStatus

QUEUE = f"metrics-{uuid.uuid4().hex[:8]}"  # abandon_stale_batches sees only this test's runs


def _t(name: str) -> sql.Identifier:
    return db.ledger_table(name)


def plan_run(pg: psycopg.Connection, n: int, rows: int = 100) -> tuple[str, str]:
    """A loading run of ``n`` pending batches, through create_run, start_planning and finish_planning."""
    job, run = "metrics", uuid.uuid4().hex
    states.create_run(pg, job, run, batch_size=rows, max_attempts=3, target="stg.t", spec={}, forced=False,
                      queue=QUEUE, started_by="test")
    states.start_planning(pg, job, run, "planner")
    with pg.transaction():
        pg.execute(sql.SQL(
            "INSERT INTO {} (etl_job_id, etl_run_id, batch_index, source_file, file_size, file_mtime_ns, byte_start,"
            " byte_end, line_start, line_count, ord_start, rows_attempted) SELECT %s, %s, i, 'f', 0, 0, 0, 0,"
            " i * %s + 1, %s, i * %s, %s FROM generate_series(0, %s - 1) i").format(_t("batches")),
            [job, run, rows, rows, rows, rows, n])
        states.finish_planning(pg, job, run, batches=n, rows=n * rows)
    return job, run


def full(conn: sa.Connection, job: str, run: str, now: Any) -> dict[str, Any]:
    """The full recomputation, as run_contract does it without a cache."""
    m = conn.execute(_metrics_query(job, run)).one()._asdict()
    loading = conn.execute(loading_ms_query(job, run, now, get_run_row(conn, job, run).completed_at)).one()
    m["loading_ms"], m["transient"] = float(loading.loading_ms), int(loading.transient)
    return m


def assert_same(got: Figures, want: dict[str, Any], where: str) -> None:
    for field, value in want.items():
        mine = getattr(got, field)
        if field == "avg_ms" and value is not None and mine is not None:
            # PostgreSQL adds in scan order, numpy pairwise: the same sum to the last bits.
            assert math.isclose(mine, float(value), rel_tol=1e-12), (where, field, mine, value)
        elif isinstance(value, float) or field in ("p95_ms", "loading_ms"):
            assert mine == (float(value) if value is not None else None), (where, field, mine, value)
        else:
            assert mine == value, (where, field, mine, value)


def compare(cache: MetricsCache, job: str, run: str, where: str) -> Figures:
    with db.get_engine().connect() as conn:
        now = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
        got = cache.figures(conn, get_run_row(conn, job, run), now)
        assert got is not None
        assert_same(got, full(conn, job, run, now), where)
    return got


class Walk:
    """A random walk over one run's batches, each step a function of loader.states."""

    def __init__(self, pg: psycopg.Connection, job: str, run: str, n: int, rnd: random.Random) -> None:
        self.pg, self.job, self.run, self.n, self.rnd = pg, job, run, n, rnd

    def batches(self, *statuses: BatchStatus) -> list[tuple[int, int]]:
        return [(int(i), int(a)) for i, a in self.pg.execute(sql.SQL(
            "SELECT batch_index, attempts FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = ANY(%s) "
            "ORDER BY batch_index").format(_t("batches")), [self.job, self.run, [s.value for s in statuses]])]

    def ms(self) -> float:
        # Ties and awkward binary fractions on purpose: the p95 interpolates between neighbours.
        return self.rnd.choice([50.0, 100.0, 0.1, round(self.rnd.uniform(1, 400), 3), self.rnd.random() * 1000])

    def step(self) -> str:
        rnd, pg, job, run = self.rnd, self.pg, self.job, self.run
        running = self.batches(BatchStatus.RUNNING)
        startable = self.batches(BatchStatus.PENDING, BatchStatus.RETRIED, BatchStatus.RUNNING)
        moves = ["claim"] * 4 + ["commit"] * 4 * bool(running) + ["fail"] * 2 * bool(running)
        failed = self.batches(BatchStatus.FAILED)
        moves += ["unstarted", "abandon"] if running else []
        moves += ["retry", "skip"] if failed else []
        move = rnd.choice(moves) if startable or running else "retry"
        if move == "claim" and startable:
            i, _ = rnd.choice(startable)
            states.claim_batch(pg, job, run, i, worker=rnd.choice(["w1", "w2"]), trigger="auto")
        elif move == "commit":
            i, attempt = rnd.choice(running)
            valid = rnd.randint(0, 100)
            inserted = rnd.randint(0, valid)
            rejected = 100 - valid
            with pg.transaction():
                updated = rnd.randint(0, valid - inserted)
                states.commit_batch(pg, job, run, i, attempt, inserted=inserted, updated=updated, valid=valid,
                                    rejected=rejected, required=rnd.randint(0, rejected), ms=self.ms())
                states.end_attempt(pg, job, run, i, attempt, states.AttemptStatus.SUCCEEDED, ms=self.ms())
        elif move == "fail":
            i, attempt = rnd.choice(running)
            with pg.transaction():
                states.fail_attempt(pg, job, run, i, attempt, retry=rnd.random() < 0.6, code="40P01",
                                    message="deadlock", stack="s", ms=self.ms())
        elif move == "unstarted":  # a second delivery that never reached the database: the attempt stays open
            i, _ = rnd.choice(running)
            states.fail_unstarted(pg, job, run, i, code="08006", message="gone", stack="s")
        elif move == "abandon":  # the worker stopped beating (no worker beats here)
            states.abandon_stale_batches(pg, queue=QUEUE, stale_after=0.0)
        elif move == "skip":
            # The worker whose batch failed meanwhile without its attempt (``unstarted``) finds it no longer
            # holds the batch and ends its attempt: the only attempt change that moves no batch.
            i, attempt = rnd.choice(failed)
            states.end_attempt(pg, job, run, i, attempt, states.AttemptStatus.SKIPPED, ms=1.0)
        else:  # retry the failed batches, as loader.runs.retry_run does, the run reopened if it had ended
            failed = [i for i, _ in self.batches(BatchStatus.FAILED)]
            with pg.transaction():
                states.reopen_for_retry(pg, job, run)
                states.requeue_failed_batches(pg, job, run, failed)
        if not self.batches(BatchStatus.PENDING, BatchStatus.RUNNING, BatchStatus.RETRIED):
            if states.start_committing(pg, job, run):
                states.finalize_run(pg, job, run)
        return move


def test_incremental_metrics_equal_full_recomputation_after_random_commits_failures_and_retries(
        ledger: str, pg: psycopg.Connection) -> None:
    rnd = random.Random(20261201)
    cache = MetricsCache()
    for round_ in range(3):
        job, run = plan_run(pg, rnd.choice([1, 7, 40]))
        walk = Walk(pg, job, run, 40, rnd)
        compare(cache, job, run, f"round {round_} planned")
        for k in range(150):
            move = walk.step()
            if rnd.random() < 0.7:  # several steps between two reads too
                compare(cache, job, run, f"round {round_} step {k} {move}")
        compare(cache, job, run, f"round {round_} end")


def test_incremental_metrics_equal_full_recomputation_through_a_cancel(ledger: str, pg: psycopg.Connection) -> None:
    rnd = random.Random(7)
    cache = MetricsCache()
    job, run = plan_run(pg, 30)
    walk = Walk(pg, job, run, 30, rnd)
    for _ in range(60):
        walk.step()
    compare(cache, job, run, "before the cancel")
    with pg.transaction():
        states.cancel_run(pg, job, run)
        states.cancel_batches(pg, job, run)
    compare(cache, job, run, "canceled")
    for i, attempt in walk.batches(BatchStatus.RUNNING)[:1]:  # one reaches its commit after the cancel
        states.cancel_attempt(pg, job, run, i, attempt, ms=12.5)
    states.abandon_canceled_batches(pg, queue=QUEUE, stale_after=0.0)
    got = compare(cache, job, run, "after the reconciler")
    assert got.batches_canceled > 0 and got.batches_running == 0


def test_a_commit_that_took_its_number_before_a_newer_one_is_counted_when_it_lands(
        ledger: str, pg: psycopg.Connection) -> None:
    """Worker A takes change number 100 in its commit, worker B takes 101 and commits first; a read sees
    101. When A commits, its batch (number 100, below what was read) is still counted."""
    cache = MetricsCache()
    job, run = plan_run(pg, 3)
    for i in (0, 1):
        states.claim_batch(pg, job, run, i, worker="w", trigger="auto")
    compare(cache, job, run, "claimed")
    with psycopg.connect(pg.info.dsn, autocommit=False) as slow:
        assert states.commit_batch(slow, job, run, 0, 1, inserted=7, updated=0, valid=7, rejected=0, required=0,
                                   ms=30.0)
        states.commit_batch(pg, job, run, 1, 1, inserted=5, updated=0, valid=5, rejected=0, required=0, ms=20.0)
        assert compare(cache, job, run, "B committed").batches_succeeded == 1
        slow.commit()
    got = compare(cache, job, run, "A landed")
    assert (got.batches_succeeded, got.rows_inserted) == (2, 12)


def test_a_replaced_run_is_read_again_from_the_start(ledger: str, pg: psycopg.Connection) -> None:
    cache = MetricsCache()
    job, run = plan_run(pg, 5)
    compare(cache, job, run, "first")
    pg.execute(sql.SQL("DELETE FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(_t("runs")), [job, run])
    states.create_run(pg, job, run, batch_size=100, max_attempts=3, target="stg.t", spec={}, forced=False,
                      queue=QUEUE, started_by="test")
    assert compare(cache, job, run, "replaced").batches_total == 0


def test_sessions_in_threads_share_one_state_per_run(ledger: str, pg: psycopg.Connection) -> None:
    cache = MetricsCache()
    job, run = plan_run(pg, 20)
    errors: list[BaseException] = []

    def read() -> None:  # while batches are claimed: the figures of some moment, so no comparison here
        try:
            for _ in range(5):
                with db.get_engine().connect() as conn:
                    now = conn.execute(sa.select(sa.func.now())).scalar_one()
                    cache.figures(conn, get_run_row(conn, job, run), now)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        states.claim_batch(pg, job, run, i, worker="w", trigger="auto")
    for t in threads:
        t.join()
    assert not errors
    assert compare(cache, job, run, "after").batches_running == 10
    assert len(cache._runs) == 1


def test_the_cache_forgets_the_least_recently_read_runs_beyond_its_memory(ledger: str, pg: psycopg.Connection) -> None:
    runs = [plan_run(pg, 50) for _ in range(3)]
    probe = MetricsCache()
    compare(probe, *runs[0], "probe")
    cache = MetricsCache(max_bytes=probe.nbytes * 5 // 2)  # two runs of 50 batches, not three
    for job, run in runs:
        compare(cache, job, run, "read")
    assert [k[2] for k in cache._runs] == [r for _, r in runs[1:]]


def test_run_contract_through_the_cache_is_the_contract(ledger: str, pg: psycopg.Connection) -> None:
    rnd = random.Random(3)
    job, run = plan_run(pg, 12)
    walk = Walk(pg, job, run, 12, rnd)
    for _ in range(40):
        walk.step()
    while walk.batches(BatchStatus.RUNNING):  # no attempt open: loading time no longer moves with the clock
        i, attempt = walk.batches(BatchStatus.RUNNING)[0]
        states.fail_attempt(pg, job, run, i, attempt, retry=False, code="x", message="m", stack="s", ms=1.0)
    cached = run_contract(job, run, include_batches=False, metrics=MetricsCache())
    plain = run_contract(job, run, include_batches=False)
    cached["metrics"].pop("elapsed_ms"), plain["metrics"].pop("elapsed_ms")
    assert cached == plain


@pytest.mark.parametrize("values", [[], [3.0], [1.0, 2.0], [0.1, 0.2, 0.7, 1000.0], [0.3] * 7 + [1e-9, 123.456]])
def test_percentile_cont_interpolates_as_postgresql_does(pg: psycopg.Connection, values: list[float]) -> None:
    import numpy as np

    server = pg.execute("SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY v) FROM unnest(%s::float8[]) v",
                        [values]).fetchone()[0]
    assert percentile_cont(np.array(sorted(values), dtype=np.float64), 0.95) == server


def test_an_attempt_that_ends_without_its_batch_moving_stops_counting_loading_time(
        ledger: str, pg: psycopg.Connection) -> None:
    """A batch failed before its open attempt ended (a second delivery could not start it); the worker of that
    attempt then finds it lost the batch and ends it ``skipped``: no batch change number moves, yet the
    attempt no longer counts until now."""
    cache = MetricsCache()
    job, run = plan_run(pg, 1)
    states.claim_batch(pg, job, run, 0, worker="w", trigger="auto")
    states.fail_unstarted(pg, job, run, 0, code="08006", message="gone", stack="s")
    compare(cache, job, run, "attempt open")
    states.end_attempt(pg, job, run, 0, 1, states.AttemptStatus.SKIPPED, ms=1.0)
    ended = compare(cache, job, run, "attempt ended").loading_ms
    assert compare(cache, job, run, "later").loading_ms == ended


def test_a_cache_that_builds_aside_answers_none_until_it_holds_the_run_then_the_same_figures(
        ledger: str, pg: psycopg.Connection) -> None:
    """The console's shared cache reads a run it does not hold in a thread of its own; meanwhile run_contract
    computes the figures in full (None from the cache), so no tick waits for the whole run to be read."""
    cache = MetricsCache(build_aside=True)
    job, run = plan_run(pg, 30)
    states.claim_batch(pg, job, run, 0, worker="w", trigger="auto")
    with db.get_engine().connect() as conn:
        now = conn.execute(sa.select(sa.func.now())).scalar_one()
        assert cache.figures(conn, get_run_row(conn, job, run), now) is None
    deadline = time.monotonic() + 30
    while True:
        with db.get_engine().connect() as conn:
            now = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
            got = cache.figures(conn, get_run_row(conn, job, run), now)
            if got is not None:
                assert_same(got, full(conn, job, run, now), "built aside")
                break
        assert time.monotonic() < deadline, "the cache never held the run"
        time.sleep(0.05)
    assert run_contract(job, run, include_batches=False, metrics=cache)["metrics"]["batches_running"] == 1


def test_a_refresh_uses_the_signature_its_caller_read_instead_of_reading_it_again(
        ledger: str, pg: psycopg.Connection) -> None:
    """The console's tick reads the change signature, then the contract: the cache takes that signature (a
    change after it is read at the next tick, as if the cache had read it itself) and does not ask again."""
    from loader.contract import change_signature
    from loader.run_metrics import RunMetrics

    job, run = plan_run(pg, 6)
    with db.get_engine().connect() as conn:
        state = RunMetrics(job, run, int(get_run_row(conn, job, run).run_seq))
        state.refresh(conn)
        before = change_signature(job, run, conn)
        walk = Walk(pg, job, run, 6, random.Random(5))
        while change_signature(job, run, conn) == before:
            walk.step()
        state.refresh(conn, before)  # what the caller read before the change: nothing to read yet
        assert state.rows_read == 0
        state.refresh(conn)
        assert state.rows_read > 0
