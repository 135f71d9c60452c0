"""Which backend entries are the same server: the guard's duplicate rule (balancer/guard.py).

Two entries are one server when scheme and port match and their addresses overlap
(``localhost`` and ``127.0.0.1``, ``127.1``, ``::ffff:127.0.0.1``). Names are resolved in daemon
threads under one overall deadline, so a hung resolver bounds only the check.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Sequence

from balancer.config import BackendConfig, numeric_ip

#: Overall bound on DNS look-ups for the duplicate-server rule (seconds).
RESOLVE_TIMEOUT = 2.0

_Identity = tuple[str, frozenset[str], int]


#: What a connection to the unspecified address reaches on Linux: this machine's loopback.
_UNSPECIFIED_REACHES = {4: "127.0.0.1", 6: "::1"}


def normal_ip(text: str) -> str | None:
    """One spelling per address (``127.1``, ``::ffff:127.0.0.1`` → ``127.0.0.1``), None for a
    name. The config refuses ``0.0.0.0`` as a backend, but a name may resolve to it: it is
    compared as the loopback it reaches, so the duplicate rule sees it."""
    ip = numeric_ip(text)
    if ip is None:
        return None
    return _UNSPECIFIED_REACHES[ip.version] if ip.is_unspecified else ip.compressed


def resolve_hosts(hosts: Iterable[str]) -> dict[str, frozenset[str] | None]:
    """Host name → its addresses (None when it does not resolve in time).

    Each look-up runs in a daemon thread so that a hung resolver bounds only this call, never
    the process's exit; all of them share one overall deadline.
    """
    found: dict[str, frozenset[str] | None] = {}
    threads = []

    def look_up(host: str) -> None:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            found[host] = None
            return
        found[host] = frozenset(filter(None, (normal_ip(str(i[4][0])) for i in infos)))

    for host in sorted(set(hosts)):
        ip = normal_ip(host)
        if ip is not None:
            found[host] = frozenset([ip])
            continue
        t = threading.Thread(target=look_up, args=(host,), daemon=True, name=f"guard-dns-{host}")
        t.start()
        threads.append((host, t))
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    for _host, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {h: found.get(h) for h in set(hosts)}


def servers_of(backends: Sequence[BackendConfig], addresses: dict[str, frozenset[str] | None],
             resolve: bool) -> tuple[dict[str, object], list[BackendConfig]]:
    """Backend name → a server identity shared by entries that reach the same server.

    Entries are the same server when scheme and port match and their address sets overlap
    (``localhost`` and ``127.0.0.1``); a name that does not resolve is compared by name.
    """
    idents: list[_Identity] = []
    unresolved = []
    for b in backends:
        host = b.host.rstrip(".")
        addrs = addresses.get(b.host) if resolve else None
        if addrs is None:
            ip = normal_ip(host)
            if resolve and ip is None:
                unresolved.append(b)
            addrs = frozenset([ip or host])
        idents.append((b.scheme, addrs, b.port))
    # Overlap is not transitive by itself; merge into groups (a tiny union-find).
    group = list(range(len(backends)))
    for i, (scheme, addrs, port) in enumerate(idents):
        for j in range(i):
            s2, a2, p2 = idents[j]
            if scheme == s2 and port == p2 and addrs & a2:
                old, new = group[i], group[j]
                group = [new if g == old else g for g in group]
    return {b.name: group[i] for i, b in enumerate(backends)}, unresolved
