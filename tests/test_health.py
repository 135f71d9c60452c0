"""Active health checks against real aiohttp backends on loopback, over real Pool objects."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from balancer.backend import Backend
from balancer.config import parse_config
from balancer.health import HealthChecker
from balancer.pool import Pool
from tests.support.net import free_port, run_app
from tests.support.traffic import Traffic
from tests.test_admin import (
    LiveBackend,
    Running,
    balancer_config,
    running,
    two_backend_pool,
)
from tests.test_monitor import Clock

INTERVAL = 0.2
UNHEALTHY = 3
HEALTHY = 2
#: Scheduling slack on a shared 2-core machine, on top of the bound the issue sets.
SLACK = 0.6


class Switchable:
    """A backend whose /healthz answers what the test says, and counts the probes it gets."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.probes = 0

    def app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            self.probes += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text="health")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        return app


def pools_for(spec: dict[str, Any], old: dict[str, Pool] | None = None) -> dict[str, Pool]:
    """Pools for ``spec`` (the ``pools`` mapping of a config), keeping Backend and Pool objects
    for servers in ``old`` as the app does on a reload."""
    cfg = parse_config({"pools": spec, "routes": [{"pool": next(iter(spec))}]})
    known = {(b.pool, b.key): b for p in (old or {}).values() for b in p.backends}
    pools = {}
    for name, pc in cfg.pools.items():
        members = []
        for bc in pc.backends:
            b = known.get((name, (bc.scheme, bc.host, bc.port)))
            if b is None:
                b = Backend(bc, name)
            else:
                b.reconfigure(bc, pc.max_connections)
            members.append(b)
        if old and name in old:
            old[name].update(pc, members)
            pools[name] = old[name]
        else:
            pools[name] = Pool(pc, members)
    return pools


def hc(**over: Any) -> dict[str, Any]:
    return {"path": "/healthz", "interval": INTERVAL, "timeout": 0.3,
            "healthy_threshold": HEALTHY, "unhealthy_threshold": UNHEALTHY, **over}


@pytest.fixture
async def backends() -> AsyncIterator[list[tuple[Switchable, int]]]:
    servers = [Switchable(), Switchable()]
    async with run_app(servers[0].app()) as p0, run_app(servers[1].app()) as p1:
        yield [(servers[0], p0), (servers[1], p1)]


