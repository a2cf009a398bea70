"""The soak's end checks: the ledger, the run contracts and the staging table against the sources, read independently."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

#: Run states a run may end in; batch states a batch may end in.
FINAL_RUN_STATES = frozenset({"success", "partial_success", "failed", "canceled"})
OPEN_BATCH_STATES = ("pending", "running", "retried")
#: Evidence lines kept per failed check.
EVIDENCE_MAX = 12


@dataclass(frozen=True)
class Line:
    """One line of a source file as this module reads it (not as loader.sources does)."""

    file_index: int
    line_no: int
    blank: bool
    valid: bool
    key: str = ""
    data: Any = None


@dataclass
class Check:
    """One invariant: its name, whether it held, and the evidence when it did not."""

    name: str
    evidence: list[str] = field(default_factory=list)
    failures: int = 0

    @property
    def passed(self) -> bool:
        return self.failures == 0

    def fail(self, message: str) -> None:
        self.failures += 1
        if len(self.evidence) < EVIDENCE_MAX:
            self.evidence.append(message)


def read_lines(path: Path, file_index: int, source_id: str, required: Sequence[str]) -> list[Line]:
    """The file's lines, numbered from 1, each judged valid by the catalog's rules (JSON object, string
    ``source_id``, every required field present and not null)."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    parts = raw.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    out: list[Line] = []
    for n, part in enumerate(parts, start=1):
        text = part.strip()
        if not text:
            out.append(Line(file_index, n, blank=True, valid=False))
            continue
        try:
            record = json.loads(text)
        except ValueError:
            out.append(Line(file_index, n, blank=False, valid=False))
            continue
        ok = (isinstance(record, dict) and isinstance(record.get(source_id), str)
              and all(record.get(name) is not None for name in required))
        key = record[source_id] if ok else ""
        out.append(Line(file_index, n, blank=False, valid=ok, key=key, data=record if ok else None))
    return out


@dataclass(frozen=True)
class Sources:
    """Each job's source files in load order (sorted, as the catalog's glob resolves), read once."""

    files: dict[str, list[Path]]
    lines: dict[str, list[Line]]  # by str(path)

    @classmethod
    def read(cls, files: dict[str, list[Path]], source_id: str, required: Sequence[str]) -> Sources:
        lines = {str(p): read_lines(p, i, source_id, required) for paths in files.values()
                 for i, p in enumerate(paths)}
        return cls(files, lines)

    def batch_lines(self, file: str, line_start: int, line_count: int) -> list[Line]:
        return [ln for ln in self.lines[file][line_start - 1:line_start - 1 + line_count] if not ln.blank]


def _rows(conn: psycopg.Connection[Any], query: sql.Composed, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, params).fetchall())


def verify(conn: psycopg.Connection[Any], *, ledger: str, target: tuple[str, str], sources: Sources,
           started: Sequence[tuple[str, str]], contracts: dict[tuple[str, str], dict[str, Any]],
           queue_length: int) -> list[Check]:
    """Every end-of-soak invariant, computed from the ledger, the sources and the target table.

    ``started`` are the runs the soak created, in creation order; ``contracts`` the run contracts
    the engine reports (``loader.run_contract``) for every run in the ledger.
    """
    def t(name: str) -> sql.Identifier:
        return sql.Identifier(ledger, name)

    runs = _rows(conn, sql.SQL("SELECT * FROM {} ORDER BY run_seq").format(t("runs")))
    batches = _rows(conn, sql.SQL("SELECT * FROM {} ORDER BY etl_job_id, etl_run_id, batch_index").format(
        t("batches")))
    attempts = _rows(conn, sql.SQL("SELECT etl_job_id, etl_run_id, batch_index, attempt, status FROM {}").format(
        t("attempts")))
    rejects = _rows(conn, sql.SQL("SELECT etl_job_id, etl_run_id, batch_index, source_file, line_no FROM {}").format(
        t("rejects")))
    table = {r["source_id"]: r for r in _rows(conn, sql.SQL(
        "SELECT source_id, data, etl_job_id, etl_run_id, etl_run_seq FROM {}").format(sql.Identifier(*target)))}

    by_run: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for b in batches:
        by_run[(b["etl_job_id"], b["etl_run_id"])].append(b)
    rejected_lines: dict[tuple[str, str, int], list[tuple[str, int]]] = defaultdict(list)
    for r in rejects:
        rejected_lines[(r["etl_job_id"], r["etl_run_id"], r["batch_index"])].append((r["source_file"], r["line_no"]))
    run_status = {(r["etl_job_id"], r["etl_run_id"]): r["status"] for r in runs}

    checks = [
        _runs_final(runs), _no_open_batches(batches, run_status), _no_running_attempts(attempts),
        _runs_in_start_order(runs, started), _batches_tile_the_sources(runs, by_run, sources),
        _committed_batches_match_their_lines(batches, rejected_lines, sources),
        _uncommitted_batches_leave_nothing(batches, rejected_lines),
        _contracts_equal_the_ledger(runs, by_run, contracts),
    ]
    expected = _last_wins(runs, by_run, sources)
    checks.append(_table_is_the_last_wins_result(expected, table))
    checks.append(_row_count_is_the_inserts(batches, table))
    queue = Check("the queue is empty once everything settled")
    if queue_length:
        queue.fail(f"{queue_length} RQ jobs still queued")
    checks.append(queue)
    return checks


