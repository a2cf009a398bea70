"""Sources in object storage and over HTTP, against real servers on loopback: moto's S3 server and HTTP file
servers with and without ``Range`` support. Workers are real processes that read the objects themselves."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

import loader
from loader import loading, planning, runs
from loader.queue import enqueue_batches

from .helpers import job_name, write_catalog
from .stores import S3_KEY_ID, S3_SECRET, Faults, http_server, s3_client, s3_env, s3_server

pytestmark = pytest.mark.usefixtures("ledger")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    """A fresh bucket on the S3 server and the standard AWS variables pointing at it: (boto3 client, bucket)."""
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = s3_client(s3_endpoint)
    bucket = job_name("bkt").lower()
    client.create_bucket(Bucket=bucket)
    yield client, bucket


def ndjson(records: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def plan(tmp_path: Path, table: dict[str, Any], *, batch_size: int = 100) -> tuple[str, str]:
    """A run of a job with ``table`` as its catalog entry, planned here and its batches queued: (job, run)."""
    name = job_name("obj")
    catalog = write_catalog(tmp_path, {name: table})
    ref = runs.create_run(loader.load_catalog(catalog).get(name), actor="test", batch_size=batch_size)
    enqueue_batches(name, ref.etl_run_id, planning.plan_run(name, ref.etl_run_id))
    return name, ref.etl_run_id


def loaded(pg, table: str) -> dict[str, Any]:
    schema, name = table.split(".")
    return dict(pg.execute(sql.SQL("SELECT source_id, data->'v' FROM {}").format(
        sql.Identifier(schema, name))).fetchall())


def ledger_text(pg, job: str, run: str) -> str:
    """Everything the ledger holds about a run, as text: the spec, batches, attempts, events and rejects."""
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    out = []
    for t in ("runs", "batches", "attempts", "events", "rejects"):
        rows = pg.execute(sql.SQL("SELECT t::text FROM {} t WHERE etl_job_id = %s AND etl_run_id = %s").format(
            sql.Identifier(schema, t)), [job, run]).fetchall()
        out += [r[0] for r in rows]
    return "\n".join(out)


def test_a_glob_of_s3_objects_loads_in_key_order_gzip_and_json_arrays_included_and_the_later_object_wins(
        tmp_path, s3, target_schema, pg, own_queue, own_workers):
    client, bucket = s3
    # Put in the reverse of key order: the key, not the upload time, decides which record wins.
    client.put_object(Bucket=bucket, Key="exp/c.json", Body=json.dumps(
        [{"id": "k1", "v": "from c"}, {"id": "k4", "v": "c4"}]).encode())
    client.put_object(Bucket=bucket, Key="exp/b.ndjson.gz", Body=gzip.compress(ndjson(
        [{"id": "k1", "v": "from b"}, b'{"id": "k9", "v": ', {"id": "k3", "v": "b3"}])))
    client.put_object(Bucket=bucket, Key="exp/a.ndjson", Body=ndjson(
        [{"id": f"k{i}", "v": f"a{i}"} for i in range(1, 4)]))
    client.put_object(Bucket=bucket, Key="other/z.ndjson", Body=ndjson([{"id": "k1", "v": "not matched"}]))
    table = f"{target_schema}.t"
    job, run = plan(tmp_path, {"source": f"s3://{bucket}/exp/*.ndjson*", "target_table": table,
                               "source_id": "id"}, batch_size=100)
    own_workers.start(1)
    c = loader.wait_for_run(job, run, timeout=120)
    assert c["status"] == "success", c
    files = [b["source_file"] for b in c["batches"]]
    assert files == [f"s3://{bucket}/exp/a.ndjson", f"s3://{bucket}/exp/b.ndjson.gz"]
    job2, run2 = plan(tmp_path, {"source": f"s3://{bucket}/exp/*", "target_table": table, "source_id": "id"})
    c2 = loader.wait_for_run(job2, run2, timeout=120)
    assert [b["source_file"] for b in c2["batches"]] == [
        f"s3://{bucket}/exp/a.ndjson", f"s3://{bucket}/exp/b.ndjson.gz", f"s3://{bucket}/exp/c.json"]
    assert [(b["first_line"], b["line_count"]) for b in c2["batches"]] == [(1, 3), (1, 3), (1, 2)]
    assert loaded(pg, table) == {"k1": "from c", "k2": "a2", "k3": "b3", "k4": "c4"}
    # The malformed record is named by its object and line.
    [reject] = c2["validation_summary"]["examples"]
    assert (reject["source_file"], reject["line_no"]) == (f"s3://{bucket}/exp/b.ndjson.gz", 2)
    assert c2["metrics"]["validation_failures"] == 1


def test_a_worker_with_an_empty_working_directory_and_no_catalog_loads_an_s3_source_with_var_storage_options(
        tmp_path, s3, s3_endpoint, target_schema, pg, own_queue, own_workers, monkeypatch):
    """The worker gets only DATABASE_URL, REDIS_URL, the queue settings and the store's credentials (here as the
    variables the job's storage_options name): the catalog and the schema file are gone, its directory is empty."""
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="in/data.ndjson", Body=ndjson(
        [{"id": f"k{i:03d}", "v": i} for i in range(250)] + [{"id": "bad", "v": "not a number"}]))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("OBJ_KEY", S3_KEY_ID)
    monkeypatch.setenv("OBJ_SECRET", S3_SECRET)
    monkeypatch.setenv("OBJ_ENDPOINT", s3_endpoint)
    cat = tmp_path / "cat"
    cat.mkdir()
    (cat / "schema.json").write_text(json.dumps({"type": "object", "properties": {"v": {"type": "integer"}}}))
    table = f"{target_schema}.t"
    job, run = plan(cat, {"source": f"s3://{bucket}/in/data.ndjson", "target_table": table, "source_id": "id",
                          "schema": "schema.json",
                          "storage_options": {"key": "${OBJ_KEY}", "secret": "${OBJ_SECRET}",
                                              "endpoint_url": "${OBJ_ENDPOINT}"}})
    shutil.rmtree(cat)
    empty = tmp_path / "remote-host"
    empty.mkdir()
    env = {k: os.environ[k] for k in ("DATABASE_URL", "REDIS_URL", "ETL_QUEUE", "ETL_LEDGER_SCHEMA", "PATH",
                                      "OBJ_KEY", "OBJ_SECRET", "OBJ_ENDPOINT", "AWS_DEFAULT_REGION",
                                      "AWS_EC2_METADATA_DISABLED", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")}
    own_workers.start(1, cwd=empty, env=env)
    c = loader.wait_for_run(job, run, timeout=120)
    assert c["status"] == "success", c
    assert [(b["source_file"], b["first_line"], b["line_count"]) for b in c["batches"]] == [
        (f"s3://{bucket}/in/data.ndjson", 1, 100), (f"s3://{bucket}/in/data.ndjson", 101, 100),
        (f"s3://{bucket}/in/data.ndjson", 201, 51)]
    rows = loaded(pg, table)
    assert len(rows) == 250 and rows["k249"] == 249 and "bad" not in rows
    assert list(empty.iterdir()) == []
    text = ledger_text(pg, job, run)
    assert "${OBJ_SECRET}" in text and S3_SECRET not in text and S3_KEY_ID not in text


def test_an_s3_object_rewritten_after_planning_fails_its_batches_as_changed_and_the_other_object_loads(
        tmp_path, s3, target_schema, pg, own_queue):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="d/a.ndjson", Body=ndjson([{"id": f"a{i:03d}", "v": "x"} for i in range(150)]))
    client.put_object(Bucket=bucket, Key="d/b.ndjson", Body=ndjson([{"id": f"b{i:03d}", "v": "x"} for i in range(50)]))
    table = f"{target_schema}.t"
    job, run = plan(tmp_path, {"source": f"s3://{bucket}/d/*.ndjson", "target_table": table, "source_id": "id"})
    # Same size, one record changed: the ETag differs, and so would the checksum of batch 1.
    client.put_object(Bucket=bucket, Key="d/a.ndjson", Body=ndjson(
        [{"id": f"a{i:03d}", "v": "y" if i == 120 else "x"} for i in range(150)]))
    assert [loading.load_batch(job, run, i).status for i in range(3)] == ["failed", "failed", "succeeded"]
    c = loader.run_contract(job, run)
    assert c["status"] == "partial_success"
    for b in c["batches"][:2]:
        assert b["error_code"] == "source_changed" and b["attempts"] == 1
        assert b["error_message"].startswith(f"source object s3://{bucket}/d/a.ndjson changed after the run was "
                                             "planned (ETag=")
    assert sorted(loaded(pg, table)) == [f"b{i:03d}" for i in range(50)]


def test_missing_credentials_a_wrong_bucket_and_a_glob_that_matches_nothing_fail_planning_clearly_without_secrets(
        tmp_path, s3, target_schema, pg, own_queue, monkeypatch):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="x/a.ndjson", Body=ndjson([{"id": "k", "v": 1}]))
    table = f"{target_schema}.t"

    def failed(source: str, **more: Any) -> str:
        job, run = plan(tmp_path, {"source": source, "target_table": table, "source_id": "id", **more})
        c = loader.run_contract(job, run)
        assert c["status"] == "failed" and c["error_code"] == "source", c
        text = ledger_text(pg, job, run)
        assert S3_SECRET not in text and "sekret-value-123" not in text
        return str(c["error_message"])

    assert failed(f"s3://{bucket}/x/*.jsonl") == f"source s3://{bucket}/x/*.jsonl matches no object"
    missing = failed("s3://no-such-bucket-here/x/a.ndjson")
    assert missing.startswith("source object s3://no-such-bucket-here/x/a.ndjson not found")
    monkeypatch.setenv("OTHER_SECRET", "sekret-value-123")
    wrong = failed("s3://no-such-bucket-here/x/a.ndjson",
                   storage_options={"key": "${AWS_ACCESS_KEY_ID}", "secret": "${OTHER_SECRET}"})
    assert wrong.startswith("source object s3://no-such-bucket-here/x/a.ndjson not found")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    assert failed(f"s3://{bucket}/x/a.ndjson") == (
        f"no credentials to read s3://{bucket}/x/a.ndjson: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
        "AWS_PROFILE, or an instance role), or give storage_options in the catalog")
    unset = failed(f"s3://{bucket}/x/a.ndjson", storage_options={"secret": "${NOT_SET_ANYWHERE}"})
    assert unset == ("storage_options.secret names the environment variable NOT_SET_ANYWHERE, which is not set "
                     "on this host")


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_an_http_source_loads_by_byte_range_when_the_server_honours_range_and_from_kept_bytes_when_not(
        tmp_path, target_schema, pg, own_queue, own_workers, ranges):
    www = tmp_path / "www"
    www.mkdir()
    (www / "export.ndjson").write_bytes(ndjson([{"id": f"k{i:03d}", "v": i} for i in range(230)]))
    table = f"{target_schema}.t"
    with http_server(www, ranges=ranges) as base:
        job, run = plan(tmp_path, {"source": f"{base}/export.ndjson", "target_table": table, "source_id": "id"})
        kept = pg.execute(sql.SQL("SELECT bool_and(has_payload), bool_or(has_payload) FROM {} WHERE etl_run_id = %s"
                                  ).format(sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "batches")),
                          [run]).fetchone()
        assert kept == ((False, False) if ranges else (True, True))
        own_workers.start(1)
        c = loader.wait_for_run(job, run, timeout=120)
    assert c["status"] == "success", c
    assert {b["source_file"] for b in c["batches"]} == {f"{base}/export.ndjson"}
    assert [(b["first_line"], b["line_count"]) for b in c["batches"]] == [(1, 100), (101, 100), (201, 30)]
    rows = loaded(pg, table)
    assert len(rows) == 230 and rows["k229"] == 229


