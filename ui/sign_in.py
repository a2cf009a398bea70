"""The console's door: who is here, what they are told, and nothing more for those without a sign-in."""

from __future__ import annotations

import html
from urllib.parse import urlencode

import streamlit as st

from loader.access import AuthMode
from loader.errors import LoaderError

from .identity import Person, session_person
from .layout import inject_css
from .routes import PAGE_PATH
from .text import alert, caption

#: The permanent note under ETL_AUTH=none.
NO_SIGN_IN_NOTE = ("No sign-in (ETL_AUTH=none): anyone who can reach this console can start, retry and cancel runs "
                   "and download rejected records.")
SIGN_IN_REQUIRED = "Sign-in required"


def admit() -> Person:
    """The person of this session, after the page has said what it must; stops the script run (st.stop) for
    anyone the console must show nothing to: nobody identified under ``proxy`` / ``oidc``, or a person
    ``ETL_VIEWERS`` does not admit. A broken setting (ETL_AUTH, ETL_VIEWERS...) is said and stops too."""
    try:
        person = session_person()
    except LoaderError as exc:
        alert(str(exc), prefix="The console's sign-in settings are wrong: ")
        st.stop()
    mode = person.rules.mode
    if mode is AuthMode.NONE:
        caption(NO_SIGN_IN_NOTE)
        return person
    if person.email is None:
        inject_css()
        st.title(SIGN_IN_REQUIRED, anchor=False)
        if mode is AuthMode.OIDC:
            st.write("Sign in to see the Data Loader console.")
            # Through the console's own route, so that the page this link named opens after the sign-in.
            q = st.query_params
            link = f"{PAGE_PATH}/api/sign-in?{urlencode({k: q[k] for k in ('job', 'run') if k in q})}"
            st.html(f'<a class="dl-sign-in" href="{html.escape(link)}" target="_self">Sign in</a>')
        else:
            st.write("This console is reached through your organisation's sign-in: open it through the address "
                     "your team uses, or ask who runs it.")
        st.stop()
    if not person.may_use_console():
        st.title("Not allowed", anchor=False)
        alert(f"You are signed in as {person.email}, who may not view this console (ETL_VIEWERS). "
              "Ask its operators for access.", "warning")
        st.stop()
    with st.container(horizontal=True, horizontal_alignment="right", key="dl-who"):
        role = "operator" if person.rules.may_operate(person.email) else "viewer"
        caption(f"Signed in as {person.email} ({role})")
        if mode is AuthMode.OIDC:
            st.button("Sign out", on_click=st.logout, key="dl-sign-out")
    if person.rules.operators.nobody:
        caption("Nobody may act: ETL_OPERATORS names no one, so every action is disabled.")
    return person
