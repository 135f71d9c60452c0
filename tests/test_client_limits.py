"""Slow, idle and too many clients, through real sockets: each is cut off after its limit (with
408 when part of a request had arrived), a client that is slow but steady is not, a client the
proxy itself holds back is never blamed, and ``max_clients`` turns the excess away with a 503.

Limits are a fraction of a second here; the assertions bound *when* a cut happens loosely (the
sweep fires up to a quarter of a limit late, the machine is shared), never how fast anything is.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from balancer.proxy import ProxySettings, default_max_clients
from tests.support.backends import RawBackend, raw_backend, special_app
from tests.support.hardening import ParsingBackend, parsing_backend, record
from tests.support.net import free_port, run_app
from tests.support.on_uvloop import event_loop_policy, pytestmark  # noqa: F401
from tests.support.proc import BalancerProcess, pool_config, write_config
from tests.support.proxy import RawClient, RunningProxy, pool_of, run_proxy

LIMIT = 0.5  # seconds: every client timeout in this module
SLACK = 2.5  # ...and how late a cut may come on a busy machine
FAST = ProxySettings(header_timeout=LIMIT, body_timeout=LIMIT, keepalive_timeout=LIMIT,
                     send_timeout=LIMIT)
OK = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[RunningProxy, ParsingBackend]]:
    async with parsing_backend() as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}, FAST) as px:
            yield px, be


async def until_closed(c: RawClient, timeout: float = LIMIT + SLACK) -> tuple[bytes, float]:
    """Read until the proxy closes the connection: what came, and after how long."""
    started = time.monotonic()
    chunks = []
    while True:
        try:
            chunk = await asyncio.wait_for(c.reader.read(65536), timeout)
        except ConnectionError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


async def served(px: RunningProxy) -> bool:
    async with await RawClient.open(px.port) as c:
        await c.send(OK)
        return (await c.response()).status == 200


# --------------------------------------------------------------------------- heads


async def trickle(c: RawClient, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time (slowloris), until done or the proxy hangs up."""
    for i in range(len(data)):
        try:
            await c.send(data[i:i + 1])
        except ConnectionError:
            return
        await asyncio.sleep(every)


async def test_slowloris_head_is_cut_off_with_408_while_others_are_served(
        proxy: tuple[RunningProxy, ParsingBackend]) -> None:
    px, backend = proxy
    async with await RawClient.open(px.port) as c:
        sender = asyncio.create_task(
            trickle(c, b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 200, 0.05))
        assert await served(px)  # others are served meanwhile
        started = time.monotonic()
        r = await c.response(timeout=LIMIT + SLACK)
        took = time.monotonic() - started
        closed = await c.closed()
        sender.cancel()
    record("slow clients", "slowloris head (a byte every 50 ms)", status=r.status,
           expected=408, ok=r.status == 408 and closed, cut_after_s=round(took, 2))
    assert r.status == 408 and r.header("connection") == "close"
    assert took < LIMIT + SLACK
    assert closed
    assert px.state.timers.fired["header"] == 1
    assert all(req.url == b"/" and req.complete for req in backend.requests)  # ours only
    assert await served(px)


@pytest.mark.parametrize("drip", [b"", b"\r\n"], ids=["silent", "CRLF every 50 ms"])
async def test_a_connection_that_starts_no_request_is_closed(
        proxy: tuple[RunningProxy, ParsingBackend], drip: bytes) -> None:
    px, _ = proxy
    async with await RawClient.open(px.port) as c:
        sender = asyncio.create_task(trickle(c, drip * 100, 0.05)) if drip else None
        got, took = await until_closed(c)
        if sender is not None:
            sender.cancel()
    name = "connection sending nothing" if not drip else "connection sending only CRLFs"
    record("slow clients", name, status=None, expected=None, ok=got == b"",
           cut_after_s=round(took, 2))
    assert got == b""  # nothing was asked: nothing to answer
    assert LIMIT * 0.9 <= took < LIMIT + SLACK
    assert px.state.timers.fired["header"] == 1


async def test_a_head_arriving_in_time_in_pieces_is_served(
        proxy: tuple[RunningProxy, ParsingBackend]) -> None:
    px, _ = proxy
    async with await RawClient.open(px.port) as c:
        for piece in (b"GET / HT", b"TP/1.1\r\nHo", b"st: h\r\n", b"\r\n"):
            await c.send(piece)
            await asyncio.sleep(LIMIT / 8)
        assert (await c.response()).status == 200
    assert px.state.timers.fired["header"] == 0


