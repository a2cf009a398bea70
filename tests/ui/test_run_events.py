"""The run event stream served by the real console: several clients follow one live run to its end."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import loader

from .app_server import StreamlitServer
from .conftest import ROOT


def _read_stream(url: str, headers: dict[str, str], into: list[dict[str, Any]], errors: list[str]) -> None:
    """Read a text/event-stream to its end, appending each event ({"id", "event", "data"})."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            for raw in r:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "event" in fields:
                        into.append({"id": int(fields["id"]), "event": fields["event"],
                                     "data": json.loads(fields["data"])})
                    fields = {}
                elif not line.startswith(":") and ": " in line:
                    key, value = line.split(": ", 1)
                    fields[key] = value
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(repr(exc))


def test_three_clients_follow_a_live_run_from_queued_to_success_and_a_fourth_resumes(
        demo, own_queue, own_workers, tmp_path: Path):
    console = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache")
    try:
        ref = loader.start_run(demo.job, batch_size=100)  # queued: no worker serves this queue yet
        url = f"{console.url}/etl/data-loader/api/runs/{demo.job}/{ref.etl_run_id}/events"
        streams: list[list[dict[str, Any]]] = [[], [], []]
        errors: list[str] = []
        readers = [threading.Thread(target=_read_stream, args=(url, {}, s, errors)) for s in streams]
        for r in readers:
            r.start()
        own_workers.start(1)
        for r in readers:
            r.join(timeout=150)
        assert not errors and not any(r.is_alive() for r in readers)
        final = loader.run_contract(demo.job, ref.etl_run_id)
        assert final["status"] == "success"
        for events in streams:
            runs = [e["data"] for e in events if e["event"] == "run"]
            assert runs[0]["status"] in ("queued", "validating") and runs[-1]["status"] == "success"
            assert events[-1]["event"] == "run" and runs[-1]["metrics"] == final["metrics"]
            done = [m["metrics"]["batches_succeeded"] for m in runs]
            assert done == sorted(done) and done[-1] == 11
            batches = {e["data"]["index"]: e["data"] for e in events if e["event"] == "batch"}
            assert sorted(batches) == list(range(11)) and {b["status"] for b in batches.values()} == {"succeeded"}
        # A fourth client that saw the first half resumes: it gets every batch changed after its last id.
        first = streams[0]
        half = [e for e in first if e["event"] == "batch"][5]["id"]
        resumed: list[dict[str, Any]] = []
        _read_stream(url, {"Last-Event-ID": str(half)}, resumed, errors)
        assert not errors
        later = {e["data"]["index"] for e in first if e["event"] == "batch" and e["id"] > half}
        assert later <= {e["data"]["index"] for e in resumed if e["event"] == "batch"}
        assert resumed[-1]["event"] == "run" and resumed[-1]["data"]["status"] == "success"
    finally:
        console.stop()
