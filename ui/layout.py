"""Page-wide CSS: two columns from 1024 px, stacked below; visible focus; the metric cards; a screen-reader-only
class."""

from __future__ import annotations

import streamlit as st

from .attempt_timeline import CSS as TIMELINE_CSS
from .text import CSS as TEXT_CSS

CSS = """
<style>
/* Two columns at >= 1024 px; stacked below (Streamlit alone stacks only under 640 px). */
@media (max-width: 1023.98px) {
  .st-key-dl-layout > div > [data-testid="stHorizontalBlock"],
  .st-key-dl-layout [data-testid="stHorizontalBlock"]:first-of-type {
    flex-direction: column !important; flex-wrap: wrap !important; }
  .st-key-dl-layout [data-testid="stHorizontalBlock"]:first-of-type > [data-testid="stColumn"] {
    width: 100% !important; flex: 1 1 100% !important; min-width: 100% !important; }
}
/* Headings in order (h1 page, h2 panels, h3 sections: axe's heading-order), at the sizes of a compact console. */
.st-key-dl-layout h2 { font-size: 1.5rem !important; }
.st-key-dl-layout h3 { font-size: 1.05rem !important; padding-top: 0.5rem !important; }
/* The grid keeps its column widths and scrolls sideways on narrow screens. */
.st-key-dl-grid-wrap { overflow-x: auto; }
/* Keyboard focus always visible. */
a:focus-visible, button:focus-visible, input:focus-visible, [role="option"]:focus-visible,
[tabindex]:focus-visible, summary:focus-visible {
  outline: 3px solid #1d4ed8 !important; outline-offset: 2px !important; }
/* The Run Monitor's times and metric cards (ui/run_header.py cards: one HTML block per refresh). */
.dl-times { font-size: 0.875rem; opacity: 0.85; margin-bottom: 0.5rem; }
.dl-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 0.5rem;
  margin: 0 !important; padding: 0 !important; }
.dl-card { border: 1px solid rgba(128, 128, 128, 0.35); border-radius: 0.5rem; padding: 0.5rem 0.75rem; }
.dl-card[title] .dl-l { text-decoration: underline dotted; text-underline-offset: 3px; cursor: help; }
.dl-l { font-size: 0.875rem; margin: 0; }
.dl-v { font-size: 1.35rem; margin: 0; font-variant-numeric: tabular-nums; }
/* The run's history of actions (ui/run_header.py history). */
.dl-history ol { margin: 0 0 0.5rem 1.2rem; padding: 0; font-size: 0.875rem; overflow-wrap: anywhere; }
.dl-history p { margin-bottom: 0.1rem; }
/* The Sign in link under ETL_AUTH=oidc (ui/sign_in.py), drawn as a primary button. */
.dl-sign-in { display: inline-block; padding: 0.4rem 1rem; border-radius: 0.5rem; background: #1d4ed8;
  color: #fff !important; text-decoration: none; font-weight: 600; }
.dl-sr-only { position: absolute !important; width: 1px; height: 1px; padding: 0; margin: -1px;
  overflow: hidden; clip: rect(0, 0, 0, 0); white-space: nowrap; border: 0; }
/* Alerts and captions holding outside text (ui/text.py). */
""" + TEXT_CSS + """
/* A batch's retry timeline (ui/attempt_timeline.py). */
""" + TIMELINE_CSS + """
</style>
"""


def inject_css() -> None:
    st.html(CSS)
