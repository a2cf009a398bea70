"""`dataloader up`: services, ledger, demo data, workers and the console, stopped together."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

from loader.db import redact
from loader.errors import ServiceError
from loader.hosts import bind_warning

from .services import PROJECT_ROOT, Services, held_services

#: Seconds the console may take to answer its health check after starting.
CONSOLE_START_TIMEOUT = 90.0
#: Seconds a child gets to stop after SIGTERM (a worker finishing its batch) before SIGKILL.
CHILD_STOP_TIMEOUT = 15.0
#: The console page printed for people to open.
CONSOLE_PATH = "/etl/data-loader"


def run_up(port: int = 8501, workers: int = 2, host: str = "127.0.0.1") -> int:
    """Start everything a newcomer needs and keep it running until Ctrl-C or SIGTERM.

    Services come from DATABASE_URL / REDIS_URL or are embedded (see ensure_services); the
    ledger schema is set up (``dataloader initdb``), demo data generated when ``data/orders`` is
    missing, then ``workers`` worker processes and the Streamlit console start. Ctrl-C or SIGTERM
    stops the children (SIGTERM, then SIGKILL after CHILD_STOP_TIMEOUT) and the embedded services,
    returning 0; a child that dies on its own is named, the rest are stopped and 1 is returned.
    Raises ServiceError when the port is taken or a service cannot start. The console listens on
    ``host`` only; an address other than loopback prints ``bind_warning``. Service URLs are printed
    with their passwords masked (``postgresql://etl:***@db/etl``).

    Example::

        $ dataloader up --port 8502 --workers 4
    """
    if workers < 0:
        raise ServiceError(f"--workers must be 0 or more, found {workers}", workers=workers)
    warning = bind_warning(host)
    if warning:
        _say(warning)
    _check_port_free(host, port)
    console_url = f"http://{_url_host(host)}:{port}"
    sup = _Supervisor()
    with sup.signals_caught():
        _say("starting PostgreSQL and Redis (embedded unless DATABASE_URL / REDIS_URL are set)")
        with held_services() as services:
            _describe(services)
            env = {**os.environ, **services.env(), "PYTHONUNBUFFERED": "1"}
            env.setdefault("ETL_CONSOLE_URL", console_url)
            try:
                code = _run(sup, env, port, workers, host, console_url)
            finally:
                sup.stop_all()
                if services.embedded:
                    _say("stopping the embedded services (unless another `dataloader up` uses them)")
    return code


def _run(sup: _Supervisor, env: dict[str, str], port: int, workers: int, host: str, console_url: str) -> int:
    py = sys.executable
    code = sup.run_step("initdb", [py, "-m", "loader.cli", "initdb"], env)
    if code is None:
        return 0
    if code != 0:
        _say(f"`dataloader initdb` failed (exit {code}); see above")
        return 1

    generator = PROJECT_ROOT / "scripts" / "gen_demo_data.py"
    if not (PROJECT_ROOT / "data" / "orders").is_dir() and generator.is_file():
        _say("generating demo data in data/ (first run only)")
        code = sup.run_step("demo data", [py, str(generator), "--out", str(PROJECT_ROOT / "data")], env)
        if code is None:
            return 0
        if code != 0:
            _say(f"the demo data generator failed (exit {code}); see above")
            return 1

    for n in range(1, workers + 1):
        sup.spawn(f"worker {n}", [py, "-m", "loader.cli", "worker"], env)
    sup.spawn("console", [py, "-m", "streamlit", "run", "Home.py", "--server.port", str(port),
                          "--server.address", host, "--server.headless", "true",
                          "--browser.gatherUsageStats", "false"], env)

    health = f"http://{_url_host(_reachable(host))}:{port}{_base_url_path()}/_stcore/health"
    outcome = sup.wait_until(lambda: _answers(health), CONSOLE_START_TIMEOUT)
    if outcome == "timeout":
        _say(f"the console did not answer {health} within {CONSOLE_START_TIMEOUT:.0f}s; stopping")
        return 1
    if outcome == "ok":
        print(f"\nData Loader console: {console_url}{CONSOLE_PATH}\n(Ctrl-C stops everything)\n",
              flush=True)
        outcome = sup.wait_until(lambda: False, None)
    if outcome == "stop":
        _say(f"received {sup.stop_reason}; stopping")
        return 0
    dead = sup.dead_child
    assert dead is not None
    _say(f"{dead.label} (pid {dead.proc.pid}) exited unexpectedly with code {dead.proc.returncode}; "
         "stopping the others")
    return 1


@dataclass
class _Child:
    label: str
    proc: subprocess.Popen[bytes]


@dataclass
class _Supervisor:
    """The children of `up`, each in its own session so a terminal's Ctrl-C reaches only us.

    Signals only set a flag, checked by the loops: no exception lands in the middle of a
    Popen or of a server start, and the shutdown always runs to the end.
    """

    children: list[_Child] = field(default_factory=list)
    stop_reason: str | None = None
    dead_child: _Child | None = None

    @contextlib.contextmanager
    def signals_caught(self) -> Iterator[None]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_reason = self.stop_reason or signal.Signals(signum).name

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def spawn(self, label: str, argv: Sequence[str], env: dict[str, str]) -> _Child:
        proc = subprocess.Popen(list(argv), cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        child = _Child(label, proc)
        self.children.append(child)
        _say(f"started {label} (pid {proc.pid})")
        return child

    def run_step(self, label: str, argv: Sequence[str], env: dict[str, str]) -> int | None:
        """Run a short command to its end; None when a stop was requested meanwhile."""
        if self.stop_reason:
            return None
        child = self.spawn(label, argv, env)
        while child.proc.poll() is None:
            if self.stop_reason:
                return None
            time.sleep(0.1)
        self.children.remove(child)
        return child.proc.returncode

    def wait_until(self, ready: Callable[[], bool], timeout: float | None) -> str:
        """Poll until ``ready()`` ("ok"), a stop signal ("stop"), a dead child ("dead") or "timeout"."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.stop_reason:
                return "stop"
            for child in self.children:
                if child.proc.poll() is not None:
                    self.dead_child = child
                    return "dead"
            if ready():
                return "ok"
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.25)

    def stop_all(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL what is left."""
        running = [c for c in self.children if c.proc.poll() is None]
        for child in running:
            _signal_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT
        for child in running:
            try:
                child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _say(f"{child.label} (pid {child.proc.pid}) ignored SIGTERM for "
                     f"{CHILD_STOP_TIMEOUT:.0f}s; killing it")
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        for child in self.children:
            _signal_group(child.proc.pid, signal.SIGKILL)  # grandchildren left in the group
        if running:
            _say(f"stopped {', '.join(c.label for c in running)}")
        self.children.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when the console port is taken, naming the way out."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado does: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServiceError(
                    f"port {port} on {host} is already in use (another `dataloader up` or Streamlit?); "
                    f"stop it or choose another port: dataloader up --port {port + 1}",
                    host=host, port=port,
                ) from None
            raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror}", host=host, port=port) from exc


def _base_url_path() -> str:
    """Streamlit's server.baseUrlPath ("/etl" in our .streamlit/config.toml), where health answers too."""
    raw = os.environ.get("STREAMLIT_SERVER_BASE_URL_PATH")
    if raw is None:
        try:
            config = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):
            config = {}
        server = config.get("server")
        raw = str(server.get("baseUrlPath", "")) if isinstance(server, dict) else ""
    base = raw.strip().strip("/")
    return f"/{base}" if base else ""


def _reachable(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _answers(url: str) -> bool:
    # Host: localhost, which the console always answers, whatever address it listens on.
    request = urllib.request.Request(url, headers={"Host": "localhost"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _describe(services: Services) -> None:
    for name, url in (("postgresql", services.database_url), ("redis", services.redis_url)):
        origin = "embedded" if name in services.embedded else "from the environment"
        _say(f"{name}: {redact(url)} ({origin})")


def _say(message: str) -> None:
    print(f"[dataloader up] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover - `dataloader up` is the entry point
    sys.exit(run_up())
