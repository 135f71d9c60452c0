"""The sans-IO HTTP/1 layer (balancer/http1.py) on its own: bytes in, records or refusals out,
no socket, no event loop. The same rules are tested through real sockets in test_bad_input.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from balancer.http1 import (
    ANSWER_FRAMING,
    CHUNK_OVERHEAD,
    LENGTH,
    NO_BODY,
    O_CHUNK,
    O_NONE,
    O_RAW,
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    UNTIL_CLOSE,
    HeaderKinds,
    Reject,
    RequestHead,
    RequestParser,
    connection_tokens,
    drop_named,
    error_response,
    host_of,
    status_line,
    transfer_coding,
    valid_host,
)
from balancer.http1 import CHUNKED as BY_CHUNKS


@dataclass
class Limits:
    max_body_size: int | None = 1000
    max_url_size: int = 2000
    max_header_size: int = 8000
    max_headers: int = 50


@dataclass
class Source:
    settings: Limits = field(default_factory=Limits)


class Sink:
    """A RequestSink and the BodySink of every request: records what the parser hands on,
    ("head", RequestHead), ("body", bytes), ("end",)."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def request_head(self, head: RequestHead) -> Sink:
        self.events.append(("head", head))
        return self

    def request_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def request_end(self) -> None:
        self.events.append(("end",))

    @property
    def heads(self) -> list[RequestHead]:
        return [e[1] for e in self.events if e[0] == "head"]  # type: ignore[misc]

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "body")  # type: ignore[misc]


def parse(*reads: bytes, limits: Limits | None = None) -> tuple[Sink, RequestParser]:
    sink = Sink()
    parser = RequestParser(sink, Source(limits or Limits()))
    for data in reads:
        parser.feed(data)
    return sink, parser


def refused(*reads: bytes) -> tuple[int, str]:
    with pytest.raises(Reject) as info:
        parse(*reads)
    return info.value.status, info.value.detail


POST = b"POST / HTTP/1.1\r\nHost: h\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"


