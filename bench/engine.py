"""Engine benchmarks: the loader end to end against raw COPY, best-practice and naive upserts, and dlt.

Usage::

    python bench/engine.py [--records N] [--repeat K] [--quick]

Every figure is a median over ``--repeat`` repetitions of rows/s, and every ratio is taken against a
baseline measured in the same repetition (the machine is shared and noisy). The results go to stdout
and to BENCHMARKS.md. Services come from DATABASE_URL / REDIS_URL (defaults: the local ones); the
benchmark uses its own ledger schema, queue and target schemas and drops them when done.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb, set_json_dumps

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DATA = BENCH / ".data"
SCHEMA_FILE = BENCH / "order.schema.json"
VENV_BIN = Path(sys.executable).parent
DATALOADER = str(VENV_BIN / "dataloader") if (VENV_BIN / "dataloader").exists() else "dataloader"

#: Services and names of our own, so the benchmark never touches anyone else's data.
DSN = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1/test"
REDIS = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
LEDGER_SCHEMA = os.environ.get("BENCH_LEDGER_SCHEMA", "etl_bench_engine")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-engine")
TARGET_SCHEMA = os.environ.get("BENCH_TARGET_SCHEMA", "bench_engine")
DLT_DATASET = "bench_engine_dlt"

SEED = 20261127
BATCH_SIZES = (100, 1000, 10000)
WORKER_COUNTS = (1, 2)
#: Rows per transaction of the in-process baselines (the issue's "1000-row transactions").
BASELINE_CHUNK = 1000
#: Issue 18: the records of the small-batch pairing (2 workers against the best practice at the same batch
#: size, pass A), those of the source whose round trips are counted (1 worker under strace), and the largest
#: source of the memory check (``memory_10m``, a stage of its own: about 11 GB of NDJSON).
SMALL_RECORDS = 100_000
SMALL_BATCHES = (100, 1000)
TRACE_RECORDS = 20_000
HUGE_RECORDS = 10_000_000

TARGET_DDL = sql.SQL("""
    CREATE TABLE {} (
        source_id text PRIMARY KEY,
        data jsonb NOT NULL,
        etl_job_id text NOT NULL,
        etl_run_id text NOT NULL,
        loaded_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL
    )""")

UPSERT_FROM_STAGE = sql.SQL("""
    INSERT INTO {} (source_id, data, etl_job_id, etl_run_id, loaded_at, updated_at)
    SELECT source_id, data, %(job)s, %(run)s, now(), now() FROM pg_temp.bench_stage
    ON CONFLICT (source_id) DO UPDATE SET data = EXCLUDED.data, updated_at = now(),
        etl_job_id = EXCLUDED.etl_job_id, etl_run_id = EXCLUDED.etl_run_id""")

UPSERT_VALUES = sql.SQL("""
    INSERT INTO {} (source_id, data, etl_job_id, etl_run_id, loaded_at, updated_at)
    VALUES (%s, %s, %s, %s, now(), now())
    ON CONFLICT (source_id) DO UPDATE SET data = EXCLUDED.data, updated_at = now(),
        etl_job_id = EXCLUDED.etl_job_id, etl_run_id = EXCLUDED.etl_run_id""")


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------- data

FIRST = ("Ada", "Bruno", "Chloé", "Dmitri", "Eva", "Farah", "Gustav", "Hana", "Ivo", "Júlia", "Kenji", "Lena",
         "Mateo", "Nia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tala")
LAST = ("Almeida", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "García", "Horvat", "Ivanova", "Jensen",
        "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Peters", "Rossi", "Schmidt", "Tanaka", "Weber")
CITIES = (("Lisboa", "PT"), ("Berlin", "DE"), ("Paris", "FR"), ("Zagreb", "HR"), ("Oslo", "NO"),
          ("Kraków", "PL"), ("Madrid", "ES"), ("Milano", "IT"), ("Wien", "AT"), ("Gent", "BE"))
STREETS = ("Main Street", "Rua Augusta", "Hauptstraße", "Rue de Rivoli", "Ilica", "Karl Johans gate")
PRODUCTS = ("Espresso beans 1kg", "Ceramic mug", "Pour-over kettle", "Paper filters (100)", "Hand grinder",
            "Milk frother", "Cold brew bottle", "Tea sampler", "Travel tumbler", "Descaling tablets")
COLORS = ("black", "white", "red", "sage", "sand", "navy")
SIZES = ("S", "M", "L", "XL", "one-size")
TAGS = ("gift", "bestseller", "eco", "new", "clearance", "bundle", "fragile", "subscription")
STATUSES = ("new", "paid", "packed", "shipped", "delivered")
WORDS = ("please", "leave", "the", "parcel", "at", "back", "door", "ring", "twice", "call", "before", "delivery",
         "gift", "wrap", "no", "invoice", "in", "box", "thanks")


def _address(rng: random.Random) -> dict[str, Any]:
    city, country = rng.choice(CITIES)
    return {"street": f"{rng.choice(STREETS)} {rng.randint(1, 250)}", "city": city,
            "zip": f"{rng.randint(1000, 99999)}", "country": country}


def make_order(rng: random.Random, i: int) -> dict[str, Any]:
    """One ~1 KB order like a shop export: nested customer, 2-4 items, shipping, payment, totals."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=rng.randrange(300 * 86400))
    items = []
    for _ in range(rng.randint(2, 4)):
        items.append({"sku": f"SKU-{rng.randrange(100000):05d}", "name": rng.choice(PRODUCTS),
                      "qty": rng.randint(1, 5), "unit_price": round(rng.uniform(2, 250), 2),
                      "attributes": {"color": rng.choice(COLORS), "size": rng.choice(SIZES)},
                      "tags": rng.sample(TAGS, 2)})
    subtotal = round(sum(it["qty"] * it["unit_price"] for it in items), 2)
    tax = round(subtotal * 0.21, 2)
    ship = _address(rng)
    return {
        "source_id": f"ord-{i:08d}", "order_id": i + 1, "version": 1,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "updated_at": created.isoformat().replace("+00:00", "Z"),
        "status": rng.choice(STATUSES), "channel": rng.choice(("web", "app", "marketplace")), "currency": "EUR",
        "customer": {"id": f"cus-{rng.randrange(10**7):07d}", "name": f"{first} {last}",
                     "email": f"{first.lower()}.{last.lower()}{rng.randrange(1000)}@example.com".encode(
                         "ascii", "ignore").decode(),
                     "phone": f"+351 9{rng.randrange(10**8):08d}",
                     "loyalty": {"tier": rng.choice(("none", "silver", "gold")), "points": rng.randrange(5000)},
                     "address": _address(rng)},
        "items": items,
        "shipping": {"method": rng.choice(("standard", "express", "pickup")), "cost": rng.choice((0, 4.9, 9.9)),
                     "address": ship},
        "payment": {"method": rng.choice(("card", "paypal", "mbway")), "last4": f"{rng.randrange(10000):04d}",
                    "captured": rng.random() < 0.9},
        "totals": {"subtotal": subtotal, "tax": tax, "total": round(subtotal + tax, 2)},
        "notes": " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) if rng.random() < 0.7 else None,
    }


