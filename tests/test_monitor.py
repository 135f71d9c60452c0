"""Live traffic shares and concentration detection, driven with a fake clock over real pools."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import pytest

from balancer.backend import Backend
from balancer.config import GuardConfig, parse_config
from balancer.monitor import Monitor, bucket_quantile, wilson_lower
from balancer.pool import Pool
from tests.support.traffic import Traffic
from tests.test_admin import (
    LiveBackend,
    Running,
    balancer_config,
    running,
    two_backend_pool,
)

GUARD = GuardConfig(max_share=0.5, live_margin=0.05, live_window=10.0, live_min_requests=100)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(clock: Clock, n: int = 2, **pool: object) -> Pool:
    cfg = parse_config({"pools": {"web": {
        "backends": [{"url": f"http://127.0.0.1:{9000 + i}", "name": f"b{i}"} for i in range(n)],
        **pool}}})
    pc = cfg.pools["web"]
    return Pool(pc, [Backend(b, "web") for b in pc.backends], clock=clock)


def serve(pool: Pool, counts: list[int]) -> None:
    """Record ``counts[i]`` answered requests on backend i (what pool.finish does per request)."""
    for b, n in zip(pool.backends, counts):
        for _ in range(n):
            pool.begin(b)
            pool.finish(b, 200, 0.002)


def run(monitor: Monitor, pool: Pool, clock: Clock, seconds: int, per_second: list[int],
        guard: GuardConfig = GUARD) -> list[bool]:
    """Advance ``seconds`` one tick at a time; the concentration state after each tick."""
    states = []
    for _ in range(seconds):
        clock.now += 1
        serve(pool, per_second)
        monitor.tick({"web": pool}, guard, clock.now)
        states.append(monitor.concentration("web") is not None)
    return states


def test_shares_over_the_window() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock, 3)
    monitor.tick({"web": pool}, GUARD, clock.now)  # first sight: a baseline, counts nothing
    run(monitor, pool, clock, 5, [20, 10, 10])
    shares = monitor.shares("web")
    b0, b1, b2 = pool.backends
    assert shares[b0.key] == pytest.approx(0.5)
    assert shares[b1.key] == pytest.approx(0.25)
    assert monitor.window_requests("web") == 200
    # The window slides: after 10 s of only b2, the old traffic is gone.
    run(monitor, pool, clock, 10, [0, 0, 10])
    assert monitor.shares("web") == {b2.key: 1.0}
    # No traffic for a whole window: no shares at all.
    run(monitor, pool, clock, 10, [0, 0, 0])
    assert monitor.shares("web") == {}
    assert monitor.window_requests("web") == 0


def test_requests_before_the_monitor_started_do_not_count() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock)
    serve(pool, [500, 0])
    run(monitor, pool, clock, 3, [10, 10])
    assert monitor.shares("web") == {b.key: pytest.approx(0.5) for b in pool.backends}


def test_two_equal_backends_with_random_noise_never_fire() -> None:
    """Random 50/50 at 30 requests/s for an hour of ticks: hovering near 50 % stays quiet."""
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock)
    rng = random.Random(7)
    fired = 0
    for _ in range(3600):
        a = sum(rng.random() < 0.5 for _ in range(30))
        fired += any(run(monitor, pool, clock, 1, [a, 30 - a]))
    assert fired == 0


def test_fires_on_a_real_shift_and_clears_with_hysteresis(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock)
    caplog.set_level(logging.WARNING, "balancer.monitor")
    assert not any(run(monitor, pool, clock, 15, [20, 20]))
    # One backend now takes 90 %: fires within the window, once.
    states = run(monitor, pool, clock, 10, [36, 4])
    assert states[-1] and states.index(True) < 10
    conc = monitor.concentration("web")
    assert conc is not None and conc.backend == "b0" and conc.share > 0.55
    fired = [r.getMessage() for r in caplog.records if "concentrated" in r.getMessage()]
    assert len(fired) == 1
    assert "pool web" in fired[0] and "backend b0" in fired[0] and "%" in fired[0]
    # 54 % is between the lines (clear at 52.5 %, fire above 55 %): the state holds, no flapping.
    assert all(run(monitor, pool, clock, 20, [27, 23]))
    # Back to an even split: clears within the window, with one log line.
    states = run(monitor, pool, clock, 12, [20, 20])
    assert not states[-1]
    cleared = [r.getMessage() for r in caplog.records if "cleared" in r.getMessage()]
    assert len(cleared) == 1 and "pool web" in cleared[0]


def test_needs_enough_requests_to_judge() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock)
    # 100 % on one backend, but only 9 requests in the 10 s window: too few to judge.
    assert not any(run(monitor, pool, clock, 30, [1, 0]))
    assert monitor.shares("web") == {pool.backends[0].key: 1.0}
    assert any(run(monitor, pool, clock, 10, [20, 0]))


def test_too_few_backends_in_rotation_is_concentration_named_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9: two of three down by health checks is the postmortem (all traffic on one
    server): concentrated at once, whatever the traffic, one warning naming the cause; cleared
    when enough backends are back. Panic still decides where traffic goes."""
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock, 3, panic_threshold=0.0)
    caplog.set_level(logging.WARNING, "balancer.monitor")
    assert not any(run(monitor, pool, clock, 3, [10, 10, 10]))
    for b in pool.backends[1:]:
        b.healthy = False
    pool.state_changed()
    assert all(run(monitor, pool, clock, 5, [0, 0, 0]))  # no traffic needed to judge it
    conc = monitor.concentration("web")
    assert conc is not None and conc.cause == "rotation" and conc.backend == "b0"
    assert conc.reason.startswith("pool web: 2 of 3 backends down (health check): all traffic "
                                  "on b0")
    named = [r.getMessage() for r in caplog.records if "backends down" in r.getMessage()]
    assert named == [conc.reason]
    # One back: 2 of 3 in rotation meets min_backends 2: cleared, with one line.
    pool.backends[1].healthy = True
    pool.state_changed()
    assert not any(run(monitor, pool, clock, 2, [10, 10, 0]))
    assert [r.getMessage() for r in caplog.records if "cleared" in r.getMessage()] == [
        "pool web: traffic concentration cleared (2 backends in rotation again "
        "(guard.min_backends 2))"]


