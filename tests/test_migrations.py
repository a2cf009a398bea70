"""Ledger migrations on a real PostgreSQL: a fresh schema, a 0.1.0 ledger, --check, refusals, two initdb at once."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from psycopg import sql

import loader
from loader import db, ledger

from .conftest import ROOT
from .helpers import free_port, write_catalog, write_ndjson

FIXTURE = Path(__file__).parent / "fixtures" / "ledger-0.1.0.sql"


@pytest.fixture
def schema(monkeypatch: pytest.MonkeyPatch, pg: psycopg.Connection) -> Iterator[str]:
    """A ledger schema of this test's own (ETL_LEDGER_SCHEMA points at it), dropped afterwards."""
    name = f"lg_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ETL_LEDGER_SCHEMA", name)
    yield name
    db.close_all()
    pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))




def load_0_1_0(schema: str) -> None:
    """The ledger 0.1.0 wrote (scripts/make_ledger_fixture.py), in ``schema``."""
    text = FIXTURE.read_text().replace("__LEDGER_SCHEMA__", schema)
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(text)  # type: ignore[arg-type]  # a dump of our own, with our schema name in it


def ledger_rows(pg: psycopg.Connection, schema: str) -> dict[str, list[dict[str, object]]]:
    """Every row of the ledger's run tables, as JSON objects in a stable order."""
    out = {}
    for table in ("runs", "batches", "attempts", "rejects", "events"):
        rows = pg.execute(sql.SQL("SELECT to_jsonb(t) FROM {} t ORDER BY to_jsonb(t)::text").format(
            sql.Identifier(schema, table))).fetchall()
        out[table] = [r[0] for r in rows]
    return out


def dataloader(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader.cli", *args], cwd=ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout)


def test_initdb_creates_an_empty_schema_at_the_newest_revision(schema, pg):
    assert loader.initdb() == int(ledger.head_revision())
    state = ledger.check()
    assert state.up_to_date and state.current == ledger.head_revision() and state.problem() is None
    tables = {r[0] for r in pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema])}
    assert {"runs", "batches", "attempts", "rejects", "events", "workers", "alembic_version"} <= tables
    assert loader.initdb() == int(ledger.head_revision())  # idempotent


def test_initdb_check_says_missing_behind_and_up_to_date_with_exit_codes(schema, pg):
    out = dataloader("initdb", "--check")
    assert out.returncode == 1 and "does not exist yet: run `dataloader initdb`" in out.stderr
    load_0_1_0(schema)
    out = dataloader("initdb", "--check")
    assert out.returncode == 1 and "created by dataloader 0.1.0" in out.stderr
    assert "run `dataloader initdb` to upgrade it" in out.stderr
    out = dataloader("initdb")
    assert out.returncode == 0, out.stderr
    with db.get_engine().begin() as conn:  # back to revision 0001: a ledger one migration behind
        command.downgrade(ledger._alembic_config(conn), "0001")
    out = dataloader("initdb", "--check")
    assert out.returncode == 1 and "is at revision 0001, behind this code" in out.stderr
    assert "run `dataloader initdb` to upgrade it" in out.stderr
    assert dataloader("initdb").returncode == 0
    out = dataloader("initdb", "--check")
    assert out.returncode == 0 and f"ledger schema '{schema}' is up to date" in out.stdout


