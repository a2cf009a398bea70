"""Faults an operator meets: nothing lost, nothing doubled, and the run reaches a final state."""

from __future__ import annotations

import os
import signal
import time
import uuid

import psycopg
import pytest
from psycopg import sql

import loader

from .helpers import job_name, write_catalog, write_ndjson

pytestmark = [pytest.mark.usefixtures("ledger"), pytest.mark.slow]

@pytest.fixture
def own_queue(monkeypatch, redis_conn):
    """A queue of this test's own, so only the workers this test starts (and kills) serve it."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ETL_QUEUE", name)
    yield name
    for key in redis_conn.scan_iter(f"rq:*{name}*"):
        redis_conn.delete(key)


def make_table(pg, schema: str, name: str) -> None:
    pg.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    pg.execute(sql.SQL("CREATE TABLE {} (source_id text PRIMARY KEY, data jsonb NOT NULL, etl_job_id text NOT NULL, "
                       "etl_run_id text NOT NULL, loaded_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, "
                       "etl_run_seq bigint NOT NULL DEFAULT 0, etl_source_pos bigint NOT NULL DEFAULT 0)").format(
                           sql.Identifier(schema, name)))


def setup_job(tmp_path, target_schema, n: int) -> tuple[str, str]:
    name = job_name("fault")
    write_ndjson(tmp_path / "d" / "a.ndjson", [{"id": f"k{i}", "v": i} for i in range(n)])
    catalog = write_catalog(tmp_path, {name: {"source": "d/a.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id"}})
    return str(catalog), name


def check_table(pg, target_schema: str, job: str, run: str, n: int) -> None:
    rows = pg.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE etl_run_id = %s AND etl_job_id = %s), "
                              "count(*) FILTER (WHERE (data->>'v')::int = substr(source_id, 2)::int) FROM {}").format(
                                  sql.Identifier(target_schema, "t")), [run, job]).fetchone()
    assert rows == (n, n, n)


def wait_blocked(pg, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'dataloader' "
                         "AND wait_event_type = 'Lock' AND query LIKE %s LIMIT 1", ["%INSERT INTO%"]).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError("no batch blocked on the table lock")


def test_a_worker_killed_mid_batch_is_noticed_and_its_batch_finished_by_another(
        tmp_path, target_schema, pg, own_workers, own_queue):
    catalog, job = setup_job(tmp_path, target_schema, 5000)
    make_table(pg, target_schema, "t")
    [victim] = own_workers.start(1)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(target_schema, "t")))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        wait_blocked(pg)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
    own_workers.start(1)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=90)
    assert time.monotonic() - killed_at < 60
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 5000 and c["metrics"]["batches_succeeded"] == 50
    check_table(pg, target_schema, job, ref.etl_run_id, 5000)
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    abandoned = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status = 'abandoned'").format(
        sql.Identifier(schema, "attempts")), [job]).fetchone()
    assert abandoned == (1,)


def test_redis_flushed_during_a_run_is_recovered_from_the_ledger(
        tmp_path, target_schema, pg, own_workers, own_queue, redis_conn):
    catalog, job = setup_job(tmp_path, target_schema, 6000)
    make_table(pg, target_schema, "t")
    own_workers.start(2)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(target_schema, "t")))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        wait_blocked(pg)
        for key in redis_conn.scan_iter(f"rq:*{own_queue}*"):
            redis_conn.delete(key)
        for key in redis_conn.scan_iter("rq:job:dl-*"):
            redis_conn.delete(key)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=120)
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 6000 and c["metrics"]["batches_succeeded"] == 60
    check_table(pg, target_schema, job, ref.etl_run_id, 6000)


def test_backends_terminated_again_and_again_are_retried_and_recorded(
        tmp_path, target_schema, pg, own_workers, own_queue):
    catalog, job = setup_job(tmp_path, target_schema, 10000)
    make_table(pg, target_schema, "t")
    own_workers.start(2)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    killed = 0
    deadline = time.monotonic() + 60
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    running = sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s").format(sql.Identifier(schema, "runs"))
    while killed < 5 and time.monotonic() < deadline and pg.execute(running, [job]).fetchone()[0] in (
            "queued", "validating", "loading"):
        got = pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dataloader' "
                         "AND state = 'active' AND query LIKE %s", ["%FROM pg_temp.etl_stage%"]).fetchall()
        killed += len(got)
        time.sleep(0.02)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=120)
    assert killed >= 1
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 10000
    check_table(pg, target_schema, job, ref.etl_run_id, 10000)
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    retried = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status = 'retrying' "
                                 "AND error_code = '57P01'").format(sql.Identifier(schema, "attempts")),
                         [job]).fetchone()
    assert retried[0] >= 1
    assert c["metrics"]["retries"] >= retried[0]


def test_postgresql_restarted_during_a_run_is_survived(tmp_path, target_schema, own_workers, own_queue, monkeypatch):
    """The test's own embedded PostgreSQL is stopped and started again while batches load."""
    from loader import db, initdb
    from loader.services import ensure_services, stop_services

    monkeypatch.delenv("DATABASE_URL")
    data_dir = tmp_path / "pg"
    url = ensure_services(data_dir).database_url
    monkeypatch.setenv("DATABASE_URL", url)
    try:
        initdb()
        catalog, job = setup_job(tmp_path, target_schema, 8000)
        own_workers.start(2)
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        deadline = time.monotonic() + 60
        while loader.run_contract(job, ref.etl_run_id, include_batches=False)["metrics"]["batches_succeeded"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop_services(data_dir)
        time.sleep(2)
        monkeypatch.delenv("DATABASE_URL")  # else ensure_services() takes the URL and starts nothing
        assert ensure_services(data_dir).database_url == url
        monkeypatch.setenv("DATABASE_URL", url)
        c = loader.wait_for_run(job, ref.etl_run_id, timeout=180)
        assert c["status"] == "success", [b["error_message"] for b in c["batches"] if b["error_message"]][:3]
        assert c["metrics"]["rows_inserted"] == 8000 and c["metrics"]["batches_succeeded"] == 80
        with psycopg.connect(url, autocommit=True) as pg:
            check_table(pg, target_schema, job, ref.etl_run_id, 8000)
    finally:
        own_workers.stop()
        db.close_all()
        stop_services(data_dir)
