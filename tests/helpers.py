"""Small builders for tests: source files and catalogs on disk, target tables in the database, free ports."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql


def write_ndjson(path: Path, records: list[Any], *, gz: bool = False) -> Path:
    """Write records (dicts are dumped as JSON; bytes and str are written as the raw line)."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode())
        else:
            lines.append(json.dumps(r).encode())
    data = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_catalog(folder: Path, jobs: dict[str, dict[str, Any]]) -> Path:
    """A jobs.toml with the given [jobs.NAME] tables (values: str, int, list of str, dict as an inline table)."""
    out = []
    for name, table in jobs.items():
        out.append(f"[jobs.{json.dumps(name)}]")
        for key, value in table.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    path = folder / "jobs.toml"
    path.write_text("\n".join(out))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def job_name(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    """A TCP port nothing listens on at the moment (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_target_table(pg: psycopg.Connection[Any], table: str) -> None:
    """Create the target table ``schema.name`` by hand, as the loader would, before a run loads into it."""
    schema, name = table.split(".")
    pg.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    pg.execute(sql.SQL("CREATE TABLE {} (source_id text PRIMARY KEY, data jsonb NOT NULL, etl_job_id text NOT NULL, "
                       "etl_run_id text NOT NULL, loaded_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, "
                       "etl_run_seq bigint NOT NULL DEFAULT 0, etl_source_pos bigint NOT NULL DEFAULT 0)").format(
                           sql.Identifier(schema, name)))


def create_poisoned_target_table(pg: psycopg.Connection[Any], table: str, source_id: str) -> None:
    """A target table whose trigger refuses ``source_id``: that record's batch fails for good.

    The trigger raises 'poison record' with SQLSTATE 23514 (check_violation, not transient, so
    not retried); ``remove_poison(pg, table)`` lets a retry succeed.
    """
    create_target_table(pg, table)
    schema, name = table.split(".")
    guard = sql.Identifier(schema, f"{name}_poison")
    pg.execute(sql.SQL("""CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.source_id = {} THEN RAISE EXCEPTION 'poison record' USING ERRCODE = '23514'; END IF;
        RETURN NEW; END $$""").format(guard, sql.Literal(source_id)))
    pg.execute(sql.SQL("CREATE TRIGGER poison BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
        sql.Identifier(schema, name), guard))


def remove_poison(pg: psycopg.Connection[Any], table: str) -> None:
    """Drop the trigger of ``create_poisoned_target_table``: every record loads again."""
    schema, name = table.split(".")
    pg.execute(sql.SQL("DROP TRIGGER poison ON {}").format(sql.Identifier(schema, name)))


class TcpRelay:
    """Forwards each TCP connection made to ``listen_host``:``port`` (a free port) to ``target``, with two threads
    per connection: a port forward in front of a service. ``thawed`` cleared, every byte is held without closing
    anything (a peer that stopped answering, as a stalled network or a stopped process would)."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1", source: str | None = None) -> None:
        self._upstream = target
        self._source = None if source is None else (source, 0)  # the address its connections come from
        self.thawed = threading.Event()
        self.thawed.set()
        self._open: set[socket.socket] = set()
        self._server = socket.create_server((listen_host, 0))
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, source_address=self._source)
            except OSError:
                client.close()
                continue
            self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.thawed.wait()
                dest.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            dest.close()
            self._open.discard(source)
            self._open.discard(dest)

    def close(self) -> None:
        """Stops accepting (shutdown wakes the thread blocked in accept) and closes the relayed connections."""
        self.thawed.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for conn in list(self._open):
            with contextlib.suppress(OSError):
                conn.close()
