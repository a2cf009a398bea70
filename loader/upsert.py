"""Staging tables: create them, COPY a batch into a temp table, and upsert it with exact counts."""

from __future__ import annotations

import functools
import struct
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

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
_UPSERT = """
    WITH src AS (
        SELECT DISTINCT ON (source_id) source_id, data, pos
        FROM pg_temp.etl_stage {keys} ORDER BY source_id, pos DESC
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
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"""
UPSERT = sql.SQL(_UPSERT.replace("{keys}", ""))
#: The same upsert for some of the stage's keys only: the rare path after the upsert itself refused a
#: record's data (a generated column or an expression index of the target computing on ``data``).
UPSERT_KEYS = sql.SQL(_UPSERT.replace("{keys}", "WHERE source_id = ANY(%(keys)s)"))

CREATE_STAGE = sql.SQL(
    "CREATE TEMP TABLE IF NOT EXISTS etl_stage (pos bigint, source_id text, data jsonb) ON COMMIT DELETE ROWS")
COPY_STAGE = sql.SQL("COPY pg_temp.etl_stage (pos, source_id, data) FROM STDIN (FORMAT BINARY)")

#: COPY's binary format: every field is length-prefixed, so the JSON text goes as it is (no escaping
#: to do on either side: 0.6 instead of 2.7 us per row here, and the server skips the text parsing).
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # then no flags, no header extension
_COPY_TRAILER = b"\xff\xff"
_row_head = struct.Struct("!hiqi").pack  # 3 fields; pos (bigint: 8 bytes); source_id's length
_jsonb_head = struct.Struct("!ib").pack  # data's length; jsonb's binary format version (1), then the text

#: Accepted rows go to PostgreSQL in chunks of about this many bytes of JSON while the next records
#: are still being validated: the server parses chunk k into jsonb while the worker checks chunk
#: k+1, so one worker keeps two cores busy. Small enough that the last chunk (whose parsing nobody
#: overlaps) is short, large enough that a write costs little next to the records it carries.
STAGE_CHUNK_BYTES = 64 * 1024

#: Connections whose session already has the temp stage (a committed CREATE). A psycopg connection
#: is one server session for its whole life (it never reconnects): a pool that replaces a broken
#: connection hands out a new object, which is not in this set and gets the table again.
_staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

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


def ensure_stage(conn: psycopg.Connection[Any]) -> None:
    """Create this session's temp stage, once per connection (not once per batch: a round trip saved).

    Call it outside a transaction: the CREATE then commits at once and the connection is
    remembered. Inside a transaction it still runs, but is not remembered, since a rollback
    would take the table with it.
    """
    if conn in _staged:
        return
    conn.execute(CREATE_STAGE)
    if conn.info.transaction_status == TransactionStatus.IDLE:
        _staged.add(conn)


class StageWriter:
    """Rows on their way into the temp stage: ``add`` them one by one, they are sent in chunks."""

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._parts: list[bytes] = [_COPY_SIGNATURE]
        self._pending = 0
        #: Rows added so far.
        self.rows = 0

    def add(self, pos: int, source_id: str, text: bytes) -> None:
        """Queue one row ``(pos, source_id, json_text)``; send the chunk once it is big enough."""
        sid = source_id.encode("utf-8")
        self._parts += (_row_head(3, 8, pos, len(sid)), sid, _jsonb_head(len(text) + 1, 1), text)
        self.rows += 1
        self._pending += len(text)
        if self._pending >= STAGE_CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._copy.write(b"".join(self._parts))
            self._parts.clear()
            self._pending = 0

    def close(self) -> None:
        """Send what is left and the end of the COPY data."""
        self._parts.append(_COPY_TRAILER)
        self.flush()


@contextmanager
def staging(conn: psycopg.Connection[Any]) -> Iterator[StageWriter]:
    """A COPY into the temp stage, streamed: rows ``add``-ed in the block reach PostgreSQL in chunks.

    Must run inside the caller's transaction (the stage is emptied at commit). If the block
    raises, the COPY is aborted and the exception goes on.

    Example::

        with conn.transaction():
            with staging(conn) as stage:
                stage.add(1, "ord-1", b'{"source_id": "ord-1"}')
            inserted, updated = upsert_stage(conn, "staging", "orders", job="orders", run=run, run_seq=1)
    """
    ensure_stage(conn)
    with conn.cursor().copy(COPY_STAGE) as copy:
        writer = StageWriter(copy)
        yield writer
        writer.close()


#: SQLSTATE classes of errors that one record's data causes while it is staged (jsonb's parser refusing a
#: number, a string it cannot store, a value too large or too deep): 22 data exception, 54 program limit.
RECORD_ERROR_CLASSES = ("22", "54")


