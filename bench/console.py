"""Console benchmark: the Run Monitor's cost with a run of 10k and of 100k batches in the ledger.

For each run size (a synthetic ledger seeded by bench/seed_ledger.py, one run in 'loading'):

- server time of one monitor refresh: what ui/monitor.py's live fragment reads from the ledger
  (``loader.run_contract(job, run, include_batches=False)``, via ``_load``), plus, for context, the
  other periodic readers (the chart fragment's ``grid.duration_series``, the grid's ``/version`` poll
  and one ``/batches`` page), in-process, median of 20;
- bytes sent to the browser per 2 s refresh, nothing changed and one batch changed every 2 s:
  websocket frames received by Chromium (Playwright) and the grid's JSON routes (``/api/runs/...``);
  same-run baseline: a minimal Streamlit page whose fragment shows one metric every 2 s;
- time from a ledger change (a pending batch committed) to the new "Batches succeeded" value in
  the page, p50/p95 over 20 changes made at random phases of the refresh timer;
- time to first render of the deep link /etl/data-loader/<job>/<run> (metric cards and the first
  grid row visible);
- the longest main-thread task (PerformanceObserver 'longtask', in the page and the grid iframe)
  while the batches grid is scrolled top to bottom; baseline: the longest task over as long idle.

Usage::

    python bench/console.py [--batches 10000,100000] [--repeat 3] [--no-append]

Needs DATABASE_URL (default postgresql://postgres@127.0.0.1/test), Chromium at /usr/bin/chromium
and Playwright (no ``playwright install``). Uses its own ledger schema (ETL_LEDGER_SCHEMA,
default etl_bench_console), dropped at the end, and appends a ``## Console`` section to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("ETL_LEDGER_SCHEMA", "etl_bench_console")
os.environ.setdefault("ETL_QUEUE", "bench-console")

import seed_ledger  # noqa: E402
from psycopg import sql  # noqa: E402

import loader  # noqa: E402
from loader import db  # noqa: E402
from loader import grid as lgrid  # noqa: E402
from tests.ui.app_server import CHROMIUM, StreamlitServer, launch_chromium  # noqa: E402

JOB = "bench-console"
REFRESH_S = 2.0
GRID_FRAME = "iframe[title='st_aggrid.AgGrid.agGrid']"
OUT_JSON = Path(tempfile.gettempdir()) / "bench-console-results.json"

LONGTASK_JS = """
(() => {
  window.__lt = [];
  try {
    new PerformanceObserver(list => { for (const e of list.getEntries())
      window.__lt.push({start: e.startTime, dur: e.duration}); }).observe({type: 'longtask', buffered: true});
  } catch (e) { window.__lt_error = String(e); }
})();
"""

BASELINE_APP = '''
import time
import streamlit as st

st.title("Baseline")

@st.fragment(run_every=2.0)
def live():
    st.metric("Tick", f"{int(time.time()) // 2:,}")
    st.caption(f"Last refreshed {time.strftime('%H:%M:%S')}")

live()
'''


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def start_app(script: str, cwd: Path, base: str = "/etl") -> StreamlitServer:
    """``python -m streamlit run <script>`` on a free port, logging to the temp folder."""
    return StreamlitServer(script, cwd, log_dir=Path(tempfile.gettempdir()), log_name="bench-console", base=base,
                           timeout=90)


class Wire:
    """Websocket frames received and the grid's JSON responses of one page, with timestamps."""

    def __init__(self, page: Any) -> None:
        self.ws: list[tuple[float, int]] = []
        self.json: list[tuple[float, int, str]] = []
        page.on("websocket", self._on_ws)
        page.on("response", self._on_response)

    def _on_ws(self, ws: Any) -> None:
        def frame(payload: Any) -> None:
            n = len(payload) if isinstance(payload, bytes | bytearray) else len(str(payload).encode())
            self.ws.append((time.monotonic(), n))
        ws.on("framereceived", frame)

    def _on_response(self, resp: Any) -> None:
        if "/api/runs/" in resp.url:
            try:
                n = int(resp.headers.get("content-length") or 0)
            except ValueError:
                n = 0
            kind = "version" if resp.url.split("?")[0].endswith("/version") else "batches"
            self.json.append((time.monotonic(), n, kind))

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        ws = [n for t, n in self.ws if t0 <= t < t1]
        js = [(n, k) for t, n, k in self.json if t0 <= t < t1]
        return {"ws_bytes": sum(ws), "ws_frames": len(ws), "json_bytes": sum(n for n, _ in js),
                "json_requests": len(js), "batches_requests": sum(1 for _, k in js if k == "batches"),
                "batches_bytes": sum(n for n, k in js if k == "batches")}