def change_order(order: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same order, later: new status and timestamps, one quantity changed (pass B)."""
    order["version"] = 2
    order["status"] = rng.choice(("shipped", "delivered", "returned"))
    order["updated_at"] = "2026-11-20T12:00:00Z"
    order["items"][0]["qty"] += 1
    order["payment"]["captured"] = True
    return order


def generate(records: int, *, with_changes: bool) -> tuple[Path, Path | None]:
    """Write (or reuse) the pass A file and, if asked, the pass B file with the same source_ids."""
    DATA.mkdir(parents=True, exist_ok=True)
    a = DATA / f"orders-a-{records}-{SEED}.ndjson"
    b = DATA / f"orders-b-{records}-{SEED}.ndjson" if with_changes else None
    if a.exists() and (b is None or b.exists()):
        return a, b
    log(f"generating {records:,} records into {a.name}" + (f" and {b.name}" if b else ""))
    rng = random.Random(SEED)
    rng_b = random.Random(SEED + 1)
    tmp_a = a.with_suffix(".tmp")
    tmp_b = b.with_suffix(".tmp") if b else None
    with open(tmp_a, "wb") as fa, (open(tmp_b, "wb") if tmp_b else open(os.devnull, "wb")) as fb:
        for i in range(records):
            order = make_order(rng, i)
            fa.write(orjson.dumps(order) + b"\n")
            if b is not None:
                fb.write(orjson.dumps(change_order(order, rng_b)) + b"\n")
    tmp_a.rename(a)
    if b is not None and tmp_b is not None:
        tmp_b.rename(b)
    return a, b


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """The source as the baselines see it: every line read and parsed (orjson)."""
    with open(path, "rb") as f:
        for line in f:
            obj = orjson.loads(line)
            yield obj["source_id"], obj


def chunked(it: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    chunk: list[tuple[str, Any]] = []
    for row in it:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -------------------------------------------------------------------------------------- baselines

def _connect() -> psycopg.Connection[Any]:
    conn = psycopg.connect(DSN, autocommit=True, application_name="dataloader-bench")
    set_json_dumps(orjson.dumps, conn)  # orjson returns bytes: psycopg takes them as they are
    return conn


def _fresh_table(conn: psycopg.Connection[Any], name: str) -> sql.Identifier:
    table = sql.Identifier(TARGET_SCHEMA, name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(TARGET_SCHEMA)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    conn.execute(TARGET_DDL.format(table))
    return table


def run_limit(path: Path, records: int) -> float:
    """One binary COPY of every record into a fresh table of the target's shape; seconds."""
    with _connect() as conn:
        table = _fresh_table(conn, "limit_copy")
        conn.execute("CHECKPOINT")
        now = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor().copy(sql.SQL(
                "COPY {} (source_id, data, etl_job_id, etl_run_id, loaded_at, updated_at) FROM STDIN "
                "(FORMAT BINARY)").format(table)) as copy:
            copy.set_types(["text", "jsonb", "text", "text", "timestamptz", "timestamptz"])
            for sid, obj in read_records(path):
                copy.write_row((sid, Jsonb(obj), "bench_limit", "limit", now, now))
        secs = time.perf_counter() - t0
        _check_count(conn, table, records)
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
    return secs


def run_best(path: Path, records: int, *, fresh: bool, chunk: int = BASELINE_CHUNK) -> float:
    """Per ``chunk`` rows (1000 unless told), one transaction: binary COPY into a temp table, one
    INSERT ... ON CONFLICT."""
    with _connect() as conn:
        table = _fresh_table(conn, "best_practice") if fresh else sql.Identifier(TARGET_SCHEMA, "best_practice")
        conn.execute("CREATE TEMP TABLE bench_stage (source_id text, data jsonb) ON COMMIT DELETE ROWS")
        upsert = UPSERT_FROM_STAGE.format(table)
        params = {"job": "bench_best", "run": "a" if fresh else "b"}
        conn.execute("CHECKPOINT")
        t0 = time.perf_counter()
        for rows in chunked(read_records(path), chunk):
            with conn.transaction():
                with conn.cursor().copy("COPY pg_temp.bench_stage (source_id, data) FROM STDIN (FORMAT BINARY)"
                                        ) as copy:
                    copy.set_types(["text", "jsonb"])
                    for sid, obj in rows:
                        copy.write_row((sid, Jsonb(obj)))
                conn.execute(upsert, params)
        secs = time.perf_counter() - t0
        _check_count(conn, table, records)
    return secs


def run_naive(path: Path, records: int, *, fresh: bool) -> float:
    """``executemany`` of INSERT ... ON CONFLICT in 1000-row transactions (psycopg 3 pipelines it)."""
    with _connect() as conn:
        table = _fresh_table(conn, "naive") if fresh else sql.Identifier(TARGET_SCHEMA, "naive")
        stmt = UPSERT_VALUES.format(table)
        run = "a" if fresh else "b"
        conn.execute("CHECKPOINT")
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            for chunk in chunked(read_records(path), BASELINE_CHUNK):
                with conn.transaction():
                    cur.executemany(stmt, [(sid, Jsonb(obj), "bench_naive", run) for sid, obj in chunk])
        secs = time.perf_counter() - t0
        _check_count(conn, table, records)
    return secs


def _check_count(conn: psycopg.Connection[Any], table: sql.Identifier, records: int) -> None:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    if row is None or row[0] != records:
        raise RuntimeError(f"{table.as_string(conn)} holds {row and row[0]} rows, expected {records}")


# -------------------------------------------------------------------------------------------- dlt

def dlt_available() -> str | None:
    """None when dlt imports; else the error, for BENCHMARKS.md."""
    try:
        import dlt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is reported as it is
        return f"{type(exc).__name__}: {exc}"
    return None


def _dlt_dsn() -> str:
    """dlt insists on a password; a server with trust authentication ignores the one we make up."""
    parts = urlsplit(DSN)
    if parts.password is None:
        user = parts.username or "postgres"
        host = parts.hostname or "127.0.0.1"
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{user}:unused@{host}{port}")
    return urlunsplit(parts)


def run_dlt(path: Path, records: int, *, fresh: bool) -> float:
    """dlt merging the records on source_id, the record kept as one json column ``data``; seconds."""
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    import dlt

    pipelines_dir = DATA / "dlt"
    if fresh:
        shutil.rmtree(pipelines_dir, ignore_errors=True)
        with _connect() as conn:
            for schema in (DLT_DATASET, f"{DLT_DATASET}_staging"):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    with _connect() as conn:
        conn.execute("CHECKPOINT")

    @dlt.resource(name="orders", write_disposition="merge", primary_key="source_id",
                  columns={"data": {"data_type": "json"}})
    def orders() -> Iterator[list[dict[str, Any]]]:
        for chunk in chunked(read_records(path), BASELINE_CHUNK):
            yield [{"source_id": sid, "data": obj} for sid, obj in chunk]

    pipeline = dlt.pipeline(pipeline_name="bench_engine", destination=dlt.destinations.postgres(credentials=_dlt_dsn()),
                            dataset_name=DLT_DATASET, pipelines_dir=str(pipelines_dir), progress=None)
    t0 = time.perf_counter()
    pipeline.run(orders())
    secs = time.perf_counter() - t0
    with _connect() as conn:
        _check_count(conn, sql.Identifier(DLT_DATASET, "orders"), records)
    return secs


# ----------------------------------------------------------------------------------------- engine

def engine_env(catalog: Path) -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONPATH: the workers and the CLI run the code beside this file (a worktree), not whatever checkout
    # the virtualenv's editable install points at.
    env.update(DATABASE_URL=DSN, REDIS_URL=REDIS, ETL_LEDGER_SCHEMA=LEDGER_SCHEMA, ETL_QUEUE=QUEUE,
               ETL_JOBS_FILE=str(catalog), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return env


def write_catalog(files: dict[str, Path | str], name: str = "jobs.toml", by: str = "bench/engine.py") -> Path:
    """One job per source (a file, a glob or a URL), all into the same target table, JSON Schema validation on."""
    lines = [f"# Written by {by}: the benchmark's jobs (one per source).\n"]
    for job, path in files.items():
        lines.append(f"""
[jobs.{job}]
description = "benchmark source {str(path).rsplit("/", 1)[-1]}"
source = "{path}"
target_table = "{TARGET_SCHEMA}.orders"
source_id = "source_id"
required = ["customer.id", "items"]
schema = "{SCHEMA_FILE}"
max_attempts = 4
""")
    catalog = DATA / name
    catalog.write_text("".join(lines))
    return catalog


def _proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, VmHWM kB) of one process; (0, 0) if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        hwm = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
        return cpu, hwm
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0, 0


class Workers:
    """N ``dataloader worker`` processes on the benchmark's queue (each a SimpleWorker: one batch at a time)."""

    def __init__(self, n: int, env: dict[str, str], tag: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(n):
            out = open(DATA / f"worker-{tag}-{i}.log", "ab")  # noqa: SIM115 - closed with the process
            self.procs.append(subprocess.Popen([DATALOADER, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                               cwd=ROOT))
        self._wait_registered(n)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _wait_registered(self, n: int) -> None:
        from redis import Redis
        from rq import Queue, Worker

        redis = Redis.from_url(REDIS)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mine = [w for w in Worker.all(queue=Queue(QUEUE, connection=redis)) if w.pid in self.pids]
            if len(mine) >= n:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"worker {p.pid} exited with {p.returncode}; see {DATA}/worker-*.log")
            time.sleep(0.2)
        raise RuntimeError("workers did not register on the queue within 60 s")

    def stats(self) -> tuple[float, int]:
        """(CPU seconds of all workers, largest VmHWM in kB)."""
        cpu, hwm = 0.0, 0
        for pid in self.pids:
            c, h = _proc_stat(pid)
            cpu += c
            hwm = max(hwm, h)
        return cpu, hwm

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # RQ's warm shutdown
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_engine(env: dict[str, str], job: str, batch_size: int, workers: Workers, records: int,
               *, fresh: bool) -> dict[str, Any]:
    """Time ``dataloader start JOB --batch-size B --wait --json`` (wall) and read the run contract."""
    with _connect() as conn:
        if fresh:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TARGET_SCHEMA, "orders")))
        conn.execute("CHECKPOINT")
    cpu0, _ = workers.stats()
    t0 = time.perf_counter()
    proc = subprocess.run([DATALOADER, "start", job, "--batch-size", str(batch_size), "--wait", "--json"],
                          env=env, cwd=ROOT, capture_output=True)
    secs = time.perf_counter() - t0
    cpu1, hwm = workers.stats()
    try:
        contract = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        raise RuntimeError(f"dataloader start {job} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}") from None
    m = contract["metrics"]
    ok = contract["status"] == "success" and m["rows_validated"] == records and (
        m["rows_inserted"] == records if fresh else m["rows_updated"] == records)
    if not ok:
        log(f"  !! {job} B={batch_size}: status {contract['status']}, metrics {m}")
    return {"secs": secs, "elapsed_s": m["elapsed_ms"] / 1000, "throughput_rps": m["throughput_rps"],
            "status": contract["status"], "ok": ok, "worker_cpu_s": cpu1 - cpu0, "hwm_kb": hwm,
            "inserted": m["rows_inserted"], "updated": m["rows_updated"], "rejected": m["validation_failures"],
            "batch_ms_avg": m["batch_duration_ms_avg"], "run": contract["etl_run_id"]}


