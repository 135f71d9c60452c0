"""The client side of the request path: parse, route, pick, forward, answer.

``ClientConnection`` is an ``asyncio.Protocol`` over httptools' request parser; each request on
it is an ``Exchange`` (see ``exchange.py`` for forwarding, retries and error answers). The
connection keeps what spans requests: keep-alive, the order of pipelined requests (served one at
a time; later ones wait, parsed, with their bytes buffered and reading paused past a bound), flow
control, and the switch to splicing bytes after a WebSocket upgrade.

Everything here runs for every request, so it is plain callbacks, no task unless a request has
to wait (a new upstream connection, a slot under ``max_connections``), and no work that could be
done once at load time (``ProxySettings`` pre-builds its header lines).

What a client may send (each refusal is our own short answer, then the connection closes):
llhttp (strict mode, as httptools builds it) refuses bad request lines, header names and
control bytes in values, obs-fold, bare CR/LF, ``Content-Length`` with ``Transfer-Encoding``,
duplicate or malformed lengths and bad chunk framing; it is lenient where we are not, so we add:

- ``Transfer-Encoding``: only exactly ``chunked`` (any case) is framed; trailing whitespace is
  refused as an obfuscation (400), chunked not last or twice is 400 (RFC 9112 §6.3), another
  coding before a final chunked is 501, and any Transfer-Encoding in HTTP/1.0 is 400 (§6.1);
- ``Content-Length`` above 2**63-1 (llhttp takes up to 2**64-1: an int64 backend would wrap)
  is 400, and the length is re-written in canonical digits;
- ``Host`` (and an absolute-form authority) must be ``uri-host[:port]`` (RFC 9112 §3.2: 400);
  a request target with a ``#fragment`` is 400 (backends disagree about what it means);
- chunk extensions and trailer fields: llhttp skips extensions of any length and httptools
  buffers a trailer field whole, so framing bytes beyond ``CHUNK_OVERHEAD`` per chunk plus
  ``max_header_size`` are refused (400), and trailers count against ``max_header_size`` (431);
- a client that half-closes in the middle of a body gets 400 (it can never complete).

Header values may carry obs-text (bytes 0x80-0xFF; RFC 9110 §5.5 allows them) and are passed on
as they are. Bodies are always re-framed by us from the parser's events (chunks re-chunked,
lengths canonical), so what a backend receives parses one way only. Timeouts for slow and idle
clients live in ``slowclients.py``; ``max_clients`` is checked as connections arrive.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from balancer.accesslog import KeyRecorder, digest_key
from balancer.config import AccessLogConfig, ClientConfig
from balancer.exchange import (
    P_BUFFER,
    P_UPSTREAM,
    Deadlines,
    Exchange,
    Reject,
    error_response,
    new_request_id,
    now,
)
from balancer.router import Router, host_without_port
from balancer.slowclients import BODY, HEAD, NONE, SEND, ClientTimers
from balancer.upstream import PLAIN_CONNECTION, HeaderKinds, connection_tokens

__all__ = ["ClientConnection", "ProxySettings", "ProxyState", "default_max_clients",
           "protocol_factory"]

log = logging.getLogger("balancer.proxy")

#: Body bytes buffered for a request that cannot be sent yet before the client is paused.
BUFFER_LIMIT = 64 * 1024
#: Pipelined requests parsed ahead of the one being served before the client is paused.
PIPELINE_DEPTH = 16
#: Seconds a connection closed with request bytes still coming keeps reading (and dropping)
#: them, so that the client reads our answer rather than a reset.
LINGER = 2.0
#: The same, for a connection turned away by ``max_clients`` (it holds a descriptor meanwhile).
TURN_AWAY_LINGER = 0.5
#: Framing bytes allowed per chunk of a chunked body (size line, CRLFs, short extensions).
CHUNK_OVERHEAD = 64
TOO_MUCH_FRAMING = "chunk extensions or trailer fields too long"
#: The largest Content-Length we forward: beyond, an int64 parser would wrap.
MAX_LENGTH = 2**63 - 1

# Request headers handled rather than copied as they are (0: copied). Hop-by-hop ones are
# dropped (RFC 9110 §7.6.1); X-Forwarded-*, X-Request-ID and Via are set by us.
H_PASS, H_DROP, H_HOST, H_CONNECTION, H_TE, H_UPGRADE, H_XFF, H_RID, H_EXPECT, H_LENGTH = range(10)
_HANDLED = {
    b"host": H_HOST, b"connection": H_CONNECTION, b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP, b"te": H_DROP, b"trailer": H_DROP,
    b"transfer-encoding": H_TE, b"upgrade": H_UPGRADE, b"proxy-authorization": H_DROP,
    b"proxy-authenticate": H_DROP, b"x-forwarded-for": H_XFF, b"x-forwarded-proto": H_DROP,
    b"x-forwarded-host": H_DROP, b"x-request-id": H_RID, b"expect": H_EXPECT,
    b"content-length": H_LENGTH,
}
# ...and their spellings with "_" for "-" are dropped: CGI-style backends (WSGI, PHP) read
# ``Transfer_Encoding`` or ``X_Forwarded_For`` as the real header (nginx drops them too).
_REQUEST_HEADERS = HeaderKinds({
    **_HANDLED, **{name.replace(b"-", b"_"): H_DROP for name in _HANDLED if b"-" in name}})
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
#: uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2): reg-name, IPv4 or an IP literal.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?").fullmatch
#: Host values already found valid: a set lookup instead of the regex for the hosts a proxy
#: sees again and again (bounded: clients may invent hosts).
_GOOD_HOSTS: set[bytes] = set()


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
                 "timers", "turned_away", "_warned_full")

    def __init__(self, router: Router, settings: ProxySettings) -> None:
        self.router = router
        self.settings = settings
        self.connections: set[ClientConnection] = set()  # open client connections
        self.in_flight = 0  # requests between their head and the end of their answer
        self.draining = False
        self.deadlines = Deadlines()  # read timeouts of requests waiting for a backend
        self.timers = ClientTimers(self)  # slow and idle clients; ``timers.fired`` counts
        self.turned_away = 0  # connections answered 503 because of max_clients
        self._warned_full = 0.0

    def turn_away(self, conn: ClientConnection) -> None:
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


def protocol_factory(state: ProxyState) -> Callable[[], asyncio.Protocol]:
    """What ``loop.create_server`` needs: a new ClientConnection per accepted socket."""
    return lambda: ClientConnection(state)


def default_max_clients() -> int:
    """Half the open-files limit: every client may need a backend connection too, and the
    rest (listeners, health probes, logs) must still find a descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1 << 20
    return max(16, (soft - 64) // 2)


class ClientConnection(asyncio.Protocol):
    """One client's connection: keep-alive, pipelining, flow control, upgrades."""

    __slots__ = (
        "state", "transport", "parser", "client_ip", "proto",
        # Requests: being parsed, being answered, and parsed ones waiting their turn
        "parsing", "current", "backlog", "head_left", "head_raw", "upgrading",
        # Flow control
        "paused", "write_paused",
        # Ending: close after the current answer; dropping what still comes; spliced bytes
        "closing", "lingering", "held", "held_size", "splice", "_pumping",
        # Limits: answers given; framing bytes and chunks of the chunked body being read
        "served", "wire", "chunks", "eof",
        # Counters over the connection's life, for the bound on chunk framing bytes per read
        "begun", "body_total", "chunked_heads", "chunk_base", "last_chunked",
        # What slowclients.py last saw this connection wait for, and since when
        "timer_phase", "timer_of", "timer_mark", "timer_since",
    )

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.client_ip = ""
        self.proto = b"http"
        self.parsing: Exchange | None = None
        self.current: Exchange | None = None
        self.backlog: list[Exchange] | None = None
        self.head_left = self.head_raw = 0
        self.upgrading: Exchange | None = None
        self.paused = 0
        self.write_paused = False
        self.closing = state.draining
        self.lingering: asyncio.TimerHandle | None = None
        self.held: list[bytes] | None = None
        self.held_size = 0
        self.splice: Exchange | None = None
        self._pumping = False
        self.served = self.wire = self.chunks = self.begun = self.body_total = 0
        self.chunked_heads = self.chunk_base = 0
        self.last_chunked: Exchange | None = None
        self.eof = False  # the client half-closed: nothing more will come
        self.timer_phase = NONE
        self.timer_of: object = None
        self.timer_mark = 0
        self.timer_since = 0.0

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
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
            parsing = self.parsing
            # Snapshots for the bound on framing bytes in a read where a chunked head ends.
            begun, body0, chunks0, chunked0 = self.begun, self.body_total, self.chunks, \
                self.chunked_heads
            if parsing is not None:
                if not parsing.headers_done:
                    # A head split over reads: bound what httptools buffers before a field ends.
                    # (It may end across the reads: "...\r\n" then "\r\n<body>".)
                    end = 0 if data[:1] == b"\n" or data[:2] == b"\r\n" else \
                        data.find(b"\r\n\r\n")
                    self.head_raw -= len(data) if end < 0 else end
                    if self.head_raw < 0:
                        self._refuse(431, "request header fields too large")
                        return
                elif parsing.chunked:
                    self.wire += len(data)
            try:
                self.parser.feed_data(data)
            except HttpParserUpgrade as exc:
                if not self._upgraded(data[exc.args[0]:]):
                    return
            except HttpParserError as exc:
                self._parse_error(exc, data)
                return
            if self.chunked_heads != chunked0 and self._overframed(
                    len(data), begun, body0, chunks0, chunked0):
                return
            ex = self.parsing
            if (ex is not None and ex is parsing and ex.chunked and self.wire - ex.body_size
                    > (self.chunks - self.chunk_base) * CHUNK_OVERHEAD
                    + ex.settings.max_header_size):
                # Extensions, zero padding or trailers with no end: none of it is forwarded.
                self._refuse(400, TOO_MUCH_FRAMING)
                return
            self._after_feed()
        except Exception:  # a bug must cost this connection, never the proxy or its state
            log.exception("bug while serving %s; connection dropped", self.client_ip)
            if self.transport is not None:
                self.transport.abort()

    def _overframed(self, size: int, begun: int, body0: int, chunks0: int,
                    chunked0: int) -> bool:
        """A chunked head ended in this read of ``size`` bytes: bound the framing bytes the
        whole read carried (heads, chunk lines, trailers) as ``data_received`` bounds later
        reads, since where in the read the body began is unknown. True: refused."""
        settings = self.state.settings
        framing = size - (self.body_total - body0)
        allowed = ((self.begun - begun + 1) * (settings.max_header_size + 64)
                   + (self.chunked_heads - chunked0) * settings.max_header_size
                   + (self.chunks - chunks0) * CHUNK_OVERHEAD)
        if framing <= allowed:
            return False
        ex = self.last_chunked
        if ex is None or ex is self.parsing:
            self._refuse(400, TOO_MUCH_FRAMING)
        else:  # parsed whole in this read, not started yet: answered 400 in its turn
            self._stop_reading()
            ex.refuse_late(400, TOO_MUCH_FRAMING)
            self._pump()
        return True

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
        parsing = self.parsing
        if parsing is not None and parsing.counted and self.lingering is None:
            self._refuse(400, "the client closed its side before the request body was complete")
            return True
        self.parsing = None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        pending = [self.current] if self.current is not None else []
        if self.backlog:
            pending.extend(self.backlog)
        self.current = self.backlog = self.parsing = self.splice = None
        self.held = None
        for ex in pending:
            ex.client_lost()

    def pause_writing(self) -> None:
        """The client reads slower than the backend sends: stop reading the backend."""
        self.write_paused = True
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.transport.resume_reading()  # type: ignore[union-attr]

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        ex = self.parsing = Exchange(self)
        self.begun += 1
        self.head_left = self.head_raw = ex.settings.max_header_size

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        if len(ex.url) > ex.settings.max_url_size:
            raise Reject(414, "request target too long")
        self.head_left -= len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self.head_left -= len(name) + len(value) + 4
        if ex.headers_done:  # trailer fields after a chunked body: bounded, not forwarded
            if self.head_left < 0:
                raise Reject(431, "request trailer fields too large")
            return
        if self.head_left < 0:
            raise Reject(431, "request header fields too large")
        headers = ex.headers
        headers.append((name, value))
        if len(headers) > ex.settings.max_headers:
            raise Reject(431, "too many header fields")
        kind = _REQUEST_HEADERS[name]
        if not kind:
            ex.lines.append(name + b": " + value + b"\r\n")
        elif kind == H_HOST:
            if ex.host_raw is not None:
                raise Reject(400, "more than one Host header")
            if value not in _GOOD_HOSTS:
                if not _HOST(value):
                    raise Reject(400, "invalid Host header")
                if len(_GOOD_HOSTS) < 4096:
                    _GOOD_HOSTS.add(value)
            ex.host_raw = value
        elif kind == H_LENGTH:
            n = int(value)  # llhttp checked the digits and the duplicates
            if n > MAX_LENGTH:
                raise Reject(400, "Content-Length too large")
            ex.lines.append(b"Content-Length: %d\r\n" % n)  # canonical: no zeros, no spaces
            ex.content_length = n
        elif kind == H_CONNECTION:
            if value not in PLAIN_CONNECTION:
                ex.named = connection_tokens(value, ex.named)
        elif kind == H_TE:
            ex.te = value if ex.te is None else ex.te + b", " + value
        elif kind == H_UPGRADE:
            ex.upgrade = value
        elif kind == H_XFF:
            ex.xff = value if ex.xff is None else ex.xff + b", " + value
        elif kind == H_RID:
            if ex.rid_in is None:
                ex.rid_in = value
        elif kind == H_EXPECT:
            ex.expect = value

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        parser = self.parser
        ex.headers_done = True
        ex.keep_alive = parser.should_keep_alive()  # only valid now (BENCHMARKING.md)
        ex.method = method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                raise Reject(505, f"HTTP/{version} is not supported")
            ex.http10 = True
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported by this proxy")
        if ex.te is not None:
            if ex.http10:  # RFC 9112 §6.1: faulty framing, whatever else it says
                raise Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if ex.te.lower() != b"chunked":
                _transfer_coding(ex.te)
            ex.chunked = True
            self.wire = 0
            self.chunk_base = self.chunks
            self.chunked_heads += 1
            self.last_chunked = ex
            self.head_left = ex.settings.max_header_size  # for trailer fields
        elif ex.content_length:
            limit = ex.settings.max_body_size
            if limit is not None and ex.content_length > limit:
                raise Reject(413, f"request body larger than {limit} bytes")
        self._target(ex)
        if ex.expect is not None:
            if ex.expect.strip().lower() != b"100-continue":
                raise Reject(417, "only the 100-continue expectation is supported")
            ex.expect_continue = not ex.http10 and (ex.chunked or bool(ex.content_length))
        # RFC 9110 §7.8: an Upgrade in an HTTP/1.0 request is ignored (and dropped).
        if ex.upgrade is not None and method == b"GET" and not ex.http10 and ex.named is not None \
                and b"upgrade" in ex.named and b"websocket" in ex.upgrade.lower():
            ex.websocket = True
        # The pool is chosen now, as the request arrives: a reload cannot move it mid-flight.
        ex.pool = self.state.router.route(ex.host, ex.path)
        ex.t_start = now()
        ex.counted = True
        self.state.in_flight += 1
        if parser.should_upgrade():
            self.upgrading = ex
        if self.current is None:
            self.current = ex
        else:
            self._enqueue(ex)

    def _enqueue(self, ex: Exchange) -> None:
        """``ex`` is answered after the requests before it on this connection."""
        if self.current is None:
            self.current = ex
        elif self.backlog is None:
            self.backlog = [ex]
        else:
            self.backlog.append(ex)

    def _target(self, ex: Exchange) -> None:
        """Check the request target; set what routing and forwarding use."""
        url = ex.url
        if 0x23 in url:  # "#" (an int: ``bytes in bytes`` costs 6x more, for nothing)
            raise Reject(400, "a request target carries no #fragment")
        if url[:1] == b"/":
            ex.target = ex.path = url
        elif url == b"*" and ex.method == b"OPTIONS":
            ex.target, ex.path = url, b"/"
        elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            # Absolute form: its authority replaces Host (RFC 9112 §3.2.2).
            rest = url.partition(b"://")[2]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0),
                      default=len(rest))
            authority, tail = rest[:cut], rest[cut:]
            if not authority or not _HOST(authority):
                raise Reject(400, "invalid request target")
            ex.host_raw = authority
            ex.target = ex.path = tail if tail[:1] == b"/" else b"/" + tail
        else:
            raise Reject(400, "invalid request target")
        if ex.host_raw is None:
            if not ex.http10:
                raise Reject(400, "HTTP/1.1 requests need a Host header")
        else:
            host = ex.host_raw.lower()
            ex.host = host = host_without_port(host) if 0x3A in host else host  # ":"
            if not host:  # RFC 9110 §4.2.1, RFC 9112 §3.2: an http URI has a host
                raise Reject(400, "empty Host")

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        size = len(body)
        ex.body_size += size
        self.body_total += size
        limit = ex.settings.max_body_size
        if limit is not None and ex.body_size > limit:
            raise Reject(413, f"request body larger than {limit} bytes")
        pending = ex.pending
        if pending is None:
            pending = ex.pending = []
        if ex.chunked:
            pending += (b"%x\r\n" % size, body, b"\r\n")
            size += 8
        else:
            pending.append(body)
        ex.pending_size += size

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.chunked:
            if ex.pending is None:
                ex.pending = []
            ex.pending.append(b"0\r\n\r\n")
        ex.request_done = True
        self.parsing = None

    # --- serving requests in order -------------------------------------------------------

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

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` has answered (or failed): close, or go on with the next request."""
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
            if ex.request_done or ex.websocket:
                transport.close()
            else:
                self._linger()
            return
        if self.backlog:
            self._pump()
        if self.paused & P_BUFFER:
            self.check_buffers()

    def drain(self) -> None:
        """Close now if idle, else after the answer in progress (keep-alive is over)."""
        self.closing = True
        if (self.current is None and not self.backlog and self.parsing is None
                and self.transport is not None):
            self.transport.close()

    # --- flow control --------------------------------------------------------------------

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

    # --- upgrades ------------------------------------------------------------------------

    def _upgraded(self, rest: bytes) -> bool:
        """The parser stopped after a request asking for an upgrade. True: carry on."""
        ex, self.upgrading = self.upgrading, None
        if ex is not None and ex.websocket:
            # Whatever follows belongs to the new protocol, if the backend agrees (101).
            self.held = []
            self.held_size = 0
            if rest:
                self._hold(rest)
            return True
        # An upgrade we do not proxy (h2c...): Upgrade was dropped; go on parsing HTTP/1.1.
        if rest:
            try:
                self.parser.feed_data(rest)
            except HttpParserUpgrade as exc:
                return self._upgraded(rest[exc.args[0]:])
            except HttpParserError as exc:
                self._parse_error(exc, rest)
                return False
        return True

    def _hold(self, data: bytes) -> None:
        assert self.held is not None
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > BUFFER_LIMIT:
            self.pause(P_BUFFER)

    def start_splice(self, ex: Exchange) -> list[bytes]:
        """``ex`` switched protocols: from now on bytes pass through. Returns held bytes."""
        held = self.held or []
        self.held = None
        self.held_size = 0
        self.splice = ex
        self.resume(P_BUFFER)
        return held

    # --- refusing ------------------------------------------------------------------------

    def _parse_error(self, exc: HttpParserError, data: bytes) -> None:
        cause = exc.__context__
        if isinstance(cause, Reject):
            status, detail = cause.status, cause.detail
        # (HttpParserUpgrade is no HttpParserError: it is the context when the bytes after an
        # upgrade we do not proxy fail to parse, which is the client's error, not a bug. Found
        # by the fuzzer at 3,000 examples; edit by the backend-side engineer.)
        elif cause is not None and not isinstance(cause, (HttpParserError, HttpParserUpgrade)):
            log.error("bug while parsing a request from %s", self.client_ip, exc_info=cause)
            status, detail = 500, "internal error"
        elif isinstance(exc, HttpParserInvalidMethodError):
            # A well-formed method we do not know is "not implemented"; garbage is a bad request.
            start = data.lstrip(b"\r\n")
            known = _METHOD_TOKEN.match(start[:64]) is not None
            status, detail = (501, "unknown method") if known else (400, "invalid request line")
        elif isinstance(exc, HttpParserInvalidURLError):
            status, detail = 400, "invalid request target"
        elif data.lstrip(b"\r\n").startswith(b"PRI * HTTP/2.0"):
            status, detail = 505, "HTTP/2 is not supported here: speak HTTP/1.1"
        else:
            status, detail = 400, f"invalid request: {exc}"
        self._refuse(status, detail)

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request we cannot read with ``status`` after those before it, then close."""
        ex = self.parsing
        self._stop_reading()
        if ex is not None and ex.counted:  # queued already: refused in its body
            ex.refuse_late(status, detail)
        else:
            if ex is None:
                ex = Exchange(self)
            ex.reject = (status, detail)
            self._enqueue(ex)
        self._pump()  # requests parsed before it (in this read too) are answered first

    def _stop_reading(self) -> None:
        """Read no more requests (a refusal is on its way)."""
        self.parsing = None
        self.pause(P_BUFFER)
        if self.lingering is None:
            self.lingering = _NOT_READING

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


def _transfer_coding(te: bytes) -> None:
    """Refuse a Transfer-Encoding other than exactly ``chunked`` (llhttp has let it through).

    Trailing whitespace is an obfuscation probe (``chunked ``): 400. Chunked missing as the
    last coding, or applied twice, leaves the body's end unknowable: 400 (RFC 9112 §6.3). A
    well-formed list ending in chunked with other codings before it is 501: we implement only
    chunked (RFC 9112 §6.1).
    """
    if te[-1:] in (b" ", b"\t") or te[:1] in (b" ", b"\t"):
        raise Reject(400, "Transfer-Encoding value with surrounding whitespace")
    codings = [c.strip(b" \t").lower() for c in te.split(b",")]
    if not all(_TOKEN(c.partition(b";")[0].rstrip(b" \t")) for c in codings):
        raise Reject(400, "malformed Transfer-Encoding")
    if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        raise Reject(400, "Transfer-Encoding must end in chunked, once")
    raise Reject(501, "only the chunked transfer-coding is implemented")


class _NotReading:
    """Marks a connection that stopped reading requests (a refusal is on its way)."""

    def cancel(self) -> None:
        pass


_NOT_READING: asyncio.TimerHandle = _NotReading()  # type: ignore[assignment]
