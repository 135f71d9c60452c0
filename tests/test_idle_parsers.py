"""Idle keep-alive connections hold no parser (issue 10: bytes per idle connection).

Between two requests a ``ClientConnection`` gives its ``RequestParser`` back to
``ProxyState.parsers`` and holds ``IDLE_PARSER``; the next request takes one. Real sockets,
real aiohttp backends, the real ``ClientConnection`` on uvloop: every answer must be the one its
own connection asked for while parsers move between connections, and a parser that is mid-request,
refused, stopped or upgraded must never be handed on.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest

from balancer import proxy
from balancer.http1.request import IDLE_PARSER, RequestParser
from balancer.proxy import ClientConnection
from tests.support.backends import special_app
from tests.support.net import name_app, run_app
from tests.support.on_uvloop import event_loop_policy, pytestmark  # noqa: F401
from tests.support.proxy import RawClient, RunningProxy, pool_of, run_proxy


@pytest.fixture
async def px() -> AsyncIterator[RunningProxy]:
    """The proxy in front of one echoing backend (POST /echo answers with the body)."""
    async with run_app(name_app("b")) as port, run_proxy({"pools": {"web": pool_of(port)}}) as p:
        yield p


def post(body: bytes, path: str = "/echo", extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for the proxy to have read what was sent."""
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def server_side(p: RunningProxy, client: RawClient) -> ClientConnection:
    """The proxy's connection for ``client`` (matched by the client's port)."""
    port = client.writer.get_extra_info("sockname")[1]

    def find() -> ClientConnection | None:
        for conn in p.state.connections:
            assert isinstance(conn, ClientConnection)
            if conn.transport is not None and \
                    conn.transport.get_extra_info("peername")[1] == port:
                return conn
        return None

    await until(lambda: find() is not None, "the proxy accepted the connection")
    conn = find()
    assert conn is not None
    return conn


def assert_free_list_sound(p: RunningProxy) -> None:
    """Every parser on the free list is one object, bound to no connection, held by none."""
    free = p.state.parsers
    assert len({id(r) for r in free}) == len(free)
    assert len(free) <= proxy.FREE_PARSERS
    for parser in free:
        assert type(parser) is RequestParser and parser.reusable
        assert parser.sink is None and parser.head is None and parser.body_to is None
    held = {id(c.reader) for c in p.state.connections  # type: ignore[attr-defined]
            if c.reader is not IDLE_PARSER}  # type: ignore[attr-defined]
    assert not held & {id(r) for r in free}


async def test_many_keep_alive_connections_share_parsers_and_get_their_own_answers(
        px: RunningProxy) -> None:
    clients = [await RawClient.open(px.port) for _ in range(40)]
    try:
        conns = [await server_side(px, c) for c in clients]
        # One request at a time over all connections: each takes the one free parser.
        for rnd in range(3):
            for i, c in enumerate(clients):
                body = b"conn %d round %d" % (i, rnd)
                await c.send(post(body))
                r = await c.response()
                assert (r.status, r.body) == (200, body)
                await until(lambda conn=conns[i]: conn.reader is IDLE_PARSER,  # type: ignore
                            "the answered connection gave its parser back")
        assert len(px.state.parsers) == 1  # 120 requests on 40 connections, one parser
        # All at once, interleaved: parsers are taken and given back concurrently.
        bodies = [b"x%d-" % i * (i + 1) for i in range(len(clients))]
        for c, body in zip(clients, bodies):
            await c.send(post(body))
        answers = await asyncio.gather(*(c.response() for c in clients))
        assert [(r.status, r.body) for r in answers] == [(200, b) for b in bodies]
        await until(lambda: all(conn.reader is IDLE_PARSER for conn in conns),
                    "every idle connection holds no parser")
        assert_free_list_sound(px)
    finally:
        for c in clients:
            await c.close()


