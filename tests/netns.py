"""Another "host" for workers: a Linux network namespace joined to this one by a veth pair.

Processes started in it have their own network stack: they reach this host's services only at its address
on the veth pair, never at 127.0.0.1. PostgreSQL and Redis listen on loopback here, so the host forwards a
port on its veth address to each (plain TCP relays, as a NAT rule or a proxy in front of a database would).
Needs root (CAP_NET_ADMIN) and the ``ip`` command; :func:`unavailable` says why when they are missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .helpers import TcpRelay


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CAP_NET_ADMIN); this test runs as another user"
    probe = f"dlprobe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"this machine does not allow network namespaces: ip netns add: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class RemoteHost:
    """A network namespace with an address of its own (``remote_ip``) on a veth pair to this host (``host_ip``).

    ``expose(url)`` gives the URL at which the namespace reaches a service this host has on loopback;
    ``start(args, env, cwd)`` starts a process inside it.
    """

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name = f"dlhost-{tag}"
        subnet = _free_subnet()
        self.host_ip, self.remote_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        host_if, remote_if = f"vh{tag}", f"vr{tag}"
        self._relays: list[TcpRelay] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", remote_if],
            ["ip", "link", "set", remote_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.remote_ip}/30", "dev", remote_if],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", remote_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        self._host_if = host_if
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def expose(self, url: str) -> str:
        """``url`` (a service on this host's loopback) as the namespace reaches it: at ``host_ip``, via a relay."""
        parts = urlsplit(url)
        relay = TcpRelay((parts.hostname or "127.0.0.1", parts.port or 0), self.host_ip)
        self._relays.append(relay)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.host_ip}:{relay.port}"))

    def reaches(self, ip: str, port: int) -> bool:
        """Whether a process in the namespace can open a TCP connection to ``ip:port``."""
        code = f"import socket; socket.create_connection(({ip!r}, {port}), timeout=2).close()"
        r = subprocess.run(["ip", "netns", "exec", self.name, "python3", "-c", code], capture_output=True)
        return r.returncode == 0

    def start(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            p = subprocess.Popen(["ip", "netns", "exec", self.name, *args], env=env, cwd=cwd, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Every step is tried whatever the others did: a process already gone must not leak the namespace."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for relay in self._relays:
            with contextlib.suppress(OSError):
                relay.close()
        subprocess.run(["ip", "link", "del", self._host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _free_subnet() -> int:
    """A 10.231.X.0/30 no interface of this host has yet (tests running at once each take their own)."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    used = {int(m) for m in re.findall(r"inet 10\.231\.(\d+)\.", shown)}
    free = [n for n in range(256) if n not in used]
    if not free:
        raise RuntimeError("every 10.231.X.0/30 subnet is in use: leaked namespaces? ip netns list")
    return random.choice(free)
