"""Bad input from clients, through real sockets: each malformed or smuggling-shaped request gets
a precise 4xx (501/505 where HTTP says so) or a plain close, never another 5xx, a hang, a crash,
a traceback or a leaked task; nothing ambiguous reaches a backend; the proxy goes on serving.

The backend here parses what it receives with llhttp (``ParsingBackend``): a request the proxy
refused must never arrive there complete, and what the proxy does forward must parse as meant.
Every case is recorded for docs/reliability.md (tests/support/hardening.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import pytest

from balancer.proxy import ProxySettings
from tests.support.hardening import Parsed, ParsingBackend, parsing_backend, record
from tests.support.on_uvloop import event_loop_policy, pytestmark  # noqa: F401
from tests.support.proxy import RawClient, RunningProxy, pool_of, run_proxy

SETTINGS = ProxySettings(max_body_size=1000, max_url_size=2000, max_header_size=8000,
                         max_headers=50)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[RunningProxy, ParsingBackend]]:
    async with parsing_backend() as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}, SETTINGS) as px:
            yield px, be


OK = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST / HTTP/1.1\r\nHost: h\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n"


@dataclass(frozen=True)
class Bad:
    """A request to refuse: the status wanted (None: closed, nothing answered)."""

    family: str
    name: str
    parts: tuple[bytes, ...]  # sent one after the other, with a pause between
    status: int | None
    half_close: bool = False  # shut our side after sending (a client that gives up)


def bad(family: str, name: str, data: bytes | tuple[bytes, ...], status: int | None,
        half_close: bool = False) -> Bad:
    return Bad(family, name, data if isinstance(data, tuple) else (data,), status, half_close)


CASES = [
    # --- malformed requests -----------------------------------------------------------------
    bad("bad input", "binary garbage", b"\x00\xff\xfe\x01garbage\r\n\r\n", 400),
    bad("bad input", "TLS hello on the plain port",
        bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\r\n\r\n", 400),
    bad("bad input", "truncated request line, then EOF", b"GET / HT", None, half_close=True),
    bad("bad input", "truncated head, then EOF", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1",
        None, half_close=True),
    bad("bad input", "invalid method characters", b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "unknown method", b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    bad("bad input", "lower-case method", b"get / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    bad("bad input", "method 100 KB long", b"A" * 100_000 + b" / HTTP/1.1\r\n\r\n", 400),
    bad("bad input", "bare LF line ends", b"GET / HTTP/1.1\nHost: h\n\n", 400),
    bad("bad input", "bare CR in the request line", b"GET / HTTP/1.1\rHost: h\r\n\r\n", 400),
    bad("bad input", "NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "space in the target", b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "8-bit byte in the target", b"GET /\xe9 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "fragment in the target", b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "target without a slash", b"GET a/b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "userinfo in an absolute target",
        b"GET http://u:p@h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "HTTP/0.9", b"GET /\r\n\r\n", 505),
    bad("bad input", "HTTP/2.0 in a request line", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    bad("bad input", "HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    bad("bad input", "junk version", b"GET / HTTP/1.x\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "NUL in a header value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
        400),
    bad("bad input", "control byte in a header value",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n", 400),
    bad("bad input", "DEL in a header value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n",
        400),
    bad("bad input", "bare CR in a header value",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    bad("bad input", "bare LF in a header value",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nY: b\r\n\r\n", 400),
    bad("bad input", "obs-fold (space)", b"GET / HTTP/1.1\r\nHost: h\r\nX: 1\r\n folded\r\n\r\n",
        400),
    bad("bad input", "obs-fold (tab)", b"GET / HTTP/1.1\r\nHost: h\r\nX: 1\r\n\tfolded\r\n\r\n",
        400),
    bad("bad input", "space in a header name", b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
        400),
    bad("bad input", "space before the colon",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A : x\r\n\r\n", 400),
    bad("bad input", "empty header name", b"GET / HTTP/1.1\r\nHost: h\r\n: x\r\n\r\n", 400),
    bad("bad input", "header line without a colon", b"GET / HTTP/1.1\r\nHost: h\r\nnocolon\r\n\r\n",
        400),
    bad("bad input", "8-bit header name", b"GET / HTTP/1.1\r\nHost: h\r\nX\xe9: v\r\n\r\n", 400),
    bad("bad input", "no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    bad("bad input", "two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    bad("bad input", "Host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    bad("bad input", "Host with userinfo", b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", 400),
    bad("bad input", "Host with a path", b"GET / HTTP/1.1\r\nHost: h/x\r\n\r\n", 400),
    bad("conformance", "empty Host value (RFC 9110 §4.2.1)",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    bad("conformance", "empty Host value in HTTP/1.0", b"GET / HTTP/1.0\r\nHost:\r\n\r\n", 400),
    bad("conformance", "Host with a port and no host", b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n",
        400),
    bad("conformance", "absolute target with an empty host",
        b"GET http://:80/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("bad input", "CONNECT", b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
    bad("bad input", "unknown expectation",
        POST + b"Content-Length: 2\r\nExpect: 200-ok\r\n\r\nhi", 417),
    bad("bad input", "negative Content-Length", POST + b"Content-Length: -5\r\n\r\n", 400),
    bad("bad input", "Content-Length with a plus", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    bad("bad input", "hex Content-Length", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    bad("bad input", "empty Content-Length", POST + b"Content-Length: \r\n\r\n", 400),
    bad("bad input", "Content-Length list", POST + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    bad("bad input", "Content-Length 2**64-1",
        POST + b"Content-Length: 18446744073709551615\r\n\r\nhello", 400),
    bad("bad input", "Content-Length 2**63 (wraps in int64)",
        POST + b"Content-Length: 9223372036854775808\r\n\r\nhello", 400),
    bad("bad input", "Content-Length of 30 digits",
        POST + b"Content-Length: 999999999999999999999999999999\r\n\r\n", 400),
    bad("bad input", "body cut short, then EOF", (POST + b"Content-Length: 10\r\n\r\nhello",),
        400, half_close=True),
    bad("bad input", "chunked body cut short, then EOF",
        (CHUNKED + b"\r\n5\r\nhello\r\n",), 400, half_close=True),
    # --- request smuggling shapes -----------------------------------------------------------
    bad("smuggling", "Content-Length then Transfer-Encoding",
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1"
               b"\r\nHost: h\r\n\r\n", 400),
    bad("smuggling", "Transfer-Encoding then Content-Length",
        CHUNKED + b"Content-Length: 5\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    bad("smuggling", "two different Content-Lengths",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    bad("smuggling", "two equal Content-Lengths",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    bad("smuggling", "TE 'chunked ' (trailing space)",
        POST + b"Transfer-Encoding: chunked \r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE 'chunked' + vertical tab",
        POST + b"Transfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE chunked, identity",
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE chunked twice in one header",
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE header twice",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE chunked then TE gzip",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE empty", POST + b"Transfer-Encoding: \r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "TE gzip, chunked (not implemented)",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    bad("smuggling", "TE identity, chunked (not implemented)",
        POST + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 501),
    bad("smuggling", "TE in HTTP/1.0",
        b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    bad("smuggling", "chunk size not hex", CHUNKED + b"\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "chunk size 0x-prefixed", CHUNKED + b"\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "negative chunk size", CHUNKED + b"\r\n-5\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "chunk size overflow",
        CHUNKED + b"\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "space after the chunk size", CHUNKED + b"\r\n5 \r\nhello\r\n0\r\n\r\n",
        400),
    bad("smuggling", "chunk longer than its size", CHUNKED + b"\r\n3\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "bare LF chunk lines", CHUNKED + b"\r\n5\nhello\n0\n\n", 400),
    bad("smuggling", "bare LF in a chunk extension",
        CHUNKED + b"\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "chunk extension of 100 KB, in pieces",
        (CHUNKED + b"\r\n5;ext=", *(b"x" * 10_000 for _ in range(10)), b"\r\nhello\r\n0\r\n\r\n"),
        400),
    bad("smuggling", "chunk extension of 100 KB, in the head's read",
        CHUNKED + b"\r\n5;ext=" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n", 400),
    bad("smuggling", "chunk extension of 100 KB, in the read that ends a split head",
        (CHUNKED, b"\r\n5;ext=" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    bad("smuggling", "chunk size padded with 100 KB of zeros, in pieces",
        (CHUNKED + b"\r\n", *(b"0" * 10_000 for _ in range(10)), b"5\r\nhello\r\n0\r\n\r\n"),
        400),
    # --- sizes ------------------------------------------------------------------------------
    bad("limits", "request target over max_url_size (414)",
        b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    bad("limits", "head over max_header_size (431)",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    bad("limits", "head over max_header_size, in pieces (431)",
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ", *(b"v" * 1000 for _ in range(12))), 431),
    bad("limits", "one header name of 100 KB (431)",
        b"GET / HTTP/1.1\r\nHost: h\r\n" + b"a" * 100_000 + b": v\r\n\r\n", 431),
    bad("limits", "more than max_headers fields (431)",
        b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(60))
        + b"\r\n", 431),
    bad("limits", "trailer fields over max_header_size (431)",
        CHUNKED + b"\r\n5\r\nhello\r\n0\r\n" + b"".join(b"T%d: %s\r\n" % (i, b"v" * 100)
                                                       for i in range(100)) + b"\r\n", 431),
    bad("limits", "Content-Length over max_body_size (413)",
        POST + b"Content-Length: 5000\r\n\r\n" + b"x" * 5000, 413),
    bad("limits", "chunked body over max_body_size (413)",
        (CHUNKED + b"\r\n", *(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(4)),
         b"0\r\n\r\n"), 413),
]


def json_error(body: bytes) -> dict[str, object]:
    """Our own error page: JSON with status, error, detail and request id; no stack trace."""
    doc = json.loads(body)
    assert set(doc) == {"status", "error", "detail", "request_id"}, doc
    assert "Traceback" not in body.decode() and 'File "' not in body.decode()
    return doc


def balancer_tasks() -> list[asyncio.Task[object]]:
    """Tasks the request path started that are still pending."""
    return [t for t in asyncio.all_tasks() if not t.done()
            and "Exchange" in getattr(t.get_coro(), "__qualname__", "")]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}: {c.name}" for c in CASES])
async def test_refused_precisely_nothing_forwarded_and_the_proxy_serves_on(
        proxy: tuple[RunningProxy, ParsingBackend], case: Bad,
        caplog: pytest.LogCaptureFixture) -> None:
    px, backend = proxy
    caplog.set_level(logging.WARNING, logger="balancer")
    status: int | None = None
    async with await RawClient.open(px.port) as c:
        for i, part in enumerate(case.parts):
            if i:
                await asyncio.sleep(0.005)
            try:
                await c.send(part)
            except ConnectionError:  # refused before we were done sending: fine
                break
        if case.half_close:
            c.writer.write_eof()
        if case.status is None:
            got = await asyncio.wait_for(c.reader.read(), 5)
            assert got == b"", got  # nothing to answer: a plain close
        else:
            r = await c.response()
            status = r.status
            record(case.family, case.name, status=r.status, expected=case.status,
                   ok=r.status == case.status)
            assert r.status == case.status, r
            assert r.header("connection") == "close"
            doc = json_error(r.body)
            assert doc["status"] == case.status and doc["request_id"] == r.header("x-request-id")
            assert await c.closed()
    if case.status is None:
        record(case.family, case.name, status=None, expected=None, ok=True)
    assert status is None or status < 500 or status in (501, 505)
    # Nothing the proxy refused reached the backend whole, and the backend never saw bytes it
    # could not parse (a body refused midway arrives cut short, on a connection then closed).
    assert not any(req.complete for req in backend.requests), backend.requests
    assert backend.errors == []
    # ...the proxy serves the next client as usual, and nothing is left behind.
    async with await RawClient.open(px.port) as c:
        await c.send(OK)
        assert (await c.response()).status == 200
    for _ in range(50):
        if px.state.in_flight == 0 and not balancer_tasks():
            break
        await asyncio.sleep(0.01)
    assert px.state.in_flight == 0
    assert balancer_tasks() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --------------------------------------------------------------------------- forwarded, canonical


@dataclass(frozen=True)
class Odd:
    """A request that is valid (if odd): forwarded in one canonical shape, checked at the
    backend's parser by ``check``."""

    name: str
    data: bytes
    check: Callable[[list[Parsed], bytes], None]
    answers: int = 1