# --------------------------------------------------------------------------- keep-alive


async def test_idle_keepalive_connection_is_closed_and_a_busy_one_is_not(
        proxy: tuple[RunningProxy, ParsingBackend]) -> None:
    px, _ = proxy
    async with await RawClient.open(px.port) as busy, await RawClient.open(px.port) as idle:
        await idle.send(OK)
        assert (await idle.response()).status == 200
        started = time.monotonic()
        while time.monotonic() - started < LIMIT * 3:  # busy: a request every LIMIT / 3
            await busy.send(OK)
            assert (await busy.response()).status == 200
            await asyncio.sleep(LIMIT / 3)
        got, _ = await until_closed(idle, timeout=SLACK)
        await busy.send(OK)
        still = (await busy.response()).status
    record("slow clients", "idle keep-alive connection", status=None, expected=None,
           ok=got == b"" and still == 200)
    assert got == b""  # closed quietly
    assert still == 200  # the busy one kept going all along
    assert px.state.timers.fired["keepalive"] >= 1


# --------------------------------------------------------------------------- bodies


async def test_a_stalled_body_gets_408_and_the_backend_is_let_go(
        proxy: tuple[RunningProxy, ParsingBackend]) -> None:
    px, backend = proxy
    async with await RawClient.open(px.port) as c:
        await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        r = await c.response(timeout=LIMIT + SLACK)
        closed = await c.closed()
    record("slow clients", "request body stalled mid-way", status=r.status, expected=408,
           ok=r.status == 408 and closed)
    assert r.status == 408 and closed
    assert px.state.timers.fired["body"] == 1
    assert [req.complete for req in backend.requests] == [False]  # never passed off as whole
    for _ in range(100):
        if not backend.open:
            break
        await asyncio.sleep(0.02)
    assert not backend.open  # the half-sent request's connection was dropped
    assert px.state.in_flight == 0


async def test_a_slow_but_steady_body_is_not_cut(
        proxy: tuple[RunningProxy, ParsingBackend]) -> None:
    px, backend = proxy
    body = b"0123456789ab"
    async with await RawClient.open(px.port) as c:
        await c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(len(body)):  # longer than body_timeout in all, never a pause that long
            await c.send(body[i:i + 1])
            await asyncio.sleep(LIMIT / 4)
        r = await c.response()
    record("slow clients", "slow but steady body (longer than body_timeout in all)",
           status=r.status, expected=200, ok=r.status == 200)
    assert r.status == 200
    assert backend.requests[-1].body == body
    assert px.state.timers.fired["body"] == 0


async def test_a_client_held_back_by_a_slow_backend_is_not_blamed() -> None:
    """The backend reads nothing: the proxy stops reading the client's upload. That wait is
    ours, not the client's: no body_timeout fires however long it lasts."""
    hold = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          be: RawBackend) -> None:
        await hold.wait()

    async with raw_backend(never_reads) as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}, FAST) as px:
            c = await RawClient.open(px.port)
            await c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 50000000\r\n\r\n")
            block = b"u" * 65536
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < LIMIT * 4:
                try:
                    await asyncio.wait_for(c.send(block), LIMIT / 4)
                    sent += len(block)
                except asyncio.TimeoutError:  # our send buffer is full: held back
                    await asyncio.sleep(LIMIT / 4)
            fired = dict(px.state.timers.fired)
            alive = not c.reader.at_eof() and bool(px.state.connections)
            c.writer.transport.abort()  # a close would wait to flush what nobody reads
            hold.set()
    record("slow clients", "client held back by a backend that does not read", status=None,
           expected=None, ok=fired["body"] == 0 and alive)
    assert sent < 50_000_000  # it was held back...
    assert fired["body"] == 0 and alive  # ...and not cut off for it


# --------------------------------------------------------------------------- answers


