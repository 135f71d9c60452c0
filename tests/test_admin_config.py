"""GET /config and the running-config fields of /status, over real sockets.

The admin app serves a stand-in of the App carrying what the running App keeps about its
config (``config_text``, ``config_sha256``, ``config_applied_at``, ``reload_events``,
``probation``), with real config, Pool and Backend objects (tests/test_admin.py's StandIn).
"""

from __future__ import annotations

import calendar
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict

from balancer.admin import AdminServer, mask_secrets
from balancer.monitor import Monitor
from tests.test_admin import StandIn

TOKEN = "tok-3f9a71c2"
DIGEST = "dk-8b2e55d0"

#: A running config with both secrets, in the forms people write them.
CONFIG_TEXT = f"""\
# production balancer (comments stay)
listen: "127.0.0.1:8080"
admin_token: {TOKEN}   # rotate monthly
access_log: {{path: /var/log/balancer.log, digest_key: "{DIGEST}"}}
pools:
  web:
    backends:
      - {{url: "http://127.0.0.1:9001", name: web1}}
"""


class Running(StandIn):
    """The StandIn plus what the App records about its running config and its reloads."""

    def __init__(self, token: str | None = None, text: str = CONFIG_TEXT) -> None:
        super().__init__(token)
        self.config_text = text
        self.config_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.config_applied_at = 1796392800.0  # 2026-12-04T14:00:00Z
        self.reload_events: list[dict[str, Any]] = []
        self.probation: dict[str, Any] | None = None


@pytest.fixture
async def admin(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Running, str]]:
    app = Running(getattr(request, "param", None))
    server = AdminServer(Monitor())
    await server.start(app)
    try:
        yield app, f"http://{server.address}"
    finally:
        await server.stop()


async def get(url: str, **headers: str) -> tuple[int, CIMultiDict[str], str]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, CIMultiDict(r.headers), await r.text()


async def test_config_is_the_running_text_with_secrets_masked(
        admin: tuple[Running, str]) -> None:
    app, base = admin
    status, headers, body = await get(f"{base}/config")
    assert status == 200
    assert headers["Content-Type"] == "application/yaml; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    sha = hashlib.sha256(CONFIG_TEXT.encode("utf-8")).hexdigest()
    assert headers["X-Config-SHA256"] == sha  # of what runs, not of the masked text
    assert headers["ETag"] == f'"{sha}"'
    assert TOKEN not in body and DIGEST not in body
    # Everything but the two values is as it was read: comments, quoting, layout.
    assert body.splitlines()[0] == "# production balancer (comments stay)"
    assert 'admin_token: "********"   # rotate monthly' in body
    assert body.replace('"********"', "X").splitlines() == CONFIG_TEXT.replace(
        TOKEN, "X").replace(f'"{DIGEST}"', "X").splitlines()
    doc = yaml.safe_load(body)
    assert doc["admin_token"] == "********" and doc["access_log"]["digest_key"] == "********"
    assert doc["pools"] == yaml.safe_load(CONFIG_TEXT)["pools"]


@pytest.mark.parametrize("text", [
    "admin_token: SECRET\n",
    "admin_token: 'SECRET'  # single\n",
    'admin_token: "SECRET"\n',
    '"admin_token": SECRET\n',
    "admin_token:   SECRET\nlisten: 1\n",
    "access_log: {digest_key: SECRET}\n",
    "access_log: {path: x, digest_key: SECRET, digest: [a, b]}\n",
    'access_log: {"digest_key": "SECRET,}"}\n',
    "access_log:\n  path: x\n  digest_key: SECRET\n",
    "access_log:\n  digest_key: >-\n    SECRET\n  path: x\n",
    "admin_token: |\n  SECRET\nlisten: 1\n",
    "x: &k SECRET\nadmin_token: *k\n",
    "admin_token: !!str SECRET\n",
    "pools: {}\n---\nadmin_token: SECRET\n",
])
def test_masking_finds_the_value_in_every_yaml_form(text: str) -> None:
    masked = mask_secrets(text)
    assert "SECRET" not in masked, masked
    docs = [d for d in yaml.safe_load_all(masked) if d]
    assert docs and any("admin_token" in d or "access_log" in d for d in docs), masked


def test_masking_keeps_other_values_and_unparsable_text_is_masked_by_line() -> None:
    text = "name: admin_token_reader  # admin_token mentioned\ntoken_digest_key: 1\n"
    assert mask_secrets(text) == text  # only the keys themselves are secret
    broken = "admin_token: SECRET\naccess_log: {digest_key: SECRET\n"
    assert "SECRET" not in mask_secrets(broken)


