"""The client side of the request path: bytes in from a client, answers out, in order.

``ClientConnection`` is an ``asyncio.Protocol``: it moves the client's bytes into the sans-IO
HTTP/1 layer (``http1.RequestParser``: heads, framing and every rule of what a client may send)
and each request that comes out into an ``Exchange`` (``exchange.py``: routing's pick,
forwarding, retries, error answers), which talks back only through ``exchange.ClientSide``. The
connection keeps what spans requests: keep-alive, the order of pipelined requests (served one at
a time; later ones wait, parsed, with their bytes buffered and reading paused past a bound), flow
control, and the switch to splicing bytes after a WebSocket upgrade.

Everything here runs for every request, so it is plain callbacks, no task unless a request has
to wait (a new upstream connection, a slot under ``max_connections``), and no work that could be
done once at load time (``ProxySettings`` pre-builds its header lines). A client that half-closes
in the middle of a body gets 400 (it can never complete). Timeouts for slow and idle clients are
swept by ``slowclients.py``; ``max_clients`` is checked as connections arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Callable

from balancer.exchange import P_BUFFER, P_UPSTREAM, Exchange, new_request_id, now
from balancer.http1 import NO_REQUEST, Reject, RequestHead, RequestParser, error_response
from balancer.http1.request import IDLE_PARSER
from balancer.proxystate import ProxySettings, ProxyState, default_max_clients
from balancer.slowclients import BODY, FIRST, HEAD, IDLE, NONE, SEND, unacked

__all__ = ["ClientConnection", "ProxySettings", "ProxyState", "default_max_clients",
           "protocol_factory"]

log = logging.getLogger("balancer.proxy")

#: Body bytes buffered for a request that cannot be sent yet before the client is paused.
BUFFER_LIMIT = 64 * 1024
#: Pipelined requests parsed ahead of the one being served before the client is paused.
PIPELINE_DEPTH = 16
#: Parsers given back by idle connections kept for the next requests (``ProxyState.parsers``).
FREE_PARSERS = 1024
#: Seconds a connection closed with request bytes still coming keeps reading (and dropping)
#: them, so that the client reads our answer rather than a reset.
LINGER = 2.0
#: The same, for a connection turned away by ``max_clients`` (it holds a descriptor meanwhile).
TURN_AWAY_LINGER = 0.5


def protocol_factory(state: ProxyState) -> Callable[[], asyncio.Protocol]:
    """What ``loop.create_server`` needs: a new ClientConnection per accepted socket."""
    return lambda: ClientConnection(state)


class ClientConnection(asyncio.Protocol):
    """One client's connection: keep-alive, pipelining, flow control, upgrades.

    The ``http1.RequestSink`` of its parser, held only while a request is read (idle, ``reader``
    is ``IDLE_PARSER``: a parser was most of its memory), and the ``exchange.ClientSide``.
    """

    __slots__ = (
        "state", "transport", "reader", "client_ip", "client_addr", "proto", "deadlines",
        # Requests: the one answered, those waiting their turn, one that asked for an upgrade
        "current", "backlog", "upgrading",
        # Flow control
        "paused", "write_paused",
        # Ending: close after the current answer; dropping what still comes; spliced bytes
        "closing", "lingering", "held", "held_size", "splice", "_pumping",
        # Answers given; the client half-closed
        "served", "eof",
        # slowclients.py's record of this connection (slowclients.Timed: written only there)
        "timer_phase", "timer_of", "timer_mark", "timer_since",
    )

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.reader: RequestParser = IDLE_PARSER  # a parser of its own while a request is read
        self.client_ip = ""
        self.client_addr = b""  # the same, for X-Forwarded-For (both shared: _ADDRESSES)
        self.proto = b"http"
        self.deadlines = state.deadlines
        self.current: Exchange | None = None
        self.backlog: list[Exchange] | None = None
        self.upgrading: Exchange | None = None
        self.paused = 0
        self.write_paused = False
        self.closing = state.draining
        self.lingering: asyncio.TimerHandle | None = None
        self.held: list[bytes] | None = None
        self.held_size = 0
        self.splice: Exchange | None = None
        self._pumping = False
        self.served = 0
        self.eof = False  # the client half-closed: nothing more will come
        self.timer_phase = NONE
        self.timer_of: object = None
        self.timer_mark = 0
        self.timer_since = 0.0

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        known = _ADDRESSES.get(ip)
        if known is None:
            known = (ip, ip.encode())
            if len(_ADDRESSES) < 4096:  # bounded: the addresses seen most stay shared
                _ADDRESSES[ip] = known
        self.client_ip, self.client_addr = known
        if transport.get_extra_info("sslcontext") is not None:
            self.proto = b"https"
        state = self.state
        limit = state.settings.max_clients
        if limit is not None and len(state.connections) >= limit:
            self._turn_away()
            return
        state.connections.add(self)
        if state.timers.handle is None:
            state.timers.start()

    def _turn_away(self) -> None:
        """Over ``max_clients``: answer 503 at once and close, rather than run out of
        descriptors. The answer comes before any request is read (RFC 9110 allows it); reading
        goes on, dropped, for a moment, so that the client sees the 503 and not a reset."""
        self.state.turn_away(self)
        transport = self.transport
        assert transport is not None
        self.closing = True
        transport.write(error_response(503, new_request_id(), "too many client connections",
                                       True, retry_after=1))
        self._linger(TURN_AWAY_LINGER)

    def data_received(self, data: bytes) -> None:
        try:
            if self.splice is not None:
                self.splice.client_raw(data)
                return
            if self.held is not None:
                self._hold(data)
                return
            if self.lingering is not None:
                return
            reader = self.reader
            if reader is IDLE_PARSER:  # a request begins: take a parser
                free = self.state.parsers
                reader = self.reader = free.pop() if free else RequestParser(self, self.state)
                reader.sink = self
            try:
                at = reader.feed(data)
            except Reject as refused:
                self._rejected(refused)
                return
            if at >= 0:
                if not self._upgraded(data[at:]):
                    return
            elif reader.head is None and reader.reusable:  # between requests: give it back
                self.reader = IDLE_PARSER
                free = self.state.parsers
                if len(free) < FREE_PARSERS:
                    reader.sink = reader.last_chunked = None  # type: ignore[assignment]
                    free.append(reader)
            self._after_feed()
        except Exception:  # a bug must cost this connection, never the proxy or its state
            log.exception("bug while serving %s; connection dropped", self.client_ip)
            if self.transport is not None:
                self.transport.abort()

    def _after_feed(self) -> None:
        ex = self.current
        if ex is not None:
            if not ex.started:
                if self.backlog:
                    self._pump()
                else:
                    ex.start()
            elif ex.pending or (ex.request_done and not ex.sent):
                ex.flush_request()
        if self.paused & P_BUFFER or self.backlog or (ex is not None and ex.pending_size):
            self.check_buffers()

    def eof_received(self) -> bool | None:
        """The client will send no more. Idle: close. Else answer what it asked, then close
        (some clients half-close after their request and wait for the answer). A request
        whose body is cut short this way can never complete: 400."""
        if self.current is None and not self.backlog or self.splice is not None:
            return None
        self.closing = self.eof = True
        if self.parsing is not None and self.lingering is None:
            self._refuse(400, "the client closed its side before the request body was complete")
            return True
        self.reader.stop()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        pending = [self.current] if self.current is not None else []
        if self.backlog:
            pending.extend(self.backlog)
        self.current = self.backlog = self.splice = None
        self.reader.stop()
        self.held = None
        for ex in pending:
            ex.client_lost()

    def pause_writing(self) -> None:
        """The client reads slower than the backend sends: stop reading the backend."""
        self.write_paused = True
        if self.current is not None:
            self.current.client_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.current is not None:
            self.current.client_write_paused(False)

    # --- http1.RequestSink ---------------------------------------------------------------

    def request_head(self, head: RequestHead) -> Exchange:
        state = self.state
        ex = Exchange(self, head, state.settings, True)
        # The pool is chosen now, as the request arrives: a reload cannot move it mid-flight.
        ex.pool = state.router.route(head.host, head.path)
        ex.t_start = now()
        state.in_flight += 1
        if head.switch:
            self.upgrading = ex
        if self.current is None:
            self.current = ex
        else:
            self._enqueue(ex)
        return ex

    @property
    def parsing(self) -> Exchange | None:
        """The request whose body is being read (the parser's ``body_to``)."""
        return self.reader.body_to  # type: ignore[return-value]

    # --- exchange.ClientSide -------------------------------------------------------------

    def send_all(self, parts: Iterable[bytes]) -> None:
        transport = self.transport
        if transport is not None:
            transport.writelines(parts)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` has answered (or failed): close, or go on with the next request."""
        if ex.counted:
            self.state.in_flight -= 1
        if ex is not self.current:
            return
        self.current = None
        self.served += 1
        if self.paused & P_UPSTREAM:
            self.resume(P_UPSTREAM)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if ex.abort:
            transport.abort()  # never let a cut-short answer pass for a complete one
            return
        if ex.close or self.closing:
            self.splice = None
            if ex.request_done or ex.req.websocket:
                transport.close()
            else:
                self._linger()
            return
        if self.backlog:
            self._pump()
        if self.paused & P_BUFFER:
            self.check_buffers()

    def pause(self, why: int) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and self.transport is not None \
                    and not self.transport.is_closing():
                self.transport.resume_reading()

    def check_buffers(self) -> None:
        """Pause reading while too much waits here; resume once it has gone on."""
        ex = self.current
        parsing = self.parsing
        backlog = self.backlog
        if ((ex is not None and ex.pending_size > BUFFER_LIMIT)
                or (parsing is not None and parsing is not ex
                    and parsing.pending_size > BUFFER_LIMIT)
                or (backlog is not None and len(backlog) >= PIPELINE_DEPTH)
                or self.held_size > BUFFER_LIMIT):
            self.pause(P_BUFFER)
        else:
            self.resume(P_BUFFER)

    def start_splice(self, ex: Exchange) -> list[bytes]:
        """``ex`` switched protocols: from now on bytes pass through. Returns held bytes."""
        held = self.held or []
        self.held = None
        self.held_size = 0
        self.splice = ex
        self.resume(P_BUFFER)
        return held

    # --- serving requests in order -------------------------------------------------------

    def _enqueue(self, ex: Exchange) -> None:
        """``ex`` is answered after the requests before it on this connection."""
        if self.current is None:
            self.current = ex
        elif self.backlog is None:
            self.backlog = [ex]
        else:
            self.backlog.append(ex)

    def _pump(self) -> None:
        """Start the current request, and the next ones while requests finish at once."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                ex = self.current
                if ex is None:
                    if not self.backlog:
                        break
                    ex = self.current = self.backlog.pop(0)
                if ex.started:
                    break
                ex.start()
        finally:
            self._pumping = False

    def drain(self) -> None:
        """Close now if idle, else after the answer in progress (keep-alive is over)."""
        self.closing = True
        if (self.current is None and not self.backlog and self.reader.head is None
                and self.transport is not None):
            self.transport.close()

    # --- upgrades ------------------------------------------------------------------------

    def _upgraded(self, rest: bytes) -> bool:
        """The parser stopped after a request asking for an upgrade. True: carry on."""
        ex, self.upgrading = self.upgrading, None
        if ex is not None and ex.req.websocket:
            # Whatever follows belongs to the new protocol, if the backend agrees (101).
            self.held = []
            self.held_size = 0
            if rest:
                self._hold(rest)
            return True
        # An upgrade we do not proxy (h2c, HTTP/1.0): Upgrade was dropped; go on in HTTP/1.1.
        if rest:
            try:
                at = self.reader.feed(rest)
            except Reject as refused:
                self._rejected(refused)
                return False
            if at >= 0:
                return self._upgraded(rest[at:])
        return True

    def _hold(self, data: bytes) -> None:
        assert self.held is not None
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > BUFFER_LIMIT:
            self.pause(P_BUFFER)

    # --- refusing ------------------------------------------------------------------------

    def _rejected(self, refused: Reject) -> None:
        """The parser refused what the client sent (``http1.Reject``)."""
        if refused.bug is not None:
            log.error("bug while parsing a request from %s", self.client_ip,
                      exc_info=refused.bug)
        late = refused.late
        if late is not None:  # parsed whole in this read, not started yet: refused in turn
            for ex in (self.current, *(self.backlog or ())):
                if ex is not None and ex.req is late:
                    self._stop_reading()
                    ex.refuse_late(refused.status, refused.detail)
                    self._pump()
                    return
        self._refuse(refused.status, refused.detail)

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request we cannot read with ``status`` after those before it, then close."""
        ex = self.parsing
        head = self.reader.head
        self._stop_reading()
        if ex is not None:  # queued already: refused in its body
            ex.refuse_late(status, detail)
        else:
            ex = Exchange(self, head if head is not None else NO_REQUEST, self.state.settings)
            ex.reject = (status, detail)
            self._enqueue(ex)
        self._pump()  # requests parsed before it (in this read too) are answered first

    def _stop_reading(self) -> None:
        """Read no more requests (a refusal is on its way)."""
        self.reader.stop()
        self.pause(P_BUFFER)
        if self.lingering is None:
            self.lingering = _NOT_READING

    # --- slowclients.Timed ---------------------------------------------------------------

    def waiting_for(self) -> tuple[int, object, int]:
        """What this connection waits for from its client: (phase, the request concerned,
        a progress mark); see slowclients.py."""
        transport = self.transport
        if (transport is None or self.splice is not None or self.lingering is not None
                or transport.is_closing()):
            return NONE, None, 0
        if self.write_paused:
            return SEND, self.current, transport.get_write_buffer_size() + unacked(transport)
        if self.paused:  # we hold the client back: not its fault
            return NONE, None, 0
        reader = self.reader
        if reader.head is not None:
            if reader.body_to is None:
                return HEAD, reader.head, 0
            return BODY, reader.body_to, reader.head.body_size
        if self.current is None and not self.backlog:
            return (FIRST, None, 0) if self.served == 0 else (IDLE, None, self.served)
        return NONE, None, 0

    def timed_out(self, phase: int, limit: float) -> None:
        """``slowclients.py``: the client took longer than ``limit`` seconds in ``phase``."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if phase == HEAD:
            self._refuse(408, f"the request head did not arrive within {limit:g}s")
        elif phase == BODY:
            self._refuse(408, f"no request body bytes came for {limit:g}s")
        elif phase == SEND:
            transport.abort()  # it reads nothing: an answer cut short, never a clean end
        else:
            transport.close()  # idle: nothing to answer

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _linger(self, seconds: float = LINGER) -> None:
        """Close after an answer while the client may still be sending: half-close, drop what
        still comes for a moment, then close; the client reads our answer, not a reset."""
        transport = self.transport
        assert transport is not None
        if self.lingering is not None and self.lingering is not _NOT_READING:
            return
        if self.eof:  # the client sends nothing more: no reset to fear, close (after writes)
            transport.close()
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self.paused = 0
        transport.resume_reading()
        self.lingering = asyncio.get_running_loop().call_later(seconds, transport.close)

    def __repr__(self) -> str:
        state = ("spliced" if self.splice else "busy" if self.current else "idle")
        return f"<ClientConnection {self.client_ip} {state}>"


#: Client addresses as str and bytes, one object each per address for all its connections.
_ADDRESSES: dict[str, tuple[str, bytes]] = {}


class _NotReading:
    """Marks a connection that stopped reading requests (a refusal is on its way)."""

    def cancel(self) -> None:
        pass


_NOT_READING: asyncio.TimerHandle = _NotReading()  # type: ignore[assignment]
