"""OpenLineage events: sent by real workers and the API to a real HTTP server, valid against the spec."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

import loader
from loader import lineage

from .conftest import ROOT
from .helpers import create_poisoned_target_table, job_name, remove_poison, write_catalog, write_ndjson

pytestmark = [pytest.mark.usefixtures("ledger"), pytest.mark.slow]

SCHEMAS = ROOT / "tests" / "fixtures" / "openlineage"
OUR_FACET = ROOT / "schemas" / "openlineage" / "DataLoaderRunFacet.json"


def _registry() -> Registry:
    resources = []
    for path in [*sorted(SCHEMAS.glob("*.json")), OUR_FACET]:
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


REGISTRY = _registry()
EVENT_SCHEMA = json.loads((SCHEMAS / "OpenLineage.json").read_text())


def check_against_spec(event: dict[str, Any]) -> None:
    """The event against OpenLineage.json, then every facet against the schema its _schemaURL names
    (an unknown schema fails: each facet we send must have its schema vendored)."""
    Draft202012Validator(EVENT_SCHEMA, registry=REGISTRY, format_checker=FormatChecker()).validate(event)
    facet_maps = [event["run"].get("facets", {}), event["job"].get("facets", {})]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        facet_maps += [ds.get("facets") or {}, ds.get("inputFacets") or {}, ds.get("outputFacets") or {}]
    for facets in facet_maps:
        for facet in facets.values():
            Draft202012Validator({"$ref": facet["_schemaURL"]}, registry=REGISTRY,
                                 format_checker=FormatChecker()).validate(facet)


class LineageServer:
    """A real HTTP server on 127.0.0.1 that keeps every event POSTed to it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events.append({"path": self.path, **json.loads(body)})
                self.send_response(201)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, job: str) -> list[dict[str, Any]]:
        return sorted((e for e in self.events if e["job"]["name"] == job), key=lambda e: e["eventTime"])

    def wait_for(self, job: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.of(job)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything beyond ``count`` would be a duplicate: give it time to arrive
        return self.of(job)


@pytest.fixture
def lineage_server(monkeypatch) -> Iterator[LineageServer]:
    server = LineageServer()
    monkeypatch.setenv("OPENLINEAGE_URL", server.url)
    monkeypatch.setenv("OPENLINEAGE_NAMESPACE", "test-ns")
    yield server
    server.server.shutdown()




def make_job(tmp_path: Path, target_schema: str, n: int, **extra: Any) -> tuple[Path, str, Path]:
    name = job_name("ol")
    source = write_ndjson(tmp_path / "data" / f"{name}.ndjson", [{"id": f"k{i}", "v": i} for i in range(n)])
    catalog = write_catalog(tmp_path, {name: {"source": f"data/{name}.ndjson", "target_table": f"{target_schema}.t",
                                              "source_id": "id", **extra}})
    return catalog, name, source


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["eventType"] for e in events]


