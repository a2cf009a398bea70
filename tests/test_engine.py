"""The engine end to end: real PostgreSQL, Redis and `dataloader worker` processes."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import loader
from loader import loading, planning
from loader.errors import ConfigError, RunConflict

from .helpers import (
    create_poisoned_target_table,
    create_target_table,
    job_name,
    remove_poison,
    write_catalog,
    write_ndjson,
)

pytestmark = pytest.mark.usefixtures("ledger")


def make_job(tmp_path: Path, target: str, records: list, **extra) -> tuple[Path, str, str]:
    name = job_name()
    table = f"{target}.items"
    write_ndjson(tmp_path / "data" / f"{name}.ndjson", records)
    catalog = write_catalog(tmp_path, {name: {"source": f"data/{name}.ndjson", "target_table": table,
                                              "source_id": "id", **extra}})
    return catalog, name, table


def rows(pg: psycopg.Connection, table: str) -> dict[str, tuple]:
    schema, name = table.split(".")
    cur = pg.execute(sql.SQL("SELECT source_id, data, etl_job_id, etl_run_id FROM {}").format(
        sql.Identifier(schema, name)))
    return {r[0]: r[1:] for r in cur}


def test_two_runs_count_inserts_then_updates_exactly(tmp_path, target_schema, pg, workers):
    records = [{"id": f"r{i}", "n": i} for i in range(2500)]
    catalog, job, table = make_job(tmp_path, target_schema, records)

    first = loader.start_run(job, catalog=catalog, batch_size=1000)
    c1 = loader.wait_for_run(job, first.etl_run_id, timeout=60)
    assert c1["status"] == "success"
    assert (c1["metrics"]["rows_inserted"], c1["metrics"]["rows_updated"]) == (2500, 0)
    assert c1["metrics"]["batches_total"] == 3 and c1["metrics"]["batches_succeeded"] == 3

    second = loader.start_run(job, catalog=catalog, batch_size=1000)
    c2 = loader.wait_for_run(job, second.etl_run_id, timeout=60)
    assert (c2["metrics"]["rows_inserted"], c2["metrics"]["rows_updated"]) == (0, 2500)
    table_rows = rows(pg, table)
    assert len(table_rows) == 2500
    assert {r[1:] for r in table_rows.values()} == {(job, second.etl_run_id)}


def test_contract_has_every_field_of_the_spec(tmp_path, target_schema, workers):
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(150)])
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    for key in ("etl_job_id", "etl_run_id", "batch_size", "status", "started_at", "completed_at", "loaded_at",
                "metrics", "validation_summary", "batches", "logs_url", "metrics_download_url"):
        assert key in c
    for key in ("rows_inserted", "rows_updated", "rows_validated", "batches_total", "batches_succeeded",
                "batches_failed", "retries", "throughput_rps", "batch_duration_ms_avg", "batch_duration_ms_p95"):
        assert key in c["metrics"]
    assert set(c["validation_summary"]) >= {"required_field_errors", "json_shape_errors", "examples"}
    for key in ("index", "status", "attempts", "rows_attempted", "rows_inserted", "rows_updated",
                "validation_failures", "duration_ms", "retries", "committed_at", "error_code", "error_message",
                "logs_fragment"):
        assert key in c["batches"][0]
    assert c["batch_size"] == 100 and [b["rows_attempted"] for b in c["batches"]] == [100, 50]
    assert c["batches"][0]["logs_fragment"][-1]["event"] == "batch_committed"


def test_same_source_id_twice_in_a_batch_keeps_the_later_record(tmp_path, target_schema, pg, workers):
    records = [{"id": "a", "v": 1}, {"id": "b", "v": 1}, {"id": "a", "v": 2}]
    catalog, job, table = make_job(tmp_path, target_schema, records)
    ref = loader.start_run(job, catalog=catalog)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    assert c["status"] == "success"
    assert rows(pg, table)["a"][0]["v"] == 2
    m = c["metrics"]
    assert (m["rows_inserted"], m["rows_updated"], m["rows_validated"], m["rows_superseded"]) == (2, 0, 3, 1)


def test_later_record_wins_across_batches_whatever_order_they_commit(tmp_path, target_schema, pg, ledger):
    # Batch 0 has id "x" v=1; batch 1 has id "x" v=2. Load batch 1 first, then batch 0.
    records = [{"id": "x", "v": 1}] + [{"id": f"f{i}"} for i in range(99)] + [{"id": "x", "v": 2}]
    catalog, job, table = make_job(tmp_path, target_schema, records)
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    ref = runs_mod.create_run(spec, actor="test", batch_size=100)
    assert planning.plan_run(job, ref.etl_run_id) == [0, 1]
    assert loading.load_batch(job, ref.etl_run_id, 1).status == "succeeded"
    assert loading.load_batch(job, ref.etl_run_id, 0).status == "succeeded"
    assert rows(pg, table)["x"][0]["v"] == 2
    c = loader.run_contract(job, ref.etl_run_id)
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 100  # x (from batch 1) + 99 fillers; batch 0's x was superseded
    assert c["batches"][0]["rows_inserted"] == 99


def test_a_session_ended_moments_after_its_connection_was_given_back_costs_its_batch_no_attempt(
        tmp_path, target_schema, pg, ledger, monkeypatch):
    """The batch path borrows a connection given back moments ago without the pool's check (a round trip a
    batch). If the server ended its session meanwhile, the batch's claim meets it before any attempt starts:
    the batch waits for the database as it does for a refused connection, and loads on its first attempt.
    Every other borrower (the API: start, cancel) still gets a checked connection."""
    from psycopg_pool import ConnectionPool

    from loader import db
    from loader import runs as runs_mod

    checks: list[int] = []
    check = ConnectionPool.check_connection
    monkeypatch.setattr(ConnectionPool, "check_connection",
                        staticmethod(lambda conn: (checks.append(conn.info.backend_pid), check(conn))[1]))
    monkeypatch.setattr(db, "FRESH_CONNECTION_SECONDS", 60.0)  # however slow the machine
    monkeypatch.setenv("ETL_DB_POOL_SIZE", "1")
    db.close_all()
    try:
        catalog, job, table = make_job(tmp_path, target_schema, [{"id": f"r{i}"} for i in range(200)])
        ref = runs_mod.create_run(loader.load_catalog(catalog).get(job), actor="test", batch_size=100)
        assert planning.plan_run(job, ref.etl_run_id) == [0, 1]
        assert loading.load_batch(job, ref.etl_run_id, 0).status == "succeeded"
        with db.connection() as conn:
            pid = conn.info.backend_pid  # the pool's one session, given back moments ago
        pg.execute("SELECT pg_terminate_backend(%s)", [pid])
        lent_before = len(checks)
        out = loading.load_batch(job, ref.etl_run_id, 1)
        assert (out.status, out.attempts) == ("succeeded", 1)
        assert pid not in checks[lent_before:]  # lent unchecked: the claim met the ended session
        c = loader.run_contract(job, ref.etl_run_id)
        assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 200
        assert [b["attempts"] for b in c["batches"]] == [1, 1]
        warned = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_run_id = %s AND level <> 'info'").format(
            sql.Identifier(ledger, "events")), [ref.etl_run_id]).fetchone()
        assert warned == (0,)  # met quietly: borrowed again, checked, at once
        with db.connection() as conn:
            pid = conn.info.backend_pid
        with db.connection() as conn:  # a borrower that did not ask: checked however fresh
            assert checks[-1] == pid == conn.info.backend_pid
        monkeypatch.setattr(db, "FRESH_CONNECTION_SECONDS", 0.0)
        with db.connection(skip_fresh_check=True) as conn:
            assert checks[-1] == conn.info.backend_pid  # given back longer ago than that: checked
    finally:
        db.close_all()


def test_a_later_run_wins_over_an_earlier_one_still_loading(tmp_path, target_schema, pg, ledger):
    catalog, job, table = make_job(tmp_path, target_schema, [{"id": "k", "v": "old"}])
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    early = runs_mod.create_run(spec, actor="test")
    write_ndjson(Path(spec.source), [{"id": "k", "v": "new"}])
    late = runs_mod.create_run(spec, actor="test", force=True)
    planning.plan_run(job, late.etl_run_id)
    loading.load_batch(job, late.etl_run_id, 0)
    write_ndjson(Path(spec.source), [{"id": "k", "v": "old"}])
    planning.plan_run(job, early.etl_run_id)
    out = loading.load_batch(job, early.etl_run_id, 0)
    assert out.status == "succeeded" and (out.rows_inserted, out.rows_updated) == (0, 0)
    assert rows(pg, table)["k"] == ({"id": "k", "v": "new"}, job, late.etl_run_id)


def test_each_validation_class_is_counted_and_exampled(tmp_path, target_schema, pg, workers):
    schema_file = tmp_path / "s.json"
    schema_file.write_text('{"type": "object", "properties": {"qty": {"type": "integer", "minimum": 0}}}')
    records = [
        {"id": "ok1", "customer": {"id": 1}, "qty": 1},
        b"{not json",
        b"[1, 2, 3]",
        {"customer": {"id": 2}},  # no source_id
        {"id": "nocust"},  # required path missing
        {"id": "nullcust", "customer": {"id": None}},  # required path null
        {"id": "neg", "customer": {"id": 3}, "qty": -5},  # schema
        b'{"id": "nul", "customer": {"id": 4}, "note": "a\\u0000b"}',
        b'{"id": "bad-utf8", "customer": {"id": 5}, "note": "\xff\xfe"}',
        {"id": "ok2", "customer": {"id": 6}, "qty": 2},
    ]
    catalog, job, table = make_job(tmp_path, target_schema, records, required=["customer.id"],
                                   schema=str(schema_file))
    ref = loader.start_run(job, catalog=catalog)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    v, m = c["validation_summary"], c["metrics"]
    assert c["status"] == "success"
    assert (v["required_field_errors"], v["json_shape_errors"]) == (3, 5)
    assert m["rows_validated"] == 2 and m["validation_failures"] == 8
    assert c["batches"][0]["rows_attempted"] == 10
    assert sorted(rows(pg, table)) == ["ok1", "ok2"]
    by_line = {e["line_no"]: e for e in v["examples"]}
    assert by_line[2]["path"] == "$" and "not valid JSON" in by_line[2]["message"]
    assert "expected a JSON object" in by_line[3]["message"]
    assert by_line[4]["path"] == "$.id"
    assert by_line[5]["path"] == "$.customer.id" and "missing" in by_line[5]["message"]
    assert by_line[6]["message"] == "required field 'customer.id' is null"
    assert by_line[7]["path"] == "$.qty" and by_line[7]["sample_value"] == "-5"
    assert by_line[8]["path"] == "$.note" and "\\u0000" in by_line[8]["message"]
    assert "invalid UTF-8" in by_line[9]["message"]
    rejects = list(loader.iter_rejects_ndjson(job, ref.etl_run_id))
    assert len(rejects) == 8


def test_a_batch_job_executed_twice_changes_nothing(tmp_path, target_schema, pg, ledger):
    catalog, job, table = make_job(tmp_path, target_schema, [{"id": i} for i in range(300)])
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    ref = runs_mod.create_run(spec, actor="test", batch_size=100)
    planning.plan_run(job, ref.etl_run_id)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.load_batch(job, ref.etl_run_id, 0)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["skipped", "succeeded"]
    assert loading.load_batch(job, ref.etl_run_id, 0).status == "skipped"  # after the commit, too
    for i in (1, 2):
        loading.load_batch(job, ref.etl_run_id, i)
    c = loader.run_contract(job, ref.etl_run_id)
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 300 and c["metrics"]["rows_updated"] == 0
    assert len(rows(pg, table)) == 300


def test_duplicate_rq_deliveries_of_batches_do_not_double_count(tmp_path, target_schema, workers):
    from loader.queue import enqueue_batches

    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(500)])
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    enqueue_batches(job, ref.etl_run_id, range(5))
    enqueue_batches(job, ref.etl_run_id, range(5))
    time.sleep(2)
    c = loader.run_contract(job, ref.etl_run_id)
    assert c["metrics"]["rows_inserted"] == 500 and c["metrics"]["rows_updated"] == 0
    assert all(b["attempts"] == 1 for b in c["batches"])


def test_starting_a_second_run_of_a_busy_job_is_refused_unless_forced(tmp_path, target_schema, ledger):
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": 1}])
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    first = runs_mod.create_run(spec, actor="test")
    with pytest.raises(RunConflict, match="already has a run in progress"):
        runs_mod.create_run(spec, actor="test")
    forced = runs_mod.create_run(spec, actor="test", force=True)
    assert forced.etl_run_id != first.etl_run_id


def test_run_ids_must_be_uuids_or_slugs_and_unique_per_job(tmp_path, target_schema, ledger):
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": 1}])
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    with pytest.raises(ConfigError, match="UUID or a slug"):
        runs_mod.create_run(spec, actor="test", run_id="<img src=x onerror=alert(1)>")
    with pytest.raises(ConfigError, match="UUID or a slug"):
        runs_mod.create_run(spec, actor="test", run_id="Has Spaces")
    ref = runs_mod.create_run(spec, actor="test", run_id="nightly-1")
    runs_mod.cancel(job, ref.etl_run_id, actor="test")
    with pytest.raises(RunConflict, match="already used"):
        runs_mod.create_run(spec, actor="test", run_id="nightly-1")
    assert runs_mod.create_run(spec, actor="test", run_id="3F2504E0-4F89-11D3-9A0C-0305E82C3301").etl_run_id == \
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


@pytest.mark.parametrize("size", [99, 10001, 0, -5])
def test_batch_size_outside_100_to_10000_is_a_clear_error(tmp_path, target_schema, ledger, size):
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": 1}])
    with pytest.raises(ConfigError, match="batch size must be from 100 to 10000"):
        loader.start_run(job, catalog=catalog, batch_size=size)


def test_cancel_stops_pending_batches_and_keeps_committed_ones(tmp_path, target_schema, pg, own_workers):
    catalog, job, table = make_job(tmp_path, target_schema, [{"id": i} for i in range(1000)])
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    ref = runs_mod.create_run(spec, actor="test", batch_size=100)
    planning.plan_run(job, ref.etl_run_id)
    loading.load_batch(job, ref.etl_run_id, 0)
    assert loader.cancel_run(job, ref.etl_run_id) == "canceled"
    from loader.queue import enqueue_batches

    enqueue_batches(job, ref.etl_run_id, range(1, 10))
    own_workers.start(1, burst=True)[0].wait(timeout=60)
    c = loader.run_contract(job, ref.etl_run_id)
    assert c["status"] == "canceled"
    # Unstarted batches are recorded as never to run, and say why.
    assert [b["status"] for b in c["batches"]] == ["succeeded"] + ["canceled"] * 9
    assert {b["status_label"] for b in c["batches"][1:]} == {"not started (run canceled)"}
    assert len(rows(pg, table)) == 100
    with pytest.raises(RunConflict, match="only a queued, validating, loading or committing run"):
        loader.cancel_run(job, ref.etl_run_id)


def test_transient_error_is_retried_and_recorded(tmp_path, target_schema, pg, workers):
    """A backend terminated with pg_terminate_backend mid-batch: the batch retries and commits."""
    catalog, job, table = make_job(tmp_path, target_schema, [{"id": i} for i in range(200)])
    schema, name = table.split(".")
    create_target_table(pg, table)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(schema, name)))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        victim = None
        deadline = time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            victim = pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'dataloader' "
                                "AND wait_event_type = 'Lock' AND query LIKE %s AND query LIKE %s LIMIT 1",
                                ["%INSERT INTO%", f'%"{schema}"%']).fetchone()
            time.sleep(0.05)
        assert victim is not None, "no batch blocked on the table lock"
        pg.execute("SELECT pg_terminate_backend(%s)", [victim[0]])
        time.sleep(0.3)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 200 and c["metrics"]["retries"] >= 1
    retried = [b for b in c["batches"] if b["retries"]]
    assert retried
    attempts = pg.execute(sql.SQL("SELECT status, error_code FROM {} WHERE etl_job_id = %s ORDER BY attempt").format(
        sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "attempts")), [job]).fetchall()
    assert ("retrying", "57P01") in attempts


def test_permanent_error_fails_only_its_batch_and_retry_completes_the_run(tmp_path, target_schema, pg, workers):
    records = [{"id": f"r{i}"} for i in range(300)]
    records[150] = {"id": "poison"}
    catalog, job, table = make_job(tmp_path, target_schema, records)
    create_poisoned_target_table(pg, table, "poison")

    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    assert c["status"] == "partial_success"
    assert [b["status"] for b in c["batches"]] == ["succeeded", "failed", "succeeded"]
    failed = c["batches"][1]
    assert failed["error_code"] == "23514" and "poison record" in failed["error_message"]
    assert failed["attempts"] == 1  # not retried: a check violation is not transient
    assert len(rows(pg, table)) == 200  # nothing of the failed batch remains

    with pytest.raises(RunConflict):
        loader.retry_run(job, ref.etl_run_id, [0])
    remove_poison(pg, table)
    assert loader.retry_run(job, ref.etl_run_id) == [1]
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 300 and c["metrics"]["batches_failed"] == 0
    assert c["batches"][1]["attempts"] == 2
    assert len(rows(pg, table)) == 300


def test_missing_source_fails_the_run_with_a_clear_message(tmp_path, target_schema, workers):
    catalog = write_catalog(tmp_path, {"nosrc": {"source": "nowhere/*.ndjson", "target_table": f"{target_schema}.t",
                                                 "source_id": "id"}})
    ref = loader.start_run("nosrc", catalog=catalog, force=True)
    c = loader.wait_for_run("nosrc", ref.etl_run_id, timeout=60)
    assert c["status"] == "failed"
    assert "matches no file" in c["error_message"]
    with pytest.raises(RunConflict, match="start a new run"):
        loader.retry_run("nosrc", ref.etl_run_id)


def test_gzip_and_json_array_sources_load_like_ndjson(tmp_path, target_schema, pg, workers):
    name = job_name()
    write_ndjson(tmp_path / "g" / "a.ndjson.gz", [{"id": f"g{i}", "big": 10**30} for i in range(250)], gz=True)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.json").write_text("[" + ",".join(f'{{"id": "j{i}", "p": 1.5e400}}' if i == 3 else
                                                          f'{{"id": "j{i}", "price": 12.345678901234567891}}'
                                                          for i in range(150)) + "]")
    catalog = write_catalog(tmp_path, {
        f"{name}-gz": {"source": "g/*.ndjson.gz", "target_table": f"{target_schema}.g", "source_id": "id"},
        f"{name}-json": {"source": "j/a.json", "target_table": f"{target_schema}.j", "source_id": "id"},
    })
    for job, count in ((f"{name}-gz", 250), (f"{name}-json", 150)):
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        c = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
        assert c["status"] == "success", c
        assert c["metrics"]["rows_inserted"] == count
    big = pg.execute(sql.SQL("SELECT data->>'big' FROM {} WHERE source_id = 'g7'").format(
        sql.Identifier(target_schema, "g"))).fetchone()
    assert big == ("1000000000000000000000000000000",)
    price = pg.execute(sql.SQL("SELECT data->>'price' FROM {} WHERE source_id = 'j1'").format(
        sql.Identifier(target_schema, "j"))).fetchone()
    assert price == ("12.345678901234567891",)


def test_exports_stream_logs_metrics_and_rejects(tmp_path, target_schema, workers):
    import csv
    import io
    import json

    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(250)] + [b"oops"])
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    logs = [json.loads(line) for line in loader.iter_logs_ndjson(job, ref.etl_run_id)]
    assert {"ts", "level", "event", "job", "run", "batch", "attempt", "details"} <= set(logs[0])
    assert [e["event"] for e in logs].count("batch_committed") == 3
    assert logs[-1]["event"] == "run_completed"
    table = list(csv.DictReader(io.StringIO(b"".join(loader.iter_metrics_csv(job, ref.etl_run_id)).decode())))
    assert [r["row_type"] for r in table] == ["batch"] * 3 + ["run"]
    assert table[-1]["rows_inserted"] == "250" and table[-1]["status"] == "success"
    rejects = [json.loads(x) for x in loader.iter_rejects_ndjson(job, ref.etl_run_id)]
    assert rejects[0]["record"] == "oops" and rejects[0]["line_no"] == 251


def test_planning_delivered_twice_plans_once_and_never_replans_a_loading_run(tmp_path, target_schema, ledger):
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(250)])
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    ref = runs_mod.create_run(spec, actor="test", batch_size=100)
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(planning.plan_run(job, ref.etl_run_id)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [[], [0, 1, 2]]
    assert loading.load_batch(job, ref.etl_run_id, 0).status == "succeeded"
    assert planning.plan_run(job, ref.etl_run_id) == []  # a late redelivery
    c = loader.run_contract(job, ref.etl_run_id)
    assert [b["status"] for b in c["batches"]] == ["succeeded", "pending", "pending"]
    for i in (1, 2):
        loading.load_batch(job, ref.etl_run_id, i)
    assert loader.run_contract(job, ref.etl_run_id)["metrics"]["rows_inserted"] == 250


def planned_run(tmp_path, target_schema, records: list, batch_size: int = 100, **extra) -> tuple[str, str, str, Path]:
    """A run of a new job, planned but not loaded: (job, run, table, source file)."""
    catalog, job, table = make_job(tmp_path, target_schema, records, **extra)
    spec = loader.load_catalog(catalog).get(job)
    from loader import runs as runs_mod

    ref = runs_mod.create_run(spec, actor="test", batch_size=batch_size)
    planning.plan_run(job, ref.etl_run_id)
    return job, ref.etl_run_id, table, Path(spec.source)


def test_a_batch_streamed_in_many_copy_chunks_loads_each_valid_record_once(tmp_path, target_schema, pg, ledger):
    from loader.upsert import STAGE_CHUNK_BYTES

    pad = "x" * 500
    records: list = [{"id": f"r{i}", "pad": pad, "v": i} for i in range(1000)]
    for i in range(0, 1000, 97):
        records[i] = {"pad": pad}  # no source_id: rejected
    records[998] = {"id": "r5", "pad": pad, "v": "last"}  # same id as line 6, later: wins
    assert len(pad) * 1000 > 4 * STAGE_CHUNK_BYTES  # the batch goes to PostgreSQL in several chunks
    job, run, table, _ = planned_run(tmp_path, target_schema, records, batch_size=1000)
    out = loading.load_batch(job, run, 0)
    assert out.status == "succeeded"
    c = loader.run_contract(job, run)
    m = c["metrics"]
    rejected = len(range(0, 1000, 97))
    assert m["validation_failures"] == rejected and m["rows_validated"] == 1000 - rejected
    assert (m["rows_inserted"], m["rows_updated"], m["rows_superseded"]) == (1000 - rejected - 1, 0, 1)
    loaded = rows(pg, table)
    assert len(loaded) == 1000 - rejected - 1
    assert loaded["r5"][0]["v"] == "last" and loaded["r997"][0]["v"] == 997
    rejects = [json.loads(x) for x in loader.iter_rejects_ndjson(job, run)]
    assert sorted(r["line_no"] for r in rejects) == [i + 1 for i in range(0, 1000, 97)]


def test_a_source_changed_after_planning_fails_its_batch_at_once_and_loads_nothing(
        tmp_path, target_schema, pg, ledger):
    job, run, table, source = planned_run(tmp_path, target_schema, [{"id": i} for i in range(200)])
    with open(source, "ab") as f:
        f.write(b'{"id": "late"}\n')
    out = loading.load_batch(job, run, 0)
    assert out.status == "failed" and out.attempts == 1  # a source error is not retried as transient
    b = loader.run_contract(job, run)["batches"][0]
    assert b["status"] == "failed" and "changed after the run was planned" in b["error_message"]
    assert not rows(pg, table)


def test_the_temp_stage_is_made_once_per_connection_and_again_after_a_reconnect(
        tmp_path, target_schema, pg, ledger, monkeypatch):
    """CREATE TEMP TABLE runs once per session, not per batch; a new session (the pool replacing a
    terminated backend) gets its own stage."""
    from loader import db

    job, run, table, _ = planned_run(tmp_path, target_schema, [{"id": i} for i in range(300)])
    monkeypatch.setenv("ETL_DB_POOL_SIZE", "1")  # one pooled connection: every batch uses it
    db.close_all()
    try:
        notices: list[str] = []
        with db.connection() as conn:
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            first_pid = conn.info.backend_pid
        assert loading.load_batch(job, run, 0).status == "succeeded"
        assert loading.load_batch(job, run, 1).status == "succeeded"
        assert not [n for n in notices if "already exists" in n]  # no CREATE ... IF NOT EXISTS again
        pg.execute("SELECT pg_terminate_backend(%s)", [first_pid])
        out = loading.load_batch(job, run, 2)
        assert out.status == "succeeded", out.reason
        with db.connection() as conn:
            assert conn.info.backend_pid != first_pid
        c = loader.run_contract(job, run)
    finally:
        db.close_all()  # the next tests get a pool of the usual size (SQLAlchemy borrows from it too)
    assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 300
    assert len(rows(pg, table)) == 300


def test_a_temp_stage_made_in_a_rolled_back_transaction_is_made_again(pg):
    from loader import upsert

    with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
        with pytest.raises(ZeroDivisionError), conn.transaction():
            upsert.ensure_stage(conn)
            raise ZeroDivisionError  # the CREATE is rolled back with the rest
        with conn.transaction():
            with upsert.staging(conn) as stage:
                stage.add(1, "a", b'{"id": "a"}')
            assert conn.execute("SELECT count(*) FROM pg_temp.etl_stage").fetchone() == (1,)
        upsert.ensure_stage(conn)  # outside a transaction: committed, and remembered
        with conn.transaction():
            with upsert.staging(conn) as stage:
                stage.add(2, "b", b'{"id": "b"}')
            assert conn.execute("SELECT count(*) FROM pg_temp.etl_stage").fetchone() == (1,)


def test_wait_for_run_reports_progress_up_to_the_final_state(tmp_path, target_schema, workers):
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(500)])
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    seen: list[tuple[int, str]] = []
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=60,
                            on_progress=lambda p: seen.append((p["version"], p["status"])))
    assert c["status"] == "success" and len(c["batches"]) == 5
    assert seen and seen[-1][1] == "success"
    versions = [v for v, _ in seen]
    assert versions == sorted(set(versions))  # each contract handed over is a newer one
    with pytest.raises(loader.RunNotFound):
        loader.wait_for_run(job, "no-such-run", timeout=5)


def test_escapes_whitespace_and_non_ascii_load_byte_for_byte(tmp_path, target_schema, pg, ledger):
    """The stage is fed in COPY's binary format: backslashes, tabs, carriage returns and multi-byte
    characters in source ids and values reach jsonb unchanged."""
    records = [
        b'{"id": "t\\tab\\\\back", "s": "q\\"uote\\" \\\\ \\n \\r \\t \\u00e9",'
        b' "u": "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}',
        b'{"id":\t"tabbed",\r"v": 1}',
        '{"id": "ключ-€", "v": "значение"}'.encode(),
        b'{"id": 12345678901234567890, "n": 1e-7}',
    ]
    job, run, table, _ = planned_run(tmp_path, target_schema, records)
    out = loading.load_batch(job, run, 0)
    assert (out.status, out.rows_inserted, out.validation_failures) == ("succeeded", 4, 0)
    loaded = rows(pg, table)
    assert set(loaded) == {"t\tab\\back", "tabbed", "ключ-€", "12345678901234567890"}
    assert loaded["t\tab\\back"][0] == {"id": "t\tab\\back", "s": 'q"uote" \\ \n \r \t é', "u": "é€😀"}
    assert loaded["tabbed"][0] == {"id": "tabbed", "v": 1}
    assert loaded["ключ-€"][0]["v"] == "значение"


def test_change_signature_sees_a_commit_that_lands_after_a_higher_change_number(tmp_path, target_schema, ledger):
    # Two workers: one takes change number N and commits late, after another took N+1 and committed.
    # The newest number (ledger_version) stays N+1; the console's cached view must still notice.
    job, run, _, _ = planned_run(tmp_path, target_schema, [{"id": f"r{i}"} for i in range(300)])
    from loader import db

    update = sql.SQL("UPDATE {} SET rows_validated = rows_validated + 1, change_seq = {} "
                     "WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s").format(
        db.ledger_table("batches"), db.next_change())
    assert loader.change_signature(job, run) == loader.change_signature(job, run)  # nothing moved: equal
    with db.connection() as slow, db.connection() as fast:
        with slow.transaction():
            slow.execute(update, [job, run, 0])  # takes N, not committed yet
            with fast.transaction():
                fast.execute(update, [job, run, 1])  # takes N+1 and commits first
            version, signature = loader.ledger_version(job, run), loader.change_signature(job, run)
        # N is committed now
    assert loader.ledger_version(job, run) == version  # the maximum alone misses it
    assert loader.change_signature(job, run) != signature
    with pytest.raises(loader.RunNotFound):
        loader.change_signature(job, "no-such-run")


def test_a_run_of_small_batches_goes_to_rq_about_1000_records_a_job_and_each_batch_is_its_own_attempt(
        tmp_path, target_schema, pg, own_queue, own_workers, redis_conn):
    """Batch size 250: the planner queues 4 consecutive batches a job (the last job holds what is left), and the
    worker loads each as it loads a batch alone: one attempt, one commit row and one event per batch."""
    from rq import Queue

    from jobs.tasks import plan_run_task
    from loader import runs as runs_mod
    from loader.queue import batch_job_id, group_size

    catalog, job, table = make_job(tmp_path, target_schema, [{"id": i} for i in range(2400)])
    ref = runs_mod.create_run(loader.load_catalog(catalog).get(job), actor="test", batch_size=250)
    run = ref.etl_run_id
    assert plan_run_task(job, run) == 10
    queue = Queue(own_queue, connection=redis_conn)
    assert group_size(250) == 4
    assert queue.job_ids == [batch_job_id(job, run, first, 0, 4) for first in (0, 4, 8)]
    assert [queue.fetch_job(i).args[2] for i in queue.job_ids] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    own_workers.start(1, burst=True)[0].wait(timeout=60)
    c = loader.run_contract(job, run)
    assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 2400
    assert [(b["index"], b["status"], b["attempts"]) for b in c["batches"]] == [(i, "succeeded", 1) for i in range(10)]
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    committed = pg.execute(sql.SQL(
        "SELECT count(DISTINCT batch_index), count(*) FROM {} WHERE etl_job_id = %s AND event = 'batch_committed'"
    ).format(sql.Identifier(schema, "events")), [job]).fetchone()
    attempts = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status = 'succeeded'").format(
        sql.Identifier(schema, "attempts")), [job]).fetchone()
    assert committed == (10, 10) and attempts == (10,)
    assert len(rows(pg, table)) == 2400


def _wait_in_thread(job: str, run: str) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.append(loader.wait_for_run(job, run, timeout=60)), daemon=True)
    thread.start()
    return thread, got


def test_waiting_for_a_run_hears_its_end_instead_of_polling_its_status(tmp_path, target_schema, ledger, monkeypatch):
    """``wait_for_run`` (``dataloader start --wait``) listens for the run's end (ledger 0007's trigger): with the
    status read only every ten minutes meanwhile, it still returns as soon as the run ends, and a cancel
    is heard the same way; another run's end does not wake it for good."""
    from loader import api
    from loader import runs as runs_mod

    monkeypatch.setattr(api, "LISTENING_POLL", 600.0)
    reads: list[str] = []
    status = api.run_status
    monkeypatch.setattr(api, "run_status", lambda job, run: (reads.append(run), status(job, run))[1])
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(200)])
    spec = loader.load_catalog(catalog).get(job)
    ref = runs_mod.create_run(spec, actor="test", batch_size=100)
    run = ref.etl_run_id
    thread, got = _wait_in_thread(job, run)
    deadline = time.monotonic() + 10
    while run not in reads:  # it has listened, then read the status once
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other = runs_mod.create_run(spec, actor="test", batch_size=100, force=True)
    loader.cancel_run(job, other.etl_run_id)  # another run's end: heard, not this one's
    assert planning.plan_run(job, run) == [0, 1]
    assert loading.load_batch(job, run, 0).status == "succeeded"
    assert loading.load_batch(job, run, 1).status == "succeeded"  # the run ends here
    thread.join(20)
    assert not thread.is_alive() and got[0]["status"] == "success"
    assert reads.count(run) <= 3  # no polling: read at the start and when told (a cancel of another run)

    canceled = runs_mod.create_run(spec, actor="test", batch_size=100)
    thread, got = _wait_in_thread(job, canceled.etl_run_id)
    time.sleep(0.3)
    loader.cancel_run(job, canceled.etl_run_id)
    thread.join(20)
    assert not thread.is_alive() and got[0]["status"] == "canceled"


