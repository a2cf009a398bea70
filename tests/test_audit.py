"""The audit trail: every start, forced start, retry and cancel records its actor, time and request with it."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import loader
from loader import planning
from loader import runs as runs_mod
from loader.errors import ConfigError, RunConflict

from .helpers import create_poisoned_target_table, job_name, remove_poison, write_catalog, write_ndjson

pytestmark = pytest.mark.usefixtures("ledger")

#: Actors are text from outside (a proxy header, ETL_ACTOR): stored exactly, whatever they hold.
HOSTILE = "<img src=x onerror=alert(1)>@example.com"


def make_job(tmp_path: Path, target: str, n: int = 300, poison: str | None = None) -> tuple[Path, str, str]:
    name = job_name("audit")
    records = [{"id": f"r{i}"} for i in range(n)]
    if poison is not None:
        records[n // 2] = {"id": poison}
    write_ndjson(tmp_path / "data" / f"{name}.ndjson", records)
    table = f"{target}.items"
    return write_catalog(tmp_path, {name: {"source": f"data/{name}.ndjson", "target_table": table,
                                           "source_id": "id"}}), name, table


def ledger_actions(pg: psycopg.Connection, job: str) -> list[tuple[str, str, str, dict]]:
    return [tuple(r) for r in pg.execute(sql.SQL(
        "SELECT etl_run_id, actor, action, detail FROM {} WHERE etl_job_id = %s ORDER BY id").format(
            sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "actions")), [job])]


def dataloader(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_start_retry_and_cancel_from_the_api_record_the_actor_given_in_the_contract_oldest_first(
        tmp_path, target_schema, pg, workers):
    catalog, job, table = make_job(tmp_path, target_schema, poison="poison")
    create_poisoned_target_table(pg, table, "poison")
    ref = loader.start_run(job, catalog=catalog, batch_size=100, actor=HOSTILE)
    assert loader.wait_for_run(job, ref.etl_run_id, timeout=60)["status"] == "partial_success"
    remove_poison(pg, table)
    assert loader.retry_run(job, ref.etl_run_id, [1], actor="ops@example.com") == [1]
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    assert c["status"] == "success"
    assert c["started_by"] == HOSTILE
    assert [(a["actor"], a["action"], a["detail"]) for a in c["actions"]] == [
        (HOSTILE, "start", {"batch_size": 100}),
        ("ops@example.com", "retry", {"batches": [1], "asked": "named"}),
    ]
    first, second = (a["at"] for a in c["actions"])
    assert c["started_at"] <= first <= second <= c["completed_at"]  # the database's clock, in order
    # The same run's history in the logs export: each action's event names its actor.
    events = [json.loads(line) for line in loader.iter_logs_ndjson(job, ref.etl_run_id)]
    said = [(e["event"], e["details"].get("actor")) for e in events if "actor" in e["details"]]
    assert said == [("run_queued", HOSTILE), ("retry_requested", "ops@example.com")]


def test_a_forced_start_and_a_cancel_name_the_run_in_progress_and_the_outcome(tmp_path, target_schema, pg, own_queue):
    """On a queue no worker serves: both runs stay queued until the cancel (the session's workers would plan them)."""
    catalog, job, _ = make_job(tmp_path, target_schema)
    first = loader.start_run(job, catalog=catalog, batch_size=100, actor="ana@example.com")
    forced = loader.start_run(job, catalog=catalog, batch_size=100, force=True, actor="bob@example.com")
    assert loader.cancel_run(job, forced.etl_run_id, actor="carol@example.com") == "canceled"
    assert ledger_actions(pg, job) == [
        (first.etl_run_id, "ana@example.com", "start", {"batch_size": 100}),
        (forced.etl_run_id, "bob@example.com", "forced_start",
         {"batch_size": 100, "run_in_progress": first.etl_run_id, "its_status": "queued"}),
        (forced.etl_run_id, "carol@example.com", "cancel",
         {"outcome": "canceled", "status_before": "queued", "unstarted_batches": 0}),
    ]
    assert loader.run_contract(job, forced.etl_run_id)["started_by"] == "bob@example.com"


def test_an_action_refused_or_rolled_back_records_nothing(tmp_path, target_schema, pg, own_queue):
    catalog, job, _ = make_job(tmp_path, target_schema)
    ref = loader.start_run(job, catalog=catalog, batch_size=100, run_id="once", actor="ana@example.com")
    with pytest.raises(RunConflict):  # the run id is taken: the insert fails, and its action with it
        loader.start_run(job, catalog=catalog, run_id="once", force=True, actor="mallory@example.com")
    with pytest.raises(RunConflict):  # a run in progress: refused before anything is written
        loader.start_run(job, catalog=catalog, actor="mallory@example.com")
    with pytest.raises(RunConflict):  # nothing failed: no retry
        loader.retry_run(job, ref.etl_run_id, actor="mallory@example.com")
    loader.cancel_run(job, ref.etl_run_id, actor="ana@example.com")
    with pytest.raises(RunConflict):  # canceled already
        loader.cancel_run(job, ref.etl_run_id, actor="mallory@example.com")
    assert [a[1:3] for a in ledger_actions(pg, job)] == [("ana@example.com", "start"), ("ana@example.com", "cancel")]


def test_a_cancel_that_came_too_late_is_recorded_with_the_state_the_run_finished_in(tmp_path, target_schema, pg):
    catalog, job, _ = make_job(tmp_path, target_schema, n=100)
    ref = runs_mod.create_run(loader.load_catalog(catalog).get(job), actor="ana@example.com", batch_size=100)
    planning.plan_run(job, ref.etl_run_id)
    # Its one batch ended, and the run is still loading: the moment before its worker would finish it.
    pg.execute(sql.SQL("UPDATE {} SET status = 'succeeded', committed_at = now() WHERE etl_job_id = %s").format(
        sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "batches")), [job])
    outcome = runs_mod.cancel(job, ref.etl_run_id, actor="bob@example.com")
    assert outcome.note and outcome.status == "success"
    assert ledger_actions(pg, job)[-1][1:] == ("bob@example.com", "cancel",
                                              {"outcome": "success", "status_before": "loading"})