def is_record_refusal(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a row's data (not the connection, a lock or the table): see stage_isolating."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.Error) and state is not None and state[:2] in RECORD_ERROR_CLASSES


@dataclass(frozen=True)
class StageRow:
    """One accepted record on its way to the stage: its place in the source, its key, its JSON text."""

    pos: int
    source_id: str
    text: bytes
    line_no: int


def stage_isolating(conn: psycopg.Connection[Any], rows: Sequence[StageRow]) -> list[tuple[StageRow, str]]:
    """Stage ``rows``, leaving out the ones PostgreSQL refuses; returns them with its message (SQLSTATE first).

    The rare path after a streamed COPY failed on a record's data: the rows go in halves, each COPY
    under a savepoint of the caller's transaction; a half that is refused is split again, down to the
    single rows at fault. k refused rows of n cost about 2k·log2(n) COPYs, and every accepted row is
    staged exactly once. Errors that are not a record's (connection, timeout) go on to the caller.

    Example::

        with conn.transaction():
            refused = stage_isolating(conn, rows)
    """
    refused: list[tuple[StageRow, str]] = []
    pending: list[Sequence[StageRow]] = [rows] if rows else []
    while pending:
        part = pending.pop()
        try:
            with conn.transaction(), staging(conn) as stage:
                for row in part:
                    stage.add(row.pos, row.source_id, row.text)
        except psycopg.Error as exc:
            if not is_record_refusal(exc):
                raise
            if len(part) == 1:
                refused.append((part[0], refusal_message(exc)))
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]  # the first half is tried first
    refused.sort(key=lambda r: r[0].pos)
    return refused


def refusal_message(exc: psycopg.Error) -> str:
    """PostgreSQL's refusal of one record, for its reject: SQLSTATE first, then its first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"PostgreSQL refused the record ({exc.sqlstate}): {first}"


@dataclass(frozen=True)
class Refused:
    """A record the upsert refused: the batch's winning record for ``source_id``, at ``pos``."""

    source_id: str
    pos: int
    message: str


def upsert_isolating(conn: psycopg.Connection[Any], schema: str, table: str, *, job: str, run: str,
                     run_seq: int) -> tuple[int, int, list[Refused]]:
    """Upsert the temp stage leaving out the keys whose record the target refuses: (inserted, updated, refused).

    The rare path after :func:`upsert_stage` hit a record's data error (SQLSTATE class 22/54 raised by a
    generated column, an expression index or a domain of the target). The stage's keys go in halves,
    each under a savepoint of the caller's transaction; a refused half is split again down to the single
    key at fault. Each accepted key is upserted exactly once. A refused key's record from this batch is
    the batch's winner for that key (the last one in source order): it is rejected, and the earlier
    duplicates it superseded stay superseded, so the counts stay exact (validated = inserted + updated +
    superseded). Errors that are not a record's go on to the caller.
    """
    target = target_identifier(schema, table)
    keys = [r[0] for r in conn.execute("SELECT DISTINCT source_id FROM pg_temp.etl_stage ORDER BY 1")]
    inserted = updated = 0
    refused: list[tuple[str, str]] = []
    pending: list[list[str]] = [keys] if keys else []
    while pending:
        part = pending.pop()
        try:
            with conn.transaction():
                row = conn.execute(UPSERT_KEYS.format(target=target),
                                   {"keys": part, "job": job, "run": run, "seq": run_seq}).fetchone()
        except psycopg.Error as exc:
            if not is_record_refusal(exc):
                raise
            if len(part) == 1:
                refused.append((part[0], refusal_message(exc)))
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]
            continue
        assert row is not None
        inserted += int(row[0])
        updated += int(row[1])
    positions = dict(conn.execute(
        "SELECT DISTINCT ON (source_id) source_id, pos FROM pg_temp.etl_stage WHERE source_id = ANY(%s) "
        "ORDER BY source_id, pos DESC", [[k for k, _ in refused]]).fetchall()) if refused else {}
    out = sorted((Refused(key, int(positions[key]), message) for key, message in refused), key=lambda r: r.pos)
    return inserted, updated, out


@functools.lru_cache(maxsize=64)
def _upsert_text(schema: str, table: str) -> bytes:
    """UPSERT into one target, rendered once (psycopg would render the composed statement every batch)."""
    return UPSERT.format(target=target_identifier(schema, table)).as_bytes(None)


def upsert_stage(conn: psycopg.Connection[Any], schema: str, table: str, *, job: str, run: str,
                 run_seq: int) -> tuple[int, int]:
    """Upsert the temp stage's rows into the target table; (inserted, updated)."""
    row = conn.execute(_upsert_text(schema, table), {"job": job, "run": run, "seq": run_seq}).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])