def test_a_0_1_0_ledger_upgrades_in_place_keeping_its_runs_readable_and_its_jobs_runnable(
        schema, pg, own_queue, own_workers, target_schema, tmp_path):
    load_0_1_0(schema)
    # Read as 0.1.0 wrote them (this code's model has columns that ledger does not have yet).
    before = ledger_rows(pg, schema)
    assert loader.initdb() == int(ledger.head_revision())
    assert dataloader("initdb", "--check").returncode == 0
    after = ledger_rows(pg, schema)
    # Every row kept, every column of it unchanged; the newer columns are added beside them.
    assert {t: [{k: r[k] for k in old[0]} for r in after[t]] for t, old in before.items() if old} == \
        {t: old for t, old in before.items() if old}
    contracts = {run: loader.run_contract("orders", run) for run in ("fixture-success", "fixture-partial")}
    assert contracts["fixture-success"]["status"] == "success"
    assert contracts["fixture-partial"]["status"] == "partial_success"
    assert contracts["fixture-success"]["metrics"]["batches_succeeded"] > 0
    # Nobody recorded who started a 0.1.0 run: said as such, never invented.
    assert contracts["fixture-success"]["started_by"] is None and contracts["fixture-success"]["actions"] == []
    assert len(list(loader.iter_logs_ndjson("orders", "fixture-partial"))) > 0
    write_ndjson(tmp_path / "orders.ndjson", [{"source_id": f"n{i}", "n": i} for i in range(300)])
    catalog = write_catalog(tmp_path, {"orders": {"source": "orders.ndjson", "target_table": f"{target_schema}.orders",
                                                  "source_id": "source_id"}})
    own_workers.start(1)
    ref = loader.start_run("orders", catalog=catalog, batch_size=100)
    c = loader.wait_for_run("orders", ref.etl_run_id, timeout=60)
    assert c["status"] == "success" and c["metrics"]["rows_inserted"] == 300
    assert [r["etl_run_id"] for r in loader.list_runs("orders")][:1] == [ref.etl_run_id]


def test_a_worker_started_on_a_ledger_behind_exits_saying_to_run_initdb(schema, redis_conn):
    load_0_1_0(schema)
    out = dataloader("worker", "--burst")
    assert out.returncode == 1
    assert "created by dataloader 0.1.0" in out.stderr and "run `dataloader initdb`" in out.stderr


def test_the_console_refuses_to_start_on_a_missing_ledger_saying_to_run_initdb(schema):
    out = subprocess.run([sys.executable, "-m", "streamlit", "run", "Home.py", "--server.headless", "true",
                          "--server.port", str(free_port())], cwd=ROOT, env=os.environ.copy(),
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 1
    assert f"the ledger schema '{schema}' does not exist yet: run `dataloader initdb`" in out.stderr


def test_two_initdb_at_once_both_succeed(schema):
    procs = [subprocess.Popen([sys.executable, "-m", "loader.cli", "initdb"], cwd=ROOT, env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], [r[1] for r in results]
    assert ledger.check().up_to_date


def model_differences() -> list[object]:
    """What Alembic's autogenerate finds between loader/ledger.py and the ledger schema, but the
    documented exception: ``change_seq``'s default, ``change_seq.next_value()`` in the model and
    ``nextval('"<schema>".ledger_change_seq'::regclass)`` in the database, which Alembic cannot tell
    equal; its text is checked instead. (Alembic compares no CHECK constraints: tests/test_states.py
    walks the status checks on a real ledger.)"""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    schema = db.ledger_schema()
    with db.get_engine().connect() as conn:
        # The model is schema-less: compare it with the ledger schema as this session's default one.
        conn.execute(sa.text("SELECT set_config('search_path', :s, true)"), {"s": f'"{schema}"'})
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        found = []
        for diff in compare_metadata(context, ledger.metadata):
            change = diff[0] if isinstance(diff, list) else diff
            if change[:2] == ("modify_default", None) and change[3] == "change_seq":
                assert change[5].arg.text == f"nextval('\"{schema}\".ledger_change_seq'::regclass)", change
                assert change[6].arg.sequence is ledger.change_seq, change
                continue
            found.append(diff)
        return found


def test_a_fresh_ledger_matches_the_tables_declared_in_loader_ledger(schema):
    """The model the code reads and writes (loader/ledger.py) and the migrations cannot drift apart."""
    loader.initdb()
    assert model_differences() == []


def test_a_0_1_0_ledger_upgraded_in_place_matches_the_tables_declared_in_loader_ledger(schema):
    load_0_1_0(schema)
    loader.initdb()
    assert model_differences() == []
