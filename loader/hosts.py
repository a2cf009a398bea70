"""Which `Host` names the console answers, and whether the address it listens on is this machine only."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from . import config
from .errors import ConfigError

#: Host names the console always answers: this machine, by name and by loopback address.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
#: A DNS name (or an IPv4 address) as found in a Host header, lowercased, without its trailing dot.
_NAME_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_PORT_RE = re.compile(r"[0-9]{0,5}")


def parse_host(header: str | None) -> str | None:
    """The host of a ``Host`` header in one canonical spelling, or None when the header is malformed.

    The port goes, letters are lowercased, a trailing dot (``localhost.``) is dropped and IP
    literals are written the standard way (``[0:0:0:0:0:0:0:1]:8501`` -> ``[::1]``). A bare IPv6
    address without brackets, a user part, spaces or an empty host are malformed.

    Example::

        >>> parse_host("LocalHost.:8501")
        'localhost'
        >>> parse_host("[::1]:8501")
        '[::1]'
        >>> parse_host("evil.example:8501@127.0.0.1") is None
        True
    """
    if not header:
        return None
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:]
        if end < 0 or "%" in header or (rest and not (rest.startswith(":") and _PORT_RE.fullmatch(rest[1:]))):
            return None  # no closing bracket, a zone (%eth0) or garbage after the address
        try:
            return f"[{ipaddress.IPv6Address(header[1:end]).compressed}]"
        except ValueError:
            return None
    name, colon, port = header.partition(":")
    if colon and not _PORT_RE.fullmatch(port):
        return None
    name = name.lower()
    name = name[:-1] if name.endswith(".") else name
    if not _NAME_RE.fullmatch(name):
        return None
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        return name


def allowed_hosts() -> frozenset[str]:
    """The hosts the console answers: LOOPBACK_HOSTS, the host of ETL_CONSOLE_URL and ETL_ALLOWED_HOSTS.

    Entries of ETL_ALLOWED_HOSTS are host names or IP addresses (``[::1]`` or ``::1``), a port is
    ignored. Raises ConfigError naming an entry that is not a host.

    Example::

        >>> os.environ["ETL_ALLOWED_HOSTS"] = "loader.example.com, 10.0.0.5"
        >>> sorted(allowed_hosts())
        ['10.0.0.5', '127.0.0.1', '[::1]', 'loader.example.com', 'localhost']
    """
    hosts = set(LOOPBACK_HOSTS)
    console = urlsplit(config.get("ETL_CONSOLE_URL")).hostname
    if console and not _is_unspecified(console):
        parsed = parse_host(f"[{console}]" if ":" in console else console)
        if parsed is not None:
            hosts.add(parsed)
    for entry in config.get("ETL_ALLOWED_HOSTS").split(","):
        entry = entry.strip()
        if not entry:
            continue
        parsed = parse_host(f"[{entry}]" if entry.count(":") > 1 and not entry.startswith("[") else entry)
        if parsed is None:
            raise ConfigError(f"ETL_ALLOWED_HOSTS: {entry!r} is not a host name or an IP address "
                              "(expected e.g. loader.example.com, 10.0.0.5 or [fd00::5])", setting="ETL_ALLOWED_HOSTS")
        hosts.add(parsed)
    return frozenset(hosts)


def is_loopback(address: str) -> bool:
    """Whether listening on ``address`` (a bind address: IP, name or ``unix://`` path) reaches this machine only.

    Example::

        >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0"), is_loopback("")
        (True, True, False, False)
    """
    address = address.strip()
    if address.startswith("unix://"):
        return True
    name = address.strip("[]").lower().removesuffix(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_warning(address: str) -> str | None:
    """The warning to print when the console listens on ``address`` beyond this machine, else None.

    Under ``ETL_AUTH=none`` the console has no sign-in: whoever reaches its port can start, retry and
    cancel runs and download every run's logs and rejected records. Under ``proxy`` or ``oidc`` it
    identifies people (loader/access.py) and there is nothing to warn about.

    Example::

        >>> bind_warning("127.0.0.1") is None
        True
    """
    from .access import AuthMode, auth_mode

    if is_loopback(address) or auth_mode() is not AuthMode.NONE:
        return None
    where = address or "every interface"
    return (f"WARNING: the console listens on {where}, not only on this machine, and has no sign-in: anyone "
            "who reaches its port can start, retry and cancel runs and download their logs and rejected "
            "records. Bind 127.0.0.1 (the default) or put it behind your access control; name the hosts it "
            "answers to in ETL_ALLOWED_HOSTS.")


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
