"""Source files: find them, cut them into batches, and read a batch back exactly, line by line."""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import ijson
import simplejson

from .errors import SourceError

NDJSON_SUFFIXES = (".ndjson", ".jsonl")
JSON_SUFFIXES = (".json",)
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class PlannedBatch:
    """Where one batch's records are, so any worker can read exactly them again on retry.

    Plain files are re-read by byte range (checked against the size and mtime seen when planning);
    gzip and JSON-array sources cannot be seeked, so their batch keeps its own copy (``payload``,
    zlib-compressed NDJSON) in the ledger.
    """

    index: int
    file: str
    file_size: int
    file_mtime_ns: int
    byte_start: int
    byte_end: int
    line_start: int
    line_count: int
    records: int
    ord_start: int
    payload: bytes | None = None


def source_kind(path: str | Path) -> str:
    """'ndjson' or 'json' (a top-level array), by the file's suffix; '.gz' is allowed after either."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    raise SourceError(
        f"{path}: unsupported source format (expected .ndjson, .jsonl or .json, optionally .gz)", file=str(path)
    )


def resolve_source(pattern: str) -> list[Path]:
    """The files a job's ``source`` names, sorted so batch order is stable; a clear error if none."""
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise SourceError(f"source {pattern} matches no file", source=pattern)
    else:
        path = Path(pattern)
        if not path.exists():
            raise SourceError(f"source file {pattern} not found", source=pattern)
        if not path.is_file():
            raise SourceError(f"source {pattern} is not a file", source=pattern)
        files = [path]
    for f in files:
        source_kind(f)
        if not os.access(f, os.R_OK):
            raise SourceError(f"source file {f} cannot be read (permission denied)", file=str(f))
    return files


def _open(path: Path) -> IO[bytes]:
    try:
        if str(path).lower().endswith(".gz"):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise SourceError(f"source file {path} cannot be read: {exc.strerror}", file=str(path)) from None


def plan_batches(files: list[Path], batch_size: int) -> Iterator[PlannedBatch]:
    """Cut the files into batches of ``batch_size`` records (non-blank lines or array elements).

    Streams: memory stays flat whatever the size of the source. A batch never spans two files.

    Example::

        for batch in plan_batches(resolve_source("data/*.ndjson"), 1000): ...
    """
    index = 0
    ord_base = 0
    for path in files:
        stat = path.stat()
        kind = source_kind(path)
        gz = str(path).lower().endswith(".gz")
        lines_in_file = 0
        try:
            if kind == "json":
                chunks = _json_array_chunks(path, batch_size)
            else:
                chunks = _ndjson_chunks(path, batch_size, keep_payload=gz)
            for byte_start, byte_end, line_start, line_count, records, payload in chunks:
                yield PlannedBatch(index, str(path), stat.st_size, stat.st_mtime_ns, byte_start, byte_end,
                                   line_start, line_count, records, ord_base + line_start, payload)
                index += 1
                lines_in_file = line_start + line_count - 1
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise SourceError(f"source file {path} is not a complete gzip file ({exc})", file=str(path)) from None
        except OSError as exc:
            raise SourceError(f"source file {path} cannot be read: {exc}", file=str(path)) from None
        ord_base += lines_in_file + 1


def _ndjson_chunks(path: Path, batch_size: int, keep_payload: bool
                   ) -> Iterator[tuple[int, int, int, int, int, bytes | None]]:
    with _open(path) as f:
        offset = 0
        start = 0
        line_no = 0
        line_start = 1
        records = 0
        buf: list[bytes] = []
        for line in f:
            line_no += 1
            offset += len(line)
            if keep_payload:
                buf.append(line)
            if _record(line):
                records += 1
            if records == batch_size:
                payload = zlib.compress(b"".join(buf), 1) if keep_payload else None
                yield start, offset, line_start, line_no - line_start + 1, records, payload
                start, line_start, records, buf = offset, line_no + 1, 0, []
        if records:
            payload = zlib.compress(b"".join(buf), 1) if keep_payload else None
            yield start, offset, line_start, line_no - line_start + 1, records, payload


def _json_array_chunks(path: Path, batch_size: int) -> Iterator[tuple[int, int, int, int, int, bytes | None]]:
    with _open(path) as f:
        try:
            first = next(ijson.parse(f), None)
        except ijson.JSONError as exc:
            raise SourceError(f"source file {path} is not valid JSON: {exc}", file=str(path)) from None
        if first is None or first[1] != "start_array":
            found = "nothing" if first is None else {"start_map": "an object"}.get(first[1], "a single value")
            raise SourceError(f"source file {path} must hold a JSON array of records at the top level, "
                              f"found {found}", file=str(path))
    with _open(path) as f:
        element = 0
        line_start = 1
        buf: list[bytes] = []
        try:
            for item in ijson.items(f, "item", use_float=False):
                element += 1
                buf.append(simplejson.dumps(item, use_decimal=True, ensure_ascii=False,
                                            separators=(",", ":")).encode("utf-8"))
                if len(buf) == batch_size:
                    yield 0, 0, line_start, len(buf), len(buf), zlib.compress(b"\n".join(buf), 1)
                    line_start, buf = element + 1, []
        except ijson.JSONError as exc:
            raise SourceError(f"source file {path} is not valid JSON after element {element}: {exc}",
                              file=str(path)) from None
        if buf:
            yield 0, 0, line_start, len(buf), len(buf), zlib.compress(b"\n".join(buf), 1)


def read_batch(batch: PlannedBatch) -> Iterator[tuple[int, bytes]]:
    """The batch's records as (line number in the source, raw bytes); blank lines are skipped.

    For a .json array the "line" is the element's position (1-based).
    """
    if batch.payload is not None:
        data = zlib.decompress(batch.payload)
    else:
        path = Path(batch.file)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise SourceError(f"source file {path} was removed after the run was planned", file=str(path)) from None
        if stat.st_size != batch.file_size or stat.st_mtime_ns != batch.file_mtime_ns:
            raise SourceError(f"source file {path} changed after the run was planned; start a new run",
                              file=str(path))
        try:
            with open(path, "rb") as f:
                f.seek(batch.byte_start)
                data = f.read(batch.byte_end - batch.byte_start)
        except OSError as exc:
            raise SourceError(f"source file {path} cannot be read: {exc.strerror}", file=str(path)) from None
    line_no = batch.line_start
    for line in data.split(b"\n"):
        if raw := _record(line):
            yield line_no, raw
        line_no += 1


def _record(line: bytes) -> bytes:
    """The record a line holds (empty for a blank one), without surrounding whitespace or a leading BOM.

    A byte-order mark is never part of a JSON text. Besides the file's first line it starts every file
    that was appended to another (``cat a.ndjson b.ndjson``): the planner and the reader both drop it
    wherever a line starts with one, so they agree on which lines are records.
    """
    raw = line.strip()
    if raw.startswith(BOM):
        raw = raw[len(BOM):].strip()
    return raw
