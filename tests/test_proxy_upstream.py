"""The pool of keep-alive connections to backends: reused, bounded, dropped when closed."""

from __future__ import annotations

import asyncio

import aiohttp

from balancer.upstream import UpstreamPool
from tests.support.backends import RawBackend, keepalive_then_close, raw_backend
from tests.support.proxy import RawClient, pool_of, run_proxy


def keep_alive(close_after: int = 0, answer: bytes = b"ok"):  # type: ignore[no-untyped-def]
    """Answer every request on a connection; with ``close_after``, say Connection: close on
    that many-th answer and close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      backend: RawBackend) -> None:
        n = 0
        while True:
            await backend.read_request(reader)
            n += 1
            last = close_after and n >= close_after
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
                len(answer), b"Connection: close\r\n" if last else b"", answer))
            await writer.drain()
            if last:
                return

    return handler


async def test_sequential_requests_reuse_one_upstream_connection() -> None:
    async with raw_backend(keep_alive()) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px, \
                aiohttp.ClientSession() as s:
            for _ in range(20):
                async with s.get(px.url + "/") as r:
                    assert await r.read() == b"ok"
            assert (be.connections, len(be.requests)) == (1, 20)


async def test_concurrent_requests_open_at_most_one_connection_each() -> None:
    async with raw_backend(keep_alive()) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px, \
                aiohttp.ClientSession() as s:
            async def one() -> bytes:
                async with s.get(px.url + "/") as r:
                    return await r.read()
            for _ in range(5):
                assert await asyncio.gather(*(one() for _ in range(8))) == [b"ok"] * 8
            assert be.connections <= 8
            upool = px.backend("web", f"b{be.port}").connections
            assert len(upool.idle) == be.connections  # all back in the pool, none lost


async def test_connection_close_from_the_backend_is_not_reused() -> None:
    async with raw_backend(keep_alive(close_after=2)) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port, retries=0)}}) as px, \
                aiohttp.ClientSession() as s:
            for _ in range(6):
                async with s.get(px.url + "/") as r:
                    assert (r.status, await r.read()) == (200, b"ok")
            assert be.connections == 3
            assert px.backend("web", f"b{be.port}").errors == {}


async def test_idle_connections_close_after_the_idle_timeout() -> None:
    async with raw_backend(keep_alive()) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px, \
                aiohttp.ClientSession() as s:
            backend = px.backend("web", f"b{be.port}")
            upool = backend.connections = UpstreamPool(backend, idle_timeout=0.2)
            async with s.get(px.url + "/") as r:
                await r.read()
            assert len(upool.idle) == 1
            for _ in range(50):
                if not upool.idle:
                    break
                await asyncio.sleep(0.02)
            assert upool.idle == []
            async with s.get(px.url + "/") as r:  # a new one is opened as needed
                assert await r.read() == b"ok"
            assert be.connections == 2


async def test_idle_pool_is_bounded() -> None:
    async with raw_backend(keep_alive()) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px, \
                aiohttp.ClientSession() as s:
            backend = px.backend("web", f"b{be.port}")
            upool = backend.connections = UpstreamPool(backend, max_idle=3)

            async def one() -> None:
                async with s.get(px.url + "/") as r:
                    await r.read()
            await asyncio.gather(*(one() for _ in range(10)))
            assert len(upool.idle) <= 3


async def test_backend_closing_an_idle_connection_drops_it_from_the_pool() -> None:
    # One answer ("ok") per connection, then the kept-alive connection is closed, idle.
    async with raw_backend(keepalive_then_close()) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port, retries=0)}}) as px:
            async with await RawClient.open(px.port) as c:
                await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert (await c.response()).body == b"ok"
                upool = px.backend("web", f"b{be.port}").connections
                for _ in range(50):
                    if not upool.idle:
                        break
                    await asyncio.sleep(0.02)
                assert upool.idle == []
                await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                assert (await c.response()).body == b"ok"


async def test_close_closes_idle_connections_and_later_releases() -> None:
    async with raw_backend(keep_alive()) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px, \
                aiohttp.ClientSession() as s:
            async with s.get(px.url + "/") as r:
                await r.read()
            upool = px.backend("web", f"b{be.port}").connections
            conn = upool.idle[0]
            await upool.close()
            assert upool.idle == [] and conn.transport.is_closing()
            async with s.get(px.url + "/") as r:  # still served, on a connection not kept
                assert await r.read() == b"ok"
            assert upool.idle == []


async def test_informational_answers_are_relayed_before_the_final_one() -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          backend: RawBackend) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                     b"2\r\nok\r\n0\r\nX-Sum: 42\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with raw_backend(early_hints) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px:
            async with await RawClient.open(px.port) as c:
                await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                hints = await c.response()
                assert hints.status == 103
                assert hints.header("link") == "</style.css>; rel=preload"
                final = await c.response()
                assert (final.status, final.body) == (200, b"ok")
                assert final.header("trailer") is None  # hop-by-hop
                assert final.header("x-sum") == "42"  # the trailer field itself goes on
