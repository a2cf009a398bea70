"""One way to the database per process: the pool SQLAlchemy borrows from, its session limits, the ledger's names."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from loader import db, planning
from loader.ledger import batches, metadata, runs


@pytest.fixture
def console_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as a console: a fresh pool of ETL_DB_POOL_SIZE connections, reads under a timeout."""
    monkeypatch.setenv("ETL_DB_POOL_SIZE", "2")
    db.close_all()
    db.set_read_timeout(0.25)
    try:
        yield
    finally:
        db.set_read_timeout(None)
        db.close_all()


def test_sqlalchemy_reads_and_psycopg_connections_share_one_pool_of_etl_db_pool_size(
        ledger: str, pg: psycopg.Connection, console_pool: None) -> None:
    """Six threads reading through both APIs at once use two backends in all: the same two."""
    count = sql.SQL("SELECT pg_backend_pid(), count(*) FROM {}").format(db.ledger_table("runs"))
    seen: dict[str, set[int]] = {"sqlalchemy": set(), "psycopg": set()}
    alive: set[int] = set()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def read(i: int) -> None:
        try:
            start.wait()
            for k in range(20):
                if (i + k) % 2:
                    with db.get_engine().connect() as conn:
                        pid = conn.execute(sa.select(sa.func.pg_backend_pid(), sa.func.count())
                                           .select_from(runs)).one()[0]
                        seen["sqlalchemy"].add(pid)
                else:
                    with db.connection() as conn:
                        row = conn.execute(count).fetchone()
                        assert row is not None
                        seen["psycopg"].add(row[0])
                alive.update(r[0] for r in pg.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'dataloader' "
                    "AND pid = ANY(%s)", [list(seen["sqlalchemy"] | seen["psycopg"])]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(seen["sqlalchemy"] | seen["psycopg"]) <= 2, seen
    assert seen["sqlalchemy"] & seen["psycopg"], seen  # the same backends serve both APIs
    assert len(alive) <= 2
    assert db.get_pool().get_stats()["pool_size"] <= 2


def _session(conn: psycopg.Connection) -> tuple[int, str, str]:
    row = conn.execute("SELECT pg_backend_pid(), current_setting('statement_timeout'), "
                       "current_setting('max_parallel_workers_per_gather')").fetchone()
    assert row is not None
    return row


def test_a_read_gives_its_connection_back_idle_and_a_write_borrowing_it_runs_without_the_read_limit(
        ledger: str, pg: psycopg.Connection, console_pool: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console's reads run under its statement timeout and leave no transaction open; Start, Retry
    and Cancel borrowing the same session get autocommit and the writes' limits back."""
    monkeypatch.setenv("ETL_DB_POOL_SIZE", "1")  # one session: every borrow below is the same one
    monkeypatch.setenv("ETL_STATEMENT_TIMEOUT", "7")
    db.close_all()
    read = sa.text("SELECT pg_backend_pid(), current_setting('statement_timeout'), "
                   "current_setting('max_parallel_workers_per_gather')")
    with db.get_engine().connect() as conn:
        conn.execute(sa.select(sa.func.count()).select_from(runs)).one()  # opens a transaction
        pid, timeout, parallel = conn.execute(read).one()
    assert (timeout, parallel) == ("250ms", "0")
    state = pg.execute("SELECT state, xact_start FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert state == ("idle", None)
    pool = db.get_pool()
    lent = pool.getconn()
    try:
        assert lent.autocommit  # given back as the pool lends it
    finally:
        pool.putconn(lent)
    with db.connection() as conn:
        assert conn.autocommit
        same, timeout, parallel = _session(conn)
        assert (same, timeout) == (pid, "7s") and parallel != "0"
        with conn.transaction():
            conn.execute("SELECT 1")
    with db.get_engine().connect() as conn:
        assert tuple(conn.execute(read).one()) == (pid, "250ms", "0")
    with db.get_engine().connect() as conn, pytest.raises(sa.exc.OperationalError) as info:
        conn.execute(sa.text("SELECT pg_sleep(2)"))
    assert "statement timeout" in str(db.wrap_db_error(info.value))


def test_ledger_table_names_only_the_tables_loader_ledger_declares(ledger: str) -> None:
    for name in metadata.tables:
        assert db.ledger_table(name) == sql.Identifier(ledger, name)
    declared = ", ".join(sorted(metadata.tables))
    with pytest.raises(ValueError, match=f"^no ledger table 'run': loader/ledger.py declares {declared}$"):
        db.ledger_table("run")


def test_a_ledger_statement_is_rendered_once_per_ledger_schema_and_follows_a_change_of_schema(
        ledger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    template = sql.SQL("SELECT {next} FROM {} JOIN {runs} USING (etl_job_id) WHERE etl_run_id = %s")
    text = db.ledger_sql(template, "batches", runs="runs")
    assert text == template.format(db.ledger_table("batches"), runs=db.ledger_table("runs"),
                                   next=db.next_change()).as_bytes(None)
    assert db.ledger_sql(template, "batches", runs="runs") is text  # rendered once
    assert db.ledger_sql(template, "attempts", runs="runs") != text
    monkeypatch.setenv("ETL_LEDGER_SCHEMA", "elsewhere")
    assert db.ledger_sql(template, "batches", runs="runs") == (
        b'SELECT nextval(\'"elsewhere".ledger_change_seq\') FROM "elsewhere"."batches" JOIN "elsewhere"."runs" '
        b"USING (etl_job_id) WHERE etl_run_id = %s")
    with pytest.raises(ValueError, match="no ledger table 'run'"):
        db.ledger_sql(template, "run", runs="runs")


def test_planning_writes_only_batch_columns_the_ledger_declares_and_every_one_it_requires() -> None:
    columns = batches.c
    assert set(planning.BATCH_COLUMNS) <= set(columns.keys())
    required = {c.name for c in columns if not c.nullable and c.server_default is None}
    assert required <= set(planning.BATCH_COLUMNS)


def test_the_session_of_a_killed_process_ends_within_seconds_not_at_its_statements_timeout(ledger: str) -> None:
    """A worker killed while its statement waits (here: a 10-minute sleep; in life a row lock) would leave
    its session, and the locks it holds on the batch's ledger row, until the statement timeout: the client
    check ends it within seconds, so the reconciler can give the batch back as soon as the heartbeat is stale."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from loader import db\n"
            "with db.connection() as conn:\n"
            "    print(conn.execute('SELECT pg_backend_pid()').fetchone()[0], flush=True)\n"
            "    conn.execute('SELECT pg_sleep(600)')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    backend = int(proc.stdout.readline())
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as pg:
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        deadline = time.monotonic() + 10
        while pg.execute(alive + " AND wait_event = 'PgSleep'", [backend]).fetchone() != (1,):
            assert time.monotonic() < deadline, "the statement never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while pg.execute(alive, [backend]).fetchone() == (1,):
            assert time.monotonic() - killed < 3 * db.CLIENT_CHECK_MS / 1000 + 5, "the session outlived its client"
            time.sleep(0.1)
