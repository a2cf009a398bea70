"""Sources changed after planning: the batch's checksum fails it, whatever the size and mtime say."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from psycopg import sql

import loader
from loader import loading, planning, runs, validation
from loader.queue import enqueue_batches

from .helpers import job_name, write_catalog, write_ndjson

pytestmark = pytest.mark.usefixtures("ledger")

#: A file system whose mtimes never change (some FUSE and network mounts, archives unpacked with fixed times).
FIXED_MTIME_NS = 315_532_800 * 10**9  # 1980-01-01, FAT's epoch




def planned_run(tmp_path: Path, target_schema: str, n: int, *, batch_size: int = 100, gz: bool = False,
                mtime_ns: int | None = None, edit: dict[int, bytes] | None = None) -> tuple[str, str, Path]:
    """A run planned and its batches queued, as its planning job does, before any worker runs: (job, run, source).

    Record i is ``{"id": "k0000i", "v": "a0000i"}`` (one can be rewritten with the same length), or the raw
    line ``edit[i]``.
    """
    name = job_name("changed")
    suffix = ".ndjson.gz" if gz else ".ndjson"
    records: list[object] = [{"id": f"k{i:05d}", "v": f"a{i:05d}"} for i in range(n)]
    for i, line in (edit or {}).items():
        records[i] = line
    source = write_ndjson(tmp_path / "d" / f"a{suffix}", records, gz=gz)
    if mtime_ns is not None:
        os.utime(source, ns=(mtime_ns, mtime_ns))
    catalog = write_catalog(tmp_path, {name: {"source": f"d/a{suffix}", "target_table": f"{target_schema}.t",
                                              "source_id": "id"}})
    ref = runs.create_run(loader.load_catalog(catalog).get(name), actor="test", batch_size=batch_size)
    indexes = planning.plan_run(name, ref.etl_run_id)
    enqueue_batches(name, ref.etl_run_id, indexes)
    return name, ref.etl_run_id, source


def rewrite_keeping_size_and_mtime(source: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) in the file and put its mtime back to the nanosecond."""
    before = source.stat()
    data = source.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    source.write_bytes(data.replace(old, new))
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = source.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def loaded(pg, target_schema: str) -> dict[str, str]:
    return dict(pg.execute(sql.SQL("SELECT source_id, data->>'v' FROM {}").format(
        sql.Identifier(target_schema, "t"))).fetchall())


def assert_failed_as_changed(batch: dict, source: Path) -> None:
    message = batch["error_message"]
    assert batch["status"] == "failed" and batch["error_code"] == "source_changed", batch
    assert batch["attempts"] == 1  # not retried: every attempt would read the same changed file
    assert f"source file {source} changed after the run was planned: batch {batch['index']} " in message
    assert "has checksum sha256:" in message and message.endswith("start a new run to load its current content")


def test_a_record_rewritten_with_the_same_length_and_its_mtime_put_back_fails_its_batch_and_loads_nothing_of_it(
        tmp_path, target_schema, pg, own_queue, own_workers):
    job, run, source = planned_run(tmp_path, target_schema, 300)
    rewrite_keeping_size_and_mtime(source, b'"v": "a00150"', b'"v": "b00150"')  # line 151: batch 1
    own_workers.start(1)
    c = loader.wait_for_run(job, run, timeout=120)
    assert c["status"] == "partial_success"
    batches = {b["index"]: b for b in c["batches"]}
    assert (batches[0]["status"], batches[2]["status"]) == ("succeeded", "succeeded")
    assert_failed_as_changed(batches[1], source)
    rows = loaded(pg, target_schema)
    assert sorted(rows) == [f"k{i:05d}" for i in (*range(100), *range(200, 300))]
    assert all(v.startswith("a") for v in rows.values())


def test_on_a_file_system_with_fixed_mtimes_a_rewritten_last_batch_fails_and_the_others_load(
        tmp_path, target_schema, pg, own_queue, own_workers):
    job, run, source = planned_run(tmp_path, target_schema, 250, mtime_ns=FIXED_MTIME_NS)
    rewrite_keeping_size_and_mtime(source, b'{"id": "k00249", "v": "a00249"}', b'{"id": "k00249", "v": "zzzzzz"}')
    assert source.stat().st_mtime_ns == FIXED_MTIME_NS
    own_workers.start(1)
    c = loader.wait_for_run(job, run, timeout=120)
    assert c["status"] == "partial_success"
    batches = {b["index"]: b for b in c["batches"]}
    assert (batches[0]["status"], batches[1]["status"]) == ("succeeded", "succeeded")
    assert_failed_as_changed(batches[2], source)
    rows = loaded(pg, target_schema)
    assert len(rows) == 200 and "zzzzzz" not in rows.values()


def test_a_source_rewritten_before_its_batch_is_read_again_after_a_refusal_fails_as_changed(
        tmp_path, target_schema, pg, own_queue, monkeypatch):
    """A record PostgreSQL refuses makes the worker read the batch again, to stage it in halves: that second
    read checks the checksum too. The file changes between the two reads: the batch fails as changed, and is
    not loaded from the new content without the refused record."""
    monkeypatch.setattr(validation, "_numeric_problem", lambda raw: None)  # jsonb refuses 1e-20000, not us
    refused = b'{"id": "k00003", "v": 1e-20000}'
    job, run, source = planned_run(tmp_path, target_schema, 200, batch_size=200, edit={3: refused})
    stage_refusing = loading._stage_refusing

    def rewritten_then_staged_again(*args):
        rewrite_keeping_size_and_mtime(source, b'"v": "a00150"', b'"v": "b00150"')
        return stage_refusing(*args)

    monkeypatch.setattr(loading, "_stage_refusing", rewritten_then_staged_again)
    out = loading.load_batch(job, run, 0)
    assert out.status == "failed" and out.attempts == 1
    assert source.read_bytes().count(b'"b00150"') == 1  # the refusal path ran
    [batch] = loader.run_contract(job, run)["batches"]
    assert_failed_as_changed(batch, source)
    assert loaded(pg, target_schema) == {}


def test_a_gzip_batch_whose_copy_in_the_ledger_was_altered_fails_as_changed(tmp_path, target_schema, pg, own_queue):
    """Gzip and JSON-array batches are loaded from their copy in the ledger, never from the file again: the
    checksum taken at planning is that copy's."""
    job, run, source = planned_run(tmp_path, target_schema, 150, gz=True)
    payloads = sql.Identifier(os.environ["ETL_LEDGER_SCHEMA"], "batch_payloads")
    pg.execute(sql.SQL("UPDATE {} SET payload = %s WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = 1"
                       ).format(payloads), [zlib.compress(b'{"id": "k00100", "v": "forged"}\n'), job, run])
    assert [loading.load_batch(job, run, i).status for i in (0, 1)] == ["succeeded", "failed"]
    c = loader.run_contract(job, run)
    assert c["status"] == "partial_success"
    batch = next(b for b in c["batches"] if b["index"] == 1)
    assert batch["error_code"] == "source_changed" and batch["attempts"] == 1
    assert batch["error_message"].startswith(f"batch 1 of source file {source}: its copy in the ledger changed")
    rows = loaded(pg, target_schema)
    assert len(rows) == 100 and "forged" not in rows.values()
