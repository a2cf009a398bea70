"""The Host check (DNS rebinding) and the console's listening address, on the real console."""

from __future__ import annotations

import http.client
import os
import socket
from base64 import b64encode
from pathlib import Path

import psutil
import pytest

import loader
from loader.errors import ConfigError
from loader.hosts import allowed_hosts, bind_warning, is_loopback, parse_host
from ui.hosts import REFUSED

from ..helpers import job_name, write_catalog, write_ndjson
from .app_server import StreamlitServer

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / ".pytest_cache"
#: Named by the console under test in ETL_ALLOWED_HOSTS and as the host of its ETL_CONSOLE_URL.
EXTRA_HOST = "loader.example.com"
CONSOLE_HOST = "console.example.org"


# -- Host headers, allowed hosts and bind addresses ----------------------------------------------


@pytest.mark.parametrize(("header", "host"), [
    ("localhost", "localhost"), ("LocalHost.:8501", "localhost"), ("localhost:", "localhost"),
    ("127.0.0.1:8501", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"),
    ("[::1]", "[::1]"), ("[::1]:8501", "[::1]"), ("[0:0:0:0:0:0:0:1]:80", "[::1]"), ("[FD00::5]", "[fd00::5]"),
    ("Evil.Example:8501", "evil.example"), ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_host_headers_are_read_in_one_spelling_without_port_case_or_trailing_dot(header, host):
    assert parse_host(header) == host


@pytest.mark.parametrize("header", [
    None, "", " localhost", "localhost ", "::1", "[::1", "[::1]x", "[::1]:80:80", "[fe80::1%eth0]", "[evil.example]",
    "localhost:http", "localhost:123456", "evil.example@127.0.0.1", "evil.example:80@127.0.0.1", "localhost..",
    "evil.example/x", "evil example", "127.0.0.1\t",
])
def test_malformed_host_headers_are_refused(header):
    assert parse_host(header) is None


def test_allowed_hosts_are_loopback_the_console_url_host_and_etl_allowed_hosts(monkeypatch):
    monkeypatch.setenv("ETL_CONSOLE_URL", "https://Console.Example.org:8443/base")
    monkeypatch.setenv("ETL_ALLOWED_HOSTS", " loader.example.com., ::2 ,[fd00::5]:80,10.0.0.5,")
    assert allowed_hosts() == {"localhost", "127.0.0.1", "[::1]", "console.example.org", "loader.example.com",
                               "[::2]", "[fd00::5]", "10.0.0.5"}
    monkeypatch.delenv("ETL_ALLOWED_HOSTS")
    monkeypatch.setenv("ETL_CONSOLE_URL", "http://0.0.0.0:8501")  # where it listens, never a name to answer
    assert allowed_hosts() == {"localhost", "127.0.0.1", "[::1]"}


def test_an_etl_allowed_hosts_entry_that_is_no_host_is_a_config_error_naming_it(monkeypatch):
    monkeypatch.setenv("ETL_ALLOWED_HOSTS", "ok.example, http://bad.example/")
    with pytest.raises(ConfigError, match="'http://bad.example/' is not a host name"):
        allowed_hosts()


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("unix:///tmp/console.sock", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.5", False),
    ("console.example.org", False),
])
def test_only_a_loopback_bind_address_goes_without_the_no_sign_in_warning(address, loopback):
    assert is_loopback(address) is loopback
    warning = bind_warning(address)
    assert (warning is None) is loopback
    if warning:
        assert "anyone who reaches its port" in warning and "no sign-in" in warning


# -- the real console --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ledger, workers) -> tuple[str, str]:
    """A finished run (3 batches, one rejected record) the data routes can serve."""
    folder = tmp_path_factory.mktemp("hosts")
    job = job_name("hosts")
    records: list = [{"id": f"r{i}"} for i in range(250)] + [b"{not json"]
    write_ndjson(folder / "data.ndjson", records)
    catalog = write_catalog(folder, {job: {"source": "data.ndjson", "target_table": f"stg_{job[6:]}.items",
                                           "source_id": "id"}})
    ref = loader.start_run(job, catalog=catalog, batch_size=100)
    assert loader.wait_for_run(job, ref.etl_run_id, timeout=60)["status"] == "success"
    yield job, ref.etl_run_id
    import psycopg
    from psycopg import sql
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(f"stg_{job[6:]}")))


