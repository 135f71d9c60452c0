"""Probation and automatic rollback (issue 9), through a real ``balancer run`` subprocess in
front of real aiohttp backends, with real clients.

The traps are the ones the guard cannot see in the file: a hash key clients never send and a
health-check path only one backend serves. Each passes the guard, is applied, concentrates
the pool, and must be undone by itself within the probation window, loudly. A change that does
not concentrate is kept with nothing dropped, and a concentration that is not the change's
doing (a backend dies during probation) is not rolled back.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.net import free_port, run_app
from tests.support.proc import BalancerProcess, write_config
from tests.support.traffic import Traffic, until

pytestmark = pytest.mark.slow

PROBATION = "8s"


def health_app(name: str, healthy_paths: set[str]) -> web.Application:
    """Answers every path with ``name``; health paths answer 200 only if in ``healthy_paths``
    (``/healthz`` for all, ``/only-one`` for one: the maintenance change of the postmortem)."""

    async def handle(request: web.Request) -> web.Response:
        if request.path in ("/healthz", "/only-one"):
            ok = request.path in healthy_paths
            return web.Response(status=200 if ok else 404, text="ok" if ok else "no")
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class Backends:
    """Three real backends ``b<port>``; the first also serves ``/only-one``; any can stop."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self._stacks: dict[int, AsyncExitStack] = {}

    async def start(self, n: int = 3) -> None:
        for i in range(n):
            port = free_port()
            paths = {"/healthz", "/only-one"} if i == 0 else {"/healthz"}
            stack = AsyncExitStack()
            await stack.enter_async_context(run_app(health_app(f"b{port}", paths), port=port))
            self._stacks[port] = stack
            self.ports.append(port)

    async def stop(self, port: int) -> None:
        await self._stacks.pop(port).aclose()

    async def close(self) -> None:
        for stack in self._stacks.values():
            await stack.aclose()


def config(listen: int, admin: int, ports: list[int], **pool: Any) -> dict[str, Any]:
    guard = {"probation": PROBATION, "live_min_requests": 30, "live_window": "5s"}
    body: dict[str, Any] = {
        "backends": [{"url": f"http://127.0.0.1:{p}", "name": f"b{p}"} for p in ports],
        "health_check": {"path": "/healthz", "interval": "200ms", "timeout": "1s",
                         "healthy_threshold": 1, "unhealthy_threshold": 2},
        "panic_threshold": 0.3,
        **pool}
    return {"listen": f"127.0.0.1:{listen}", "admin": f"127.0.0.1:{admin}",
            "guard": guard, "pools": {"web": body}}


