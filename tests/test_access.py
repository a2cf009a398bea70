"""The rules of who may view and operate (loader/access.py), on their own: parsing, matching, modes, proxies."""

from __future__ import annotations

import ipaddress

import pytest

from loader.access import (
    ANYONE,
    NOBODY,
    AuthMode,
    JobAccess,
    auth_mode,
    identify,
    is_trusted_peer,
    parse_email,
    parse_principals,
    rules,
)
from loader.catalog import load_catalog
from loader.errors import ConfigError

from .helpers import write_catalog


@pytest.mark.parametrize("raw", [
    None, "", "ana", "@example.com", "ana@", "ana@@example.com", "ana@example.com@evil.org", "ana @example.com",
    "ana@example.com, bob@example.com", "ana@exa mple.com", "ana@example.com\n", "ana@-bad.com",
    "<script>@example.com>", "a@" + "b" * 64 + ".com", "ana@example.com\u202e", "x" * 300 + "@" + "y" * 30 + ".com",
])
def test_anything_but_one_plain_email_address_identifies_nobody(raw):
    assert parse_email(raw) is None


def test_an_email_is_compared_without_regard_to_case_or_surrounding_spaces():
    assert parse_email("  Ana.Lopez+etl@Example.COM ") == "ana.lopez+etl@example.com"


def test_a_domain_suffix_admits_that_domain_only_not_its_lookalikes_nor_subdomains():
    team = parse_principals("@example.com")
    assert team.admits("ana@example.com") and team.admits("ANA@EXAMPLE.COM".lower())
    assert not team.admits("ana@badexample.com") and not team.admits("ana@sub.example.com")
    assert not team.admits("ana@example.com.evil.org") and not team.admits(None)


def test_a_list_mixes_emails_domains_and_star_and_says_which_entry_is_wrong():
    listed = parse_principals(" ana@example.com , @Example.org,, ")
    assert listed.admits("ana@example.com") and listed.admits("bob@example.org")
    assert not listed.admits("bob@example.com") and not listed.nobody
    assert parse_principals("*").admits("anyone@anywhere.io") and not parse_principals("*").admits(None)
    assert parse_principals("").nobody
    with pytest.raises(ConfigError, match="'example.com'.*'@'.*is not \\*, an e-mail address nor an @domain"):
        parse_principals("ana@example.com, example.com, @", where="ETL_OPERATORS")


def test_the_default_under_none_lets_everybody_view_and_operate(monkeypatch):
    for name in ("ETL_AUTH", "ETL_VIEWERS", "ETL_OPERATORS"):
        monkeypatch.delenv(name, raising=False)
    r = rules()
    assert r.mode is AuthMode.NONE and r.may_view(None) and r.may_operate(None)
    assert r.may_operate(None, JobAccess(viewers=NOBODY, operators=NOBODY))  # nobody is told apart under none
    monkeypatch.setenv("ETL_OPERATORS", "ana@example.com")  # names people nobody can be: nobody acts
    assert not rules().may_operate(None) and rules().may_view(None)


@pytest.mark.parametrize("mode", ["proxy", "oidc"])
def test_under_a_sign_in_mode_the_default_viewers_are_anyone_identified_and_the_operators_nobody(monkeypatch, mode):
    monkeypatch.setenv("ETL_AUTH", mode)
    monkeypatch.delenv("ETL_VIEWERS", raising=False)
    monkeypatch.delenv("ETL_OPERATORS", raising=False)
    r = rules()
    assert r.may_view("ana@example.com") and not r.may_view(None)
    assert not r.may_operate("ana@example.com") and r.operators.nobody


def test_a_job_narrows_the_global_roles_and_never_widens_them(monkeypatch):
    monkeypatch.setenv("ETL_AUTH", "proxy")
    monkeypatch.setenv("ETL_VIEWERS", "@example.com")
    monkeypatch.setenv("ETL_OPERATORS", "ops@example.com, ana@example.com")
    r = rules()
    payroll = JobAccess(viewers=parse_principals("ana@example.com, ops@example.com, eve@evil.org"),
                        operators=parse_principals("ops@example.com, eve@evil.org"))
    assert r.may_view("ana@example.com", payroll) and not r.may_view("bob@example.com", payroll)
    assert not r.may_view("eve@evil.org", payroll)  # the job's list does not widen ETL_VIEWERS
    assert r.may_operate("ops@example.com", payroll) and not r.may_operate("ana@example.com", payroll)
    assert r.may_operate("ana@example.com") and r.may_operate("ana@example.com", JobAccess())
    # An operator of a job must be able to view it.
    hidden = JobAccess(viewers=parse_principals("bob@example.com"), operators=ANYONE)
    assert not r.may_operate("ops@example.com", hidden)


