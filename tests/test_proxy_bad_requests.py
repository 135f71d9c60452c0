"""Malformed and refused requests: a precise 4xx/5xx of our own, the connection closed, nothing
forwarded, and the proxy goes on serving."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import pytest

from balancer.proxy import ProxySettings
from tests.support.backends import RawBackend, raw_backend
from tests.support.proxy import RawClient, RunningProxy, pool_of, run_proxy


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    backend: RawBackend) -> None:
    while True:
        head = await backend.read_request(reader)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[RunningProxy, RawBackend]]:
    async with raw_backend(answer_ok) as be:
        settings = ProxySettings(max_body_size=1000, max_url_size=2000, max_header_size=8000,
                                 max_headers=50)
        async with run_proxy({"pools": {"web": pool_of(be.port)}}, settings) as px:
            yield px, be


OK = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"

BAD: list[tuple[str, bytes, int]] = [
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", 505),
    ("bare LF", b"GET / HTTP/1.1\nHost: h\n\n", 400),
    ("NUL in target", b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("space in header name", b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("CL and TE", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("two lengths", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                    b"Content-Length: 6\r\n\r\nhello!", 400),
    ("negative length", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n", 400),
    ("absurd length", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999"
                      b"\r\n\r\n", 400),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n", 400),
    # chunked is not the final coding: the body's end is unknowable (RFC 9112 §6.3: 400)
    ("obfuscated TE", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n"
                      b"0\r\n\r\n", 400),
    ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n"
                         b"\r\n0\r\n\r\n", 501),
    ("unknown method", b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    ("HTTP/2.0 line", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    ("odd expectation", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
                        b"Expect: 200-ok\r\n\r\nhi", 417),
    ("long target", b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    ("huge header", b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ("many headers", b"GET / HTTP/1.1\r\nHost: h\r\n"
                     + b"".join(b"X-H%d: v\r\n" % i for i in range(60)) + b"\r\n", 431),
    ("declared body too large", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n"
                                + b"x" * 5000, 413),
    ("chunked body too large", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                               b"\r\n" + b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n", 413),
    ("bad target", b"GET example.com/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
]


@pytest.mark.parametrize("data, status", [(d, s) for _, d, s in BAD],
                         ids=[name for name, _, _ in BAD])
async def test_bad_request_gets_a_precise_status_and_a_closed_connection(
        proxy: tuple[RunningProxy, RawBackend], data: bytes, status: int) -> None:
    px, backend = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(data)
        r = await c.response()
        assert r.status == status, r
        assert r.header("connection") == "close"
        body = json.loads(r.body)
        assert body["status"] == status and body["request_id"] == r.header("x-request-id")
        assert await c.closed()
    assert backend.requests == [] or status == 413  # nothing ambiguous reached the backend
    # ...and the proxy serves the next client as usual.
    async with await RawClient.open(px.port) as c:
        await c.send(OK)
        assert (await c.response()).status == 200
    assert px.state.in_flight == 0


async def test_bad_request_after_a_good_one_is_answered_in_order(
        proxy: tuple[RunningProxy, RawBackend]) -> None:
    px, _ = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(OK + b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n" + OK)
        first = await c.response()
        second = await c.response()
        assert (first.status, first.body) == (200, b"ok")
        assert second.status == 400
        assert await c.closed()  # the request after the bad one is not served


async def test_a_head_split_over_many_reads_is_bounded(
        proxy: tuple[RunningProxy, RawBackend]) -> None:
    px, _ = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ")
        for _ in range(12):
            await c.send(b"v" * 1000)
            await asyncio.sleep(0.01)
        r = await c.response()
        assert r.status == 431
        assert await c.closed()


async def test_split_reads_of_a_normal_request_are_fine(
        proxy: tuple[RunningProxy, RawBackend]) -> None:
    px, _ = proxy
    request = b"POST /x HTTP/1.1\r\nHost: h\r\nX-A: " + b"a" * 3000 + \
        b"\r\nContent-Length: 5\r\n\r\nhello"
    async with await RawClient.open(px.port) as c:
        for i in range(0, len(request), 7):
            await c.send(request[i:i + 7])
        r = await c.response()
        assert (r.status, r.body) == (200, b"ok")


async def test_absolute_form_target_uses_its_authority(
        proxy: tuple[RunningProxy, RawBackend]) -> None:
    px, backend = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(b"GET http://Site.test:8080/p?q=1 HTTP/1.1\r\nHost: ignored\r\n\r\n")
        assert (await c.response()).status == 200
    head = backend.requests[-1]
    assert head.startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: Site.test:8080\r\n")
    assert b"ignored" not in head

