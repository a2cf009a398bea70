"""``batches_status_duration_idx`` replaces ``batches_status_idx``: the run's batches by status, then duration.

The run contract's p95 batch duration reads the few durations around the 95th percentile from the top of
this index (a backward scan of about 5 % of the succeeded batches) instead of sorting every one (about
20 ms at 100k batches). It replaces the index on ``(etl_job_id, etl_run_id, status)``, which it serves
as well (the same leading columns): every batch update already changes an indexed column (its status or
change number, never a HOT update), so the workers maintain as many index entries as before, each 8 bytes
longer.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from loader import db

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def _schema_version(schema: str) -> sa.TableClause:
    return sa.table("schema_version", sa.column("version", sa.Integer), schema=schema)


def upgrade() -> None:
    schema = db.ledger_schema()
    op.create_index("batches_status_duration_idx", "batches", ["etl_job_id", "etl_run_id", "status", "duration_ms"],
                    schema=schema)
    op.drop_index("batches_status_idx", "batches", schema=schema)
    op.get_bind().execute(_schema_version(schema).insert().values(version=6))


def downgrade() -> None:
    schema = db.ledger_schema()
    versions = _schema_version(schema)
    op.get_bind().execute(versions.delete().where(versions.c.version == 6))
    op.create_index("batches_status_idx", "batches", ["etl_job_id", "etl_run_id", "status"], schema=schema)
    op.drop_index("batches_status_duration_idx", "batches", schema=schema)
