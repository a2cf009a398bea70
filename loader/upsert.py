"""Staging tables: create them, COPY a batch into a temp table, and upsert it with exact counts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from .errors import TargetTableError

CREATE_TARGET = sql.SQL("""
    CREATE TABLE IF NOT EXISTS {target} (
        source_id text PRIMARY KEY,
        data jsonb NOT NULL,
        etl_job_id text NOT NULL,
        etl_run_id text NOT NULL,
        loaded_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        etl_run_seq bigint NOT NULL DEFAULT 0,
        etl_source_pos bigint NOT NULL DEFAULT 0
    )""")

#: The batch's records, deduplicated (the last one in source order wins), sorted by source_id so
#: concurrent batches take row locks in the same order. A row is only overwritten by a record that
#: comes later (later-started run, then later in the source), so batches may commit in any order.
#: ``xmax = 0`` is true only for a freshly inserted row: exact inserted vs updated counts.
UPSERT = sql.SQL("""
    WITH src AS (
        SELECT DISTINCT ON (source_id) source_id, data, pos
        FROM pg_temp.etl_stage ORDER BY source_id, pos DESC
    ), up AS (
        INSERT INTO {target} AS t
            (source_id, data, etl_job_id, etl_run_id, etl_run_seq, etl_source_pos, loaded_at, updated_at)
        SELECT source_id, data, %(job)s, %(run)s, %(seq)s, pos, now(), now() FROM src ORDER BY source_id
        ON CONFLICT (source_id) DO UPDATE SET
            data = EXCLUDED.data, updated_at = EXCLUDED.updated_at,
            etl_job_id = EXCLUDED.etl_job_id, etl_run_id = EXCLUDED.etl_run_id,
            etl_run_seq = EXCLUDED.etl_run_seq, etl_source_pos = EXCLUDED.etl_source_pos
        WHERE (t.etl_run_seq, t.etl_source_pos) < (EXCLUDED.etl_run_seq, EXCLUDED.etl_source_pos)
        RETURNING (xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up""")

CREATE_STAGE = sql.SQL(
    "CREATE TEMP TABLE IF NOT EXISTS etl_stage (pos bigint, source_id text, data jsonb) ON COMMIT DELETE ROWS")
COPY_STAGE = sql.SQL("COPY pg_temp.etl_stage (pos, source_id, data) FROM STDIN")

REQUIRED_COLUMNS = {"source_id": "text", "data": "jsonb", "etl_job_id": "text", "etl_run_id": "text",
                    "loaded_at": "timestamp with time zone", "updated_at": "timestamp with time zone"}


def target_identifier(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


def ensure_target(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    """Create the staging table if missing; check an existing one can take our upserts.

    Idempotent and safe when runs start together (an advisory lock orders the CREATEs).
    A table made by hand without ``etl_run_seq``/``etl_source_pos`` gets them added.
    """
    target = target_identifier(schema, table)
    with conn.transaction():
        # Per schema, not per table: CREATE SCHEMA IF NOT EXISTS itself races between two tables.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"dataloader.target.{schema}"])
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(CREATE_TARGET.format(target=target))
        cols = dict(conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s", [schema, table]).fetchall())
        for name, kind in REQUIRED_COLUMNS.items():
            if cols.get(name) != kind:
                found = f"is {cols[name]}" if name in cols else "is missing"
                raise TargetTableError(
                    f"target table {schema}.{table} exists but its column {name} {found} (expected {kind})",
                    table=f"{schema}.{table}", column=name)
        for name in ("etl_run_seq", "etl_source_pos"):
            if name not in cols:
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint NOT NULL DEFAULT 0").format(
                    target, sql.Identifier(name)))
        unique = conn.execute("""
            SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = %s::regclass AND i.indisunique AND i.indnkeyatts = 1 AND a.attname = 'source_id'
              AND i.indpred IS NULL""", [target.as_string(conn)]).fetchone()
        if unique is None:
            raise TargetTableError(
                f"target table {schema}.{table} has no primary key or unique index on source_id, "
                "which the upsert needs", table=f"{schema}.{table}")


def _escape(value: bytes) -> bytes:
    """Escape one value for COPY's text format (the JSON text itself is kept byte for byte)."""
    if b"\\" in value:
        value = value.replace(b"\\", b"\\\\")
    if b"\t" in value:
        value = value.replace(b"\t", b"\\t")
    if b"\r" in value:
        value = value.replace(b"\r", b"\\r")
    if b"\n" in value:
        value = value.replace(b"\n", b"\\n")
    return value


def upsert_batch(conn: psycopg.Connection[Any], schema: str, table: str,
                 rows: Iterable[tuple[int, str, bytes]], *, job: str, run: str, run_seq: int) -> tuple[int, int]:
    """COPY ``(pos, source_id, json_text)`` rows into the temp stage, upsert them; (inserted, updated).

    Must run inside the caller's transaction: the batch's rows and its ledger row commit together.
    """
    conn.execute(CREATE_STAGE)
    buf = b"".join(
        b"%d\t%s\t%s\n" % (pos, _escape(sid.encode("utf-8")), _escape(text)) for pos, sid, text in rows
    )
    with conn.cursor().copy(COPY_STAGE) as copy:
        copy.write(buf)
    row = conn.execute(UPSERT.format(target=target_identifier(schema, table)),
                       {"job": job, "run": run, "seq": run_seq}).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