@pytest.mark.parametrize("admin", [TOKEN], indirect=True)
async def test_config_needs_the_token_when_one_is_set(admin: tuple[Running, str]) -> None:
    _, base = admin
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, answer, body = await get(f"{base}/config", **headers)
        assert status == 401, headers
        assert answer["WWW-Authenticate"].startswith("Bearer") and TOKEN not in body
    status, _, body = await get(f"{base}/config", Authorization=f"Bearer {TOKEN}")
    assert status == 200 and TOKEN not in body and "admin_token" in body


async def test_config_without_the_running_text_is_503(admin: tuple[Running, str]) -> None:
    app, base = admin
    app.config_text = None  # the view's "no record of the text as read"
    status, _, body = await get(f"{base}/config")
    assert status == 503 and "not available" in body


def unix(iso: str) -> float:
    return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))


async def test_status_says_what_runs_and_how_reloads_went(admin: tuple[Running, str]) -> None:
    app, base = admin
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/status") as r:
            doc = await r.json()
        assert doc["config_sha256"] == app.config_sha256
        assert doc["config_applied_at"] == "2026-12-04T14:00:00Z"
        assert doc["last_reload"] is None and doc["reload_events"] == []
        assert doc["probation"] is None

        t0 = 1796393103.4  # 14:05:03.4
        app.reload_events += [
            {"result": "applied", "reason": None, "at": t0 - 60},
            {"result": "refused", "reason": "pools.web: web1 would take 90%", "at": t0 - 30},
            {"result": "applied", "reason": None, "at": t0 - 10}]
        app.probation = {"until": time.time() + 20, "pools": ["web"]}
        async with s.get(f"{base}/status") as r:
            doc = await r.json()
        assert [e["result"] for e in doc["reload_events"]] == ["applied", "refused", "applied"]
        assert doc["reload_events"][1] == {"result": "refused", "at": "2026-12-04T14:04:33Z",
                                           "reason": "pools.web: web1 would take 90%",
                                           "t": t0 - 30}
        assert doc["last_reload"] == {"result": "applied", "reason": None,
                                      "at": "2026-12-04T14:04:53Z"}
        p = doc["probation"]
        assert p["pools"] == ["web"] and 0 < p["remaining"] <= 20
        assert abs(unix(p["until"]) - app.probation["until"]) < 1

        reason = "pool web: web2 took 100% of 230 requests (max_share 50%)"
        app.reload_events.append({"result": "rolled_back", "reason": reason, "at": t0})
        app.probation = None
        before = [dict(e) for e in app.reload_events]
        async with s.get(f"{base}/status") as r:
            doc = await r.json()
        assert doc["last_reload"] == {"result": "rolled_back", "reason": reason,
                                      "at": "2026-12-04T14:05:03Z"}
        assert doc["probation"] is None
        assert app.reload_events == before  # reading changed nothing


async def served_status(app: Any, monitor: Monitor) -> Any:
    """``/status`` as a real AdminServer on a free loopback port answers it for ``app``."""
    server = AdminServer(monitor)
    await server.start(app)
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{server.address}/status") as r:
            return await r.json()
    finally:
        await server.stop()


async def test_status_of_an_app_without_reload_history() -> None:
    """An app that keeps no reload record (the plain stand-in) still gets a status page."""
    doc = await served_status(StandIn(), Monitor())
    assert doc["config_sha256"] is None and doc["last_reload"] is None
    assert doc["reload_events"] == [] and doc["probation"] is None
    assert doc["pools"]["web"]["history"]["backends"] == {"web1": [], "web2": [], "spare": []}


async def test_status_carries_each_pools_history_and_p99() -> None:
    app, monitor = Running(), Monitor()
    pool = app.pools["web"]
    web1, web2, _spare = pool.backends
    now = 5000.0
    monitor.tick(app.pools, app.config.guard, now)
    for per_second in ([3, 1], [3, 1], [0, 4]):
        now += 1
        for b, n in zip((web1, web2), per_second):
            for _ in range(n):
                pool.begin(b)
                pool.finish(b, 200, 0.02 if b is web1 else 0.3)
        monitor.tick(app.pools, app.config.guard, now)
    doc = await served_status(app, monitor)
    p = doc["pools"]["web"]
    h = p["history"]
    assert h["backends"] == {"web1": [0, 3, 3, 0], "web2": [0, 1, 1, 4], "spare": [0, 0, 0, 0]}
    assert [round(t - h["t"][0], 3) for t in h["t"]] == [0, 1, 2, 3]
    assert h["t"][-1] <= h["end"] <= time.time() + 0.001  # unix times (rounded to the ms)
    by_name = {b["name"]: b for b in p["backends"]}
    assert (by_name["web1"]["p99"], by_name["web2"]["p99"], by_name["spare"]["p99"]) == \
        (0.025, 0.5, None)
