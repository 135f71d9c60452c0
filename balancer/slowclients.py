"""Client-side timeouts: idle, slow and stalled clients are cut off by one coarse sweep.

No timer per request or per read: a periodic sweep (``interval``, at most 1 s) looks at every
client connection and derives what it is waiting for from the state the request path keeps
anyway, so a request costs nothing here. Each connection remembers the phase it was last seen
in and a progress mark; a phase whose mark has not moved for its limit fires:

======== ========================================= ============== ===========================
phase    waiting for                               progress mark  limit, then
======== ========================================= ============== ===========================
FIRST    the first request on a new connection     (none)         header_timeout: close
IDLE     the next request on a kept-alive one      answers given  keepalive_timeout: close
HEAD     the rest of a request head                (none)         header_timeout: 408
BODY     more of a request body                    body bytes     body_timeout: 408
SEND     the client to read the answer             bytes unsent   send_timeout: abort
======== ========================================= ============== ===========================

HEAD has no progress mark on purpose: a head trickled a byte a second (slowloris) must still
arrive whole within ``header_timeout``. FIRST and IDLE ignore bytes that start no request
(llhttp skips empty lines between requests): a stream of CRLFs keeps no connection. While the
proxy itself holds a client back (reading paused for a slow backend or a full buffer) no
client phase runs. A deadline fires up to one interval late.

SEND counts bytes not yet acknowledged by the client, ours and the kernel's (``TIOCOUTQ``):
the kernel buffers megabytes on a fast link, and a client reading slowly but steadily frees
them long before the transport's own buffer moves.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
from collections.abc import Collection
from typing import Any, Protocol

__all__ = ["ClientTimers", "Timed", "FIRST", "IDLE", "HEAD", "BODY", "SEND",
           "unacked"]

log = logging.getLogger("balancer.proxy")

NONE, FIRST, IDLE, HEAD, BODY, SEND = range(6)
NAMES = {FIRST: "header", IDLE: "keepalive", HEAD: "header", BODY: "body", SEND: "send"}


class Timed(Protocol):
    """A client connection as the sweep sees it (``proxy.ClientConnection``).

    The four ``timer_*`` fields are this module's record of the connection (what it last saw
    the connection wait for, and since when): kept on the connection it times, so an idle
    connection pays no extra object, and written only here."""

    timer_phase: int
    timer_of: object
    timer_mark: int
    timer_since: float

    def waiting_for(self) -> tuple[int, object, int]:
        """(phase, the request concerned, a progress mark) as in the table above."""

    def timed_out(self, phase: int, limit: float) -> None:
        """The client took longer than ``limit`` seconds in ``phase``."""

    def abort(self) -> None: ...


class Limits(Protocol):
    """The client timeouts, in seconds (``proxy.ProxySettings`` has them)."""

    @property
    def header_timeout(self) -> float: ...
    @property
    def body_timeout(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...
    @property
    def send_timeout(self) -> float: ...


class Place(Protocol):
    """What is swept (``proxy.ProxyState``): its connections, and the limits of the day."""

    @property
    def connections(self) -> Collection[Timed]: ...

    @property
    def settings(self) -> Limits: ...


class ClientTimers:
    """The sweep over one ProxyState's connections; counts what it cut, by timeout."""

    __slots__ = ("state", "handle", "fired")

    def __init__(self, state: Place) -> None:
        self.state = state
        self.handle: asyncio.TimerHandle | None = None
        self.fired = {"header": 0, "body": 0, "keepalive": 0, "send": 0}

    @staticmethod
    def interval(settings: Limits) -> float:
        """A quarter of the shortest limit, between 50 ms and 1 s."""
        shortest = min(settings.header_timeout, settings.body_timeout,
                       settings.keepalive_timeout, settings.send_timeout)
        return min(1.0, max(0.05, shortest / 4))

    def start(self) -> None:
        """Make sure a sweep is scheduled (called as connections arrive)."""
        if self.handle is None:
            loop = asyncio.get_running_loop()
            self.handle = loop.call_later(self.interval(self.state.settings), self._sweep)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _sweep(self) -> None:
        self.handle = None
        state = self.state
        settings = state.settings
        loop = asyncio.get_running_loop()
        t = loop.time()
        for conn in list(state.connections):
            try:
                self._check(conn, t, settings)
            except Exception:  # a bug must cost this connection, never the sweep
                log.exception("bug while timing %r", conn)
                conn.abort()
        if state.connections:
            self.handle = loop.call_later(self.interval(settings), self._sweep)

    def _check(self, conn: Timed, t: float, settings: Limits) -> None:
        phase, of, mark = conn.waiting_for()
        if phase != conn.timer_phase or of is not conn.timer_of or mark != conn.timer_mark:
            conn.timer_phase, conn.timer_of, conn.timer_mark = phase, of, mark
            conn.timer_since = t
            return
        if phase == NONE:
            return
        limit = (settings.keepalive_timeout if phase == IDLE else
                 settings.body_timeout if phase == BODY else
                 settings.send_timeout if phase == SEND else settings.header_timeout)
        if t - conn.timer_since >= limit:
            conn.timer_phase = NONE
            self.fired[NAMES[phase]] += 1
            conn.timed_out(phase, limit)


def unacked(transport: Any) -> int:
    """Bytes the kernel holds for the client, sent or not, not yet acknowledged (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])
