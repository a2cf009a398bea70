"""The long fault soak (bench/soak.py), two minutes of it: its own servers, real workers, seeded faults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from loader import config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261130


def soak(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("ETL_")}
    return subprocess.run([sys.executable, "bench/soak.py", "--seed", str(SEED), "--data-dir", str(data_dir),
                           "--keep-services", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)


def test_a_seeded_fault_soak_ends_with_every_run_final_and_the_table_equal_to_the_last_wins_result(tmp_path):
    """Two minutes of overlapping runs on shared keys under worker kills, backend terminations, a PostgreSQL
    restart, Redis restarts, cancels and retries; then every invariant holds, and a row changed behind the
    loader's back is caught by the same checks."""
    from devstack.services import stop_services

    data_dir = tmp_path / "soak"
    try:
        done = soak(data_dir, "--minutes", "2", "--settle", "120")
        out = done.stdout
        assert done.returncode == 0, out[-8000:] + done.stderr[-3000:]
        assert re.search(rf"soak PASSED: seed={SEED} minutes=2.0 runs=\d+ batches=\d+ faults=\d+ checks=(\d+)/\1", out)
        actions = json.loads(re.search(r"actions: (\{.*\})", out).group(1).replace("'", '"'))
        assert actions["restart_postgres"] >= 1 and actions["restart_redis"] >= 2 and actions["kill_worker"] >= 2
        assert actions["start"] >= 10

        url = json.loads((data_dir / "services" / config.DISCOVERY_FILE).read_text())["database_url"]
        with psycopg.connect(url, autocommit=True) as conn:
            (tampered,) = conn.execute(
                "UPDATE soak_stage.items SET data = data || '{\"v\": -1}' WHERE source_id = "
                "(SELECT min(source_id) FROM soak_stage.items) RETURNING source_id").fetchone()
        again = soak(data_dir, "--check-only")
        assert again.returncode == 1, again.stdout[-4000:] + again.stderr[-2000:]
        assert "[FAILED] the staging table equals the last-wins result" in again.stdout
        assert f"      {tampered}: table has" in again.stdout
        assert "soak FAILED" in again.stdout
    finally:
        stop_services(data_dir / "services")
