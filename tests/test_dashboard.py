"""The dashboard in a real headless Chromium, driven over the DevTools protocol.

The page must load from the admin app alone (no network beyond it), show every pool and every
backend, and move its traffic-share bars by itself when traffic shifts, showing the
concentration warning when the monitor fires; per pool, a chart of each backend's share over
the live window with a mark at every reload, each backend's p99, and in the header what runs
(config sha256, last reload, probation) with a banner when a reload was rolled back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancer.admin import AdminServer
from balancer.appview import AppView
from balancer.backend import Backend
from balancer.config import parse_config
from balancer.guard import GuardReport
from balancer.monitor import Monitor
from balancer.pool import Pool
from tests.support.net import free_port
from tests.support.traffic import Traffic
from tests.test_admin import LiveBackend, balancer_config, running, two_backend_pool

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                "(.ci/run installs Debian's chromium package)")

#: Every wait on the browser gives up after this long (seconds).
WAIT = 20.0


class Browser:
    """Headless Chromium with one page, spoken to over its DevTools websocket."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._id = 0
        self.exceptions: list[str] = []
        self.requests: list[str] = []

    async def start(self) -> None:
        assert CHROMIUM is not None
        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-extensions", "--mute-audio",
            f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
            "--window-size=1200,900", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise AssertionError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        await self.call("Network.enable")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._id += 1
        mine = self._id
        await self.ws.send_json({"id": mine, "method": method, "params": params})
        while True:
            msg = await self.ws.receive(timeout=WAIT)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"DevTools connection ended: {msg.type}")
            data = json.loads(msg.data)
            if data.get("id") == mine:
                if "error" in data:
                    raise AssertionError(f"{method}: {data['error']}")
                return data.get("result", {})
            self._event(data)

    def _event(self, data: dict[str, Any]) -> None:
        method, params = data.get("method"), data.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.exceptions.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        """Poll ``expression`` in the page until it is truthy; its value."""
        deadline = time.monotonic() + WAIT
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page never showed {what} ({expression})")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


class Live:
    """Admin app + pools + a monitor fed by synthetic traffic the test steers."""

    def __init__(self, window: str = "3s") -> None:
        self.config = parse_config({
            "admin": f"127.0.0.1:{free_port()}",
            "guard": {"live_window": window, "live_min_requests": 20},
            "pools": {
                "web": {"backends": [{"url": f"http://127.0.0.1:{9100 + i}", "name": f"web{i}"}
                                     for i in (1, 2, 3)]},
                "api": {"strategy": "least_connections",
                        "backends": [{"url": "http://127.0.0.1:9201", "name": "api1"},
                                     {"url": "http://127.0.0.1:9202", "name": "api2"}]}},
            "routes": [{"pool": "web"}]})
        self.pools = {name: Pool(pc, [Backend(b, name) for b in pc.backends])
                      for name, pc in self.config.pools.items()}
        self.reloads = {"applied": 3, "refused": 1}
        self.started_at = time.time()
        self.monitor = Monitor()
        self.split = {"web": [1, 1, 1], "api": [1, 1]}
        # Upstream latency per backend: web3 is slow (its p99 bucket is 250 ms).
        self.latency = {"web": [0.004, 0.004, 0.2], "api": [0.004, 0.004]}
        # What the App records about the running config and its reloads.
        self.config_text = "admin_token: hidden\npools: {}\n"
        self.config_sha256 = hashlib.sha256(self.config_text.encode()).hexdigest()
        self.config_applied_at = time.time() - 60
        self.reload_events: list[dict[str, Any]] = []
        self.probation: dict[str, Any] | None = None
        # The rest of what the services read of the App (balancer/appview.py AppView).
        self.config_path = "live.yaml"
        self.report = GuardReport()
        self.state = None  # no proxy
        self.rollbacks = 0
        self.workers: tuple[dict[str, Any], ...] = ()  # one process
        assert isinstance(self, AppView)

    async def reload(self) -> Any:
        raise AssertionError("the dashboard never reloads")

    async def compute(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def apply_change(self, change: Any, source: object = None) -> bool:
        return False

    async def traffic(self) -> None:
        """10 ticks a second: serve requests in the current split, then sample."""
        while True:
            for name, pool in self.pools.items():
                for b, n, latency in zip(pool.backends, self.split[name], self.latency[name]):
                    for _ in range(n * 3):
                        pool.begin(b)
                        pool.finish(b, 200, latency)
            self.monitor.tick(self.pools, self.config.guard, time.monotonic())
            await asyncio.sleep(0.1)


@pytest.fixture
async def live(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Live, str]]:
    app = Live(getattr(request, "param", "3s"))
    server = AdminServer(app.monitor)
    await server.start(app)
    feeder = asyncio.create_task(app.traffic())
    try:
        yield app, f"http://{server.address}/"
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await server.stop()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    b = Browser(tmp_path / "profile")
    try:
        await b.start()
        yield b
    finally:
        await b.close()