@pytest.fixture(scope="module")
def server(finished_run) -> StreamlitServer:
    env = {**os.environ, "ETL_ALLOWED_HOSTS": EXTRA_HOST, "ETL_CONSOLE_URL": f"https://{CONSOLE_HOST}"}
    s = StreamlitServer("Home.py", ROOT, log_dir=LOGS, log_name="hosts", env=env)
    try:
        yield s
    finally:
        s.stop()


def get(server: StreamlitServer, path: str, host: str) -> tuple[int, bytes]:
    """GET ``path`` from the server with this exact Host header; (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def websocket_status(server: StreamlitServer, host: str) -> int:
    """The status line's code of a websocket handshake on Streamlit's stream with this Host (101: accepted)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        key = b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /etl/_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Protocol: streamlit\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(1024)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def data_paths(job: str, run: str) -> list[str]:
    api = f"/etl/data-loader/api/runs/{job}/{run}"
    return [f"{api}/batches?start=0&end=10", f"{api}/batches/0", f"{api}/version", f"{api}/logs.ndjson",
            f"{api}/metrics.csv", f"{api}/rejects.ndjson", f"{api}/events"]


def test_a_foreign_host_gets_400_and_no_data_from_the_page_and_every_data_route(server, finished_run):
    job, run = finished_run
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "localhost:80@evil"):
        for path in ["/etl/data-loader", "/etl/data-loader/", f"/etl/data-loader/{job}/{run}", "/",
                     "/etl/_stcore/health", "/etl/_stcore/host-config", *data_paths(job, run)]:
            status, body = get(server, path, host)
            assert (status, body) == (400, REFUSED), (host, path)


def test_a_foreign_host_cannot_open_the_websocket(server):
    assert websocket_status(server, "evil.example") == 403
    assert websocket_status(server, f"evil.example:{server.port}") == 403


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", EXTRA_HOST, CONSOLE_HOST])
def test_loopback_names_etl_allowed_hosts_and_the_console_url_host_reach_page_websocket_and_data(
        server, finished_run, host):
    job, run = finished_run
    for spelled in (host, f"{host}:{server.port}"):
        status, page = get(server, "/etl/data-loader", spelled)
        assert status == 200 and b"<html" in page.lower()
        assert get(server, "/etl/_stcore/health", spelled) == (200, b"ok")
        assert websocket_status(server, spelled) == 101
    paths = data_paths(job, run)
    answers = {path: get(server, path, host) for path in paths}
    assert all(status == 200 for status, _ in answers.values()), {p: s for p, (s, _) in answers.items()}
    assert b'"rows"' in answers[paths[0]][1] and b'"version"' in answers[paths[2]][1]
    assert b"{not json" in answers[paths[5]][1]


def listening_addresses(pid: int, port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_streamlit_run_home_without_an_address_listens_on_127_0_0_1_only_and_warns_not(ledger):
    s = StreamlitServer("Home.py", ROOT, log_dir=LOGS, log_name="hosts-default", address=None)
    try:
        assert listening_addresses(s.proc.pid, s.port) == {"127.0.0.1"}
    finally:
        s.stop()
    assert "no sign-in" not in Path(s.log.name).read_text()


def test_streamlit_run_home_on_every_interface_prints_the_no_sign_in_warning_once(ledger):
    s = StreamlitServer("Home.py", ROOT, log_dir=LOGS, log_name="hosts-exposed", address="0.0.0.0")
    try:
        assert listening_addresses(s.proc.pid, s.port) == {"0.0.0.0"}
    finally:
        s.stop()
    log = Path(s.log.name).read_text()
    assert log.count("WARNING: the console listens on 0.0.0.0, not only on this machine, and has no sign-in") == 1
