"""Load: many runs at once, concurrent runs of one job, and a run of 10,000+ batches."""

from __future__ import annotations

import time

import pytest
from psycopg import sql

import loader

from .helpers import job_name, write_catalog, write_ndjson

pytestmark = [pytest.mark.usefixtures("ledger"), pytest.mark.slow]


def test_ten_runs_of_different_jobs_at_once_with_four_workers(tmp_path, target_schema, pg, own_workers,
                                                              monkeypatch, redis_conn):
    monkeypatch.setenv("ETL_QUEUE", f"load-{job_name()}")
    jobs = {}
    for i in range(10):
        name = job_name(f"many{i}")
        write_ndjson(tmp_path / name / "a.ndjson", [{"id": f"{i}-{k}", "v": k} for k in range(1500)])
        jobs[name] = {"source": f"{name}/a.ndjson", "target_table": f"{target_schema}.t{i}", "source_id": "id"}
    catalog = write_catalog(tmp_path, jobs)
    own_workers.start(4)
    refs = [loader.start_run(name, catalog=catalog, batch_size=100) for name in jobs]
    for ref in refs:
        c = loader.wait_for_run(ref.etl_job_id, ref.etl_run_id, timeout=180)
        assert c["status"] == "success", (c["error_message"], [b["error_message"] for b in c["batches"]][:3])
        assert c["metrics"]["rows_inserted"] == 1500 and c["metrics"]["batches_succeeded"] == 15
    for i in range(10):
        assert pg.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(target_schema, f"t{i}"))).fetchone() == (1500,)


def test_two_forced_runs_of_one_job_end_with_the_later_runs_last_records(tmp_path, target_schema, pg, workers):
    name = job_name("twice")
    # Each id appears three times, in three different batches; the last occurrence has the largest v.
    write_ndjson(tmp_path / "a.ndjson", [{"id": f"k{i % 1000}", "v": i} for i in range(3000)])
    catalog = write_catalog(tmp_path, {name: {"source": "a.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id"}})
    first = loader.start_run(name, catalog=catalog, batch_size=100)
    second = loader.start_run(name, catalog=catalog, batch_size=100, force=True)
    for ref in (first, second):
        assert loader.wait_for_run(name, ref.etl_run_id, timeout=180)["status"] == "success"
    rows = pg.execute(sql.SQL("SELECT source_id, (data->>'v')::int, etl_run_id FROM {}").format(
        sql.Identifier(target_schema, "t"))).fetchall()
    assert len(rows) == 1000
    assert all(v == 2000 + int(sid[1:]) for sid, v, _ in rows)
    assert {run for _, _, run in rows} == {second.etl_run_id}


def test_a_run_of_ten_thousand_batches_completes_with_exact_counts(tmp_path, target_schema, workers):
    name = job_name("tenk")
    path = tmp_path / "a.ndjson"
    with open(path, "w") as f:
        for i in range(1_000_050):
            f.write(f'{{"id":{i}}}\n')
    catalog = write_catalog(tmp_path, {name: {"source": "a.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id"}})
    ref = loader.start_run(name, catalog=catalog, batch_size=100)
    c = loader.wait_for_run(name, ref.etl_run_id, timeout=900, poll=2)
    assert c["status"] == "success"
    m = c["metrics"]
    assert m["batches_total"] == 10_001 and m["batches_succeeded"] == 10_001
    assert m["rows_inserted"] == 1_000_050 and len(c["batches"]) == 10_001
    started = time.perf_counter()
    loader.run_contract(name, ref.etl_run_id)
    elapsed = time.perf_counter() - started
    print(f"\ncontract of 10,001 batches built in {elapsed * 1000:.0f} ms")
