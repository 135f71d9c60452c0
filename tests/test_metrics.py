"""The Prometheus collector: the contract's names, read from real Pool/Backend objects."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer import admin
from balancer.appview import AppView
from balancer.backend import Backend
from balancer.config import GuardConfig, parse_config
from balancer.guard import GuardReport
from balancer.metrics import build_registry, render
from balancer.monitor import Monitor
from balancer.pool import NoBackend, Pool
from balancer.strategies import PickContext
from tests.test_admin import LiveBackend, balancer_config, running
from tests.test_monitor import Clock

CONTRACT = [
    "balancer_requests_total", "balancer_request_duration_seconds",
    "balancer_backend_in_flight", "balancer_backend_up", "balancer_backend_traffic_share",
    "balancer_upstream_errors_total", "balancer_rejected_requests_total",
    "balancer_pool_concentrated", "balancer_pool_panic", "balancer_config_reloads_total",
]


async def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("reading metrics never reloads nor applies a change")


def make_app(clock: Clock, **pool: Any) -> SimpleNamespace:
    cfg = parse_config({"pools": {"web": {
        "backends": [{"url": f"http://127.0.0.1:{9000 + i}", "name": f"b{i}"} for i in range(3)],
        **pool}}})
    pc = cfg.pools["web"]
    pools = {"web": Pool(pc, [Backend(b, "web", pc.max_connections) for b in pc.backends],
                         clock=clock)}
    app = SimpleNamespace(config=cfg, config_path="<test>", pools=pools, report=GuardReport(),
                          state=None, reloads={"applied": 2, "refused": 1}, rollbacks=0,
                          reload_events=[], probation=None, config_text=None,
                          config_sha256=None, config_applied_at=None, started_at=1.0,
                          workers=(), reload=_never, apply_change=_never, compute=_never)
    assert isinstance(app, AppView)  # what the metrics read, no getattr fallback
    return app


def scrape(app: Any, monitor: Monitor | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    text = render(build_registry(app, monitor)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def lbl(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


def test_every_contract_name_is_exported() -> None:
    app = make_app(Clock())
    text = render(build_registry(app, Monitor())).decode()
    for name in CONTRACT:
        assert f"\n{name}" in text or text.startswith(name), name
    assert "# TYPE balancer_requests_total counter" in text
    assert "# TYPE balancer_request_duration_seconds histogram" in text


def test_counts_classes_latency_errors_and_state() -> None:
    clock = Clock()
    app = make_app(clock)
    pool = app.pools["web"]
    b0, b1, b2 = pool.backends
    for status, latency in [(200, 0.003), (201, 0.02), (404, 0.2), (503, 3.0)]:
        pool.begin(b0)
        pool.finish(b0, status, latency)
    pool.begin(b1)
    pool.finish(b1, error="connect")
    pool.begin(b1)  # still in flight
    b2.healthy = False
    m = scrape(app)
    assert m[("balancer_requests_total", lbl(pool="web", backend="b0", code="2xx"))] == 2
    assert m[("balancer_requests_total", lbl(pool="web", backend="b0", code="4xx"))] == 1
    assert m[("balancer_requests_total", lbl(pool="web", backend="b0", code="5xx"))] == 1
    assert m[("balancer_requests_total", lbl(pool="web", backend="b1", code="2xx"))] == 0
    hist = "balancer_request_duration_seconds"
    assert m[(f"{hist}_count", lbl(pool="web", backend="b0"))] == 4
    assert m[(f"{hist}_sum", lbl(pool="web", backend="b0"))] == pytest.approx(3.223)
    assert m[(f"{hist}_bucket", lbl(pool="web", backend="b0", le="0.005"))] == 1
    assert m[(f"{hist}_bucket", lbl(pool="web", backend="b0", le="0.025"))] == 2
    assert m[(f"{hist}_bucket", lbl(pool="web", backend="b0", le="2.5"))] == 3
    assert m[(f"{hist}_bucket", lbl(pool="web", backend="b0", le="+Inf"))] == 4
    assert m[("balancer_upstream_errors_total",
              lbl(pool="web", backend="b1", kind="connect"))] == 1
    assert m[("balancer_backend_in_flight", lbl(pool="web", backend="b1"))] == 1
    assert m[("balancer_backend_up", lbl(pool="web", backend="b1"))] == 1
    assert m[("balancer_backend_up", lbl(pool="web", backend="b2"))] == 0
    assert m[("balancer_backend_state", lbl(pool="web", backend="b2", state="down"))] == 1
    assert m[("balancer_backend_weight", lbl(pool="web", backend="b0"))] == 1
    assert m[("balancer_config_reloads_total", lbl(result="applied"))] == 2
    assert m[("balancer_config_reloads_total", lbl(result="refused"))] == 1


def test_scraping_changes_no_state(caplog: pytest.LogCaptureFixture) -> None:
    """Reading /metrics or /status judges panic without recording it: the pool's state, its
    log and its waiters are the request path's and the monitor's tick's, never a reader's."""
    clock = Clock()
    app = make_app(clock)
    pool = app.pools["web"]
    pool.backends[0].healthy = pool.backends[1].healthy = False  # 1 of 3: panic, not yet seen
    before = (pool.panic, pool._checked_at)
    with caplog.at_level("WARNING", logger="balancer.pool"):
        m = scrape(app, Monitor())
        doc = admin.status(app, Monitor())
    assert m[("balancer_pool_panic", lbl(pool="web"))] == 1  # judged now…
    assert doc["pools"]["web"]["panic"] is True
    assert (pool.panic, pool._checked_at) == before  # …and not recorded
    assert caplog.records == []
    pool.state_changed()  # the writer (the monitor's tick) records it, and says so once
    assert pool.panic and "panic" in caplog.text


async def test_rejections_panic_and_concentration() -> None:
    clock = Clock()
    app = make_app(clock, max_connections=1, queue_timeout=0)
    pool = app.pools["web"]
    monitor = Monitor()
    held = [await pool.acquire(PickContext()) for _ in range(3)]
    with pytest.raises(NoBackend):
        await pool.acquire(PickContext())
    m = scrape(app, monitor)
    assert m[("balancer_rejected_requests_total", lbl(pool="web", reason="overload"))] == 1
    assert m[("balancer_rejected_requests_total", lbl(pool="web", reason="no_backend"))] == 0
    assert m[("balancer_pool_panic", lbl(pool="web"))] == 0
    for b in held:
        pool.finish(b, 200, 0.01)
    # Two of three down by health checks, panic_threshold 0.5: the gauge says so at once,
    # without waiting for a request to notice.
    held[0].healthy = held[1].healthy = False
    m = scrape(app, monitor)
    assert m[("balancer_pool_panic", lbl(pool="web"))] == 1
    held[0].healthy = held[1].healthy = True

    guard = GuardConfig(live_window=10, live_min_requests=50)
    b0 = pool.backends[0]
    monitor.tick(app.pools, guard, clock.now)
    for _ in range(100):
        pool.begin(b0)
        pool.finish(b0, 200, 0.001)
    clock.now += 1
    monitor.tick(app.pools, guard, clock.now)
    m = scrape(app, monitor)
    assert m[("balancer_pool_concentrated", lbl(pool="web"))] == 1
    assert m[("balancer_backend_traffic_share", lbl(pool="web", backend="b0"))] == 1.0
    assert m[("balancer_backend_traffic_share", lbl(pool="web", backend="b1"))] == 0.0
    assert m[("balancer_pool_window_requests", lbl(pool="web"))] == 100


def test_counters_survive_a_reload_that_keeps_the_backend() -> None:
    clock = Clock()
    app = make_app(clock)
    pool = app.pools["web"]
    b0 = pool.backends[0]
    for _ in range(7):
        pool.begin(b0)
        pool.finish(b0, 200, 0.001)
    # A reload renames nothing, drops b2, and reweights b0: the app keeps the Backend objects.
    new = parse_config({"pools": {"web": {"backends": [
        {"url": "http://127.0.0.1:9000", "name": "b0", "weight": 3},
        {"url": "http://127.0.0.1:9001", "name": "b1"}]}}})
    b0.reconfigure(new.pools["web"].backends[0], None)
    pool.update(new.pools["web"], pool.backends[:2])
    m = scrape(app)
    assert m[("balancer_requests_total", lbl(pool="web", backend="b0", code="2xx"))] == 7
    assert m[("balancer_backend_weight", lbl(pool="web", backend="b0"))] == 3
    assert not any(dict(k[1]).get("backend") == "b2" for k in m)


# --------------------------------------------------------------------------- through the proxy


async def test_after_n_requests_the_counters_add_up_to_n_per_backend(tmp_path: Path) -> None:
    backends = [LiveBackend("a"), LiveBackend("b"), LiveBackend("c")]
    data = balancer_config({"web": {"backends": [x.entry() for x in backends],
                                    "strategy": "random"}})
    paths = ["/"] * 6 + ["/code/404", "/code/301", "/code/500"]
    n = 450
    async with running(tmp_path, backends, data) as run:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> int:
            async with sem:
                return (await run.get(paths[i % len(paths)]))[0]

        statuses = await asyncio.gather(*(one(i) for i in range(n)))
        m = await run.metrics()
    assert len(statuses) == n
    total = 0
    for x in backends:
        served = sum(x.served.values())
        counted = {code: m[("balancer_requests_total", lbl(pool="web", backend=x.name,
                                                           code=code))]
                   for code in ("1xx", "2xx", "3xx", "4xx", "5xx")}
        assert sum(counted.values()) == served, (x.name, counted, x.served)
        assert counted["2xx"] == x.served[200] and counted["4xx"] == x.served[404]
        assert counted["3xx"] == x.served[301] and counted["5xx"] == x.served[500]
        hist = m[("balancer_request_duration_seconds_count", lbl(pool="web", backend=x.name))]
        assert hist == served
        assert m[("balancer_backend_in_flight", lbl(pool="web", backend=x.name))] == 0
        total += served
    assert total == n
    assert sum(v for (name, _), v in m.items() if name == "balancer_requests_total") == n
