"""The `dataloader` command line, run as a user would, against real services and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .helpers import job_name, write_catalog, write_ndjson

pytestmark = pytest.mark.usefixtures("ledger")


def dataloader(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


@pytest.fixture
def job(tmp_path, target_schema):
    name = job_name("cli")
    write_ndjson(tmp_path / "d" / "a.ndjson", [{"id": i, "c": {"id": i}} for i in range(1200)] + [{"id": 5000}])
    catalog = write_catalog(tmp_path, {name: {"source": "d/a.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id", "required": ["c.id"]}})
    return str(catalog), name


def test_start_wait_prints_lineage_then_summary_and_exits_0_on_success(job, workers):
    catalog, name = job
    out = dataloader("--catalog", catalog, "start", name, "--batch-size", "500", "--wait")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"etl_job_id:  {name}" and lines[1].startswith("etl_run_id:  ")
    assert "status:      ✔ success" in out.stdout
    assert "inserted 1,200, updated 0, validated 1,200, rejected 1" in out.stdout
    assert "required field 'c.id' is missing" in out.stdout


def test_status_json_prints_the_contract_with_the_spec_field_names(job, workers):
    catalog, name = job
    started = json.loads(dataloader("--catalog", catalog, "start", name, "--json").stdout)
    assert started["status"] == "queued" and started["batch_size"] == 1000
    deadline = time.monotonic() + 60
    while True:
        contract = json.loads(dataloader("status", name, started["etl_run_id"], "--json").stdout)
        if contract["status"] == "success" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert contract["status"] == "success"
    assert contract["metrics"]["rows_inserted"] == 1200
    assert len(contract["batches"]) == 2


def test_export_writes_the_three_files(job, workers, tmp_path):
    catalog, name = job
    run = json.loads(dataloader("--catalog", catalog, "start", name, "--json", "--wait").stdout)["etl_run_id"]
    logs, metrics, rejects = tmp_path / "l.ndjson", tmp_path / "m.csv", tmp_path / "r.ndjson"
    out = dataloader("export", name, run, "--logs", str(logs), "--metrics", str(metrics), "--rejects", str(rejects))
    assert out.returncode == 0, out.stderr
    assert json.loads(logs.read_text().splitlines()[0])["event"] == "run_queued"
    assert metrics.read_text().splitlines()[-1].startswith(f"run,{name},{run}")
    assert json.loads(rejects.read_text())["line_no"] == 1201


def test_retry_of_a_successful_run_is_refused_with_a_reason(job, workers):
    catalog, name = job
    run = json.loads(dataloader("--catalog", catalog, "start", name, "--json", "--wait").stdout)["etl_run_id"]
    out = dataloader("retry", name, run)
    assert out.returncode == 1
    assert "is success: only a failed or partial_success run can be retried" in out.stderr


def test_unknown_run_is_a_clear_error(job):
    out = dataloader("status", job[1], "no-such-run")
    assert out.returncode == 1 and out.stderr.strip() == f"error: no run 'no-such-run' for job '{job[1]}'"


def test_start_wait_says_so_when_no_worker_listens(job, redis_conn):
    catalog, name = job
    env = os.environ.copy()
    env["ETL_QUEUE"] = f"lonely-{name}"
    proc = subprocess.Popen([sys.executable, "-m", "loader.cli", "--catalog", catalog, "start", name, "--wait"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
    finally:
        proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert "no worker is listening on queue" in err


def test_worker_concurrency_runs_a_pool_that_drains_the_queue_in_burst_mode(job, monkeypatch, redis_conn):
    catalog, name = job
    monkeypatch.setenv("ETL_QUEUE", f"pool-{name}")
    run = json.loads(dataloader("--catalog", catalog, "start", name, "--batch-size", "100", "--json").stdout)
    out = dataloader("worker", "--burst", "--concurrency", "2", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(dataloader("status", name, run["etl_run_id"], "--json").stdout)
    assert status["status"] == "success" and status["metrics"]["batches_succeeded"] == 13


def test_retry_of_named_batches_only_accepts_failed_ones(job, workers):
    catalog, name = job
    run = json.loads(dataloader("--catalog", catalog, "start", name, "--json", "--wait").stdout)["etl_run_id"]
    out = dataloader("retry", name, run, "--batch", "0", "--batch", "1")
    assert out.returncode == 1 and "only a failed or partial_success run can be retried" in out.stderr


def test_dataloader_up_listens_on_127_0_0_1_unless_told_otherwise():
    from loader.cli import build_parser

    assert build_parser().parse_args(["up"]).host == "127.0.0.1"
    assert build_parser().parse_args(["up", "--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.mark.parametrize("error", ["loader", "bug"])
def test_cli_errors_and_tracebacks_never_show_a_service_password(error, monkeypatch, capsys):
    from loader import cli
    from loader.errors import LoaderError

    url = "postgresql://etl:S3cret-Pw@db.example:5432/etl"
    monkeypatch.setenv("DATABASE_URL", url)

    def broken(*args, **kwargs):
        raise (LoaderError if error == "loader" else RuntimeError)(f"cannot reach {url}")

    monkeypatch.setattr(cli, "list_runs", broken)
    assert cli.main(["runs"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach postgresql://etl:***@db.example:5432/etl" in err and "S3cret-Pw" not in err
    assert err.startswith("error: ") if error == "loader" else "Traceback" in err


@pytest.mark.parametrize("missing", ["psutil", "pgserver"])
def test_dataloader_up_without_the_local_extra_says_what_to_install(missing, tmp_path):
    """A production install has no embedded servers: `up` names the extra instead of a traceback."""
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from loader.cli import main; sys.exit(main(['up', '--port', '0', '--workers', '0']))")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "ETL_DATA_DIR": str(tmp_path)})
    assert out.returncode == 1 and "\nerror: " in "\n" + out.stderr, out.stderr
    assert "pip install 'dataloader-console[local]'" in out.stderr and repr(missing) in out.stderr
    assert "Traceback" not in out.stderr
