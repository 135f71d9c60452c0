"""The admin app over real sockets: /status, /metrics, /healthz, / and POST /reload with auth.

These tests serve the admin app for a small stand-in of the App (real config, real Pool and
Backend objects, a reload() whose answer the test chooses); the tests at the end run the whole
balancer as a subprocess and use its admin address the way an operator would.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from balancer.admin import AdminServer
from balancer.appview import AppView
from balancer.backend import Backend
from balancer.config import parse_config
from balancer.guard import GuardReport
from balancer.monitor import Monitor
from balancer.pool import Pool
from tests.support.net import free_port
from tests.support.proc import BalancerProcess, write_config

#: Every wait in the end-to-end tests gives up after this long (seconds).
WAIT = 15.0


@dataclass
class Result:
    applied: bool
    problems: list[str] = field(default_factory=list)
    diff: str = ""
    probation: Any = None  # an applied reload's probation outcome (App.reload); none here


class StandIn:
    """What admin.py reads from the App (balancer/appview.py AppView), with no proxy and no
    record of the running config's text or of past reloads."""

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
        self.report = GuardReport()
        self.state = None  # no proxy
        self.rollbacks = 0
        self.reload_events: list[dict[str, Any]] = []
        self.probation: dict[str, Any] | None = None
        self.config_text: str | None = None  # no record of the text as read
        self.config_sha256: str | None = None
        self.config_applied_at: float | None = None
        self.workers: tuple[dict[str, Any], ...] = ()  # one process
        self.next: Result = Result(True, diff="web1 50% → 50%")
        self.reload_calls = 0

    async def reload(self) -> Result:
        self.reload_calls += 1
        self.reloads["applied" if self.next.applied else "refused"] += 1
        return self.next

    async def compute(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def apply_change(self, change: Any, source: object = None) -> bool:
        return False  # no discovery here


def test_the_stand_in_is_what_the_services_read() -> None:
    assert isinstance(StandIn(), AppView)


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
    web1, web2, _spare = pool.backends
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
            assert await resp.json() == {"applied": True, "result": "applied",
                                        "diff": "web1 50% → 50%"}
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


# --------------------------------------------------------------------------- end to end
# Helpers shared by the end-to-end tests of health, overload, metrics and the monitor: real
# backends the test steers, the real balancer as a subprocess, real clients.


class LiveBackend:
    """A loopback backend the test steers: answers its name (``/code/NNN`` answers NNN),
    ``/healthz`` with ``health``; counts what it served and its own peak concurrency."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.health = 200
        self.served: Counter[int] = Counter()  # status → count, probes excluded
        self.now = 0
        self.peak = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entry(self, **extra: Any) -> dict[str, Any]:
        return {"url": self.url, "name": self.name, **extra}

    def app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            return web.Response(status=self.health, text=self.name)

        async def handle(request: web.Request) -> web.Response:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
            finally:
                self.now -= 1
            parts = request.path.split("/")
            status = int(parts[2]) if len(parts) > 2 and parts[1] == "code" else 200
            self.served[status] += 1
            return web.Response(status=status, text=self.name, headers={"X-Backend": self.name})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening and close its connections: new connections are refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Running:
    """The balancer subprocess, its config file, and clients for its proxy and admin ports."""

    def __init__(self, proc: BalancerProcess, path: Path, data: dict[str, Any],
                 session: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.path = path
        self.data = data
        self.session = session
        self.port = int(data["listen"].rsplit(":", 1)[1])
        self.url = f"http://{data['listen']}"
        self.admin = f"http://{data['admin']}"

    async def get(self, path: str = "/") -> tuple[int, str, dict[str, str]]:
        async with self.session.get(self.url + path) as r:
            return r.status, await r.text(), dict(r.headers)

    async def status(self) -> dict[str, Any]:
        async with self.session.get(f"{self.admin}/status") as r:
            assert r.status == 200
            return await r.json()

    async def backend_status(self, pool: str, name: str) -> dict[str, Any]:
        doc = await self.status()
        return next(b for b in doc["pools"][pool]["backends"] if b["name"] == name)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics as {(name, sorted labels): value}."""
        async with self.session.get(f"{self.admin}/metrics") as r:
            text = await r.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    async def reload(self, data: dict[str, Any], token: str | None = None
                     ) -> tuple[int, dict[str, Any]]:
        """Write ``data`` as the new config and POST /reload; (status, JSON answer)."""
        self.data = data
        write_config(self.path, data)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.post(f"{self.admin}/reload", headers=headers) as r:
            return r.status, await r.json()

    async def until(self, cond: Any, what: str, timeout: float = WAIT) -> Any:
        """Poll the async ``cond()`` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}\n{self.proc.log[-3000:]}")
            await asyncio.sleep(0.05)


def balancer_config(pools: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A config on fresh loopback ports for ``pools``."""
    return {"listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
            "pools": pools, **top}


@asynccontextmanager
async def running(tmp_path: Path, backends: list[LiveBackend], data: dict[str, Any]
                  ) -> AsyncIterator[Running]:
    """Start ``backends`` and ``balancer run`` on ``data``; stop all of it afterwards."""
    started: list[LiveBackend] = []
    try:
        for b in backends:
            await b.start()
            started.append(b)
        path = write_config(tmp_path / "balancer.yaml", data)
        async with BalancerProcess(path) as proc, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=WAIT),
                connector=aiohttp.TCPConnector(limit=0)) as session:
            yield Running(proc, path, data, session)
    finally:
        for b in started:
            await b.stop()


