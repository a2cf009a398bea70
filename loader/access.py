"""Who may do what: the identity modes, and the viewer and operator rules of the console.

One small module of pure rules, so that the page, its websocket session and every HTTP route decide
alike. A person is an e-mail address (the proxy's header, or the OIDC email claim), or nobody. A
list of principals is ``*`` (anyone identified), e-mail addresses and ``@domain`` suffixes
(``@example.com`` admits ``ana@example.com``, not ``ana@sub.example.com`` nor ``ana@badexample.com``),
compared without regard to case. ``ETL_VIEWERS`` and ``ETL_OPERATORS`` say who may look and who
may act; a job of the catalog may narrow both (``viewers = [...]``, ``operators = [...]``): a person
needs both the global role and the job's. An operator of a job must also be able to view it.

Under ``ETL_AUTH=none`` nobody is identified: the one person, ``anonymous``, may view every job and,
unless ``ETL_OPERATORS`` is set (then nobody may act), operate them; the console says so on every page.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from . import config
from .errors import ConfigError

#: Longest e-mail address accepted (RFC 3696 errata).
MAX_EMAIL = 320
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class AuthMode(StrEnum):
    """How the console identifies people (``ETL_AUTH``)."""

    NONE = "none"
    OIDC = "oidc"
    PROXY = "proxy"


def auth_mode() -> AuthMode:
    """``ETL_AUTH``, checked.

    Example::

        >>> auth_mode()
        <AuthMode.NONE: 'none'>
    """
    raw = config.get("ETL_AUTH").lower()
    try:
        return AuthMode(raw)
    except ValueError:
        raise ConfigError(f"ETL_AUTH must be none, oidc or proxy, found {raw!r}", setting="ETL_AUTH") from None


def parse_email(value: str | None) -> str | None:
    """An e-mail address from outside (a header, a claim), lower-cased; None when it is not one.

    Exactly one ``@`` with text on both sides, no space or control character, a domain of plain DNS
    labels, at most :data:`MAX_EMAIL` characters: anything else identifies nobody.

    Example::

        >>> parse_email(" Ana@Example.COM ")
        'ana@example.com'
        >>> parse_email("ana@example.com, bob@example.com") is None
        True
    """
    if value is None:
        return None
    raw = value.strip(" \t")  # spaces around are noise; a line break or a control character is not
    # ASCII only: lower() folds some other letters into ASCII ones (KELVIN SIGN -> "k"), which would let
    # "\u212aate@corp.com" pass for kate@corp.com.
    if not raw.isascii():
        return None
    text = raw.lower()
    if len(text) > MAX_EMAIL or not text.isprintable() or not _EMAIL.match(text):
        return None
    return text if _DOMAIN.match(text.rsplit("@", 1)[1]) else None


@dataclass(frozen=True)
class Principals:
    """A list of people: anyone (``*``), some e-mail addresses, some ``@domain`` suffixes."""

    anyone: bool = False
    emails: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    def admits(self, email: str | None) -> bool:
        """Whether the person is in the list (nobody, None, is in none).

        Example::

            >>> parse_principals("@example.com").admits("ana@example.com")
            True
            >>> parse_principals("@example.com").admits("ana@badexample.com")
            False
        """
        if email is None:
            return False
        return self.anyone or email in self.emails or email.rsplit("@", 1)[1] in self.domains

    @property
    def nobody(self) -> bool:
        return not (self.anyone or self.emails or self.domains)


NOBODY = Principals()
ANYONE = Principals(anyone=True)


def parse_principals(items: str | Iterable[str], *, where: str = "the list") -> Principals:
    """``*``, e-mail addresses and ``@domain`` suffixes, comma-separated (or a list); ConfigError names
    each entry that is none of them (``where`` says whose list it is).

    Example::

        >>> sorted(parse_principals("ana@example.com, @Example.org").domains)
        ['example.org']
    """
    entries = [e.strip() for e in (items.split(",") if isinstance(items, str) else items)]
    emails: set[str] = set()
    domains: set[str] = set()
    anyone = False
    bad = []
    for entry in entries:
        if not entry:
            continue
        if entry == "*":
            anyone = True
        elif entry.startswith("@") and _DOMAIN.match(entry[1:].lower()) and "." in entry:
            domains.add(entry[1:].lower())
        elif (email := parse_email(entry)) is not None:
            emails.add(email)
        else:
            bad.append(entry)
    if bad:
        raise ConfigError(f"{where}: {', '.join(repr(b[:80]) for b in bad)} is not *, an e-mail address nor an "
                          "@domain suffix", entries=bad)
    return Principals(anyone, frozenset(emails), frozenset(domains))


@dataclass(frozen=True)
class JobAccess:
    """A job's own narrowing of the roles (None: the job does not narrow that role)."""

    viewers: Principals | None = None
    operators: Principals | None = None