def initdb(env: dict[str, str]) -> None:
    subprocess.run([DATALOADER, "initdb"], env=env, cwd=ROOT, check=True, capture_output=True)


# ---------------------------------------------------------------------------------------- profile

def profile_engine(env: dict[str, str], job_a: str, job_b: str, records: int, batch_size: int) -> dict[str, Any]:
    """py-spy (with idle frames) on one worker while it loads pass A then pass B; where the time goes."""
    pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy not found"}
    workers = Workers(1, env, "profile")
    raw = DATA / "profile.raw.txt"
    svg = DATA / "profile.svg"
    try:
        rec = subprocess.Popen([pyspy, "record", "--idle", "--rate", "200", "--format", "raw", "-o", str(raw),
                                "--pid", str(workers.pids[0])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        a = run_engine(env, job_a, batch_size, workers, records, fresh=True)
        b = run_engine(env, job_b, batch_size, workers, records, fresh=False)
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=60)
    finally:
        workers.stop()
    if not raw.exists():
        return {"error": "py-spy wrote nothing: " + (rec.stderr.read().decode(errors="replace") if rec.stderr else "")}
    folded = raw.read_text()
    # A flame graph of the same samples, for people (py-spy's own renderer is not reusable offline).
    _write_flamegraph_svg(folded, svg)
    return {"pass_a": a, "pass_b": b, "summary": summarize_profile(folded), "raw": str(raw), "svg": str(svg)}


#: Where a sample belongs: (function, file) pairs matched against every frame of its stack; the first
#: bucket with a match wins, so the batch's own steps come before the RQ frames that enclose them.
PROFILE_BUCKETS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("validation: orjson parse, required paths, JSON Schema (RecordChecker.check)",
     (("check", "loader/validation.py"),)),
    ("planning the run (reads the source once, writes the batches)", (("plan_run", "loader/planning.py"),)),
    ("queueing the batches (RQ enqueue, pipelined)", (("enqueue_batches", "loader/queue.py"),)),
    ("reading the batch's bytes from the source (read_batch)", (("read_batch", "loader/sources.py"),)),
    # Rows are streamed while they are validated: a chunk's COPY write (StageWriter.flush) and the COPY's
    # end (staging) wait for PostgreSQL to parse the rows; StageWriter.add is the client building them.
    ("upsert: COPY into the temp stage (client + server)", (("copy", "psycopg/cursor.py"),
                                                           ("write", "psycopg/_copy.py"),
                                                           ("__exit__", "psycopg/_copy.py"),
                                                           ("flush", "loader/upsert.py"),
                                                           ("staging", "loader/upsert.py"))),
    ("upsert: build the COPY rows (binary format)", (("add", "loader/upsert.py"),
                                                ("<genexpr>", "loader/upsert.py"))),
    ("upsert: CREATE TEMP + INSERT ... ON CONFLICT (server)", (("upsert_stage", "loader/upsert.py"),
                                                              ("ensure_stage", "loader/upsert.py"))),
    ("ledger: begin batch (UPDATE batches + INSERT attempt)", (("_begin", "loader/loading.py"),)),
    ("ledger: end attempt, events", (("_end_attempt", "loader/loading.py"), ("log_event", "loader/events.py"))),
    ("ledger: finish_run_if_done", (("finish_run_if_done", "loader/loading.py"),)),
    ("ledger: spec, row lock, commit row, COMMIT (in load_batch)", (("load_batch", "loader/loading.py"),)),
    ("pool: getting/returning a connection", (("connection", "loader/db.py"),)),
    ("RQ: job bookkeeping around the task", (("perform_job", "rq/"), ("execute_job", "rq/"),
                                             ("handle_job_success", "rq/"), ("prepare_job_execution", "rq/"),
                                             ("handle_job_failure", "rq/"),
                                             ("handle_execution_ended", "rq/"), ("_finalize_success", "rq/"))),
    ("RQ: waiting for / dequeuing the next job", (("dequeue_job_and_maintain_ttl", "rq/"),)),
)


def _frame_matches(frame: str, fn: str, file: str) -> bool:
    """py-spy names frames ``Class.method (pkg/file.py:line)``."""
    name, _, where = frame.partition(" (")
    return (name == fn or name.endswith("." + fn)) and file in where


def summarize_profile(folded: str) -> dict[str, Any]:
    """Share of the worker's main-thread samples per bucket, and the hottest leaf frames (with line)."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if not stack.startswith("<module>"):  # other threads: heartbeat/reconcile, the pool's workers
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[_short(frames[-1], keep_line=True)] += count
        bucket = "other"
        for name, needles in PROFILE_BUCKETS:
            if any(_frame_matches(frame, fn, file) for frame in frames for fn, file in needles):
                bucket = name
                break
        buckets[bucket] += count
    return {"samples": total,
            "buckets": [(k, v / total) for k, v in buckets.most_common()] if total else [],
            "leaves": [(k, v / total) for k, v in leaves.most_common(15)] if total else []}


def _short(frame: str, keep_line: bool = False) -> str:
    """``fn (/path/to/pkg/file.py:12)`` -> ``fn (pkg/file.py[:12])``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, lineno = where.rpartition(":")
    if not path:
        path, lineno = where, ""
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    short = "/".join(parts[-2:])
    return f"{name} ({short}:{lineno})" if keep_line and lineno else f"{name} ({short})"


