"""Writing one benchmark's section of BENCHMARKS.md, keeping the others' (bench/console.py, bench/objstore.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_section(text: str, heading: str = "## Console") -> Path:
    """Replace BENCHMARKS.md's ``heading`` section (up to the next ``## `` heading) with ``text``, or append it."""
    path = ROOT / "BENCHMARKS.md"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    start = body.find(f"\n{heading}\n")
    if start < 0:
        body = body.rstrip("\n") + "\n" + text
    else:
        end = body.find("\n## ", start + 1)
        rest = body[end:] if end >= 0 else ""
        body = body[:start] + "\n" + text.strip("\n") + "\n" + rest
    path.write_text(body.rstrip("\n") + "\n")
    return path
