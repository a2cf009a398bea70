"""The run contract's figures against the ledger they are computed from (no workers: batches load in-process)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import loader
from loader import loading, planning
from loader import runs as runs_mod

from .helpers import create_poisoned_target_table, job_name, remove_poison, write_catalog, write_ndjson

pytestmark = pytest.mark.usefixtures("ledger")


def attempt_union_ms(pg: psycopg.Connection, ledger: str, job: str, run: str) -> float:
    """The union of the run's closed attempt intervals, in ms, computed here from the raw rows."""
    rows = pg.execute(sql.SQL("SELECT started_at, ended_at FROM {} WHERE etl_job_id = %s AND etl_run_id = %s "
                              "ORDER BY started_at").format(sql.Identifier(ledger, "attempts")), (job, run)).fetchall()
    total, lo, hi = 0.0, None, None
    for start, end in rows:
        assert end is not None
        if hi is None or start > hi:
            if hi is not None:
                total += (hi - lo).total_seconds()
            lo, hi = start, end
        else:
            hi = max(hi, end)
    if hi is not None:
        total += (hi - lo).total_seconds()
    return total * 1000


def test_elapsed_and_throughput_count_loading_time_not_the_idle_time_before_a_retry(
        tmp_path: Path, target_schema: str, pg: psycopg.Connection, ledger: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETL_QUEUE", f"idle-{uuid.uuid4().hex[:8]}")  # retry_run enqueues; nobody takes it
    job, table = job_name(), f"{target_schema}.items"
    records = [{"id": f"r{i}"} for i in range(400)]
    records[150] = {"id": "poison"}
    write_ndjson(tmp_path / "data" / f"{job}.ndjson", records)
    catalog = write_catalog(tmp_path, {job: {"source": f"data/{job}.ndjson", "target_table": table,
                                             "source_id": "id"}})
    create_poisoned_target_table(pg, table, "poison")
    ref = runs_mod.create_run(loader.load_catalog(catalog).get(job), actor="test", batch_size=100)
    run = ref.etl_run_id
    assert planning.plan_run(job, run) == [0, 1, 2, 3]
    # Two batches at once, so the attempts' intervals may overlap: overlapping time counts once.
    threads = [threading.Thread(target=loading.load_batch, args=(job, run, i)) for i in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loading.load_batch(job, run, 1).status == "failed"
    assert loading.load_batch(job, run, 3).status == "succeeded"
    first = loader.run_contract(job, run)["metrics"]
    assert first["loading_ms"] == pytest.approx(attempt_union_ms(pg, ledger, job, run), abs=1)
    # loading_ms is a whole number of ms: at a few tens of ms its rounding alone moves the rate by 1-2 %.
    assert first["throughput_rps"] == pytest.approx(300 * 1000 / first["loading_ms"],
                                                    rel=0.01 + 1 / first["loading_ms"])

    time.sleep(3)  # the operator looks into it, then retries: idle time, not loading time
    remove_poison(pg, table)
    assert loader.retry_run(job, run) == [1]
    assert loading.load_batch(job, run, 1).status == "succeeded"
    c = loader.run_contract(job, run)
    m = c["metrics"]
    assert c["status"] == "success"
    union = attempt_union_ms(pg, ledger, job, run)
    assert m["loading_ms"] == pytest.approx(union, abs=1)
    assert m["loading_ms"] < first["loading_ms"] + 2000  # one more batch's attempt, not the 3 s gap
    wall = (datetime.fromisoformat(c["completed_at"]) - datetime.fromisoformat(c["started_at"])).total_seconds()
    assert m["elapsed_ms"] == pytest.approx(wall * 1000, abs=1) and m["elapsed_ms"] > m["loading_ms"] + 2500
    assert m["throughput_rps"] == pytest.approx(400 * 1000 / m["loading_ms"], rel=0.01 + 1 / m["loading_ms"])


def test_runs_of_hidden_jobs_are_left_out_before_the_limit_so_they_take_no_place_in_the_list(tmp_path, target_schema):
    write_ndjson(tmp_path / "d.ndjson", [{"id": 1}])
    shown, hidden = job_name("shown"), job_name("hidden")
    catalog = write_catalog(tmp_path, {name: {"source": "d.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id"} for name in (shown, hidden)})
    spec = loader.load_catalog(catalog)
    older = runs_mod.create_run(spec.get(shown), actor="test")
    for _ in range(3):  # newer than the shown job's run
        runs_mod.create_run(spec.get(hidden), actor="test", force=True)
    listed = [r["etl_run_id"] for r in loader.list_runs(limit=1, hidden_jobs=[hidden])]
    assert listed == [older.etl_run_id]
    assert hidden not in {r["etl_job_id"] for r in loader.list_runs(limit=50, hidden_jobs=[hidden])}
    assert [r["etl_job_id"] for r in loader.list_runs(hidden, limit=5)] == [hidden] * 3