# ----------------------------------------------------------------------------------------- ledger


def execute(query: sql.Composable, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with db.connection() as conn:
        cur = conn.execute(query, params or [])
        return cur.fetchall() if cur.description else []


def touch_batch(run: str, index: int) -> None:
    """One batch changed, as a worker writes it: new counters, a new change_seq."""
    execute(sql.SQL("UPDATE {} SET rows_validated = rows_validated + 1, duration_ms = duration_ms + 0.1, "
                    "change_seq = {} WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s").format(
        db.ledger_table("batches"), db.next_change()), [JOB, run, index])


def commit_batch(run: str, index: int) -> None:
    """A pending batch committed (what the 'Batches succeeded' card counts)."""
    execute(sql.SQL(
        "UPDATE {} SET status = 'succeeded', attempts = 1, rows_inserted = rows_attempted, "
        "rows_validated = rows_attempted, duration_ms = 80, started_at = clock_timestamp(), "
        "committed_at = clock_timestamp(), ended_at = clock_timestamp(), change_seq = {} "
        "WHERE etl_job_id = %s AND etl_run_id = %s AND batch_index = %s").format(
        db.ledger_table("batches"), db.next_change()), [JOB, run, index])


def count_status(run: str, status: str) -> int:
    return int(execute(sql.SQL("SELECT count(*) FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = %s")
                       .format(db.ledger_table("batches")), [JOB, run, status])[0][0])


def pending_indexes(run: str, k: int) -> list[int]:
    return [r[0] for r in execute(sql.SQL(
        "SELECT batch_index FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'pending' "
        "ORDER BY batch_index LIMIT %s").format(db.ledger_table("batches")), [JOB, run, k])]


def first_succeeded(run: str) -> int:
    return int(execute(sql.SQL(
        "SELECT min(batch_index) FROM {} WHERE etl_job_id = %s AND etl_run_id = %s AND status = 'succeeded'")
        .format(db.ledger_table("batches")), [JOB, run])[0][0])


# ----------------------------------------------------------------------------------------- server


def server_times(run: str, n: int = 20) -> dict[str, Any]:
    """In-process timings (ms) of what the console's timers read from the ledger."""
    q = lgrid.parse_query(0, 100, None, None, None)
    calls = {
        "run_contract": lambda: loader.run_contract(JOB, run, include_batches=False),
        "ledger_version": lambda: loader.ledger_version(JOB, run),
        "duration_series": lambda: lgrid.duration_series(JOB, run),
        "batch_page": lambda: lgrid.batch_page(JOB, run, q),
    }
    out: dict[str, Any] = {}
    for name, fn in calls.items():
        fn()  # warm: pool connection, statement compile
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            xs.append((time.perf_counter() - t) * 1000)
        out[name] = {"median_ms": med(xs), "p95_ms": pct(xs, 0.95), "min_ms": min(xs)}
    # The queries PostgreSQL runs for the fragment (EXPLAIN ANALYZE of the metrics aggregate).
    from loader.contract import _metrics_query

    stmt = _metrics_query(JOB, run).compile(db.get_engine(), compile_kwargs={"literal_binds": True})
    with db.connection() as conn, conn.transaction():
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(db.ledger_schema())))
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + str(stmt)).fetchone()[0][0]
    out["metrics_query_pg_ms"] = plan["Execution Time"]
    out["metrics_query_plan_top"] = plan["Plan"]["Node Type"] + " / " + plan["Plan"].get("Plans", [{}])[0].get(
        "Node Type", "")
    return out