def test_a_broken_setting_is_a_config_error_naming_it(monkeypatch):
    monkeypatch.setenv("ETL_AUTH", "ldap")
    with pytest.raises(ConfigError, match="ETL_AUTH must be none, oidc or proxy"):
        auth_mode()
    monkeypatch.setenv("ETL_AUTH", "proxy")
    monkeypatch.setenv("ETL_TRUSTED_PROXIES", "10.0.0.0/8, proxy.local")
    with pytest.raises(ConfigError, match="ETL_TRUSTED_PROXIES: 'proxy.local'"):
        identify(AuthMode.PROXY, header_value="ana@example.com", peer="10.1.1.1", oidc_email=None)


def test_the_proxy_header_is_believed_only_from_a_trusted_peer(monkeypatch):
    monkeypatch.setenv("ETL_TRUSTED_PROXIES", "127.0.0.1/32,::1/128,10.8.0.0/16")

    def who(peer):
        return identify(AuthMode.PROXY, header_value="ana@example.com", peer=peer, oidc_email=None)

    assert who("127.0.0.1") == who("::1") == who("10.8.3.4") == who("::ffff:127.0.0.1") == "ana@example.com"
    assert who("127.0.0.2") is who("10.9.0.1") is who(None) is who("") is who("not-an-ip") is None
    assert identify(AuthMode.NONE, header_value="ana@example.com", peer="127.0.0.1", oidc_email=None) is None
    assert identify(AuthMode.OIDC, header_value="ana@example.com", peer="127.0.0.1", oidc_email=None) is None
    assert not is_trusted_peer("127.0.0.1", [ipaddress.ip_network("::1/128")])


def test_the_catalog_checks_a_jobs_viewers_and_operators_and_reports_a_bad_one_with_the_job(tmp_path):
    catalog = write_catalog(tmp_path, {
        "payroll": {"source": "p.ndjson", "target_table": "stg.p", "source_id": "id",
                    "viewers": ["@example.com"], "operators": ["ops@example.com"]},
        "typo": {"source": "t.ndjson", "target_table": "stg.t", "source_id": "id", "viewers": ["example.com"]},
        "not-a-list": {"source": "t.ndjson", "target_table": "stg.t", "source_id": "id", "operators": "ops@x.io"},
    })
    loaded = load_catalog(catalog)
    access = loaded.jobs["payroll"].access
    assert access.viewers is not None and access.viewers.admits("ana@example.com")
    assert access.operators is not None and not access.operators.admits("ana@example.com")
    assert loaded.errors["typo"].context["key"] == "viewers" and "'example.com'" in str(loaded.errors["typo"])
    assert "operators must be a list" in str(loaded.errors["not-a-list"])
    assert loaded.jobs["payroll"].to_dict()["viewers"] == ["@example.com"]


def test_the_console_refuses_to_start_with_an_unknown_etl_auth_saying_so():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .helpers import free_port

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "streamlit", "run", "Home.py", "--server.headless", "true",
                          "--server.port", str(free_port())], cwd=root, env={**os.environ, "ETL_AUTH": "ldap"},
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 1
    assert "error: ETL_AUTH must be none, oidc or proxy, found 'ldap'" in out.stderr


def test_an_unreadable_catalog_keeps_the_last_good_roles_and_with_none_read_nobody_views_any_job(tmp_path, monkeypatch):
    """Under a sign-in mode a catalog caught broken (a bad edit, a half-written file) keeps the roles the last
    good read gave; one never read closes every job, instead of opening each to every global viewer."""
    from ui import identity

    monkeypatch.setenv("ETL_AUTH", "proxy")
    monkeypatch.setenv("ETL_VIEWERS", "@example.com")
    monkeypatch.setenv("ETL_OPERATORS", "@example.com")
    folder = tmp_path / "c"
    folder.mkdir()
    catalog = write_catalog(folder, {
        "secret": {"source": "s.ndjson", "target_table": "stg.s", "source_id": "id", "viewers": ["ops@example.com"]},
        "open": {"source": "o.ndjson", "target_table": "stg.o", "source_id": "id"}})
    monkeypatch.setenv("ETL_JOBS_FILE", str(catalog))
    eve = identity.Person("eve@example.com", identity.rules())
    assert eve.may_view("open") and not eve.may_view("secret")
    catalog.write_text("this is [ not toml")
    assert eve.may_view("open") and not eve.may_view("secret")
    assert not eve.may_operate("secret")
    monkeypatch.setenv("ETL_JOBS_FILE", str(tmp_path / "never-there.toml"))
    assert not eve.may_view("open") and not eve.may_view("secret")
    monkeypatch.setenv("ETL_AUTH", "none")  # no sign-in: the global rules, as before
    assert identity.Person(None, identity.rules()).may_view("open")


def test_an_email_with_letters_outside_ascii_identifies_nobody():
    """lower() folds the KELVIN SIGN into "k": "\u212aate@corp.com" must not pass for kate@corp.com."""
    assert parse_email("\u212aate@corp.com") is None and parse_email("ana@exämple.com") is None
    assert parse_email("Kate@Corp.com") == "kate@corp.com"
