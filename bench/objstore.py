"""Object-storage benchmark: the same NDJSON loaded from local files, a local S3-compatible server and HTTP.

Usage::

    python bench/objstore.py [--records N] [--parts P] [--repeat K] [--workers W] [--batch-size B] [--no-append]

The data is bench/engine.py's generated orders, as one file and as P part files. moto's S3 server (``python -m
moto.server``) and s3rver (npm, when node is here) hold the parts as P objects each; a stdlib HTTP server with ``Range`` support (tests/stores.py)
serves the one file; each runs as a process of its own on loopback. Each repetition loads, into a freshly
dropped table with the same job settings (JSON Schema on) and W workers: the parts from disk (a glob), the
parts from S3 (a glob), the one file from disk, the one file over HTTP; ``dataloader start --wait`` is timed
from the start to the run's end (planning included: it reads every source once, and each batch is read again
by byte range). Rows/s are medians; ratios are medians of per-repetition ratios (S3 to the disk parts, HTTP to
the disk file). moto copies an object's whole value for every request, ranges included, so one large object
measures moto, not the loader: hence the parts. The ``## Object storage`` section of BENCHMARKS.md is rewritten
(``--no-append``: printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
# engine.py reads these when it is imported: this benchmark's own ledger, queue and target schema.
os.environ.setdefault("BENCH_LEDGER_SCHEMA", "etl_bench_objstore")
os.environ.setdefault("BENCH_QUEUE", "bench-objstore")
os.environ.setdefault("BENCH_TARGET_SCHEMA", "bench_objstore")

import engine  # noqa: E402
from report import write_section  # noqa: E402

from tests.helpers import free_port  # noqa: E402
from tests.stores import s3_client, s3_env  # noqa: E402

HEADING = "## Object storage"
BUCKET = "bench-objstore"
#: s3rver's built-in account; the job names it through storage_options "${VAR}" references.
S3RVER_ENV = {"BENCH_S3RVER_KEY": "S3RVER", "BENCH_S3RVER_SECRET": "S3RVER"}


def _serve(name: str, argv: list[str], client: Any) -> tuple[subprocess.Popen[bytes], str]:
    """``argv`` + a free loopback port as a process of its own, once ``client(endpoint)`` can list buckets."""
    port = free_port()
    log = open(engine.DATA / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([*argv, str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client(endpoint).list_buckets()
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start; see {engine.DATA / f'{name}.log'}")


def start_s3() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server as a process of its own (not a thread of this one: the GIL would be shared)."""
    return _serve("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p"], s3_client)


