"""CHECK constraints on run, batch and attempt statuses: the ledger refuses a state the code does not know.

The lists are frozen here (a later state gets a revision of its own that widens them); loader/states.py
names the same states, and tests/test_states.py writes every one of them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from loader import db

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

CHECKS = {
    ("runs", "runs_status_check"): (
        "queued", "validating", "loading", "committing", "success", "partial_success", "failed", "canceled"),
    ("batches", "batches_status_check"): ("pending", "running", "retried", "succeeded", "failed"),
    ("attempts", "attempts_status_check"): ("running", "succeeded", "failed", "retrying", "abandoned", "skipped"),
}


def _schema_version(schema: str) -> sa.TableClause:
    return sa.table("schema_version", sa.column("version", sa.Integer), schema=schema)


def upgrade() -> None:
    schema = db.ledger_schema()
    for (table, name), states in CHECKS.items():
        op.create_check_constraint(name, table, sa.column("status").in_(states), schema=schema)
    # 0.1.0's initdb refuses a ledger newer than version 1 ("upgrade the dataloader package"):
    # an old worker's initdb then stops instead of writing into a schema it does not know.
    op.get_bind().execute(_schema_version(schema).insert().values(version=2))


def downgrade() -> None:
    schema = db.ledger_schema()
    versions = _schema_version(schema)
    op.get_bind().execute(versions.delete().where(versions.c.version == 2))
    for (table, name) in CHECKS:
        op.drop_constraint(name, table, schema=schema, type_="check")
