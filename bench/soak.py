"""A seeded, randomized fault soak: overlapping runs racing on shared keys while workers, backends and servers die.

Usage::

    python bench/soak.py --seed 1 --minutes 30      # make soak SEED=1 MINUTES=30

The soak owns its PostgreSQL and Redis (embedded, under ``--data-dir``, whatever DATABASE_URL /
REDIS_URL say) so that it can restart them. Three jobs load generated NDJSON sources (plain and gz,
with invalid and blank lines, keys shared between jobs and repeated inside files) into one staging
table; runs start on a schedule drawn from ``random.Random(seed)``, which also draws the faults:
worker SIGKILLs (a supervisor starts a replacement), pg_terminate_backend of the loader's sessions,
PostgreSQL and Redis restarts, cancels and retries. Then the faults stop, everything settles, and
``soak_check.verify`` compares the ledger, the run contracts and the table with what the sources and
the committed batches say. Exit 0 only when every check holds; the evidence is printed otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import soak_check  # noqa: E402
from psycopg import sql  # noqa: E402

LEDGER_SCHEMA = "soak_ledger"
QUEUE = "soak"
TARGET = ("soak_stage", "items")
SOURCE_ID = "id"
REQUIRED = ("v",)
#: Jobs and their files (name, gzipped); all load into TARGET and draw keys from one pool.
JOBS: dict[str, tuple[tuple[str, bool], ...]] = {
    "soak-a": (("part-1.ndjson", False), ("part-2.ndjson.gz", True)),
    "soak-b": (("part-1.ndjson.gz", True), ("part-2.ndjson", False)),
    "soak-c": (("part-1.ndjson", False),),
}
MAX_ATTEMPTS = {"soak-a": 3, "soak-b": 3, "soak-c": 2}
BATCH_SIZES = (100, 150, 200, 300)
KEYS = 2500
#: Runs never start while this many are active (the schedule's start is then recorded as skipped).
MAX_ACTIVE_RUNS = 6
#: Fault rates per minute, and restarts per soak (at least one PostgreSQL, two Redis restarts).
RATES = {"start": 24.0, "kill_worker": 1.5, "terminate_backends": 2.0, "cancel": 1.0, "retry": 1.5}
ACTIVE = ("queued", "validating", "loading", "committing")


@dataclass(frozen=True)
class Event:
    """One scheduled action: ``at`` seconds after the soak started."""

    at: float
    kind: str
    index: int

    def rng(self, seed: int) -> random.Random:
        """The event's own random choices: the same for the same seed whatever happened before."""
        return random.Random(f"{seed}/{self.index}/{self.kind}")


def schedule(seed: int, seconds: float) -> list[Event]:
    """The soak's actions, drawn from ``random.Random(seed)`` only."""
    rng = random.Random(seed)
    raw: list[tuple[float, str]] = []
    minutes = seconds / 60
    for kind, rate in RATES.items():
        raw += [(rng.uniform(0, seconds), kind) for _ in range(max(1, round(rate * minutes)))]
    raw += [(rng.uniform(0.15, 0.8) * seconds, "restart_redis") for _ in range(max(2, round(minutes / 10)))]
    raw += [(rng.uniform(0.2, 0.7) * seconds, "restart_postgres") for _ in range(max(1, round(minutes / 15)))]
    raw += [(0.0, "start"), (0.0, "start")]  # something is loading from the first second
    return [Event(at, kind, i) for i, (at, kind) in enumerate(sorted(raw))]


# -- sources ---------------------------------------------------------------------------------------


def _invalid(rng: random.Random, key: str) -> str:
    return rng.choice([
        '{"id": "' + key + '", "v": ',  # broken JSON
        json.dumps({"v": 1, "note": "no id"}),  # no source_id
        json.dumps({"id": key}),  # required field missing
        json.dumps({"id": key, "v": None}),  # required field null
        "[1, 2, 3]",  # not an object
    ])


def write_sources(folder: Path, seed: int) -> dict[str, list[Path]]:
    """Each job's files (sorted, as the catalog's glob resolves them), generated from the seed."""
    rng = random.Random(f"{seed}/sources")
    files: dict[str, list[Path]] = {}
    for job, parts in JOBS.items():
        paths = []
        for name, gz in parts:
            lines = []
            for n in range(1, rng.randint(3000, 6000) + 1):
                key = f"k{rng.randrange(KEYS):05d}"
                roll = rng.random()
                if roll < 0.01:
                    lines.append(rng.choice(["", "   "]))
                elif roll < 0.04:
                    lines.append(_invalid(rng, key))
                else:
                    lines.append(json.dumps({"id": key, "v": rng.randrange(10**6), "src": f"{job}/{name}:{n}",
                                             "tags": rng.sample(["x", "y", "z"], rng.randint(0, 3))}))
            data = ("\n".join(lines) + "\n").encode()
            path = folder / job / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(data) if gz else data)
            paths.append(path)
        files[job] = sorted(paths)
    return files


