"""Data Loader console: the entry point for `streamlit run Home.py` (pages, routes, settings).

Streamlit finds ``app = st.App(...)`` below and serves the pages through it, with the console's
own HTTP routes (deep links, the grid's JSON pages, the downloads); see ui/routes.py.
"""

from __future__ import annotations

import streamlit as st

from ui.settings import apply_secrets

apply_secrets()

if __name__ == "__main__":  # a script run (each page view)
    from ui.sign_in import admit

    st.set_page_config(page_title="Data Loader console", page_icon=":material/database_upload:", layout="wide")
    # Before any page, even the navigation: who is here decides what may be shown (nothing at all,
    # without a sign-in; ui/sign_in.py stops the run then).
    st.session_state["dl_person"] = admit()
    nav = st.navigation([
        st.Page("pages/runs.py", title="Recent runs", icon=":material/history:", url_path="runs", default=True),
        st.Page("pages/data_loader.py", title="Data Loader", icon=":material/database_upload:",
                url_path="data-loader"),
    ], position="top")
    nav.run()
else:  # imported by the ASGI server, once, before any session
    import sys

    from starlette.middleware import Middleware
    from streamlit.runtime.pages_manager import PagesManager

    from loader.errors import LoaderError
    from loader.hosts import bind_warning
    from ui.after_sign_in import AfterSignIn
    from ui.hosts import HostCheck
    from ui.identity import keep_the_tcp_peer
    from ui.routes import configure_process, refuse_a_ledger_behind, routes

    # The pages come from st.navigation above. Without this, the first session after a start runs
    # in Streamlit's legacy pages/-directory mode and shows a spurious "Page not found" dialog.
    PagesManager.uses_pages_directory = False

    try:
        keep_the_tcp_peer()  # under ETL_AUTH=proxy the peer checked is the one that connected (ui/identity.py)
    except LoaderError as exc:  # ETL_AUTH is none of none, oidc, proxy: nobody could be let in
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    warning = bind_warning(st.config.get_option("server.address") or "")
    if warning:
        print(warning, file=sys.stderr, flush=True)
    refuse_a_ledger_behind()  # exits, naming `dataloader initdb`, when the ledger is missing or behind
    configure_process()  # the console's reads run under ETL_CONSOLE_STATEMENT_TIMEOUT (workers' do not)
    # HostCheck runs before Streamlit's own middleware: page, websocket and data routes alike.
    app = st.App("Home.py", routes=routes(), middleware=[Middleware(HostCheck), Middleware(AfterSignIn)])
