"""The contract's figures without a cache (``contract.batch_figures``, ``contract.loading_figures``) are exactly
what ``contract._metrics_query`` and ``contract.loading_ms_query`` compute, whatever the ledger went through.

Runs are driven through the state machine's own functions (tests/test_run_metrics.py's random walk): claims,
commits, transient and final failures, workers lost, retries, cancels. After each step both ways of computing
the figures are read on one connection, at the same ``now``, and compared field by field.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from loader import contract, db, states
from loader.contract import (
    READ_SETTINGS,
    batch_figures,
    get_run_row,
    loading_figures,
    p95_between,
    run_contract,
    set_local,
)
from loader.states import BatchStatus

from .test_run_metrics import Walk, full, plan_run

SETTING = sa.select(sa.func.current_setting(sa.bindparam("name")))


def cold(conn: sa.Connection, job: str, run: str, now: Any) -> dict[str, Any]:
    """The figures as run_contract computes them without a cache, under its read settings."""
    set_local(conn, READ_SETTINGS)
    m = dataclasses.asdict(batch_figures(conn, job, run))
    m["loading_ms"], m["transient"] = loading_figures(conn, job, run, now, get_run_row(conn, job, run).completed_at)
    return m


def compare(job: str, run: str, where: str) -> dict[str, Any]:
    with db.get_engine().connect() as conn:
        now = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
        want = full(conn, job, run, now)
        got = cold(conn, job, run, now)
    assert set(got) == set(want), where
    for field, value in want.items():
        if field == "avg_ms" and value is not None and got[field] is not None:
            # The same durations added in the order each plan reads them (the same order when both scan the
            # run's rows alike): equal to the last bits, or within them.
            assert math.isclose(got[field], float(value), rel_tol=1e-12), (where, field, got[field], value)
        elif field in ("p95_ms", "loading_ms", "avg_ms"):
            assert got[field] == (float(value) if value is not None else None), (where, field, got[field], value)
        else:
            assert got[field] == value and type(got[field]) is type(value), (where, field, got[field], value)
    return got


def test_cold_figures_equal_the_full_recomputation_after_random_commits_failures_and_retries(
        ledger: str, pg: psycopg.Connection) -> None:
    rnd = random.Random(20261202)
    for round_ in range(3):
        job, run = plan_run(pg, rnd.choice([1, 7, 40]))
        walk = Walk(pg, job, run, 40, rnd)
        compare(job, run, f"round {round_} planned")
        for k in range(120):
            move = walk.step()
            if rnd.random() < 0.5:
                compare(job, run, f"round {round_} step {k} {move}")
        compare(job, run, f"round {round_} end")


def test_cold_figures_equal_the_full_recomputation_through_a_cancel(ledger: str, pg: psycopg.Connection) -> None:
    rnd = random.Random(11)
    job, run = plan_run(pg, 30)
    walk = Walk(pg, job, run, 30, rnd)
    for _ in range(60):
        walk.step()
    with pg.transaction():
        states.cancel_run(pg, job, run)
        states.cancel_batches(pg, job, run)
    got = compare(job, run, "canceled")
    assert got["batches_canceled"] > 0


@pytest.mark.parametrize("succeeded", [1, 2, 3, 20, 21, 22, 137])
def test_the_p95_read_from_the_index_is_percentile_cont_of_every_succeeded_batch(
        ledger: str, pg: psycopg.Connection, succeeded: int) -> None:
    """Counts of succeeded batches where 0.95 * (n - 1) is whole (21) and where it is not; ties, awkward binary
    fractions, a succeeded batch without a duration (not counted, as percentile_cont skips NULL) and failed
    batches with longer durations (not counted either)."""
    rnd = random.Random(succeeded)
    job, run = plan_run(pg, succeeded + 3)
    for i in range(succeeded + 3):
        states.claim_batch(pg, job, run, i, worker="w", trigger="auto")
        if i < succeeded:
            ms = rnd.choice([50.0, 0.1, 1e-9, rnd.random() * 1000, round(rnd.uniform(1, 400), 3)])
            states.commit_batch(pg, job, run, i, 1, inserted=1, updated=0, valid=1, rejected=0, required=0, ms=ms)
        else:
            states.fail_attempt(pg, job, run, i, 1, retry=False, code="x", message="m", stack="s", ms=5000.0 + i)
    if succeeded > 2:
        pg.execute(sql.SQL("UPDATE {} SET duration_ms = NULL WHERE etl_job_id = %s AND etl_run_id = %s "
                           "AND batch_index = 0").format(db.ledger_table("batches")), [job, run])
    got = compare(job, run, f"{succeeded} succeeded")
    assert got["batches_succeeded"] == succeeded and got["p95_ms"] is not None


def test_a_run_without_batches_has_empty_figures(ledger: str, pg: psycopg.Connection) -> None:
    job, run = "metrics", "unplanned"
    states.create_run(pg, job, run, batch_size=100, max_attempts=3, target="stg.t", spec={}, forced=False,
                      queue="q", started_by="test")
    got = compare(job, run, "no batches")
    assert (got["batches_total"], got["p95_ms"], got["avg_ms"], got["change_seq"], got["loading_ms"]) == (
        0, None, None, None, 0.0)


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [0.1, 0.2, 0.7, 1000.0], [0.3] * 7 + [1e-9, 123.456],
                                    [float(i) / 7 for i in range(21)], [float(i) / 3 for i in range(22)]])
def test_p95_between_interpolates_as_percentile_cont_does(pg: psycopg.Connection, values: list[float]) -> None:
    server = pg.execute("SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY v) FROM unnest(%s::float8[]) v",
                        [values]).fetchone()[0]
    ordered = sorted(values)
    second = math.ceil(0.95 * (len(values) - 1))
    around = ordered[max(second - 1, 0):second + 1]  # what the index gives: that position and the one before
    assert p95_between(len(values), around) == server


def test_the_contract_without_a_cache_reads_under_its_settings_and_leaves_the_pool_as_it_was(
        ledger: str, pg: psycopg.Connection) -> None:
    """SET LOCAL: the settings end with the contract's read, so the next borrower of the connection gets the
    server's own."""
    job, run = plan_run(pg, 3)
    with db.get_engine().connect() as conn:
        before = {name: conn.execute(SETTING, {"name": name}).scalar_one() for name in READ_SETTINGS}
    assert before != READ_SETTINGS
    for _ in range(3):  # every connection of a small pool has served a contract
        assert run_contract(job, run, include_batches=False)["metrics"]["batches_total"] == 3
    with db.get_engine().connect() as conn:
        assert {name: conn.execute(SETTING, {"name": name}).scalar_one() for name in READ_SETTINGS} == before


