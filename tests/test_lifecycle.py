"""Lifecycle without losing requests: reload on SIGHUP, drain on SIGTERM, state kept across.

The proxy runs as a real subprocess (real signals, real exit codes) in front of real aiohttp
backends served from the test's own event loop; clients are real aiohttp clients. The
in-process tests drive ``App`` directly where the test must look at live objects.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer.app import App
from tests.support.net import free_port, name_app, run_app
from tests.support.proc import BalancerProcess, pool_config, write_config
from tests.support.traffic import Traffic

WAIT = 10.0


# --------------------------------------------------------------------------- helpers


async def _backends(stack: AsyncExitStack, n: int) -> list[int]:
    """``n`` name-answering backends; each answers with ``b<port>``."""
    ports = [free_port() for _ in range(n)]
    for p in ports:
        await stack.enter_async_context(run_app(name_app(f"b{p}"), port=p))
    return ports


def _config(listen: int, ports: list[int], weights: dict[int, int] | None = None,
            **top: Any) -> dict[str, Any]:
    pool = pool_config(ports)
    for b in pool["backends"]:
        port = int(b["url"].rsplit(":", 1)[1])
        if weights and port in weights:
            b["weight"] = weights[port]
    return {"listen": f"127.0.0.1:{listen}", "admin": f"127.0.0.1:{free_port()}",
            "pools": {"web": pool}, **top}


class SlowBackend:
    """``/slow`` answers after ``delay`` seconds; ``/hang`` when the test releases it (or 30 s)."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def slow(request: web.Request) -> web.Response:
            self.started.set()
            await asyncio.sleep(self.delay)
            return web.Response(text="slow done")

        async def hang(request: web.Request) -> web.Response:
            self.started.set()
            try:
                await asyncio.wait_for(self.release.wait(), 30)
            except TimeoutError:
                pass
            return web.Response(text="released")

        app = web.Application()
        app.router.add_get("/slow", slow)
        app.router.add_get("/hang", hang)
        return app


async def _slow_setup(stack: AsyncExitStack, tmp_path: Path, **top: Any
                      ) -> tuple[SlowBackend, BalancerProcess, int]:
    slow = SlowBackend()
    ports = [free_port(), free_port()]
    for p in ports:
        await stack.enter_async_context(run_app(slow.app(), port=p))
    stack.callback(slow.release.set)  # runs before the backends stop: no handler left hanging
    listen = free_port()
    cfg = write_config(tmp_path / "slow.yaml", _config(listen, ports, **top))
    proc = await stack.enter_async_context(BalancerProcess(cfg))
    return slow, proc, listen


async def _started_app(stack: AsyncExitStack, cfg: Path) -> App:
    """An App serving ``cfg`` in this process, drained when the stack closes."""
    app = App(str(cfg))
    await app.start()
    stack.push_async_callback(app.drain, 1.0)
    return app


async def _session(stack: AsyncExitStack) -> aiohttp.ClientSession:
    return await stack.enter_async_context(
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)))


async def _connect_refused(port: int) -> bool:
    """Whether a new TCP connection to ``port`` is refused (retrying briefly)."""
    for _ in range(25):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await asyncio.sleep(0.02)
    return False


# --------------------------------------------------------------------------- reload (SIGHUP)


