"""The audit trail: ``runs.started_by`` and the ``actions`` table.

- ``runs.started_by``: who started the run (the console's signed-in person, ``ETL_ACTOR`` or the OS user
  of the CLI and notebooks). NULL for runs started before this revision: nobody recorded it.
- ``actions``: one row per start, forced start, retry (its batches in ``detail``) and cancel, written in
  the transaction of the action; ``at`` is the database's clock.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from loader import db

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def _schema_version(schema: str) -> sa.TableClause:
    return sa.table("schema_version", sa.column("version", sa.Integer), schema=schema)


def upgrade() -> None:
    schema = db.ledger_schema()
    op.add_column("runs", sa.Column("started_by", sa.Text), schema=schema)
    op.create_table(
        "actions",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("etl_job_id", sa.Text, nullable=False),
        sa.Column("etl_run_id", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.clock_timestamp()),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("detail", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.CheckConstraint("action IN ('start', 'forced_start', 'retry', 'cancel')", name="actions_action_check"),
        sa.ForeignKeyConstraint(["etl_job_id", "etl_run_id"],
                                [f"{schema}.runs.etl_job_id", f"{schema}.runs.etl_run_id"],
                                ondelete="CASCADE", name="actions_run_fk"),
        schema=schema,
    )
    op.create_index("actions_run_idx", "actions", ["etl_job_id", "etl_run_id", "id"], schema=schema)
    op.get_bind().execute(_schema_version(schema).insert().values(version=4))


def downgrade() -> None:
    schema = db.ledger_schema()
    versions = _schema_version(schema)
    op.get_bind().execute(versions.delete().where(versions.c.version == 4))
    op.drop_table("actions", schema=schema)
    op.drop_column("runs", "started_by", schema=schema)
