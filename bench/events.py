"""Event stream benchmark: what following one live 10k-batch run costs, with 1 and with 50 clients.

A synthetic ledger (bench/seed_ledger.py, one 'loading' run of 10,000 batches) in a database of its own
(``BENCH_EVENTS_DB``, default ``bench_events``, created and dropped here, so that PostgreSQL's
counters see only this benchmark); the real console (``streamlit run Home.py``); a changer that
commits one pending batch every 0.2 s, as workers would. For 1 and then 50 clients of
``/etl/data-loader/api/runs/<job>/<run>/events`` over the same window, it reports:

- database transactions per second run for the console (``pg_stat_database`` of the benchmark's
  database, less the changer's own; a look at the run is one or two): the console reads the run once a
  second for all its clients, so this must not grow with the number of clients;
- CPU seconds per second of the console process;
- per client: ``batch`` events received and the lag from a batch's commit to its event (p50, p95,
  max): the stream promises an event within about a second of the commit.

Usage::

    python bench/events.py [--seconds 20] [--clients 50] [--no-append]

Writes the ``## Event stream`` section of BENCHMARKS.md (replacing the one there) unless ``--no-append``.
Needs PostgreSQL (``DATABASE_URL``'s server, default postgresql://postgres@127.0.0.1/test) and Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

_SERVER = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
DB_NAME = os.environ.get("BENCH_EVENTS_DB", "bench_events")
os.environ["DATABASE_URL"] = _SERVER.rsplit("/", 1)[0] + "/" + DB_NAME
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ["ETL_LEDGER_SCHEMA"] = "etl_bench_events"
os.environ.setdefault("ETL_QUEUE", "bench-events")

import psycopg  # noqa: E402
import seed_ledger  # noqa: E402
from console import cpu_seconds, loadavg, start_app  # noqa: E402
from psycopg import sql  # noqa: E402
from report import write_section  # noqa: E402

from loader import db  # noqa: E402

JOB, RUN, BATCHES = "bench-events", "events-10k", 10_000
CHANGE_EVERY = 0.2


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(_SERVER, autocommit=True)


def create_database() -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))


def drop_database() -> None:
    db.close_all()
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))


def transactions() -> int:
    """Transactions of the benchmark's database so far (PostgreSQL's statistics, flushed about once a second)."""
    with _admin() as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                           [DB_NAME]).fetchone()
    return int(row[0]) if row else 0


class Changer(threading.Thread):
    """Commits one pending batch every CHANGE_EVERY seconds (one statement each), recording when."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.committed: dict[int, float] = {}
        self.statements = 0
        with db.connection() as conn:
            self.pending = [r[0] for r in conn.execute(sql.SQL(
                "SELECT batch_index FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'pending' "
                "ORDER BY batch_index").format(db.ledger_table("batches")), [JOB, RUN])]

    def run(self) -> None:
        update = sql.SQL(
            "UPDATE {} SET status = 'succeeded', attempts = 1, rows_inserted = rows_attempted, "
            "rows_validated = rows_attempted, duration_ms = 80, started_at = clock_timestamp(), "
            "committed_at = clock_timestamp(), ended_at = clock_timestamp(), change_seq = {} "
            "WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s").format(
            db.ledger_table("batches"), db.next_change())
        with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
            while not self.stop.is_set() and self.pending:
                index = self.pending.pop(0)
                conn.execute(update, [JOB, RUN, index])
                self.committed[index] = time.monotonic()
                self.statements += 1
                self.stop.wait(CHANGE_EVERY)


