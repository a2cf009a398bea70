"""Console at scale (issue 18): what a changed tick, a cold contract and Recent runs cost the console's server,
and the console's memory with a 10-million-record run open.

In the benchmark's own process, as the console's server does it (its time, round trips to PostgreSQL
included), each with the machine's load average when it was measured:

- a monitor tick after one batch changed: ``change_signature`` then ``run_contract(include_batches=False)``
  through the shared metrics cache (``ui/run_cache.load``), at 10k and 100k batches; the changes alternate
  between a committed batch's figures moving and a pending batch committing. Baseline in the same run: the
  same tick with the full recomputation (what every changed tick cost before);
- the cold contract (no cache: the CLI, the API, a console's first read) and a cache's first read of a run;
- Recent runs (every job, the page's 100 newest) with 10,000 ended runs in the ledger plus the two big runs in
  progress: a refresh when nothing changed, after a batch of the 100k run changed, and the first refresh of
  a process; baseline: every listed run summed (what each refresh cost before);
- the console's resident memory (a real ``streamlit run Home.py``, Chromium on the Run Monitor of the
  10,000-batch run, 10 million records, and a second tab on Recent runs) while a batch changes every tick.

Usage::

    python bench/console_scale.py [--repeat 20] [--rss-seconds 60] [--no-append]

Needs DATABASE_URL and Chromium as bench/console.py does; writes the ``## Console at scale`` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import console as bench  # noqa: E402  (sets the benchmark's environment first)
import seed_ledger  # noqa: E402
import sqlalchemy as sa  # noqa: E402

import loader  # noqa: E402
from loader import db, recent_runs, run_metrics  # noqa: E402
from loader.ledger import runs  # noqa: E402

HEADING = "## Console at scale"
MANY_JOB = "bench-many"
RUNS = 10_000
PAGE = 100  # pages/runs.py's limit
OUT_JSON = Path(tempfile.gettempdir()) / "bench-console-scale.json"


def timed(fn: Callable[[], Any], n: int, before: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Median and p95 (ms) of ``n`` calls, ``before(i)`` untimed before each, with the load average."""
    xs, cpu = [], []
    for i in range(n):
        if before is not None:
            before(i)
        t, c = time.perf_counter(), time.process_time()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return {"median_ms": statistics.median(xs), "p95_ms": bench.pct(xs, 0.95), "cpu_ms": statistics.median(cpu),
            "n": n, "load": bench.loadavg()}


def changer(run: str) -> Callable[[int], None]:
    """One batch changes: a committed batch's figures move (even calls), a pending batch commits (odd)."""
    touched = bench.first_succeeded(run)
    pending = bench.pending_indexes(run, 1000)

    def change(i: int) -> None:
        if i % 2 == 0:
            bench.touch_batch(run, touched)
        else:
            bench.commit_batch(run, pending.pop(0))
    return change


def tick(run: str, cache: run_metrics.MetricsCache | None) -> Callable[[], Any]:
    def read() -> Any:
        loader.change_signature(bench.JOB, run)
        return loader.run_contract(bench.JOB, run, include_batches=False, metrics=cache)
    return read


