"""Write tests/fixtures/ledger-0.1.0.sql: a ledger as the 0.1.0 code left it, for the upgrade test.

Run it with the 0.1.0 code on the path, against a real PostgreSQL and Redis::

    git worktree add /tmp/v010 c770723
    PYTHONPATH=/tmp/v010 DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \
        REDIS_URL=redis://127.0.0.1:6379/0 python scripts/make_ledger_fixture.py tests/fixtures/ledger-0.1.0.sql

It creates the ledger (``initdb``), loads two small runs with real workers (a success with one rejected
record, and a partial_success whose batch 1 failed for good), dumps the ledger schema with ``pg_dump
--inserts`` (plain SQL, loadable without psql) and writes the schema's name as ``__LEDGER_SCHEMA__``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

SCHEMA = "ledger_fixture_010"
STAGE = "ledger_fixture_010_stage"
PLACEHOLDER = "__LEDGER_SCHEMA__"


def main(out: Path) -> None:
    url = os.environ["DATABASE_URL"]
    os.environ.update(ETL_LEDGER_SCHEMA=SCHEMA, ETL_QUEUE=f"fixture-{uuid.uuid4().hex[:8]}")
    with psycopg.connect(url, autocommit=True) as pg:
        for name in (SCHEMA, STAGE):
            pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    import loader

    loader.initdb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [{"source_id": f"r{i}", "n": i} for i in range(250)]
        rows[7] = {"n": 7}  # no source_id: rejected, never fails its batch
        (folder / "orders.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "jobs.toml").write_text(
            '[jobs.orders]\nsource = "orders.ndjson"\n'
            f'target_table = "{STAGE}.orders"\nsource_id = "source_id"\nbatch_size = 100\nmax_attempts = 1\n')
        catalog = folder / "jobs.toml"
        first = loader.start_run("orders", catalog=catalog, run_id="fixture-success", batch_size=100)
        _work()
        assert loader.run_contract("orders", first.etl_run_id)["status"] == "success"
        with psycopg.connect(url, autocommit=True) as pg:  # batch 1 (r100..r199) fails for good
            pg.execute(sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                               "IF NEW.source_id = 'r120' THEN RAISE EXCEPTION 'poison record' USING ERRCODE = "
                               "'23514'; END IF; RETURN NEW; END $$").format(sql.Identifier(STAGE, "poison")))
            pg.execute(sql.SQL("CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION "
                               "{}()").format(sql.Identifier(STAGE, "orders"), sql.Identifier(STAGE, "poison")))
        second = loader.start_run("orders", catalog=catalog, run_id="fixture-partial", batch_size=100)
        _work()
        assert loader.run_contract("orders", second.etl_run_id)["status"] == "partial_success"
    loader.db.close_all()
    pg_dump = shutil.which("pg_dump") or "pg_dump"
    dump = subprocess.run([pg_dump, "--schema", SCHEMA, "--inserts", "--no-owner", "--no-privileges",
                           "--no-comments", url], check=True, capture_output=True, text=True).stdout
    lines = [line for line in dump.splitlines() if not line.startswith(("--", "\\", "SET transaction_timeout"))]
    text = "\n".join(line for line in lines if line.strip()).replace(SCHEMA, PLACEHOLDER) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    with psycopg.connect(url, autocommit=True) as pg:
        for name in (SCHEMA, STAGE):
            pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    print(f"wrote {out} ({len(text):,} characters)")


def _work() -> None:
    subprocess.run([sys.executable, "-m", "loader.cli", "worker", "--burst"], check=True, env=os.environ.copy(),
                   capture_output=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