class Client(threading.Thread):
    """One follower of the stream: the receive time of each batch event."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.received: dict[int, float] = {}
        self.connected = threading.Event()
        self.error: str | None = None
        self._response: Any = None

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=60) as r:
                self._response = r
                self.connected.set()
                event = data = None
                for raw in r:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif not line and event == "batch" and data:
                        self.received.setdefault(json.loads(data)["index"], time.monotonic())
                        event = data = None
        except Exception as exc:  # noqa: BLE001 - closed by close(), or a failure to report
            self.error = repr(exc)
            self.connected.set()

    def close(self) -> None:
        """End the stream from outside: shut the socket down (closing the response would wait for the
        reading thread, blocked in its read); the reader then sees the end and stops."""
        if self._response is not None:
            with contextlib.suppress(OSError, AttributeError):
                self._response.fp.raw._sock.shutdown(socket.SHUT_RDWR)


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def phase(url: str, clients: int, seconds: float, console_pid: int) -> dict[str, Any]:
    followers = [Client(url) for _ in range(clients)]
    for c in followers:
        c.start()
    for c in followers:
        c.connected.wait(30)
    # The clients' connections (one signature read each) are not the steady state; PostgreSQL counts an
    # idle session's last transactions up to 10 s late (PGSTAT_IDLE_INTERVAL): let them land first.
    time.sleep(12)
    changer = Changer()
    t0, cpu0, tx0 = time.monotonic(), cpu_seconds(console_pid), transactions()
    changer.start()
    time.sleep(seconds)
    changer.stop.set()
    changer.join()
    time.sleep(2)  # the last commits' events arrive; statistics are flushed about once a second
    t1, cpu1, tx1 = time.monotonic(), cpu_seconds(console_pid), transactions()
    for c in followers:
        c.close()
    for c in followers:
        c.join(10)
    lags = [(c.received[i] - at) * 1000 for c in followers for i, at in changer.committed.items() if i in c.received]
    got = [sum(1 for i in changer.committed if i in c.received) for c in followers]
    window = t1 - t0
    return {
        "clients": clients, "seconds": round(window, 1), "commits": len(changer.committed),
        "transactions_per_s": round((tx1 - tx0 - changer.statements) / window, 1),
        "console_cpu_per_s": round((cpu1 - cpu0) / window, 3),
        "events_min": min(got), "events_max": max(got),
        "lag_p50_ms": pct(lags, 50), "lag_p95_ms": pct(lags, 95), "lag_max_ms": max(lags) if lags else None,
        "errors": [c.error for c in followers if c.error and c.received == {}][:3],  # close() ends the others
        "load": loadavg(),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f} ms"

    lines = [
        "## Event stream", "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} ({os.cpu_count()} cores) by "
        "`python bench/events.py`: one live run of 10,000 batches (synthetic ledger), one batch committed every "
        f"{CHANGE_EVERY} s, followed through `/etl/data-loader/api/runs/<job>/<run>/events` by 1 and then 50 "
        "clients. Transactions: the console's, in the benchmark's own database (PostgreSQL's statistics, less "
        "the changer's), per second; one look at a changed run is two (its signature and changed batches, then "
        "its summary).", "",
        "| clients | commits | console transactions/s | console CPU s/s | batch events per client | lag p50 | lag p95 "
        "| lag max | load (1/5/15 min) |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        events = str(r["events_min"]) if r["events_min"] == r["events_max"] else f"{r['events_min']}-{r['events_max']}"
        lines.append(f"| {r['clients']} | {r['commits']} | {r['transactions_per_s']} | {r['console_cpu_per_s']} | "
                     f"{events} of {r['commits']} | {ms(r['lag_p50_ms'])} | {ms(r['lag_p95_ms'])} | "
                     f"{ms(r['lag_max_ms'])} | {r['load']} |")
    lines += ["", "The transactions per second stay the same with 50 clients as with one: every stream of a run "
              "shares one reader per console process (`ui/run_feed.py`). The lag is the feed's one-second look "
              "plus delivery; CPU grows with the clients by what sending the events costs.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    create_database()
    try:
        seed_ledger.seed(JOB, RUN, BATCHES)
        app = start_app("Home.py", ROOT)
        try:
            url = f"{app.url}/etl/data-loader/api/runs/{JOB}/{RUN}/events"
            rows = []
            for n in (1, args.clients):
                rows.append(phase(url, n, args.seconds, app.proc.pid))
                print(json.dumps(rows[-1]), file=sys.stderr)
                time.sleep(12)  # the feed stops after its last client left (LINGER_SECONDS): a fair start
        finally:
            app.stop()
    finally:
        drop_database()
    text = markdown(rows)
    if args.no_append:
        print(text)
    else:
        print(f"wrote the Event stream section of {write_section(text, '## Event stream')}", file=sys.stderr)


if __name__ == "__main__":
    main()