@asynccontextmanager
async def stack_of(tmp_path: Path, *args: str, **pool: Any) -> AsyncIterator[
        tuple[Backends, BalancerProcess, Path, int, str]]:
    backends = Backends()
    await backends.start()
    listen, admin = free_port(), free_port()
    path = write_config(tmp_path / "balancer.yaml", config(listen, admin, backends.ports, **pool))
    try:
        async with BalancerProcess(path, *args) as proc:
            yield backends, proc, path, listen, f"http://127.0.0.1:{admin}"
    finally:
        await backends.close()


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def metric(admin: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{admin}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


async def reload_and_wait(admin: str) -> tuple[int, dict[str, Any]]:
    """POST /reload?wait=1: the answer comes when the probation ends."""
    async with aiohttp.ClientSession() as s, s.post(f"{admin}/reload?wait=1",
                                                    timeout=aiohttp.ClientTimeout(30)) as r:
        return r.status, await r.json()


# --------------------------------------------------------------------------- the traps


@pytest.mark.parametrize("key", ["header:X-Tenant", "header:Host", "path"])
async def test_a_hash_key_that_collapses_on_real_traffic_is_rolled_back_within_probation(
        tmp_path: Path, key: str) -> None:
    """Accepted by the guard (its synthetic clients send X-Tenant, many hosts, many paths);
    ours send no X-Tenant, one Host (a one-domain site) and only ``/``."""
    async with stack_of(tmp_path) as (backends, proc, path, listen, admin):
        cfg = config(listen, int(admin.rsplit(":", 1)[1]), backends.ports)
        async with Traffic(listen) as traffic:
            assert len(await traffic.sample(30)) == 3
            before = path.read_bytes()
            cfg["pools"]["web"]["strategy"] = {"name": "consistent_hash", "key": key}
            write_config(path, cfg)
            mark = proc.mark()
            status, doc = await reload_and_wait(admin)
            assert status == 409, doc
            assert doc["result"] == "rolled_back" and doc["applied"] is True
            line = await proc.wait_for("reload rolled back", since=mark)
            m = re.search(r"reload rolled back: pool web: (b\d+) took 100% of (\d+) requests "
                          r"\(max_share 50%\)", line)
            assert m is not None, line
            assert doc["reason"] in line
            # Traffic spreads again, and nothing was lost on the way.
            assert len(await traffic.sample(30)) == 3
            assert traffic.failures == []
        assert await metric(admin, "balancer_config_rollbacks_total") == 1
        status_doc = await get_json(f"{admin}/status")
        last = status_doc["last_reload"]
        assert last["result"] == "rolled_back" and "took 100%" in last["reason"]
        assert last["at"].endswith("Z")
        # What runs is the previous config, not the file on disk: GET /config says which.
        async with aiohttp.ClientSession() as s, s.get(f"{admin}/config") as r:
            running, sha = await r.text(), r.headers["X-Config-SHA256"]
        assert sha == status_doc["config_sha256"] == hashlib.sha256(before).hexdigest()
        assert running.encode() == before != path.read_bytes()
        assert "consistent_hash" not in running


async def test_a_health_check_path_only_one_backend_serves(tmp_path: Path) -> None:
    """Told first (probation off: the metric, /status, one warning), then undone (on)."""
    async with stack_of(tmp_path) as (backends, proc, path, listen, admin):
        port = int(admin.rsplit(":", 1)[1])
        first = f"b{backends.ports[0]}"
        cfg = config(listen, port, backends.ports)
        cfg["guard"]["probation"] = 0
        cfg["pools"]["web"]["health_check"]["path"] = "/only-one"
        write_config(path, cfg)
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        line = await proc.wait_for("backends down", since=mark)
        assert f"pool web: 2 of 3 backends down (health check): all traffic on {first}" in line
        assert await metric(admin, 'balancer_pool_concentrated{pool="web"}') == 1
        assert await metric(admin, 'balancer_pool_too_few_in_rotation{pool="web"}') == 1
        conc = (await get_json(f"{admin}/status"))["pools"]["web"]["concentrated"]
        assert conc["cause"] == "rotation" and first in conc["reason"]
        async with Traffic(listen) as traffic:
            assert set(await traffic.sample(30)) == {first}

        # Back to the good file: it clears. Then the same change with probation on.
        write_config(path, config(listen, port, backends.ports))
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        await proc.wait_for("concentration cleared", since=mark, timeout=20)
        cfg["guard"]["probation"] = PROBATION
        write_config(path, cfg)
        mark = proc.mark()
        async with Traffic(listen) as traffic:
            status, doc = await reload_and_wait(admin)
            assert status == 409 and doc["result"] == "rolled_back", doc
            assert "2 of 3 backends down (health check)" in doc["reason"]
            await proc.wait_for("reload rolled back: pool web: 2 of 3 backends down", since=mark)
            # The previous health check takes the two back: all three serve again.
            sample = await traffic.sample(60)
            await until(lambda: len(traffic.seen) == 3, "traffic spread over three again")
            assert traffic.failures == [], traffic.failures
        assert sample  # the load ran throughout
        assert await metric(admin, "balancer_config_rollbacks_total") == 1


# --------------------------------------------------------------------------- kept


async def test_a_change_that_spreads_is_kept_under_load_with_nothing_dropped(
        tmp_path: Path) -> None:
    async with stack_of(tmp_path) as (backends, proc, path, listen, admin):
        cfg = config(listen, int(admin.rsplit(":", 1)[1]), backends.ports)
        cfg["pools"]["web"]["strategy"] = "least_connections"
        write_config(path, cfg)
        async with Traffic(listen, workers=8) as traffic:
            status, doc = await reload_and_wait(admin)
            assert status == 200 and doc["result"] == "kept", doc
            total = traffic.total
        assert total > 100 and traffic.failures == [], traffic.failures[:5]
        assert "reload kept" in proc.log
        assert await metric(admin, "balancer_config_rollbacks_total") == 0
        events = (await get_json(f"{admin}/status"))["reload_events"]
        assert [e["result"] for e in events] == ["applied", "kept"]


async def test_a_backend_dying_during_probation_is_not_the_change_and_is_not_rolled_back(
        tmp_path: Path) -> None:
    """Two of three die after a harmless change: too few in rotation, but the previous config
    would be as short (its health check fails them too), so the change is kept."""
    async with stack_of(tmp_path) as (backends, proc, path, listen, admin):
        cfg = config(listen, int(admin.rsplit(":", 1)[1]), backends.ports)
        cfg["pools"]["web"]["retries"] = 1  # harmless
        write_config(path, cfg)
        mark = proc.mark()
        waiting = asyncio.ensure_future(reload_and_wait(admin))
        await proc.wait_for("reload on probation", since=mark)
        for port in backends.ports[1:]:
            await backends.stop(port)
        line = await proc.wait_for("not rolling back", since=mark, timeout=20)
        assert "previous config would be short of backends too" in line
        status, doc = await waiting
        assert status == 200 and doc["result"] == "kept", doc
        assert "reload rolled back" not in proc.log


async def test_watch_does_not_reapply_rolled_back_content_until_it_changes(
        tmp_path: Path) -> None:
    async with stack_of(tmp_path, "--watch") as (backends, proc, path, listen, admin):
        cfg = config(listen, int(admin.rsplit(":", 1)[1]), backends.ports)
        cfg["pools"]["web"]["strategy"] = {"name": "consistent_hash", "key": "header:X-Tenant"}
        async with Traffic(listen) as traffic:
            mark = proc.mark()
            write_config(path, cfg)
            await proc.wait_for("reload rolled back", since=mark, timeout=25)
            after = proc.mark()
            await asyncio.sleep(3)  # three looks at the unchanged file
            assert not [x for x in proc.lines_since(after) if "changed: reloading" in x]
            # A real edit is tried again.
            cfg["pools"]["web"]["strategy"] = "round_robin"
            write_config(path, cfg)
            await proc.wait_for("reload applied", since=after)
            assert traffic.failures == []