def _runs_final(runs: list[dict[str, Any]]) -> Check:
    c = Check("every run is final (success, partial_success, failed, canceled)")
    for r in runs:
        if r["status"] not in FINAL_RUN_STATES:
            c.fail(f"run {r['etl_job_id']}/{r['etl_run_id']} is {r['status']}")
    return c


def _no_open_batches(batches: list[dict[str, Any]], run_status: dict[tuple[str, str], str]) -> Check:
    c = Check("no batch is pending, running or retried")
    for b in batches:
        if b["status"] in OPEN_BATCH_STATES:
            key = (b["etl_job_id"], b["etl_run_id"])
            c.fail(f"batch {key[0]}/{key[1]}#{b['batch_index']} is {b['status']} (run {run_status[key]})")
    return c


def _no_running_attempts(attempts: list[dict[str, Any]]) -> Check:
    c = Check("no attempt is still running")
    for a in attempts:
        if a["status"] == "running":
            c.fail(f"attempt {a['attempt']} of {a['etl_job_id']}/{a['etl_run_id']}#{a['batch_index']} is running")
    return c


def _runs_in_start_order(runs: list[dict[str, Any]], started: Sequence[tuple[str, str]]) -> Check:
    c = Check("every run the soak started is in the ledger, run_seq in start order")
    seq = {(r["etl_job_id"], r["etl_run_id"]): int(r["run_seq"]) for r in runs}
    last = 0
    for key in started:
        if key not in seq:
            c.fail(f"run {key[0]}/{key[1]} was started but is not in the ledger")
            continue
        if seq[key] <= last:
            c.fail(f"run {key[0]}/{key[1]} has run_seq {seq[key]}, not after {last}")
        last = seq[key]
    return c


def _batches_tile_the_sources(runs: list[dict[str, Any]], by_run: dict[tuple[str, str], list[dict[str, Any]]],
                              sources: Sources) -> Check:
    c = Check("each planned run's batches cover its sources' records exactly once, in order")
    for r in runs:
        key = (r["etl_job_id"], r["etl_run_id"])
        bs = by_run.get(key, [])
        if r["batches_total"] is None:
            if bs:
                c.fail(f"run {key[0]}/{key[1]} has {len(bs)} batches but no batches_total")
            continue
        if [b["batch_index"] for b in bs] != list(range(int(r["batches_total"]))):
            c.fail(f"run {key[0]}/{key[1]}: batches {[b['batch_index'] for b in bs][:5]}... "
                   f"for batches_total {r['batches_total']}")
            continue
        files = [str(p) for p in sources.files[key[0]]]
        covered: dict[str, int] = dict.fromkeys(files, 0)  # last line covered so far, per file
        records = current = 0
        for b in bs:
            f = b["source_file"]
            if f not in covered or files.index(f) < current:
                c.fail(f"batch {key[0]}/{key[1]}#{b['batch_index']} reads {f}, out of the job's file order")
                continue
            current = files.index(f)
            if b["line_start"] != covered[f] + 1:
                c.fail(f"batch {key[0]}/{key[1]}#{b['batch_index']} starts at line {b['line_start']} of {f}, "
                       f"expected {covered[f] + 1}")
            covered[f] = b["line_start"] + b["line_count"] - 1
            lines = sources.batch_lines(f, b["line_start"], b["line_count"])
            records += len(lines)
            if b["rows_attempted"] != len(lines):
                c.fail(f"batch {key[0]}/{key[1]}#{b['batch_index']} plans {b['rows_attempted']} records; "
                       f"lines {b['line_start']}..{covered[f]} of {f} hold {len(lines)}")
        total = sum(1 for f in files for ln in sources.lines[f] if not ln.blank)
        if records != total or r["rows_planned"] != total:
            c.fail(f"run {key[0]}/{key[1]} plans {r['rows_planned']} records in batches of {records}; "
                   f"its sources hold {total}")
    return c