def _one(reqs: list[Parsed]) -> Parsed:
    assert len(reqs) == 1 and reqs[0].complete, reqs
    return reqs[0]


def _canonical_length(reqs: list[Parsed], wire: bytes) -> None:
    req = _one(reqs)
    assert req.header(b"content-length") == [b"5"] and req.body == b"hello"


def _rechunked(reqs: list[Parsed], wire: bytes) -> None:
    req = _one(reqs)
    assert req.header(b"transfer-encoding") == [b"chunked"] and req.body == b"hello world"
    assert b"ext" not in wire and b"X-Trailer" not in wire and b"Content-Length" not in wire


def _request_line(reqs: list[Parsed], wire: bytes) -> None:
    assert _one(reqs).url == b"/p" and wire.startswith(b"GET /p HTTP/1.1\r\n")


def _no_underscore_twins(reqs: list[Parsed], wire: bytes) -> None:
    req = _one(reqs)
    names = {k.lower() for k, _ in req.headers}
    assert not names & {b"transfer_encoding", b"content_length", b"x_forwarded_for",
                        b"x_request_id"}, names
    assert b"x_custom" in names and req.body == b""
    assert req.header(b"x-forwarded-for") == [b"127.0.0.1"]


def _hop_by_hop_dropped(reqs: list[Parsed], wire: bytes) -> None:
    req = _one(reqs)
    names = {k.lower() for k, _ in req.headers}
    assert not names & {b"proxy-authorization", b"proxy-connection", b"keep-alive", b"te",
                        b"x-secret", b"upgrade", b"http2-settings"}, names
    assert req.header(b"x-end-to-end") == [b"kept"]


