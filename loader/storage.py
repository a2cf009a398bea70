"""Objects in stores that fsspec reaches (S3 and S3-compatible, GCS, Azure, HTTP): find, describe and open them.

A job's ``source`` may be a URL instead of a path. This module is the one place that talks to fsspec: the
planner and the workers see a :class:`SourceObject` (its URL as the user would write it, its size, version
and whether it can be read by byte range) and a binary file object, and every store error comes out as a
SourceError that names the object and never a credential.

Credentials come from each store's standard configuration (for S3 the AWS environment variables, including
``AWS_ENDPOINT_URL``, profiles and instance roles), plus the job's ``storage_options``, whose strings may name
environment variables as ``"${VAR}"``: they are expanded here, at use, on the host that reads, so the catalog
and the ledger hold only the names.
"""

from __future__ import annotations

import errno
import io
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from . import db
from .errors import CatalogError, LoaderError, SourceChanged, SourceError, TransientSourceError

#: URL schemes read through fsspec; anything else (no scheme, or ``file://``) is a path on this host.
REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})
#: Schemes whose sources are one object each: a glob is not expanded (``*`` is a valid character in a URL).
SINGLE_OBJECT_SCHEMES = frozenset({"http", "https"})
#: Which package brings each scheme's file system, for the error when it is not installed.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}
#: Bytes fetched per request while an object is read in order (planning, and a batch's byte range).
BLOCK_BYTES = 8 << 20
#: ``"${VAR}"``: an environment variable's value, expanded where the options are used.
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Option names that hold secrets: their values must be "${VAR}" references, never literal text.
_SECRET_NAME_RE = re.compile(r"secret|passw|token|credential|(^|[_-])key$|account_key|access_key|api[_-]?key|"
                             r"sas|connection_string|authorization|cookie|(^|[_-])auth$|signature|(^|[_-])sig$",
                             re.IGNORECASE)
#: What a "secret" option may say in plain words: gcsfs's ``token`` modes ("anon", "google_default", ...).
_NOT_SECRETS = frozenset({"anon", "google_default", "cache", "cloud", "browser"})
#: A URL with a password in it (``scheme://user:password@host``), wherever an option holds one.
_USERINFO_RE = re.compile(r"://[^/@\s]*:[^/@\s]*@")
#: Query parameters that make a URL a credential (presigned S3/GCS URLs, Azure SAS): refused in a source.
_SIGNED_QUERY = frozenset({"x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                           "x-goog-credential", "sig", "signature", "token", "access_token", "api_key", "apikey",
                           "key", "code", "password", "secret", "auth"})


@dataclass(frozen=True)
class SourceObject:
    """One file or object of a source, as planning saw it.

    ``name`` is what the ledger, the contract and the console show: the path, or the URL as the user would
    write it (``s3://bucket/key``). ``version`` is the store's identity of this content (S3 ETag or version
    id, GCS generation, HTTP ETag), None for local files. ``ranged``: a batch can be read again by byte range
    (local files, S3/GCS/Azure, HTTP servers that honour ``Range``); otherwise its bytes are kept in the ledger.
    """

    name: str
    size: int
    mtime_ns: int
    version: str | None = None
    ranged: bool = True

    @property
    def remote(self) -> bool:
        return is_remote(self.name)


def scheme(source: str) -> str:
    """The URL scheme of ``source`` in lower case, or '' for a plain path."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", source)
    return m.group(1).lower() if m else ""


def is_remote(source: str) -> bool:
    """True when ``source`` is read through fsspec (an object store or HTTP), not from this host's disk."""
    return scheme(source) in REMOTE_SCHEMES


def check_source_url(source: str, job: str) -> None:
    """Refuse a source URL that carries a credential (``user:password@``, a presigned or SAS query): the
    catalog and the ledger keep the source as written, so a secret there would be shown and stored."""
    parts = urlsplit(source)
    if parts.password is not None or (parts.username and scheme(source) in SINGLE_OBJECT_SCHEMES):
        raise CatalogError(f"job {job!r}: source must not carry credentials (user:password@); give them in "
                           "storage_options as \"${VAR}\" references", job=job, key="source")
    signed = sorted(k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SIGNED_QUERY)
    if signed:
        raise CatalogError(f"job {job!r}: source must not carry a signature or token in its query ({signed[0]}); "
                           "give credentials in storage_options as \"${VAR}\" references", job=job, key="source")