def test_ejection_counts_and_a_pool_allowed_fewer_backends_is_not_judged_by_rotation() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock, 2, panic_threshold=0.0)
    pool.backends[1].ejected_until = clock.now + 100
    pool.state_changed()
    run(monitor, pool, clock, 1, [0, 0])
    conc = monitor.concentration("web")
    assert conc is not None and "1 of 2 backends ejected (passive health)" in conc.reason
    single = make_pool(clock, 1, allow_concentration="one server on purpose")
    single.backends[0].healthy = False
    monitor.tick({"one": single}, GUARD, clock.now + 1)
    assert monitor.concentration("one") is None


def test_share_survives_a_reload_that_keeps_the_backend_objects() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock, 3)
    run(monitor, pool, clock, 5, [10, 10, 20])
    kept = pool.backends[:2]
    pool.update(pool.config, kept)  # a reload that removed b2 and kept b0, b1
    run(monitor, pool, clock, 2, [10, 10, 0])
    shares = monitor.shares("web")
    # The first tick is the baseline: 4 s of 10/10/20, then 2 s of 10/10 → b0 has 60 of 200.
    assert shares[kept[0].key] == pytest.approx(60 / 200)
    # A pool that disappears takes its window with it.
    monitor.tick({}, GUARD, clock.now + 1)
    assert monitor.shares("web") == {}


def test_wilson_lower_bound() -> None:
    assert wilson_lower(0.5, 0) == 0.0
    assert wilson_lower(1.0, 20) == pytest.approx(20 / 29)
    assert 0.45 < wilson_lower(0.5, 10_000) < 0.5
    assert wilson_lower(0.6, 100) < 0.5 < wilson_lower(0.6, 1000)


# --------------------------------------------------------------------------- through the proxy


async def test_live_weight_change_fires_concentration_and_changing_back_clears_it(
        tmp_path: Path) -> None:
    a, b = LiveBackend("a"), LiveBackend("b")
    pool = {"allow_concentration": "test: a live weight change the guard lets through"}
    data = balancer_config(two_backend_pool(a, b, **pool),
                           guard={"live_window": "3s", "live_min_requests": 30})
    key = ("balancer_pool_concentrated", (("pool", "web"),))
    share_a = ("balancer_backend_traffic_share", (("backend", "a"), ("pool", "web")))

    async def concentrated() -> bool:
        return (await run.metrics())[key] == 1

    async def spread() -> bool:
        return (await run.metrics())[key] == 0

    async with running(tmp_path, [a, b], data) as run, Traffic(run.port) as clients:
        # A full window of even traffic: quiet.
        await run.until(lambda: _window_full(run), "a full window of traffic")
        assert await spread()
        # Weight 9 for a, applied live over the admin endpoint: fires within the window.
        status, _ = await run.reload(
            {**data, "pools": {"web": {"backends": [a.entry(weight=9), b.entry()], **pool}}})
        assert status == 200
        await run.until(concentrated, "concentration detected")
        m = await run.metrics()
        assert m[share_a] > 0.55
        line = await run.proc.wait_for("traffic concentrated")
        assert "pool web" in line and "backend a" in line and "%" in line
        doc = await run.status()
        assert doc["pools"]["web"]["concentrated"]["backend"] == "a"
        # Back to equal weights: clears, and says so once.
        status, _ = await run.reload(data)
        assert status == 200
        await run.until(spread, "concentration cleared")
        await run.proc.wait_for("traffic concentration cleared")
        assert clients.failures == []
    assert run.proc.log.count("traffic concentrated") == 1


async def _window_full(run: Running) -> bool:
    doc = await run.status()
    return doc["uptime"] > 3.5 and doc["pools"]["web"]["window_requests"] >= 60