def test_an_http_server_that_compresses_on_the_wire_serves_the_bytes_planned_and_the_run_loads(
        tmp_path, target_schema, pg, own_queue):
    """A server sends ``Content-Encoding: gzip`` to clients that accept it, and counts ranges in that encoding:
    the loader asks for the identity encoding, so the planner's offsets and the workers' ranges are the same
    bytes, and batches are re-read by range."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "export.ndjson").write_bytes(ndjson([{"id": f"k{i:03d}", "v": i} for i in range(230)]))
    table = f"{target_schema}.t"
    with http_server(www, ranges=True, compress=True) as base:
        job, run = plan(tmp_path, {"source": f"{base}/export.ndjson", "target_table": table, "source_id": "id"})
        kept = pg.execute(sql.SQL("SELECT bool_or(has_payload) FROM {} WHERE etl_run_id = %s").format(
            sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "batches")), [run]).fetchone()[0]
        assert kept is False  # re-read by range, not kept in the ledger as for a server without Range
        assert [loading.load_batch(job, run, i).status for i in range(3)] == ["succeeded"] * 3
    rows = loaded(pg, table)
    assert len(rows) == 230 and rows["k229"] == 229


def test_an_http_object_rewritten_after_planning_fails_its_batch_as_changed(tmp_path, target_schema, pg, own_queue):
    www = tmp_path / "www"
    www.mkdir()
    source = www / "export.ndjson"
    source.write_bytes(ndjson([{"id": f"k{i:03d}", "v": "x"} for i in range(100)]))
    with http_server(www, ranges=True) as base:
        job, run = plan(tmp_path, {"source": f"{base}/export.ndjson", "target_table": f"{target_schema}.t",
                                   "source_id": "id"})
        source.write_bytes(source.read_bytes().replace(b'"k050", "v": "x"', b'"k050", "v": "y"'))
        out = loading.load_batch(job, run, 0)
    assert out.status == "failed"
    [b] = loader.run_contract(job, run)["batches"]
    assert b["error_code"] == "source_changed"
    assert b["error_message"].startswith(f"source object {base}/export.ndjson changed after the run was planned")


@pytest.mark.parametrize(("fault", "times"), [("unavailable", 1), ("resets", 2)])  # aiohttp retries one reset
def test_a_store_that_fails_a_read_for_a_moment_costs_an_attempt_and_the_batch_loads_on_the_next(
        tmp_path, target_schema, pg, own_queue, fault, times):
    """A 503 or a dropped connection (after the store client's own retries) is a transient source error: the
    attempt is recorded as such and the batch is retried with backoff, as for a transient database error; one
    that goes on past max_attempts fails the batch for good, naming the object."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "export.ndjson").write_bytes(ndjson([{"id": f"k{i:03d}", "v": i} for i in range(150)]))
    table = f"{target_schema}.t"
    faults = Faults()
    with http_server(www, ranges=True, faults=faults) as base:
        job, run = plan(tmp_path, {"source": f"{base}/export.ndjson", "target_table": table, "source_id": "id",
                                   "max_attempts": 3})
        setattr(faults, fault, times)
        first = loading.load_batch(job, run, 0)
        setattr(faults, fault, 1_000)
        second = loading.load_batch(job, run, 1)
    assert faults.refused >= 4
    assert (first.status, first.attempts) == ("succeeded", 2)
    assert second.status == "failed"
    c = loader.run_contract(job, run)
    b0, b1 = c["batches"]
    assert (b0["status"], b0["attempts"]) == ("succeeded", 2)
    assert (b1["status"], b1["attempts"], b1["error_code"]) == ("failed", 3, "source_transient")
    assert b1["error_message"].startswith(f"source object {base}/export.ndjson could not be read just now"), b1
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    codes = pg.execute(sql.SQL("SELECT batch_index, attempt, status, error_code FROM {} WHERE etl_run_id = %s "
                               "ORDER BY 1, 2").format(sql.Identifier(schema, "attempts")), [run]).fetchall()
    assert codes[:2] == [(0, 1, "retrying", "source_transient"), (0, 2, "succeeded", None)], codes
    assert [c[3] for c in codes[2:]] == ["source_transient"] * 3, codes
    assert sorted(loaded(pg, table)) == [f"k{i:03d}" for i in range(100)]


def test_a_store_that_fails_for_a_moment_while_a_run_is_planned_costs_a_retry_not_the_run(
        tmp_path, target_schema, pg, own_queue):
    www = tmp_path / "www"
    www.mkdir()
    (www / "export.ndjson").write_bytes(ndjson([{"id": f"k{i:03d}", "v": i} for i in range(150)]))
    faults = Faults()
    faults.unavailable = 1
    with http_server(www, ranges=True, faults=faults) as base:
        job, run = plan(tmp_path, {"source": f"{base}/export.ndjson", "target_table": f"{target_schema}.t",
                                   "source_id": "id"})
    assert faults.refused == 1
    c = loader.run_contract(job, run)
    assert c["status"] == "loading" and c["metrics"]["batches_total"] == 2, c
    schema = os.environ["ETL_LEDGER_SCHEMA"]
    events = [e for (e,) in pg.execute(sql.SQL("SELECT event FROM {} WHERE etl_run_id = %s ORDER BY ts").format(
        sql.Identifier(schema, "events")), [run]).fetchall()]
    assert events.count("plan_started") == 2 and events[-1] == "plan_completed", events  # planned again


def test_an_s3_object_replaced_while_a_batch_is_being_read_fails_as_changed_through_the_stores_if_match(s3):
    """Each ranged GET carries the planned ETag as If-Match: an object replaced after planning, even after the
    batch's object was opened, is refused by the store, never read half old, half new."""
    from loader import storage
    from loader.errors import SourceChanged

    client, bucket = s3
    client.put_object(Bucket=bucket, Key="r/a.ndjson", Body=ndjson([{"id": "k", "v": "old"}]))
    [obj] = storage.resolve(f"s3://{bucket}/r/a.ndjson", None)
    f = storage.open_range(obj, 0, obj.size, 7, None)
    client.put_object(Bucket=bucket, Key="r/a.ndjson", Body=ndjson([{"id": "k", "v": "new"}]))
    with pytest.raises(SourceChanged, match=f"^source object s3://{bucket}/r/a.ndjson changed after the run was "
                                            r"planned \(ETag="):
        f.readline()


def test_a_batch_of_an_s3_object_is_read_in_one_ranged_get_of_its_bytes_without_a_head(s3, caplog):
    """A worker re-reads a batch with one request: the ranged GET (If-Match on the planned ETag), no HEAD first
    and nothing fetched beyond the batch's range (fsspec's read-ahead would fetch a block more)."""
    import logging

    from loader import storage

    client, bucket = s3
    body = ndjson([{"id": f"k{i}", "pad": "x" * 100} for i in range(2000)])
    client.put_object(Bucket=bucket, Key="g/a.ndjson", Body=body)
    [obj] = storage.resolve(f"s3://{bucket}/g/a.ndjson", None)
    start = body.index(b"\n", 50_000) + 1
    end = body.index(b"\n", 150_000) + 1
    caplog.set_level(logging.INFO, logger="werkzeug")
    caplog.clear()
    got = b""
    with storage.open_range(obj, start, end, 3, None) as f:  # line by line, as a worker reads its batch
        while len(got) < end - start:
            got += f.readline()
    assert got == body[start:end]
    requests = [r.getMessage() for r in caplog.records if f"/{bucket}/g/a.ndjson" in r.getMessage()]
    assert len(requests) == 1 and "GET " in requests[0] and " 206 " in requests[0], requests


@pytest.mark.parametrize(("table", "message"), [
    ({"source": "s3://b/x.ndjson", "storage_options": {"secret": "plain-text-secret"}},
     "storage_options.secret is a secret: write it as \"${VAR}\""),
    ({"source": "s3://b/x.ndjson", "storage_options": {"client_kwargs": {"aws_secret_access_key": "s3cr3t"}}},
     "storage_options.client_kwargs.aws_secret_access_key is a secret"),
    ({"source": "https://user:pa55word@example.org/x.ndjson"}, "source must not carry credentials"),
    ({"source": "https://example.org/x.ndjson?X-Amz-Signature=abc&X-Amz-Credential=def"},
     "source must not carry a signature or token in its query (X-Amz-Credential)"),
    ({"source": "https://example.org/x.ndjson", "storage_options": {"headers": {"Authorization": "Bearer t0k"}}},
     "storage_options.headers.Authorization is a secret"),
    ({"source": "s3://b/x.ndjson", "storage_options": {"password": 12345678}}, "storage_options.password is a secret"),
    ({"source": "s3://b/x.ndjson", "storage_options": {"secret": ["s3cr3t"]}}, "storage_options.secret is a secret"),
    ({"source": "s3://b/x.ndjson", "storage_options": {"endpoint_url": "https://u:pw@minio:9000"}},
     "storage_options.endpoint_url holds a URL with a password"),
    ({"source": "https://example.org/x.ndjson?api_key=s3cr3t"},
     "source must not carry a signature or token in its query (api_key)"),
], ids=["literal-secret", "nested-literal-secret", "password-in-url", "presigned-url", "header", "number", "list",
        "url-in-option", "api-key-query"])
def test_the_catalog_refuses_a_secret_written_in_it(tmp_path, table, message):
    name = job_name("sec")
    catalog = loader.load_catalog(write_catalog(tmp_path, {name: {"target_table": "s.t", "source_id": "id", **table}}))
    assert message in str(catalog.errors[name])


def test_the_catalog_keeps_a_url_source_as_written_and_var_references_unexpanded(tmp_path):
    name = job_name("url")
    spec = loader.load_catalog(write_catalog(tmp_path, {name: {
        "source": "s3://exports/2026/*.ndjson.gz", "target_table": "s.t", "source_id": "id",
        "storage_options": {"key": "${K}", "secret": "${S}", "client_kwargs": {"region_name": "eu-west-1"}}}}
    )).get(name)
    assert spec.source == "s3://exports/2026/*.ndjson.gz"
    assert spec.to_dict()["storage_options"] == {"key": "${K}", "secret": "${S}",
                                                 "client_kwargs": {"region_name": "eu-west-1"}}
    local = loader.load_catalog(write_catalog(tmp_path, {name: {
        "source": f"file://{tmp_path}/a.ndjson", "target_table": "s.t", "source_id": "id"}})).get(name)
    assert local.source == f"{tmp_path}/a.ndjson"


def test_store_credentials_and_values_expanded_from_var_references_are_masked_in_errors_and_logs(monkeypatch):
    from loader import db, storage

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-in-env-0042")
    monkeypatch.setenv("MY_STORE_TOKEN", "token-from-a-var-0043")
    monkeypatch.setenv("MY_SAS", "sv=2026&sig=a/b+c\"d")
    monkeypatch.setenv("MY_ENDPOINT", "http://minio.internal:9000")
    options = storage.expand_options({"client_kwargs": {"token": "${MY_STORE_TOKEN}"}, "anon": False,
                                      "sas_token": "${MY_SAS}", "endpoint_url": "${MY_ENDPOINT}"})
    assert options == {"client_kwargs": {"token": "token-from-a-var-0043"}, "anon": False,
                       "sas_token": "sv=2026&sig=a/b+c\"d", "endpoint_url": "http://minio.internal:9000"}
    text = db.redact("failed with aws-secret-in-env-0042 and token-from-a-var-0043 at "
                     "https://h/x.ndjson?X-Amz-Signature=abcdef&part=1 and https://u:pw1234@h/x")
    assert text == "failed with *** and *** at https://h/x.ndjson?X-Amz-Signature=***&part=1 and https://u:***@h/x"
    # The SAS as JSON and as a URL would carry it is masked too; the endpoint (not a secret) stays readable.
    assert db.redact('{"sas": "sv=2026&sig=a/b+c\\"d"} ?q=sv%3D2026%26sig%3Da%2Fb%2Bc%22d at '
                     "http://minio.internal:9000") == '{"sas": "***"} ?q=*** at http://minio.internal:9000'


def test_an_object_in_a_versioned_bucket_loads_its_batches_by_range(tmp_path, s3, target_schema, pg, own_queue):
    """The planner lists (no version id there), a worker asks for the object itself (a version id there too):
    both name the same content by its ETag."""
    client, bucket = s3
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=bucket, Key="v/a.ndjson", Body=ndjson([{"id": f"k{i:03d}", "v": i} for i in range(150)]))
    table = f"{target_schema}.t"
    job, run = plan(tmp_path, {"source": f"s3://{bucket}/v/*.ndjson", "target_table": table, "source_id": "id"})
    assert [loading.load_batch(job, run, i).status for i in range(2)] == ["succeeded", "succeeded"]
    assert len(loaded(pg, table)) == 150