@pytest.mark.parametrize("actor", ["", "   ", "a\nb", "x" * 321])
def test_an_empty_overlong_or_multi_line_actor_is_refused_before_anything_is_written(
        tmp_path, target_schema, pg, actor):
    catalog, job, _ = make_job(tmp_path, target_schema)
    with pytest.raises(ConfigError, match="actor"):
        loader.start_run(job, catalog=catalog, actor=actor)
    assert loader.list_runs(job) == [] and ledger_actions(pg, job) == []


def test_the_cli_acts_as_etl_actor_else_the_os_user_and_runs_shows_who_started_each_run(
        tmp_path, target_schema, pg, workers):
    catalog, job, table = make_job(tmp_path, target_schema, poison="poison")
    create_poisoned_target_table(pg, table, "poison")
    env = {k: v for k, v in os.environ.items() if k != "ETL_ACTOR"}
    out = dataloader("--catalog", str(catalog), "start", job, "--run-id", "by-os-user", "--batch-size", "100",
                     "--wait", env=env)
    assert out.returncode == 1 and "partial_success" in out.stdout, out.stderr
    remove_poison(pg, table)
    out = dataloader("retry", job, "by-os-user", "--wait", env={**env, "ETL_ACTOR": "ops@example.com"})
    assert out.returncode == 0, out.stderr
    # Queued where no worker listens, so that it is still in progress when canceled.
    idle = {**env, "ETL_ACTOR": "nightly-cron", "ETL_QUEUE": f"nobody-{job}"}
    out = dataloader("--catalog", str(catalog), "start", job, "--run-id", "by-cron", "--force", env=idle)
    assert out.returncode == 0, out.stderr
    out = dataloader("cancel", job, "by-cron", env={**idle, "ETL_ACTOR": "ops@example.com"})
    assert out.returncode == 0, out.stderr
    assert [a[:3] for a in ledger_actions(pg, job)] == [
        ("by-os-user", getpass.getuser(), "start"), ("by-os-user", "ops@example.com", "retry"),
        ("by-cron", "nightly-cron", "start"), ("by-cron", "ops@example.com", "cancel")]
    lines = dataloader("runs", job, env=env).stdout.splitlines()
    assert "by-cron" in lines[0] and lines[0].endswith("by nightly-cron")
    assert "by-os-user" in lines[1] and lines[1].endswith(f"by {getpass.getuser()}")
    as_json = json.loads(dataloader("runs", job, "--json", env=env).stdout)
    assert [r["started_by"] for r in as_json] == ["nightly-cron", getpass.getuser()]
    assert "\nstarted by:  nightly-cron\n" in dataloader("status", job, "by-cron", env=env).stdout
    status = json.loads(dataloader("status", job, "by-os-user", "--json", env=env).stdout)
    assert status["started_by"] == getpass.getuser()
    assert [(a["actor"], a["action"], a["detail"]) for a in status["actions"]] == [
        (getpass.getuser(), "start", {"batch_size": 100}),
        ("ops@example.com", "retry", {"batches": [1], "asked": "all_failed"})]


def test_the_cli_shows_an_actor_with_unprintable_characters_as_escapes_on_one_line(tmp_path, target_schema):
    catalog, job, _ = make_job(tmp_path, target_schema, n=100)
    # Right-to-left override and a line separator: printable nowhere, refused nowhere (C0 controls are).
    loader.start_run(job, catalog=catalog, run_id="odd", actor="eve\u202e@example.com\u2028x")
    out = dataloader("runs", job, env=dict(os.environ))
    assert out.returncode == 0
    assert "\u202e" not in out.stdout and "\u2028" not in out.stdout
    assert out.stdout.splitlines()[0].endswith("by eve\\u202e@example.com\\u2028x")