def two_backend_pool(a: LiveBackend, b: LiveBackend, **pool: Any) -> dict[str, Any]:
    return {"web": {"backends": [a.entry(), b.entry()], **pool}}


async def test_reload_over_http_applies_refuses_and_is_counted(tmp_path: Path) -> None:
    a, b, c = LiveBackend("a"), LiveBackend("b"), LiveBackend("c")
    data = balancer_config(two_backend_pool(a, b))
    async with running(tmp_path, [a, b, c], data) as run:
        # A concentrating config: 409 with the guard's problems, the old config keeps serving.
        bad = {**data, "pools": {"web": {"backends": [a.entry(weight=9), b.entry()]}}}
        mark = run.proc.mark()
        status, body = await run.reload(bad)
        assert status == 409 and body["applied"] is False
        assert any("a" in p and "%" in p for p in body["problems"]), body
        await run.proc.wait_for("reload refused", since=mark)
        assert {(await run.get())[1] for _ in range(4)} == {"a", "b"}
        # A good one: 200 with the share diff; c now takes traffic.
        good = {**data, "pools": {"web": {"backends": [a.entry(), b.entry(), c.entry()]}}}
        status, body = await run.reload(good)
        assert status == 200 and body["applied"] is True and "c" in body["diff"]
        assert {(await run.get())[1] for _ in range(6)} == {"a", "b", "c"}
        m = await run.metrics()
        assert m[("balancer_config_reloads_total", (("result", "applied"),))] == 1
        assert m[("balancer_config_reloads_total", (("result", "refused"),))] == 1
        doc = await run.status()
        assert doc["reloads"] == {"applied": 1, "refused": 1}
        assert [x["name"] for x in doc["pools"]["web"]["backends"]] == ["a", "b", "c"]


async def test_admin_token_from_the_config_file(tmp_path: Path) -> None:
    a, b = LiveBackend("a"), LiveBackend("b")
    data = balancer_config(two_backend_pool(a, b), admin_token="let-me-in")
    async with running(tmp_path, [a, b], data) as run:
        status, body = await run.reload(data)
        assert status == 401 and "admin_token" in body["error"]
        status, body = await run.reload(data, token="let-me-in")
        assert status == 200 and body["applied"] is True
        async with run.session.get(f"{run.admin}/healthz") as r:
            assert r.status == 200
