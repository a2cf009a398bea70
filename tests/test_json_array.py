"""JSON-array sources: elements cut out one at a time, the same whatever the read size, over-long ones read past."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest

from loader import json_array, sources
from loader.errors import SourceError

ELEMENTS = ['{"a": "x,]}\\"y\\\\ é", "n": [1, [2, {"b": null}]]}', "12345", '"s]"', "-1.5e400", "true",
            '{"deep": [[[[]]]],\n "u": "\\u00e9\\ud83d\\ude00"}']
TEXT = ("\ufeff [ " + " , ".join(ELEMENTS) + " ] \n").encode()


def values(data: bytes, limit: int = 1 << 20, head: int = 10) -> list[object]:
    return [e.text if e.whole else ("over", e.size, e.head)
            for e in json_array.elements(io.BytesIO(data), limit, head)]


@pytest.mark.parametrize("read", [1, 2, 3, 5, 7, 64, 1 << 16])
def test_every_element_is_the_same_whatever_the_size_of_the_reads(monkeypatch, read):
    """Strings with brackets, commas, escapes and multi-byte characters cut at any byte: each element comes
    whole and as the source wrote it (numbers, escapes, spacing inside)."""
    monkeypatch.setattr(json_array, "READ_BYTES", read)
    assert values(TEXT) == ELEMENTS


@pytest.mark.parametrize("read", [1, 5, 64, 1 << 16])
def test_an_element_longer_than_the_limit_is_read_past_keeping_its_first_characters(monkeypatch, read):
    monkeypatch.setattr(json_array, "READ_BYTES", read)
    data = (b'[{"a":"' + b"x" * 300 + b'"}, 5, "' + b"y" * 200 + b'", ' + b"9" * 300
            + b', [[["\\"]]]' + b"z" * 150 + b'"]]], 7]')
    assert values(data, limit=100) == [("over", 308, '{"a":"xxxx'), "5", ("over", 202, '"yyyyyyyyy'),
                                       ("over", 300, "9999999999"), ("over", 163, '[[["\\"]]]z'), "7"]


@pytest.mark.parametrize("read", [1, 3, 300, 1 << 16])
def test_dense_over_long_elements_are_read_past_to_their_exact_end(monkeypatch, read):
    """Brackets counted in bulk and string bodies matched whole: long stretches of ``[],{}`` (with brackets in
    strings between them) and of escaped quotes end where their element ends, not before or after."""
    monkeypatch.setattr(json_array, "READ_BYTES", read)
    dense = "[" + ",".join(["[],{}"] * 400 + ['"]]}}"'] + ["[[{}]]"] * 300) + "]"
    escapes = '"' + '\\"' * 700 + "\\\\" + '"'
    nested = "[" * 500 + "]" * 500
    data = f"[{dense}, 1, {escapes}, {nested}, {{\"k\": [{dense}]}}, 2]".encode()
    assert values(data, limit=100) == [
        ("over", len(dense), dense[:10]), "1", ("over", len(escapes), escapes[:10]), ("over", 1000, "[" * 10),
        ("over", len(dense) + 9, '{"k": [[[]'), "2"]


@pytest.mark.parametrize(("text", "error"), [
    (b"[1,]", "a trailing comma after element 1"),
    (b"[1,,2]", "element 2: Expecting value"),
    (b"[1] x", "unexpected text after the array's end"),
    (b"[1][2]", "unexpected text after the array's end"),
    (b"[1, 2", "expected ',' or ']' after element 2, found 'the end'"),
    (b"[1 2]", "expected ',' or ']' after element 1, found '2'"),
    (b'[1, "unterminated]', "the array ends inside element 2"),
    (b'[{"a": 1]}]', "element 1: Expecting ',' delimiter or '}'"),
    (b"[NaN]", "NaN is not a JSON number"),
    (b'{"a": 1}', "the top level must be one JSON array"),
    (b"", "the top level must be one JSON array"),
    (b"\xff[1]", "not UTF-8 text"),
])
def test_text_that_is_not_one_json_array_is_a_clear_error(monkeypatch, text, error):
    for read in (1, 3, 1 << 16):
        monkeypatch.setattr(json_array, "READ_BYTES", read)
        with pytest.raises(SourceError, match="^" + error.replace("[", r"\[").replace("(", r"\(")):
            values(text)


def test_a_planned_json_array_keeps_each_element_as_one_line_and_an_over_long_one_as_a_mark(tmp_path: Path,
                                                                                             monkeypatch):
    """The planner's payload (what a worker loads) and read_batch: element numbers are the records' "lines"."""
    monkeypatch.setenv("ETL_MAX_RECORD_BYTES", "100")
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n {"id": "a"},\n {"id": "b", "x": "' + b"x" * 200
                     + b'"},\n {"id": "c",\r\n "v": 1.50, "s": "a\\nb"}\n]')
    [batch] = sources.plan_batches(sources.resolve_source(str(path)), 10)
    assert (batch.line_start, batch.line_count, batch.records) == (1, 3, 3)
    assert batch.payload is not None and batch.checksum == sources.checksum(batch.payload)
    lines = zlib.decompress(batch.payload).split(b"\n")
    assert lines == [b'{"id": "a"}', lines[1], b'{"id": "c",   "v": 1.50, "s": "a\\nb"}']  # one line each
    read = list(sources.read_batch(batch))
    assert [n for n, _ in read] == [1, 2, 3]
    over = read[1][1]
    assert isinstance(over, sources.OversizedRecord) and over.size == 220
    assert bytes(over) == b'{"id": "b", "x": "' + b"x" * 200 + b'"}'  # its first bytes, for the reject's sample


def test_a_json_array_source_that_breaks_off_fails_planning_naming_the_file(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_bytes(b'[{"id": "a"}, {"id": "b"')
    with pytest.raises(SourceError, match="broken.json is not valid JSON: the array ends inside element 2"):
        list(sources.plan_batches(sources.resolve_source(str(path)), 10))


def test_an_element_nested_deeper_than_the_decoder_goes_is_one_element_not_a_failed_planning(monkeypatch):
    """Validation rejects it as one record (nested too deep), as it does such an NDJSON line."""
    deep = "[" * 5000 + "]" * 5000
    for read in (7, 1 << 16):
        monkeypatch.setattr(json_array, "READ_BYTES", read)
        assert values(f'[1, {deep}, 2]'.encode()) == ["1", deep, "2"]


def test_a_byte_order_mark_before_an_element_is_an_error_not_spacing():
    with pytest.raises(SourceError, match="element 2 starts with a byte order mark"):
        values('[{"id": "a"}, \ufeff{"id": "b"}]'.encode())


def test_a_planning_that_fails_unexpectedly_fails_its_run_instead_of_looping(tmp_path: Path, monkeypatch, ledger):
    """Whatever a source does to the planner, the run ends failed with the error named (left to RQ, the run
    would stay validating and be planned again and again)."""
    import loader
    from loader import planning

    from .helpers import job_name, write_catalog, write_ndjson

    name = job_name("plan-bug")
    write_ndjson(tmp_path / "d.ndjson", [{"id": "a"}])
    catalog = write_catalog(tmp_path, {name: {"source": "d.ndjson", "target_table": "stg_plan_bug.t",
                                              "source_id": "id"}})
    monkeypatch.setenv("ETL_QUEUE", f"idle-{name}")  # nobody plans it but this test
    ref = loader.start_run(name, catalog=catalog, batch_size=100)

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(planning, "_write_batches", broken)
    assert planning.plan_run(name, ref.etl_run_id) == []
    c = loader.run_contract(name, ref.etl_run_id)
    assert c["status"] == "failed" and c["error_message"] == (
        "planning failed: RecursionError: maximum recursion depth exceeded")
