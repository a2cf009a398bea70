"""Source files and objects: find them, cut them into batches, and read a batch back exactly, line by line.

A source is a path on this host or a URL of an object store or HTTP server (loader/storage.py reaches those):
both are read the same way, as a stream of bytes, and a batch is read again by byte range where the store
allows it, else from the copy of its bytes kept in the ledger.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from . import config, json_array, storage
from .errors import SourceChanged, SourceError
from .storage import SourceObject

NDJSON_SUFFIXES = (".ndjson", ".jsonl")
JSON_SUFFIXES = (".json",)
BOM = b"\xef\xbb\xbf"
#: What is kept of a record longer than ETL_MAX_RECORD_BYTES: its first bytes, for the reject's sample.
OVERSIZED_HEAD_BYTES = 64 * 1024
#: How an over-long line stands in a batch's payload (gzip sources): no JSON text starts with a NUL.
_OVERSIZED_MARK = b"\x00dataloader-oversized-record "
#: Bytes read at a time while skipping the rest of an over-long line.
_SKIP_CHUNK = 1 << 20
#: The read buffer of a plain file opened to be read through (planning): one read() a MiB, not one per 8 KiB.
_PLAN_BUFFER = 1 << 20
#: How a batch's checksum starts: the digest that made it (``batches.checksum``, "sha256:<hex>"). SHA-256
#: because CPUs hash it in hardware (SHA-NI): about twice as fast as blake2b in CPython, about 1 ns a byte.
CHECKSUM_PREFIX = "sha256:"


def _hasher() -> hashlib._Hash:
    return hashlib.sha256()


def _checksum_text(h: hashlib._Hash) -> str:
    return CHECKSUM_PREFIX + h.hexdigest()


def checksum(data: bytes) -> str:
    """The checksum the ledger keeps for these bytes (a batch's byte range, or its stored payload).

    Example::

        checksum(batch.payload)  # 'sha256:9f86d0…'
    """
    h = _hasher()
    h.update(data)
    return _checksum_text(h)


class _BatchChecksum:
    """The checksum of the bytes fed since the last ``take``: the planner's, one batch after another."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = _hasher()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def take(self) -> str:
        text = _checksum_text(self._h)
        self._h = _hasher()
        return text


class OversizedRecord(bytes):
    """The first bytes of a record longer than ETL_MAX_RECORD_BYTES; ``size`` is its whole length.

    The rest was read past, never held: validation rejects it as a json_shape error.
    """

    size: int

    def __new__(cls, head: bytes, size: int) -> OversizedRecord:
        obj = super().__new__(cls, head)
        obj.size = size
        return obj


def max_record_bytes() -> int:
    """ETL_MAX_RECORD_BYTES: the longest record (source line) that is read and validated."""
    return config.get_int("ETL_MAX_RECORD_BYTES", minimum=1)


def _lines(f: IO[bytes], limit: int, feed: Callable[[bytes], None] | None = None
           ) -> Iterator[tuple[bytes, int]]:
    """The lines of ``f`` (with their newline) and their length in bytes, never holding more than ``limit``
    bytes of one: a longer record comes as an OversizedRecord of its first bytes, its rest read past.

    Read in pieces of _SKIP_CHUNK: a line over the limit costs at most ``limit`` bytes of memory (one
    ``readline(limit + 1)`` peaked at twice that, while it joined its own pieces). ``feed`` gets every
    byte read, the parts read past included, before its line is yielded (the batch checksum).
    """
    while piece := f.readline(_SKIP_CHUNK):
        if feed is not None:
            feed(piece)
        if piece.endswith(b"\n") or len(piece) < _SKIP_CHUNK:  # the whole line (the last may lack "\n")
            yield piece, len(piece)
            continue
        parts, size, over = [piece], len(piece), False
        while more := f.readline(_SKIP_CHUNK):
            if feed is not None:
                feed(more)
            size += len(more)
            ended = more.endswith(b"\n")
            if not over:
                parts.append(more)
                over = size - ended > limit
                if over:
                    head = parts[0][:OVERSIZED_HEAD_BYTES]
                    parts.clear()
            if ended:
                break
        if over:
            yield OversizedRecord(head, size), size
        else:
            yield b"".join(parts), size


@dataclass(frozen=True)
class PlannedBatch:
    """Where one batch's records are, so any worker can read exactly them again on retry.

    Plain files are re-read by byte range, checked against the size and mtime seen when planning and
    against ``checksum``, the digest of the range's bytes (mtimes can be put back, be coarse or fixed);
    gzip and JSON-array sources cannot be seeked, so their batch keeps its own copy (``payload``,
    zlib-compressed NDJSON) in the ledger, and ``checksum`` is the digest of that payload. None: planned
    before checksums (ledger 0003), verified by size and mtime only.

    An object (``file`` is its URL) is re-read by byte range too, checked against its ``version`` (ETag,
    version id or generation) and size, then the checksum; an object whose store cannot read a range (an
    HTTP server that ignores ``Range``) keeps its batches' bytes like a gzip file. The ledger keeps the
    version in the checksum's column, after the digest and a space, e.g. ``sha256:9f86… ETag="5d41…"``
    (:meth:`ledger_checksum`, :func:`from_ledger`): no schema change, and a file's checksum reads as before.
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
    checksum: str | None = None
    version: str | None = None

    def ledger_checksum(self) -> str | None:
        """What ``batches.checksum`` holds: the digest, then a space and the object's version if it has one."""
        if self.version is None or self.checksum is None:
            return self.checksum
        return f"{self.checksum} {self.version}"


def from_ledger(index: int, file: str, file_size: int, file_mtime_ns: int, byte_start: int, byte_end: int,
                line_start: int, line_count: int, records: int, ord_start: int, payload: bytes | None,
                checksum: str | None) -> PlannedBatch:
    """A batch as its ledger row describes it (the inverse of :meth:`PlannedBatch.ledger_checksum`)."""
    version = None
    if checksum is not None and " " in checksum:
        checksum, version = checksum.split(" ", 1)
    return PlannedBatch(index, file, file_size, file_mtime_ns, byte_start, byte_end, line_start, line_count,
                        records, ord_start, payload, checksum, version)


def _suffixed(name: str | Path) -> str:
    """The part of a source's name whose suffix tells its format, in lower case: a URL's path (its query,
    ``?versionId=...``, is not part of the name), else the path itself."""
    text = str(name).lower()
    return urlsplit(text).path if storage.is_remote(text) else text


def is_gzip(name: str) -> bool:
    """Whether a file or object is gzip, by its name."""
    return _suffixed(name).endswith(".gz")


def source_kind(path: str | Path) -> str:
    """'ndjson' or 'json' (a top-level array), by the file's suffix; '.gz' is allowed after either. A URL's
    suffix is its path's (``s3://b/k.ndjson?versionId=...``, ``https://h/x.json?page=2``)."""
    name = _suffixed(path)
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    raise SourceError(
        f"{path}: unsupported source format (expected .ndjson, .jsonl or .json, optionally .gz)", file=str(path)
    )


def resolve_source(pattern: str, options: Mapping[str, Any] | None = None) -> list[SourceObject]:
    """The files or objects a job's ``source`` names, in lexicographic order (the order in which a later record
    wins over an earlier one of the same key); a clear error if none. ``options``: the job's storage_options.
    """
    if storage.is_remote(pattern):
        objects = storage.resolve(pattern, options)
        for o in objects:
            source_kind(o.name)
        return objects
    if pattern.lower().startswith("file://"):
        pattern = pattern[len("file://"):]
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
    return [_local_object(f) for f in files]


def _local_object(path: Path) -> SourceObject:
    stat = path.stat()
    return SourceObject(str(path), stat.st_size, stat.st_mtime_ns)


def _open(source: SourceObject, options: Mapping[str, Any] | None) -> IO[bytes]:
    gz = is_gzip(source.name)
    if source.remote:
        stream = storage.open_stream(source, options)
        return _GzipStream(stream) if gz else stream  # type: ignore[return-value]
    path = Path(source.name)
    try:
        if gz:
            return gzip.open(path, "rb")  # type: ignore[return-value]
        # The planner reads every line of the file: through the default 8 KiB buffer that is one read() per
        # 7 lines of 1 KB (planning 100k such records: 0.154 -> 0.123 s with this buffer).
        return open(path, "rb", buffering=_PLAN_BUFFER)  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise SourceError(f"source file {path} cannot be read: {exc.strerror}", file=str(path)) from None


class _GzipStream(gzip.GzipFile):
    """A store's stream, decompressed; closing it closes the stream too (GzipFile leaves a ``fileobj`` it was
    given open, and the store's connection with it)."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(fileobj=stream, mode="rb")
        self._stream = stream

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stream.close()


def plan_batches(files: list[SourceObject], batch_size: int, options: Mapping[str, Any] | None = None
                 ) -> Iterator[PlannedBatch]:
    """Cut the files or objects into batches of ``batch_size`` records (non-blank lines or array elements).

    Streams: memory stays flat whatever the size of the source. A batch never spans two files.

    Example::

        for batch in plan_batches(resolve_source("data/*.ndjson"), 1000): ...
    """
    index = 0
    ord_base = 0
    for path in files:
        kind = source_kind(path.name)
        keep = is_gzip(path.name) or not path.ranged
        lines_in_file = 0
        try:
            if kind == "json":
                chunks = _json_array_chunks(path, batch_size, options)
            else:
                chunks = _ndjson_chunks(path, batch_size, keep, options)
            for byte_start, byte_end, line_start, line_count, records, payload, digest in chunks:
                if payload is not None:
                    digest = checksum(payload)
                yield PlannedBatch(index, path.name, path.size, path.mtime_ns, byte_start, byte_end,
                                   line_start, line_count, records, ord_base + line_start, payload, digest,
                                   None if payload is not None else path.version)
                index += 1
                lines_in_file = line_start + line_count - 1
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise SourceError(f"{_what(path.name)} is not a complete gzip file ({exc})", file=path.name) from None
        except OSError as exc:
            raise SourceError(f"{_what(path.name)} cannot be read: {exc}", file=path.name) from None
        ord_base += lines_in_file + 1


#: What a chunker yields per batch: byte_start, byte_end, line_start, line_count, records, payload and the
#: checksum of the byte range (None when the batch has a payload: its checksum is the payload's).
_Chunk = tuple[int, int, int, int, int, bytes | None, str | None]


def _oversized_mark(head: bytes, size: int) -> bytes:
    """How an over-long record stands in a kept payload: the mark, its size and its first bytes on one line
    (for the reject's sample, as a plain file's over-long line gives it)."""
    return _OVERSIZED_MARK + b"%d " % size + head[:OVERSIZED_HEAD_BYTES].replace(b"\r", b" ").replace(b"\n", b" ")


def _ndjson_chunks(path: SourceObject, batch_size: int, keep_payload: bool, options: Mapping[str, Any] | None
                   ) -> Iterator[_Chunk]:
    # A plain file's batch is re-read by byte range: hash its bytes as they are read (never twice).
    digest = None if keep_payload else _BatchChecksum()
    feed = None if digest is None else digest.update
    with _open(path, options) as f:
        offset = 0
        start = 0
        line_no = 0
        line_start = 1
        records = 0
        buf: list[bytes] = []
        for line, size in _lines(f, max_record_bytes(), feed):
            line_no += 1
            offset += size
            if keep_payload:
                buf.append(_oversized_mark(line, size) + b"\n" if isinstance(line, OversizedRecord) else line)
            if isinstance(line, OversizedRecord) or _record(line):
                records += 1
            if records == batch_size:
                payload = zlib.compress(b"".join(buf), 1) if keep_payload else None
                yield (start, offset, line_start, line_no - line_start + 1, records, payload,
                       None if digest is None else digest.take())
                start, line_start, records, buf = offset, line_no + 1, 0, []
        if records:
            payload = zlib.compress(b"".join(buf), 1) if keep_payload else None
            yield (start, offset, line_start, line_no - line_start + 1, records, payload,
                   None if digest is None else digest.take())


def _first_byte(path: SourceObject, options: Mapping[str, Any] | None) -> bytes:
    """The first byte of the source's JSON text (after a BOM and whitespace), b"" when there is none."""
    with _open(path, options) as f:
        chunk = f.read(json_array.READ_BYTES).removeprefix(BOM)
        while chunk:
            if text := chunk.lstrip(b" \t\r\n"):
                return text[:1]
            chunk = f.read(json_array.READ_BYTES)
    return b""


def _json_array_chunks(path: SourceObject, batch_size: int, options: Mapping[str, Any] | None
                       ) -> Iterator[_Chunk]:
    """A JSON array's batches: each element written as one NDJSON line of the batch's payload.

    Elements are cut out by :mod:`json_array`, never built whole: one longer than ETL_MAX_RECORD_BYTES is
    read past and stands in the payload as over-long, as a gzip source's over-long line does.
    """
    first = _first_byte(path, options)
    if first != b"[":
        found = {b"": "nothing", b"{": "an object"}.get(first, "a single value")
        raise SourceError(f"{_what(path.name)} must hold a JSON array of records at the top level, "
                          f"found {found}", file=path.name)
    with _open(path, options) as f:
        element = 0
        line_start = 1
        buf: list[bytes] = []
        try:
            for item in json_array.elements(f, max_record_bytes(), OVERSIZED_HEAD_BYTES):
                element += 1
                if item.whole:  # one line: the decoder refused raw line breaks in strings, so these are spacing
                    buf.append(item.text.replace("\r", " ").replace("\n", " ").encode("utf-8"))
                else:
                    buf.append(_oversized_mark(item.head.encode("utf-8", "surrogatepass"), item.size))
                if len(buf) == batch_size:
                    yield 0, 0, line_start, len(buf), len(buf), zlib.compress(b"\n".join(buf), 1), None
                    line_start, buf = element + 1, []
        except json_array.ArraySyntaxError as exc:  # not a store's error, nor a changed object: those go as they are
            raise SourceError(f"{_what(path.name)} is not valid JSON: {exc}", file=path.name) from None
        if buf:
            yield 0, 0, line_start, len(buf), len(buf), zlib.compress(b"\n".join(buf), 1), None


def _what(name: str) -> str:
    """How errors name a source: 'source file PATH' or 'source object URL'."""
    return f"source {'object' if storage.is_remote(name) else 'file'} {name}"


def read_batch(batch: PlannedBatch, options: Mapping[str, Any] | None = None) -> Iterator[tuple[int, bytes]]:
    """The batch's records as (line number in the source, raw bytes); blank lines are skipped.

    For a .json array the "line" is the element's position (1-based). ``options``: the job's storage_options
    (an object's batch is read from its store, by byte range).

    Raises SourceChanged when the bytes are not those planned: at once when the file's size or mtime
    differ, after the last record when its checksum does (the caller stages records as they come and
    must write nothing of a batch whose read raised).
    """
    line_no = batch.line_start
    if batch.payload is not None:
        if batch.checksum is not None and (found := checksum(batch.payload)) != batch.checksum:
            # The file is never read again for this batch: only the ledger's own copy can differ.
            raise SourceChanged(
                f"batch {batch.index} of {_what(batch.file)}: its copy in the ledger changed after the "
                f"run was planned (checksum {batch.checksum} at planning, {found} now); start a new run to "
                "load the file's current content", file=batch.file, batch=batch.index)
        for line in zlib.decompress(batch.payload).split(b"\n"):
            if line.startswith(_OVERSIZED_MARK):
                length, _, head = line[len(_OVERSIZED_MARK):].partition(b" ")  # an older payload has no head
                yield line_no, OversizedRecord(head, int(length))
            elif raw := _record(line):
                yield line_no, raw
            line_no += 1
        return
    if storage.is_remote(batch.file):
        yield from _read_object_range(batch, options)
        return
    path = Path(batch.file)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SourceError(f"source file {path} was removed after the run was planned", file=str(path)) from None
    if stat.st_size != batch.file_size or stat.st_mtime_ns != batch.file_mtime_ns:
        raise SourceChanged(
            f"source file {path} changed after the run was planned (size {batch.file_size} -> {stat.st_size} "
            f"bytes, mtime {batch.file_mtime_ns} -> {stat.st_mtime_ns} ns); start a new run to load its "
            "current content", file=str(path), batch=batch.index)
    digest = _hasher()
    try:
        # A buffer the size of the batch's bytes (up to _SKIP_CHUNK): one read() for a whole batch of small
        # lines instead of one per 8 KiB, which cost a busy worker more than validating the records did.
        with open(path, "rb", buffering=min(max(batch.byte_end - batch.byte_start, 1 << 16), _SKIP_CHUNK)) as f:
            f.seek(batch.byte_start)
            yield from _range_records(f, batch, digest)
    except OSError as exc:
        raise SourceError(f"source file {path} cannot be read: {exc.strerror}", file=str(path)) from None
    if batch.checksum is not None and (found := _checksum_text(digest)) != batch.checksum:
        raise SourceChanged(
            f"source file {path} changed after the run was planned: batch {batch.index} (bytes "
            f"{batch.byte_start}-{batch.byte_end}) has checksum {found}, {batch.checksum} at planning, though "
            "its size and mtime are unchanged; start a new run to load its current content",
            file=str(path), batch=batch.index)


def _range_records(f: IO[bytes], batch: PlannedBatch, digest: hashlib._Hash) -> Iterator[tuple[int, bytes]]:
    """The records of the batch's byte range, ``f`` positioned at its start, line by line as the planner cut
    them (an over-long line is read past, never held); ``digest`` gets every byte read."""
    line_no = batch.line_start
    left = batch.byte_end - batch.byte_start
    for line, size in _lines(f, max_record_bytes(), digest.update):
        if isinstance(line, OversizedRecord):
            yield line_no, line
        elif raw := _record(line):
            yield line_no, raw
        line_no += 1
        left -= size
        if left <= 0:
            break


def _read_object_range(batch: PlannedBatch, options: Mapping[str, Any] | None) -> Iterator[tuple[int, bytes]]:
    """An object's batch, by byte range from its store: the version and size are checked when it is opened,
    the checksum after its last record (as for a file)."""
    obj = SourceObject(batch.file, batch.file_size, batch.file_mtime_ns, batch.version)
    digest = _hasher()
    with storage.open_range(obj, batch.byte_start, batch.byte_end, batch.index, options) as f:
        yield from _range_records(f, batch, digest)
    if batch.checksum is not None and (found := _checksum_text(digest)) != batch.checksum:
        raise SourceChanged(
            f"source object {batch.file} changed after the run was planned: batch {batch.index} (bytes "
            f"{batch.byte_start}-{batch.byte_end}) has checksum {found}, {batch.checksum} at planning; start a "
            "new run to load its current content", file=batch.file, batch=batch.index)


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
