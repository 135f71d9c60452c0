"""The requests of one client connection, parsed: bytes in, ``RequestHead`` records and body
bytes out to a sink, or a refusal (``Reject``). httptools (llhttp) does the parsing; this adds
the bounds on what it buffers and the rules of ``rules.py``. No sockets, no event loop."""

from __future__ import annotations

from typing import Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from balancer.http1.rules import (
    _HOSTS,
    CHUNK_OVERHEAD,
    H_CONNECTION,
    H_EXPECT,
    H_HOST,
    H_LENGTH,
    H_RID,
    H_TE,
    H_UPGRADE,
    H_XFF,
    LINE_SLACK,
    MAX_LENGTH,
    PLAIN_CONNECTION,
    REQUEST_HEADERS,
    TOO_MUCH_FRAMING,
    Limits,
    Reject,
    RequestHead,
    check_head,
    connection_tokens,
    host_of,
    refusal,
)

__all__ = ["IDLE_PARSER", "BodySink", "RequestParser", "RequestSink", "SettingsSource"]


class SettingsSource(Protocol):
    """Where the limits are read as each request begins (a reload swaps them)."""

    @property
    def settings(self) -> Limits: ...


class BodySink(Protocol):
    """Receives one request's body (the proxy's per-request object)."""

    def request_body(self, data: bytes) -> None:
        """Body bytes, de-chunked (``head.body_size`` counts them)."""

    def request_end(self) -> None:
        """The request is complete."""


class RequestSink(Protocol):
    """Receives the requests of one connection, in order (the client connection)."""

    def request_head(self, head: RequestHead) -> BodySink:
        """A head passed every rule; returns where its body (if any) goes."""


