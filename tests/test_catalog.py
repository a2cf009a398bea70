"""The job catalog: every broken case gives one clear message naming the job and key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loader.catalog import load_catalog
from loader.errors import CatalogError, JobNotFound

GOOD = """
[jobs.orders]
description = "Orders"
source = "data/*.ndjson"
target_table = "staging.orders"
source_id = "source_id"
required = ["customer.id", "items"]
batch_size = 500
max_attempts = 3
"""


def catalog(tmp_path, text: str):
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    return load_catalog(path)


def test_a_valid_job_is_read_with_absolute_source_and_split_table(tmp_path):
    spec = catalog(tmp_path, GOOD).get("orders")
    assert spec.source == str(tmp_path / "data/*.ndjson")
    assert (spec.target_schema, spec.target_table) == ("staging", "orders")
    assert spec.required == ("customer.id", "items") and spec.batch_size == 500 and spec.max_attempts == 3


@pytest.mark.parametrize("body, message", [
    ('source = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\nbatchsize = 5',
     "job 'bad': unknown key 'batchsize'; did you mean 'batch_size'?"),
    ('target_table = "s.t"\nsource_id = "id"', "job 'bad': missing key 'source'"),
    ('source = "a.ndjson"\nsource_id = "id"', "job 'bad': missing key 'target_table'"),
    ('source = "a.ndjson"\ntarget_table = "s.t"', "job 'bad': missing key 'source_id'"),
    ('source = "a.ndjson"\ntarget_table = "orders"\nsource_id = "id"', "must be schema.table"),
    ('source = "a.ndjson"\ntarget_table = "s.t\\"; DROP TABLE x; --"\nsource_id = "id"', "must be schema.table"),
    ('source = "a.ndjson"\ntarget_table = "s.t--x"\nsource_id = "id"', "must be schema.table"),
    ('source = "a.ndjson"\ntarget_table = "pg_catalog.t"\nsource_id = "id"', "reserved schema"),
    ('source = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\nbatch_size = 50', "batch_size must be"),
    ('source = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\nmax_attempts = 0', "max_attempts must be"),
    ('source = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\nrequired = "x"', "required must be a list"),
    ('source = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "a..b"', "source_id must be a dotted path"),
    ('source = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\nschema = "missing.json"', "schema file"),
])
def test_a_broken_job_names_job_and_key_and_leaves_valid_jobs_alone(tmp_path, body, message):
    cat = catalog(tmp_path, GOOD + "\n[jobs.bad]\n" + body + "\n")
    assert "orders" in cat.jobs
    with pytest.raises(CatalogError) as err:
        cat.get("bad")
    assert message in str(err.value)


def test_an_invalid_json_schema_is_refused_with_its_problem(tmp_path):
    (tmp_path / "s.json").write_text('{"type": "bogus"}')
    cat = catalog(tmp_path, GOOD + '\n[jobs.bad]\nsource = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\n'
                  'schema = "s.json"\n')
    assert "is not a valid JSON Schema" in str(cat.errors["bad"])


def test_a_schema_file_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "s.json").write_text("{nope")
    cat = catalog(tmp_path, '[jobs.bad]\nsource = "a.ndjson"\ntarget_table = "s.t"\nsource_id = "id"\n'
                  'schema = "s.json"\n')
    assert "is not valid JSON" in str(cat.errors["bad"])


def test_bad_toml_is_one_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="is not valid TOML"):
        catalog(tmp_path, "[jobs.orders\nsource = 1")


def test_a_missing_catalog_file_says_how_to_fix_it(tmp_path):
    with pytest.raises(CatalogError, match="not found \\(set ETL_JOBS_FILE"):
        load_catalog(tmp_path / "nope.toml")


def test_an_unknown_job_lists_the_known_ones(tmp_path):
    with pytest.raises(JobNotFound, match="no job named 'nope'.*jobs: orders"):
        catalog(tmp_path, GOOD).get("nope")


def test_job_names_with_markup_are_refused(tmp_path):
    cat = catalog(tmp_path, '[jobs."<img src=x onerror=alert(1)>"]\nsource = "a.ndjson"\ntarget_table = "s.t"\n'
                  'source_id = "id"\n')
    assert not cat.jobs and "a job name is letters" in str(next(iter(cat.errors.values())))


def test_the_cli_reports_a_broken_catalog_without_a_traceback(tmp_path):
    (tmp_path / "jobs.toml").write_text("[jobs.x\n")
    out = subprocess.run([sys.executable, "-m", "loader.cli", "--catalog", str(tmp_path / "jobs.toml"), "jobs"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("error: job catalog") and "Traceback" not in out.stderr
