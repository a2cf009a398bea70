"""Downloads, streamed from the ledger: logs (NDJSON), metrics (CSV), rejected records (NDJSON)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import orjson
from psycopg import sql
from psycopg.rows import dict_row

from . import db
from .contract import iso, run_contract
from .db import ledger_table

#: Rows fetched per round trip by the server-side cursors.
FETCH_ROWS = 2000

METRICS_COLUMNS = ("row_type", "etl_job_id", "etl_run_id", "batch_index", "status", "attempts", "retries",
                   "rows_attempted", "rows_inserted", "rows_updated", "rows_validated", "validation_failures",
                   "duration_ms", "committed_at", "error_code", "error_message", "batches_total",
                   "batches_succeeded", "batches_failed", "throughput_rps", "batch_duration_ms_avg",
                   "batch_duration_ms_p95")


def _stream(query: sql.Composed, params: list[Any]) -> Iterator[dict[str, Any]]:
    with db.connection() as conn, conn.transaction():
        with conn.cursor(name="dataloader_export", row_factory=dict_row) as cur:
            cur.itersize = FETCH_ROWS
            cur.execute(query, params)
            yield from cur


def iter_logs_ndjson(job: str, run: str) -> Iterator[bytes]:
    """Every log event of the run, oldest first, one JSON object per line.

    Example::

        with open("logs.ndjson", "wb") as f:
            f.writelines(iter_logs_ndjson("orders", run_id))
    """
    run_contract(job, run, include_batches=False)  # RunNotFound before the first byte
    q = sql.SQL("SELECT id, ts, level, event, etl_job_id, etl_run_id, batch_index, attempt, details FROM {} "
                "WHERE etl_job_id = %s AND etl_run_id = %s ORDER BY id").format(ledger_table("events"))
    for e in _stream(q, [job, run]):
        yield orjson.dumps({"ts": iso(e["ts"]), "level": e["level"], "event": e["event"], "job": e["etl_job_id"],
                            "run": e["etl_run_id"], "batch": e["batch_index"], "attempt": e["attempt"],
                            "details": e["details"]}) + b"\n"


def _csv_line(values: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if v is None else v for v in values])
    text = buf.getvalue()
    # Spreadsheet formula injection: a cell starting with = + - @ is read as a formula by Excel.
    return text.encode("utf-8")


def _safe_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def iter_metrics_csv(job: str, run: str) -> Iterator[bytes]:
    """One CSV row per batch, then one ``run`` row with the run's summary metrics."""
    contract = run_contract(job, run, include_batches=False)
    yield _csv_line(list(METRICS_COLUMNS))
    q = sql.SQL("SELECT batch_index, status, attempts, rows_attempted, rows_inserted, rows_updated, rows_validated, "
                "validation_failures, duration_ms, committed_at, error_code, error_message FROM {} "
                "WHERE etl_job_id = %s AND etl_run_id = %s ORDER BY batch_index").format(ledger_table("batches"))
    for b in _stream(q, [job, run]):
        yield _csv_line([_safe_cell(v) for v in [
            "batch", job, run, b["batch_index"], b["status"], b["attempts"], max(b["attempts"] - 1, 0),
            b["rows_attempted"], b["rows_inserted"], b["rows_updated"], b["rows_validated"],
            b["validation_failures"], None if b["duration_ms"] is None else round(b["duration_ms"], 1),
            iso(b["committed_at"]), b["error_code"], b["error_message"], None, None, None, None, None, None]])
    m = contract["metrics"]
    yield _csv_line([_safe_cell(v) for v in [
        "run", job, run, None, contract["status"], None, m["retries"], m["rows_attempted"], m["rows_inserted"],
        m["rows_updated"], m["rows_validated"], m["validation_failures"], contract["metrics"]["elapsed_ms"],
        contract["loaded_at"], contract["error_code"], contract["error_message"], m["batches_total"],
        m["batches_succeeded"], m["batches_failed"], m["throughput_rps"], m["batch_duration_ms_avg"],
        m["batch_duration_ms_p95"]]])


def iter_rejects_ndjson(job: str, run: str) -> Iterator[bytes]:
    """Every rejected record with where it was and why, one JSON object per line."""
    run_contract(job, run, include_batches=False)
    q = sql.SQL("SELECT batch_index, source_file, line_no, error_class, path, message, sample_value, problems, "
                "record, record_truncated FROM {} WHERE etl_job_id = %s AND etl_run_id = %s ORDER BY id").format(
                    ledger_table("rejects"))
    for r in _stream(q, [job, run]):
        yield orjson.dumps({"etl_job_id": job, "etl_run_id": run, **r}) + b"\n"