def _write_flamegraph_svg(folded: str, out: Path) -> None:
    """A minimal icicle chart of folded stacks (no JavaScript), good enough to see the big blocks."""
    tree: dict[str, Any] = {"n": 0, "c": {}}
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        node = tree
        node["n"] += int(count_text)
        for frame in stack.split(";"):
            node = node["c"].setdefault(_short(frame), {"n": 0, "c": {}})
            node["n"] += int(count_text)
    width, row = 1600.0, 16
    rects: list[str] = []
    depth_max = 0

    def draw(node: dict[str, Any], x: float, depth: int, scale: float) -> None:
        nonlocal depth_max
        for name, child in sorted(node["c"].items()):
            w = child["n"] * scale
            if w >= 1:
                depth_max = max(depth_max, depth)
                pct = 100 * child["n"] / tree["n"]
                label = name if w > 7 * len(name) else name[: max(0, int(w / 7) - 1)]
                esc = label.replace("&", "&amp;").replace("<", "&lt;")
                title = name.replace("&", "&amp;").replace("<", "&lt;")
                hue = 20 + (hash(name) % 40)
                rects.append(f'<g><title>{title} {pct:.1f}%</title><rect x="{x:.1f}" y="{depth * row}" '
                             f'width="{w:.1f}" height="{row - 1}" fill="hsl({hue},80%,60%)"/>'
                             f'<text x="{x + 2:.1f}" y="{depth * row + 12}" font-size="11">{esc}</text></g>')
                draw(child, x, depth + 1, scale)
            x += w

    if tree["n"]:
        draw(tree, 0.0, 0, width / tree["n"])
    out.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{(depth_max + 1) * row}" '
                   f'font-family="monospace">{"".join(rects)}</svg>\n')


# ---------------------------------------------------------------------------------------- machine

def machine(conn_dsn: str) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    with psycopg.connect(conn_dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    pg = str(row[0]) if row else "?"
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    try:
        import dlt

        dlt_version = dlt.__version__
    except Exception:  # noqa: BLE001
        dlt_version = "not installed"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem_kb / 1024 / 1024:.0f} GiB",
            "postgresql": pg, "python": platform.python_version(), "psycopg": psycopg.__version__,
            "dlt": dlt_version, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


# ------------------------------------------------------------------------------------------ main

def timed(store: dict[str, Any], key: str, records: int, fn: Callable[[], float]) -> float:
    """Run one baseline; keep its rows/s and the benchmark process's CPU seconds (the client side)."""
    cpu0 = time.process_time()
    secs = fn()
    cpu = time.process_time() - cpu0
    store["results"].setdefault(key, []).append(records / secs)
    store["cpu"].setdefault(key, []).append(cpu)
    log(f"  {key:<34} {records / secs:>10,.0f} rows/s  ({secs:.1f} s, client CPU {cpu:.1f} s)")
    return records / secs


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


STAGES = ("matrix", "paired", "small", "trips", "memory", "profile", "memory_10m")
#: What runs when --stages is not given: ``memory_10m`` (about 11 GB of data, 10-20 minutes) only when asked.
DEFAULT_STAGES = ("matrix", "paired", "small", "memory", "profile")
#: Everything from this line on in BENCHMARKS.md is written by people and kept when the numbers are rewritten.
NOTES_MARKER = "<!-- notes: kept by bench/engine.py when it rewrites the numbers above -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records in the source (default 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="20k records, batch size 1000 only, memory at 20k and 100k: a smoke run")
    parser.add_argument("--mem-records", type=int, default=1_000_000,
                        help="the large source of the memory check (default 1000000)")
    parser.add_argument("--dlt-records", type=int, default=0,
                        help="records for dlt (default: --records; dlt is slow, a smaller source may be used)")
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help="which parts to run: matrix (every method and batch size), paired (best practice "
                             "right before the engine, batch 1000), small (issue 18: batch 100 and 1000 paired "
                             "with the best practice at the same size, the fixed cost per batch), trips (only "
                             "small's round trip count), memory, "
                             "profile, memory_10m (peak RSS at --huge-records; not in the default) "
                             f"(default: {','.join(DEFAULT_STAGES)})")
    parser.add_argument("--small-records", type=int, default=SMALL_RECORDS,
                        help=f"records of the small-batch pairing (default {SMALL_RECORDS})")
    parser.add_argument("--huge-records", type=int, default=HUGE_RECORDS,
                        help=f"the source of the memory_10m stage (default {HUGE_RECORDS})")
    parser.add_argument("--before", help="results.json of the code before a change: its 'small' stage is shown "
                                         "beside this run's as the fixed cost before")
    parser.add_argument("--merge", help="results.json of an earlier run: its stages fill in those not run now")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to write ('-': none)")
    args = parser.parse_args(argv)
    command = "python bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stages = [st.strip() for st in args.stages.split(",") if st.strip()]
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; expected some of {list(STAGES)}")
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    if args.quick:
        args.records = min(args.records, 20_000)
        args.small_records = min(args.small_records, 20_000)
        args.mem_records = min(args.mem_records, 100_000)
        batch_sizes = (1000,)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    n = args.records
    n_dlt = args.dlt_records or n

    mach = machine(DSN)
    log(f"machine: {mach}, load average {loadavg()}")
    path_a, path_b = generate(n, with_changes=True)
    assert path_b is not None
    files: dict[str, Path] = {"bench_a": path_a, "bench_b": path_b}
    dlt_paths = None
    if n_dlt != n:
        da, db = generate(n_dlt, with_changes=True)
        assert db is not None
        dlt_paths = (da, db)
    mem_path: Path | None = None
    if "memory" in stages:
        mem_path, _ = generate(args.mem_records, with_changes=False)
        files["bench_mem_small"] = path_a
        files["bench_mem_large"] = mem_path
    if "small" in stages or "trips" in stages:
        small_path, _ = generate(args.small_records, with_changes=False)
        trace_path, _ = generate(TRACE_RECORDS, with_changes=False)
        files["bench_small"] = small_path
        files["bench_trace"] = trace_path
    if "memory_10m" in stages:
        mem_path_1m, _ = generate(args.mem_records, with_changes=False)
        huge_path, _ = generate(args.huge_records, with_changes=False)
        files["bench_mem_1m"] = mem_path_1m
        files["bench_mem_10m"] = huge_path
    catalog = write_catalog(files)
    env = engine_env(catalog)
    avg_bytes = path_a.stat().st_size / n

    out: dict[str, Any] = {}
    if args.merge:
        out = json.loads(Path(args.merge).read_text())
    meta = out.get("meta", {})
    meta.update(machine=mach, n=n, n_dlt=n_dlt, avg_bytes=avg_bytes, repeat=args.repeat,
                batch_sizes=list(batch_sizes) if "matrix" in stages else meta.get("batch_sizes", list(batch_sizes)))
    meta.setdefault("commands", []).append({"command": command, "stages": stages, "load_start": loadavg(),
                                            "date": mach["date"]})
    out["meta"] = meta
    started = time.monotonic()
    try:
        with _connect() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(TARGET_SCHEMA)))
        initdb(env)
        if "matrix" in stages:
            out["matrix"] = run_matrix(env, args, n, n_dlt, batch_sizes, path_a, path_b, dlt_paths)
        if "paired" in stages:
            out["paired"] = run_paired(env, n, path_a, path_b, args.repeat)
        if "small" in stages:
            log(f"small batches: {args.small_records:,} records, batch {SMALL_BATCHES}, 2 workers paired with "
                f"the best practice at the same batch size; round trips on {TRACE_RECORDS:,}")
            out["small"] = run_small(env, args.small_records, small_path, trace_path, TRACE_RECORDS, args.repeat)
        if "trips" in stages:
            out["trips"] = trace_round_trips(env, trace_path, TRACE_RECORDS)
        if args.before:
            before = json.loads(Path(args.before).read_text())
            out["small_before"] = {**before["small"], "trips": before.get("trips") or before["small"]["trips"],
                                   "commands": [c for c in before["meta"]["commands"] if "small" in c["stages"]]}
        if "memory" in stages and mem_path is not None:
            out["memory"] = run_memory(env, n, args.mem_records)
        if "memory_10m" in stages:
            out["memory_10m"] = measure_memory(env, (("1m", "bench_mem_1m", args.mem_records),
                                                     ("10m", "bench_mem_10m", args.huge_records)))
        if "profile" in stages:
            log("profile: 1 worker, batch 1000, pass A then pass B, py-spy --idle")
            out["profile"] = profile_engine(env, "bench_a", "bench_b", n, 1000)
    finally:
        cleanup()
    meta["commands"][-1].update(load_end=loadavg(), minutes=round((time.monotonic() - started) / 60, 1))
    (DATA / "results.json").write_text(json.dumps(out, default=str, indent=1))
    md = render(out)
    sys.stdout.write(md)
    if args.output != "-":
        target = Path(args.output)
        old = target.read_text() if target.exists() else ""
        kept = [i for i in (old.find(NOTES_MARKER), old.find("\n## Console\n")) if i >= 0]
        if kept:  # the hand-written notes and the console section (bench/console.py) stay
            md += "\n" + old[min(kept):].lstrip("\n")
        target.write_text(md)
        log(f"wrote {args.output} (raw results: {DATA / 'results.json'})")
    return 0