async def test_pipelined_requests_are_answered_in_order(px: RunningProxy) -> None:
    async with await RawClient.open(px.port) as c, await RawClient.open(px.port) as d:
        conn = await server_side(px, c)
        bodies = [b"pipelined %d " % i * 50 for i in range(6)]
        await c.send(b"".join(post(b) for b in bodies) + b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
        await d.send(post(b"other connection"))  # meanwhile, on another connection
        for body in bodies:
            r = await c.response()
            assert (r.status, r.body) == (200, body)
        r = await c.response()
        assert (r.status, r.body) == (200, b"b")
        assert (await d.response()).body == b"other connection"
        # The whole pipeline in one read, and two requests plus a part of a third in another.
        await c.send(post(b"one") + post(b"two") + b"POST /echo HTTP/1.1\r\nHo")
        assert [(await c.response()).body for _ in range(2)] == [b"one", b"two"]
        await until(lambda: conn.reader.head is not None, "the third head began")
        parser = conn.reader
        assert parser is not IDLE_PARSER and parser not in px.state.parsers
        await c.send(b"st: t\r\nContent-Length: 5\r\n\r\nthree")
        assert (await c.response()).body == b"three"
        await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle")
        assert_free_list_sound(px)


async def test_a_request_split_over_reads_keeps_its_parser(px: RunningProxy) -> None:
    async with await RawClient.open(px.port) as c, await RawClient.open(px.port) as other:
        conn = await server_side(px, c)
        pieces = [b"POST /ec", b"ho HTTP/1.1\r\nHost: t\r\n", b"Transfer-Encoding: chunked\r",
                  b"\n\r\n", b"5\r\nhel", b"lo\r\n", b"6\r\n world\r\n0\r\n", b"\r\n"]
        parser = None
        for piece in pieces[:-1]:
            await c.send(piece)
            await until(lambda: conn.reader is not IDLE_PARSER
                        and conn.reader.head is not None, "the request is being read")
            parser = parser or conn.reader
            assert conn.reader is parser  # the same parser from the first byte to the last
            # Another connection's requests meanwhile never get the parser mid-request.
            await other.send(post(piece))
            r = await other.response()
            assert (r.status, r.body) == (200, piece)
            assert parser not in px.state.parsers
        await c.send(pieces[-1])
        r = await c.response()
        assert (r.status, r.body) == (200, b"hello world")
        await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle")
        # A Content-Length body over two reads, on the parser the connection takes now.
        await c.send(post(b"0123456789")[:-4])
        await until(lambda: conn.reader.body_to is not None, "the body is being read")
        await c.send(b"6789")
        assert (await c.response()).body == b"0123456789"
        await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle again")
        assert_free_list_sound(px)


async def test_a_parser_handed_on_still_bounds_chunk_framing(px: RunningProxy) -> None:
    """Its counters come from another connection's requests: the bounds still hold."""
    chunked = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;a=b\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    async with await RawClient.open(px.port) as a:
        for _ in range(5):
            await a.send(chunked)
            assert (await a.response()).body == b"abcde"
    await until(lambda: len(px.state.parsers) == 1, "the one parser was given back")
    used = px.state.parsers[0]
    async with await RawClient.open(px.port) as b:
        conn = await server_side(px, b)
        await b.send(chunked + chunked)
        assert [(await b.response()).body for _ in range(2)] == [b"abcde", b"abcde"]
        await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle")
        assert px.state.parsers == [used]
        await b.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"1;ext=" + b"e" * 200_000 + b"\r\na\r\n0\r\n\r\n")
        r = await b.response()
        assert r.status == 400 and b"chunk extensions" in r.body
        assert conn.reader is used and not used.reusable
    assert used not in px.state.parsers
    assert_free_list_sound(px)


