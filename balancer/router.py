"""Request → pool, by host and path prefix; first match wins, no match → ``None`` (a 404).

Matching rules, fixed at load time so a request pays only for a short walk over tuples:

- host: exact (``api.example.com``) or a wildcard suffix (``*.example.com`` matches
  ``a.example.com`` and ``a.b.example.com``, not ``example.com``); a route without a host
  matches any. Hosts are compared lowercased and without a port; a port written in a route's
  host is ignored (the proxy routes on the name, not on the port the client dialled).
- path prefix: on segment boundaries. ``/api`` matches ``/api``, ``/api/`` and ``/api/v1``,
  never ``/apis``; a prefix that ends in ``/`` is a plain prefix (``/api/`` matches
  ``/api/v1`` but not ``/api``). The query string never takes part.

Paths are matched as a server would resolve them, so an encoded or dotted path cannot slip past
a route: ``%``-escapes of unreserved characters are decoded, ``.``/``..`` segments resolved and
repeated slashes merged (only for the match: the request is forwarded as received).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from balancer.config import RouteConfig
from balancer.pool import Pool

__all__ = ["Router", "host_without_port", "normalize_path"]

# One compiled route: (exact host | None, host suffix | None, prefix, prefix is a plain prefix,
# pool). A route with neither host field matches any host.
_Route = tuple[bytes | None, bytes | None, bytes, bool, Pool]

_UNRESERVED_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class Router:
    """Chooses the pool for a request. Immutable: a reload builds a new one and swaps it in."""

    __slots__ = ("routes", "_compiled", "_catch_all")

    def __init__(self, routes: Sequence[RouteConfig], pools: Mapping[str, Pool]) -> None:
        self.routes = tuple(routes)
        compiled: list[_Route] = []
        for i, route in enumerate(self.routes):
            pool = pools.get(route.pool)
            if pool is None:
                known = ", ".join(sorted(pools)) or "none"
                raise ValueError(f"routes[{i}].pool: no pool named {route.pool!r} "
                                 f"(pools: {known})")
            exact = suffix = None
            if route.host is not None:
                host = host_without_port(route.host.strip().lower().encode("ascii"))
                if host.startswith(b"*."):
                    suffix = host[1:]
                else:
                    exact = host
            prefix = route.path_prefix.encode("utf-8")
            compiled.append((exact, suffix, prefix, prefix.endswith(b"/"), pool))
        self._compiled = tuple(compiled)
        # The common single-pool config: every request goes to one pool, no walk at all.
        first = compiled[0] if compiled else None
        self._catch_all = (first[4] if first is not None and first[0] is None
                           and first[1] is None and first[2] == b"/" else None)

    def route(self, host: bytes, path: bytes) -> Pool | None:
        """The pool for ``host`` (lowercased, no port) and ``path``; None when nothing matches."""
        if self._catch_all is not None:
            return self._catch_all
        if b"?" in path:
            path = path.partition(b"?")[0]
        if b"%" in path or b"/." in path or b"//" in path:
            path = normalize_path(path)
        for exact, suffix, prefix, plain, pool in self._compiled:
            if exact is not None:
                if host != exact:
                    continue
            elif suffix is not None and not host.endswith(suffix):
                continue
            if path.startswith(prefix) and (
                    plain or len(path) == len(prefix) or path[len(prefix)] == 0x2F):  # "/"
                return pool
        return None

    def __repr__(self) -> str:
        rules = ", ".join(f"{r.host or '*'}{r.path_prefix}→{r.pool}" for r in self.routes)
        return f"<Router [{rules}]>"


def normalize_path(path: bytes) -> bytes:
    """A path as a server resolves it: unreserved escapes decoded, dot segments removed, and
    repeated slashes merged (RFC 3986 §6.2.2 and §5.2.4, plus nginx's ``merge_slashes``)."""
    if b"%" in path:
        path = _UNRESERVED_ESCAPE.sub(_decode_unreserved, path)
    out: list[bytes] = []
    segments = path.split(b"/")
    for seg in segments[1:] if path.startswith(b"/") else segments:
        if seg == b"..":
            if out:
                out.pop()
        elif seg != b"." and seg != b"":
            out.append(seg)
    trailing = path.endswith((b"/", b"/.", b"/..")) and bool(out)
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


def _decode_unreserved(m: re.Match[bytes]) -> bytes:
    c = int(m.group(1), 16)
    return bytes((c,)) if c in _UNRESERVED else m.group(0).upper()


def host_without_port(host: bytes) -> bytes:
    """``example.com:8080`` → ``example.com``; ``[::1]:8080`` → ``[::1]``."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[:end + 1] if end >= 0 else host
    return host.partition(b":")[0]
