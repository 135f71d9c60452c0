"""Overload protection: max_connections is never exceeded, waiting is bounded and fair."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from balancer.backend import Backend
from balancer.config import parse_config
from balancer.pool import NoBackend, Pool
from balancer.strategies import PickContext
from tests.support.net import run_app

CLIENTS = 50
LIMIT = 4


class Counting:
    """A backend that measures its own concurrency: the truth about what it was sent."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.now = 0
        self.peak = 0
        self.served = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.now -= 1
            self.served += 1
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def make_pool(ports: list[int], **pool: Any) -> Pool:
    cfg = parse_config({"pools": {"web": {
        "backends": [f"http://127.0.0.1:{p}" for p in ports], **pool}}})
    pc = cfg.pools["web"]
    return Pool(pc, [Backend(b, "web", pc.max_connections) for b in pc.backends])


@pytest.fixture
async def two_backends() -> AsyncIterator[tuple[list[Counting], list[int]]]:
    servers = [Counting(), Counting()]
    async with run_app(servers[0].app()) as p0, run_app(servers[1].app()) as p1:
        yield servers, [p0, p1]


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
        two_backends: tuple[list[Counting], list[int]]) -> None:
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
        two_backends: tuple[list[Counting], list[int]]) -> None:
    servers, ports = two_backends
    cfg = {"backends": [{"url": f"http://127.0.0.1:{ports[0]}", "max_connections": 1},
                        f"http://127.0.0.1:{ports[1]}"], "max_connections": 3}
    pool = make_pool([], **cfg)
    await hammer(pool, 20, 5)
    assert servers[0].peak == 1 and servers[1].peak <= 3


async def test_no_slot_within_queue_timeout_is_rejected_as_overload(
        two_backends: tuple[list[Counting], list[int]]) -> None:
    servers, ports = two_backends
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
