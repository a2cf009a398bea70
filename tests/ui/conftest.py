"""Fixtures for the console: a demo catalog, the page under AppTest, the real app on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import job_name, write_catalog, write_ndjson

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages" / "data_loader.py")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Console:
    """The real console (`streamlit run Home.py`) on a free port, stopped in ``stop()``."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**env, "ETL_CONSOLE_URL": self.url}
        (ROOT / ".pytest_cache").mkdir(exist_ok=True)
        self.log = open(ROOT / ".pytest_cache" / f"console-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(self.port),
             "--server.headless", "true", "--server.address", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the console exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/etl/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the console did not answer within 60 s; see {self.log.name}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def console(demo: Demo, workers) -> Iterator[Console]:
    c = Console(os.environ.copy())
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
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