def test_a_successful_run_sends_start_running_complete_with_one_run_id_the_table_and_its_row_count(
        tmp_path, target_schema, own_queue, own_workers, lineage_server):
    catalog, job, source = make_job(tmp_path, target_schema, 250)
    write_ndjson(source, [{"id": f"k{i}", "v": i} for i in range(240)] + [{"v": 1}] * 5 + ["[1]"] * 5)
    own_workers.start(2)
    ref = loader.start_run(job, catalog=catalog, batch_size=100, actor="ana@example.com")
    contract = loader.wait_for_run(job, ref.etl_run_id, timeout=60)
    assert contract["status"] == "success"

    events = lineage_server.wait_for(job, 3)
    assert types(events) == ["START", "RUNNING", "COMPLETE"]
    for e in events:
        check_against_spec(e)
    assert {e["path"] for e in events} == {"/api/v1/lineage"}
    assert {e["run"]["runId"] for e in events} == {ref.etl_run_id}  # a UUID run id is the runId
    assert {(e["job"]["namespace"], e["job"]["name"]) for e in events} == {("test-ns", job)}
    complete = events[-1]
    m = contract["metrics"]
    out = complete["outputs"]
    # Where the test's PostgreSQL is: a TCP host as given, or (the embedded server's Unix socket) localhost.
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(os.environ["DATABASE_URL"])
    host = "localhost" if str(info.get("host", "/")).startswith("/") else info["host"]
    expected = (f"postgres://{host}:{info.get('port', 5432)}", f"{info['dbname']}.{target_schema}.t")
    assert [(o["namespace"], o["name"]) for o in out] == [expected]
    assert out[0]["outputFacets"]["outputStatistics"]["rowCount"] == m["rows_inserted"] + m["rows_updated"] == 240
    (source_ds,) = complete["inputs"]
    assert (source_ds["namespace"], source_ds["name"]) == ("file", str(source.resolve()))
    assertions = {a["assertion"]: a for a in source_ds["inputFacets"]["dataQualityAssertions"]["assertions"]}
    assert (assertions["required_fields"]["success"], assertions["required_fields"]["actual"]) == (False, "5")
    assert (assertions["json_shape"]["success"], assertions["json_shape"]["actual"]) == (False, "5")
    facet = complete["run"]["facets"]["dataloader"]
    assert (facet["etl_run_id"], facet["batch_size"], facet["status"], facet["retry"]) == (ref.etl_run_id, 100,
                                                                                           "success", 0)
    assert facet["metrics"]["rows_inserted"] == 240 and facet["metrics"]["required_field_errors"] == 5
    assert {e["run"]["facets"]["dataloader"]["started_by"] for e in events} == {"ana@example.com"}
    assert "errorMessage" not in complete["run"]["facets"]


def test_a_partial_success_completes_with_its_failed_batches_and_its_retry_is_a_new_run(
        tmp_path, target_schema, pg, own_queue, own_workers, lineage_server):
    catalog, job, source = make_job(tmp_path, target_schema, 300)
    create_poisoned_target_table(pg, f"{target_schema}.t", "k150")
    own_workers.start(2)
    ref = loader.start_run(job, catalog=catalog, batch_size=100, run_id="nightly-1")
    assert loader.wait_for_run(job, ref.etl_run_id, timeout=60)["status"] == "partial_success"
    first = lineage_server.wait_for(job, 3)
    assert types(first) == ["START", "RUNNING", "COMPLETE"]
    run_id = lineage.run_uuid(job, "nightly-1")
    assert {e["run"]["runId"] for e in first} == {run_id} and uuid.UUID(run_id).version == 5
    facet = first[-1]["run"]["facets"]["dataloader"]
    assert (facet["status"], facet["metrics"]["batches_failed"], facet["metrics"]["batches_succeeded"]) == (
        "partial_success", 1, 2)
    assert first[-1]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 200

    remove_poison(pg, f"{target_schema}.t")
    loader.retry_run(job, ref.etl_run_id)
    assert loader.wait_for_run(job, ref.etl_run_id, timeout=60)["status"] == "success"
    retry = lineage_server.wait_for(job, 5)[3:]
    assert types(retry) == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in retry} == {lineage.run_uuid(job, "nightly-1", 1)} != {run_id}
    assert [e["run"]["facets"]["dataloader"]["retry"] for e in retry] == [1, 1]
    assert retry[-1]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 300
    for e in first + retry:
        check_against_spec(e)


def test_a_run_whose_source_is_missing_sends_fail_with_the_error_message(
        tmp_path, target_schema, own_queue, own_workers, lineage_server):
    job = job_name("ol")
    catalog = write_catalog(tmp_path, {job: {"source": "nowhere/a.ndjson", "target_table": f"{target_schema}.t",
                                             "source_id": "id"}})
    own_workers.start(1)
    ref = loader.start_run(job, catalog=catalog)
    assert loader.wait_for_run(job, ref.etl_run_id, timeout=60)["status"] == "failed"
    events = lineage_server.wait_for(job, 2)
    assert types(events) == ["START", "FAIL"]
    for e in events:
        check_against_spec(e)
    error = events[-1]["run"]["facets"]["errorMessage"]
    assert "nowhere/a.ndjson not found" in error["message"] and error["programmingLanguage"] == "python"
    assert [i["name"] for i in events[-1]["inputs"]] == [str(tmp_path / "nowhere" / "a.ndjson")]
    assert events[-1]["run"]["facets"]["dataloader"]["error_code"] == "source"


