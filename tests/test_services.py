"""Embedded PostgreSQL and Redis: started once, reachable from other processes, reused, stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from devstack.services import (
    PROJECT_ROOT,
    Services,
    ensure_services,
    held_services,
    stop_services,
)

SERVICE_VARS = ("DATABASE_URL", "REDIS_URL", "ETL_DATA_DIR")

# Runs in another interpreter: proves the servers are reachable from other processes.
PROBE = """
import json, os, sys
import psycopg, redis
with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS probe (note text)")
    conn.execute("INSERT INTO probe VALUES (%s)", (sys.argv[1],))
    notes = [row[0] for row in conn.execute("SELECT note FROM probe ORDER BY note")]
r = redis.Redis.from_url(os.environ["REDIS_URL"])
r.set("probe", sys.argv[1])
print(json.dumps({"notes": notes, "redis": r.get("probe").decode()}))
"""

ENSURE = """
import json, sys
from pathlib import Path
from devstack.services import ensure_services
s = ensure_services(Path(sys.argv[1]))
print(json.dumps({"db": s.database_url, "redis": s.redis_url, "started": list(s.started)}))
"""


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, check=True)


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])


def redis_pid(data_dir: Path) -> int:
    return int((data_dir / "redis" / "redis.pid").read_text())


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def servers_of(data_dir: Path) -> list[psutil.Process]:
    """Postmasters and redis-servers serving this data folder (to count duplicates)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data_dir) in cmdline and proc.info["name"] in ("postgres", "redis-server"):
            found.append(proc)
    return found