def check_options(value: object, job: str, where: str = "storage_options") -> dict[str, Any]:
    """Check a job's ``storage_options`` table as written in the catalog (never expanded here).

    Values are strings, numbers, booleans or nested tables; an option whose name says it is a secret (key,
    secret, token, password, credential, SAS, connection string) must be exactly one ``"${VAR}"`` reference.
    """
    if not isinstance(value, dict):
        raise CatalogError(f"job {job!r}: {where} must be a table of options", job=job, key="storage_options")

    def secret(here: str) -> CatalogError:
        return CatalogError(f"job {job!r}: {here} is a secret: write it as \"${{VAR}}\", the name of an "
                            "environment variable that holds it, never the value itself", job=job,
                            key="storage_options")

    # Every name on the way counts: headers = {Authorization = ...}, client_kwargs.headers.X-Api-Key, a list
    # under "secret"; a number or a boolean under such a name is a written secret too.
    def check(v: object, here: str, hidden: bool) -> None:
        if isinstance(v, dict):
            for name, x in v.items():
                check(x, f"{here}.{name}", hidden or bool(_SECRET_NAME_RE.search(str(name))))
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, dict | list):
                    raise CatalogError(f"job {job!r}: {here} must hold plain values", job=job,
                                       key="storage_options")
                check(x, here, hidden)
        elif isinstance(v, str):
            if hidden and not _VAR_RE.fullmatch(v) and v not in _NOT_SECRETS:
                raise secret(here)
            if _USERINFO_RE.search(v):
                raise CatalogError(f"job {job!r}: {here} holds a URL with a password (user:password@): give the "
                                   "password as a \"${VAR}\" option of its own", job=job, key="storage_options")
        elif isinstance(v, bool):
            pass  # a switch, never a secret
        elif isinstance(v, int | float):
            if hidden:
                raise secret(here)
        else:
            raise CatalogError(f"job {job!r}: {here} must be a string, number, boolean or table, found {v!r}",
                               job=job, key="storage_options")

    for name, v in value.items():
        check(v, f"{where}.{name}", bool(_SECRET_NAME_RE.search(str(name))))
    return value


#: Options that name where and how to reach a store, never a credential: their "${VAR}" values stay readable
#: in errors (every other expanded value is masked, whatever its name).
PUBLIC_OPTIONS = frozenset({"endpoint_url", "region_name", "region", "project", "account_name", "profile",
                            "default_block_size", "default_cache_type", "anon", "use_ssl", "requester_pays",
                            "version_aware", "cache_regions", "timeout", "retries"})


def expand_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with each ``"${VAR}"`` replaced by the variable's value on this host.

    The values expanded are registered with :func:`loader.db.redact`, so an error or a log line that echoes
    one shows ``***`` instead. A variable that is not set is a SourceError naming the variable.
    """
    def expand(v: Any, where: str) -> Any:
        if isinstance(v, Mapping):
            return {k: expand(x, f"{where}.{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [expand(x, where) for x in v]
        if not isinstance(v, str):
            return v

        def value(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise SourceError(f"{where} names the environment variable {name}, which is not set on this host",
                                  option=where, variable=name)
            found = os.environ[name]
            if where.rsplit(".", 1)[-1].lower() not in PUBLIC_OPTIONS:
                db.add_secret(found)
            return found

        return _VAR_RE.sub(value, v)

    return {k: expand(v, f"storage_options.{k}") for k, v in (options or {}).items()}


#: Environment variables that configure a store (credentials, endpoints, profiles, regions).
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS", "AZURE_")
#: File systems made in this process, by scheme, expanded options and the stores' environment variables; the
#: least recently used go first beyond CACHED_FILESYSTEMS (a long-lived worker sees many jobs' options).
_cache: OrderedDict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = OrderedDict()
CACHED_FILESYSTEMS = 16


def _filesystem(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The fsspec file system for ``url`` and the path inside it."""
    try:
        import fsspec.core
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise SourceError("reading URLs needs fsspec: pip install fsspec s3fs", source=url) from None
    kind = scheme(url)
    expanded = expand_options(options)
    if kind in SINGLE_OBJECT_SCHEMES:
        # Offsets are counted in the bytes as stored: a server that compresses on the wire for clients that accept
        # it would count a batch's range in its gzip encoding (fsspec asks HEAD for "identity" only).
        expanded["headers"] = {"Accept-Encoding": "identity", **(expanded.get("headers") or {})}
    # fsspec caches file systems by their options only: one made before a credential variable changed would be
    # used with the old credentials. Ours are keyed by the store's environment variables too.
    try:
        # What the URL itself configures (s3fs: version_aware for ?versionId=; adlfs: the account in the host)
        # belongs to the key too: a file system made for one URL must not read another account or version.
        from_url = fsspec.get_filesystem_class(kind)._get_kwargs_from_urls(url)
        key = (kind, repr(sorted(expanded.items())) + repr(sorted(from_url.items())),
               tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))))
        fs = _cache.get(key)
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, **expanded)
            _cache[key] = fs
            while len(_cache) > CACHED_FILESYSTEMS:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
        path = fs._strip_protocol(url) if kind not in SINGLE_OBJECT_SCHEMES else url
    except ImportError:
        package = _PACKAGES.get(kind, kind)
        extra = {"gcsfs": "gcs", "adlfs": "azure"}.get(package)
        how = f"pip install 'dataloader-console[{extra}]'" if extra else f"pip install {package}"
        raise SourceError(f"source {url}: reading {kind}:// URLs needs the {package} package ({how})",
                          source=url) from None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec implementations raise anything on bad options
        raise store_error(url, exc) from None
    return fs, path