def test_a_canceled_run_sends_abort(tmp_path, target_schema, own_queue, lineage_server):
    """No worker serves this queue: the run is still queued when it is canceled."""
    catalog, job, _ = make_job(tmp_path, target_schema, 10)
    ref = loader.start_run(job, catalog=catalog)
    assert loader.cancel_run(job, ref.etl_run_id) == "canceled"
    events = lineage_server.wait_for(job, 2)
    assert types(events) == ["START", "ABORT"]
    for e in events:
        check_against_spec(e)
    assert events[-1]["run"]["facets"]["dataloader"]["status"] == "canceled"


def test_nothing_configured_sends_nothing_and_never_imports_openlineage(tmp_path, target_schema):
    """A whole run in one process with no OPENLINEAGE_* variable and no openlineage.yml."""
    catalog, job, _ = make_job(tmp_path, target_schema, 300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLINEAGE")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    script = f"""
import sys, loader
from loader import lineage, loading, planning, runs
spec = loader.list_jobs({str(catalog)!r}).get({job!r})
ref = runs.create_run(spec, actor="test", batch_size=100)
for b in planning.plan_run(ref.etl_job_id, ref.etl_run_id):
    loading.load_batch(ref.etl_job_id, ref.etl_run_id, b)
print(loader.run_contract(ref.etl_job_id, ref.etl_run_id)["status"], lineage.configured(), lineage._current,
      sorted(m for m in sys.modules if m.startswith("openlineage")))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["success", "False", "None", "[]"]


def wait_until_listening(n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while loader.workers_alive() < n:
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.1)


def test_a_backend_that_never_answers_does_not_slow_a_run_and_logs_one_warning_per_event(
        tmp_path, target_schema, own_queue, own_workers, monkeypatch):
    """A socket that accepts connections and never answers: the worst backend (each send waits its timeout)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    durations: dict[str, float] = {}
    try:
        for label, url in (("none", None), ("silent", f"http://127.0.0.1:{silent.getsockname()[1]}")):
            if url:
                monkeypatch.setenv("OPENLINEAGE_URL", url)
            own_workers.stop()
            own_workers.start(2)
            wait_until_listening(2)  # started and warmed up: the clock measures the run, not worker start-up
            catalog, job, _ = make_job(tmp_path / label, target_schema, 3000, target_table=f"{target_schema}.{label}")
            began = time.monotonic()
            ref = loader.start_run(job, catalog=catalog, batch_size=100)
            assert loader.wait_for_run(job, ref.etl_run_id, timeout=120)["status"] == "success"
            durations[label] = time.monotonic() - began
        # The worker that sent RUNNING and the one that sent COMPLETE each log one warning per event, after
        # their single try timed out (no retries): two warnings in all, whatever the wait.
        deadline = time.monotonic() + 3 * lineage.EMIT_TIMEOUT_SECONDS + 5
        while time.monotonic() < deadline:
            logs = "".join(p.read_text(errors="replace") for p in own_workers.log_dir.glob("worker-*.log"))
            warnings = [line for line in logs.splitlines() if "lineage:" in line]
            if len(warnings) >= 2:
                break
            time.sleep(0.2)
        time.sleep(1)
        logs = "".join(p.read_text(errors="replace") for p in own_workers.log_dir.glob("worker-*.log"))
        warnings = [line for line in logs.splitlines() if "lineage:" in line]
        assert len(warnings) == 2, warnings
        assert all("not sent" in w and "timed out" in w.lower() for w in warnings), warnings
        assert lineage.flush(3 * lineage.EMIT_TIMEOUT_SECONDS)  # this process's START gave up in time too
    finally:
        silent.close()
    print(f"run durations: {durations}")
    assert durations["silent"] < durations["none"] + 1.5, durations