# ----------------------------------------------------------------------------------------- browser


def metric_js() -> str:
    return ("([label, want]) => [...document.querySelectorAll('[data-testid=stMetric]')].some(m => {"
            " const l = m.querySelector('[data-testid=stMetricLabel]'); const v = m.querySelector("
            "'[data-testid=stMetricValue]'); return l && v && l.innerText.trim() === label &&"
            " v.innerText.trim() === want; })")


def first_render(browser: Any, url: str, run: str, total: int) -> float:
    ctx = browser.new_context(viewport={"width": 1440, "height": 1100})
    page = ctx.new_page()
    try:
        t0 = time.perf_counter()
        page.goto(f"{url}/etl/data-loader/{JOB}/{run}")
        page.wait_for_function(metric_js(), arg=["Batches total", f"{total:,}"], timeout=60_000, polling=50)
        page.frame_locator(GRID_FRAME).locator(".ag-row[row-index='0'] [col-id='index']").wait_for(timeout=60_000)
        return (time.perf_counter() - t0) * 1000
    finally:
        ctx.close()


def open_monitor(browser: Any, url: str, run: str, total: int) -> tuple[Any, Any, Wire]:
    ctx = browser.new_context(viewport={"width": 1440, "height": 1100})
    ctx.add_init_script(LONGTASK_JS)
    page = ctx.new_page()
    wire = Wire(page)
    page.goto(f"{url}/etl/data-loader/{JOB}/{run}")
    page.wait_for_function(metric_js(), arg=["Batches total", f"{total:,}"], timeout=60_000, polling=100)
    page.frame_locator(GRID_FRAME).locator(".ag-row[row-index='0'] [col-id='index']").wait_for(timeout=60_000)
    page.wait_for_timeout(3000)  # the chart fragment and the first polls settle
    return ctx, page, wire


def idle_bytes(page: Any, wire: Wire, seconds: float, tick: callable | None = None) -> dict[str, Any]:
    """Bytes over ``seconds``; ``tick`` is called every REFRESH_S (one batch changed)."""
    t0 = time.monotonic()
    stop = threading.Event()

    def changer() -> None:
        while not stop.wait(REFRESH_S):
            tick()

    th = threading.Thread(target=changer, daemon=True) if tick else None
    if th:
        th.start()
    page.wait_for_timeout(seconds * 1000)
    stop.set()
    if th:
        th.join()
    w = wire.window(t0, time.monotonic())
    refreshes = seconds / REFRESH_S
    w.update(refreshes=refreshes, ws_per_refresh=w["ws_bytes"] / refreshes,
             json_per_refresh=w["json_bytes"] / refreshes)
    return w


def change_visible(page: Any, run: str, n: int) -> list[float]:
    """ms from a committed ledger change to the new 'Batches succeeded' value in the page."""
    out = []
    todo = pending_indexes(run, n)
    done = count_status(run, "succeeded")
    rnd = random.Random(7)
    for index in todo:
        page.wait_for_timeout(rnd.uniform(0.3, REFRESH_S + 0.3) * 1000)  # a random phase of the timer
        commit_batch(run, index)
        t0 = time.perf_counter()
        done += 1
        page.wait_for_function(metric_js(), arg=["Batches succeeded", f"{done:,}"], timeout=30_000, polling=25)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def longtasks(page: Any) -> list[float]:
    tasks: list[float] = []
    for frame in page.frames:
        try:
            tasks += [t["dur"] for t in frame.evaluate("() => window.__lt || []")]
        except Exception:  # noqa: BLE001 - a detached frame
            pass
    return tasks


