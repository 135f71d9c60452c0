"""Overload protection: max_connections is never exceeded, waiting is bounded and fair."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancer.backend import Backend
from balancer.config import parse_config
from balancer.pool import NoBackend, Pool
from balancer.strategies import PickContext
from tests.test_admin import WAIT, LiveBackend, Running, balancer_config, running, two_backend_pool

CLIENTS = 50
LIMIT = 4


def make_pool(ports: list[int], **pool: Any) -> Pool:
    cfg = parse_config({"pools": {"web": {
        "backends": [f"http://127.0.0.1:{p}" for p in ports], **pool}}})
    pc = cfg.pools["web"]
    return Pool(pc, [Backend(b, "web", pc.max_connections) for b in pc.backends])


@pytest.fixture
async def two_backends() -> AsyncIterator[tuple[list[LiveBackend], list[int]]]:
    """Two backends that count their own concurrency: the truth about what they were sent."""
    servers = [LiveBackend("a", delay=0.01), LiveBackend("b", delay=0.01)]
    for server in servers:
        await server.start()
    try:
        yield servers, [server.port for server in servers]
    finally:
        for server in servers:
            await server.stop()


async def hammer(pool: Pool, clients: int, each: int) -> list[str]:
    """``clients`` concurrent clients, each sending ``each`` requests through ``pool``."""
    outcomes: list[str] = []
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            for _ in range(each):
                try:
                    b = await pool.acquire(PickContext("127.0.0.1"))
                except NoBackend as exc:
                    outcomes.append(exc.reason)
                    continue
                loop = asyncio.get_running_loop()
                start = loop.time()
                async with session.get(f"{b.url}/") as resp:
                    await resp.read()
                pool.finish(b, resp.status, loop.time() - start)
                outcomes.append(str(resp.status))

        await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


async def test_max_connections_is_never_exceeded_and_waiting_is_fair(
        two_backends: tuple[list[LiveBackend], list[int]]) -> None:
    servers, ports = two_backends
    pool = make_pool(ports, max_connections=LIMIT)  # default queue_timeout: 1 s
    # 25 rounds: long enough (> queue_timeout) that a queue a newcomer could jump would starve.
    outcomes = await hammer(pool, CLIENTS, 25)
    assert all(s.peak <= LIMIT for s in servers), [s.peak for s in servers]
    assert all(s.peak == LIMIT for s in servers), "the test did not load the backends"
    # First come, first served: with 50 clients queueing for 8 slots of ~10 ms requests, no
    # one waits anywhere near the 1 s queue_timeout, so nobody is turned away. (When a client
    # that just finished could take the freed slot before the woken waiter ran, waiters were
    # starved past queue_timeout and got 503s.)
    assert outcomes.count("200") == CLIENTS * 25
    assert pool.rejected == {"no_backend": 0, "overload": 0}
    assert pool.in_flight == 0 and pool.waiting == 0


async def test_a_backend_entry_overrides_the_pool_limit(
        two_backends: tuple[list[LiveBackend], list[int]]) -> None:
    servers, ports = two_backends
    cfg = {"backends": [{"url": f"http://127.0.0.1:{ports[0]}", "max_connections": 1},
                        f"http://127.0.0.1:{ports[1]}"], "max_connections": 3}
    pool = make_pool([], **cfg)
    await hammer(pool, 20, 5)
    assert servers[0].peak == 1 and servers[1].peak <= 3


async def test_no_slot_within_queue_timeout_is_rejected_as_overload(
        two_backends: tuple[list[LiveBackend], list[int]]) -> None:
    _, ports = two_backends
    pool = make_pool(ports, max_connections=1, queue_timeout="100ms")
    held = [await pool.acquire(PickContext()), await pool.acquire(PickContext())]
    assert {b.port for b in held} == set(ports) and pool.in_flight == 2
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(NoBackend) as err:
        await pool.acquire(PickContext())
    assert err.value.reason == "overload"
    assert loop.time() - start >= 0.09
    assert pool.rejected["overload"] == 1 and pool.waiting == 0
    # A waiter gets the slot as soon as one is freed, before any newcomer.
    waiter = asyncio.ensure_future(pool.acquire(PickContext()))
    await asyncio.sleep(0.01)
    pool.finish(held[0], 200, 0.001)
    with pytest.raises(NoBackend):
        pool.pick(PickContext())  # the freed slot already went to the waiter
    assert (await waiter) is held[0]
    # A waiter whose client goes away gives back a slot handed to it meanwhile.
    waiter = asyncio.ensure_future(pool.acquire(PickContext()))
    await asyncio.sleep(0.01)
    pool.finish(held[1], 200, 0.001)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert held[1].in_flight == 0 and pool.waiting == 0


async def test_no_backend_is_counted_and_retries_are_not() -> None:
    cfg = parse_config({"pools": {"web": {"backends": ["http://127.0.0.1:1",
                                                       "http://127.0.0.1:2"],
                                          "panic_threshold": 0}}})
    pool = Pool(cfg.pools["web"], [Backend(b, "web") for b in cfg.pools["web"].backends])
    for b in pool.backends:
        b.healthy = False
    pool.state_changed()
    with pytest.raises(NoBackend) as err:
        await pool.acquire(PickContext())
    assert err.value.reason == "no_backend"
    with pytest.raises(NoBackend):
        await pool.acquire(PickContext(), exclude=pool.backends[:1])
    assert pool.rejected == {"no_backend": 1, "overload": 0}


# --------------------------------------------------------------------------- through the proxy


async def _hammer_proxy(run: Running, clients: int, each: int) -> list[tuple[int, str | None]]:
    """``clients`` concurrent clients, each with its own connection, ``each`` requests."""
    out: list[tuple[int, str | None]] = []

    async def client() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
            for _ in range(each):
                async with s.get(run.url + "/") as r:
                    await r.read()
                    out.append((r.status, r.headers.get("Retry-After")))

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


async def test_through_the_proxy_max_connections_4_holds_under_50_clients(
        tmp_path: Path) -> None:
    a, b = LiveBackend("a", delay=0.01), LiveBackend("b", delay=0.01)
    data = balancer_config(two_backend_pool(a, b, max_connections=LIMIT))
    async with running(tmp_path, [a, b], data) as run:
        out = await _hammer_proxy(run, CLIENTS, 10)
        assert a.peak <= LIMIT and b.peak <= LIMIT, (a.peak, b.peak)
        assert a.peak == LIMIT and b.peak == LIMIT, "the test did not load the backends"
        # Anything not answered was a clean 503 with Retry-After; with a 1 s queue and ~10 ms
        # requests, nothing should have waited that long.
        assert all(s == 200 or (s == 503 and ra) for s, ra in out)
        assert sum(1 for s, _ in out if s == 200) == CLIENTS * 10
        doc = await run.status()
        assert doc["pools"]["web"]["in_flight"] == 0 and doc["pools"]["web"]["waiting"] == 0


async def test_through_the_proxy_no_slot_in_time_is_503_with_retry_after_and_counted(
        tmp_path: Path) -> None:
    a, b = LiveBackend("a", delay=0.3), LiveBackend("b", delay=0.3)
    data = balancer_config(two_backend_pool(a, b, max_connections=1, queue_timeout="50ms"))
    async with running(tmp_path, [a, b], data) as run:
        out = await _hammer_proxy(run, 8, 1)
        rejected = [ra for s, ra in out if s == 503]
        assert rejected and all(ra for ra in rejected)
        assert sum(1 for s, _ in out if s == 200) == len(out) - len(rejected) >= 2
        assert a.peak == 1 and b.peak == 1
        m = await run.metrics()
        assert m[("balancer_rejected_requests_total",
                  (("pool", "web"), ("reason", "overload")))] == len(rejected)
