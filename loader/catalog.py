"""The job catalog: ETL jobs declared in a TOML file, checked key by key."""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import config, storage
from .access import JobAccess, parse_principals
from .errors import CatalogError, ConfigError, JobNotFound

#: A job name: what people type in the CLI and see in URLs.
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: One part of a schema-qualified table name; anything else (quotes, ';', '--') is refused.
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
RESERVED_SCHEMAS = frozenset({"pg_catalog", "information_schema", "pg_toast"})

KEYS: dict[str, str] = {
    "description": "what the job loads, for people",
    "source": "file or glob relative to the catalog file, or a URL: s3://bucket/prefix/*.ndjson.gz, gs://, az://, "
              "https://host/file.ndjson (.ndjson, .jsonl, .json array; optionally .gz)",
    "storage_options": "options of the source's store (fsspec), e.g. {endpoint_url = \"${S3_URL}\"}; secrets "
                       "only as \"${VAR}\" environment-variable references",
    "target_table": "schema-qualified staging table, created if missing",
    "source_id": "dotted path of the deduplication key inside each record",
    "required": "dotted paths that must be present and not null",
    "schema": "JSON Schema file (draft 2020-12 unless $schema says otherwise)",
    "batch_size": "records per batch (100..10000)",
    "max_attempts": "attempts per batch for transient database errors",
    "viewers": "who may look at the job's runs, within ETL_VIEWERS (e-mails and @domain suffixes)",
    "operators": "who may act on the job's runs, within ETL_OPERATORS (e-mails and @domain suffixes)",
}
REQUIRED_KEYS = ("source", "target_table", "source_id")