def test_an_idle_backup_does_not_count_as_a_second_backend_in_rotation() -> None:
    clock, monitor = Clock(), Monitor()
    cfg = parse_config({"pools": {"web": {"backends": [
        {"url": "http://127.0.0.1:9000", "name": "b0"},
        {"url": "http://127.0.0.1:9001", "name": "b1"},
        {"url": "http://127.0.0.1:9002", "name": "spare", "backup": True}]}}})
    pc = cfg.pools["web"]
    pool = Pool(pc, [Backend(b, "web") for b in pc.backends], clock=clock)
    pool.backends[1].healthy = False  # b0 alone serves; the backup waits, takes nothing
    pool.state_changed()
    assert not pool.panic
    # An idle backup is no second backend: b0 alone is in rotation (issue 9: told, by rotation).
    assert all(run(monitor, pool, clock, 10, [40, 0, 0]))
    conc = monitor.concentration("web")
    assert conc is not None and conc.cause == "rotation" and "all traffic on b0" in conc.reason


# --------------------------------------------------------------------------- the chart's data


def answer(pool: Pool, backend: int, n: int, latency: float) -> None:
    """``n`` answers of ``latency`` seconds from backend ``backend``."""
    b = pool.backends[backend]
    for _ in range(n):
        pool.begin(b)
        pool.finish(b, 200, latency)


def test_series_gives_each_backend_its_count_per_sample_dated_in_unix_time() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock, 3)
    b0, b1, b2 = pool.backends
    assert monitor.series("web").times == []  # never sampled
    monitor.tick({"web": pool}, GUARD, clock.now)
    run(monitor, pool, clock, 3, [5, 5, 0])
    run(monitor, pool, clock, 2, [1, 0, 9])
    before = time.time()
    run(monitor, pool, clock, 1, [0, 2, 0])
    after = time.time()
    s = monitor.series("web")
    # A baseline sample and 6 more, 1 s apart on the monitor's clock, the last one at the wall
    # time of its tick.
    assert len(s.times) == 7
    assert [round(t - s.times[0], 6) for t in s.times] == [0, 1, 2, 3, 4, 5, 6]
    assert before <= s.times[-1] <= after
    assert s.counts[b0.key] == [0, 5, 5, 5, 1, 1, 0]
    assert s.counts[b1.key] == [0, 5, 5, 5, 0, 0, 2]
    assert s.counts[b2.key] == [0, 0, 0, 0, 9, 9, 0]
    assert s.names == {b0.key: "b0", b1.key: "b1", b2.key: "b2"}
    # The window slides (10 s): the old samples go, and a backend with no traffic left in
    # it has no row.
    run(monitor, pool, clock, 10, [0, 3, 0])
    s = monitor.series("web")
    assert len(s.times) == 10 and set(s.counts) == {b1.key}
    assert s.counts[b1.key] == [3] * 10
    # Reading changes nothing the judging uses.
    assert monitor.shares("web") == {b1.key: 1.0} and monitor.window_requests("web") == 30


def test_p99_is_the_upper_bound_of_the_bucket_it_falls_in() -> None:
    assert bucket_quantile([0] * 15, 0.99) is None
    counts = [0] * 15
    counts[3] = 99  # <= 10 ms
    counts[6] = 1   # <= 100 ms
    assert bucket_quantile(counts, 0.99) == 0.01  # the 99th of 100 is still in the 10 ms bucket
    counts[6] = 2
    assert bucket_quantile(counts, 0.99) == 0.1   # the 100th of 101 is past it
    counts[14] = 50
    assert bucket_quantile(counts, 0.99) == math.inf  # above the last bound (30 s)


def test_p99_per_backend_over_the_live_window() -> None:
    clock, monitor = Clock(), Monitor()
    pool = make_pool(clock, 2)
    b0, b1 = pool.backends
    answer(pool, 0, 50, 0.2)  # before the monitor's first sight: not in the window
    monitor.tick({"web": pool}, GUARD, clock.now)
    assert monitor.latency_p99("web") == {}
    for _ in range(3):
        clock.now += 1
        answer(pool, 0, 99, 0.004)  # the 5 ms bucket
        answer(pool, 1, 90, 0.004)
        answer(pool, 1, 10, 0.7)    # the 1 s bucket: 10% slow
        monitor.tick({"web": pool}, GUARD, clock.now)
    assert monitor.latency_p99("web") == {b0.key: 0.005, b1.key: 1.0}
    # 3 slow answers are 1% of b0's 300: the 99th percentile is still fast; a 4th is past it.
    clock.now += 1
    answer(pool, 0, 3, 3.0)
    monitor.tick({"web": pool}, GUARD, clock.now)
    assert monitor.latency_p99("web")[b0.key] == 0.005
    clock.now += 1
    answer(pool, 0, 1, 3.0)
    monitor.tick({"web": pool}, GUARD, clock.now)
    assert monitor.latency_p99("web")[b0.key] == 5.0
    # Once that second leaves the window (10 s), the p99 is back; a backend with nothing in
    # the window has none.
    for _ in range(10):
        clock.now += 1
        answer(pool, 0, 10, 0.004)
        monitor.tick({"web": pool}, GUARD, clock.now)
    assert monitor.latency_p99("web") == {b0.key: 0.005}
    assert monitor.latency_p99("nope") == {}