def start_s3rver() -> tuple[subprocess.Popen[bytes], str] | None:
    """s3rver (npm, bench/s3rver/package.json), which streams objects from its own directory on disk, honouring
    ``Range``; installed with npm into bench/.data/s3rver once. None (and a line saying why) without node/npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        engine.log("  no node/npm here: the s3rver comparison is skipped (apt-get install -y nodejs npm)")
        return None
    folder = engine.DATA / "s3rver"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BENCH / "s3rver" / "package.json", folder / "package.json")
    if not (folder / "node_modules" / "s3rver").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=folder, check=True, timeout=600)
    store = folder / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    return _serve("s3rver", ["node", str(folder / "node_modules" / "s3rver" / "bin" / "s3rver.js"), "-d", str(store),
                             "-a", "127.0.0.1", "--silent", "--allow-mismatched-signatures", "--no-vhost-buckets",
                             "-p"], s3rver_client)


def s3rver_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=S3RVER_ENV["BENCH_S3RVER_KEY"],
                        aws_secret_access_key=S3RVER_ENV["BENCH_S3RVER_SECRET"])


def split(file: Path, parts: int) -> list[Path]:
    """The file as ``parts`` files of (nearly) equal line counts, named in load order."""
    folder = engine.DATA / f"objstore-{file.stem}-{parts}"
    out = [folder / f"part-{i:03d}.ndjson" for i in range(parts)]
    if all(p.exists() for p in out):
        return out
    folder.mkdir(parents=True, exist_ok=True)
    lines = file.read_bytes().splitlines(keepends=True)
    per = -(-len(lines) // parts)
    for i, p in enumerate(out):
        p.write_bytes(b"".join(lines[i * per:(i + 1) * per]))
    return out


def start_http(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.stores", str(directory), str(port)], cwd=BENCH.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--parts", type=int, default=20, help="part files and S3 objects the data is split into")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--no-append", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_start = engine.loadavg()
    source, _ = engine.generate(args.records, with_changes=False)
    parts = split(source, args.parts)
    streamed = start_s3rver()  # first: it may fail to install or start, with nothing else to stop yet
    s3, endpoint = start_s3()
    web, base = start_http(source.parent)
    jobs = {"parts": str(parts[0].parent / "part-*.ndjson"), "s3": f"s3://{BUCKET}/parts/part-*.ndjson",
            "file": str(source), "http": f"{base}/{source.name}"}
    if streamed is not None:
        jobs["s3rver"] = f"s3://{BUCKET}/parts/part-*.ndjson"  # last: the endpoint line below is its table's
    catalog = engine.write_catalog(jobs, "objstore-jobs.toml", "bench/objstore.py")
    if streamed is not None:
        with catalog.open("a") as f:
            f.write(f'storage_options = {{ endpoint_url = "{streamed[1]}", key = "${{BENCH_S3RVER_KEY}}", '
                    'secret = "${BENCH_S3RVER_SECRET}" }\n')
    env = engine.engine_env(catalog) | s3_env(endpoint) | S3RVER_ENV
    workers = None
    results: dict[str, list[dict[str, object]]] = {job: [] for job in jobs}
    try:
        for client in [s3_client(endpoint)] + ([s3rver_client(streamed[1])] if streamed is not None else []):
            client.create_bucket(Bucket=BUCKET)
            for p in parts:
                client.upload_file(str(p), BUCKET, f"parts/{p.name}")
        engine.initdb(env)
        workers = engine.Workers(args.workers, env, "objstore")
        for rep in range(args.repeat):
            for job in results:
                r = engine.run_engine(env, job, args.batch_size, workers, args.records, fresh=True)
                if not r["ok"]:
                    raise RuntimeError(f"{job} run {r['run']} did not load exactly: {r}")
                results[job].append(r)
                engine.log(f"  rep {rep + 1} {job}: {args.records / r['secs']:,.0f} rows/s "
                           f"({r['secs']:.1f} s, worker peak {r['hwm_kb'] / 1024:.0f} MiB)")
    finally:
        if workers is not None:
            workers.stop()
        for proc in (s3, web) + ((streamed[0],) if streamed is not None else ()):
            proc.terminate()
            proc.wait()
    rate = {job: [args.records / float(r["secs"]) for r in rs] for job, rs in results.items()}
    ratios = {what: [o / f for o, f in zip(rate[obj], rate[disk], strict=True)]
              for what, obj, disk in (("s3", "s3", "parts"), ("s3rver", "s3rver", "parts"), ("http", "http", "file"))
              if obj in rate}
    hwm = max(int(r["hwm_kb"]) for rs in results.values() for r in rs) / 1024
    size_mb = source.stat().st_size / 1e6

    def row(label: str, job: str) -> str:
        r = rate[job]
        return f"| {label} | {statistics.median(r):,.0f} | {min(r):,.0f}–{max(r):,.0f} |"

    def ratio(what: str) -> str:
        r = ratios[what]
        return f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})"

    streamed_row = row(f"{args.parts} S3 objects (s3rver, glob)", "s3rver") if "s3rver" in rate else \
        "| s3rver (not run: no node/npm) | - | - |"
    streamed_ratio = f"; S3 (s3rver) / disk parts {ratio('s3rver')}" if "s3rver" in ratios else ""
    text = f"""
{HEADING}

Issue 16, point 6: the same {args.records:,} orders ({size_mb:,.0f} MB of NDJSON, bench/engine.py's data) from disk,
from two S3-compatible servers and from an HTTP server with `Range`, each a process of its own on loopback; batch
size {args.batch_size}, {args.workers} workers, JSON Schema on, into a freshly dropped table each time, timed from
`dataloader start` to the run's end, planning included (planning reads every source once; each batch is then read
again by one ranged GET, with the planned ETag as `If-Match` for S3). S3 holds the data as {args.parts} objects,
compared with the same {args.parts} part files on disk, on two servers: moto (Python; it copies an object's whole
value for every request, ranges included, so one {size_mb:,.0f} MB object would measure moto, not the loader) and
s3rver (Node.js, npm; it streams each range from a file on its disk, as a real store's front end does). HTTP serves
the one file, compared with that file on disk. Produced by `python bench/objstore.py` (`make bench`).

- {started:%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, {args.repeat} repetitions (the loads in turn
  in each); load average {load_start} at the start and {engine.loadavg()} at the end (2 cores shared with
  PostgreSQL, the object servers and whatever else runs on the machine)

| source | rows/s (median) | min–max |
| --- | --- | --- |
{row(f"{args.parts} part files on disk (glob)", "parts")}
{row(f"{args.parts} S3 objects (moto, glob)", "s3")}
{streamed_row}
{row("one file on disk", "file")}
{row("one object over HTTP (Range)", "http")}

Ratios per repetition, median (min–max): S3 (moto) / disk parts {ratio("s3")}{streamed_ratio}; HTTP / disk file
{ratio("http")}. The issue asks for at least 0.85. Largest worker memory (VmHWM) over all the loads: {hwm:.0f} MiB.
"""
    if args.no_append:
        print(text)
    else:
        print(f"wrote the {HEADING[3:]} section of {write_section(text, HEADING)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