def run_matrix(env: dict[str, str], args: argparse.Namespace, n: int, n_dlt: int, batch_sizes: tuple[int, ...],
               path_a: Path, path_b: Path, dlt_paths: tuple[Path, Path] | None) -> dict[str, Any]:
    """Every method, every batch size and worker count, ``--repeat`` times; ratios within a repetition."""
    store: dict[str, Any] = {"results": {}, "cpu": {}, "ratios": defaultdict(list), "engine": defaultdict(list),
                             "dlt_error": "skipped (--skip-dlt)" if args.skip_dlt else dlt_available()}
    ratios = store["ratios"]
    for rep in range(args.repeat):
        log(f"repetition {rep + 1}/{args.repeat} ({n:,} records)")
        rps: dict[str, float] = {}
        rps["limit"] = timed(store, "limit", n, lambda: run_limit(path_a, n))
        rps["best_a"] = timed(store, "best_a", n, lambda: run_best(path_a, n, fresh=True))
        rps["best_b"] = timed(store, "best_b", n, lambda: run_best(path_b, n, fresh=False))
        rps["naive_a"] = timed(store, "naive_a", n, lambda: run_naive(path_a, n, fresh=True))
        rps["naive_b"] = timed(store, "naive_b", n, lambda: run_naive(path_b, n, fresh=False))
        if store["dlt_error"] is None:
            pa, pb = dlt_paths or (path_a, path_b)
            try:
                rps["dlt_a"] = timed(store, "dlt_a", n_dlt, lambda pa=pa: run_dlt(pa, n_dlt, fresh=True))
                rps["dlt_b"] = timed(store, "dlt_b", n_dlt, lambda pb=pb: run_dlt(pb, n_dlt, fresh=False))
            except Exception as exc:  # noqa: BLE001 - reported in BENCHMARKS.md, the rest goes on
                store["dlt_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                log(f"  dlt failed: {store['dlt_error']}")
        for workers_n in WORKER_COUNTS:
            workers = Workers(workers_n, env, f"w{workers_n}")
            try:
                for b in batch_sizes:
                    for pas, job, fresh in (("a", "bench_a", True), ("b", "bench_b", False)):
                        key = f"engine_{pas}_b{b}_w{workers_n}"
                        r = run_engine(env, job, b, workers, n, fresh=fresh)
                        store["engine"][key].append(r)
                        store["results"].setdefault(key, []).append(n / r["secs"])
                        ratios[key].append(n / r["secs"] / rps[f"best_{pas}"])
                        ratios[key + "_ledger"].append(n / r["elapsed_s"] / rps[f"best_{pas}"])
                        if f"dlt_{pas}" in rps:
                            ratios[key + "_vs_dlt"].append(n / r["secs"] / rps[f"dlt_{pas}"])
                        log(f"  {key:<34} {n / r['secs']:>10,.0f} rows/s  ({r['secs']:.1f} s wall, "
                            f"{r['elapsed_s']:.1f} s in the ledger, worker CPU {r['worker_cpu_s']:.1f} s) "
                            f"= {ratios[key][-1]:.2f} of best")
            finally:
                workers.stop()
        for key in ("best_a", "best_b", "naive_a", "naive_b", "dlt_a", "dlt_b"):
            if key in rps:
                ratios[key + "_vs_limit"].append(rps[key] / rps["limit"])
        for pas in ("a", "b"):
            ratios[f"naive_{pas}_vs_best"].append(rps[f"naive_{pas}"] / rps[f"best_{pas}"])
            if f"dlt_{pas}" in rps:
                ratios[f"dlt_{pas}_vs_best"].append(rps[f"dlt_{pas}"] / rps[f"best_{pas}"])
    return store


def run_paired(env: dict[str, str], n: int, path_a: Path, path_b: Path, repeat: int) -> dict[str, Any]:
    """Batch size 1000: each engine pass right next to a best-practice pass (order alternating), so both
    see the same noise; the ratio of each pair is the figure."""
    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for workers_n in WORKER_COUNTS:
        workers = Workers(workers_n, env, f"paired-w{workers_n}")
        try:
            for rep in range(repeat):
                for pas, job, path, fresh in (("a", "bench_a", path_a, True), ("b", "bench_b", path_b, False)):
                    def best(path: Path = path, fresh: bool = fresh) -> tuple[float, float]:
                        cpu0 = time.process_time()
                        secs = run_best(path, n, fresh=fresh)
                        return n / secs, time.process_time() - cpu0

                    if rep % 2 == 0:
                        best_rps, best_cpu = best()
                        r = run_engine(env, job, 1000, workers, n, fresh=fresh)
                    else:
                        r = run_engine(env, job, 1000, workers, n, fresh=fresh)
                        best_rps, best_cpu = best()
                    pair = {"best_rps": best_rps, "best_cpu_s": best_cpu, "engine_rps": n / r["secs"],
                            "engine_ledger_rps": n / r["elapsed_s"], "engine_cpu_s": r["worker_cpu_s"],
                            "ok": r["ok"], "ratio": n / r["secs"] / best_rps,
                            "ratio_ledger": n / r["elapsed_s"] / best_rps}
                    pairs[f"{pas}_w{workers_n}"].append(pair)
                    log(f"  paired {pas.upper()} w{workers_n} #{rep + 1}: best {best_rps:,.0f} rows/s, engine "
                        f"{n / r['secs']:,.0f} rows/s = {pair['ratio']:.2f} ({pair['ratio_ledger']:.2f} ledger)")
        finally:
            workers.stop()
    return {"repeat": repeat, "pairs": pairs}


def run_small(env: dict[str, str], n: int, path: Path, trace_path: Path, trace_n: int,
              repeat: int) -> dict[str, Any]:
    """Issue 18: the engine with 2 workers paired with the best practice at the same batch size (100, then
    1000; pass A into a fresh table, order alternating), the CPU per batch beyond the data, and the round
    trips per batch counted on one worker.

    The fixed cost per batch is what a batch costs beyond its records: (CPU at batch size 100 - CPU at 1000)
    / (batches at 100 - batches at 1000), the same data either way, for the workers and for the best
    practice's client alike.
    """
    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    workers = Workers(2, env, "small-w2")
    try:
        for rep in range(repeat):
            for b in SMALL_BATCHES:
                def best(b: int = b) -> tuple[float, float]:
                    cpu0 = time.process_time()
                    secs = run_best(path, n, fresh=True, chunk=b)
                    return n / secs, time.process_time() - cpu0

                if rep % 2 == 0:
                    best_rps, best_cpu = best()
                    r = run_engine(env, "bench_small", b, workers, n, fresh=True)
                else:
                    r = run_engine(env, "bench_small", b, workers, n, fresh=True)
                    best_rps, best_cpu = best()
                pair = {"best_rps": best_rps, "best_cpu_s": best_cpu, "engine_rps": n / r["secs"],
                        "engine_cpu_s": r["worker_cpu_s"], "ok": r["ok"], "ratio": n / r["secs"] / best_rps,
                        "ratio_ledger": n / r["elapsed_s"] / best_rps, "batch_ms_avg": r["batch_ms_avg"]}
                pairs[f"b{b}"].append(pair)
                log(f"  small B={b} #{rep + 1}: best {best_rps:,.0f} rows/s, engine (2 workers) {n / r['secs']:,.0f} "
                    f"rows/s = {pair['ratio']:.2f} ({pair['ratio_ledger']:.2f} ledger), worker CPU "
                    f"{r['worker_cpu_s']:.1f} s")
    finally:
        workers.stop()
    small, large = SMALL_BATCHES
    extra = n / small - n / large
    fixed: dict[str, list[float]] = {"engine_cpu_ms": [], "best_cpu_ms": []}
    for p_small, p_large in zip(pairs[f"b{small}"], pairs[f"b{large}"], strict=True):
        fixed["engine_cpu_ms"].append((p_small["engine_cpu_s"] - p_large["engine_cpu_s"]) / extra * 1000)
        fixed["best_cpu_ms"].append((p_small["best_cpu_s"] - p_large["best_cpu_s"]) / extra * 1000)
    return {"records": n, "repeat": repeat, "pairs": pairs, "fixed": fixed,
            "trips": trace_round_trips(env, trace_path, trace_n)}


def trace_round_trips(env: dict[str, str], path: Path, n: int) -> dict[str, Any]:
    """Round trips of one worker's main thread (where batches run) to PostgreSQL and to Redis, counted by
    strace (the socket calls, peer port from ``-yy``), at batch size 100 and 1000 over the same source.

    A round trip is a run of sends on a socket ended by a read that returns data: a pipeline (psycopg sends
    each of its statements with a call of its own, then waits once) is one, a COPY is two (its start, then
    its data and end). The difference between the two batch sizes divided by the extra batches is the
    fixed count per batch, whatever the data and the planning cost.
    """
    strace = shutil.which("strace")
    if strace is None:
        return {"error": "strace not found"}
    ports = {"postgresql": urlsplit(DSN).port or 5432, "redis": urlsplit(REDIS).port or 6379}
    workers = Workers(1, env, "trace")
    counts: dict[int, dict[str, int]] = {}
    try:
        for b in SMALL_BATCHES:
            log_path = DATA / f"strace-b{b}.txt"
            rec = subprocess.Popen([strace, "-qq", "-yy", "-e",
                                    "trace=sendto,sendmsg,write,writev,recvfrom,recvmsg,read", "-o",
                                    str(log_path), "-p", str(workers.pids[0])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            r = run_engine(env, "bench_trace", b, workers, n, fresh=True)
            time.sleep(1.0)  # RQ records the last job's end after the run is final
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=30)
            per_port = count_round_trips(log_path.read_text(errors="replace"))
            counts[b] = {name: per_port[port] for name, port in ports.items()}
            counts[b]["batches"] = -(-n // b)
            log(f"  round trips B={b}: {counts[b]} ({'ok' if r['ok'] else 'run NOT ok'})")
    finally:
        workers.stop()
    small, large = SMALL_BATCHES
    extra = counts[small]["batches"] - counts[large]["batches"]
    return {"records": n, "counts": {str(k): v for k, v in counts.items()},
            "fixed": {name: (counts[small][name] - counts[large][name]) / extra for name in ports},
            "per_batch_small": {name: counts[small][name] / counts[small]["batches"] for name in ports}}


def count_round_trips(trace: str) -> Counter[int]:
    """Round trips per peer port in an strace log (``-yy``): runs of sends each ended by a read with data."""
    trips: Counter[int] = Counter()
    sending: set[int] = set()
    for line in trace.splitlines():
        found = re.match(r"(\w+)\(\d+<\S*?->\S*?:(\d+)\]>.*= (-?\d+)", line)
        if not found:
            continue
        call, port, result = found.group(1), int(found.group(2)), int(found.group(3))
        if call.startswith(("send", "write")):
            sending.add(port)
        elif result > 0 and port in sending:
            sending.discard(port)
            trips[port] += 1
    return trips


def run_memory(env: dict[str, str], n: int, large: int) -> list[dict[str, Any]]:
    """Peak RSS of a fresh worker loading the small and then the large source (batch 1000, pass A)."""
    return measure_memory(env, (("small", "bench_mem_small", n), ("large", "bench_mem_large", large)))


def measure_memory(env: dict[str, str], sources: tuple[tuple[str, str, int], ...]) -> list[dict[str, Any]]:
    """Peak RSS (VmHWM) of a fresh worker per source (label, job, records): batch 1000, pass A."""
    memory = []
    for label, job, records in sources:
        log(f"memory: {records:,} records, batch 1000, 1 fresh worker")
        workers = Workers(1, env, f"mem-{label}")
        try:
            _, hwm_idle = workers.stats()
            r = run_engine(env, job, 1000, workers, records, fresh=True)
        finally:
            workers.stop()
        memory.append({"records": records, "workers": 1, "hwm_idle_kb": hwm_idle, "hwm_kb": r["hwm_kb"],
                       "rps": records / r["secs"], "ok": r["ok"]})
        log(f"  peak RSS {r['hwm_kb'] / 1024:.0f} MiB (idle {hwm_idle / 1024:.0f} MiB), "
            f"{records / r['secs']:,.0f} rows/s")
    return memory


def cleanup() -> None:
    """Drop every schema the benchmark made and its queue's keys in Redis."""
    try:
        with _connect() as conn:
            for schema in (TARGET_SCHEMA, LEDGER_SCHEMA, DLT_DATASET, f"{DLT_DATASET}_staging"):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    except psycopg.Error as exc:
        log(f"cleanup: {exc}")
    try:
        from redis import Redis
        from rq import Queue

        redis = Redis.from_url(REDIS)
        Queue(QUEUE, connection=redis).empty()
        for key in redis.scan_iter(match=f"rq:*:{QUEUE}*"):
            redis.delete(key)
        redis.srem("rq:queues", f"rq:queue:{QUEUE}")
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"cleanup (redis): {exc}")


# ---------------------------------------------------------------------------------------- render

def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def _rps(x: float) -> str:
    return "n/a" if x != x else f"{x:,.0f}"


def _spread(xs: list[float], digits: int = 2) -> str:
    """``median (min–max)``; just the value when there is one."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return _f(xs[0], digits)
    return f"{_f(median(xs), digits)} ({_f(min(xs), digits)}–{_f(max(xs), digits)})"


def render(out: dict[str, Any]) -> str:
    meta = out["meta"]
    mach, n, n_dlt = meta["machine"], meta["n"], meta["n_dlt"]
    lines: list[str] = []
    w = lines.append
    w("# Benchmarks\n\n")
    w("Engine throughput measured side by side with the limit (one raw COPY), a best-practice and a naive upsert "
      "written by hand, and a peer (dlt). Produced by `bench/engine.py` (`make bench`; `pip install -e '.[bench]'` "
      "for dlt). The machine is shared and noisy: rows/s are medians over the repetitions, and every ratio is the "
      "median (min–max) of per-repetition ratios to a baseline measured in the same repetition.\n\n")
    w("## Machine and commands\n\n")
    w(f"- CPU: {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM; PostgreSQL {mach['postgresql']} and "
      f"Redis on the same machine (default configuration)\n")
    w(f"- Python {mach['python']}, psycopg {mach['psycopg']}, dlt {mach['dlt']}\n")
    for c in meta["commands"]:
        w(f"- `{c['command']}` ({', '.join(c['stages'])}), {c['date']}, {c.get('minutes', '?')} min, "
          f"load average {c['load_start']} at the start and {c.get('load_end', '?')} at the end (1-min, "
          f"5-min, 15-min; the 2 cores run PostgreSQL and everything else on the machine too)\n")
    w(f"- Data: {n:,} generated orders (seed {SEED}), {meta['avg_bytes']:.0f} bytes per record on average "
      "(nested customer with address and loyalty, 2-4 items with attributes, shipping, payment, totals), one "
      "NDJSON file per pass; pass B has the same `source_id`s with changed data (status, timestamps, a "
      "quantity). JSON Schema: `bench/order.schema.json` (draft 2020-12, `format` checked), plus "
      "`required = [\"customer.id\", \"items\"]` in the job.\n")
    w("- Pass A loads all-new rows into a freshly dropped table; pass B then loads the same `source_id`s with "
      "changed data (every row is updated). A `CHECKPOINT` precedes every timed pass. The baselines read and "
      "parse the same file (orjson) inside the timing and send `Jsonb(record)` (dumped by orjson), binary COPY; "
      "the engine parses each line only to validate it and sends the line's own JSON text (binary COPY, "
      "streamed in 64 KB chunks while the rest of the batch is validated).\n\n")

    m = out.get("matrix")
    if m:
        res, rat, eng, cpu = m["results"], m["ratios"], m["engine"], m["cpu"]
        batch_sizes = meta["batch_sizes"]
        reps = len(res.get("limit", []))
        w(f"## Throughput ({reps} repetitions)\n\n")
        w("| what | pass | batch | workers | rows/s (median) | × best practice, same pass | × raw COPY | "
          "CPU s per 100k rows (client / worker) |\n")
        w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        lim = median(res["limit"])

        def cpu100k(key: str, records: int = n) -> str:
            return _f(median(cpu[key]) * 100_000 / records, 1) if cpu.get(key) else "-"

        w(f"| limit: one binary COPY (`set_types`) of all rows, no upsert | A | all | 1 conn | {_rps(lim)} | "
          f"{_spread([1 / x for x in rat['best_a_vs_limit']])} | 1.00 | {cpu100k('limit')} |\n")
        for pas in ("a", "b"):
            w(f"| best practice: COPY to a temp table + one `INSERT ... ON CONFLICT DO UPDATE` per 1000-row "
              f"transaction | {pas.upper()} | 1000 | 1 conn | {_rps(median(res[f'best_{pas}']))} | 1.00 | "
              f"{_spread(rat[f'best_{pas}_vs_limit'])} | {cpu100k(f'best_{pas}')} |\n")
        for pas in ("a", "b"):
            w(f"| naive: `executemany` of `INSERT ... ON CONFLICT` per 1000-row transaction (psycopg 3 pipeline "
              f"mode) | {pas.upper()} | 1000 | 1 conn | {_rps(median(res[f'naive_{pas}']))} | "
              f"{_spread(rat[f'naive_{pas}_vs_best'])} | {_spread(rat[f'naive_{pas}_vs_limit'])} | "
              f"{cpu100k(f'naive_{pas}')} |\n")
        if res.get("dlt_a"):
            note = f" ({n_dlt:,} records)" if n_dlt != n else ""
            for pas in ("a", "b"):
                w(f"| dlt `merge` on `source_id`, record in one `json` column{note} | {pas.upper()} | 1000/yield "
                  f"| 1 | {_rps(median(res[f'dlt_{pas}']))} | {_spread(rat[f'dlt_{pas}_vs_best'])} | "
                  f"{_spread(rat[f'dlt_{pas}_vs_limit'])} | {cpu100k(f'dlt_{pas}', n_dlt)} |\n")
        else:
            w(f"| dlt | - | - | - | not measured: {m['dlt_error']} | - | - | - |\n")
        for pas in ("a", "b"):
            for b in batch_sizes:
                for wn in WORKER_COUNTS:
                    key = f"engine_{pas}_b{b}_w{wn}"
                    if key not in res:
                        continue
                    bad = sum(1 for r in eng[key] if not r["ok"])
                    flag = f" ⚠ {bad} run(s) not fully successful" if bad else ""
                    wcpu = median([r["worker_cpu_s"] for r in eng[key]]) * 100_000 / n
                    w(f"| **engine**: `dataloader start --wait`, validation, ledger, RQ{flag} | {pas.upper()} | {b} "
                      f"| {wn} | {_rps(median(res[key]))} | **{_spread(rat[key])}** | "
                      f"{_f(median(res[key]) / lim)} | - / {_f(wcpu, 1)} |\n")
        w("\n")
        w("The engine's rows/s are the wall time of `dataloader start JOB --batch-size B --wait --json`, a new "
          "process (about 0.6 s of interpreter start and imports; `--wait` polls the run's status every 0.1 s): what a "
          "user waits for. Measured by the ledger instead (`elapsed_ms`: the run's start to its completion), the "
          "same runs give:\n\n")
        w("| pass | batch | workers | × best (wall) | × best (ledger elapsed) | avg batch ms |\n")
        w("| --- | ---: | ---: | ---: | ---: | ---: |\n")
        for pas in ("a", "b"):
            for b in batch_sizes:
                for wn in WORKER_COUNTS:
                    key = f"engine_{pas}_b{b}_w{wn}"
                    if key in res:
                        avg = median([float(r["batch_ms_avg"] or 0) for r in eng[key]])
                        w(f"| {pas.upper()} | {b} | {wn} | {_spread(rat[key])} | {_spread(rat[key + '_ledger'])} | "
                          f"{_f(avg, 0)} |\n")
        w("\n")
        if m.get("dlt_error") and res.get("dlt_a"):
            w(f"dlt: {m['dlt_error']}\n\n")

    p = out.get("paired")
    if p:
        w(f"## Batch size 1000, paired with the baseline ({p['repeat']} pairs each)\n\n")
        w("Each engine pass ran right before or after (alternating) a best-practice pass of the same data, so "
          "both saw the same load; the ratio of each pair is the figure.\n\n")
        w("| pass | workers | best practice rows/s | engine rows/s | × best (wall) | × best (ledger elapsed) | "
          "CPU s per 100k rows (baseline client / engine workers) |\n")
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        for key, pairs in p["pairs"].items():
            pas, wn = key.split("_w")
            w(f"| {pas.upper()} | {wn} | {_rps(median([x['best_rps'] for x in pairs]))} | "
              f"{_rps(median([x['engine_rps'] for x in pairs]))} | **{_spread([x['ratio'] for x in pairs])}** | "
              f"{_spread([x['ratio_ledger'] for x in pairs])} | "
              f"{_f(median([x['best_cpu_s'] for x in pairs]) * 100_000 / n, 1)} / "
              f"{_f(median([x['engine_cpu_s'] for x in pairs]) * 100_000 / n, 1)} |\n")
        w("\n")

    render_small(out, w)
    w("## Targets (issue 6, batch size 1000)\n\n")
    for pas in ("a", "b"):
        for wn in WORKER_COUNTS:
            figures = []
            if p and f"{pas}_w{wn}" in p["pairs"]:
                figures.append(("paired", median([x["ratio"] for x in p["pairs"][f"{pas}_w{wn}"]])))
            if m and f"engine_{pas}_b1000_w{wn}" in m["ratios"]:
                figures.append(("matrix", median(m["ratios"][f"engine_{pas}_b1000_w{wn}"])))
            if figures:
                verdict = "met" if all(v >= 0.85 for _, v in figures) else (
                    "not met" if all(v < 0.85 for _, v in figures) else "mixed")
                text = ", ".join(f"{_f(v)} ({k})" for k, v in figures)
                w(f"- Engine ≥ 0.85 × best practice, pass {pas.upper()}, {wn} worker(s): {text}: **{verdict}**\n")
    if m and m["results"].get("dlt_a"):
        for pas in ("a", "b"):
            for wn in WORKER_COUNTS:
                key = f"engine_{pas}_b1000_w{wn}_vs_dlt"
                if m["ratios"].get(key):
                    r = median(m["ratios"][key])
                    note = f" (dlt on {n_dlt:,} records)" if n_dlt != n else ""
                    w(f"- Engine ≥ 6 × dlt, pass {pas.upper()}, {wn} worker(s): {_spread(m['ratios'][key], 1)}×"
                      f"{note}: **{'met' if r >= 6 else 'not met'}**\n")
    else:
        w("- Engine ≥ 6 × dlt: not measured\n")
    memory = out.get("memory") or []
    if len(memory) >= 2:
        small, large = memory[0], memory[-1]
        growth = large["hwm_kb"] / small["hwm_kb"] if small["hwm_kb"] else float("nan")
        w(f"- Peak worker RSS flat from {small['records']:,} to {large['records']:,} records: "
          f"{small['hwm_kb'] / 1024:.0f} MiB → {large['hwm_kb'] / 1024:.0f} MiB (×{_f(growth)}): "
          f"**{'met' if growth <= 1.10 else 'not met'}** (flat = within 10%)\n")
    else:
        w("- Peak worker RSS: not measured\n")
    w("\n")

    if memory:
        w("## Peak worker memory\n\n")
        w("A fresh `dataloader worker` for each size (one worker, batch size 1000, pass A, validation on); peak "
          "RSS is `VmHWM` from `/proc/<pid>/status` after the run. The same worker also planned the run (it reads "
          "the whole source once to cut it into batches).\n\n")
        w("| records | peak RSS before the run (MiB) | peak RSS after the run (MiB) | rows/s | run ok |\n")
        w("| ---: | ---: | ---: | ---: | --- |\n")
        for x in memory:
            w(f"| {x['records']:,} | {x['hwm_idle_kb'] / 1024:.0f} | {x['hwm_kb'] / 1024:.0f} | {_rps(x['rps'])} | "
              f"{'yes' if x['ok'] else 'NO'} |\n")
        w("\n")

    huge = out.get("memory_10m") or []
    if len(huge) >= 2:
        small, large = huge[0], huge[-1]
        growth = large["hwm_kb"] / small["hwm_kb"] if small["hwm_kb"] else float("nan")
        w(f"## Peak worker memory, {small['records']:,} and {large['records']:,} records (issue 18, point 4)\n\n")
        w("`python bench/engine.py --stages memory_10m` (`--mem-records`, `--huge-records`; 1,000,000 and "
          f"10,000,000 unless told): as above, a fresh worker per source, batch size 1000 ({large['records'] // 1000:,} "
          "batches in the larger run).\n\n")
        w("| records | peak RSS before the run (MiB) | peak RSS after the run (MiB) | rows/s | run ok |\n")
        w("| ---: | ---: | ---: | ---: | --- |\n")
        for x in huge:
            w(f"| {x['records']:,} | {x['hwm_idle_kb'] / 1024:.0f} | {x['hwm_kb'] / 1024:.0f} | {_rps(x['rps'])} | "
              f"{'yes' if x['ok'] else 'NO'} |\n")
        w(f"\nPeak worker RSS from {small['records']:,} to {large['records']:,} records: ×{_f(growth)}: "
          f"**{'flat (within 10%)' if growth <= 1.10 else 'not flat'}**\n\n")

    prof = out.get("profile")
    if prof:
        w("## Where the engine's time goes\n\n")
        if "error" in prof:
            w(f"Profile not taken: {prof['error']}\n\n")
        else:
            s = prof["summary"]
            w(f"py-spy (`record --idle --rate 200`) on one worker while it loaded pass A and then pass B at batch "
              f"size 1000 ({s['samples']:,} samples of the worker's main thread, idle included: time waiting on "
              f"PostgreSQL or Redis is counted in the call that waits). Raw folded stacks: "
              f"`bench/.data/profile.raw.txt`; an icicle chart: `bench/.data/profile.svg`.\n\n")
            w("| where (a sample goes to the first matching row) | share of samples |\n| --- | ---: |\n")
            for name, share in s["buckets"]:
                w(f"| {name} | {share * 100:.1f}% |\n")
            w("\n| hottest leaf frames (line = the call that runs, native code included) | share |\n| --- | ---: |\n")
            for name, share in s["leaves"]:
                w(f"| `{name}` | {share * 100:.1f}% |\n")
            w("\n")
    return "".join(lines)


def render_small(out: dict[str, Any], w: Callable[[str], object]) -> None:
    """Issue 18's section: batch size 100 and 1000 paired with the best practice at the same size, and the
    fixed cost per batch (worker CPU, round trips), before and after when ``--before`` gave the earlier run."""
    small = out.get("small")
    if not small:
        return
    n = small["records"]
    w(f"## Small batches, paired with the best practice at the same batch size (issue 18; {small['repeat']} pairs "
      "each)\n\n")
    for c in out["meta"]["commands"]:
        if "small" in c["stages"]:
            w(f"`{c['command']}`, {c['date']}, {c.get('minutes', '?')} min, load average {c['load_start']} at the "
              f"start and {c.get('load_end', '?')} at the end (2 cores, shared with PostgreSQL and other work).\n\n")
    w(f"{n:,} records (pass A into a freshly dropped table, JSON Schema on), the engine with 2 workers right "
      "before or after (alternating) the best practice on one connection: COPY to a temp table + one "
      "`INSERT ... ON CONFLICT DO UPDATE` per transaction of the same batch size. The ratio of each pair is the "
      "figure.\n\n")
    w("| batch | best practice rows/s | engine rows/s (2 workers) | × best, same batch (wall) | × best (ledger "
      "elapsed) | avg batch ms | target |\n")
    w("| ---: | ---: | ---: | ---: | ---: | ---: | --- |\n")
    targets = {"b100": 1.0, "b1000": 1.3}
    for key, pairs in small["pairs"].items():
        ratio = median([x["ratio"] for x in pairs])
        goal = targets.get(key)
        verdict = "-" if goal is None else f"≥ {goal:.1f}: **{'met' if ratio >= goal else 'not met'}**"
        bad = sum(1 for x in pairs if not x["ok"])
        flag = f" ⚠ {bad} run(s) not fully successful" if bad else ""
        w(f"| {key[1:]}{flag} | {_rps(median([x['best_rps'] for x in pairs]))} | "
          f"{_rps(median([x['engine_rps'] for x in pairs]))} | **{_spread([x['ratio'] for x in pairs])}** | "
          f"{_spread([x['ratio_ledger'] for x in pairs])} | "
          f"{_f(median([float(x['batch_ms_avg'] or 0) for x in pairs]), 1)} | {verdict} |\n")
    w("\n### Fixed cost per batch\n\n")
    w("CPU: (CPU at batch size 100 - CPU at 1000) / (batches at 100 - batches at 1000) over the runs above, the "
      "workers' (both, from `/proc`) and the best practice's client. Round trips: those of one worker's main "
      "thread (where batches run) to PostgreSQL and to Redis, counted by strace on "
      f"{(out.get('trips') or small.get('trips', {})).get('records', 0):,} records at batch size 100 and 1000 (a run "
      "of sends on a socket ended by a read that returns data: a pipeline is one, a COPY two). Fixed = the "
      "difference per extra batch; per batch = all at batch size 100 / its batches (planning included).\n\n")
    rows = [("this run", {**small, "trips": out.get("trips") or small.get("trips", {})})]
    before = out.get("small_before")
    if before:
        rows.insert(0, (f"before ({', '.join(c['date'] for c in before.get('commands', []))})", before))
    w("| code | engine worker CPU ms per batch (fixed) | best practice client CPU ms per batch (fixed) | "
      "round trips to PostgreSQL per batch: fixed / all at 100 | round trips to Redis per batch: fixed / all at "
      "100 | × best at batch 100 |\n")
    w("| --- | ---: | ---: | ---: | ---: | ---: |\n")
    for label, x in rows:
        trips = x.get("trips", {})
        fixed, per = trips.get("fixed", {}), trips.get("per_batch_small", {})

        def sends(name: str, fixed: dict[str, float] = fixed, per: dict[str, float] = per,
                  error: str = trips.get("error", "n/a")) -> str:
            return f"{_f(fixed[name], 1)} / {_f(per[name], 1)}" if name in fixed else error

        w(f"| {label} | {_spread(x['fixed']['engine_cpu_ms'])} | {_spread(x['fixed']['best_cpu_ms'])} | "
          f"{sends('postgresql')} | {sends('redis')} | {_spread([p['ratio'] for p in x['pairs'].get('b100', [])])} "
          "|\n")
    w("\n")


if __name__ == "__main__":
    sys.exit(main())