def reset_longtasks(page: Any) -> None:
    for frame in page.frames:
        try:
            frame.evaluate("() => { window.__lt = []; }")
        except Exception:  # noqa: BLE001
            pass


SCROLL_JS = """async ([steps, pause]) => {
  const vp = document.querySelector('.ag-body-viewport');
  const t0 = performance.now();
  for (let k = 0; k <= steps; k++) {
    vp.scrollTop = Math.round((vp.scrollHeight - vp.clientHeight) * k / steps);
    await new Promise(r => setTimeout(r, pause));
  }
  return {ms: performance.now() - t0, height: vp.scrollHeight, top: vp.scrollTop};
}"""


def scroll(page: Any, wire: Wire, total: int, steps: int = 150, pause: int = 40) -> dict[str, Any]:
    grid_frame = page.query_selector(GRID_FRAME).content_frame()
    # Baseline: the longest task over the same time idle.
    reset_longtasks(page)
    page.wait_for_timeout(steps * pause + 2000)
    idle = longtasks(page)
    grid_frame.evaluate("() => { const vp = document.querySelector('.ag-body-viewport'); vp.scrollTop = 0; }")
    page.wait_for_timeout(1000)
    reset_longtasks(page)
    t0 = time.monotonic()
    info = grid_frame.evaluate(SCROLL_JS, [steps, pause])
    # The last row arrives and renders.
    page.frame_locator(GRID_FRAME).locator(f".ag-row[row-index='{total - 1}'] [col-id='index']").wait_for(
        timeout=30_000)
    page.wait_for_timeout(1500)
    tasks = longtasks(page)
    w = wire.window(t0, time.monotonic())
    return {"longest_task_ms": max(tasks, default=0.0), "tasks_over_50ms": len(tasks),
            "tasks_over_100ms": sum(1 for t in tasks if t > 100), "idle_longest_task_ms": max(idle, default=0.0),
            "scroll_ms": info["ms"], "scroll_height_px": info["height"],
            "batches_requests": w["batches_requests"], "batches_bytes": w["batches_bytes"]}


def baseline_bytes(browser: Any, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "baseline.py").write_text(BASELINE_APP)
        app = start_app("baseline.py", Path(tmp), base="")
        try:
            ctx = browser.new_context(viewport={"width": 1440, "height": 1100})
            page = ctx.new_page()
            wire = Wire(page)
            page.goto(app.url)
            page.get_by_text("Tick").wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            w = idle_bytes(page, wire, seconds)
            ctx.close()
            return w
        finally:
            app.stop()


# ----------------------------------------------------------------------------------------- report


