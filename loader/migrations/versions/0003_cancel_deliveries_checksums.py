"""Canceled batches and attempts, numbered deliveries, and per-batch checksums.

- ``batches.status`` / ``attempts.status`` may be ``canceled``: a batch of a canceled run that never
  started is recorded as never to run, and an attempt that reached the commit after the run was
  canceled is recorded as such (its rows were rolled back).
- ``batches.deliveries`` numbers the RQ deliveries of a batch: each has its own RQ job id, so one
  delivery can never mark another's RQ job finished (issue: redeliveries fencing each other out).
- ``workers.batch_job/batch_run/batch_index``: the batch a worker is executing, written with its
  heartbeat; the reconciler trusts it (a batch a live worker is executing is never queued again).
- ``batches.checksum``: a digest of the batch's bytes taken at planning; loading verifies it, so a
  source rewritten after planning fails its batch instead of loading other data. NULL for batches
  planned before this revision (they are verified by size and mtime, as before).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from loader import db

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

#: The status lists as of this revision (0002's plus ``canceled``).
CHECKS = {
    ("batches", "batches_status_check"): ("pending", "running", "retried", "succeeded", "failed", "canceled"),
    ("attempts", "attempts_status_check"): (
        "running", "succeeded", "failed", "retrying", "abandoned", "skipped", "canceled"),
}
OLD_CHECKS = {
    ("batches", "batches_status_check"): ("pending", "running", "retried", "succeeded", "failed"),
    ("attempts", "attempts_status_check"): ("running", "succeeded", "failed", "retrying", "abandoned", "skipped"),
}


def _schema_version(schema: str) -> sa.TableClause:
    return sa.table("schema_version", sa.column("version", sa.Integer), schema=schema)


def _checks(schema: str, checks: dict[tuple[str, str], tuple[str, ...]]) -> None:
    for (table, name), states in checks.items():
        op.drop_constraint(name, table, schema=schema, type_="check")
        op.create_check_constraint(name, table, sa.column("status").in_(states), schema=schema)


def upgrade() -> None:
    schema = db.ledger_schema()
    _checks(schema, CHECKS)
    op.add_column("batches", sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
                  schema=schema)
    op.add_column("batches", sa.Column("checksum", sa.Text), schema=schema)
    for name, kind in (("batch_job", sa.Text), ("batch_run", sa.Text), ("batch_index", sa.Integer)):
        op.add_column("workers", sa.Column(name, kind), schema=schema)
    op.get_bind().execute(_schema_version(schema).insert().values(version=3))


def downgrade() -> None:
    schema = db.ledger_schema()
    versions = _schema_version(schema)
    op.get_bind().execute(versions.delete().where(versions.c.version == 3))
    for name in ("batch_job", "batch_run", "batch_index"):
        op.drop_column("workers", name, schema=schema)
    op.drop_column("batches", "checksum", schema=schema)
    op.drop_column("batches", "deliveries", schema=schema)
    bind = op.get_bind()
    for table, older in (("batches", "failed"), ("attempts", "abandoned")):  # 0002 knows no 'canceled'
        rows = sa.table(table, sa.column("status", sa.Text), schema=schema)
        bind.execute(rows.update().where(rows.c.status == "canceled").values(status=older))
    _checks(schema, OLD_CHECKS)