def _upgrade_ignored(reqs: list[Parsed], wire: bytes) -> None:
    req = _one(reqs)  # RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request
    assert req.header(b"upgrade") == [] and b"pgrade" not in wire, wire


def _pipelined(reqs: list[Parsed], wire: bytes) -> None:
    assert [(r.method, r.url, r.body) for r in reqs] == [
        (b"POST", b"/first", b"GET /smuggled HTTP/1.1\r\n\r\n"), (b"GET", b"/second", b"")]


def _obs_text(reqs: list[Parsed], wire: bytes) -> None:
    assert _one(reqs).header(b"x-name") == [b"Jos\xe9"]


def _absolute_form(reqs: list[Parsed], wire: bytes) -> None:
    req = _one(reqs)
    assert req.url == b"/p?q=1" and req.header(b"host") == [b"site.test:8080"]


ODD = [
    Odd("Content-Length with leading zeros", POST + b"Content-Length: 0005\r\n\r\nhello",
        _canonical_length),
    Odd("Content-Length with trailing space", POST + b"Content-Length: 5 \r\n\r\nhello",
        _canonical_length),
    Odd("chunked with extensions and trailers",
        POST + b"Transfer-Encoding: Chunked\r\n\r\n5;ext=1\r\nhello\r\n6;ext=\"q\"\r\n world\r\n"
               b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n", _rechunked),
    Odd("tab before the TE value",
        POST + b"Transfer-Encoding:\tchunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n", _rechunked),
    Odd("two spaces in the request line", b"GET  /p HTTP/1.1\r\nHost: h\r\n\r\n", _request_line),
    Odd("underscore twins of handled headers",
        b"GET / HTTP/1.1\r\nHost: h\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\n"
        b"X_Forwarded_For: 6.6.6.6\r\nX_Request_ID: evil\r\nX_Custom: 1\r\n\r\n",
        _no_underscore_twins),
    Odd("hop-by-hop and proxy credentials",
        b"GET / HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic dTpw\r\nProxy-Connection: "
        b"keep-alive\r\nKeep-Alive: 5\r\nTE: trailers\r\nConnection: X-Secret, Upgrade, "
        b"HTTP2-Settings\r\nX-Secret: s\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n"
        b"X-End-To-End: kept\r\n\r\n", _hop_by_hop_dropped),
    Odd("Upgrade in an HTTP/1.0 request is ignored",
        b"GET /chat HTTP/1.0\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        _upgrade_ignored),
    Odd("a request line inside a body stays body",
        b"POST /first HTTP/1.1\r\nHost: h\r\nContent-Length: 26\r\n\r\nGET /smuggled HTTP/1.1"
        b"\r\n\r\nGET /second HTTP/1.1\r\nHost: h\r\n\r\n", _pipelined, answers=2),
    Odd("obs-text in a header value", b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: Jos\xe9\r\n\r\n",
        _obs_text),
    Odd("absolute-form target", b"GET http://site.test:8080/p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        _absolute_form),
]


@pytest.mark.parametrize("case", ODD, ids=[c.name for c in ODD])
async def test_odd_but_valid_requests_are_forwarded_in_one_canonical_shape(
        proxy: tuple[RunningProxy, ParsingBackend], case: Odd) -> None:
    px, backend = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(case.data)
        statuses = [(await c.response()).status for _ in range(case.answers)]
    ok = statuses == [200] * case.answers
    try:
        case.check(backend.requests, backend.wire)
    except AssertionError:
        ok = False
        raise
    finally:
        record("canonical forwarding", case.name, status=statuses[0], expected=200, ok=ok)
    assert statuses == [200] * case.answers
    assert backend.errors == []


# --------------------------------------------------------------------------- doors


async def test_error_pages_name_no_backend_address_and_carry_no_trace() -> None:
    """A backend that cannot be reached: the 502 says so without its address or port."""
    from tests.support.proxy import refused_port

    port = refused_port()
    config = {"pools": {"web": {"backends": [
        {"url": f"http://127.0.0.1:{port}"}], "retries": 0}}}
    async with run_proxy(config) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(OK)
            r = await c.response()
    doc = json_error(r.body)
    text = r.body.decode() + " ".join(v for _, v in r.headers)
    ok = r.status == 502 and str(port) not in text and "127.0.0.1" not in text
    record("doors", "502 names no backend address", status=r.status, expected=502, ok=ok)
    assert r.status == 502 and doc["status"] == 502
    assert str(port) not in text and "127.0.0.1" not in text, text
    assert r.header("via") is None or "127.0.0.1" not in (r.header("via") or "")


async def test_via_names_the_proxy_not_an_address(
        proxy: tuple[RunningProxy, ParsingBackend]) -> None:
    px, backend = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(OK)
        r = await c.response()
    via = backend.requests[0].header(b"via")
    ok = r.header("via") == "1.1 balancer" and via == [b"1.1 balancer"]
    record("doors", "Via carries a name, no address", status=r.status, expected=200, ok=ok)
    assert r.header("via") == "1.1 balancer" and via == [b"1.1 balancer"]