def write_catalog(folder: Path) -> Path:
    out = []
    for job in JOBS:
        out += [f"[jobs.{json.dumps(job)}]", f"source = {json.dumps(job + '/part-*')}",
                f"target_table = {json.dumps('.'.join(TARGET))}", f"source_id = {json.dumps(SOURCE_ID)}",
                f"required = {json.dumps(list(REQUIRED))}", f"max_attempts = {MAX_ATTEMPTS[job]}", ""]
    path = folder / "jobs.toml"
    path.write_text("\n".join(out))
    return path


# -- services and workers --------------------------------------------------------------------------


@contextlib.contextmanager
def _without_service_urls() -> Iterator[None]:
    """ensure_services() starts embedded servers only for URLs the environment lacks."""
    saved = {k: os.environ.pop(k) for k in ("DATABASE_URL", "REDIS_URL") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Services:
    """The soak's own embedded PostgreSQL and Redis, restarted at will."""

    def __init__(self, folder: Path) -> None:
        from devstack.services import ensure_services

        self.folder = folder
        with _without_service_urls():
            services = ensure_services(folder)
        self.database_url, self.redis_url = services.database_url, services.redis_url
        os.environ.update(services.env())

    def restart(self, name: str, down: float, *, empty: bool = False) -> None:
        """Stop one server, wait ``down`` seconds, start it again (Redis ``empty``: its snapshot deleted)."""
        from devstack.services import ensure_services, stop_services

        stop_services(self.folder, only=[name])
        if empty:
            (self.folder / "redis" / "dump.rdb").unlink(missing_ok=True)
        time.sleep(down)
        with _without_service_urls():
            again = ensure_services(self.folder)
        assert (again.database_url, again.redis_url) == (self.database_url, self.redis_url), "a server moved"

    def stop(self) -> None:
        from devstack.services import stop_services

        stop_services(self.folder)


@dataclass
class Workers:
    """``dataloader worker`` processes, kept at ``n`` like a supervisor would."""

    n: int
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    exits: list[str] = field(default_factory=list)  # workers that ended without being killed
    started: int = 0

    def ensure(self) -> None:
        for p in list(self.procs):
            if p.poll() is not None:
                self.procs.remove(p)
                if p.pid not in self.killed:
                    self.exits.append(f"worker pid {p.pid} exited with {p.returncode} (log {self._log(p.pid)})")
        while len(self.procs) < self.n:
            self.started += 1
            with open(self.log_dir / f"worker-{self.started}.log", "ab") as log:
                p = subprocess.Popen([sys.executable, "-m", "loader.cli", "worker"], cwd=ROOT, env=os.environ.copy(),
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            (self.log_dir / f"pid-{p.pid}").write_text(str(self.started))
            self.procs.append(p)

    def _log(self, pid: int) -> str:
        try:
            return str(self.log_dir / f"worker-{(self.log_dir / f'pid-{pid}').read_text()}.log")
        except OSError:
            return "?"

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def kill(self, rng: random.Random, pid: int | None = None) -> int | None:
        """SIGKILL the worker ``pid`` when it is one of ours, else a random one."""
        alive = [p for p in self.procs if p.poll() is None]
        if not alive:
            return None
        victim = next((p for p in alive if p.pid == pid), None) or rng.choice(alive)
        self.killed.add(victim.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        return victim.pid

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


# -- the soak ----------------------------------------------------------------------------------------


@dataclass
class Soak:
    seed: int
    seconds: float
    services: Services
    workers: Workers
    catalog: Path
    started: list[tuple[str, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    done: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # API errors that are not LoaderError
    t0: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        print(line, flush=True)
        self.log.append(line)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.services.database_url, autocommit=True, application_name="soak",
                               connect_timeout=10)

    def runs_in(self, query: sql.Composed) -> list[tuple[str, str]]:
        try:
            with self.connect() as conn:
                return [(str(a), str(b)) for a, b in conn.execute(query).fetchall()]
        except psycopg.Error as exc:
            self.say(f"  (cannot read the ledger: {str(exc).strip().splitlines()[0]})")
            return []

    def active_runs(self) -> list[tuple[str, str]]:
        return self.runs_in(sql.SQL("SELECT etl_job_id, etl_run_id FROM {} WHERE status = ANY({}) ORDER BY run_seq")
                            .format(sql.Identifier(LEDGER_SCHEMA, "runs"), sql.Literal(list(ACTIVE))))

    def wait_for(self, query: sql.Composed, seconds: float = 10.0) -> list[tuple[str, str]]:
        """The rows of ``query`` as soon as there are any (a fault aimed at work in flight), at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            rows = self.runs_in(query)
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def api(self, what: str, call: Callable[[], Any]) -> Any:
        """Call the engine: a LoaderError is an answer (recorded); anything else is a finding."""
        import loader

        try:
            return call()
        except loader.LoaderError as exc:
            self.say(f"  {what}: refused ({exc.code}): {str(exc)[:160]}")
        except Exception as exc:  # noqa: BLE001 - the soak reports it as a failed check
            self.unexpected.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            self.say(f"  {what}: UNEXPECTED {type(exc).__name__}: {str(exc)[:160]}")
        return None

    def run_event(self, ev: Event) -> None:
        import loader

        rng = ev.rng(self.seed)
        if ev.kind == "start":
            job, size = rng.choice(sorted(JOBS)), rng.choice(BATCH_SIZES)
            active = self.active_runs()
            if len(active) >= MAX_ACTIVE_RUNS:
                self.say(f"start {job}: skipped, {len(active)} runs active")
                return
            run_id = f"r{len(self.started) + 1:04d}"
            self.say(f"start {job}/{run_id} batch_size={size} force=True")
            ref = self.api("start", lambda: loader.start_run(job, run_id=run_id, batch_size=size, force=True,
                                                             catalog=self.catalog))
            if ref is not None or self.runs_in(sql.SQL("SELECT etl_job_id, etl_run_id FROM {} WHERE etl_job_id = {} "
                                                       "AND etl_run_id = {}").format(
                    sql.Identifier(LEDGER_SCHEMA, "runs"), sql.Literal(job), sql.Literal(run_id))):
                self.started.append((job, run_id))
        elif ev.kind == "kill_worker":
            busy = self.wait_for(sql.SQL(
                "SELECT w.pid, b.etl_job_id || '/' || b.etl_run_id || '#' || b.batch_index FROM {batches} b "
                "JOIN {workers} w ON w.name = b.worker WHERE b.status = 'running' AND w.pid = ANY({pids}) "
                "AND w.heartbeat_at > now() - interval '5 seconds' ORDER BY b.batch_index").format(
                    batches=sql.Identifier(LEDGER_SCHEMA, "batches"), workers=sql.Identifier(LEDGER_SCHEMA, "workers"),
                    pids=sql.Literal(self.workers.pids())))
            holder = rng.choice(busy) if busy else None
            pid = self.workers.kill(rng, int(holder[0]) if holder else None)
            held = holder is not None and pid == int(holder[0])
            self.say(f"kill_worker: SIGKILL pid {pid}" + (f" holding batch {holder[1]}" if held and holder else ""))
            time.sleep(rng.uniform(0, 2))
            self.workers.ensure()
        elif ev.kind == "terminate_backends":
            self.terminate_backends(rng)
        elif ev.kind == "cancel":
            active = self.wait_for(sql.SQL("SELECT etl_job_id, etl_run_id FROM {} WHERE status = ANY({}) "
                                           "ORDER BY run_seq").format(sql.Identifier(LEDGER_SCHEMA, "runs"),
                                                                      sql.Literal(list(ACTIVE))))
            if not active:
                self.say("cancel: no active run")
                return
            job, run = rng.choice(active)
            self.say(f"cancel {job}/{run}")
            self.api("cancel", lambda: loader.cancel_run(job, run))
        elif ev.kind == "retry":
            candidates = self.runs_in(sql.SQL(
                "SELECT r.etl_job_id, r.etl_run_id FROM {runs} r WHERE r.status IN ('failed', 'partial_success') "
                "AND r.batches_total > 0 AND EXISTS (SELECT 1 FROM {batches} b WHERE b.etl_job_id = r.etl_job_id "
                "AND b.etl_run_id = r.etl_run_id AND b.status = 'failed') ORDER BY r.run_seq").format(
                    runs=sql.Identifier(LEDGER_SCHEMA, "runs"), batches=sql.Identifier(LEDGER_SCHEMA, "batches")))
            if not candidates:
                self.say("retry: no run with failed batches")
                return
            job, run = rng.choice(candidates)
            got = self.api("retry", lambda: loader.retry_run(job, run))
            self.say(f"retry {job}/{run}: batches {got}")
        elif ev.kind == "restart_redis":
            empty, down = rng.random() < 0.6, rng.uniform(1, 6)
            self.say(f"restart_redis: down {down:.1f}s, {'empty' if empty else 'from its snapshot'}")
            self.services.restart("redis", down, empty=empty)
            self.say("restart_redis: up")
        elif ev.kind == "restart_postgres":
            down = rng.uniform(1, 5)
            self.say(f"restart_postgres: down {down:.1f}s")
            self.services.restart("postgresql", down)
            self.say("restart_postgres: up")
        else:
            raise ValueError(f"unknown event kind {ev.kind!r}")
        self.done[ev.kind] += 1

    def terminate_backends(self, rng: random.Random) -> None:
        everything = rng.random() < 0.3
        rounds = rng.randint(1, 20)  # one round every 0.1 s: busy sessions come and go
        ended = 0
        try:
            with self.connect() as conn:
                for _ in range(rounds):
                    ended += len(conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dataloader' "
                        "AND datname = current_database() AND pid <> pg_backend_pid() AND (%s OR state <> 'idle')",
                        [everything]).fetchall())
                    time.sleep(0.1)
        except psycopg.Error as exc:
            self.say(f"  terminate_backends: {str(exc).strip().splitlines()[0]}")
        self.say(f"terminate_backends ({'all' if everything else 'busy'} sessions, {rounds} rounds): {ended} ended")
        self.done["backends_terminated"] += ended

    def settle(self, timeout: float) -> list[str]:
        """Wait until every run is final and nothing is open or queued; what is stuck after ``timeout``."""
        from loader.queue import get_queue

        deadline = time.monotonic() + timeout
        runs, batches = sql.Identifier(LEDGER_SCHEMA, "runs"), sql.Identifier(LEDGER_SCHEMA, "batches")
        stuck_q = sql.SQL(
            "SELECT 'run ' || etl_job_id || '/' || etl_run_id || ' ' || status FROM {runs} WHERE status = ANY({active}) "
            "UNION ALL SELECT 'batch ' || b.etl_job_id || '/' || b.etl_run_id || '#' || b.batch_index || ' ' || "
            "b.status || ' (run ' || r.status || ')' FROM {batches} b JOIN {runs} r USING (etl_job_id, etl_run_id) "
            "WHERE b.status IN ('running', 'retried') OR (b.status = 'pending' AND r.status <> 'canceled')").format(
                runs=runs, batches=batches, active=sql.Literal(list(ACTIVE)))
        stuck: list[str] = []
        while True:
            self.workers.ensure()
            try:
                with self.connect() as conn:
                    stuck = [str(r[0]) for r in conn.execute(stuck_q).fetchall()]
                queued = len(get_queue())
                if queued:
                    stuck.append(f"{queued} jobs queued in RQ")
            except Exception as exc:  # noqa: BLE001 - still settling: the servers may be coming back
                stuck = [f"cannot read: {exc}"]
            if not stuck:
                return []
            if time.monotonic() > deadline:
                return stuck
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=2.0, help="how long faults are injected")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--settle", type=float, default=300.0,
                        help="seconds everything may take to settle once the faults stop (then: failure)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "soak",
                        help="the soak's servers, sources and worker logs (default .data/soak)")
    parser.add_argument("--keep-services", action="store_true", help="leave the embedded servers running")
    parser.add_argument("--check-only", action="store_true",
                        help="start nothing and inject nothing: check the ledger and table an earlier soak left "
                             "(with --keep-services) against the sources of the same seed")
    args = parser.parse_args(argv)

    seconds = args.minutes * 60
    data_dir = args.data_dir.resolve()
    os.environ.update({"ETL_LEDGER_SCHEMA": LEDGER_SCHEMA, "ETL_QUEUE": QUEUE, "ETL_RETRY_BASE_SECONDS": "0.2",
                       "ETL_RETRY_MAX_SECONDS": "2"})
    events = schedule(args.seed, seconds)
    print(f"soak: seed={args.seed} minutes={args.minutes} workers={args.workers} data_dir={data_dir}")
    print(f"schedule ({len(events)} events, {dict(sorted(Counter(e.kind for e in events).items()))}):")
    for ev in events:
        print(f"  +{ev.at:7.1f}s {ev.kind}")

    for sub in ("sources", "logs", "evidence"):
        shutil.rmtree(data_dir / sub, ignore_errors=True)
        (data_dir / sub).mkdir(parents=True)
    files = write_sources(data_dir / "sources", args.seed)
    catalog = write_catalog(data_dir / "sources")
    services = Services(data_dir / "services")
    ok = False
    workers = Workers(args.workers, data_dir / "logs")
    try:
        if args.check_only:
            ok = _report(args, files, services, workers, Soak(args.seed, 0, services, workers, catalog), [], 0)
        else:
            ok = _run(args, seconds, events, files, catalog, services, workers)
    finally:
        workers.stop()
        import loader.db

        loader.db.close_all()
        if not args.keep_services:
            services.stop()
    return 0 if ok else 1


def _run(args: argparse.Namespace, seconds: float, events: list[Event], files: dict[str, list[Path]],
         catalog: Path, services: Services, workers: Workers) -> bool:
    import loader
    from loader.queue import get_queue, get_redis

    with psycopg.connect(services.database_url, autocommit=True) as conn:
        for schema in (LEDGER_SCHEMA, TARGET[0]):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    get_redis().flushdb()
    loader.initdb()
    workers.ensure()
    soak = Soak(args.seed, seconds, services, workers, catalog)
    for ev in events:
        while time.monotonic() - soak.t0 < ev.at:
            workers.ensure()
            time.sleep(min(0.5, max(0.0, ev.at - (time.monotonic() - soak.t0))))
        soak.run_event(ev)
    while time.monotonic() - soak.t0 < seconds:
        workers.ensure()
        time.sleep(0.5)
    soak.say(f"faults stop; settling (up to {args.settle:.0f}s)")
    settled_at = time.monotonic()
    stuck = soak.settle(args.settle)
    soak.say(f"settled in {time.monotonic() - settled_at:.1f}s" if not stuck else f"NOT settled: {len(stuck)} left")
    queue_length = len(get_queue())
    workers.stop()
    return _report(args, files, services, workers, soak, stuck, queue_length)


def _report(args: argparse.Namespace, files: dict[str, list[Path]], services: Services, workers: Workers, soak: Soak,
            stuck: list[str], queue_length: int) -> bool:
    import loader

    sources = soak_check.Sources.read(files, SOURCE_ID, REQUIRED)
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        keys = [(str(a), str(b)) for a, b in conn.execute(sql.SQL("SELECT etl_job_id, etl_run_id FROM {}").format(
            sql.Identifier(LEDGER_SCHEMA, "runs"))).fetchall()]
        contracts = {k: loader.run_contract(*k, include_batches=False) for k in keys}
        checks = soak_check.verify(conn, ledger=LEDGER_SCHEMA, target=TARGET, sources=sources, started=soak.started,
                                   contracts=contracts, queue_length=queue_length)
        summary = soak_check.summarize(conn, LEDGER_SCHEMA)
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*TARGET))).fetchone()
    settled = soak_check.Check("everything settled within the timeout")
    for s in stuck:
        settled.fail(s)
    api = soak_check.Check("the engine's API raised nothing but LoaderError under faults")
    for u in soak.unexpected:
        api.fail(u)
    checks = [settled, api, *checks]

    print("\nreport")
    print(f"  runs: {summary['runs']}")
    print(f"  batches: {summary['batches']}")
    print(f"  attempts: {summary['attempts']}")
    print(f"  staging rows: {rows[0] if rows else '?'}")
    print(f"  actions: {dict(sorted(soak.done.items()))}")
    print(f"  workers started: {workers.started}, killed: {len(workers.killed)}, exited on their own: "
          f"{len(workers.exits)}")
    for e in workers.exits[:10]:
        print(f"    {e}")
    passed = sum(c.passed for c in checks)
    for c in checks:
        print(f"  [{'ok' if c.passed else 'FAILED'}] {c.name}" + ("" if c.passed else f" ({c.failures} failures)"))
        for line in c.evidence:
            print(f"      {line}")
    faults = sum(soak.done[k] for k in ("kill_worker", "terminate_backends", "restart_redis", "restart_postgres",
                                        "cancel", "retry"))
    verdict = "PASSED" if passed == len(checks) else "FAILED"
    if verdict == "FAILED":
        folder = args.data_dir.resolve() / "evidence"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "actions.log").write_text("\n".join(soak.log) + "\n")
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            dumped = soak_check.dump_evidence(conn, LEDGER_SCHEMA, checks, folder)
        print(f"  evidence: {folder} ({len(dumped)} runs; worker logs in {args.data_dir.resolve() / 'logs'})")
    print(f"\nsoak {verdict}: seed={args.seed} minutes={args.minutes} runs={len(soak.started)} "
          f"batches={sum(summary['batches'].values())} faults={faults} checks={passed}/{len(checks)}")
    return passed == len(checks)


if __name__ == "__main__":
    sys.exit(main())