@pytest.fixture(autouse=True, scope="module")
def no_service_env() -> Iterator[None]:
    """As on a fresh machine: no DATABASE_URL, no REDIS_URL."""
    with pytest.MonkeyPatch.context() as mp:
        for name in SERVICE_VARS:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One data folder for the module: initdb runs once."""
    path = tmp_path_factory.mktemp("services")
    yield path
    stop_services(path)


@pytest.fixture()
def fresh_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    stop_services(tmp_path)


def test_started_servers_outlive_the_starting_process_and_other_processes_can_use_them(
    data_dir: Path,
) -> None:
    started = json.loads(python(ENSURE, str(data_dir)).stdout)
    assert started["started"] == ["postgresql", "redis"]
    assert started["db"].startswith("postgresql://postgres@/postgres?host=")
    assert started["redis"] == f"unix://{data_dir}/redis/redis.sock?db=0"

    probe = python(PROBE, "from another process", env={"DATABASE_URL": started["db"],
                                                      "REDIS_URL": started["redis"]})
    assert json.loads(probe.stdout) == {"notes": ["from another process"], "redis": "from another process"}


def test_servers_listen_on_unix_sockets_only(data_dir: Path) -> None:
    services = ensure_services(data_dir)
    for proc in servers_of(data_dir):
        assert [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
    with psycopg.connect(services.database_url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)


def test_a_second_call_reuses_the_running_servers_instead_of_starting_new_ones(data_dir: Path) -> None:
    first = ensure_services(data_dir)
    pids = (postmaster_pid(data_dir), redis_pid(data_dir))

    second = ensure_services(data_dir)

    assert (second.database_url, second.redis_url) == (first.database_url, first.redis_url)
    assert second.embedded == ("postgresql", "redis")
    assert second.started == ()
    assert (postmaster_pid(data_dir), redis_pid(data_dir)) == pids
    assert len(servers_of(data_dir)) == 2


def test_processes_calling_at_the_same_time_share_one_server_of_each_kind(fresh_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE, str(fresh_dir)], env=env, cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]

    assert len({(r["db"], r["redis"]) for r in results}) == 1
    assert sorted(s for r in results for s in r["started"]) == ["postgresql", "redis"]
    assert len(servers_of(fresh_dir)) == 2


def test_servers_killed_by_sigkill_are_restarted_over_their_stale_pid_files_and_keep_the_data(
    data_dir: Path,
) -> None:
    services = ensure_services(data_dir)
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS survivor (n int)")
        conn.execute("INSERT INTO survivor VALUES (42)")
    old = (postmaster_pid(data_dir), redis_pid(data_dir))
    for pid in old:
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
    assert (data_dir / "postgres" / "postmaster.pid").exists()
    assert (data_dir / "redis" / "redis.pid").exists()

    again = ensure_services(data_dir)

    assert again.started == ("postgresql", "redis")
    assert again.database_url == services.database_url
    new = (postmaster_pid(data_dir), redis_pid(data_dir))
    assert all(alive(pid) for pid in new) and set(new).isdisjoint(old)
    with psycopg.connect(again.database_url) as conn:
        assert conn.execute("SELECT n FROM survivor").fetchall() == [(42,)]
    assert redis.Redis.from_url(again.redis_url).ping()


def test_a_pid_file_naming_a_live_unrelated_process_is_treated_as_stale(data_dir: Path) -> None:
    ensure_services(data_dir)
    postmaster_file = data_dir / "postgres" / "postmaster.pid"
    lines = postmaster_file.read_text().splitlines()
    stop_services(data_dir)
    impostor = subprocess.Popen(["sleep", "60"])  # as if the old pid had been reused
    try:
        postmaster_file.write_text("\n".join([str(impostor.pid), *lines[1:]]) + "\n")
        (data_dir / "redis" / "redis.pid").write_text(f"{impostor.pid}\n")

        services = ensure_services(data_dir)

        assert services.started == ("postgresql", "redis")
        assert postmaster_pid(data_dir) != impostor.pid != redis_pid(data_dir)
        assert impostor.poll() is None  # left alone
        with psycopg.connect(services.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        impostor.kill()
        impostor.wait()


def test_stop_services_stops_both_servers_and_a_second_stop_does_nothing(data_dir: Path) -> None:
    services = ensure_services(data_dir)
    pids = (postmaster_pid(data_dir), redis_pid(data_dir))

    stop_services(data_dir)

    for pid in pids:
        assert not alive(pid)
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
    assert not (data_dir / "redis" / "redis.pid").exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(services.database_url, connect_timeout=2)
    stop_services(data_dir)
    assert ensure_services(data_dir).started == ("postgresql", "redis")


def test_stop_services_can_stop_postgresql_alone_and_ensure_services_starts_only_it_again(data_dir: Path) -> None:
    services = ensure_services(data_dir)
    pg_pid, r_pid = postmaster_pid(data_dir), redis_pid(data_dir)

    stop_services(data_dir, only=["postgresql"])

    assert not alive(pg_pid) and alive(r_pid)
    assert redis.Redis.from_url(services.redis_url).ping()
    assert ensure_services(data_dir).started == ("postgresql",)
    assert redis_pid(data_dir) == r_pid
    with pytest.raises(ValueError, match="unknown service 'mysql'"):
        stop_services(data_dir, only=["mysql"])


def test_urls_from_the_environment_are_returned_unchanged_and_nothing_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone@db.example:5433/etl")
    monkeypatch.setenv("REDIS_URL", "redis://cache.example:6380/2")

    services = ensure_services(tmp_path)

    assert services == Services("postgresql://someone@db.example:5433/etl", "redis://cache.example:6380/2")
    assert services.embedded == services.started == ()
    assert list(tmp_path.iterdir()) == []


def test_only_the_service_missing_from_the_environment_is_embedded(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")

    services = ensure_services(data_dir)

    assert services.embedded == ("postgresql",)
    assert services.redis_url == "redis://127.0.0.1:6379/3"
    assert services.database_url.startswith("postgresql://postgres@/postgres?host=")


def test_held_services_stop_when_the_last_living_holder_leaves(data_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from devstack.services import held_services\n"
         "with held_services(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
         str(data_dir)],
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with held_services(data_dir):
            pids = (postmaster_pid(data_dir), redis_pid(data_dir))
        assert all(alive(pid) for pid in pids), "the other holder still uses them"

        holder.kill()  # a holder that dies without cleaning up does not keep them forever
        holder.wait()
        with held_services(data_dir) as services:
            assert services.started == ()
        assert not any(alive(pid) for pid in pids)
    finally:
        holder.kill()
        holder.wait()


def test_a_data_folder_too_deep_for_a_unix_socket_path_still_works(fresh_dir: Path) -> None:
    deep = fresh_dir / ("d" * 60) / ("e" * 60)

    services = ensure_services(deep)

    probe = python(PROBE, "deep", env=services.env())
    assert json.loads(probe.stdout)["redis"] == "deep"
    pids = (postmaster_pid(deep), redis_pid(deep))
    stop_services(deep)
    assert not any(alive(pid) for pid in pids)


def test_services_run_gives_the_command_the_urls_and_returns_its_exit_code(fresh_dir: Path) -> None:
    code = "import os, sys; print(os.environ['DATABASE_URL'], os.environ['REDIS_URL']); sys.exit(3)"
    result = subprocess.run(
        [sys.executable, "-m", "devstack.services", "--data-dir", str(fresh_dir), "run", "--",
         sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, cwd=PROJECT_ROOT, capture_output=True,
        text=True, timeout=120,
    )

    assert result.returncode == 3
    db_url, redis_url = result.stdout.split()
    assert db_url.startswith("postgresql://") and redis_url.startswith("unix://")
    assert servers_of(fresh_dir) == [], "stopped after the command"


def test_services_start_prints_no_password_of_urls_the_environment_gives():
    env = {"DATABASE_URL": "postgresql://etl:S3cret-Db@db.example/etl", "REDIS_URL": "redis://:S3cret-Rd@queue:6379/0"}
    out = python("from devstack.services import main; main(['start'])", env=env).stdout
    assert out.splitlines() == ["# DATABASE_URL from the environment: postgresql://etl:***@db.example/etl",
                                "# REDIS_URL from the environment: redis://:***@queue:6379/0"]


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_dataloader_up_warns_that_anyone_reaching_its_port_can_act_unless_it_listens_on_loopback(host):
    import socket

    with socket.socket() as taken:  # the port is taken: `up` stops right after the warning, starting nothing
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "loader.cli", "up", "--host", host, "--port", str(port)],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"port {port} on {host} is already in use" in out.stderr
    warned = "WARNING: the console listens on 0.0.0.0, not only on this machine, and has no sign-in" in out.stderr
    assert warned is (host == "0.0.0.0")


DISCOVER = """
import json, sys
from loader import config
print(json.dumps({"db": config.database_url(), "redis": config.redis_url(),
                  "devstack_imported": any(m.split(".")[0] == "devstack" for m in sys.modules)}))
"""


def test_another_process_finds_the_embedded_servers_from_the_discovery_file_without_importing_the_local_stack(
    data_dir: Path,
) -> None:
    services = ensure_services(data_dir)

    found = json.loads(python(DISCOVER, env={"ETL_DATA_DIR": str(data_dir)}).stdout)

    assert found == {"db": services.database_url, "redis": services.redis_url, "devstack_imported": False}


def test_stopped_or_vanished_servers_are_not_discovered_and_the_engine_says_how_to_start_them(
    fresh_dir: Path,
) -> None:
    ensure_services(fresh_dir)
    stop_services(fresh_dir)
    assert not (fresh_dir / "services.json").exists()
    # A discovery file a crash left behind, naming servers that are gone.
    (fresh_dir / "services.json").write_text(json.dumps({
        "database_url": f"postgresql://postgres@/postgres?host={fresh_dir}/gone&port=5432",
        "redis_url": f"unix://{fresh_dir}/gone/redis.sock?db=0"}))

    out = subprocess.run([sys.executable, "-m", "loader.cli", "runs"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "ETL_DATA_DIR": str(fresh_dir)})

    assert out.returncode == 1
    assert out.stderr.startswith("error: DATABASE_URL is not set and no `dataloader up` is running here")
