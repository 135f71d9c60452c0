"""What every client connection of a worker shares: the settings of the day, the router, the
counts, and the two sweeps (slow clients, backends' read deadlines).

The app builds ``ProxySettings`` once per config and swaps ``ProxyState.router`` and
``.settings`` on reload, one assignment each; a request reads both as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Protocol

from balancer.accesslog import KeyRecorder, digest_key
from balancer.config import AccessLogConfig, ClientConfig, Config
from balancer.http1.request import RequestParser
from balancer.router import Router
from balancer.slowclients import ClientTimers, Timed

__all__ = ["Client", "Deadlines", "ProxySettings", "ProxyState", "Waiting",
           "default_max_clients"]

log = logging.getLogger("balancer.proxy")


class Client(Timed, Protocol):
    """A client connection as the state sees it (``proxy.ClientConnection``)."""

    def drain(self) -> None:
        """Close now if idle, else after the answer in progress."""


class Waiting(Protocol):
    """A request waiting for a backend's answer (``exchange.Exchange``)."""

    deadline: float  # monotonic seconds

    def read_deadline(self) -> None:
        """Its deadline passed."""


class Deadlines:
    """The read deadlines of requests waiting for a backend, checked by one periodic sweep.

    Cheaper than a timer per request (a set add and discard instead of scheduling and
    cancelling a TimerHandle, for every request); a deadline fires up to ``interval`` late.
    """

    __slots__ = ("waiting", "interval", "_handle")

    def __init__(self, interval: float = 0.1) -> None:
        self.waiting: set[Waiting] = set()
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, ex: Waiting) -> None:
        self.waiting.add(ex)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def forget(self, ex: Waiting) -> None:
        self.waiting.discard(ex)

    def _sweep(self) -> None:
        self._handle = None
        t = time.monotonic()
        for ex in [ex for ex in self.waiting if ex.deadline <= t]:
            self.waiting.discard(ex)
            try:
                ex.read_deadline()
            except Exception:
                log.exception("bug while timing out %r", ex)
        if self.waiting:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None



_CLIENT = ClientConfig()


@dataclass(frozen=True)
class ProxySettings:
    """Request-path settings, built once per config by the app."""

    # One JSON line per request to the "balancer.access" logger: a bool, or the config's
    # AccessLogConfig, which also says what each pool's lines record (kept as a bool after init).
    access_log: bool | AccessLogConfig = True
    server_name: str = "balancer"  # for Via
    max_body_size: int | None = _CLIENT.max_body_size  # larger bodies get 413 (None: no limit)
    max_url_size: int = _CLIENT.max_url_size  # longer request targets get 414
    max_header_size: int = _CLIENT.max_header_size  # larger request heads get 431
    max_headers: int = _CLIENT.max_headers  # more header fields get 431
    # Slow and idle clients (slowclients.py), in seconds.
    header_timeout: float = _CLIENT.header_timeout  # a whole request head
    body_timeout: float = _CLIENT.body_timeout  # between two reads of a request body
    keepalive_timeout: float = _CLIENT.keepalive_timeout  # idle between requests
    send_timeout: float = _CLIENT.send_timeout  # an answer the client does not read
    # Concurrent client connections. None: no limit here (the app passes the config's value,
    # or half the open-files limit when the config leaves it unset).
    max_clients: int | None = None

    # Pre-built header lines (derived from the fields above).
    via_request: bytes = field(init=False, repr=False, compare=False)
    via_request_10: bytes = field(init=False, repr=False, compare=False)
    via_response: bytes = field(init=False, repr=False, compare=False)
    # Pool name → what its access lines record under "keys" (pools with nothing: absent);
    # None when no pool records anything, so the request path pays one ``is None``.
    access_keys: Mapping[str, KeyRecorder] | None = field(init=False, repr=False,
                                                          compare=False)

    def __post_init__(self) -> None:
        log_config = self.access_log
        keys: dict[str, KeyRecorder] = {}
        if isinstance(log_config, AccessLogConfig):
            secret = digest_key(log_config.digest_key)
            keys = {pool: KeyRecorder(labels, secret)
                    for pool, labels in log_config.pools.items()}
        object.__setattr__(self, "access_log", bool(log_config))
        object.__setattr__(self, "access_keys", MappingProxyType(keys) if keys else None)
        name = self.server_name.strip()
        if not name or not re.fullmatch(r"[!-~]+", name):
            raise ValueError(f"server_name must be one visible ASCII word, got {name!r}")
        raw = name.encode("ascii")
        object.__setattr__(self, "via_request", b"Via: 1.1 " + raw + b"\r\n")
        object.__setattr__(self, "via_request_10", b"Via: 1.0 " + raw + b"\r\n")
        object.__setattr__(self, "via_response", b"Via: 1.1 " + raw + b"\r\n")


class ProxyState:
    """Shared by every client connection; the app swaps ``router``/``settings`` on reload
    (one assignment each). A request reads both when it arrives and keeps them to its end."""

    __slots__ = ("router", "settings", "connections", "in_flight", "draining", "deadlines",
                 "timers", "turned_away", "parsers", "_warned_full")

    def __init__(self, router: Router, settings: ProxySettings) -> None:
        self.router = router
        self.settings = settings
        self.connections: set[Client] = set()  # open client connections
        self.in_flight = 0  # requests between their head and the end of their answer
        self.draining = False
        self.deadlines = Deadlines()  # read timeouts of requests waiting for a backend
        self.timers = ClientTimers(self)  # slow and idle clients; ``timers.fired`` counts
        self.turned_away = 0  # connections answered 503 because of max_clients
        # Parsers given back by connections gone idle, for the next request to take (proxy.py)
        self.parsers: list[RequestParser] = []
        self._warned_full = 0.0

    def turn_away(self, conn: object) -> None:
        """Count a connection refused by ``max_clients``; say so at most once a minute."""
        self.turned_away += 1
        t = time.monotonic()
        if t - self._warned_full >= 60.0:
            self._warned_full = t
            log.warning("max_clients (%d) reached: new client connections are answered 503 "
                        "(%d so far)", self.settings.max_clients, self.turned_away)

    def begin_drain(self) -> None:
        """Stop keep-alive: close idle client connections now, busy ones after their answer."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()

    def __repr__(self) -> str:
        return (f"<ProxyState {len(self.connections)} connections, {self.in_flight} in flight"
                f"{' draining' if self.draining else ''}>")


def default_max_clients() -> int:
    """Half the open-files limit: every client may need a backend connection too, and the
    rest (listeners, health probes, logs) must still find a descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1 << 20
    return max(16, (soft - 64) // 2)


def settings_for(config: Config) -> ProxySettings:
    """The request path's settings for ``config``: client limits and timeouts (``client:``);
    ``max_clients`` unset means half the open-files limit (``default_max_clients``)."""
    c = config.client
    return ProxySettings(
        access_log=config.access_log,
        max_body_size=c.max_body_size, max_url_size=c.max_url_size,
        max_header_size=c.max_header_size, max_headers=c.max_headers,
        header_timeout=c.header_timeout, body_timeout=c.body_timeout,
        keepalive_timeout=c.keepalive_timeout, send_timeout=c.send_timeout,
        max_clients=c.max_clients if c.max_clients is not None else default_max_clients())