def test_reading_gzip_objects_closes_their_streams_and_a_long_lived_process_keeps_few_file_systems(s3, monkeypatch):
    """Planning a .gz object closes the store's stream with the decompressor (GzipFile alone leaves it open, and
    its connection); file systems made for many option sets are kept up to CACHED_FILESYSTEMS."""
    from loader import sources, storage

    client, bucket = s3
    client.put_object(Bucket=bucket, Key="z/a.ndjson.gz", Body=gzip.compress(ndjson([{"id": "k", "v": 1}])))
    [obj] = storage.resolve(f"s3://{bucket}/z/a.ndjson.gz", None)
    f = sources._open(obj, None)
    assert f.read() == ndjson([{"id": "k", "v": 1}])
    f.close()
    assert f._stream.closed
    for i in range(storage.CACHED_FILESYSTEMS + 5):
        monkeypatch.setenv("AWS_DEFAULT_REGION", f"us-test-{i}")  # a new key each time, as another job's options
        storage.resolve(f"s3://{bucket}/z/a.ndjson.gz", None)
    assert len(storage._cache) == storage.CACHED_FILESYSTEMS


def test_a_source_naming_an_object_version_loads_that_version_even_after_its_latest_was_read_here(
        tmp_path, s3, target_schema, pg, own_queue):
    """``s3://bucket/key?versionId=...`` loads that version and keeps the URL as written: the file system made
    for the plain key earlier in this process (not version aware) is not reused for it."""
    from loader import storage

    client, bucket = s3
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = client.put_object(Bucket=bucket, Key="h/a.ndjson", Body=ndjson([{"id": f"k{i:03d}", "v": "old"}
                                                                          for i in range(120)]))["VersionId"]
    client.put_object(Bucket=bucket, Key="h/a.ndjson", Body=ndjson([{"id": "k000", "v": "new"}]))
    [latest] = storage.resolve(f"s3://{bucket}/h/a.ndjson", None)
    source = f"s3://{bucket}/h/a.ndjson?versionId={old}"
    table = f"{target_schema}.t"
    job, run = plan(tmp_path, {"source": source, "target_table": table, "source_id": "id"})
    assert [loading.load_batch(job, run, i).status for i in range(2)] == ["succeeded", "succeeded"]
    rows = loaded(pg, table)
    assert len(rows) == 120 and set(rows.values()) == {"old"} and latest.size < 100
    assert {b["source_file"] for b in loader.run_contract(job, run)["batches"]} == {source}