def test_waiting_for_a_run_without_a_listening_connection_polls_its_status(tmp_path, target_schema, ledger,
                                                                           monkeypatch):
    from loader import api, db
    from loader import runs as runs_mod
    from loader.errors import TransientDbError

    def refuse(*args, **kwargs):
        raise TransientDbError("the database refused a new connection")

    monkeypatch.setattr(db, "dedicated_connection", refuse)
    monkeypatch.setattr(api, "LISTENING_POLL", 600.0)
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": 1}])
    ref = runs_mod.create_run(loader.load_catalog(catalog).get(job), actor="test")
    thread, got = _wait_in_thread(ref.etl_job_id, ref.etl_run_id)
    assert planning.plan_run(job, ref.etl_run_id) == [0]
    assert loading.load_batch(job, ref.etl_run_id, 0).status == "succeeded"
    thread.join(20)
    assert not thread.is_alive() and got[0]["status"] == "success"


def test_planning_writes_batch_rows_a_chunk_at_a_time_and_plans_every_batch_once(tmp_path, target_schema, ledger,
                                                                                 monkeypatch):
    """The planner holds at most PLAN_COPY_ROWS batch rows (a 10M-record source kept all 10,000 to its end)."""
    from loader import runs as runs_mod

    monkeypatch.setattr(planning, "PLAN_COPY_ROWS", 3)
    catalog, job, _ = make_job(tmp_path, target_schema, [{"id": i} for i in range(1000)])
    ref = runs_mod.create_run(loader.load_catalog(catalog).get(job), actor="test", batch_size=100)
    assert planning.plan_run(job, ref.etl_run_id) == list(range(10))
    assert {loading.load_batch(job, ref.etl_run_id, i).status for i in range(10)} == {"succeeded"}
    c = loader.run_contract(job, ref.etl_run_id)
    assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 1000
    assert [(b["index"], b["rows_attempted"]) for b in c["batches"]] == [(i, 100) for i in range(10)]
