"""Text from outside on the page: always shown as text, never as Markdown or HTML.

Messages of errors, catalog descriptions, file names and ids come from sources the console does not
control. Streamlit renders the body of ``st.error``/``st.info``/``st.caption``/``st.toast`` as
Markdown, and its Markdown turns ``https://…``, ``www.…`` and e-mail addresses into links even when
every punctuation character is backslash-escaped (GFM autolinks are found in the parsed text). So
outside text goes through these helpers instead: ``alert`` and ``caption`` write escaped HTML that
holds only elements and classes of this module (``st.html``, sanitized by Streamlit as well), and
``md_code`` puts a short id inside Markdown we wrote as a code span, where nothing is parsed.
"""

from __future__ import annotations

import html
import re
from typing import Literal

import streamlit as st

Kind = Literal["error", "warning", "info", "success"]

#: A symbol and a word for each kind of alert: the kind is never said by colour alone.
_KINDS: dict[str, tuple[str, str]] = {
    "error": ("✕", "Error"),
    "warning": ("⚠", "Warning"),
    "info": ("ℹ", "Note"),
    "success": ("✓", "Done"),
}

CSS = """
.dl-alert { display: flex; gap: 0.6rem; align-items: flex-start; border-radius: 0.5rem; padding: 0.75rem 1rem;
  margin: 0 0 0.5rem 0; white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.5; }
.dl-alert-icon { font-weight: 700; }
.dl-alert-error { background: #fdecec; color: #7f1d1d; }
.dl-alert-warning { background: #fff6e0; color: #713f12; }
.dl-alert-info { background: #e8f1fd; color: #1e3a8a; }
.dl-alert-success { background: #e9f7ee; color: #14532d; }
.dl-alert-link { color: inherit; font-weight: 600; text-decoration: underline; }
.dl-caption { font-size: 0.875rem; color: #475569; margin: 0 0 0.5rem 0; white-space: pre-wrap;
  overflow-wrap: anywhere; }
"""


def alert_html(text: object, kind: Kind = "error", *, prefix: str = "", link: tuple[str, str] | None = None,
               element_id: str | None = None) -> str:
    """The HTML of an alert box: ``prefix`` (ours, plain) then ``text`` (anyone's), both escaped.

    ``link`` is ``(label, path)``: a link after the text, both escaped; the path must be one the
    console built (``ui.routes.run_path``), never one from outside. ``element_id`` names the box (for
    ``aria-describedby``).

    Example::

        >>> alert_html("<b>x</b> www.example.com", "warning")  # doctest: +ELLIPSIS
        '<div class="dl-alert dl-alert-warning">...&lt;b&gt;x&lt;/b&gt; www.example.com</span></div>'
    """
    icon, word = _KINDS[kind]
    role = ' role="alert"' if kind == "error" else ""
    ident = f' id="{html.escape(element_id)}"' if element_id else ""
    after = ""
    if link is not None:
        label, href = link
        after = f' <a class="dl-alert-link" href="{html.escape(href)}" target="_self">{html.escape(label)}</a>'
    return (f'<div class="dl-alert dl-alert-{kind}"{ident}{role}><span class="dl-alert-icon" aria-hidden="true">'
            f'{icon}</span><span><span class="dl-sr-only">{word}: </span>{html.escape(prefix + str(text))}{after}'
            '</span></div>')


def alert(text: object, kind: Kind = "error", *, prefix: str = "", link: tuple[str, str] | None = None) -> None:
    """An error, warning, note or success box whose text is shown exactly as given.

    Example::

        alert(str(exc), prefix="Start Load: ")
        alert("Run ID x is already used", link=("Open run x", run_path(job, "x")))
    """
    st.html(alert_html(text, kind, prefix=prefix, link=link))


def caption(text: object) -> None:
    """A small grey line of text shown exactly as given (a job's description, a file name)."""
    st.html(f'<p class="dl-caption">{html.escape(str(text))}</p>')


_BACKTICKS = re.compile(r"`+")


def md_code(text: object) -> str:
    """``text`` as a Markdown code span: shown literally, in Markdown we write (toasts, help, notes).

    The fence is one backtick longer than the longest run inside, as CommonMark asks.

    Example::

        >>> md_code("www.example.com")
        '`www.example.com`'
    """
    value = str(text).replace("\n", " ")
    fence = "`" * (max((len(m) for m in _BACKTICKS.findall(value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"