def contract_times(size: int, repeat: int) -> dict[str, Any]:
    run = f"b{size}"
    out: dict[str, Any] = {"cold": timed(tick(run, None), max(5, repeat // 2))}
    out["first_cached"] = timed(lambda: tick(run, run_metrics.MetricsCache())(), 3)
    cache = run_metrics.MetricsCache()
    tick(run, cache)()
    out["changed_full"] = timed(tick(run, None), repeat, changer(run))
    out["changed_cached"] = timed(tick(run, cache), repeat, changer(run))
    out["idle"] = timed(lambda: loader.change_signature(bench.JOB, run), repeat)  # all an unchanged tick reads
    out["cache_mb"] = cache.nbytes / 2**20
    return out


def recent_times(repeat: int) -> dict[str, Any]:
    def page(cache: run_metrics.MetricsCache | None) -> Callable[[], Any]:
        return lambda: loader.list_runs(None, limit=PAGE, metrics=cache)

    def forget(_: int = 0) -> None:
        recent_runs._memo.clear()

    out: dict[str, Any] = {"summed": timed(page(None), max(5, repeat // 2), forget)}
    out["first"] = timed(lambda: page(run_metrics.MetricsCache())(), 3, forget)
    cache = run_metrics.MetricsCache()
    page(cache)()
    out["idle"] = timed(page(cache), repeat)
    change = changer("b100000")
    out["changed"] = timed(page(cache), repeat, change)
    with db.get_engine().connect() as conn:
        out["runs_in_ledger"] = conn.execute(sa.select(sa.func.count()).select_from(runs)).scalar_one()
    return out


def console_rss(seconds: float) -> dict[str, Any]:
    """The console's RSS (MiB) with the 10,000-batch run's monitor and Recent runs open, a change every tick."""
    from playwright.sync_api import sync_playwright

    app = bench.start_app("Home.py", bench.ROOT)
    samples: list[float] = []
    try:
        with sync_playwright() as p:
            browser = bench.launch_chromium(p)
            try:
                ctx, page, _, _ = bench.open_monitor(browser, app.url, "b10000", 10_000)
                other = ctx.new_page()
                other.goto(f"{app.url}/etl/runs")
                change = changer("b10000")
                opened = bench.rss_mb(app.proc.pid)
                t0, i = time.monotonic(), 0
                while time.monotonic() - t0 < seconds:
                    change(i)
                    i += 1
                    page.wait_for_timeout(bench.REFRESH_SECONDS * 1000)
                    samples.append(bench.rss_mb(app.proc.pid) or 0.0)
                ctx.close()
            finally:
                browser.close()
    finally:
        app.stop()
    return {"opened_mib": opened, "peak_mib": max(samples), "end_mib": samples[-1], "seconds": seconds,
            "changes": len(samples), "load": bench.loadavg()}


def cell(t: dict[str, Any]) -> str:
    return (f"{t['median_ms']:.1f} ms (p95 {t['p95_ms']:.1f}; CPU {t.get('cpu_ms', float('nan')):.1f} ms; n={t['n']}; "
            f"load {t['load']})")


def markdown(res: dict[str, Any]) -> str:
    lines = [HEADING, "", f"{res['machine']}. `{res['command']}`, {res['started']} UTC. Times are the console "
             "process's own (in-process wall time of the call, its PostgreSQL round trips included), medians, "
             "and the process's CPU time in it (median); the load average (1, 5, 15 min) is the machine's when each was measured: other sessions shared it.",
             "", "| run size | what | before (full recomputation) | now | ratio |", "| --- | --- | --- | --- | --- |"]
    for size, r in res["contract"].items():
        ratio = r["changed_full"]["median_ms"] / r["changed_cached"]["median_ms"]
        lines.append(f"| {int(size):,} batches | monitor tick after one batch changed | {cell(r['changed_full'])} | "
                     f"{cell(r['changed_cached'])} | {ratio:.1f}x |")
        lines.append(f"| {int(size):,} batches | monitor tick, nothing changed (`change_signature` only) | | "
                     f"{cell(r['idle'])} | |")
        lines.append(f"| {int(size):,} batches | cold contract (no cache: CLI, API) | | {cell(r['cold'])} | |")
        lines.append(f"| {int(size):,} batches | reading the whole run into a cache (the console's shared cache does it "
                     "in a thread of its own, once per process, while that tick computes in full) | | "
                     f"{cell(r['first_cached'])} | |")
        lines.append(f"| {int(size):,} batches | the cache's memory for the run | | {r['cache_mb']:.1f} MiB | |")
    rr = res["recent"]
    lines += [f"| {rr['runs_in_ledger']:,} runs | Recent runs (100 newest, 2 big runs in progress), nothing changed "
              f"| {cell(rr['summed'])} | {cell(rr['idle'])} | {rr['summed']['median_ms'] / rr['idle']['median_ms']:.1f}x |",
              f"| {rr['runs_in_ledger']:,} runs | Recent runs after a batch of the 100k run changed | | "
              f"{cell(rr['changed'])} | |",
              f"| {rr['runs_in_ledger']:,} runs | Recent runs, a process's first refresh, the big runs read into the "
              f"cache in line (the console's shared cache reads them aside) | | {cell(rr['first'])} | |"]
    if "rss" in res:
        m = res["rss"]
        lines.append(f"| 10,000 batches (10M records) | console RSS, monitor + Recent runs open, {m['changes']} changes "
                     f"over {m['seconds']:.0f} s | | opened {m['opened_mib']:.0f} MiB, peak {m['peak_mib']:.0f} MiB, end "
                     f"{m['end_mib']:.0f} MiB (load {m['load']}) | |")
    lines += ["", "Before: every changed tick re-aggregated the run's batches and attempts (`_metrics_query`, "
              "`loading_ms_query`) and every Recent runs refresh summed each listed run's batches. Now: "
              "`loader/run_metrics.py` keeps a mirror of each run's batch figures in the process and reads only the "
              "batches whose change number moved (the newest 1000, the change signature's window); ended runs' "
              "counts are kept per process by change number (`loader/recent_runs.py`)."]
    if res.get("notes"):
        lines += ["", *res["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rss-seconds", type=float, default=60.0, help="0: no console memory measure")
    ap.add_argument("--no-append", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    ap.add_argument("--report-only", metavar="JSON")
    ap.add_argument("--notes", metavar="MD", help="a Markdown file appended to the section (findings)")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
    else:
        res = {**bench.run_info(), "command": "python bench/console_scale.py " + " ".join(sys.argv[1:]),
               "contract": {}}
        try:
            for size in (10_000, 100_000):
                seed_ledger.seed(bench.JOB, f"b{size}", size)
            seed_ledger.seed_runs(MANY_JOB, RUNS)
            for size in (10_000, 100_000):
                print(f"{size}: contract and ticks [{bench.loadavg()}]", file=sys.stderr)
                res["contract"][str(size)] = contract_times(size, args.repeat)
            print(f"recent runs [{bench.loadavg()}]", file=sys.stderr)
            res["recent"] = recent_times(args.repeat)
            if args.rss_seconds:
                print(f"console memory [{bench.loadavg()}]", file=sys.stderr)
                res["rss"] = console_rss(args.rss_seconds)
        finally:
            db.close_all()
            seed_ledger.drop_schema()
        OUT_JSON.write_text(json.dumps(res, indent=1, default=str))
        print(f"results: {OUT_JSON}", file=sys.stderr)
    if args.notes:
        res["notes"] = [Path(args.notes).read_text().rstrip()]
    bench.publish(markdown(res), write=not args.no_append, heading=HEADING)


if __name__ == "__main__":
    main()