def fmt(x: float | None, unit: str = "", digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}{unit}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def markdown(res: dict[str, Any]) -> str:
    lines = ["", "## Console", "",
             "The Run Monitor (`/etl/data-loader/<job>/<run>`) against a run in `loading` with 10k and 100k "
             "batches. Produced by `bench/console.py` (ledger seeded by `bench/seed_ledger.py`). "
             "**The ledger is synthetic** (generated by SQL, not by a load): about 55 % of the batches succeeded, "
             "1 % failed, a few running or retried, the rest pending, one attempt row and one log event per attempt "
             "(64k of each at 100k batches), 50 rejected records. No worker runs: the benchmark makes the ledger "
             "changes itself, the way a worker writes them (`change_seq = nextval(...)`).", "",
             "### Machine and command", "",
             f"- {res['machine']}",
             f"- `{res['command']}`, {res['started']} UTC, {res['minutes']:.1f} min, load average "
             f"{res['load_start']} at the start and {res['load_end']} at the end (other test runs shared the 2 cores)",
             f"- Streamlit {res['streamlit']}, headless Chromium {res['chromium']} (Playwright {res['playwright']}), "
             f"{res['repeat']} repetitions of each browser window measure; medians (min-max) over them.",
             "- Server time: in-process, median of 20 calls after one warm-up, the same functions the timers "
             "call (the live fragment calls `run_contract(include_batches=False)` once per 2 s tick through "
             "`ui/monitor.py _load`; a run in `loading` always takes that path).",
             "- Wire bytes: websocket messages received by Chromium (`framereceived`, the messages' payload "
             "bytes; the server (uvicorn) negotiates no permessage-deflate, so that is what the socket carries, "
             "frame headers aside) and the "
             "grid's JSON routes (`Content-Length` of `/api/runs/...` responses, as sent, i.e. after the server's "
             "gzip when it applies) over a 20 s window, divided "
             "by the 10 ticks of the 2 s refresh. \"One batch changed\": one succeeded batch's counters and "
             "`change_seq` updated every 2 s. Baseline: a minimal Streamlit page whose 2 s fragment shows one "
             "`st.metric` and one caption, same browser, same run.",
             "- Change visible: a pending batch set to succeeded (one UPDATE, autocommit), then the clock runs "
             "until the \"Batches succeeded\" card shows the new count (polled every 25 ms in the page); 20 "
             "changes at random phases of the 2 s timer.",
             "- First render: a fresh browser context, `goto` the deep link until the \"Batches total\" card shows "
             "the count and grid row 0 is drawn.",
             "- Scroll: the grid's viewport (`.ag-body-viewport` in the `st_aggrid.AgGrid.agGrid` iframe) moved "
             "from top to bottom in 150 steps 40 ms apart (a dragged scrollbar), until the last row is drawn; "
             "long tasks from a `PerformanceObserver('longtask')` in the page and in the iframe. Baseline: the "
             "longest task over the same time with the page idle.", ""]
    base = res.get("baseline")
    for size in res["sizes"]:
        r = res["runs"][str(size)]
        s = r["server"]
        lines += [f"### {size:,} batches", "", "| what | median | p95 / range | baseline (same run) |",
                  "| --- | ---: | ---: | ---: |"]
        lines.append(f"| server: `run_contract(include_batches=False)` (the live fragment's ledger read) | "
                     f"{fmt(s['run_contract']['median_ms'], ' ms', 1)} | p95 {fmt(s['run_contract']['p95_ms'], ' ms', 1)}"
                     f" | PostgreSQL execution of its metrics aggregate: {fmt(s['metrics_query_pg_ms'], ' ms', 1)} |")
        lines.append(f"| server: `grid.duration_series` (chart fragment, every 5 s) | "
                     f"{fmt(s['duration_series']['median_ms'], ' ms', 1)} | p95 {fmt(s['duration_series']['p95_ms'], ' ms', 1)} | |")
        lines.append(f"| server: `ledger_version` (grid's `/version` poll, every 1 s) | "
                     f"{fmt(s['ledger_version']['median_ms'], ' ms', 1)} | p95 {fmt(s['ledger_version']['p95_ms'], ' ms', 1)} | |")
        lines.append(f"| server: `grid.batch_page` rows 0-100 (grid `/batches`) | "
                     f"{fmt(s['batch_page']['median_ms'], ' ms', 1)} | p95 {fmt(s['batch_page']['p95_ms'], ' ms', 1)} | |")
        for key, label in (("idle", "nothing changed"), ("changed", "one batch changed every 2 s")):
            ws = [w["ws_per_refresh"] for w in r[key]]
            js = [w["json_per_refresh"] for w in r[key]]
            bws = base and [w["ws_per_refresh"] for w in base]
            lines.append(f"| websocket bytes per 2 s refresh, {label} | {fmt(med(ws), ' B')} | "
                         f"{fmt(min(ws), ' B')}-{fmt(max(ws), ' B')} | minimal fragment page: "
                         f"{fmt(med(bws), ' B') if bws else 'n/a'} |")
            breq = [w["batches_requests"] for w in r[key]]
            lines.append(f"| grid JSON bytes per 2 s refresh, {label} (`/version` + `/batches`) | {fmt(med(js), ' B')} | "
                         f"{fmt(min(js), ' B')}-{fmt(max(js), ' B')}; `/batches` requests per 20 s: "
                         f"{fmt(med(breq))} | |")
        cv = r["change_visible_ms"]
        lines.append(f"| ledger change -> visible in the page (20 changes) | p50 {fmt(pct(cv, .5), ' ms')} | "
                     f"p95 {fmt(pct(cv, .95), ' ms')}, max {fmt(max(cv), ' ms')} | the timer alone: 0-2,000 ms "
                     "(mean 1,000) |")
        fr = r["first_render_ms"]
        lines.append(f"| first render of the deep link (cards + first grid row) | {fmt(med(fr), ' ms')} | "
                     f"{fmt(min(fr), ' ms')}-{fmt(max(fr), ' ms')} | |")
        sc = r["scroll"]
        lt = [x["longest_task_ms"] for x in sc]
        il = [x["idle_longest_task_ms"] for x in sc]
        lines.append(f"| longest main-thread task while scrolling top to bottom | {fmt(med(lt), ' ms')} | "
                     f"{fmt(min(lt), ' ms')}-{fmt(max(lt), ' ms')}; tasks > 100 ms per scroll: "
                     f"{fmt(med([x['tasks_over_100ms'] for x in sc]))}, `/batches` requests: "
                     f"{fmt(med([x['batches_requests'] for x in sc]))} | idle: {fmt(med(il), ' ms')} |")
        lines.append("")
    lines += ["### Targets", "", "| target | 10k | 100k |", "| --- | --- | --- |"]

    def t(size: int, key: str) -> str:
        r = res["runs"].get(str(size))
        if r is None:
            return "n/a"
        if key == "server":
            v = r["server"]["run_contract"]["median_ms"]
            return f"{fmt(v, ' ms', 1)}: {verdict(v < 50)}"
        if key == "bytes":
            ws = med([w["ws_per_refresh"] + w["json_per_refresh"] for w in r["idle"]])
            return f"{fmt(ws, ' B')}: {verdict(ws < 10_000)}"
        if key == "visible":
            v = pct(r["change_visible_ms"], 0.95)
            return f"p95 {fmt(v, ' ms')}: {verdict(v < 2000)}"
        if key == "scroll":
            v = max(x["longest_task_ms"] for x in r["scroll"])
            return f"worst {fmt(v, ' ms')}: {verdict(v <= 100)}" + ("" if size >= 100_000 else " (target is for 100k)")
        return "n/a"

    lines.append(f"| refresh, nothing changed: < 50 ms server time | {t(10_000, 'server')} | {t(100_000, 'server')} |")
    lines.append(f"| refresh, nothing changed: < 10 KB on the wire (websocket + grid JSON) | {t(10_000, 'bytes')} | "
                 f"{t(100_000, 'bytes')} |")
    lines.append(f"| change visible in < 2 s at p95 | {t(10_000, 'visible')} | {t(100_000, 'visible')} |")
    lines.append(f"| scrolling: no task over 100 ms | {t(10_000, 'scroll')} | {t(100_000, 'scroll')} |")
    lines.append("")
    if res.get("notes"):
        lines += res["notes"] + [""]
    return "\n".join(lines)