SHARES = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('tr.backend')]
  .map(r => [r.dataset.pool + '/' + r.dataset.backend,
             parseFloat(r.querySelector('.share-fill').style.width)])))"""


async def test_dashboard_shows_every_backend_and_bars_follow_traffic(
        live: tuple[Live, str], browser: Browser, tmp_path: Path) -> None:
    app, url = live
    await browser.call("Page.navigate", url=url)
    await browser.wait_for("document.querySelectorAll('tr.backend').length === 5",
                           "a row for each of the 5 backends")
    pools = await browser.eval("[...document.querySelectorAll('section.pool')]"
                               ".map(s => s.dataset.pool)")
    assert pools == ["web", "api"]
    names = await browser.eval("[...document.querySelectorAll('tr.backend')]"
                               ".map(r => r.querySelector('strong').textContent)")
    assert names == ["web1", "web2", "web3", "api1", "api2"]
    assert await browser.eval("document.getElementById('reloads-applied').textContent") == "3"

    # Even traffic: every web bar near a third, no warning.
    await browser.wait_for(f"Object.entries(JSON.parse({SHARES})).filter(([k]) => "
                           "k.startsWith('web/')).every(([, w]) => w > 25 && w < 42)",
                           "even web bars")
    assert await browser.eval("document.querySelector('section[data-pool=web] "
                              ".alert.concentrated').hidden") is True
    even = json.loads(await browser.eval(SHARES))

    # Traffic shifts onto web1: its bar grows by itself and the warning appears.
    app.split["web"] = [10, 1, 0]
    await browser.wait_for(f"JSON.parse({SHARES})['web/web1'] > 80", "web1's bar above 80%")
    warning = await browser.wait_for(
        "(e => !e.hidden && e.textContent)(document.querySelector("
        "'section[data-pool=web] .alert.concentrated'))", "the concentration warning")
    assert "web1" in warning
    shifted = json.loads(await browser.eval(SHARES))
    assert shifted["web/web1"] > even["web/web1"] + 40
    assert shifted["web/web3"] < even["web/web3"] - 25
    assert await browser.eval("document.querySelector('tr[data-backend=web1] .share-fill')"
                              ".classList.contains('hot')") is True
    # The other pool is untouched.
    assert await browser.eval("document.querySelector('section[data-pool=api] "
                              ".alert.concentrated').hidden") is True

    # A backend going down shows as down, with its reason.
    app.pools["web"].backends[2].healthy = False
    app.pools["web"].backends[2].health_reason = "status 500"
    app.pools["web"].state_changed()
    state = await browser.wait_for(
        "(r => r.dataset.state === 'down' && r.querySelector('.reason').textContent)"
        "(document.querySelector('tr[data-backend=web3]'))", "web3 down")
    assert state == "status 500"
    # Two of three down: the pool is in panic, and the page says so.
    app.pools["web"].backends[1].healthy = False
    app.pools["web"].state_changed()  # what the health checker does
    await browser.wait_for("!document.querySelector('section[data-pool=web] .alert.panic')"
                           ".hidden", "the panic warning")
    assert await browser.eval("document.querySelector('section[data-pool=web] .badge.panic')"
                              ".textContent") == "PANIC"
    # Two of three down is too few in rotation (issue 9): the warning says so in the log's
    # words, whatever the traffic did (in panic all three serve again).
    text = await browser.wait_for(
        "(a => !a.hidden && a.textContent.includes('2 of 3 backends down') && a.textContent)"
        "(document.querySelector('section[data-pool=web] .alert.concentrated'))",
        "the too-few-in-rotation warning")
    assert text.startswith("Traffic concentrated: 2 of 3 backends down (health check): panic")

    await browser.screenshot(tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert browser.exceptions == []
    # Everything the page loaded came from the admin app: it works offline.
    assert browser.requests and all(r.startswith(url) for r in browser.requests), \
        browser.requests


#: Each web backend's last plotted share on the chart: {name: share or null}.
CHART = """JSON.stringify(Object.fromEntries([...document.querySelectorAll(
  'section[data-pool=web] path.series')].map(p => [p.dataset.backend,
  p.dataset.last === '' ? null : parseFloat(p.dataset.last)])))"""

#: The reload marks drawn on the web pool's chart: [[result, hover text], ...].
MARKS = """JSON.stringify([...document.querySelectorAll('section[data-pool=web] .reload-mark')]
  .map(g => [g.dataset.result, g.querySelector('title').textContent]))"""

#: The web pool's mark labels: text, box in the chart's pixels, the chart's width, and whether
#: it comes after every mark's line in the drawing order.
LABELS = """(() => {
  const svg = document.querySelector('section[data-pool=web] svg');
  const lines = [...svg.querySelectorAll('.reload-mark line')];
  return JSON.stringify([...svg.querySelectorAll('.reload-label')].map(t => {
    const b = t.getBBox();
    return {text: t.firstChild.textContent, left: b.x, right: b.x + b.width, top: b.y,
            bottom: b.y + b.height, width: svg.viewBox.baseVal.width,
            after_lines: lines.every(l => l.compareDocumentPosition(t) & 4)};
  }));
})()"""

@pytest.mark.parametrize("live", ["30s"], indirect=True)  # every mark stays in the window
async def test_chart_follows_the_share_over_time_and_marks_every_reload(
        live: tuple[Live, str], browser: Browser, tmp_path: Path) -> None:
    app, url = live
    # A reload before the live window: the header shows it, the chart has no mark for it.
    app.reload_events.append({"result": "kept", "reason": None, "at": time.time() - 60})
    await browser.call("Page.navigate", url=url)
    # A series per backend, in each pool, with a legend entry each.
    await browser.wait_for("document.querySelectorAll('section[data-pool=web] path.series')"
                           ".length === 3 && document.querySelectorAll("
                           "'section[data-pool=api] path.series').length === 2",
                           "a series per backend")
    assert await browser.eval("[...document.querySelectorAll('section[data-pool=web] "
                              ".legend li')].map(li => li.dataset.backend)") == \
        ["web1", "web2", "web3"]
    assert len(set(await browser.eval("[...document.querySelectorAll('section[data-pool=web] "
                                      "path.series')].map(p => p.getAttribute('stroke'))"))) == 3
    await browser.wait_for(f"Object.values(JSON.parse({CHART})).every(v => v > 0.2 && v < 0.45)",
                           "three even lines")
    # Each line runs across the window (a point per sample, 10 a second here), not one dot.
    await browser.wait_for("[...document.querySelectorAll('section[data-pool=web] "
                           "path.series')].every(p => p.getAttribute('d').split('L')"
                           ".length > 15)", "lines across the window")

    # p99 beside the counts: web1/web2 answer in 4 ms, web3 in 200 ms.
    await browser.wait_for("[...document.querySelectorAll('tr.backend .p99')]"
                           ".every(td => td.textContent.startsWith('≤'))", "every p99")
    cells = await browser.eval("Object.fromEntries([...document.querySelectorAll('tr.backend')]"
                               ".map(r => [r.dataset.backend, r.querySelector('.p99')"
                               ".textContent]))")
    assert cells["web1"] == "≤ 5 ms" and cells["web3"] == "≤ 250 ms", cells
    assert await browser.eval("[...document.querySelectorAll('section[data-pool=web] th')]"
                              ".map(th => th.textContent).indexOf('p99')") == 5

    # The running config in the header, and the last reload, which is older than the window.
    assert await browser.eval("document.getElementById('config-sha').textContent") == \
        app.config_sha256[:12]
    assert await browser.eval("document.getElementById('last-reload').dataset.result") == "kept"
    assert await browser.eval("document.querySelectorAll('.reload-mark').length") == 0

    # A reload is applied (in probation), traffic moves onto web1: the line follows.
    now = time.time()
    app.reload_events.append({"result": "applied", "reason": None, "at": now})
    app.probation = {"until": now + 30, "pools": ["web"]}
    app.split["web"] = [10, 1, 0]
    await browser.wait_for(f"JSON.parse({CHART}).web1 > 0.8", "web1's line above 80%")
    shifted = json.loads(await browser.eval(CHART))
    assert shifted["web3"] is not None and shifted["web3"] < 0.05
    marks = json.loads(await browser.eval(MARKS))
    assert [m[0] for m in marks] == ["applied"]
    assert await browser.eval("document.querySelectorAll('section[data-pool=api] "
                              ".reload-mark').length") == 1
    probation = await browser.wait_for(
        "(b => !b.hidden && document.getElementById('probation').textContent)"
        "(document.getElementById('probation-box'))", "the probation")
    assert probation.startswith("web · ") and probation.endswith("s left")
    assert await browser.eval("document.getElementById('rollback-banner').hidden") is True

    # Probation rolls it back, and a later reload is refused: a mark each, with its reason.
    reason = "pool web: web1 took 91% of 230 requests (max_share 50%)"
    app.reload_events.append({"result": "rolled_back", "reason": reason, "at": time.time()})
    app.probation = None
    app.split["web"] = [1, 1, 1]
    banner = await browser.wait_for(
        "(b => !b.hidden && b.textContent)(document.getElementById('rollback-banner'))",
        "the rolled-back banner")
    assert "ROLLED BACK" in banner and reason in banner
    assert await browser.eval("document.getElementById('last-reload').dataset.result") == \
        "rolled_back"
    assert await browser.eval("document.getElementById('probation-box').hidden") is True
    await browser.wait_for(f"JSON.parse({CHART}).web1 < 0.45", "web1's line back down")
    app.reload_events.append({"result": "refused", "reason": "pools.web: bad weight",
                              "at": time.time()})
    await browser.wait_for(f"JSON.parse({MARKS}).length === 3", "three reload marks")
    marks = json.loads(await browser.eval(MARKS))
    assert [m[0] for m in marks] == ["applied", "rolled_back", "refused"]
    assert reason in marks[1][1] and "rolled back" in marks[1][1]
    assert "pools.web: bad weight" in marks[2][1]
    # Three marks seconds apart at the chart's right edge: every label whole inside the chart,
    # none over another, each drawn after every line (no line over a label's text).
    labels = json.loads(await browser.eval(LABELS))
    assert [label["text"] for label in labels] == ["applied", "rolled back", "refused"]
    for i, label in enumerate(labels):
        assert 0 <= label["left"] and label["right"] <= label["width"], label
        assert label["after_lines"], label
        for other in labels[i + 1:]:
            apart = (label["right"] <= other["left"] or other["right"] <= label["left"]
                     or label["bottom"] <= other["top"] or other["bottom"] <= label["top"])
            assert apart, (label, other)
    assert await browser.eval("document.getElementById('rollback-banner').hidden") is True
    assert await browser.eval("document.getElementById('last-reload').title") == \
        "pools.web: bad weight"
    await browser.screenshot(tmp_path / "chart.png")
    assert browser.exceptions == []
    assert all(r.startswith(url) for r in browser.requests), browser.requests


async def test_dashboard_of_a_running_balancer_follows_a_live_weight_change(
        browser: Browser, tmp_path: Path) -> None:
    """The whole product: `balancer run`, real traffic, a reload over /reload, a real page."""
    a, b = LiveBackend("a"), LiveBackend("b")
    pool = {"allow_concentration": "test: a live weight change the guard lets through"}
    data = balancer_config(two_backend_pool(a, b, **pool),
                           guard={"live_window": "3s", "live_min_requests": 30})
    async with running(tmp_path, [a, b], data) as run, Traffic(run.port) as clients:
        await browser.call("Page.navigate", url=run.admin + "/")
        await browser.wait_for("document.querySelectorAll('tr.backend').length === 2",
                               "both backends")
        await browser.wait_for(f"(s => s['web/a'] > 35 && s['web/a'] < 65)(JSON.parse({SHARES}))",
                               "an even split")
        status, _ = await run.reload(
            {**data, "pools": {"web": {"backends": [a.entry(weight=9), b.entry()], **pool}}})
        assert status == 200
        await browser.wait_for(f"JSON.parse({SHARES})['web/a'] > 75", "a's bar above 75%")
        await browser.wait_for(f"JSON.parse({CHART}).a > 0.75", "a's line above 75%")
        assert json.loads(await browser.eval(CHART))["b"] < 0.25
        await browser.wait_for("!document.querySelector('section[data-pool=web] "
                               ".alert.concentrated').hidden", "the concentration warning")
        assert await browser.eval("document.getElementById('reloads-applied').textContent") \
            == "1"
        await browser.screenshot(tmp_path / "live.png")
        assert clients.failures == []
    assert browser.exceptions == []
