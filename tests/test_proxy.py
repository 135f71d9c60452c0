"""The request path through real sockets: real aiohttp backends, real clients, the proxy served
in-process by ``protocol_factory`` on uvloop (what ``balancer run`` uses)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any, AsyncIterator

import aiohttp
import pytest

from balancer.config import RouteConfig
from balancer.proxy import ProxySettings
from balancer.router import Router
from tests.support.backends import GATE, special_app
from tests.support.net import name_app, run_app
from tests.support.on_uvloop import event_loop_policy, pytestmark  # noqa: F401
from tests.support.proxy import RawClient, pool_of, run_proxy


@pytest.fixture
async def special() -> AsyncIterator[tuple[int, Any]]:
    app = special_app("s1")
    async with run_app(app) as port:
        yield port, app


async def get_all(url: str, n: int, **kwargs: Any) -> list[str]:
    """``n`` sequential GETs on one keep-alive session; the X-Backend of each answer."""
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url, **kwargs) as r:
                assert r.status == 200, await r.text()
                out.append(r.headers["X-Backend"])
    return out


# --------------------------------------------------------------------------- spreading


async def test_round_robin_spreads_requests_evenly() -> None:
    async with run_app(name_app("a")) as a, run_app(name_app("b")) as b, \
            run_app(name_app("c")) as c:
        async with run_proxy({"pools": {"web": pool_of(a, b, c)}}) as px:
            seen = await get_all(px.url + "/", 30)
    assert Counter(seen) == {"a": 10, "b": 10, "c": 10}
    assert seen[:3] != seen[3:6] or len(set(seen[:3])) == 3  # interleaved, not in blocks


async def test_least_connections_sees_requests_in_flight() -> None:
    """Ten concurrent slow requests over two backends: the proxy reports each one in flight
    (pool.begin/finish), so least_connections puts five on each."""
    async with run_app(special_app("a")) as a, run_app(special_app("b")) as b:
        config = {"pools": {"web": pool_of(a, b, strategy="least_connections")}}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            async def one() -> str:
                async with s.get(px.url + "/slow?delay=0.4") as r:
                    return r.headers["X-Backend"]
            seen = await asyncio.gather(*(one() for _ in range(10)))
            assert Counter(seen) == {"a": 5, "b": 5}
            assert px.pools["web"].in_flight == 0


async def test_consistent_hash_keeps_each_key_on_one_backend() -> None:
    async with run_app(name_app("a")) as a, run_app(name_app("b")) as b, \
            run_app(name_app("c")) as c:
        config = {"pools": {"web": pool_of(a, b, c, strategy={
            "name": "consistent_hash", "key": "header:X-User-ID"})}}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            placed: dict[str, set[str]] = {}
            for user in range(30):
                for _ in range(3):
                    async with s.get(px.url + "/", headers={"X-User-ID": f"u{user}"}) as r:
                        placed.setdefault(f"u{user}", set()).add(r.headers["X-Backend"])
    assert all(len(backends) == 1 for backends in placed.values())
    assert len(set.union(*placed.values())) == 3


async def test_requests_keep_the_pool_they_arrived_with() -> None:
    """A reload swaps the router: a request in flight finishes on its old pool."""
    async with run_app(special_app("old")) as old, run_app(special_app("new")) as new:
        config = {"pools": {"a": pool_of(old), "b": pool_of(new)},
                  "routes": [{"pool": "a"}]}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            slow = asyncio.ensure_future(s.get(px.url + "/slow?delay=0.3"))
            await asyncio.sleep(0.1)
            px.state.router = Router((RouteConfig(pool="b"),), px.pools)
            async with await slow as r:
                assert r.headers["X-Backend"] == "old"
            async with s.get(px.url + "/") as r:
                assert r.headers["X-Backend"] == "new"


# --------------------------------------------------------------------------- headers


async def test_forwarded_headers_and_hop_by_hop_removed(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(
                b"GET /headers HTTP/1.1\r\nHost: Example.test:8080\r\n"
                b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: gopher\r\n"
                b"X-Forwarded-Host: evil.test\r\n"
                b"Connection: keep-alive, X-Secret\r\nX-Secret: hop\r\nKeep-Alive: timeout=5\r\n"
                b"TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
                b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-End-To-End: yes\r\n\r\n")
            r = await c.response()
    assert r.status == 200
    sent = json.loads(r.body)
    names = [k.lower() for k, _ in sent]
    got = {k.lower(): v for k, v in sent}
    assert got["host"] == "Example.test:8080"  # unchanged
    assert got["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"  # appended to
    assert got["x-forwarded-proto"] == "http"  # set
    assert got["x-forwarded-host"] == "Example.test:8080"  # set
    assert got["via"] == "1.1 balancer"
    assert got["x-end-to-end"] == "yes"
    for hop in ("connection", "x-secret", "keep-alive", "te", "trailer", "proxy-authorization",
                "proxy-connection", "upgrade"):
        assert hop not in names, hop
    assert names.count("x-forwarded-for") == 1
    # The request id the backend saw is the one the client gets back.
    assert got["x-request-id"] == r.header("x-request-id")
    assert r.header("via") == "1.1 balancer"


async def test_request_id_passed_through_when_sane(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px, aiohttp.ClientSession() as s:
        async with s.get(px.url + "/headers", headers={"X-Request-ID": "abc-123"}) as r:
            sent = {k.lower(): v for k, v in await r.json()}
            assert sent["x-request-id"] == "abc-123" == r.headers["X-Request-ID"]
        async with s.get(px.url + "/headers", headers={"X-Request-ID": "x" * 300}) as r:
            sent = {k.lower(): v for k, v in await r.json()}
            assert sent["x-request-id"] == r.headers["X-Request-ID"] != "x" * 300
        ids = set()
        for _ in range(5):
            async with s.get(px.url + "/") as r:
                ids.add(r.headers["X-Request-ID"])
        assert len(ids) == 5


async def test_response_hop_by_hop_headers_removed(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(b"GET /hop HTTP/1.1\r\nHost: h\r\n\r\n")
            r = await c.response()
    names = [k for k, _ in r.headers]
    for hop in ("x-internal", "keep-alive", "proxy-authenticate", "upgrade", "connection"):
        assert hop not in names, hop
    assert r.header("x-end-to-end") == "kept"
    assert r.header("x-request-id") != "backend-made-this-up"
    assert r.header("via") == "1.1 balancer"
    assert r.body == b"hop"


# --------------------------------------------------------------------------- framing


async def test_pipelined_requests_are_answered_in_order(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(
                b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nsecond"
                b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nthird\r\n0\r\n\r\n"
                b"GET /status/204 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            answers = [await c.response() for _ in range(5)]
            assert await c.closed()
    assert [a.status for a in answers] == [200, 200, 200, 204, 200]
    assert [a.body for a in answers] == [b"s1", b"second", b"third", b"", b""]
    assert answers[-1].header("connection") == "close"
    assert len({a.header("x-request-id") for a in answers}) == 5


async def test_head_204_304_have_no_body_and_keep_the_connection(
        special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(b"HEAD /head HTTP/1.1\r\nHost: h\r\n\r\n")
            head = await c.response(head_only=True)
            assert head.status == 200 and head.header("content-length") == "1234"
            for code in (204, 304):
                await c.send(b"GET /status/%d HTTP/1.1\r\nHost: h\r\n\r\n" % code)
                r = await c.response()
                assert r.status == code
                assert r.header("transfer-encoding") is None
            # Had any body bytes been passed on, this answer would be misread.
            await c.send(b"GET /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nnext")
            r = await c.response()
            assert (r.status, r.body) == (200, b"next")


async def test_expect_100_continue_is_relayed(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            interim = await c.response()
            assert interim.status == 100
            await c.send(b"hello world")
            r = await c.response()
            assert (r.status, r.body) == (200, b"hello world")
            # A final answer while the body is still to come: the connection cannot go on.
            await c.send(b"POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            r = await c.response()
            if r.status == 100:  # aiohttp says 100 before its handler runs
                r = await c.response()
            assert r.status == 413
            assert await c.closed()


async def test_chunked_response_streams_first_chunk_before_backend_finishes(
        special: tuple[int, Any]) -> None:
    port, app = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px, aiohttp.ClientSession() as s:
        async with s.get(px.url + "/stream") as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            first = await asyncio.wait_for(r.content.readline(), 5)
            assert first == b"first chunk\n"
            assert not app[GATE].is_set()  # the backend is still inside its handler
            app[GATE].set()
            assert await asyncio.wait_for(r.content.read(), 5) == b"second chunk\n"


async def test_body_until_close_is_rechunked_for_http11_and_closed_for_http10() -> None:
    from tests.support.backends import raw_backend, until_close

    async with raw_backend(until_close) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px:
            async with await RawClient.open(px.port) as c:
                await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                r = await c.response()
                assert r.header("transfer-encoding") == "chunked"
                assert r.body == b"the body ends at close"
                await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # still usable
                assert (await c.response()).body == b"the body ends at close"
            async with await RawClient.open(px.port) as c:
                await c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                r = await c.response()
                assert r.header("transfer-encoding") is None
                assert r.body == b"the body ends at close"  # read until the proxy closed


async def test_http10_client_keep_alive(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(b"GET /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
            r = await c.response()
            assert r.header("connection") == "keep-alive" and r.body == b"s1"
            await c.send(b"GET /x HTTP/1.0\r\nHost: h\r\n\r\n")
            r = await c.response()
            assert r.header("connection") == "close"
            assert await c.closed()


async def test_bodies_stream_both_ways_intact(special: tuple[int, Any]) -> None:
    import hashlib

    port, _ = special
    data = bytes(range(256)) * 8192  # 2 MiB
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px, aiohttp.ClientSession() as s:
        async with s.post(px.url + "/upload", data=data) as r:  # Content-Length
            assert await r.json() == {"bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 100_000):
                yield data[i:i + 100_000]

        async with s.post(px.url + "/upload", data=gen()) as r:  # chunked
            assert (await r.json())["sha256"] == hashlib.sha256(data).hexdigest()
        for q in ("size=3000000", "size=3000000&chunked=1"):
            async with s.get(px.url + "/download?" + q) as r:
                assert len(await r.read()) == 3_000_000


async def test_websocket_echo(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px, aiohttp.ClientSession() as s:
        async with s.ws_connect(px.url + "/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "s1: hello"
            payload = bytes(range(256)) * 400
            await ws.send_bytes(payload)
            assert (await ws.receive(timeout=5)).data == payload
            await ws.close()
        for _ in range(50):
            if px.state.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert px.state.in_flight == 0
        assert px.pools["web"].in_flight == 0
        # The connection is usable for plain HTTP afterwards.
        async with s.get(px.url + "/") as r:
            assert r.status == 200


# --------------------------------------------------------------------------- failures


async def test_refused_backend_costs_clients_nothing_for_get_and_post() -> None:
    from tests.support.proxy import refused_port

    dead = refused_port()
    async with run_app(name_app("alive")) as alive:
        config = {"pools": {"web": pool_of(dead, alive)}}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            for i in range(6):
                async with s.get(px.url + "/") as r:
                    assert (r.status, await r.text()) == (200, "alive")
                async with s.post(px.url + "/echo", data=b"payload %d" % i) as r:
                    assert (r.status, await r.read()) == (200, b"payload %d" % i)
            assert px.backend("web", f"b{dead}").errors.get("connect", 0) >= 1


async def test_no_backend_available_is_503_with_retry_after(special: tuple[int, Any]) -> None:
    port, _ = special
    config = {"pools": {"web": pool_of(port, panic_threshold=0)}}  # no panic: truly none
    async with run_proxy(config) as px, aiohttp.ClientSession() as s:
        px.pools["web"].backends[0].healthy = False
        px.pools["web"].state_changed()
        async with s.get(px.url + "/") as r:
            assert r.status == 503
            assert r.headers["Retry-After"]
            body = await r.json()
            assert body["request_id"] == r.headers["X-Request-ID"]
            assert "web" in body["detail"]


async def test_all_backends_refusing_is_502_after_the_retries() -> None:
    from tests.support.proxy import refused_port

    ports = [refused_port() for _ in range(4)]
    async with run_proxy({"pools": {"web": pool_of(*ports, retries=2)}}) as px, \
            aiohttp.ClientSession() as s:
        async with s.get(px.url + "/") as r:
            assert r.status == 502
            body = await r.json()
            assert body["request_id"] == r.headers["X-Request-ID"]
            assert "3 attempt" in body["detail"]
        tried = sum(b.errors.get("connect", 0) for b in px.pools["web"].backends)
        assert tried == 3
        assert px.pools["web"].in_flight == 0


async def test_no_answer_within_read_timeout_is_504() -> None:
    from tests.support.backends import never_answer, raw_backend

    async with raw_backend(never_answer) as be:
        config = {"pools": {"web": pool_of(be.port, timeouts={"read": "300ms"})}}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with s.get(px.url + "/") as r:
                assert r.status == 504
                assert (await r.json())["request_id"] == r.headers["X-Request-ID"]
            assert 0.25 < loop.time() - t0 < 3
            assert px.backend("web", f"b{be.port}").errors == {"timeout": 1}
            assert len(be.requests) == 1  # a timeout is not retried


async def test_failure_after_send_retries_get_but_never_post() -> None:
    from tests.support.backends import raw_backend, reset_after_request

    async with raw_backend(reset_after_request) as bad, run_app(name_app("good")) as good:
        config = {"pools": {"web": pool_of(bad.port, good,
                                           outlier_detection={"consecutive_failures": 100})}}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.get(px.url + "/") as r:
                    assert (r.status, await r.text()) == (200, "good")
            gets = len(bad.requests)
            assert gets >= 1  # round robin sent some there first; each was retried
            failed = []
            for _ in range(4):
                async with s.post(px.url + "/", data=b"once") as r:
                    assert r.status in (200, 502)
                    if r.status == 502:
                        assert (await r.json())["request_id"] == r.headers["X-Request-ID"]
                        failed.append(r.headers["X-Request-ID"].encode())
            posts = bad.requests[gets:]
            assert failed and len(posts) == len(failed)  # a POST that failed was not retried
            for rid in failed:
                assert sum(rid in head for head in bad.requests) == 1  # sent once, never twice
            assert px.backend("web", f"b{bad.port}").errors == {"reset": gets + len(posts)}


async def test_answer_cut_short_aborts_the_client_connection() -> None:
    from tests.support.backends import cut_short, raw_backend

    async with raw_backend(cut_short) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}) as px, \
                aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(px.url + "/") as r:
                    assert r.status == 200
                    await r.read()
            assert px.backend("web", f"b{be.port}").errors == {"reset": 1}


async def test_unparseable_answer_is_502() -> None:
    from tests.support.backends import garbage, raw_backend

    async with raw_backend(garbage) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port, retries=0)}}) as px, \
                aiohttp.ClientSession() as s:
            async with s.get(px.url + "/") as r:
                assert r.status == 502
                assert "invalid response" in (await r.json())["detail"]
            assert px.backend("web", f"b{be.port}").errors == {"protocol": 1}


async def test_stale_pooled_connection_is_retried_on_a_fresh_one() -> None:
    """The backend drops a kept-alive connection as our next request arrives on it: the
    request goes again on a new connection, and the backend is not blamed."""
    from tests.support.backends import RawBackend, raw_backend

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         backend: RawBackend) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await backend.read_request(reader)  # the second request on this connection...
        writer.transport.abort()  # ...is dropped, as a keep-alive timeout would

    async with raw_backend(first_only) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port, retries=0)}}) as px, \
                aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(px.url + "/") as r:
                    assert (r.status, await r.text()) == (200, "ok")
            backend = px.backend("web", f"b{be.port}")
            assert backend.errors == {}
            assert backend.requests_total == 3
            # 1: new connection; 2 and 3: the pooled one is dropped, then a new one answers.
            assert (be.connections, len(be.requests)) == (3, 5)


async def test_unknown_route_is_404() -> None:
    async with run_app(name_app("a")) as a:
        config = {"pools": {"web": pool_of(a)},
                  "routes": [{"host": "site.test", "pool": "web"}]}
        async with run_proxy(config) as px, aiohttp.ClientSession() as s:
            async with s.get(px.url + "/", headers={"Host": "other.test"}) as r:
                assert r.status == 404
                assert (await r.json())["request_id"] == r.headers["X-Request-ID"]
            async with s.get(px.url + "/", headers={"Host": "SITE.test:99"}) as r:
                assert r.status == 200


async def test_overloaded_pool_is_503_after_the_queue_timeout(special: tuple[int, Any]) -> None:
    port, _ = special
    config = {"pools": {"web": pool_of(port, max_connections=1, queue_timeout="200ms")}}
    async with run_proxy(config) as px, aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(px.url + "/slow?delay=0.6"))
        await asyncio.sleep(0.1)
        async with s.get(px.url + "/") as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert "connection limit" in (await r.json())["detail"]
        async with await slow as r:
            assert r.status == 200


async def test_early_answer_before_the_body_closes_the_client_gracefully(
        special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(b"POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: 10000000\r\n\r\n"
                         + b"x" * 100_000)
            r = await c.response()
            assert r.status == 413 and r.body == b"too big for me"
            assert await c.closed()
        assert px.pools["web"].in_flight == 0


async def test_client_leaving_mid_request_frees_everything(special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        c = await RawClient.open(px.port)
        await c.send(b"GET /slow?delay=0.3 HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0.1)
        assert px.state.in_flight == 1 and px.pools["web"].in_flight == 1
        c.writer.transport.abort()
        for _ in range(50):
            if not px.state.connections:
                break
            await asyncio.sleep(0.01)
        assert px.state.in_flight == 0 and px.pools["web"].in_flight == 0
        assert not px.state.connections


async def test_drain_closes_idle_connections_now_and_busy_ones_after_their_answer(
        special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        idle = await RawClient.open(px.port)
        await idle.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await idle.response()
        busy = await RawClient.open(px.port)
        await busy.send(b"GET /slow?delay=0.3 HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0.1)
        px.state.begin_drain()
        assert await idle.closed(timeout=1)
        r = await busy.response()
        assert r.status == 200 and r.header("connection") == "close"
        assert await busy.closed(timeout=1)
        await idle.close()
        await busy.close()


async def test_access_log_has_one_json_line_per_request(
        special: tuple[int, Any], caplog: pytest.LogCaptureFixture) -> None:
    port, _ = special
    caplog.set_level("INFO", logger="balancer.access")
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px, aiohttp.ClientSession() as s:
        async with s.get(px.url + "/some/path?q=1") as r:
            rid = r.headers["X-Request-ID"]
        async with await RawClient.open(px.port) as c:  # a quote the parser lets through
            await c.send(b'GET /odd"path HTTP/1.1\r\nHost: h\r\n\r\n')
            assert (await c.response()).status == 200
    lines = [json.loads(rec.getMessage()) for rec in caplog.records
             if rec.name == "balancer.access"]
    assert len(lines) == 2
    first = lines[0]
    assert first["request_id"] == rid and first["method"] == "GET"
    assert first["path"] == "/some/path?q=1" and first["status"] == 200
    assert first["pool"] == "web" and first["backend"] == f"b{port}"
    assert first["client"] == "127.0.0.1" and first["bytes"] == 2
    assert 0 < first["upstream_time"] <= first["total_time"]
    assert lines[1]["path"] == '/odd"path'


async def test_access_log_off_writes_nothing(special: tuple[int, Any],
                                             caplog: pytest.LogCaptureFixture) -> None:
    port, _ = special
    caplog.set_level("INFO", logger="balancer.access")
    async with run_proxy({"pools": {"web": pool_of(port)}}, ProxySettings(access_log=False)) \
            as px, aiohttp.ClientSession() as s:
        async with s.get(px.url + "/") as r:
            assert r.status == 200
    assert not [rec for rec in caplog.records if rec.name == "balancer.access"]


async def test_client_that_half_closes_after_its_request_gets_the_answer(
        special: tuple[int, Any]) -> None:
    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px:
        async with await RawClient.open(px.port) as c:
            await c.send(b"GET /slow?delay=0.1 HTTP/1.1\r\nHost: h\r\n\r\n")
            c.writer.write_eof()
            r = await c.response()
            assert (r.status, r.body) == (200, b"s1")
            assert r.header("connection") == "close"
            assert await c.closed()


async def test_finished_requests_leave_nothing_behind(special: tuple[int, Any]) -> None:
    import gc

    from balancer.exchange import Exchange

    port, _ = special
    async with run_proxy({"pools": {"web": pool_of(port)}}) as px, aiohttp.ClientSession() as s:
        for path in ("/", "/echo", "/status/204", "/nowhere", "/download?size=100000"):
            for _ in range(20):
                async with s.get(px.url + path) as r:
                    await r.read()
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, Exchange)]
        assert alive == []
        assert px.state.in_flight == 0 and not px.state.deadlines.waiting