async def test_sighup_applies_good_config_and_refuses_concentrated_without_a_failed_request(
        tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        a, b, c = await _backends(stack, 3)
        listen = free_port()
        cfg = write_config(tmp_path / "web.yaml", _config(listen, [a, b]))
        proc = await stack.enter_async_context(BalancerProcess(cfg))
        async with Traffic(listen) as traffic:
            assert set(await traffic.sample(20)) == {f"b{a}", f"b{b}"}

            # A good config adds a backend: traffic reaches it.
            write_config(cfg, _config(listen, [a, b, c]))
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            await proc.wait_for("reload applied", since=mark)
            assert set(await traffic.sample(30)) == {f"b{a}", f"b{b}", f"b{c}"}

            # A concentrated config (one backend at 80%) is refused: the log names the
            # problem and the old, even config keeps serving.
            write_config(cfg, _config(listen, [a, b, c], weights={a: 8}))
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            await proc.wait_for("reload refused", since=mark)
            refused = "\n".join(proc.lines_since(mark))
            assert f"b{a}" in refused and "web" in refused, refused
            spread = await traffic.sample(60)
            assert set(spread) == {f"b{a}", f"b{b}", f"b{c}"}
            # 1/3 expected; 4/5 had the refusal applied. The sample holds at least 60 answers
            # (more arrive while it is read), so the bound is relative to what it holds.
            assert spread[f"b{a}"] <= sum(spread.values()) / 2, spread

            # Removing a backend: once applied, no new request goes to it.
            write_config(cfg, _config(listen, [b, c]))
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            await proc.wait_for("reload applied", since=mark)
            await traffic.sample(20)  # lets requests picked before the swap finish
            assert set(await traffic.sample(40)) == {f"b{b}", f"b{c}"}

        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.total > 100
        proc.send(signal.SIGTERM)
        assert await proc.wait_exit() == 0


async def _get(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as r:
        assert r.status == 200
        return r.headers.get("X-Backend", "")


async def test_reload_keeps_backend_objects_state_and_counters(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        a, b, c = await _backends(stack, 3)
        listen = free_port()
        cfg = write_config(tmp_path / "web.yaml", _config(listen, [a, b]))
        app = await _started_app(stack, cfg)
        session = await _session(stack)
        url = f"http://127.0.0.1:{listen}/"
        for _ in range(10):
            await _get(session, url)
        pool = app.pools["web"]
        ba, bb = pool.backends
        assert (ba.requests_total, bb.requests_total) == (5, 5)
        upstream_a = ba.connections
        assert upstream_a is not None  # the proxy pooled connections to it
        ba.healthy = False  # as the health checker would: a live state a reload must keep

        write_config(cfg, _config(listen, [a, b, c], weights={b: 2}))
        result = await app.reload()
        assert result.applied and result.problems == []
        assert app.reloads == {"applied": 1, "refused": 0}
        assert app.pools["web"] is pool
        new_a, new_b, new_c = pool.backends
        assert new_a is ba and new_b is bb  # same objects: state, counters, connections
        assert ba.connections is upstream_a and ba.requests_total == 5 and not ba.healthy
        assert bb.weight == 2 and new_c.requests_total == 0
        # The kept state is live: the unhealthy backend still gets nothing.
        answered = Counter([await _get(session, url) for _ in range(40)])
        assert set(answered) == {f"b{b}", f"b{c}"} and answered[f"b{b}"] > answered[f"b{c}"]

        # Removing a backend: it drains, and its upstream connections are closed.
        write_config(cfg, _config(listen, [b, c]))
        assert (await app.reload()).applied
        assert ba.draining and ba not in app.pools["web"].backends
        async with asyncio.timeout(WAIT):
            while not upstream_a.closed:
                await asyncio.sleep(0.01)
        assert not upstream_a.idle
        assert {await _get(session, url) for _ in range(6)} == {f"b{b}", f"b{c}"}
        assert ba.requests_total == 5


async def test_refused_and_invalid_reloads_change_nothing(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _backends(stack, 2)
        listen = free_port()
        cfg = write_config(tmp_path / "web.yaml", _config(listen, [a, b]))
        app = await _started_app(stack, cfg)
        before = (app.config, app.report, app.pools["web"], app.state.router)

        write_config(cfg, _config(listen, [a]))
        refused = await app.reload()
        assert not refused.applied
        assert refused.problems and any("web" in p for p in refused.problems)
        cfg.write_text("pools: {web: {backends: [{url: http://127.0.0.1:1, weight: -3}]}}\n")
        invalid = await app.reload()
        assert not invalid.applied
        assert "pools.web.backends[0].weight: must be >= 0, got -3" in invalid.problems
        assert app.reloads == {"applied": 0, "refused": 2}
        assert (app.config, app.report, app.pools["web"], app.state.router) == before


# --------------------------------------------------------------------------- drain (SIGTERM)


async def test_sigterm_finishes_in_flight_request_refuses_new_ones_and_exits_0(
        tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        slow, proc, listen = await _slow_setup(stack, tmp_path)
        session = await _session(stack)

        async def fetch(path: str) -> tuple[int, str]:
            async with session.get(f"http://127.0.0.1:{listen}{path}") as r:
                return r.status, await r.text()

        # A request the backend answers only when the test says so: no race with the clock.
        request = asyncio.create_task(fetch("/hang"))
        await asyncio.wait_for(slow.started.wait(), WAIT)
        mark = proc.mark()
        proc.send(signal.SIGTERM)
        await proc.wait_for("draining", since=mark)
        assert await _connect_refused(listen)
        assert proc.returncode is None and not request.done()  # refused while draining
        slow.release.set()
        assert await asyncio.wait_for(request, WAIT) == (200, "released")
        assert await proc.wait_exit() == 0
        assert "drain timeout" not in proc.log


async def test_sigterm_lets_a_slow_request_finish(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        slow, proc, listen = await _slow_setup(stack, tmp_path)
        session = await _session(stack)
        request = asyncio.create_task(session.get(f"http://127.0.0.1:{listen}/slow"))
        await asyncio.wait_for(slow.started.wait(), WAIT)
        proc.send(signal.SIGTERM)  # the backend is 1 s into answering
        response = await asyncio.wait_for(request, WAIT)
        assert response.status == 200 and await response.text() == "slow done"
        assert await proc.wait_exit() == 0


async def test_drain_timeout_bounds_a_request_that_never_finishes(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        slow, proc, listen = await _slow_setup(stack, tmp_path, drain_timeout="300ms")
        session = await _session(stack)
        request = asyncio.create_task(session.get(f"http://127.0.0.1:{listen}/hang"))
        await asyncio.wait_for(slow.started.wait(), WAIT)
        proc.send(signal.SIGTERM)
        # The backend would hang for 30 s; the drain gives up after 0.3 s and exits cleanly.
        assert await proc.wait_exit(timeout=WAIT) == 0
        assert "drain timeout" in proc.log
        with pytest.raises(aiohttp.ClientError):
            response = await asyncio.wait_for(request, WAIT)
            await response.read()


async def test_second_signal_during_drain_exits_at_once(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        slow, proc, listen = await _slow_setup(stack, tmp_path)  # drain_timeout: 30 s
        session = await _session(stack)
        request = asyncio.create_task(session.get(f"http://127.0.0.1:{listen}/hang"))
        await asyncio.wait_for(slow.started.wait(), WAIT)
        mark = proc.mark()
        proc.send(signal.SIGTERM)
        await proc.wait_for("draining", since=mark)
        proc.send(signal.SIGINT)
        assert await proc.wait_exit(timeout=WAIT) == 128 + signal.SIGINT
        assert "exiting now" in proc.log
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)


async def test_removed_pool_leaves_the_router_and_its_backends_drain(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        a, b, c, d = await _backends(stack, 4)
        listen = free_port()
        both = _config(listen, [a, b])
        both["pools"]["api"] = pool_config([c, d])
        both["routes"] = [{"path_prefix": "/api", "pool": "api"}, {"pool": "web"}]
        cfg = write_config(tmp_path / "two.yaml", both)
        app = await _started_app(stack, cfg)
        session = await _session(stack)
        api_url = f"http://127.0.0.1:{listen}/api/users"
        assert {await _get(session, api_url) for _ in range(4)} == {f"b{c}", f"b{d}"}
        api = app.pools["api"]

        write_config(cfg, _config(listen, [a, b]))
        assert (await app.reload()).applied
        assert "api" not in app.pools
        assert all(backend.draining for backend in api.backends)
        # /api now falls through to the catch-all route of the new config.
        assert {await _get(session, api_url) for _ in range(4)} == {f"b{a}", f"b{b}"}