def test_an_azure_glob_keeps_the_account_named_in_its_host_in_each_objects_url():
    """adlfs lists ``container/path`` and drops the account of ``container@account.dfs.core.windows.net``; each
    object's URL gets it back, so a worker reads the same account's object (no Azure emulator here: the URL
    building is checked on its own)."""
    from loader.storage import object_url

    pattern = "abfs://exports@acct1.dfs.core.windows.net/2026/*.ndjson"
    assert object_url(pattern, "abfs://exports/2026/a.ndjson") == "abfs://exports@acct1.dfs.core.windows.net/2026/a.ndjson"
    assert object_url("abfs://exports/2026/*.ndjson", "abfs://exports/2026/a.ndjson") == "abfs://exports/2026/a.ndjson"
    assert object_url("s3://b/2026/*.ndjson", "s3://b/2026/a.ndjson") == "s3://b/2026/a.ndjson"


def test_a_job_timeout_inside_an_object_read_stays_a_timeout_and_a_changed_array_object_stays_changed():
    """The queue's timeout raised while a store is read is retried as a timeout, not failed for good as a source
    error; an object that changes while a JSON array is read is source_changed, not "not valid JSON"."""
    from loader import storage
    from loader.errors import JobTimeout, SourceChanged

    class TimedOut(JobTimeout):
        pass

    assert isinstance(storage.store_error("s3://b/k", TimedOut("job timed out")), TimedOut)
    assert isinstance(storage.store_error("s3://b/k", SourceChanged("changed")), SourceChanged)
    assert type(storage.store_error("s3://b/k", OSError("reset"))).__name__ == "SourceError"