async def wait_until(cond: Any, timeout: float, step: float = 0.02) -> float:
    """Seconds until ``cond()`` is true; fails after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def test_failing_backend_leaves_rotation_in_time_and_returns(
        backends: list[tuple[Switchable, int]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "balancer")
    (s0, p0), (_, p1) = backends
    pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}", f"http://127.0.0.1:{p1}"],
                               "health_check": hc()}})
    checker = HealthChecker()
    await checker.start(SimpleNamespace(pools=pools))
    try:
        pool = pools["web"]
        b0 = pool.backends[0]
        await wait_until(lambda: s0.probes >= 2, 5)
        assert b0.healthy
        s0.status = 500
        took = await wait_until(lambda: not b0.healthy, 10)
        # The bound: interval × unhealthy_threshold, plus one interval.
        assert took <= INTERVAL * (UNHEALTHY + 1) + SLACK
        assert b0.health_reason == "status 500"
        assert b0.state(time.monotonic()) == "down"
        assert not b0.available(time.monotonic())
        assert pool.backends[1].healthy
        s0.status = 200
        took = await wait_until(lambda: b0.healthy, 10)
        assert took <= INTERVAL * (HEALTHY + 1) + SLACK
        assert b0.health_reason == ""
    finally:
        await checker.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "balancer.health"]
    down = [m for m in lines if "DOWN" in m]
    up = [m for m in lines if "UP" in m]
    assert len(down) == 1 and "status 500" in down[0] and "pool web" in down[0]
    assert len(up) == 1


async def test_reasons_refused_and_timeout(backends: list[tuple[Switchable, int]]) -> None:
    (s0, p0), _ = backends
    dead = free_port()  # nothing listens there: connections are refused
    pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}",
                                            f"http://127.0.0.1:{dead}"],
                               "health_check": hc(timeout=0.15)}})
    checker = HealthChecker()
    await checker.start(SimpleNamespace(pools=pools))
    try:
        slow, refused = pools["web"].backends
        await wait_until(lambda: not refused.healthy, 10)
        assert refused.health_reason == "refused"
        s0.delay = 0.5
        await wait_until(lambda: not slow.healthy, 10)
        assert slow.health_reason == "timeout"
    finally:
        await checker.stop()


async def test_expect_status_is_honoured(backends: list[tuple[Switchable, int]]) -> None:
    (s0, p0), _ = backends
    s0.status = 204
    pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}", f"http://127.0.0.1:{free_port()}"],
                               "health_check": hc(expect_status=200)}})
    checker = HealthChecker()
    await checker.start(SimpleNamespace(pools=pools))
    try:
        b0 = pools["web"].backends[0]
        await wait_until(lambda: not b0.healthy, 10)
        assert b0.health_reason == "status 204"
    finally:
        await checker.stop()


async def test_panic_is_entered_when_health_checks_take_too_many_down(
        backends: list[tuple[Switchable, int]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "balancer.pool")
    (_, p0), (s1, p1) = backends
    pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}", f"http://127.0.0.1:{p1}"],
                               "health_check": hc(), "panic_threshold": 0.6}})
    checker = HealthChecker()
    await checker.start(SimpleNamespace(pools=pools))
    try:
        s1.status = 503
        pool = pools["web"]
        await wait_until(lambda: pool.panic, 10)  # 1 of 2 healthy < 60 %: logged at once
        assert any("panic" in r.getMessage() for r in caplog.records)
        s1.status = 200
        await wait_until(lambda: not pool.panic, 10)
    finally:
        await checker.stop()


async def test_reload_keeps_probe_state_starts_new_and_stops_removed(
        backends: list[tuple[Switchable, int]]) -> None:
    (s0, p0), (s1, p1) = backends
    pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}", f"http://127.0.0.1:{free_port()}"],
                               "health_check": hc()}})
    checker = HealthChecker()
    app = SimpleNamespace(pools=pools)
    await checker.start(app)
    try:
        b0, gone = pools["web"].backends
        s0.status = 500
        await wait_until(lambda: not b0.healthy, 10)
        # Reload: b0 stays (still failing, still down), the dead one leaves, p1 joins.
        app.pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}",
                                                    f"http://127.0.0.1:{p1}"],
                                       "health_check": hc()}}, pools)
        checker.on_reload(app)
        assert app.pools["web"].backends[0] is b0
        assert not b0.healthy, "a kept backend keeps its verdict across a reload"
        await wait_until(lambda: s1.probes >= 2, 5)
        assert gone not in checker._probes
        # A pool without health_check is not probed, and its backends count as healthy.
        app.pools = pools_for({"web": {"backends": [f"http://127.0.0.1:{p0}",
                                                    f"http://127.0.0.1:{p1}"]}}, app.pools)
        checker.on_reload(app)
        assert b0.healthy
        await asyncio.sleep(0.1)  # a probe already on the wire may still arrive
        before = s0.probes + s1.probes
        await asyncio.sleep(INTERVAL * 3)
        assert s0.probes + s1.probes == before
    finally:
        await checker.stop()


# --------------------------------------------------------------------------- passive health


def passive_pool(clock: Clock, n: int = 4, **od: Any) -> Pool:
    cfg = parse_config({"pools": {"web": {
        "backends": [f"http://127.0.0.1:{9000 + i}" for i in range(n)],
        "outlier_detection": {"consecutive_failures": 3, "base_ejection": 10,
                              "max_ejection": 60, "max_ejected_fraction": 0.5, **od}}}})
    pc = cfg.pools["web"]
    return Pool(pc, [Backend(b, "web") for b in pc.backends], clock=clock)


def fail(pool: Pool, b: Backend, times: int, error: str = "connect") -> None:
    for _ in range(times):
        pool.begin(b)
        pool.finish(b, error=error)


def test_consecutive_failures_eject_with_a_growing_then_forgiven_backoff() -> None:
    clock = Clock()
    pool = passive_pool(clock)
    b = pool.backends[0]
    fail(pool, b, 2)
    pool.begin(b)
    pool.finish(b, 200, 0.01)  # a success in between: the streak starts again
    fail(pool, b, 2)
    assert b.available(clock.now)
    fail(pool, b, 1)
    assert b.state(clock.now) == "ejected" and b.ejected_until == clock.now + 10
    # Each repeat doubles the ejection, up to max_ejection.
    durations = []
    for _ in range(4):
        clock.now = b.ejected_until + 1
        assert b.available(clock.now)
        fail(pool, b, 3)
        durations.append(b.ejected_until - clock.now)
    assert durations == [20, 40, 60, 60]
    # Well behaved for longer than max_ejection: the next ejection is short again.
    clock.now = b.ejected_until + 61
    fail(pool, b, 3)
    assert b.ejected_until - clock.now == 10
    assert b.errors["connect"] == 2 + 2 + 1 + 4 * 3 + 3  # every failure counted
    assert b.ejections == 1


def test_5xx_answers_count_as_failures_4xx_do_not() -> None:
    clock = Clock()
    pool = passive_pool(clock)
    b = pool.backends[1]
    for status in (502, 503, 404, 500, 500):
        pool.begin(b)
        pool.finish(b, status, 0.01)
    assert b.available(clock.now)
    pool.begin(b)
    pool.finish(b, 500, 0.01)
    assert not b.available(clock.now)
    assert b.requests_by_class[5] == 5 and b.requests_by_class[4] == 1


def test_never_more_than_the_configured_fraction_is_ejected() -> None:
    clock = Clock()
    pool = passive_pool(clock, n=4)  # max_ejected_fraction 0.5: at most 2 of 4
    for b in pool.backends:
        fail(pool, b, 3, "reset")
    assert [b.state(clock.now) for b in pool.backends].count("ejected") == 2
    # When one comes back, another failing backend may take its place.
    first = next(b for b in pool.backends if b.ejected_until > clock.now)
    clock.now = first.ejected_until + 0.1
    third = next(b for b in pool.backends if b.ejected_until == 0)
    fail(pool, third, 3, "reset")
    assert third.state(clock.now) == "ejected"


# --------------------------------------------------------------------------- through the proxy


async def test_through_the_proxy_a_failing_backend_leaves_rotation_and_returns(
        tmp_path: Path) -> None:
    a, b = LiveBackend("a"), LiveBackend("b")
    # a fails by status (at once), so a long probe timeout costs nothing here; it keeps b's
    # probes from timing out on a loaded machine (b down too would be panic: traffic to a).
    data = balancer_config(two_backend_pool(a, b, health_check=hc(timeout=1.0)))
    async with running(tmp_path, [a, b], data) as run, Traffic(run.port) as clients:
        assert set(await clients.sample(20)) == {"a", "b"}
        a.health = 500
        start = time.monotonic()
        await run.until(lambda: _state(run, "a", "down"), "a marked down")
        assert time.monotonic() - start <= INTERVAL * (UNHEALTHY + 1) + SLACK + 0.3  # + polling
        assert set(await clients.sample(30)) == {"b"}, "a down takes no traffic"
        assert (await run.backend_status("web", "a"))["health_reason"] == "status 500"
        m = await run.metrics()
        assert m[("balancer_backend_up", (("backend", "a"), ("pool", "web")))] == 0
        a.health = 200
        await run.until(lambda: _state(run, "a", "up"), "a back up")
        assert set(await clients.sample(20)) == {"a", "b"}
        assert clients.failures == []
    assert "backend a is DOWN" in run.proc.log and "backend a is UP again" in run.proc.log


async def _state(run: Running, name: str, state: str) -> bool:
    return (await run.backend_status("web", name))["state"] == state


async def test_refusing_backend_under_live_traffic_is_ejected_without_client_errors(
        tmp_path: Path) -> None:
    backends = [LiveBackend("a"), LiveBackend("b"), LiveBackend("c")]
    data = balancer_config({"web": {
        "backends": [x.entry() for x in backends],
        "outlier_detection": {"consecutive_failures": 3, "base_ejection": "30s"}}})
    async with running(tmp_path, backends, data) as run, Traffic(run.port, workers=6) as clients:
        assert set(await clients.sample(30)) == {"a", "b", "c"}
        await backends[2].stop()  # c now refuses connections (and dropped its keep-alives)
        await run.until(lambda: _state(run, "c", "ejected"), "c ejected")
        assert set(await clients.sample(40)) == {"a", "b"}
        # Idempotent requests were retried on another backend: no client saw an error.
        assert clients.failures == []
        c = await run.backend_status("web", "c")
        assert c["ejections"] == 1 and c["errors"] >= 3
        m = await run.metrics()
        errs = sum(v for (name, lv), v in m.items() if name == "balancer_upstream_errors_total"
                   and ("backend", "c") in lv)
        assert errs >= 3
    assert "backend c ejected" in run.proc.log


async def test_panic_spreads_over_all_three_when_two_are_down(tmp_path: Path) -> None:
    backends = [LiveBackend("a"), LiveBackend("b"), LiveBackend("c")]
    data = balancer_config({"web": {"backends": [x.entry() for x in backends],
                                    "health_check": hc(), "panic_threshold": 0.5}})
    async with running(tmp_path, backends, data) as run, Traffic(run.port) as clients:
        # One of three down: 2/3 healthy is above the threshold, the down one gets nothing.
        backends[0].health = 500
        await run.until(lambda: _state(run, "a", "down"), "a down")
        assert set(await clients.sample(30)) == {"b", "c"}
        # Two of three down: below 50 %, so rather than crush c, spread over all three.
        backends[1].health = 500
        await run.until(lambda: _state(run, "b", "down"), "b down")
        seen = await clients.sample(90)
        assert set(seen) == {"a", "b", "c"} and min(seen.values()) >= 15, seen
        m = await run.metrics()
        assert m[("balancer_pool_panic", (("pool", "web"),))] == 1
        assert (await run.status())["pools"]["web"]["panic"] is True
        backends[0].health = backends[1].health = 200
        await run.until(lambda: _state(run, "a", "up"), "a up")
        await run.until(lambda: _state(run, "b", "up"), "b up")
        m = await run.metrics()
        assert m[("balancer_pool_panic", (("pool", "web"),))] == 0
        assert clients.failures == []
    assert "panic: only 1 of 3 backends healthy" in run.proc.log
