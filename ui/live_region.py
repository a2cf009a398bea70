"""The Run Monitor's ARIA live region: one DOM node for the whole visit, whose text changes in place.

``st.html`` draws a new node at each change, and a screen reader may announce nothing when a live region
is replaced instead of changed. A components-v2 component keeps its node: Streamlit mounts its HTML
once per key and runs its JavaScript again with each new ``data``, which sets the node's text
(``textContent``: text, never markup).
"""

from __future__ import annotations

import streamlit as st

HTML = '<div class="dl-sr-only" role="status" aria-live="polite" aria-atomic="true"></div>'
JS = """export default function(component) {
  const node = component.parentElement.querySelector('[role="status"]');
  const text = typeof component.data === 'string' ? component.data : '';
  if (node && node.textContent !== text) { node.textContent = text; }
}"""
CSS = """.dl-sr-only { position: absolute !important; width: 1px; height: 1px; padding: 0; margin: -1px;
  overflow: hidden; clip: rect(0, 0, 0, 0); white-space: nowrap; border: 0; }"""

_region = st.components.v2.component("dl_live_region", html=HTML, css=CSS, js=JS)


def announce(text: str, *, key: str) -> None:
    """Put ``text`` in the live region of ``key`` (the same key keeps the same node)."""
    _region(data=text, key=key, height=0)
