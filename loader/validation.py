"""Record checks: parse each source line, find its source_id, and say exactly what is wrong with it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import jsonschema_rs
import orjson

from .sources import OversizedRecord, max_record_bytes

#: Longest sample_value kept for a rejected record, in characters.
SAMPLE_MAX_CHARS = 200
#: At most this many problems are kept for one rejected record.
MAX_PROBLEMS_PER_RECORD = 10
#: What PostgreSQL's numeric (jsonb's numbers) can hold: digits before the decimal point, and after it.
NUMERIC_MAX_INT_DIGITS = 131_072
NUMERIC_MAX_SCALE = 16_383
#: A cheap look at the raw text that every number beyond numeric's range matches (an exponent of 1000
#: or more either way, or a run of thousands of digits); only records it matches are checked exactly.
#: Literal-led patterns only: Python's re scans for a leading literal fast, not for a class. One pattern
#: with [eE] or an alternation costs 8-17 us on a 1 KB record; these two cost about 3 us together, where
#: searching the record's lower-cased copy as well cost 5-7 us (every record naming "EUR" or "SKU").
_BIG_EXPONENT = re.compile(rb"e[+-]?\d{4}")
_BIG_EXPONENT_UPPER = re.compile(rb"E[+-]?\d{4}")
_LONG_DIGITS = re.compile(rb"\d{15000}")
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")


class ErrorClass(str, Enum):
    """The two classes of validation error the console counts."""

    REQUIRED_FIELD = "required_field"
    JSON_SHAPE = "json_shape"


@dataclass(frozen=True)
class RecordProblem:
    """One thing wrong with one record: where (a JSONPath), what, and a short sample of the value."""

    error_class: ErrorClass
    path: str
    message: str
    sample_value: str

    def to_dict(self) -> dict[str, str]:
        """JSON-safe for jsonb: a NUL character (which jsonb refuses) is written as \\u0000."""
        return {"class": self.error_class.value, "path": _nul(self.path), "message": _nul(self.message),
                "sample_value": _nul(self.sample_value)}


def _nul(text: str) -> str:
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


@dataclass(frozen=True)
class ValidRecord:
    source_id: str
    #: The record's JSON text exactly as in the source (numbers keep their precision), for jsonb.
    text: bytes


def compile_schema(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """Compile a JSON Schema once (draft 2020-12 unless ``$schema`` names another draft).

    Raises ValueError with the schema's own problem when the schema itself is invalid.

    Example::

        validator = compile_schema({"type": "object", "required": ["id"]})
    """
    try:
        if "$schema" in schema:
            return jsonschema_rs.validator_for(schema, validate_formats=True)
        return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
    except jsonschema_rs.ValidationError as exc:
        first = str(exc.message).splitlines()[0]
        where = _json_path(list(exc.instance_path))
        raise ValueError(f"{first} (at {where} in the schema)") from None
    except (ValueError, TypeError, jsonschema_rs.ReferencingError) as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def truncate(text: str, limit: int = SAMPLE_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sample_of(value: Any) -> str:
    """A short JSON rendering of a value, for people reading an error."""
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = repr(value)
    return truncate(text)


def _json_path(parts: list[str | int] | tuple[str | int, ...]) -> str:
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.isidentifier():
            out += f".{p}"
        else:
            out += "[" + json.dumps(p) + "]"
    return out


def _dotted_to_json_path(dotted: str) -> str:
    return _json_path([int(p) if p.isdigit() else p for p in dotted.split(".")])


_MISSING = object()


def _lookup(record: Any, dotted: str) -> Any:
    node = record
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _int(token: str) -> int | float:
    """A JSON integer; one of thousands of digits (past Python's int-from-text limit) is validated as a float."""
    return int(token) if len(token) <= 4000 else float(token)


def _raise_on_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(raw: bytes) -> tuple[Any, RecordProblem | None]:
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        message = str(exc)
    if "not valid UTF-8" in message or "surrogates" in message:
        try:
            raw.decode("utf-8")
            detail = "a \\u escape is not a valid Unicode character (lone surrogate)"
        except UnicodeDecodeError as err:
            detail = f"invalid UTF-8 at byte {err.start}"
        return None, RecordProblem(ErrorClass.JSON_SHAPE, "$", detail, sample_raw(raw))
    if "infinity" in message:
        # orjson parses numbers as doubles; the JSON is still valid and PostgreSQL's numeric keeps
        # it exactly, so parse it with the standard library (ints of any size, floats to inf).
        try:
            return json.loads(raw, parse_constant=_raise_on_constant, parse_int=_int), None
        except (ValueError, RecursionError) as err:
            message = str(err)
    if "depth" in message or "recursion" in message:
        detail = "nested deeper than 1024 levels"
    else:
        detail = f"not valid JSON: {message}"
    return None, RecordProblem(ErrorClass.JSON_SHAPE, "$", detail, sample_raw(raw))


class _OutOfRange(str):
    """A number token jsonb cannot store, left in the parsed record where it stood (to find its path)."""


def _numeric_token(token: str) -> Any:
    """The token as it is when PostgreSQL's numeric can hold it (the value is not needed), else _OutOfRange.

    numeric keeps at most NUMERIC_MAX_SCALE digits after the decimal point (``0e-20000`` too) and
    NUMERIC_MAX_INT_DIGITS before it.
    """
    m = _NUMBER.fullmatch(token)
    if m is None:
        return token
    whole, frac, exp_text = m.group(1), m.group(2) or "", m.group(3) or "0"
    if len(exp_text.lstrip("+-")) > 12:
        return _OutOfRange(token)
    exp = int(exp_text)
    if len(frac) - exp > NUMERIC_MAX_SCALE:
        return _OutOfRange(token)
    digits = (whole + frac).lstrip("0")
    if digits:  # not zero: where its first digit stands
        lead = len(whole.lstrip("0")) if whole.strip("0") else -(len(frac) - len(frac.lstrip("0")))
        if lead + exp > NUMERIC_MAX_INT_DIGITS:
            return _OutOfRange(token)
    return token


def _numeric_problem(raw: bytes) -> RecordProblem | None:
    """A number PostgreSQL's jsonb would refuse (``1e-20000``, ``1e200000``), found before the database does."""
    if not (_BIG_EXPONENT.search(raw) or _BIG_EXPONENT_UPPER.search(raw)
            or (len(raw) >= 15000 and _LONG_DIGITS.search(raw))):
        return None
    try:
        parsed = json.loads(raw, parse_float=_numeric_token, parse_int=_numeric_token)
    except (ValueError, RecursionError):
        return None  # reported as invalid JSON by the parser that found it
    stack: list[tuple[Any, list[str | int]]] = [(parsed, [])]
    while stack:
        value, where = stack.pop()
        if isinstance(value, _OutOfRange):
            return RecordProblem(
                ErrorClass.JSON_SHAPE, _json_path(where),
                f"number outside what PostgreSQL's numeric can store (at most {NUMERIC_MAX_INT_DIGITS} digits "
                f"before the decimal point and {NUMERIC_MAX_SCALE} after it)", truncate(str(value)))
        if isinstance(value, dict):
            stack.extend((v, [*where, k]) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, [*where, i]) for i, v in enumerate(value))
    return None


