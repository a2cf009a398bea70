"""Formatting for people: statuses with icon and text, durations, numbers, local times."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from loader.states import ACTIVE_RUN_STATES, FINAL_RUN_STATES, RETRYABLE_RUN_STATES, RUN_LOOKS, UNKNOWN_LOOK, Look

#: How a status looks (label, icon, colour): the state machine's own look (loader/states.py).
Badge = Look
RUN_BADGES: dict[str, Badge] = {s.value: look for s, look in RUN_LOOKS.items()}
UNKNOWN_BADGE = UNKNOWN_LOOK
ACTIVE = frozenset(s.value for s in ACTIVE_RUN_STATES)
FINAL = frozenset(s.value for s in FINAL_RUN_STATES)
RETRYABLE = frozenset(s.value for s in RETRYABLE_RUN_STATES)

#: Every ASCII punctuation character: CommonMark lets each be backslash-escaped, and escaping them all
#: leaves no link, image, autolink (``https://``, ``www.``, e-mail), HTML, LaTeX, emoji shortcode or
#: Streamlit directive (``:red[...]``, ``:material/...:``) for the Markdown renderer to find.
_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")


def md_text(text: object) -> str:
    """``text`` escaped so Streamlit's Markdown shows it literally (no links, images, HTML or LaTeX).

    Example::

        >>> md_text("[x](javascript:alert(1))")
        '\\[x\\]\\(javascript\\:alert\\(1\\)\\)'
    """
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", "  \n")


def run_badge(status: str | None) -> Badge:
    return RUN_BADGES.get(status or "idle", UNKNOWN_BADGE)


def fmt_int(value: object) -> str:
    return "—" if value is None else f"{int(value):,}"  # type: ignore[call-overload]


def fmt_ms(value: float | None) -> str:
    """12.3 ms, 4.56 s, 3 min 05 s."""
    if value is None:
        return "—"
    if value < 1000:
        return f"{value:.1f} ms"
    seconds = value / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def viewer_zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def local_time(value: str | datetime | None, zone_name: str | None) -> str:
    """A UTC time (ISO string or datetime) in the viewer's time zone, e.g. ``2026-11-27 17:03:04 CET``.

    Without a known zone the time stays in UTC and says so.
    """
    moment = parse_iso(value) if isinstance(value, str) or value is None else value
    if moment is None:
        return "—"
    zone = viewer_zone(zone_name)
    shown = moment.astimezone(zone or UTC)
    return shown.strftime("%Y-%m-%d %H:%M:%S ") + (shown.tzname() or "UTC")
