"""Workers on another host: a network namespace of their own, an empty working directory, no catalog, and only
the services' URLs and the object store's credentials. Skipped, saying why, where namespaces are not allowed."""

from __future__ import annotations

import os
import signal
import sys
import time
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

import loader

from .helpers import create_target_table, job_name, write_catalog
from .netns import RemoteHost, unavailable
from .stores import S3_KEY_ID, S3_SECRET, s3_client, s3_server
from .test_faults import check_table, wait_blocked

pytestmark = [pytest.mark.usefixtures("ledger"), pytest.mark.slow]

RECORDS = 3000


@pytest.fixture
def remote_host():
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"workers on another host need a network namespace: {reason}")
    host = RemoteHost()
    yield host
    host.close()


def test_remote_workers_load_an_s3_source_and_one_killed_mid_batch_is_replaced_with_exact_counts(
        tmp_path, target_schema, pg, own_queue, remote_host, monkeypatch):
    # The object store listens on the host's veth address: the planner (here) and the workers (there) use it.
    with s3_server(host=remote_host.host_ip) as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket="remote-workers")
        for part in range(3):  # three objects, a glob over them
            body = b"".join(b'{"id": "k%05d", "v": %d}\n' % (i, i) for i in range(part * 1000, part * 1000 + 1000))
            client.put_object(Bucket="remote-workers", Key=f"exp/part-{part}.ndjson", Body=body)
        aws = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": endpoint,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
        for k, v in aws.items():
            monkeypatch.setenv(k, v)
        remote_env = {"PATH": os.environ["PATH"], "DATABASE_URL": remote_host.expose(os.environ["DATABASE_URL"]),
                      "REDIS_URL": remote_host.expose(os.environ["REDIS_URL"]), "ETL_QUEUE": own_queue,
                      "ETL_LEDGER_SCHEMA": os.environ["ETL_LEDGER_SCHEMA"], **aws}
        # Their own host: loopback there is not this host's.
        assert not remote_host.reaches("127.0.0.1", urlsplit(os.environ["DATABASE_URL"]).port or 5432)
        empty = tmp_path / "remote-cwd"
        empty.mkdir()
        worker = [sys.executable, "-m", "loader.cli", "worker"]

        name = job_name("remote")
        catalog = write_catalog(tmp_path, {name: {"source": "s3://remote-workers/exp/*.ndjson",
                                                  "target_table": f"{target_schema}.t", "source_id": "id"}})
        create_target_table(pg, f"{target_schema}.t")
        victim = remote_host.start(worker, remote_env, empty, tmp_path / "remote-0.log")
        with psycopg.connect(pg.info.dsn) as blocker:
            blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(target_schema, "t")))
            # Planning is queued too: the remote worker plans (reads the objects), then blocks on its first batch.
            ref = loader.start_run(name, catalog=catalog, batch_size=100)
            wait_blocked(pg, target_schema, timeout=60)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            killed_at = time.monotonic()
        for i in (1, 2):
            remote_host.start(worker, remote_env, empty, tmp_path / f"remote-{i}.log")
        c = loader.wait_for_run(name, ref.etl_run_id, timeout=150)
    assert time.monotonic() - killed_at < 90
    assert c["status"] == "success", c
    m = c["metrics"]
    assert (m["rows_inserted"], m["batches_succeeded"], m["validation_failures"]) == (RECORDS, 30, 0)
    assert {b["source_file"] for b in c["batches"]} == {f"s3://remote-workers/exp/part-{p}.ndjson" for p in range(3)}
    check_table(pg, target_schema, name, ref.etl_run_id, RECORDS)
    abandoned = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND status = 'abandoned'").format(
        sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "attempts")), [name]).fetchone()
    assert abandoned == (1,)
    assert list(empty.iterdir()) == []