def store_error(url: str, exc: BaseException) -> LoaderError:
    """A store's exception as a SourceError for people: what happened to which object, never a credential.

    The loader's own errors go as they are: the queue's job timeout (raised inside a read) must stay a
    timeout, which is retried, not become a source error, which is not.
    """
    if isinstance(exc, LoaderError):
        return exc
    kind = type(exc).__name__
    if kind in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "DefaultCredentialsError"):
        hint = {"s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role)",
                "gs": "set GOOGLE_APPLICATION_CREDENTIALS", "az": "set AZURE_STORAGE_ACCOUNT_NAME and a key or SAS"}
        what = hint.get({"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}.get(scheme(url), scheme(url)),
                        "configure the store's credentials")
        text = f"no credentials to read {url}: {what}, or give storage_options in the catalog"
        return SourceError(db.redact(text), source=url)
    if isinstance(exc, FileNotFoundError):
        return SourceError(db.redact(f"source object {url} not found (or its bucket does not exist): {exc}"),
                           source=url)
    if isinstance(exc, PermissionError):
        return SourceError(db.redact(f"access to source object {url} denied: {exc}"), source=url)
    if is_transient(exc):
        return TransientSourceError(db.redact(f"source object {url} could not be read just now (a store error "
                                              f"that may pass: {kind}: {exc})"), source=url)
    return SourceError(db.redact(f"source object {url} cannot be read: {kind}: {exc}"), source=url)


#: HTTP statuses that say "not now" rather than "never": timeout, throttling, the server's own errors.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: How s3fs words those (it turns S3 errors into OSError): 503/SlowDown is EBUSY, 500/InternalError EREMOTEIO.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                               errno.ECONNREFUSED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH})
#: Connection-level failures of the stores' clients (botocore, aiohttp), known by name: neither is imported here.
_TRANSIENT_NAMES = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                              "ConnectionClosedError", "IncompleteReadError", "ResponseStreamingError",
                              "ServerDisconnectedError", "ClientConnectorError", "ClientOSError",
                              "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError"})