async def test_a_refused_request_never_hands_its_parser_on(px: RunningProxy) -> None:
    async with await RawClient.open(px.port) as c:
        conn = await server_side(px, c)
        # A good request, then in the same read one refused (two Host headers).
        await c.send(post(b"fine") + b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert (await c.response()).body == b"fine"
        r = await c.response()
        assert r.status == 400 and b"more than one Host" in r.body
        assert await c.closed()
        refused = conn.reader
        assert refused is not IDLE_PARSER and not refused.reusable
    # Mid-head refusal after a split read (431), and one mid-body (413 needs a limit: 400 bad
    # chunk framing instead).
    async with await RawClient.open(px.port) as c:
        conn2 = await server_side(px, c)
        await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
        await until(lambda: conn2.reader.body_to is not None, "the body is being read")
        await c.send(b"c\r\nzz\r\n")
        r = await c.response()
        assert r.status == 400
        assert await c.closed()
        refused2 = conn2.reader
        assert refused2 is not IDLE_PARSER and not refused2.reusable
    # Later connections work, and neither refused parser ever reaches the free list.
    for i in range(5):
        async with await RawClient.open(px.port) as c:
            await c.send(post(b"after %d" % i))
            assert (await c.response()).body == b"after %d" % i
    assert all(p is not refused and p is not refused2 for p in px.state.parsers)
    assert_free_list_sound(px)


async def test_connection_close_and_http10_parsers_are_not_reused(px: RunningProxy) -> None:
    for request in (post(b"last", extra=b"Connection: close\r\n"),
                    b"POST /echo HTTP/1.0\r\nHost: t\r\nContent-Length: 4\r\n\r\nlast"):
        async with await RawClient.open(px.port) as c:
            conn = await server_side(px, c)
            await c.send(request)
            r = await c.response()
            assert (r.status, r.body) == (200, b"last")
            assert await c.closed()
            # llhttp refuses any bytes after such a message: the parser stays with the dead
            # connection.
            assert conn.reader is not IDLE_PARSER and not conn.reader.reusable
            assert conn.reader not in px.state.parsers
    # An HTTP/1.0 keep-alive connection gives its parser back like any other.
    async with await RawClient.open(px.port) as c:
        conn = await server_side(px, c)
        for i in range(2):
            await c.send(b"POST /echo HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n"
                         b"Content-Length: 2\r\n\r\nk%d" % i)
            assert (await c.response()).body == b"k%d" % i
            await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle")
    assert_free_list_sound(px)


async def test_upgraded_parsers_are_never_handed_on() -> None:
    async with run_app(special_app("s1")) as port, \
            run_proxy({"pools": {"web": pool_of(port)}}) as px:
        # h2c is not proxied: the Upgrade is dropped and the connection goes on in HTTP/1.1,
        # on the parser that saw the upgrade, which it keeps to its end.
        async with await RawClient.open(px.port) as c:
            conn = await server_side(px, c)
            await c.send(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                         b"\r\n")
            assert (await c.response()).status == 200
            upgraded = conn.reader
            assert upgraded is not IDLE_PARSER and not upgraded.reusable
            for _ in range(2):
                await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await c.response()).status == 200
                assert conn.reader is upgraded
            assert upgraded not in px.state.parsers
        # A WebSocket: bytes are spliced; its parser is never handed on either.
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(px.url + "/ws") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "s1: hello"
                spliced = [c.reader for c in px.state.connections  # type: ignore[attr-defined]
                           if c.splice is not None]  # type: ignore[attr-defined]
                assert len(spliced) == 1 and spliced[0] is not IDLE_PARSER
                assert not spliced[0].reusable
                await ws.close()
            for _ in range(3):
                async with s.get(px.url + "/") as r:
                    assert r.status == 200
        assert all(p is not upgraded and p is not spliced[0] for p in px.state.parsers)
        assert_free_list_sound(px)


async def test_the_free_list_is_bounded(px: RunningProxy, monkeypatch: Any) -> None:
    monkeypatch.setattr(proxy, "FREE_PARSERS", 3)
    clients = [await RawClient.open(px.port) for _ in range(10)]
    try:
        conns = [await server_side(px, c) for c in clients]
        for c in clients:  # ten requests in progress at once: ten parsers
            await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n")
        await until(lambda: all(conn.reader.body_to is not None for conn in conns),
                    "ten bodies are being read")
        assert len({id(conn.reader) for conn in conns}) == 10
        for i, c in enumerate(clients):
            await c.send(b"%02d" % i)
        for i, c in enumerate(clients):
            assert (await c.response()).body == b"%02d" % i
        await until(lambda: all(conn.reader is IDLE_PARSER for conn in conns),
                    "every connection went idle")
        assert len(px.state.parsers) == 3
        assert_free_list_sound(px)
    finally:
        for c in clients:
            await c.close()


async def test_idle_connections_still_time_out_and_drain() -> None:
    """The sweep and a drain read an idle connection's IDLE_PARSER as "between requests"."""
    from balancer.proxy import ProxySettings

    fast = ProxySettings(keepalive_timeout=0.3, header_timeout=5, body_timeout=5,
                         send_timeout=5)
    async with run_app(name_app("b")) as port, \
            run_proxy({"pools": {"web": pool_of(port)}}, fast) as px:
        async with await RawClient.open(px.port) as c:
            conn = await server_side(px, c)
            await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await c.response()).body == b"b"
            await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle")
            assert await c.closed(timeout=10)  # keepalive_timeout
        assert px.state.timers.fired["keepalive"] >= 1
        async with await RawClient.open(px.port) as c:
            conn = await server_side(px, c)
            await c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await c.response()).body == b"b"
            await until(lambda: conn.reader is IDLE_PARSER, "the connection went idle")
            px.state.begin_drain()
            assert await c.closed()
