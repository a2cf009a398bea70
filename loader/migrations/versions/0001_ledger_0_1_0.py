"""The ledger as 0.1.0 created it: runs, batches, payloads, attempts, rejects, events, workers.

A frozen copy of the 0.1.0 table definitions (loader/ledger.py at 0.1.0), so that this revision
creates the same schema whatever the model becomes later. On a ledger that 0.1.0 created (no Alembic
version table yet) it creates nothing: every table is checked first, and ``initdb`` records the
revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import BYTEA, JSONB

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

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
    sa.Column("status", sa.Text, nullable=False, server_default="pending"),
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


def upgrade() -> None:
    # The bind maps schema-less tables into ETL_LEDGER_SCHEMA (schema_translate_map, see loader/db.py).
    bind = op.get_bind()
    metadata.create_all(bind, checkfirst=True)
    if bind.execute(sa.select(sa.func.count()).select_from(schema_version)).scalar() == 0:
        bind.execute(schema_version.insert().values(version=1))


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