def append_section(text: str) -> Path:
    path = ROOT / "BENCHMARKS.md"
    if path.exists() and "\n## Console\n" in path.read_text():
        alt = Path(tempfile.gettempdir()) / "bench-console-section.md"
        alt.write_text(text)
        print(f"BENCHMARKS.md already has a '## Console' section: new section written to {alt}", file=sys.stderr)
        return alt
    with path.open("a") as f:
        f.write(text if path.exists() and path.stat().st_size else "# Benchmarks\n" + text)
    return path


def publish(text: str, *, append: bool) -> None:
    """Append the section to BENCHMARKS.md (saying where it went), or print it."""
    if append:
        print(f"wrote {append_section(text)}", file=sys.stderr)
    else:
        print(text)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="10000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--window", type=float, default=20.0, help="seconds per wire-bytes window")
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--no-append", action="store_true", help="print the section instead of appending it")
    ap.add_argument("--keep-schema", action="store_true")
    ap.add_argument("--report-only", metavar="JSON", help="render the section from a saved results file")
    ap.add_argument("--notes", metavar="MD", help="a Markdown file appended to the section (findings)")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        if args.notes:
            res["notes"] = [Path(args.notes).read_text().rstrip()]
        publish(markdown(res), append=not args.no_append)
        return
    sizes = [int(x) for x in args.batches.split(",")]
    import importlib.metadata as md

    from playwright.sync_api import sync_playwright

    started = datetime.now(UTC)
    t_start = time.monotonic()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
    with db.connection() as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    res: dict[str, Any] = {
        "machine": f"CPU: {cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM; PostgreSQL {pg} on the same "
                   f"machine; Python {platform.python_version()}",
        "command": "python bench/console.py " + " ".join(sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M"), "load_start": loadavg(), "repeat": args.repeat,
        "streamlit": md.version("streamlit"), "playwright": md.version("playwright"),
        "sizes": sizes, "runs": {}, "notes": []}
    try:
        res["chromium"] = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True,
                                         timeout=20).stdout.strip().split()[-1]
    except Exception:  # noqa: BLE001
        res["chromium"] = "?"
    for size in sizes:
        print(f"seeding {size} batches", file=sys.stderr)
        seed_ledger.seed(JOB, f"b{size}", size)
    app = start_app("Home.py", ROOT)
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                print("baseline", file=sys.stderr)
                res["baseline"] = [baseline_bytes(browser, args.window) for _ in range(args.repeat)]
                first_render(browser, app.url, f"b{sizes[0]}", sizes[0])  # warm-up: imports, first session
                for size in sizes:
                    run = f"b{size}"
                    r: dict[str, Any] = {}
                    res["runs"][str(size)] = r
                    print(f"{size}: server times", file=sys.stderr)
                    r["server"] = server_times(run)
                    print(f"{size}: first render", file=sys.stderr)
                    r["first_render_ms"] = [first_render(browser, app.url, run, size)
                                            for _ in range(max(args.repeat, 5))]
                    ctx, page, wire = open_monitor(browser, app.url, run, size)
                    try:
                        print(f"{size}: bytes idle/changed", file=sys.stderr)
                        touched = first_succeeded(run)
                        r["idle"], r["changed"] = [], []
                        for _ in range(args.repeat):
                            r["idle"].append(idle_bytes(page, wire, args.window))
                            r["changed"].append(idle_bytes(page, wire, args.window,
                                                           tick=lambda run=run, touched=touched: touch_batch(run, touched)))
                        print(f"{size}: change visible", file=sys.stderr)
                        r["change_visible_ms"] = change_visible(page, run, args.changes)
                        print(f"{size}: scroll", file=sys.stderr)
                        r["scroll"] = []
                        for _ in range(args.repeat):
                            r["scroll"].append(scroll(page, wire, size))
                    finally:
                        ctx.close()
                    OUT_JSON.write_text(json.dumps(res, indent=1, default=str))
                    print(json.dumps(r, default=str)[:3000], file=sys.stderr)
            finally:
                browser.close()
    finally:
        app.stop()
        if not args.keep_schema:
            db.close_all()
            seed_ledger.drop_schema()
    res["minutes"] = (time.monotonic() - t_start) / 60
    res["load_end"] = loadavg()
    OUT_JSON.write_text(json.dumps(res, indent=1, default=str))
    publish(markdown(res), append=not args.no_append)


if __name__ == "__main__":
    main()
