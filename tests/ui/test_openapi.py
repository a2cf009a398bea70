"""The console's OpenAPI document is true: schemathesis fuzzes every operation against a running console.

A finished run with rejected records and a batch that failed for good is the real data; each operation
is called with generated parameters as they come (mostly unknown jobs and runs: 400 and 404) and again
with the real run's ids in the path (its pages, batches, downloads and events with generated sort,
filter, status and index). Every answer must be of a status, content type and shape the document
declares, and never a 500.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

import loader
from ui.openapi import document

from ..helpers import job_name, write_catalog, write_ndjson
from .app_server import StreamlitServer
from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("ledger")


@pytest.fixture(scope="module")
def served(tmp_path_factory, ledger, workers) -> Iterator[tuple[StreamlitServer, str, str]]:
    """The console serving a finished run: 1,050 records in batches of 100, 7 rejected."""
    folder: Path = tmp_path_factory.mktemp("openapi")
    job = job_name("openapi")
    schema = f"stg_{job.split('-')[1]}"
    records = [{"id": f"o{i}", "customer": {"id": i}} for i in range(1050)]
    for i in range(7):
        del records[i * 100 + 3]["customer"]
    write_ndjson(folder / "d.ndjson", records)
    catalog = write_catalog(folder, {job: {"source": "d.ndjson", "target_table": f"{schema}.t", "source_id": "id",
                                           "required": ["customer.id"]}})
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    assert loader.wait_for_run(job, ref.etl_run_id, timeout=120)["status"] == "success"
    console = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache",
                              env={**os.environ, "ETL_JOBS_FILE": str(catalog)})
    try:
        yield console, job, ref.etl_run_id
    finally:
        console.stop()


@pytest.fixture
def api(served):
    console, _, _ = served
    schema = schemathesis.openapi.from_url(f"{console.url}/etl/data-loader/api/openapi.json", timeout=30)
    schema.config.update(base_url=f"{console.url}/etl/data-loader/api")
    return schema


FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _fuzz(api, real: tuple[str, str] | None) -> list[str]:
    """Every operation of the document, fuzzed; with ``real``, the run's ids replace the generated ones.

    (schemathesis's own pytest integration does not run under pytest 9: each operation is driven here.)
    Every check but "schema-valid data is accepted": a page of more than 1,000 rows, or a sort or filter
    model the grid cannot apply, is a 400 the document declares, not a rule JSON Schema can state.
    """
    seen = []
    for result in api.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")

        @FUZZ
        @given(case=operation.as_strategy())
        def check(case):
            if real and case.path_parameters and "job" in case.path_parameters:
                case.path_parameters["job"], case.path_parameters["run"] = real
            case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])

        check()
    return seen


def test_every_api_operation_answers_as_its_openapi_document_says(api):
    # schemathesis leaves out the operation that serves the document it was loaded from
    assert sorted(_fuzz(api, None)) == sorted(f"GET {path}" for path in document()["paths"] if path != "/openapi.json")


def test_the_openapi_document_describes_every_api_route():
    from ui.routes import API_PATH, PAGE_PATH, routes

    api = PAGE_PATH + "/api"
    served = {r.path.removeprefix(api).replace("{index:int}", "{index}") for r in routes()
              if r.path.startswith(API_PATH) or r.path == api + "/openapi.json"}
    assert served == set(document()["paths"])


def test_every_api_operation_on_a_real_run_answers_as_its_openapi_document_says(api, served):
    _, job, run = served
    assert "GET /runs/{job}/{run}/events" in _fuzz(api, (job, run))