def walked_run(pg: psycopg.Connection, n: int = 20) -> tuple[str, str]:
    """A run some way through, with no attempt open (its loading time no longer moves with the clock)."""
    job, run = plan_run(pg, n)
    walk = Walk(pg, job, run, n, random.Random(n))
    for _ in range(3 * n):
        walk.step()
    while walk.batches(BatchStatus.RUNNING):
        i, attempt = walk.batches(BatchStatus.RUNNING)[0]
        states.fail_attempt(pg, job, run, i, attempt, retry=False, code="x", message="m", stack="s", ms=1.0)
    for i, attempt in pg.execute(sql.SQL(  # of batches that failed before their attempt ended (``unstarted``)
            "SELECT batch_index, attempt FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND ended_at IS NULL")
            .format(db.ledger_table("attempts")), [job, run]).fetchall():
        states.end_attempt(pg, job, run, i, attempt, states.AttemptStatus.SKIPPED, ms=1.0)
    return job, run


def sweeps_seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Each attempts' sweep of the contract, as (thread name, server process id of its connection)."""
    seen: list[tuple[str, int]] = []
    real = contract.loading_figures

    def spy(conn: sa.Connection, *args: Any) -> tuple[float, int]:
        seen.append((threading.current_thread().name, conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()))
        return real(conn, *args)

    monkeypatch.setattr(contract, "loading_figures", spy)
    return seen


def slow_aggregate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch aggregate takes half a second (a big run's): the second connection is lent meanwhile."""
    real = contract.batch_figures

    def slow(conn: sa.Connection, *args: Any) -> contract.BatchFigures:
        time.sleep(0.5)
        return real(conn, *args)

    monkeypatch.setattr(contract, "batch_figures", slow)


def test_the_attempts_sweep_runs_beside_the_batch_aggregate_on_a_second_connection_with_the_same_figures(
        ledger: str, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    job, run = walked_run(pg)
    with db.get_engine().connect() as conn:
        now = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
        want = full(conn, job, run, now)
        seen = sweeps_seen(monkeypatch)
        slow_aggregate(monkeypatch)
        figures, loading_ms, transient = contract.cold_figures(conn, job, run, now, None)
        mine = conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
    assert (loading_ms, transient) == (float(want["loading_ms"]), want["transient"])
    assert figures.batches_total == want["batches_total"] and figures.p95_ms == want["p95_ms"]
    assert len(seen) == 1 and seen[0][0] == f"sweep {run}" and seen[0][1] != mine


def test_with_no_connection_to_spare_the_contract_sweeps_on_its_own_without_waiting_for_the_pool(
        ledger: str, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool of one: the contract holds it; the second connection it would like is never lent, and it does not
    wait the pool's timeout (30 s) for it, nor deadlock: the sweep runs after the aggregate, on its connection."""
    job, run = walked_run(pg)
    monkeypatch.setenv("ETL_DB_POOL_SIZE", "1")
    db.close_all()
    try:
        plain = contract_figures(job, run)
        seen = sweeps_seen(monkeypatch)
        t0 = time.monotonic()
        assert contract_figures(job, run) == plain
        assert time.monotonic() - t0 < 5
        assert [name for name, _ in seen] == [threading.current_thread().name]
    finally:
        db.close_all()


def test_a_sweep_that_fails_beside_the_aggregate_fails_the_contract(
        ledger: str, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    job, run = walked_run(pg, 5)

    def broken(conn: sa.Connection, *args: Any) -> tuple[float, int]:
        if threading.current_thread().name.startswith("sweep "):
            raise RuntimeError("the sweep broke")
        raise AssertionError("the sweep ran in the caller's thread")

    slow_aggregate(monkeypatch)
    monkeypatch.setattr(contract, "loading_figures", broken)
    with pytest.raises(RuntimeError, match="the sweep broke"):
        run_contract(job, run, include_batches=False)


def contract_figures(job: str, run: str) -> dict[str, Any]:
    figures = run_contract(job, run, include_batches=False)["metrics"]
    figures.pop("elapsed_ms")
    return figures
