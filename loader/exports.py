"""Downloads, streamed from the ledger: logs (NDJSON), metrics (CSV), rejected records (NDJSON).

Each download reads on a connection of its own (:func:`loader.db.dedicated_connection`), never the
pool that starting, retrying and canceling runs use, in pages of :data:`FETCH_ROWS` rows by key
(``WHERE key > last ORDER BY key LIMIT n``, one index range scan each), every page its own short
statement: no transaction stays open while a client reads slowly, and each page is under the
console's statement timeout.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import db
from .contract import iso, run_contract
from .db import ledger_table
from .errors import RunNotFound

#: Rows fetched per statement.
FETCH_ROWS = 2000

METRICS_COLUMNS = ("row_type", "etl_job_id", "etl_run_id", "batch_index", "status", "attempts", "retries",
                   "rows_attempted", "rows_inserted", "rows_updated", "rows_validated", "validation_failures",
                   "duration_ms", "committed_at", "error_code", "error_message", "batches_total",
                   "batches_succeeded", "batches_failed", "throughput_rps", "batch_duration_ms_avg",
                   "batch_duration_ms_p95")


def _stream(columns: str, table: str, key: str, job: str, run: str) -> Iterator[dict[str, Any]]:
    """The run's rows of ledger ``table`` in ``key`` order, page by page (keyset), on a dedicated connection.

    ``columns`` names the columns, comma-separated. RunNotFound when the run does not exist, raised
    before any row; database errors as LoaderError.
    """
    names = sql.SQL(", ").join(sql.Identifier(c.strip()) for c in columns.split(","))
    q = sql.SQL("SELECT {key} AS _key, {names} FROM {table} WHERE etl_job_id = %(job)s AND etl_run_id = %(run)s "
                "AND {key} > %(after)s ORDER BY {key} LIMIT %(n)s").format(
                    key=sql.Identifier(key), names=names, table=ledger_table(table))
    exists = sql.SQL("SELECT 1 FROM {} WHERE etl_job_id = %s AND etl_run_id = %s").format(ledger_table("runs"))
    try:
        with db.dedicated_connection() as conn:
            if conn.execute(exists, [job, run]).fetchone() is None:
                raise RunNotFound(f"no run {run!r} for job {job!r}", job=job, run=run)
            after = -1
            with conn.cursor(row_factory=dict_row) as cur:
                while True:
                    rows = cur.execute(q, {"job": job, "run": run, "after": after, "n": FETCH_ROWS}).fetchall()
                    for row in rows:
                        after = row.pop("_key")
                        yield row
                    if len(rows) < FETCH_ROWS:
                        return
    except psycopg.Error as exc:
        raise db.wrap_db_error(exc, job=job, run=run) from exc


def iter_logs_ndjson(job: str, run: str) -> Iterator[bytes]:
    """Every log event of the run, oldest first, one JSON object per line.

    Example::

        with open("logs.ndjson", "wb") as f:
            f.writelines(iter_logs_ndjson("orders", run_id))
    """
    rows = _stream("ts, level, event, etl_job_id, etl_run_id, batch_index, attempt, details", "events", "id",
                   job, run)
    for e in rows:
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
    rows = _stream("batch_index, status, attempts, rows_attempted, rows_inserted, rows_updated, rows_validated, "
                   "validation_failures, duration_ms, committed_at, error_code, error_message", "batches",
                   "batch_index", job, run)
    for b in rows:
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
    rows = _stream("batch_index, source_file, line_no, error_class, path, message, sample_value, problems, "
                   "record, record_truncated", "rejects", "id", job, run)
    for r in rows:
        yield orjson.dumps({"etl_job_id": job, "etl_run_id": run, **r}) + b"\n"
