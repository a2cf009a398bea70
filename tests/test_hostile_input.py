"""Hostile sources: each gives a clear error or a counted rejection, never a crash or a partial batch."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from psycopg import sql

import loader

from .helpers import job_name, write_catalog, write_ndjson

pytestmark = pytest.mark.usefixtures("ledger")


def run_job(tmp_path, target_schema, source: str, **extra) -> dict:
    """Run a one-job catalog to its end (needs workers: the session's, or the test's own)."""
    name = job_name("hostile")
    catalog = write_catalog(tmp_path, {name: {"source": source, "target_table": f"{target_schema}.t",
                                              "source_id": "id", **extra}})
    ref = loader.start_run(name, catalog=catalog)
    return loader.wait_for_run(name, ref.etl_run_id, timeout=120)


def test_an_empty_file_is_a_successful_run_with_nothing_to_load(tmp_path, target_schema, workers):
    (tmp_path / "empty.ndjson").write_bytes(b"")
    c = run_job(tmp_path, target_schema, "empty.ndjson")
    assert c["status"] == "success" and c["metrics"]["batches_total"] == 0


def test_a_missing_file_fails_the_run_saying_which(tmp_path, target_schema, workers):
    c = run_job(tmp_path, target_schema, "nope.ndjson")
    assert c["status"] == "failed" and c["error_message"].endswith("nope.ndjson not found")


def test_a_directory_in_place_of_a_file_fails_the_run(tmp_path, target_schema, workers):
    (tmp_path / "dir.ndjson").mkdir()
    c = run_job(tmp_path, target_schema, "dir.ndjson")
    assert c["status"] == "failed" and "is not a file" in c["error_message"]


def test_a_truncated_gzip_fails_the_run_before_loading_anything(tmp_path, target_schema, pg, workers):
    data = gzip.compress(b"\n".join(json.dumps({"id": i}).encode() for i in range(5000)))
    (tmp_path / "cut.ndjson.gz").write_bytes(data[: len(data) // 2])
    c = run_job(tmp_path, target_schema, "cut.ndjson.gz")
    assert c["status"] == "failed" and "is not a complete gzip file" in c["error_message"]
    if pg.execute("SELECT to_regclass(%s)", [f"{target_schema}.t"]).fetchone()[0]:  # planning may create it
        count = pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target_schema, "t"))).fetchone()
        assert count == (0,)


def test_a_json_file_that_is_not_an_array_fails_the_run_clearly(tmp_path, target_schema, workers):
    (tmp_path / "obj.json").write_text('{"id": 1}')
    c = run_job(tmp_path, target_schema, "obj.json")
    assert c["status"] == "failed" and "must hold a JSON array of records at the top level, found an object" in \
        c["error_message"]


def test_binary_garbage_lines_are_counted_as_shape_errors(tmp_path, target_schema, workers):
    garbage = bytes(range(256)).replace(b"\n", b"") * 4
    write_ndjson(tmp_path / "g.ndjson", [{"id": 1}, garbage, {"id": 2}])
    c = run_job(tmp_path, target_schema, "g.ndjson")
    assert c["status"] == "success"
    assert c["validation_summary"]["json_shape_errors"] == 1 and c["metrics"]["rows_inserted"] == 2


def test_byte_order_marks_of_concatenated_files_are_not_records(tmp_path, target_schema, pg, workers):
    # `cat a.ndjson b.ndjson` with a BOM-first b, a BOM-only line, blank lines: 4 records, none rejected.
    bom = b"\xef\xbb\xbf"
    (tmp_path / "cat.ndjson").write_bytes(bom + b'{"id": 1}\n{"id": 2}\n' + bom + b'{"id": 3}\n' + bom + b"\n\n"
                                          + b'  ' + bom + b' {"id": 4}\n')
    c = run_job(tmp_path, target_schema, "cat.ndjson", batch_size=100)
    assert c["status"] == "success"
    m = c["metrics"]
    assert (m["rows_inserted"], m["rows_validated"], m["rows_attempted"], m["validation_failures"]) == (4, 4, 4, 0)
    assert c["validation_summary"]["json_shape_errors"] == 0
    ids = pg.execute(sql.SQL("SELECT array_agg(source_id ORDER BY source_id) FROM {}").format(
        sql.Identifier(target_schema, "t"))).fetchone()[0]
    assert ids == ["1", "2", "3", "4"]


def test_a_50mb_single_line_is_rejected_with_a_truncated_sample(tmp_path, target_schema, workers):
    write_ndjson(tmp_path / "huge.ndjson", [{"id": "ok"}, b'{"id": "huge", "blob": "' + b"x" * 50_000_000])
    c = run_job(tmp_path, target_schema, "huge.ndjson")
    assert c["status"] == "success" and c["validation_summary"]["json_shape_errors"] == 1
    example = c["validation_summary"]["examples"][0]
    assert len(example["sample_value"]) <= 200
    rejects = [json.loads(x) for x in loader.iter_rejects_ndjson(c["etl_job_id"], c["etl_run_id"])]
    assert rejects[0]["record_truncated"] is True and len(rejects[0]["record"]) == 64 * 1024


def test_deep_nesting_and_duplicate_keys_and_huge_numbers(tmp_path, target_schema, pg, workers):
    deep = b'{"id": "deep", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    write_ndjson(tmp_path / "n.ndjson", [deep, b'{"id": "dup", "v": 1, "v": 2}', b'{"id": "num", "v": 1e400}',
                                         b'{"id": "nan", "v": NaN}'])
    c = run_job(tmp_path, target_schema, "n.ndjson")
    assert c["status"] == "success"
    by_line = {e["line_no"]: e for e in c["validation_summary"]["examples"]}
    assert by_line[1]["message"] == "nested deeper than 1024 levels"
    assert "not valid JSON" in by_line[4]["message"]
    got = dict(pg.execute(sql.SQL("SELECT source_id, data->>'v' FROM {}").format(
        sql.Identifier(target_schema, "t"))).fetchall())
    assert got["dup"] == "2"
    assert float(got["num"]) == float("inf") or got["num"].startswith("1")  # numeric keeps 1e400 exactly
    assert set(got) == {"dup", "num"}


def test_errors_and_exports_never_show_the_database_password(tmp_path, target_schema, pg, own_workers,
                                                           monkeypatch, redis_conn):
    """A run with a password in DATABASE_URL (trust auth ignores it) and a failing batch."""
    from urllib.parse import urlsplit, urlunsplit

    from loader import db

    secret = "s3cr3t-Pa55"
    parts = urlsplit(os.environ["DATABASE_URL"])
    user = parts.username or "postgres"
    host = parts.netloc.split("@")[-1]
    monkeypatch.setenv("DATABASE_URL", urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}")))
    monkeypatch.setenv("ETL_QUEUE", f"secret-{job_name()}")
    db.close_all()
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(target_schema)))
    pg.execute(sql.SQL("CREATE TABLE {} (source_id text PRIMARY KEY, data jsonb NOT NULL, etl_job_id text NOT NULL, "
                       "etl_run_id text NOT NULL, loaded_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, "
                       "CHECK (source_id <> 'boom'))").format(sql.Identifier(target_schema, "t")))
    write_ndjson(tmp_path / "s.ndjson", [{"id": "ok"}, {"id": "boom"}, b"{bad"])
    own_workers.start(1)
    c = run_job(tmp_path, target_schema, "s.ndjson")
    assert c["status"] == "failed" and c["batches"][0]["error_code"] == "23514"
    job, run = c["etl_job_id"], c["etl_run_id"]
    everything = json.dumps(c) + "".join(
        b"".join(it(job, run)).decode() for it in (loader.iter_logs_ndjson, loader.iter_metrics_csv,
                                                   loader.iter_rejects_ndjson))
    own_workers.stop()
    everything += "".join(p.read_text(errors="replace") for p in tmp_path.glob("worker-*.log"))
    assert "violates check constraint" in everything and secret not in everything
    assert secret not in db.redact(f"could not connect to {os.environ['DATABASE_URL']} with {secret}")
    db.close_all()
