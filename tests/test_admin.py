"""The admin app over real sockets: /status, /metrics, /healthz, / and POST /reload with auth.

These tests serve the admin app for a small stand-in of the App (real config, real Pool and
Backend objects, a reload() whose answer the test chooses); the tests at the end run the whole
balancer as a subprocess and use its admin address the way an operator would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import pytest

from balancer.admin import AdminServer
from balancer.backend import Backend
from balancer.config import parse_config
from balancer.monitor import Monitor
from balancer.pool import Pool
from tests.support.net import free_port


@dataclass
class Result:
    applied: bool
    problems: list[str] = field(default_factory=list)
    diff: str = ""


class StandIn:
    """What admin.py reads from the App: config, pools, reloads, started_at, reload()."""

    def __init__(self, token: str | None = None) -> None:
        data: dict[str, Any] = {
            "admin": f"127.0.0.1:{free_port()}",
            "pools": {"web": {"strategy": "round_robin", "max_connections": 8, "backends": [
                {"url": "http://127.0.0.1:9001", "name": "web1", "weight": 2},
                {"url": "http://127.0.0.1:9002", "name": "web2"},
                {"url": "http://127.0.0.1:9003", "name": "spare", "backup": True}]}}}
        if token:
            data["admin_token"] = token
        self.config = parse_config(data)
        pc = self.config.pools["web"]
        self.pools = {"web": Pool(pc, [Backend(b, "web", pc.max_connections)
                                       for b in pc.backends])}
        self.reloads = {"applied": 0, "refused": 0}
        self.started_at = time.time() - 5
        self.config_path = "stand-in.yaml"
        self.next: Result = Result(True, diff="web1 50% → 50%")
        self.reload_calls = 0

    async def reload(self) -> Result:
        self.reload_calls += 1
        self.reloads["applied" if self.next.applied else "refused"] += 1
        return self.next


@pytest.fixture
async def admin(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StandIn, str]]:
    app = StandIn(getattr(request, "param", None))
    monitor = Monitor()
    server = AdminServer(monitor)
    await server.start(app)
    try:
        assert server.address is not None
        yield app, f"http://{server.address}"
    finally:
        await server.stop()


async def test_status_describes_every_pool_and_backend(admin: tuple[StandIn, str]) -> None:
    app, base = admin
    pool = app.pools["web"]
    web1, web2, spare = pool.backends
    pool.begin(web1)
    pool.finish(web1, 200, 0.01)
    pool.begin(web1)
    web2.healthy, web2.health_reason = False, "refused"
    async with aiohttp.ClientSession() as s, s.get(f"{base}/status") as resp:
        assert resp.status == 200
        doc = await resp.json()
    p = doc["pools"]["web"]
    assert p["strategy"] == "round_robin"
    assert p["panic"] is False  # 1 of 2 primaries up is not below panic_threshold 0.5
    by_name = {b["name"]: b for b in p["backends"]}
    assert list(by_name) == ["web1", "web2", "spare"]
    assert by_name["web1"] == {**by_name["web1"], "url": "http://127.0.0.1:9001", "weight": 2,
                               "state": "up", "in_flight": 1, "requests": 1,
                               "max_connections": 8}
    assert by_name["web2"]["state"] == "down" and by_name["web2"]["health_reason"] == "refused"
    assert by_name["spare"]["state"] == "backup"
    assert {"share", "errors", "ejections"} <= set(by_name["web1"])
    assert p["concentrated"] is None and p["rejected"] == {"no_backend": 0, "overload": 0}
    assert doc["reloads"] == {"applied": 0, "refused": 0} and doc["uptime"] >= 5
    assert doc["guard"]["max_share"] == 0.5


async def test_metrics_healthz_and_dashboard(admin: tuple[StandIn, str]) -> None:
    _, base = admin
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        assert 'balancer_backend_up{backend="web1",pool="web"} 1.0' in text
        async with s.get(f"{base}/healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        async with s.get(f"{base}/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            html = await resp.text()
        assert "static/dashboard.js" in html and "http://" not in html.split("<body>")[0]
        for asset in ("static/dashboard.js", "static/dashboard.css"):
            async with s.get(f"{base}/{asset}") as resp:
                assert resp.status == 200, asset


async def test_reload_applied_is_200_with_the_diff_refused_is_409(
        admin: tuple[StandIn, str]) -> None:
    app, base = admin
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/reload") as resp:
            assert resp.status == 200
            assert await resp.json() == {"applied": True, "diff": "web1 50% → 50%"}
        app.next = Result(False, ["pools.web: b1 would take 90% (max_share 50%)"], "diff")
        async with s.post(f"{base}/reload") as resp:
            assert resp.status == 409
            body = await resp.json()
        assert body["applied"] is False and "90%" in body["problems"][0]
        async with s.get(f"{base}/reload") as resp:
            assert resp.status == 405  # mutating only by POST
    assert app.reloads == {"applied": 1, "refused": 1}


@pytest.mark.parametrize("admin", ["s3cret-token"], indirect=True)
async def test_admin_token_guards_mutating_endpoints(admin: tuple[StandIn, str]) -> None:
    app, base = admin
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic s3cret-token"}):
            async with s.post(f"{base}/reload", headers=headers) as resp:
                assert resp.status == 401, headers
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert app.reload_calls == 0
        async with s.post(f"{base}/reload",
                          headers={"Authorization": "Bearer s3cret-token"}) as resp:
            assert resp.status == 200
        # Reading needs no token.
        async with s.get(f"{base}/status") as resp:
            assert resp.status == 200
    assert app.reload_calls == 1


async def test_admin_address_in_use_is_an_error_at_start() -> None:
    app = StandIn()
    first, second = AdminServer(), AdminServer()
    await first.start(app)
    try:
        with pytest.raises(OSError):
            await second.start(app)
    finally:
        await first.stop()