class RequestParser:
    """The requests of one client connection: bytes in, heads and bodies out, or a refusal.

    Bounds what httptools buffers: a head split over reads (``head_raw``), header fields
    (``head_left``), chunk framing per body (``wire``) and per read (``_overframed``).

    Between two requests a parser holds nothing of its connection, so an idle connection
    need not keep one (its httptools parser is most of a connection's Python memory): when
    ``head is None`` after a ``feed`` (at a message boundary, nothing buffered) and
    ``reusable``, the connection may hand it on to another one, which sets ``sink``. Not
    ``reusable`` once llhttp is past HTTP/1.1 keep-alive (an upgrade, a message without
    keep-alive, which leaves llhttp refusing any more bytes) or the parser was stopped.
    The counters need no reset when the parser changes hands: only their change within one
    ``feed`` is read.
    """

    __slots__ = ("parser", "source", "limits", "sink", "head", "body_to", "head_left", "head_raw",
                 "wire", "chunks", "chunk_base", "begun", "body_total", "chunked_heads",
                 "last_chunked", "reusable")

    def __init__(self, sink: RequestSink, source: SettingsSource) -> None:
        self.parser = HttpRequestParser(self)
        self.sink = sink
        self.source = source
        self.limits = source.settings  # as the request being read began
        self.head: RequestHead | None = None  # from its first byte to its end
        self.body_to: BodySink | None = None  # from the end of its head to its end
        self.head_left = self.head_raw = self.wire = self.chunks = self.chunk_base = 0
        # Counters over the connection's life, for the bound on chunk framing per read.
        self.begun = self.body_total = self.chunked_heads = 0
        self.last_chunked: RequestHead | None = None
        self.reusable = True  # llhttp is between two keep-alive messages whenever head is None

    def stop(self) -> None:
        """Read no more (a refusal is on its way)."""
        self.head = self.body_to = None
        self.reusable = False

    def feed(self, data: bytes) -> int:
        """Parse ``data``: -1, or where the bytes after an upgrade start. Raises ``Reject``."""
        head = self.head
        in_body = self.body_to is not None
        if head is not None:
            if not in_body:
                # A head split over reads: bound what httptools buffers before a field ends.
                # (It may end across the reads: "...\r\n" then "\r\n<body>".)
                end = 0 if data[:1] == b"\n" or data[:2] == b"\r\n" else \
                    data.find(b"\r\n\r\n")
                self.head_raw -= len(data) if end < 0 else end
                if self.head_raw < 0:
                    raise Reject(431, "request header fields too large")
            elif head.chunked:
                self.wire += len(data)
        begun = self.begun
        body0 = self.body_total
        chunks0 = self.chunks
        chunked0 = self.chunked_heads
        upgrade_at = -1
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            upgrade_at = exc.args[0]
            self.reusable = False  # llhttp is paused past the upgrade
        except HttpParserError as exc:
            raise refusal(exc, data) from None
        if self.chunked_heads != chunked0:
            self._overframed(len(data), begun, body0, chunks0, chunked0)
        if (in_body and head is not None and head is self.head and head.chunked
                and self.wire - head.body_size > (self.chunks - self.chunk_base)
                * CHUNK_OVERHEAD + self.limits.max_header_size):
            # Extensions, zero padding or trailers with no end: none of it is forwarded.
            raise Reject(400, TOO_MUCH_FRAMING)
        return upgrade_at

    def _overframed(self, size: int, begun: int, body0: int, chunks0: int,
                    chunked0: int) -> None:
        """A chunked head ended in this read of ``size`` bytes: bound the framing bytes the
        whole read carried (heads, chunk lines, trailers) as later reads are bounded, since
        where in the read that body began is not known."""
        limit = self.limits.max_header_size
        framing = size - (self.body_total - body0)
        allowed = ((self.begun - begun + 1) * (limit + LINE_SLACK)
                   + (self.chunked_heads - chunked0) * limit
                   + (self.chunks - chunks0) * CHUNK_OVERHEAD)
        if framing > allowed:
            late = self.last_chunked
            raise Reject(400, TOO_MUCH_FRAMING,
                         late=None if late is self.head else late)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head = RequestHead()
        self.begun += 1
        limits = self.limits = self.source.settings
        self.head_left = self.head_raw = limits.max_header_size

    def on_url(self, url: bytes) -> None:
        head = self.head
        assert head is not None
        head.url += url
        if len(head.url) > self.limits.max_url_size:
            raise Reject(414, "request target too long")
        self.head_left -= len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self.head
        assert head is not None
        self.head_left -= len(name) + len(value) + 4
        if self.body_to is not None:  # trailer fields after a chunked body: not forwarded
            if self.head_left < 0:
                raise Reject(431, "request trailer fields too large")
            return
        if self.head_left < 0:
            raise Reject(431, "request header fields too large")
        headers = head.headers
        headers.append((name, value))
        if len(headers) > self.limits.max_headers:
            raise Reject(431, "too many header fields")
        kind = REQUEST_HEADERS[name]
        if not kind:
            head.lines.append(name + b": " + value + b"\r\n")
        elif kind == H_HOST:
            if head.host_raw is not None:
                raise Reject(400, "more than one Host header")
            host = _HOSTS.get(value)
            if host is None:
                host = host_of(value)
            head.host_raw = value
            head.host = host
        elif kind == H_LENGTH:
            n = int(value)  # llhttp checked the digits and the duplicates
            if n > MAX_LENGTH:
                raise Reject(400, "Content-Length too large")
            head.lines.append(b"Content-Length: %d\r\n" % n)  # canonical: no zeros, no spaces
            head.content_length = n
        elif kind == H_CONNECTION:
            if value not in PLAIN_CONNECTION:
                head.named = connection_tokens(value, head.named)
        elif kind == H_TE:
            head.te = value if head.te is None else head.te + b", " + value
        elif kind == H_UPGRADE:
            head.upgrade = value
        elif kind == H_XFF:
            head.xff = value if head.xff is None else head.xff + b", " + value
        elif kind == H_RID:
            if head.rid_in is None:
                head.rid_in = value
        elif kind == H_EXPECT:
            head.expect = value

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        parser = self.parser
        # should_keep_alive is only valid now (BENCHMARKING.md)
        keep_alive = head.keep_alive = parser.should_keep_alive()
        if not keep_alive:  # llhttp refuses any bytes after this message
            self.reusable = False
        head.method = parser.get_method()
        settings = self.limits
        check_head(head, parser.get_http_version(), settings)
        if head.chunked:
            self.wire = 0
            self.chunk_base = self.chunks
            self.chunked_heads += 1
            self.head_left = settings.max_header_size  # for trailer fields
            self.last_chunked = head
        head.switch = parser.should_upgrade()
        self.body_to = self.sink.request_head(head)

    def on_body(self, body: bytes) -> None:
        head = self.head
        assert head is not None
        head.body_size += len(body)
        self.body_total += len(body)
        limit = self.limits.max_body_size
        if limit is not None and head.body_size > limit:
            raise Reject(413, f"request body larger than {limit} bytes")
        self.body_to.request_body(body)  # type: ignore[union-attr]

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_message_complete(self) -> None:
        body_to = self.body_to
        self.head = self.body_to = None
        body_to.request_end()  # type: ignore[union-attr]


class _Idle(RequestParser):
    """What an idle connection holds instead of a parser (``IDLE_PARSER``): reads as a parser
    between two requests (no head, no body); parses nothing."""

    __slots__ = ()

    def __init__(self) -> None:  # no httptools parser, no sink: nothing to parse into
        self.head = self.body_to = None
        self.reusable = False

    def stop(self) -> None:
        pass

    def feed(self, data: bytes) -> int:
        raise RuntimeError("IDLE_PARSER parses nothing: take a RequestParser first")


#: The parser of every idle connection (see ``RequestParser``): one object for all of them.
IDLE_PARSER: RequestParser = _Idle()
