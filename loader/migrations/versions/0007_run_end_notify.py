"""``runs_notify_end``: a run reaching a final state sends a notification on ``dataloader_run_end``.

``dataloader start --wait`` (``loader.wait_for_run``) listens on that channel and reads the run's status
when told, instead of polling it ten times a second: a run's end is seen at once (a poll saw it up to 0.1 s
late, and every end of a CLI-started run paid that), and waiting costs the database nothing meanwhile. The
trigger fires on runs' status changes into a final state only (a few per run, never per batch); the
payload names the ledger schema, job, run and status as JSON. Every way a run ends (its last batch, a
cancel, a planning failure, an empty source) passes through this one place.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from loader import db

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

#: Frozen with this revision (loader.states.RUN_END_CHANNEL names it for the code).
CHANNEL = "dataloader_run_end"
FINAL = ("success", "partial_success", "failed", "canceled")


def _schema_version(schema: str) -> sa.TableClause:
    return sa.table("schema_version", sa.column("version", sa.Integer), schema=schema)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def upgrade() -> None:
    schema = db.ledger_schema()
    s = _quoted(schema)
    finals = ", ".join(f"'{f}'" for f in FINAL)
    op.execute(f"""
        CREATE FUNCTION {s}.notify_run_end() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', json_build_object('schema', TG_TABLE_SCHEMA, 'job', NEW.etl_job_id,
                                                            'run', NEW.etl_run_id, 'status', NEW.status)::text);
            RETURN NULL;
        END $$""")
    op.execute(f"""
        CREATE TRIGGER runs_notify_end AFTER UPDATE OF status ON {s}.runs FOR EACH ROW
        WHEN (NEW.status IS DISTINCT FROM OLD.status AND NEW.status IN ({finals}))
        EXECUTE FUNCTION {s}.notify_run_end()""")
    op.get_bind().execute(_schema_version(schema).insert().values(version=7))


def downgrade() -> None:
    schema = db.ledger_schema()
    s = _quoted(schema)
    versions = _schema_version(schema)
    op.get_bind().execute(versions.delete().where(versions.c.version == 7))
    op.execute(f"DROP TRIGGER runs_notify_end ON {s}.runs")
    op.execute(f"DROP FUNCTION {s}.notify_run_end()")
