"""Small builders for tests: source files and catalogs on disk."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from typing import Any


def write_ndjson(path: Path, records: list[Any], *, gz: bool = False) -> Path:
    """Write records (dicts are dumped as JSON; bytes and str are written as the raw line)."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode())
        else:
            lines.append(json.dumps(r).encode())
    data = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_catalog(folder: Path, jobs: dict[str, dict[str, Any]]) -> Path:
    """A jobs.toml with the given [jobs.NAME] tables (values: str, int, list of str)."""
    out = []
    for name, table in jobs.items():
        out.append(f"[jobs.{json.dumps(name)}]")
        for key, value in table.items():
            out.append(f"{key} = {json.dumps(value)}")
        out.append("")
    path = folder / "jobs.toml"
    path.write_text("\n".join(out))
    return path


def job_name(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
