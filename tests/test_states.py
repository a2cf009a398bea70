"""The state machine against the real ledger: every allowed transition moves, every forbidden one changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from loader import states
from loader.states import ALLOWED_BATCH, ALLOWED_RUN, STORED_RUN_STATES, AttemptStatus, BatchStatus, RunStatus

QUEUE = f"states-{uuid.uuid4().hex[:8]}"  # abandon_stale_batches only ever sees this test's runs


def _table(name: str) -> sql.Identifier:
    from loader.db import ledger_table

    return ledger_table(name)


def make_run(pg: psycopg.Connection, status: str, batches: list[str], attempts: int = 1) -> tuple[str, str]:
    """A run in ``status`` with one batch per entry of ``batches`` (its status), written by hand."""
    job, run = "states", uuid.uuid4().hex
    pg.execute(sql.SQL("INSERT INTO {} (etl_job_id, etl_run_id, status, batch_size, max_attempts, target_table, spec, "
                       "queue) VALUES (%s, %s, %s, 100, 4, 'stg.t', '{{}}', %s)").format(_table("runs")),
               [job, run, status, QUEUE])
    for i, b in enumerate(batches):
        pg.execute(sql.SQL(
            "INSERT INTO {} (etl_job_id, etl_run_id, batch_index, status, attempts, source_file, file_size, "
            "file_mtime_ns, byte_start, byte_end, line_start, line_count, ord_start, rows_attempted, worker, "
            "started_at) VALUES (%s, %s, %s, %s, %s, 'f', 0, 0, 0, 0, 1, 0, 0, 0, 'gone', now() - interval '1 hour')"
        ).format(_table("batches")), [job, run, i, b, attempts])
        pg.execute(sql.SQL("INSERT INTO {} (etl_job_id, etl_run_id, batch_index, attempt, status, started_at) "
                           "VALUES (%s, %s, %s, %s, 'running', now())").format(_table("attempts")),
                   [job, run, i, attempts])
    return job, run


def run_status(pg: psycopg.Connection, job: str, run: str) -> str:
    return pg.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
        _table("runs")), [job, run]).fetchone()[0]


def batch_status(pg: psycopg.Connection, job: str, run: str) -> str:
    return pg.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = 0"
                              ).format(_table("batches")), [job, run]).fetchone()[0]


Call = Callable[[psycopg.Connection, str, str], Any]
#: (transition, the run's batches, the call): enough set-ups that every allowed edge is taken once.
RUN_MOVES: list[tuple[str, list[str], Call]] = [
    ("plan", [], lambda c, j, r: states.start_planning(c, j, r, "w")),
    ("planned", [], lambda c, j, r: states.finish_planning(c, j, r, batches=1, rows=10)),
    ("planned", [], lambda c, j, r: states.finish_planning(c, j, r, batches=0, rows=0)),
    ("plan_failed", [], lambda c, j, r: states.fail_planning(c, j, r, code="source", message="gone")),
    ("queue_failed", [], lambda c, j, r: states.fail_queued(c, j, r, "redis down")),
    ("cancel", [], states.cancel_run),
    ("drained", ["succeeded"], states.start_committing),
    ("finalize", ["succeeded"], states.finalize_run),
    ("finalize", ["succeeded", "failed"], states.finalize_run),
    ("finalize", ["failed"], states.finalize_run),
    ("resume", [], states.resume_committing),
    ("retry", ["failed"], states.reopen_for_retry),
]
BATCH_MOVES: list[tuple[str, Call] | tuple[str, Call, str]] = [
    ("claim", lambda c, j, r: states.claim_batch(c, j, r, 0, worker="w", trigger="auto")),
    ("commit", lambda c, j, r: states.commit_batch(c, j, r, 0, 1, inserted=1, updated=0, valid=1, rejected=0,
                                                   required=0, ms=1.0)),
    ("fail_attempt", lambda c, j, r: states.fail_attempt(c, j, r, 0, 1, retry=True, code="x", message="m",
                                                         stack="s", ms=1.0)),
    ("fail_attempt", lambda c, j, r: states.fail_attempt(c, j, r, 0, 1, retry=False, code="x", message="m",
                                                         stack="s", ms=1.0)),
    ("fail_unstarted", lambda c, j, r: states.fail_unstarted(c, j, r, 0, code="x", message="m", stack="s")),
    ("abandon", lambda c, j, r: states.abandon_stale_batches(c, queue=QUEUE, stale_after=1.0)),
    ("requeue", lambda c, j, r: states.requeue_failed_batches(c, j, r, [0])),
    # The cancel transitions happen in a canceled run (the third item: the run's status).
    ("cancel", lambda c, j, r: states.cancel_batches(c, j, r), "canceled"),
    ("cancel_attempt", lambda c, j, r: states.cancel_attempt(c, j, r, 0, 1, ms=1.0), "canceled"),
    ("abandon_canceled", lambda c, j, r: states.abandon_canceled_batches(c, queue=QUEUE, stale_after=1.0), "canceled"),
]


def test_every_run_transition_moves_only_from_its_allowed_states(ledger, pg):
    """Each guarded run change is tried from every stored state: it moves from its sources only."""
    by_name = {t.name: t for t in states.RUN_TRANSITIONS}
    seen: set[tuple[Any, Any]] = set()
    for name, batches, call in RUN_MOVES:
        t = by_name[name]
        for start in STORED_RUN_STATES:
            job, run = make_run(pg, start.value, batches)
            call(pg, job, run)
            end = RunStatus(run_status(pg, job, run))
            if start in t.sources:
                assert end in t.targets, (name, start, end)
                seen.add((start, end))
            else:
                assert end == start, f"{name} moved a {start.value} run to {end.value}"
    allowed = {(a, b) for a, targets in ALLOWED_RUN.items() if a is not None for b in targets}
    assert seen == allowed
    assert {name for name, _, _ in RUN_MOVES} | {"create"} == set(by_name)


def test_a_run_is_created_queued_and_a_duplicate_run_id_is_refused(ledger, pg):
    states.create_run(pg, "states", "created-once", batch_size=100, max_attempts=4, target="stg.t", spec={},
                      forced=False, queue=QUEUE, started_by="test")
    assert run_status(pg, "states", "created-once") == RunStatus.QUEUED.value
    assert ALLOWED_RUN[None] == {RunStatus.QUEUED}
    with pytest.raises(psycopg.errors.UniqueViolation):
        states.create_run(pg, "states", "created-once", batch_size=100, max_attempts=4, target="stg.t", spec={},
                          forced=False, queue=QUEUE, started_by="test")


def test_a_run_with_a_batch_still_open_does_not_start_committing(ledger, pg):
    for open_state in states.OPEN_BATCH_STATES:
        job, run = make_run(pg, "loading", ["succeeded", open_state.value])
        assert not states.start_committing(pg, job, run)
        assert run_status(pg, job, run) == "loading"


def test_every_batch_transition_moves_only_from_its_allowed_states(ledger, pg):
    """Each guarded batch change is tried from every batch state (its run loading): it moves from its sources only."""
    by_name = {t.name: t for t in states.BATCH_TRANSITIONS}
    seen: set[tuple[Any, Any]] = set()
    for name, call, *in_run in BATCH_MOVES:
        t = by_name[name]
        for start in BatchStatus:
            job, run = make_run(pg, in_run[0] if in_run else "loading", [start.value])
            call(pg, job, run)
            end = BatchStatus(batch_status(pg, job, run))
            if start in t.sources:
                assert end in t.targets, (name, start, end)
                seen.add((start, end))
            else:
                assert end == start, f"{name} moved a {start.value} batch to {end.value}"
    allowed = {(a, b) for a, targets in ALLOWED_BATCH.items() if a is not None for b in targets}
    assert seen == allowed
    assert {move[0] for move in BATCH_MOVES} | {"plan"} == set(by_name)


def test_a_batch_is_claimed_only_while_its_run_is_loading(ledger, pg):
    for run_state in STORED_RUN_STATES:
        job, run = make_run(pg, run_state.value, ["pending"])
        began = states.claim_batch(pg, job, run, 0, worker="w", trigger="auto")
        assert (began is not None) == (run_state is RunStatus.LOADING), run_state
        assert batch_status(pg, job, run) == ("running" if run_state is RunStatus.LOADING else "pending")


def test_only_the_attempt_that_holds_a_batch_commits_or_fails_it(ledger, pg):
    """A stale attempt (a redelivery took the batch over) neither commits nor fails it."""
    job, run = make_run(pg, "loading", ["running"], attempts=2)
    assert not states.commit_batch(pg, job, run, 0, 1, inserted=1, updated=0, valid=1, rejected=0, required=0,
                                   ms=1.0)
    assert not states.fail_attempt(pg, job, run, 0, 1, retry=False, code="x", message="m", stack="s", ms=1.0)
    assert batch_status(pg, job, run) == "running"
    with pg.transaction():
        assert not states.holds_batch(pg, job, run, 0, 1)
        assert states.holds_batch(pg, job, run, 0, 2)
    assert states.commit_batch(pg, job, run, 0, 2, inserted=1, updated=0, valid=1, rejected=0, required=0, ms=1.0)
    assert batch_status(pg, job, run) == "succeeded"


def test_a_claim_that_takes_a_running_batch_over_ends_the_attempt_it_took_over(ledger, pg):
    """A redelivery takes over a batch whose attempt nobody will end (its worker killed, or its failure not
    recorded while the database was away): that attempt ends abandoned as taken_over, never running for ever."""
    job, run = make_run(pg, "loading", ["running"])
    began = states.claim_batch(pg, job, run, 0, worker="w2", trigger="auto")
    assert began is not None and began["attempts"] == 2
    states.end_attempt(pg, job, run, 0, 1, AttemptStatus.SKIPPED, ms=1.0)  # the older execution, if alive
    got = pg.execute(sql.SQL("SELECT attempt, status, error_code FROM {} WHERE etl_job_id = %s AND etl_run_id = %s "
                             "ORDER BY attempt").format(_table("attempts")), [job, run]).fetchall()
    assert got == [(1, "abandoned", "taken_over"), (2, "running", None)]


def test_no_batch_commits_once_its_run_is_canceled(ledger, pg):
    """The cancel barrier: a batch that reaches its commit after the cancel commits nothing."""
    job, run = make_run(pg, "canceled", ["running"])
    assert not states.commit_batch(pg, job, run, 0, 1, inserted=1, updated=0, valid=1, rejected=0, required=0,
                                   ms=1.0)
    assert states.cancel_attempt(pg, job, run, 0, 1, ms=1.0)
    assert batch_status(pg, job, run) == "canceled"
    attempt = pg.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(
        _table("attempts")), [job, run]).fetchone()[0]
    assert attempt == "canceled"


def test_a_batch_transition_in_a_loading_run_never_cancels_a_batch(ledger, pg):
    for start in BatchStatus:
        job, run = make_run(pg, "loading", [start.value])
        states.cancel_batches(pg, job, run)
        states.abandon_canceled_batches(pg, queue=QUEUE, stale_after=1.0)
        assert batch_status(pg, job, run) == start.value


def test_a_canceled_runs_batch_is_ended_unless_a_live_worker_says_it_is_executing_it(ledger, pg):
    """The batch's worker beats on, but gave the batch up (the ledger was unreachable when it tried to record
    that): its batch of a canceled run is ended all the same; while a live worker's heartbeat names the batch,
    it stays running (that worker ends it at its commit)."""
    from loader.reconcile import beat, forget

    worker = f"live-{uuid.uuid4().hex[:8]}"
    job, run = make_run(pg, "canceled", ["running"])
    for table in ("batches", "attempts"):
        pg.execute(sql.SQL("UPDATE {} SET worker = %s WHERE etl_job_id = %s AND etl_run_id = %s").format(
            _table(table)), [worker, job, run])
    try:
        beat(pg, worker, (job, run, 0))
        states.abandon_canceled_batches(pg, queue=QUEUE, stale_after=1.0)
        assert batch_status(pg, job, run) == "running"
        beat(pg, worker, None)  # alive, executing nothing
        assert states.abandon_canceled_batches(pg, queue=QUEUE, stale_after=1.0) == [(job, run, 0)]
        assert batch_status(pg, job, run) == "canceled"
        attempt = pg.execute(sql.SQL("SELECT status, error_message FROM {} WHERE etl_job_id = %s AND etl_run_id = %s"
                                     ).format(_table("attempts")), [job, run]).fetchone()
        assert attempt == ("abandoned", "the worker gave this attempt up (it could not record its end) and went on "
                                        "with other work")
    finally:
        forget(pg, worker)


@pytest.mark.parametrize("table", ["runs", "batches", "attempts"])
def test_the_ledger_refuses_a_status_the_state_machine_does_not_know(ledger, pg, table):
    job, run = make_run(pg, "loading", ["pending"])
    with pytest.raises(psycopg.errors.CheckViolation):
        pg.execute(sql.SQL("UPDATE {} SET status = 'done' WHERE etl_job_id = %s AND etl_run_id = %s").format(
            _table(table)), [job, run])
    assert run_status(pg, job, run) == "loading" and batch_status(pg, job, run) == "pending"


def test_every_state_has_a_label_and_an_icon():
    for status in RunStatus:
        look = states.run_look(status.value)
        assert look.label and look.icon.startswith(":material/") and look is not states.UNKNOWN_LOOK
    assert states.run_look("no-such-state") is states.UNKNOWN_LOOK and states.run_look(None).label == "Idle"
    for batch in BatchStatus:
        if batch is BatchStatus.CANCELED:  # says why it never ran
            assert states.BATCH_LOOKS[batch].label == "not started (run canceled)"
        else:
            assert states.BATCH_LOOKS[batch].label == batch.value
        assert states.BATCH_LOOKS[batch].icon
    assert states.batch_status_label("retried", 2) == "retried(2)"


def test_the_diagram_in_the_state_module_names_every_transition():
    runs_part, batches_part = (states.__doc__ or "").split("Batches (", 1)
    for doc, transitions in ((runs_part, states.RUN_TRANSITIONS), (batches_part, states.BATCH_TRANSITIONS)):
        for t in transitions:
            line = next((x for x in doc.splitlines() if x.strip().startswith(t.name + " ")), None)
            assert line is not None, t.name
            assert all(target.value in line for target in t.targets), line