def is_transient(exc: BaseException) -> bool:
    """Whether a store's exception may pass if the read is tried again (what a batch's retry is for)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status in _TRANSIENT_STATUS:  # aiohttp's ClientResponseError (HTTP)
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES or isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS and not isinstance(
        exc, FileNotFoundError | PermissionError)


def resolve(pattern: str, options: Mapping[str, Any] | None) -> list[SourceObject]:
    """The objects a URL names, in lexicographic order of their keys (the order that decides which record wins
    across objects); a glob that matches nothing, a missing object or bucket is a clear SourceError."""
    import fsspec.core

    fs, path = _filesystem(pattern, options)
    # One object: an HTTP URL (``*`` and ``?`` are URL characters), or a key with ``?versionId=`` (its ``?`` is
    # the query's, not a glob's).
    single = scheme(pattern) in SINGLE_OBJECT_SCHEMES or "?versionId=" in path
    try:
        fs.invalidate_cache()  # a listing cached by an earlier run in this process is not what the store holds
        if not single and fsspec.core.has_magic(path):
            found = fs.glob(path, detail=True)
            infos = [found[p] for p in sorted(found) if found[p].get("type", "file") == "file"]
            if not infos:
                raise SourceError(f"source {pattern} matches no object", source=pattern)
        else:
            info = fs.info(path)
            if info.get("type", "file") != "file":
                raise SourceError(f"source {pattern} is not an object (a prefix or directory?)", source=pattern)
            infos = [info]
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - each store raises its own; all become SourceError
        raise store_error(pattern, exc) from None
    if single or not fsspec.core.has_magic(path):
        return [_describe(fs, pattern, infos[0])]  # as written: a ?versionId= or an account in the host stays
    return [_describe(fs, object_url(pattern, fs.unstrip_protocol(i["name"])), i) for i in infos]


#: Schemes whose URLs may name the account in the host (``abfs://container@account.dfs.core.windows.net/p``).
_ACCOUNT_IN_HOST = frozenset({"az", "abfs", "abfss"})


def object_url(pattern: str, found: str) -> str:
    """The URL of an object a glob found, as the user would write it: adlfs lists ``container/path`` and forgets
    the account the pattern named in its host, which a worker needs to read the same object.

    Example::

        >>> object_url("abfs://c@acct.dfs.core.windows.net/x/*.ndjson", "abfs://c/x/a.ndjson")
        'abfs://c@acct.dfs.core.windows.net/x/a.ndjson'
    """
    parts = urlsplit(pattern)
    if scheme(pattern) not in _ACCOUNT_IN_HOST or "@" not in parts.netloc:
        return found
    container, _, host = parts.netloc.partition("@")
    rest = found.split("://", 1)[-1]
    first, _, key = rest.partition("/")
    return f"{parts.scheme}://{first}@{host}/{key}" if first == container else found


def _describe(fs: Any, url: str, info: Mapping[str, Any]) -> SourceObject:
    size = info.get("size")
    ranged = size is not None and info.get("partial", True) is not False
    if ranged and scheme(url) in SINGLE_OBJECT_SCHEMES:
        ranged = _honours_range(fs, url, int(size or 0))
    return SourceObject(url, int(size) if size is not None else -1, _mtime_ns(info), _version(info), ranged)


def _honours_range(fs: Any, url: str, size: int) -> bool:
    """Whether an HTTP server answers a ``Range`` request with just those bytes (a server that sends the whole
    body instead cannot re-read a batch by range: its batches keep their bytes in the ledger)."""
    if size < 2:
        return False
    try:
        with fs.open(url, "rb", block_size=2, cache_type="none") as f:
            f.seek(1)
            return len(f.read(1)) == 1
    except ValueError:  # fsspec: "The HTTP server doesn't appear to support range requests"
        return False
    except Exception as exc:  # noqa: BLE001
        raise store_error(url, exc) from None


def _version(info: Mapping[str, Any]) -> str | None:
    """The content's identity as the store describes it. The ETag first: listings (a glob) and HEAD both give
    it, while S3 gives a version id only to HEAD on a versioned bucket (the planner lists, a worker HEADs)."""
    for key in ("ETag", "etag", "generation", "VersionId"):
        v = info.get(key)
        if v not in (None, "", "null"):
            return f"{key}={v}"
    return None


def _mtime_ns(info: Mapping[str, Any]) -> int:
    for key in ("LastModified", "last_modified", "updated", "mtime", "Last-Modified"):
        v = info.get(key)
        try:
            if isinstance(v, datetime):
                return int(v.timestamp() * 1_000_000) * 1000
            if isinstance(v, str) and v:
                return int(parsedate_to_datetime(v).timestamp() * 1_000_000) * 1000 if "," in v else \
                    int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1_000_000) * 1000
            if isinstance(v, int | float):
                return int(v * 1_000_000_000)
        except (ValueError, TypeError):
            continue
    return 0


def open_stream(obj: SourceObject, options: Mapping[str, Any] | None) -> IO[bytes]:
    """The object's bytes from the start, read in order (planning): buffered, so ``readline`` is cheap."""
    fs, path = _filesystem(obj.name, options)
    try:
        if scheme(obj.name) in SINGLE_OBJECT_SCHEMES:
            f = fs.open(path, "rb", block_size=0)  # one streamed GET: no Range needed
        else:
            f = fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="readahead")
            # s3fs took the object's ETag as it opened it (and reads with If-Match on it): it must be the one
            # listed, or the batches would be planned from bytes their version does not describe.
            found = _version(getattr(f, "details", None) or {})
            if obj.version is not None and found is not None and found != obj.version:
                f.close()
                raise SourceChanged(f"source object {obj.name} changed while it was planned ({obj.version} -> "
                                    f"{found}); start a new run", file=obj.name)
    except SourceChanged:
        raise
    except Exception as exc:  # noqa: BLE001
        raise store_error(obj.name, exc) from None
    return _Guarded(obj.name, f)