def test_a_plain_get_becomes_one_head_record() -> None:
    sink, parser = parse(b"GET /a?b=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nUser-Agent: t\r\n"
                         b"Connection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    (head,) = sink.heads
    assert (head.method, head.target, head.path) == (b"GET", b"/a?b=1", b"/a?b=1")
    assert head.host == b"example.com" and head.host_raw == b"Example.COM:8080"
    assert head.lines == [b"User-Agent: t\r\n"]  # handled headers are not passed as they are
    assert head.xff == b"1.2.3.4" and head.keep_alive and not head.http10
    assert sink.events[-1] == ("end",) and parser.head is None


def test_pipelined_requests_come_out_in_order_across_reads() -> None:
    data = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
    sink, parser = parse(data[:20], data[20:45], data[45:])
    assert [h.path for h in sink.heads] == [b"/1", b"/2"]
    assert [e[0] for e in sink.events] == ["head", "end", "head", "end"]


def test_a_chunked_body_comes_out_de_chunked_and_its_length_canonical() -> None:
    sink, _ = parse(CHUNKED + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
    (head,) = sink.heads
    assert head.chunked and sink.body() == b"hello world" and head.body_size == 11
    sink, _ = parse(POST + b"Content-Length: 0005\r\n\r\nhello")
    assert sink.heads[0].lines == [b"Content-Length: 5\r\n"] and sink.body() == b"hello"


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),  # RFC 9110 §4.2.1
    (b"GET / HTTP/1.0\r\nHost:\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", 400),
    (b"GET http://:80/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
    (b"BREW / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    (b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (POST + b"Transfer-Encoding: chunked \r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (POST + b"Content-Length: 9223372036854775808\r\n\r\n", 400),
    (POST + b"Content-Length: 5000\r\n\r\n", 413),
    (POST + b"Expect: 200-ok\r\nContent-Length: 1\r\n\r\nx", 417),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: v\r\n" * 60 + b"\r\n", 431),
    (CHUNKED + b"5;e=" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n", 400),
])
def test_refusals_name_their_status(data: bytes, status: int) -> None:
    assert refused(data)[0] == status


def test_chunk_framing_is_bounded_in_the_read_of_the_head_and_in_later_reads() -> None:
    ext = b"5;e=" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n"
    assert refused(CHUNKED[:-2], b"\r\n" + ext) == (400, "chunk extensions or trailer fields "
                                                           "too long")
    assert refused(CHUNKED, ext[:50_000], ext[50_000:])[0] == 400
    # ...while framing within CHUNK_OVERHEAD a chunk passes, however the reads fall.
    body = b"".join(b"1;e=%s\r\nx\r\n" % (b"y" * (CHUNK_OVERHEAD - 20)) for _ in range(300))
    sink, _ = parse(CHUNKED + body + b"0\r\n\r\n")
    assert sink.body() == b"x" * 300


def test_a_chunked_request_refused_after_it_was_read_whole_is_named() -> None:
    """Pipelined after another request in one read: the refusal says which request it is."""
    first = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
    with pytest.raises(Reject) as info:
        parse(first + CHUNKED + b"5;e=" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n")
    assert info.value.late is not None and info.value.late.chunked


def test_upgrade_is_honoured_in_http11_and_ignored_in_http10() -> None:
    ws = (b" HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    sink = Sink()
    parser = RequestParser(sink, Source())
    data = b"GET /chat" + ws + b"frames"
    at = parser.feed(data)
    assert data[at:] == b"frames" and sink.heads[0].websocket and sink.heads[0].switch
    sink, _ = parse(b"GET /chat" + ws.replace(b"1.1", b"1.0"))
    assert not sink.heads[0].websocket  # RFC 9110 §7.8


def test_a_head_split_over_reads_is_bounded_before_a_field_ends() -> None:
    reads = [b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: "] + [b"v" * 1000] * 12
    assert refused(*reads)[0] == 431
    # A head whose blank line falls across two reads is not taken for an endless one.
    sink, _ = parse(POST + b"Content-Length: 20000\r\n", b"\r\n" + b"x" * 20_000,
                    limits=Limits(max_body_size=None))
    assert sink.body() == b"x" * 20_000


def test_a_bug_in_a_rule_is_a_500_with_the_cause_kept() -> None:
    sink = Sink()
    sink.request_head = None  # type: ignore[method-assign, assignment]
    with pytest.raises(Reject) as info:
        RequestParser(sink, Source()).feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert info.value.status == 500 and isinstance(info.value.bug, TypeError)


def test_header_tables_are_one_and_case_blind() -> None:
    assert isinstance(REQUEST_HEADERS, HeaderKinds)
    for name in (b"keep-alive", b"Proxy-Connection", b"TE", b"Trailer", b"Proxy-Authorization"):
        assert REQUEST_HEADERS[name] and RESPONSE_HEADERS[name]
    assert REQUEST_HEADERS[b"Transfer_Encoding"] and not REQUEST_HEADERS[b"X-Custom"]
    assert not RESPONSE_HEADERS[b"Content-Type"]


def test_small_rules() -> None:
    assert connection_tokens(b"close, X-Secret ,Upgrade", None) == [b"x-secret", b"upgrade"]
    lines = [b"X-Secret: s\r\n", b"Content-Length: 1\r\n", b"X-Kept: k\r\n"]
    assert drop_named(lines, [b"x-secret", b"content-length"]) == lines[1:]
    assert valid_host(b"[::1]:80") and not valid_host(b"a b") and not valid_host(b"u@h")
    assert host_of(b"[::1]:8080") == b"[::1]" and host_of(b"A.b:1") == b"a.b"
    assert transfer_coding(b"gzip, chunked").status == 501
    assert transfer_coding(b"chunked, gzip").status == 400
    assert status_line(204, b"No Content") == b"HTTP/1.1 204 No Content\r\n"


def test_error_responses_are_short_json_with_the_request_id() -> None:
    raw = error_response(503, b"rid1", "no backend", True, retry_after=5)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 5" in head and b"\r\nConnection: close" in head
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"status": 503, "error": "Service Unavailable",
                                "detail": "no backend", "request_id": "rid1"}


@pytest.mark.parametrize("framing, http10, close, expected", [
    (LENGTH, False, False, (O_RAW, False, b"")),
    (LENGTH, False, True, (O_RAW, True, b"Connection: close\r\n")),
    (NO_BODY, True, False, (O_NONE, False, b"Connection: keep-alive\r\n")),
    (BY_CHUNKS, False, False, (O_CHUNK, False, b"Transfer-Encoding: chunked\r\n")),
    (UNTIL_CLOSE, False, False, (O_CHUNK, False, b"Transfer-Encoding: chunked\r\n")),
    # HTTP/1.0 has no chunks: a body of unknown length ends with the connection.
    (BY_CHUNKS, True, False, (O_RAW, True, b"Connection: close\r\n")),
    (UNTIL_CLOSE, True, True, (O_RAW, True, b"Connection: close\r\n")),
])
def test_an_answer_is_framed_for_its_client(framing: int, http10: bool, close: bool,
                                            expected: tuple[int, bool, bytes]) -> None:
    assert ANSWER_FRAMING[framing][http10][close] == expected
