"""A Streamlit app started for real on a free port, and the headless Chromium that browses it.

Used by the browser tests (tests/ui/conftest.py) and by the console benchmark (bench/console.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..helpers import free_port

#: Debian's Chromium: Playwright drives it, no ``playwright install``.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
#: Seconds a stopped app gets after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0


def launch_chromium(playwright: Any) -> Any:
    """Headless Chromium (CHROMIUM) from a ``sync_playwright()`` context; the caller closes it."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


class StreamlitServer:
    """``python -m streamlit run <script>`` on a free port, answering its health check; ``stop()`` ends it.

    ``base`` is the app's server.baseUrlPath ("/etl" for the console, see .streamlit/config.toml).
    ``address`` is passed as ``--server.address`` (None: none, the config file decides); ``port`` is a free
    one unless given; ``args`` are more options of ``streamlit run`` (``--secrets.files``...).
    ETL_CONSOLE_URL is the app's own URL unless ``env`` names one.
    The app runs in its own session (stopped with its children) and writes to
    ``log_dir/<log_name>-<port>.log``. Raises RuntimeError, naming the log, when the app exits or
    does not answer within ``timeout`` seconds.

    Example::

        server = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache")
        try:
            page.goto(f"{server.url}/etl/data-loader")
        finally:
            server.stop()
    """

    def __init__(self, script: str, cwd: Path, *, log_dir: Path, log_name: str = "console", base: str = "/etl",
                 env: Mapping[str, str] | None = None, timeout: float = 60.0,
                 address: str | None = "127.0.0.1", port: int | None = None, args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        given = {} if env is None else env
        env = {**(os.environ if env is None else env), "ETL_CONSOLE_URL": given.get("ETL_CONSOLE_URL", self.url)}
        where = [] if address is None else ["--server.address", address]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{log_name}-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(self.port),
             "--server.headless", "true", *where, "--browser.gatherUsageStats", "false", *args],
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"streamlit run {script} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:  # urllib.error.URLError included: not listening yet
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"streamlit run {script} did not answer within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        """SIGTERM to the app's process group, SIGKILL after STOP_TIMEOUT; closes the log."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
