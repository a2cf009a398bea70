"""The ledger: runs, batches, attempts, rejected records and log events, in PostgreSQL.

Tables are declared once here with SQLAlchemy Core (schema-less; the engine maps them into
ETL_LEDGER_SCHEMA). The batch hot path writes the same tables with plain psycopg (loading.py).
"""

from __future__ import annotations

from enum import Enum

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import BYTEA, JSONB

from . import db
from .errors import LedgerNotReady

#: Bump with a migration in MIGRATIONS when a table changes.
SCHEMA_VERSION = 1


class RunStatus(str, Enum):
    """Where a run is. Final states: success, partial_success, failed, canceled."""

    IDLE = "idle"  # shown by the console before any run exists; never stored
    QUEUED = "queued"
    VALIDATING = "validating"
    LOADING = "loading"
    COMMITTING = "committing"
    SUCCESS = "success"
    PARTIAL_SUCCESS = "partial_success"
    FAILED = "failed"
    CANCELED = "canceled"


ACTIVE_RUN_STATES = (RunStatus.QUEUED, RunStatus.VALIDATING, RunStatus.LOADING, RunStatus.COMMITTING)
FINAL_RUN_STATES = (RunStatus.SUCCESS, RunStatus.PARTIAL_SUCCESS, RunStatus.FAILED, RunStatus.CANCELED)


class BatchStatus(str, Enum):
    """Where a batch is; ``retried`` means an attempt failed transiently and another is due."""

    PENDING = "pending"
    RUNNING = "running"
    RETRIED = "retried"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class AttemptStatus(str, Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the batch failed for good with this attempt
    RETRYING = "retrying"  # transient failure; another attempt follows
    ABANDONED = "abandoned"  # the worker died during the attempt
    SKIPPED = "skipped"  # a duplicate delivery of an already committed batch: nothing done


metadata = sa.MetaData()
RUN_KEY = ("etl_job_id", "etl_run_id")


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(list(RUN_KEY), [f"runs.{c}" for c in RUN_KEY], ondelete="CASCADE",
                                   name=f"{table}_run_fk")


change_seq = sa.Sequence("ledger_change_seq", metadata=metadata)

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("etl_job_id", sa.Text, primary_key=True),
    sa.Column("etl_run_id", sa.Text, primary_key=True),
    sa.Column("run_seq", sa.BigInteger, sa.Identity(always=True), nullable=False, unique=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("target_table", sa.Text, nullable=False),
    sa.Column("spec", JSONB, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("batches_total", sa.Integer),
    sa.Column("rows_planned", sa.BigInteger),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("planned_at", sa.DateTime(timezone=True)),
    sa.Column("loaded_at", sa.DateTime(timezone=True)),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("canceled_at", sa.DateTime(timezone=True)),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("plan_worker", sa.Text),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("change_seq", sa.BigInteger, change_seq, nullable=False, server_default=change_seq.next_value()),
    sa.Index("runs_job_started_idx", "etl_job_id", sa.text("started_at DESC")),
    sa.Index("runs_active_idx", "etl_job_id", postgresql_where=sa.text(
        "status IN ('queued', 'validating', 'loading', 'committing')")),
)

batches = sa.Table(
    "batches", metadata,
    sa.Column("etl_job_id", sa.Text, primary_key=True),
    sa.Column("etl_run_id", sa.Text, primary_key=True),
    sa.Column("batch_index", sa.Integer, primary_key=True),
    sa.Column("status", sa.Text, nullable=False, server_default=BatchStatus.PENDING.value),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("file_size", sa.BigInteger, nullable=False),
    sa.Column("file_mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("byte_start", sa.BigInteger, nullable=False),
    sa.Column("byte_end", sa.BigInteger, nullable=False),
    sa.Column("line_start", sa.BigInteger, nullable=False),
    sa.Column("line_count", sa.Integer, nullable=False),
    sa.Column("ord_start", sa.BigInteger, nullable=False),
    sa.Column("has_payload", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("rows_attempted", sa.Integer, nullable=False),
    sa.Column("rows_inserted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_updated", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_validated", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_superseded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("validation_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("required_field_errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("json_shape_errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duration_ms", sa.Float),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("committed_at", sa.DateTime(timezone=True)),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("error_stack", sa.Text),
    sa.Column("worker", sa.Text),
    sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("change_seq", sa.BigInteger, change_seq, nullable=False, server_default=change_seq.next_value()),
    _run_fk("batches"),
    sa.Index("batches_change_idx", "etl_job_id", "etl_run_id", "change_seq"),
    sa.Index("batches_status_idx", "etl_job_id", "etl_run_id", "status"),
)

payloads = sa.Table(
    "batch_payloads", metadata,
    sa.Column("etl_job_id", sa.Text, primary_key=True),
    sa.Column("etl_run_id", sa.Text, primary_key=True),
    sa.Column("batch_index", sa.Integer, primary_key=True),
    sa.Column("payload", BYTEA, nullable=False),
    _run_fk("batch_payloads"),
)

attempts = sa.Table(
    "attempts", metadata,
    sa.Column("etl_job_id", sa.Text, primary_key=True),
    sa.Column("etl_run_id", sa.Text, primary_key=True),
    sa.Column("batch_index", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("trigger", sa.Text, nullable=False, server_default="auto"),
    sa.Column("worker", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("duration_ms", sa.Float),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("error_stack", sa.Text),
    _run_fk("attempts"),
)

rejects = sa.Table(
    "rejects", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("etl_job_id", sa.Text, nullable=False),
    sa.Column("etl_run_id", sa.Text, nullable=False),
    sa.Column("batch_index", sa.Integer, nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("line_no", sa.BigInteger, nullable=False),
    sa.Column("error_class", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("sample_value", sa.Text, nullable=False),
    sa.Column("problems", JSONB, nullable=False),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("record_truncated", sa.Boolean, nullable=False, server_default=sa.false()),
    _run_fk("rejects"),
    sa.Index("rejects_run_idx", "etl_job_id", "etl_run_id", "id"),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.clock_timestamp()),
    sa.Column("etl_job_id", sa.Text, nullable=False),
    sa.Column("etl_run_id", sa.Text, nullable=False),
    sa.Column("batch_index", sa.Integer),
    sa.Column("attempt", sa.Integer),
    sa.Column("level", sa.Text, nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    _run_fk("events"),
    sa.Index("events_run_idx", "etl_job_id", "etl_run_id", "id"),
    sa.Index("events_batch_idx", "etl_job_id", "etl_run_id", "batch_index", "id"),
)


workers = sa.Table(
    "workers", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


def initdb(url: str | None = None) -> int:
    """Create or upgrade the ledger schema; idempotent (a second call changes nothing).

    Returns the schema version now in the database.

    Example::

        initdb("postgresql://postgres@127.0.0.1/test")
    """
    engine = db.get_engine(url)
    schema = db.ledger_schema()
    with engine.begin() as conn:
        # One initdb at a time (two workers starting together must not race on CREATE).
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('dataloader.initdb'))"))
        conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        metadata.create_all(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        if current is None:
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            return SCHEMA_VERSION
        if current > SCHEMA_VERSION:
            raise LedgerNotReady(
                f"the ledger schema {schema!r} is version {current}, newer than this code ({SCHEMA_VERSION}): "
                "upgrade the dataloader package", found=current, expected=SCHEMA_VERSION)
        return int(current)