def _committed_batches_match_their_lines(batches: list[dict[str, Any]],
                                         rejected: dict[tuple[str, str, int], list[tuple[str, int]]],
                                         sources: Sources) -> Check:
    c = Check("each committed batch counts its lines exactly: attempted = validated + rejected, the rejected "
              "lines are the invalid ones, inserted + updated + superseded = validated")
    for b in batches:
        if b["status"] != "succeeded":
            continue
        where = f"batch {b['etl_job_id']}/{b['etl_run_id']}#{b['batch_index']}"
        lines = sources.batch_lines(b["source_file"], b["line_start"], b["line_count"])
        valid = sum(1 for ln in lines if ln.valid)
        invalid = sorted((b["source_file"], ln.line_no) for ln in lines if not ln.valid)
        got = sorted(rejected.get((b["etl_job_id"], b["etl_run_id"], b["batch_index"]), []))
        if (b["rows_attempted"], b["rows_validated"], b["validation_failures"]) != (len(lines), valid, len(invalid)):
            c.fail(f"{where}: attempted/validated/rejected {b['rows_attempted']}/{b['rows_validated']}/"
                   f"{b['validation_failures']}, its lines say {len(lines)}/{valid}/{len(invalid)}")
        if b["rows_attempted"] != b["rows_validated"] + b["validation_failures"]:
            c.fail(f"{where}: attempted {b['rows_attempted']} != validated {b['rows_validated']} + rejected "
                   f"{b['validation_failures']}")
        if got != invalid:
            c.fail(f"{where}: rejects at lines {[n for _, n in got][:8]}, invalid lines {[n for _, n in invalid][:8]}")
        if b["rows_inserted"] + b["rows_updated"] + b["rows_superseded"] != b["rows_validated"]:
            c.fail(f"{where}: inserted {b['rows_inserted']} + updated {b['rows_updated']} + superseded "
                   f"{b['rows_superseded']} != validated {b['rows_validated']}")
    return c


def _uncommitted_batches_leave_nothing(batches: list[dict[str, Any]],
                                       rejected: dict[tuple[str, str, int], list[tuple[str, int]]]) -> Check:
    c = Check("a batch that did not commit counts no row and left no reject")
    for b in batches:
        if b["status"] == "succeeded":
            continue
        where = f"batch {b['etl_job_id']}/{b['etl_run_id']}#{b['batch_index']} ({b['status']})"
        counts = (b["rows_inserted"], b["rows_updated"], b["rows_validated"], b["validation_failures"])
        if any(counts):
            c.fail(f"{where} counts inserted/updated/validated/rejected {counts}")
        if rejected.get((b["etl_job_id"], b["etl_run_id"], b["batch_index"])):
            c.fail(f"{where} has rejects")
    return c


def _contracts_equal_the_ledger(runs: list[dict[str, Any]], by_run: dict[tuple[str, str], list[dict[str, Any]]],
                                contracts: dict[tuple[str, str], dict[str, Any]]) -> Check:
    c = Check("every run contract equals the sums of its committed batches")
    for r in runs:
        key = (r["etl_job_id"], r["etl_run_id"])
        contract = contracts.get(key)
        if contract is None:
            c.fail(f"no contract for run {key[0]}/{key[1]}")
            continue
        ok = [b for b in by_run.get(key, []) if b["status"] == "succeeded"]
        want = {
            "status": r["status"],
            "rows_inserted": sum(b["rows_inserted"] for b in ok),
            "rows_updated": sum(b["rows_updated"] for b in ok),
            "rows_validated": sum(b["rows_validated"] for b in ok),
            "batches_succeeded": len(ok),
            "batches_failed": sum(1 for b in by_run.get(key, []) if b["status"] == "failed"),
            "batches_total": int(r["batches_total"] or 0),
        }
        got = {"status": contract["status"], **{k: contract["metrics"][k] for k in want if k != "status"}}
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            c.fail(f"run {key[0]}/{key[1]}: contract vs ledger {diff}")
    return c


@dataclass(frozen=True)
class Winner:
    order: tuple[int, int, int]  # run_seq, file in load order, line
    job: str
    run: str
    data: Any


