"""Sign-in with OpenID Connect (ETL_AUTH=oidc, Streamlit's st.login) against a real provider started on
loopback (the npm package oidc-provider, installed by the test set-up), in Chromium: no mock of the sign-in."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import loader

from ..helpers import free_port
from .app_server import StreamlitServer
from .conftest import ROOT, Demo

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("ledger")]

#: Where the test set-up installs the provider (npm), outside the sources.
PROVIDER_DIR = ROOT / ".pytest_cache" / "oidc-provider"
OPERATOR = "ops@example.com"
VIEWER = "ana@example.com"


@pytest.fixture(scope="session")
def provider_install() -> Path:
    """oidc-provider (tests/ui/oidc/package.json) installed with npm, once."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the OIDC sign-in test: apt-get install -y nodejs npm")
    PROVIDER_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "provider.mjs"):
        shutil.copyfile(Path(__file__).parent / "oidc" / name, PROVIDER_DIR / name)
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=PROVIDER_DIR, check=True,
                       timeout=600)
    return PROVIDER_DIR


class Provider:
    """``node provider.mjs`` on a free loopback port, answering its discovery document; ``stop()`` ends it."""

    def __init__(self, folder: Path, redirect_uri: str, client_secret: str, log: Path) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        self.proc = subprocess.Popen(["node", "provider.mjs", str(self.port), redirect_uri, client_secret],
                                     cwd=folder, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.issuer}/.well-known/openid-configuration", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"oidc-provider did not start; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def oidc_console(demo: Demo, workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 provider_install: Path) -> Iterator[StreamlitServer]:
    port = free_port()
    redirect_uri = f"http://127.0.0.1:{port}/etl/oauth2callback"
    client_secret = secrets.token_hex(16)
    provider = Provider(provider_install, redirect_uri, client_secret, tmp_path / "oidc-provider.log")
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(
        "[auth]\n"
        f'redirect_uri = "{redirect_uri}"\n'
        f'cookie_secret = "{secrets.token_hex(32)}"\n'
        'client_id = "dataloader-console"\n'
        f'client_secret = "{client_secret}"\n'
        f'server_metadata_url = "{provider.issuer}/.well-known/openid-configuration"\n'
        # Streamlit asks for prompt=select_account unless told otherwise; oidc-provider knows login and consent.
        'client_kwargs = { prompt = "login" }\n')
    monkeypatch.setenv("ETL_AUTH", "oidc")
    monkeypatch.setenv("ETL_VIEWERS", "@example.com")
    monkeypatch.setenv("ETL_OPERATORS", OPERATOR)
    try:
        console = StreamlitServer("Home.py", ROOT, log_dir=ROOT / ".pytest_cache", log_name="console-oidc",
                                  port=port, args=["--secrets.files", str(secrets_file)])
        try:
            yield console
        finally:
            console.stop()
    finally:
        provider.stop()


def sign_in(page, email: str) -> None:
    """Through the provider's own sign-in pages (oidc-provider's development interactions)."""
    page.get_by_role("link", name="Sign in").click()
    page.locator("input[name=login]").fill(email)
    page.locator("input[name=password]").fill("any")
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()


def test_under_oidc_a_person_signs_in_at_a_real_provider_and_acts_as_their_email_claim(
        oidc_console, demo, browser):
    from .test_browser import start_from_the_ui

    finished = loader.start_run(demo.job, run_id="before", batch_size=500, actor="cron")
    loader.wait_for_run(demo.job, finished.etl_run_id, timeout=60)
    logs = f"{oidc_console.url}/etl/data-loader/api/runs/{demo.job}/before/logs.ndjson"
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.goto(f"{oidc_console.url}/etl/data-loader")
    page.get_by_role("heading", name="Sign-in required").wait_for(timeout=30_000)
    assert demo.job not in page.locator(".stApp").inner_text()
    assert context.request.get(logs).status == 401
    sign_in(page, OPERATOR)
    page.get_by_text(f"Signed in as {OPERATOR} (operator)").wait_for(timeout=30_000)
    # The routes read the same signed sign-in cookie: the browser's downloads work, a forged cookie does not.
    response = context.request.get(logs)
    assert response.status == 200 and json.loads(response.text().splitlines()[0])["run"] == "before"
    forged = urllib.request.Request(logs, headers={"Cookie": '_streamlit_user="{\\"email\\": \\"ops@example.com\\"}"'})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 401
    run = start_from_the_ui(page, oidc_console, demo)
    page.get_by_text(f"started by: {OPERATOR}").wait_for(timeout=30_000)
    assert loader.run_contract(demo.job, run)["started_by"] == OPERATOR


def test_under_oidc_a_deep_link_survives_the_sign_in_and_a_viewer_may_look_but_not_act(oidc_console, demo, browser):
    finished = loader.start_run(demo.job, run_id="seen", batch_size=500, actor="cron")
    loader.wait_for_run(demo.job, finished.etl_run_id, timeout=60)
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.goto(f"{oidc_console.url}/etl/data-loader/{demo.job}/seen")  # a shared link, signed out
    page.get_by_role("heading", name="Sign-in required").wait_for(timeout=30_000)
    sign_in(page, VIEWER)
    page.get_by_text("started by: cron").wait_for(timeout=30_000)  # the run the link named, after the provider
    page.get_by_text(f"Signed in as {VIEWER} (viewer)").wait_for()
    assert "job=" in page.url and "run=seen" in page.url
    assert not any(c["name"] == "dl_after_sign_in" for c in context.cookies())  # used once
    assert page.get_by_role("button", name="Start Load (operators only)").is_disabled()
    api = f"{oidc_console.url}/etl/data-loader/api/runs/{demo.job}/seen"
    assert context.request.get(f"{api}/metrics.csv").status == 200
    assert context.request.get(f"{api}/rejects.ndjson").status == 403