@dataclass(frozen=True)
class JobSpec:
    """One configured ETL job, checked and with its paths made absolute.

    ``to_dict()`` is what a run snapshots into the ledger, so workers on other machines and later
    retries see the job as it was when the run started, whatever happens to the catalog file.
    """

    name: str
    source: str
    target_schema: str
    target_table: str
    source_id: str
    description: str = ""
    required: tuple[str, ...] = ()
    schema_path: str | None = None
    schema: dict[str, Any] | None = field(default=None, compare=False)
    batch_size: int | None = None
    max_attempts: int | None = None
    #: The store's options as written in the catalog: "${VAR}" references stay unexpanded (loader.storage
    #: expands them where they are used), so the ledger's snapshot holds no secret.
    storage_options: dict[str, Any] | None = None
    #: The job's own narrowing of ETL_VIEWERS / ETL_OPERATORS (None: not narrowed), as written.
    viewers: tuple[str, ...] | None = None
    operators: tuple[str, ...] | None = None

    @property
    def target(self) -> str:
        return f"{self.target_schema}.{self.target_table}"

    @property
    def access(self) -> JobAccess:
        """The job's roles for loader.access (checked when the catalog was read)."""
        return JobAccess(
            None if self.viewers is None else parse_principals(self.viewers, where=f"job {self.name!r}: viewers"),
            None if self.operators is None else parse_principals(self.operators,
                                                                  where=f"job {self.name!r}: operators"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "target_schema": self.target_schema,
            "target_table": self.target_table,
            "source_id": self.source_id,
            "required": list(self.required),
            "schema_path": self.schema_path,
            "schema": self.schema,
            "batch_size": self.batch_size,
            "max_attempts": self.max_attempts,
            "storage_options": self.storage_options,
            "viewers": None if self.viewers is None else list(self.viewers),
            "operators": None if self.operators is None else list(self.operators),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            source=data["source"],
            target_schema=data["target_schema"],
            target_table=data["target_table"],
            source_id=data["source_id"],
            required=tuple(data.get("required") or ()),
            schema_path=data.get("schema_path"),
            schema=data.get("schema"),
            batch_size=data.get("batch_size"),
            max_attempts=data.get("max_attempts"),
            storage_options=data.get("storage_options"),
            viewers=None if data.get("viewers") is None else tuple(data["viewers"]),
            operators=None if data.get("operators") is None else tuple(data["operators"]),
        )


@dataclass
class Catalog:
    """The jobs of one catalog file: the valid ones, and one error for each broken one."""

    path: Path
    jobs: dict[str, JobSpec]
    errors: dict[str, CatalogError]

    def get(self, name: str) -> JobSpec:
        if name in self.jobs:
            return self.jobs[name]
        if name in self.errors:
            raise self.errors[name]
        known = ", ".join(sorted(self.jobs)) or "none"
        raise JobNotFound(f"no job named {name!r} in {self.path} (jobs: {known})", job=name)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and check a catalog file; a broken job never hides the valid ones.

    Raises CatalogError only when the file itself cannot be used (missing, unreadable, bad TOML,
    no ``[jobs.NAME]`` tables).

    Example::

        catalog = load_catalog("jobs.toml")
        spec = catalog.get("orders")
    """
    file = Path(path) if path is not None else config.jobs_file()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise CatalogError(
            f"job catalog {file} not found (set ETL_JOBS_FILE or create jobs.toml)", path=str(file)
        ) from None
    except OSError as exc:
        raise CatalogError(f"job catalog {file} cannot be read: {exc.strerror}", path=str(file)) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CatalogError(f"job catalog {file} is not UTF-8 text", path=str(file)) from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"job catalog {file} is not valid TOML: {exc}", path=str(file)) from None

    unknown_top = sorted(set(doc) - {"jobs"})
    if unknown_top:
        raise CatalogError(
            f"job catalog {file}: unknown top-level key {unknown_top[0]!r}; jobs go in [jobs.NAME] tables",
            path=str(file), key=unknown_top[0],
        )
    tables = doc.get("jobs", {})
    if not isinstance(tables, dict):
        raise CatalogError(f"job catalog {file}: 'jobs' must be a table of [jobs.NAME] tables", path=str(file))

    base = file.resolve().parent
    jobs: dict[str, JobSpec] = {}
    errors: dict[str, CatalogError] = {}
    for name, table in tables.items():
        try:
            jobs[name] = _check_job(name, table, base)
        except CatalogError as exc:
            errors[name] = exc
    return Catalog(path=file, jobs=jobs, errors=errors)


def split_table_name(value: object, job: str) -> tuple[str, str]:
    """``"staging.orders"`` -> ``("staging", "orders")``, refusing anything but two plain identifiers."""
    if not isinstance(value, str):
        raise CatalogError(f"job {job!r}: target_table must be a string like 'staging.orders'",
                           job=job, key="target_table")
    parts = value.split(".")
    if len(parts) != 2 or not all(IDENT_RE.match(p) for p in parts):
        raise CatalogError(
            f"job {job!r}: target_table {value!r} must be schema.table, each part letters, digits and "
            "underscores, starting with a letter or underscore (at most 63 characters)",
            job=job, key="target_table",
        )
    if parts[0].lower() in RESERVED_SCHEMAS or parts[0].lower() == config.get("ETL_LEDGER_SCHEMA").lower():
        raise CatalogError(f"job {job!r}: target_table {value!r} is in a reserved schema ({parts[0]})",
                           job=job, key="target_table")
    return parts[0], parts[1]


def _check_path_expr(value: object, job: str, key: str) -> str:
    if not isinstance(value, str) or not value or any(not p for p in value.split(".")):
        raise CatalogError(f"job {job!r}: {key} must be a dotted path like 'customer.id', found {value!r}",
                           job=job, key=key)
    return value


def _check_job(name: str, table: object, base: Path) -> JobSpec:
    if not JOB_NAME_RE.match(name):
        raise CatalogError(
            f"job {name!r}: a job name is letters, digits, '_', '-' or '.', starting with a letter or digit",
            job=name, key="name",
        )
    if not isinstance(table, dict):
        raise CatalogError(f"job {name!r}: must be a table ([jobs.{name}])", job=name)
    for key in table:
        if key not in KEYS:
            hint = difflib.get_close_matches(key, KEYS, n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(KEYS)}"
            raise CatalogError(f"job {name!r}: unknown key {key!r}{more}", job=name, key=key)
    for key in REQUIRED_KEYS:
        if key not in table:
            raise CatalogError(f"job {name!r}: missing key {key!r} ({KEYS[key]})", job=name, key=key)

    description = table.get("description", "")
    if not isinstance(description, str):
        raise CatalogError(f"job {name!r}: description must be a string", job=name, key="description")
    source = table["source"]
    if not isinstance(source, str) or not source.strip():
        raise CatalogError(f"job {name!r}: source must be a file or glob, found {source!r}", job=name, key="source")
    if storage.is_remote(source):
        storage.check_source_url(source, name)
        resolved = source
    else:
        source_path = Path(source[len("file://"):] if source.lower().startswith("file://") else source).expanduser()
        resolved = str(source_path if source_path.is_absolute() else base / source_path)
    storage_options = None
    if table.get("storage_options") is not None:
        storage_options = storage.check_options(table["storage_options"], name)
    schema_name, table_name = split_table_name(table["target_table"], name)
    source_id = _check_path_expr(table["source_id"], name, "source_id")

    required = table.get("required", [])
    if not isinstance(required, list):
        raise CatalogError(f"job {name!r}: required must be a list of dotted paths", job=name, key="required")
    required_paths = tuple(_check_path_expr(r, name, "required") for r in required)

    batch_size = table.get("batch_size")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not (
            config.BATCH_SIZE_MIN <= batch_size <= config.BATCH_SIZE_MAX
        ):
            raise CatalogError(
                f"job {name!r}: batch_size must be a whole number from {config.BATCH_SIZE_MIN} "
                f"to {config.BATCH_SIZE_MAX}, found {batch_size!r}", job=name, key="batch_size",
            )
    max_attempts = table.get("max_attempts")
    if max_attempts is not None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 20:
            raise CatalogError(f"job {name!r}: max_attempts must be a whole number from 1 to 20, "
                               f"found {max_attempts!r}", job=name, key="max_attempts")

    roles = {key: _check_principals(table[key], name, key) if key in table else None
             for key in ("viewers", "operators")}

    schema_path: str | None = None
    schema: dict[str, Any] | None = None
    if table.get("schema") is not None:
        schema_path, schema = _load_schema(table["schema"], name, base)

    return JobSpec(
        name=name, description=description, source=resolved, target_schema=schema_name,
        target_table=table_name, source_id=source_id, required=required_paths,
        schema_path=schema_path, schema=schema, batch_size=batch_size, max_attempts=max_attempts,
        storage_options=storage_options,
        viewers=roles["viewers"], operators=roles["operators"],
    )


def _check_principals(value: object, job: str, key: str) -> tuple[str, ...]:
    """A job's ``viewers`` / ``operators``: a list of e-mails, ``@domain`` suffixes or ``*``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"job {job!r}: {key} must be a list of e-mail addresses and @domain suffixes, "
                           f"found {value!r}", job=job, key=key)
    try:
        parse_principals(value, where=f"job {job!r}: {key}")
    except ConfigError as exc:
        raise CatalogError(str(exc), job=job, key=key) from None
    return tuple(v.strip() for v in value)


def _load_schema(value: object, job: str, base: Path) -> tuple[str, dict[str, Any]]:
    from .validation import compile_schema  # validation imports nothing of the catalog

    if not isinstance(value, str) or not value:
        raise CatalogError(f"job {job!r}: schema must be a path to a JSON Schema file", job=job, key="schema")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise CatalogError(f"job {job!r}: schema file {path} not found", job=job, key="schema") from None
    except OSError as exc:
        raise CatalogError(f"job {job!r}: schema file {path} cannot be read: {exc.strerror}",
                           job=job, key="schema") from None
    except orjson.JSONDecodeError as exc:
        raise CatalogError(f"job {job!r}: schema file {path} is not valid JSON: {exc}",
                           job=job, key="schema") from None
    if not isinstance(doc, dict):
        raise CatalogError(f"job {job!r}: schema file {path} must hold a JSON object", job=job, key="schema")
    try:
        compile_schema(doc)
    except ValueError as exc:
        raise CatalogError(f"job {job!r}: schema file {path} is not a valid JSON Schema: {exc}",
                           job=job, key="schema") from None
    return str(path), doc
