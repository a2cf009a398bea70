"""Fixtures for the console: a demo catalog, the page under AppTest, the real app on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import job_name, write_catalog, write_ndjson
from .app_server import CHROMIUM, StreamlitServer, launch_chromium

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages" / "data_loader.py")


class Demo:
    """A catalog with one good job (``job``, ``rows`` records, 7 of them invalid) in a temp folder."""

    def __init__(self, folder: Path, target_schema: str, rows: int = 1050) -> None:
        self.job = job_name("console")
        self.rows = rows
        self.invalid = 7
        records = [{"id": f"r{i}", "n": i, "customer": {"id": i % 13}} for i in range(rows)]
        for i in range(self.invalid):
            del records[i * 100 + 5]["customer"]
        write_ndjson(folder / "data" / f"{self.job}.ndjson", records)
        self.catalog = write_catalog(folder, {self.job: {
            "description": "console demo", "source": f"data/{self.job}.ndjson",
            "target_table": f"{target_schema}.items", "source_id": "id", "required": ["customer.id"]}})


@pytest.fixture
def demo(tmp_path: Path, target_schema: str, ledger: str, monkeypatch: pytest.MonkeyPatch) -> Demo:
    d = Demo(tmp_path, target_schema)
    monkeypatch.setenv("ETL_JOBS_FILE", str(d.catalog))
    return d


@pytest.fixture
def idle_queue(monkeypatch: pytest.MonkeyPatch) -> str:
    """A queue no worker listens to: runs started in the test stay in progress (queued)."""
    import uuid

    name = f"idle-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ETL_QUEUE", name)
    return name


@pytest.fixture
def page(demo: Demo):
    """The Data Loader page under Streamlit's AppTest (no browser)."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(PAGE, default_timeout=30)


@pytest.fixture
def console(demo: Demo, workers) -> Iterator[StreamlitServer]:
    """The real console (`streamlit run Home.py`) on a free port, with the demo catalog and workers."""
    c = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()