async def small_window_client(port: int) -> RawClient:
    """A client with a 64 KiB receive buffer: the megabytes a loopback socket buffers by
    default would hide its reads from the proxy for longer than these short limits."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return RawClient(reader, writer)


async def test_a_client_that_reads_nothing_is_cut_off_and_one_that_reads_slowly_is_not() -> None:
    async with run_app(special_app("big")) as port:
        async with run_proxy({"pools": {"web": pool_of(port)}}, FAST) as px:
            backend = px.pools["web"].backends[0]
            request = b"GET /download?size=100000000 HTTP/1.1\r\nHost: h\r\n\r\n"
            async with await small_window_client(px.port) as slow:
                await slow.send(request)
                got = 0
                started = time.monotonic()
                while time.monotonic() - started < LIMIT * 4:  # slow, but always reading
                    got += len(await slow.reader.read(32768))
                    await asyncio.sleep(LIMIT / 5)
                assert px.state.timers.fired["send"] == 0
            async with await RawClient.open(px.port) as deaf:
                await deaf.send(request)
                started = time.monotonic()
                while px.state.timers.fired["send"] == 0 and \
                        time.monotonic() - started < LIMIT + SLACK:
                    await asyncio.sleep(0.05)
                cut = px.state.timers.fired["send"]
                received, _ = await until_closed(deaf, timeout=SLACK)
            for _ in range(100):
                if backend.in_flight == 0:
                    break
                await asyncio.sleep(0.02)
    record("slow clients", "client reading none of its answer", status=None, expected=None,
           ok=cut == 1 and len(received) < 100_000_000)
    assert got > 0
    assert cut == 1
    assert len(received) < 100_000_000  # cut short: never passed off as complete
    assert backend.in_flight == 0  # the backend's slot was given back


# --------------------------------------------------------------------------- max_clients


async def test_max_clients_turns_the_excess_away_with_503(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="balancer.proxy")
    settings = ProxySettings(max_clients=3)
    async with parsing_backend() as be:
        async with run_proxy({"pools": {"web": pool_of(be.port)}}, settings) as px:
            held = [await RawClient.open(px.port) for _ in range(3)]
            for c in held:
                await c.send(OK)
                assert (await c.response()).status == 200
            async with await RawClient.open(px.port) as extra:
                await extra.send(OK)
                r = await extra.response()
                closed = await extra.closed()
            assert len(px.state.connections) == 3
            await held.pop().close()
            for _ in range(100):
                if len(px.state.connections) < 3:
                    break
                await asyncio.sleep(0.01)
            again = await served(px)
            for c in held:
                await c.close()
            turned_away = px.state.turned_away
    record("slow clients", "connection beyond max_clients", status=r.status, expected=503,
           ok=r.status == 503 and closed and again)
    assert r.status == 503 and r.header("connection") == "close"
    assert r.header("retry-after") == "1" and b"too many client connections" in r.body
    assert closed
    assert again  # room again once a client left
    assert turned_away == 1
    assert [m for m in caplog.messages if "max_clients (3) reached" in m]
    assert len(be.requests) == 4  # the turned-away request never reached the backend


def test_default_max_clients_is_half_the_open_files_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert default_max_clients() == max(16, (soft - 64) // 2)


# --------------------------------------------------------------------------- from the config


async def test_client_settings_reach_a_running_balancer(tmp_path: Path) -> None:
    """``balancer run`` with ``client:`` in its config: a slowloris is cut off after
    header_timeout, and a client beyond max_clients is answered 503."""
    async with parsing_backend() as a, parsing_backend() as b:
        port, admin = free_port(), free_port()
        config = write_config(tmp_path / "b.yaml", {
            "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}",
            "client": {"header_timeout": "500ms", "max_clients": 2},
            "pools": {"web": pool_config([a.port, b.port])}})
        async with BalancerProcess(config) as proc:
            first = await RawClient.open(port)  # kept alive (keepalive_timeout: 75s)
            await first.send(OK)
            assert (await first.response()).status == 200
            second = await RawClient.open(port)
            await second.send(b"GET / HTTP/1.1\r\nHost: h\r\n")  # ...and no more
            r = await second.response(timeout=LIMIT + SLACK)
            await second.close()
            await asyncio.sleep(0.2)
            third = await RawClient.open(port)  # first is still connected: one place left
            await third.send(OK)
            assert (await third.response()).status == 200
            fourth = await RawClient.open(port)
            await fourth.send(OK)
            turned = await fourth.response()
            for c in (first, third, fourth):
                await c.close()
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{admin}/metrics") as m:
                    metrics = await m.text()
            assert "Traceback" not in proc.log
    record("slow clients", "client: settings through balancer run", status=r.status,
           expected=408, ok=r.status == 408 and turned.status == 503)
    assert r.status == 408
    assert turned.status == 503
    assert 'balancer_client_timeouts_total{timeout="header"} 1.0' in metrics
    assert "balancer_client_connections_refused_total 1.0" in metrics