def open_range(obj: SourceObject, start: int, end: int, batch: int, options: Mapping[str, Any] | None) -> IO[bytes]:
    """The object's bytes from ``start`` on (a batch re-read by a worker), fetched in requests that stop at
    ``end`` (a batch of at most BLOCK_BYTES is one request for exactly its range), after making sure they are
    the version planned.

    S3: the planned ETag goes with every ranged GET as ``If-Match``, so the store itself refuses the bytes of an
    object replaced since planning (SourceChanged) and no HEAD precedes the read (one request per batch instead
    of two). Other stores: the object's version and size are asked first and a difference is SourceChanged at
    once. The batch checksum catches a change for every store, after the batch's last record.
    """
    fs, path = _filesystem(obj.name, options)
    etag = obj.version[len("ETag="):] if obj.version and obj.version.startswith("ETag=") else None
    try:
        if etag is not None and obj.size >= 0 and _sends_if_match(fs):
            f = fs.open(path, "rb", cache_type="none", size=obj.size)
            f.details = {"name": path, "size": obj.size, "ETag": etag, "type": "file"}
            f.read_kw = {**f.read_kw, "IfMatch": etag}
            return _Guarded(obj.name, _RangeRaw(f, start, end), batch, _buffer(start, end), obj.version)
        fs.invalidate_cache(path)
        f = fs.open(path, "rb", cache_type="none")
        info = getattr(f, "details", None) or {}
        if _version(info) is None:  # fsspec's HTTP file keeps only the size: ask for the headers
            info = fs.info(path)
    except Exception as exc:  # noqa: BLE001
        raise store_error(obj.name, exc) from None
    now = SourceObject(obj.name, int(info.get("size", -1)), _mtime_ns(info), _version(info))
    if (obj.version is not None and now.version != obj.version) or (obj.size >= 0 and now.size != obj.size):
        f.close()
        raise SourceChanged(
            f"source object {obj.name} changed after the run was planned ({obj.version or 'no version'}, "
            f"{obj.size} bytes -> {now.version or 'no version'}, {now.size} bytes); start a new run to load its "
            "current content", file=obj.name, batch=batch)
    return _Guarded(obj.name, _RangeRaw(f, start, end), batch, _buffer(start, end))


def _sends_if_match(fs: Any) -> bool:
    """Whether ``fs`` is s3fs reading the current version (its files send ``read_kw`` with each ranged GET);
    a version-aware s3fs asks for the object's details itself."""
    return type(fs).__name__ == "S3FileSystem" and not getattr(fs, "version_aware", False)


def _buffer(start: int, end: int) -> int:
    """The read buffer for a range: the whole range up to BLOCK_BYTES, so a batch is one request."""
    return max(1 << 16, min(end - start, BLOCK_BYTES))


class _RangeRaw(io.RawIOBase):
    """A store's file read from ``start`` in requests that never cross ``end`` (past it, as far as asked).

    fsspec's read-ahead cache fetches a block beyond what is read, so a batch read through it costs up to twice
    its bytes; the file is opened without a cache and each ``readinto`` here is one request.
    """

    def __init__(self, f: Any, start: int, end: int) -> None:
        super().__init__()
        self._f = f
        self._end = end
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        pos = self._f.tell()
        want = len(buffer) if pos >= self._end else min(len(buffer), self._end - pos)
        data = self._f.read(want)
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()


class _Guarded(io.BufferedReader):
    """A store's file object, buffered (fsspec's own ``readline`` reads a byte at a time), whose errors come out
    as SourceError naming the object, and a replaced object (s3fs's FileExpired) as SourceChanged."""

    def __init__(self, name: str, raw: Any, batch: int | None = None, buffer_size: int = 1 << 20,
                 planned: str | None = None) -> None:
        super().__init__(raw, buffer_size=buffer_size)
        self._name = name
        self._batch = batch
        self._planned = planned

    def _guard(self, exc: Exception) -> Exception:
        if type(exc).__name__ == "FileExpired" and self._planned is not None:
            return SourceChanged(f"source object {self._name} changed after the run was planned ({self._planned} "
                                 "-> another version: the store refused the planned version's bytes); start a new "
                                 "run to load its current content", file=self._name, batch=self._batch)
        if type(exc).__name__ == "FileExpired":
            return SourceChanged(f"source object {self._name} changed while it was read (its ETag changed); start "
                                 "a new run to load its current content", file=self._name, batch=self._batch)
        return store_error(self._name, exc)

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(size)
        except Exception as exc:  # noqa: BLE001
            raise self._guard(exc) from None

    def readline(self, size: int | None = -1) -> bytes:
        try:
            return super().readline(size)
        except Exception as exc:  # noqa: BLE001
            raise self._guard(exc) from None

    def read1(self, size: int = -1) -> bytes:
        try:
            return super().read1(size)
        except Exception as exc:  # noqa: BLE001
            raise self._guard(exc) from None

    def readinto(self, buffer: Any) -> int:
        try:
            return super().readinto(buffer)
        except Exception as exc:  # noqa: BLE001
            raise self._guard(exc) from None
