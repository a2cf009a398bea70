"""Following a run from code: follow_run's events, resuming after an event id, a late commit, the progress bar."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import psycopg
import pytest
from psycopg import sql

import loader
from loader.follow import RunFollower

from .helpers import job_name, write_catalog, write_ndjson

pytestmark = pytest.mark.usefixtures("ledger")


def _job(tmp_path, target_schema, rows: int = 1050) -> tuple[str, str]:
    name = job_name("follow")
    write_ndjson(tmp_path / "d.ndjson", [{"id": f"f{i}"} for i in range(rows)])
    catalog = write_catalog(tmp_path, {name: {"source": "d.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id"}})
    return str(catalog), name


def _batches(schema_table: str) -> sql.Composed:
    return sql.SQL("{}").format(sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], schema_table))


def test_follow_run_sends_the_run_then_every_change_and_ends_at_the_final_status(tmp_path, target_schema, workers):
    """From event id 0 every batch comes as an event; the last event is the run's final state, equal to its contract."""
    catalog, name = _job(tmp_path, target_schema)
    ref = loader.start_run(name, catalog=catalog, batch_size=100)
    events = list(loader.follow_run(name, ref.etl_run_id, after=0, interval=0.2, timeout=120))
    runs = [e for e in events if e.event == "run"]
    assert runs and runs[-1] is events[-1] and events[-1].final
    final = loader.run_contract(name, ref.etl_run_id)
    assert runs[-1].data["status"] == "success" == final["status"]
    assert runs[-1].data["metrics"]["rows_inserted"] == 1050 and "batches" not in runs[-1].data
    last_state = {e.data["index"]: e.data for e in events if e.event == "batch"}
    assert sorted(last_state) == list(range(11))
    assert all(b["status"] == "succeeded" and "logs_fragment" not in b for b in last_state.values())
    assert [b["rows_inserted"] for b in final["batches"]] == [last_state[i]["rows_inserted"] for i in range(11)]
    ids = [e.id for e in runs]
    assert ids == sorted(ids)


def test_a_follower_resumed_after_an_event_id_gets_every_batch_changed_since(tmp_path, target_schema, workers):
    catalog, name = _job(tmp_path, target_schema)
    ref = loader.start_run(name, catalog=catalog, batch_size=100)
    loader.wait_for_run(name, ref.etl_run_id, timeout=120)
    everything = [e for e in RunFollower(name, ref.etl_run_id, after=0).poll() if e.event == "batch"]
    assert len(everything) == 11
    cut = everything[4].id
    resumed = RunFollower(name, ref.etl_run_id, after=cut).poll()
    assert {e.data["index"] for e in everything if e.id > cut} <= {e.data["index"] for e in resumed
                                                                   if e.event == "batch"}
    assert resumed[-1].event == "run" and resumed[-1].final
    # A new follower starts from the present: the run alone; then nothing until something changes.
    fresh = RunFollower(name, ref.etl_run_id)
    assert [e.event for e in fresh.poll()] == ["run"]
    assert fresh.poll() == []


def test_a_batch_that_commits_after_a_higher_numbered_one_is_still_sent(tmp_path, target_schema, workers, pg):
    """Two changes take numbers n and n+1; n+1 commits first and is read; when n commits, it is sent too."""
    catalog, name = _job(tmp_path, target_schema, rows=300)
    ref = loader.start_run(name, catalog=catalog, batch_size=100)
    run = ref.etl_run_id
    loader.wait_for_run(name, run, timeout=120)
    follower = RunFollower(name, run)
    follower.poll()
    touch = sql.SQL("UPDATE {} SET rows_superseded = rows_superseded + 0, change_seq = nextval({}) "
                    "WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s").format(
        _batches("batches"), sql.Literal(f"{os.environ['ETL_LEDGER_SCHEMA']}.ledger_change_seq"))
    with psycopg.connect(os.environ["DATABASE_URL"]) as early:
        early.execute(touch, [name, run, 0])  # takes number n, does not commit yet
        pg.execute(touch, [name, run, 1])  # n + 1, committed (autocommit)
        assert [e.data["index"] for e in follower.poll() if e.event == "batch"] == [1]
        early.commit()
    assert [e.data["index"] for e in follower.poll() if e.event == "batch"] == [0]


def test_follow_run_of_an_unknown_run_says_so(ledger):
    with pytest.raises(loader.RunNotFound):
        next(loader.follow_run("no-such-job", "no-such-run"))


def test_wait_for_run_with_progress_draws_a_bar_that_ends_full(tmp_path, target_schema, workers, capsys):
    catalog, name = _job(tmp_path, target_schema)
    ref = loader.start_run(name, catalog=catalog, batch_size=100)
    c = loader.wait_for_run(name, ref.etl_run_id, timeout=120, progress=True)
    assert c["status"] == "success"
    err = capsys.readouterr().err
    assert f"{name}/{ref.etl_run_id[:8]}…" in err and "11/11" in err and "100%" in err and "success, 0 failed" in err


def test_start_wait_on_a_terminal_shows_a_progress_bar_and_plain_lines_otherwise(tmp_path, target_schema, workers):
    catalog, name = _job(tmp_path, target_schema)
    command = [sys.executable, "-m", "loader.cli", "--catalog", catalog, "start", name, "--batch-size", "100",
               "--wait"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, stdin=follower, stdout=subprocess.PIPE, stderr=follower, env=os.environ.copy())
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=120)
    os.close(leader)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "11/11" in text and "100%" in text and "\r" in text  # a bar redrawn in place
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert plain.returncode == 0
    assert "100%" not in plain.stderr and "\r" not in plain.stderr and "11/11 batches" in plain.stderr
