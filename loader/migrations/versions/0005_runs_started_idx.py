"""``runs_started_idx``: the runs in start order, newest first, whatever their job.

Recent runs (every job) reads the newest page of runs at each refresh of each open tab; without this index
PostgreSQL sorts every run of the ledger to find it (12 ms with 10,000 runs, growing with the ledger). Runs
are written a few times per run, never per batch: the index costs the workers nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from loader import db

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def _schema_version(schema: str) -> sa.TableClause:
    return sa.table("schema_version", sa.column("version", sa.Integer), schema=schema)


def upgrade() -> None:
    schema = db.ledger_schema()
    op.create_index("runs_started_idx", "runs", [sa.text("started_at DESC")], schema=schema)
    op.get_bind().execute(_schema_version(schema).insert().values(version=5))


def downgrade() -> None:
    schema = db.ledger_schema()
    versions = _schema_version(schema)
    op.get_bind().execute(versions.delete().where(versions.c.version == 5))
    op.drop_index("runs_started_idx", "runs", schema=schema)