@dataclass(frozen=True)
class Rules:
    """The roles in force: the mode, ``ETL_VIEWERS`` and ``ETL_OPERATORS``."""

    mode: AuthMode
    viewers: Principals
    operators: Principals

    def may_view(self, email: str | None, job: JobAccess | None = None) -> bool:
        """Whether the person may see the job (its runs, metrics, batches, logs, metrics CSV).

        Under ``none`` everybody (nobody is told apart); otherwise an identified person admitted by
        ``ETL_VIEWERS`` and by the job's ``viewers`` when it has some.
        """
        if self.mode is AuthMode.NONE:
            return True
        if email is None or not self.viewers.admits(email):
            return False
        return job is None or job.viewers is None or job.viewers.admits(email)

    def may_operate(self, email: str | None, job: JobAccess | None = None) -> bool:
        """Whether the person may start, retry, cancel and force-start runs of the job and download its
        rejected records: a viewer of the job admitted by ``ETL_OPERATORS`` and the job's ``operators``."""
        if self.mode is AuthMode.NONE:  # nobody is identified: everybody or (ETL_OPERATORS names people) nobody
            return self.operators.anyone
        if not self.may_view(email, job) or not self.operators.admits(email):
            return False
        return job is None or job.operators is None or job.operators.admits(email)


def rules() -> Rules:
    """The rules from the environment, read at each call (a setting changed by a test applies at once).

    ``ETL_OPERATORS`` unset means everybody under ``none`` and nobody under ``oidc`` / ``proxy``.
    """
    mode = auth_mode()
    viewers = parse_principals(config.get("ETL_VIEWERS"), where="ETL_VIEWERS")
    raw_operators = config.get("ETL_OPERATORS")
    if raw_operators:
        operators = parse_principals(raw_operators, where="ETL_OPERATORS")
    else:
        operators = ANYONE if mode is AuthMode.NONE else NOBODY
    return Rules(mode, viewers, operators)


def trusted_proxies() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``ETL_TRUSTED_PROXIES`` as networks; ConfigError names an entry that is not an address or a CIDR."""
    nets = []
    for entry in (e.strip() for e in config.get("ETL_TRUSTED_PROXIES").split(",")):
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"ETL_TRUSTED_PROXIES: {entry[:80]!r} is not an IP address or network (CIDR)",
                              setting="ETL_TRUSTED_PROXIES") from None
    return nets


def is_trusted_peer(peer: str | None, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether the TCP peer (the address that connected, never a forwarded one) is a trusted proxy.

    Example::

        >>> is_trusted_peer("127.0.0.2", [ipaddress.ip_network("127.0.0.1/32")])
        False
    """
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def identify(mode: AuthMode, *, header_value: str | None, peer: str | None, oidc_email: str | None) -> str | None:
    """The person making a request, by the mode: the proxy's header from a trusted peer, or the OIDC
    email claim; None when nobody is identified (always under ``none``)."""
    if mode is AuthMode.PROXY:
        return parse_email(header_value) if is_trusted_peer(peer, trusted_proxies()) else None
    if mode is AuthMode.OIDC:
        return parse_email(oidc_email)
    return None