def sample_raw(raw: bytes) -> str:
    """The start of an unparseable line, as text people (and jsonb) can hold: NUL shown as \\u0000."""
    return truncate(raw[: SAMPLE_MAX_CHARS * 4].decode("utf-8", errors="replace").replace("\x00", "\\u0000"))


def _find_nul(node: Any, path: list[str | int]) -> list[str | int] | None:
    stack: list[tuple[Any, list[str | int]]] = [(node, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return where
        elif isinstance(value, dict):
            for k, v in value.items():
                if "\x00" in k:
                    return [*where, k]
                stack.append((v, [*where, k]))
        elif isinstance(value, list):
            stack.extend((v, [*where, i]) for i, v in enumerate(value))
    return None


class RecordChecker:
    """Checks records of one job; built once per run so the JSON Schema is compiled once.

    Example::

        checker = RecordChecker(source_id="id", required=("customer.id",), schema=None)
        ok, problems = checker.check(b'{"id": 1, "customer": {"id": 7}}')
    """

    def __init__(self, source_id: str, required: tuple[str, ...] = (), schema: dict[str, Any] | None = None):
        self.source_id = source_id
        self.required = required
        self.validator = compile_schema(schema) if schema is not None else None

    def check(self, raw: bytes) -> tuple[ValidRecord | None, list[RecordProblem]]:
        """Return the record ready to load, or the problems that keep it out (never both)."""
        if isinstance(raw, OversizedRecord):
            return None, [RecordProblem(
                ErrorClass.JSON_SHAPE, "$", f"record of {raw.size} bytes is longer than ETL_MAX_RECORD_BYTES "
                f"({max_record_bytes()}): read past, not loaded", sample_raw(raw))]
        record, problem = _parse(raw)
        if problem is not None:
            return None, [problem]
        if not isinstance(record, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
                type(record), "a number")
            return None, [RecordProblem(ErrorClass.JSON_SHAPE, "$", f"expected a JSON object, found {kind}",
                                        sample_of(record))]
        problems: list[RecordProblem] = []
        sid = _lookup(record, self.source_id)
        source_id = ""
        if sid is _MISSING or sid is None or sid == "":
            what = "missing" if sid is _MISSING else ("null" if sid is None else "empty")
            problems.append(RecordProblem(ErrorClass.REQUIRED_FIELD, _dotted_to_json_path(self.source_id),
                                          f"source_id '{self.source_id}' is {what}",
                                          "" if sid is _MISSING else sample_of(sid)))
        elif isinstance(sid, bool) or not isinstance(sid, str | int):
            problems.append(RecordProblem(ErrorClass.JSON_SHAPE, _dotted_to_json_path(self.source_id),
                                          f"source_id '{self.source_id}' must be a string or an integer",
                                          sample_of(sid)))
        else:
            source_id = str(sid)
            if "\x00" in source_id:
                problems.append(RecordProblem(ErrorClass.JSON_SHAPE, _dotted_to_json_path(self.source_id),
                                              "source_id contains \\u0000", sample_of(source_id)))
        for path in self.required:
            value = _lookup(record, path)
            if value is _MISSING or value is None:
                problems.append(RecordProblem(
                    ErrorClass.REQUIRED_FIELD, _dotted_to_json_path(path),
                    f"required field '{path}' is {'missing' if value is _MISSING else 'null'}",
                    "" if value is _MISSING else "null"))
        if self.validator is not None and not self.validator.is_valid(record):
            for err in self.validator.iter_errors(record):
                problems.append(RecordProblem(ErrorClass.JSON_SHAPE, _json_path(list(err.instance_path)),
                                              truncate(str(err.message), 500), sample_of(err.instance)))
                if len(problems) >= MAX_PROBLEMS_PER_RECORD:
                    break
        if (numeric := _numeric_problem(raw)) is not None:
            problems.append(numeric)
        if b"\\u0000" in raw:
            where = _find_nul(record, [])
            if where is not None:
                problems.append(RecordProblem(
                    ErrorClass.JSON_SHAPE, _json_path(where),
                    "string contains \\u0000, which PostgreSQL jsonb cannot store",
                    sample_of(_lookup_path(record, where))))
        if problems:
            # Required-field problems come first: they name the record's class for the counts.
            problems.sort(key=lambda p: p.error_class != ErrorClass.REQUIRED_FIELD)
            return None, problems[:MAX_PROBLEMS_PER_RECORD]
        return ValidRecord(source_id, raw), []


def _lookup_path(record: Any, where: list[str | int]) -> Any:
    node = record
    for part in where:
        node = node[part]
    return node
