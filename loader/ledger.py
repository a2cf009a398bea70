"""The ledger: runs, batches, attempts, rejected records and log events, in PostgreSQL.

Tables are declared once here with SQLAlchemy Core (schema-less; the engine maps them into
ETL_LEDGER_SCHEMA): this is the model the code reads and writes. The hand-written psycopg SQL names
them through ``db.ledger_table(name)``, which refuses a name not declared here. The database gets the
model through the Alembic migrations in loader/migrations (``initdb``); a change here needs a revision
there (tests/test_migrations.py compares a migrated ledger with this model). Statuses change only
through loader/states.py, whose guarded SQL the batch hot path runs with plain psycopg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import BYTEA, JSONB

from . import db
from .errors import LedgerNotReady
from .states import (
    ACTIVE_RUN_STATES,
    FINAL_RUN_STATES,
    STORED_RUN_STATES,
    AttemptStatus,
    BatchStatus,
    RunStatus,
    check_constraint,
)

if TYPE_CHECKING:
    from alembic.config import Config

#: The Alembic migrations of the ledger: a table change here needs a revision there.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


# The states live in states.py (the state machine); imported here for the table definitions and for
# code written against 0.1.0 (``from loader.ledger import RunStatus``).
__all__ = ["ACTIVE_RUN_STATES", "FINAL_RUN_STATES", "AttemptStatus", "BatchStatus", "RunStatus"]


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
    # 0004: who started the run (NULL: started before 0004); the whole history is in ``actions``.
    sa.Column("started_by", sa.Text),
    sa.CheckConstraint(check_constraint("status", STORED_RUN_STATES), name="runs_status_check"),
    sa.Index("runs_job_started_idx", "etl_job_id", sa.text("started_at DESC")),
    # 0005: Recent runs of every job reads the newest page without sorting the whole ledger.
    sa.Index("runs_started_idx", sa.text("started_at DESC")),
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
    # 0003: the number of the batch's current RQ delivery (its job id ends with it), and the digest of
    # its bytes taken at planning (NULL: planned before 0003).
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("checksum", sa.Text),
    sa.CheckConstraint(check_constraint("status", tuple(BatchStatus)), name="batches_status_check"),
    _run_fk("batches"),
    sa.Index("batches_change_idx", "etl_job_id", "etl_run_id", "change_seq"),
    # 0006: by status, then duration (was ``batches_status_idx``, by status only): the contract's p95 reads
    # the durations around it from the top of the run's succeeded batches instead of sorting them all.
    sa.Index("batches_status_duration_idx", "etl_job_id", "etl_run_id", "status", "duration_ms"),
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
    sa.CheckConstraint(check_constraint("status", tuple(AttemptStatus)), name="attempts_status_check"),
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

#: 0004: the audit trail. One row per start, forced start, retry and cancel, written in the transaction
#: that does it (loader/audit.py); ``at`` is the database's clock.
actions = sa.Table(
    "actions", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("etl_job_id", sa.Text, nullable=False),
    sa.Column("etl_run_id", sa.Text, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.clock_timestamp()),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("detail", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.CheckConstraint("action IN ('start', 'forced_start', 'retry', 'cancel')", name="actions_action_check"),
    _run_fk("actions"),
    sa.Index("actions_run_idx", "etl_job_id", "etl_run_id", "id"),
)


workers = sa.Table(
    "workers", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # 0003: the batch the worker is executing now, written with each heartbeat (NULL: none). The
    # reconciler never queues again a batch that a live worker says it is executing.
    sa.Column("batch_job", sa.Text),
    sa.Column("batch_run", sa.Text),
    sa.Column("batch_index", sa.Integer),
)


def _alembic_config(conn: sa.Connection | None = None) -> Config:
    """Alembic's configuration, built here: no alembic.ini is needed at run time.

    Alembic is imported where it is used (it brings Mako and Pygments: 80 ms of every CLI command's start).
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    """The newest migration this code ships (``0002``...)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, f"no migration in {MIGRATIONS}"
    return head


@dataclass(frozen=True)
class LedgerState:
    """Where the ledger schema stands against this code's migrations."""

    schema: str
    current: str | None  # the Alembic revision recorded in the ledger; None: none recorded
    head: str
    tables: bool  # the ledger's tables exist (a 0.1.0 ledger has them but no revision)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def problem(self) -> str | None:
        """What is wrong, in words that say what to run; None when the ledger is up to date."""
        if self.up_to_date:
            return None
        if self.current is None and not self.tables:
            return f"the ledger schema {self.schema!r} does not exist yet: run `dataloader initdb`"
        if self.current is None:
            return (f"the ledger schema {self.schema!r} was created by dataloader 0.1.0 and is behind this code "
                    f"(revision {self.head}): run `dataloader initdb` to upgrade it")
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError

        script = ScriptDirectory.from_config(_alembic_config())
        try:
            script.get_revision(self.current)
        except CommandError:
            return (f"the ledger schema {self.schema!r} is at revision {self.current}, newer than this code "
                    f"({self.head}): upgrade the dataloader package")
        return (f"the ledger schema {self.schema!r} is at revision {self.current}, behind this code "
                f"({self.head}): run `dataloader initdb` to upgrade it")


def ledger_state(conn: sa.Connection) -> LedgerState:
    """Read the ledger's revision (one catalog lookup and one row): cheap enough for every process start."""
    schema = db.ledger_schema()
    found = conn.execute(sa.text("SELECT to_regclass(:v), to_regclass(:r)"), {
        "v": _qualified(schema, "alembic_version"), "r": _qualified(schema, "runs")}).one()
    current = None
    if found[0] is not None:
        from alembic.migration import MigrationContext

        current = MigrationContext.configure(conn, opts={"version_table_schema": schema}).get_current_revision()
    return LedgerState(schema, current, head_revision(), found[1] is not None)


def _qualified(schema: str, table: str) -> str:
    return '"{}"."{}"'.format(schema.replace('"', '""'), table)


def initdb(url: str | None = None) -> int:
    """Create the ledger schema or upgrade it to this code's newest migration; idempotent.

    Runs the Alembic migrations (loader/migrations) in one transaction under an advisory lock, so
    two processes starting together neither race on CREATE nor migrate twice. A ledger created by
    0.1.0 is upgraded in place. Returns the revision now in the database, as a number.

    Example::

        initdb("postgresql://postgres@127.0.0.1/test")
    """
    engine = db.get_engine(url)
    schema = db.ledger_schema()
    with engine.begin() as conn:
        # One initdb at a time (two workers starting together must not race on CREATE).
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('dataloader.initdb'))"))
        state = ledger_state(conn)
        if state.current is not None and not state.up_to_date:
            problem = state.problem()
            if problem and "newer than this code" in problem:
                raise LedgerNotReady(problem, found=state.current, expected=state.head)
        conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        from alembic import command

        command.upgrade(_alembic_config(conn), "head")
        return int(head_revision())


def check(url: str | None = None) -> LedgerState:
    """The ledger's state against this code (``dataloader initdb --check``).

    Raises TransientDbError / PermanentDbError when the database cannot be asked.
    """
    try:
        with db.get_engine(url).connect() as conn:
            return ledger_state(conn)
    except sa.exc.DBAPIError as exc:
        raise db.wrap_db_error(exc) from exc


def check_ready(url: str | None = None) -> None:
    """Raise LedgerNotReady, saying which command to run, when the ledger is missing or behind.

    Workers and the console call it before they start: code newer than its ledger would write
    states or columns the ledger does not have.

    Example::

        check_ready()  # LedgerNotReady: ... run `dataloader initdb` to upgrade it
    """
    state = check(url)
    problem = state.problem()
    if problem is not None:
        raise LedgerNotReady(problem, found=state.current, expected=state.head)