def _last_wins(runs: list[dict[str, Any]], by_run: dict[tuple[str, str], list[dict[str, Any]]],
               sources: Sources) -> dict[str, Winner]:
    """The staging table the rule promises: of every record of every committed batch, per key the one of
    the latest-started run, then latest in that run's sources, whatever the order batches committed."""
    best: dict[str, Winner] = {}
    for r in runs:
        key = (r["etl_job_id"], r["etl_run_id"])
        for b in by_run.get(key, []):
            if b["status"] != "succeeded":
                continue
            for ln in sources.batch_lines(b["source_file"], b["line_start"], b["line_count"]):
                if not ln.valid:
                    continue
                order = (int(r["run_seq"]), ln.file_index, ln.line_no)
                old = best.get(ln.key)
                if old is None or old.order < order:
                    best[ln.key] = Winner(order, key[0], key[1], ln.data)
    return best


def _table_is_the_last_wins_result(expected: dict[str, Winner], table: dict[str, dict[str, Any]]) -> Check:
    c = Check("the staging table equals the last-wins result of the committed batches, row by row, lineage too")
    for sid in sorted(set(expected) - set(table)):
        c.fail(f"{sid}: missing from the table; expected from {expected[sid].job}/{expected[sid].run}")
    for sid in sorted(set(table) - set(expected)):
        c.fail(f"{sid}: in the table (from {table[sid]['etl_job_id']}/{table[sid]['etl_run_id']}) but in no "
               "committed batch")
    for sid in sorted(set(expected) & set(table)):
        w, row = expected[sid], table[sid]
        got = (row["etl_job_id"], row["etl_run_id"], int(row["etl_run_seq"]), row["data"])
        if got != (w.job, w.run, w.order[0], w.data):
            c.fail(f"{sid}: table has {got[:3]} {json.dumps(got[3])[:80]}, expected {(w.job, w.run, w.order[0])} "
                   f"{json.dumps(w.data)[:80]}")
    return c


def _row_count_is_the_inserts(batches: list[dict[str, Any]], table: dict[str, dict[str, Any]]) -> Check:
    c = Check("the table's row count equals the committed batches' inserts")
    inserted = sum(b["rows_inserted"] for b in batches if b["status"] == "succeeded")
    if inserted != len(table):
        c.fail(f"{len(table)} rows in the table, {inserted} inserts counted")
    return c


def summarize(conn: psycopg.Connection[Any], ledger: str) -> dict[str, dict[str, int]]:
    """Runs, batches and attempts by status, for the report."""
    out: dict[str, dict[str, int]] = {}
    for name in ("runs", "batches", "attempts"):
        rows = conn.execute(sql.SQL("SELECT status, count(*) FROM {} GROUP BY status ORDER BY status").format(
            sql.Identifier(ledger, name))).fetchall()
        out[name] = {str(s): int(n) for s, n in rows}
    return out


def count_by(values: Sequence[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


_NAMED = re.compile(r"\b(soak-[a-z])/(r\d{4})(?:#(\d+))?")


def dump_evidence(conn: psycopg.Connection[Any], ledger: str, checks: Sequence[Check], folder: Path) -> list[Path]:
    """For every run a failed check names: its ledger row, the batches named (with their attempts) and its
    events, one JSON file per run in ``folder``, to read after the servers are gone."""
    named: dict[tuple[str, str], set[int]] = defaultdict(set)
    for c in checks:
        for line in c.evidence:
            for job, run, batch in _NAMED.findall(line):
                named[(job, run)].update({int(batch)} if batch else set())
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (job, run), indexes in sorted(named.items()):
        where = sql.SQL("WHERE etl_job_id = %s AND etl_run_id = %s")
        picked = sql.SQL(" AND batch_index = ANY(%s)") if indexes else sql.SQL("")
        params = [job, run, sorted(indexes)] if indexes else [job, run]
        found = {
            "run": _rows(conn, sql.SQL("SELECT * FROM {} ").format(sql.Identifier(ledger, "runs")) + where, [job, run]),
            "batches": _rows(conn, sql.SQL("SELECT * FROM {} ").format(sql.Identifier(ledger, "batches")) + where
                             + picked + sql.SQL(" ORDER BY batch_index"), params),
            "attempts": _rows(conn, sql.SQL("SELECT * FROM {} ").format(sql.Identifier(ledger, "attempts")) + where
                              + picked + sql.SQL(" ORDER BY batch_index, attempt"), params),
            "events": _rows(conn, sql.SQL("SELECT * FROM {} ").format(sql.Identifier(ledger, "events")) + where
                            + sql.SQL(" ORDER BY id"), [job, run]),
        }
        path = folder / f"{job}-{run}.json"
        path.write_text(json.dumps(found, indent=1, default=str))
        written.append(path)
    return written
