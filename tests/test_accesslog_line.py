"""What the cheap paths of the access line and of a finished attempt must keep exact: the
line's time at millisecond edges (formatted once per millisecond), the handler's direct
verdict as its settings change, a one-label KeyRecorder's cached fragment, and the numbers
``Backend.record`` leaves (histogram bucket edges, peak EWMA)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator

import pytest

from balancer import accesslog
from balancer.accesslog import AccessLogHandler, KeyRecorder
from balancer.backend import EWMA_DECAY, LATENCY_BUCKETS, Backend
from balancer.config import parse_config
from balancer.strategies import PickContext
from tests.support.accesslog import batched_access_log


@pytest.fixture
def handler() -> Iterator[AccessLogHandler]:
    """The access logger as ``logs.setup_logging`` leaves it, restored afterwards."""
    with batched_access_log() as (handler, _):
        yield handler


def stamp_of(now: float) -> str:
    """The rule: UTC, milliseconds truncated."""
    sec = int(now)
    return (time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
            + f"{int((now - sec) * 1000):03d}Z")


def test_the_time_is_exact_at_millisecond_edges(handler, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ulp = math.ulp(1_780_000_000.0)
    times = [1_780_000_000 + k / 1000 + d * ulp for k in (0, 1, 2, 998, 999, 1000, 1001)
             for d in range(-6, 7)]
    times += sorted(times, reverse=True)  # the clock may step back
    for now in times:
        monkeypatch.setattr(accesslog, "_time", lambda now=now: now)
        accesslog.write(b"r", "10.0.0.1", b"GET", b"/", "web", "a", 200, None, 0.0, 0)
    handler.flush()
    got = [json.loads(line)["time"] for line in handler.stream.getvalue().splitlines()]
    assert got == [stamp_of(now) for now in times]


def test_the_direct_verdict_follows_the_handler(handler) -> None:  # type: ignore[no-untyped-def]
    assert handler.direct

    def keep(record: logging.LogRecord) -> bool:
        return True

    handler.addFilter(keep)
    assert not handler.direct
    handler.removeFilter(keep)
    assert handler.direct
    handler.setLevel(logging.WARNING)
    assert not handler.direct
    handler.setLevel(logging.INFO)
    handler.setFormatter(None)
    assert handler.direct


def test_a_one_label_recorder_gives_the_same_fragment_each_time() -> None:
    key = accesslog.digest_key("secret")
    recorder = KeyRecorder(["header:x-tenant"], key)
    with_tenant = PickContext(headers=[(b"X-Tenant", b"acme")])
    expected = ',"keys":{"header:x-tenant":"' + accesslog.digest("acme", key) + '"}'
    assert recorder(with_tenant) == recorder(with_tenant) == expected
    assert recorder(PickContext()) == ',"keys":{"header:x-tenant":null}'
    both = KeyRecorder(["header:x-tenant", "cookie:sid"], key)
    assert json.loads("{" + both(with_tenant)[1:] + "}") == {
        "keys": {"header:x-tenant": accesslog.digest("acme", key), "cookie:sid": None}}


def backend() -> Backend:
    config = parse_config({"pools": {"p": {"backends": [{"url": "http://127.0.0.1:9"}]}}})
    return Backend(config.pools["p"].backends[0], "p")


def test_record_counts_latencies_in_their_buckets() -> None:
    b = backend()
    edge = LATENCY_BUCKETS[0]
    for latency in (0.0, edge, math.nextafter(edge, 1.0), 0.3, 99.0):
        b.record(200, latency, None, 1.0)
    assert b.latency_counts[0] == 2 and b.latency_counts[1] == 1
    assert b.latency_counts[LATENCY_BUCKETS.index(0.5)] == 1 and b.latency_counts[-1] == 1
    assert b.requests_by_class[2] == 5 and b.requests_total == 5


def test_record_keeps_the_peak_ewma_and_the_failure_streak() -> None:
    b = backend()
    assert b.record(200, 0.2, None, 10.0) == 0
    assert b.ewma == 0.2  # a slower sample: taken at once
    b.record(200, 0.1, None, 15.0)
    w = math.exp(-5.0 / EWMA_DECAY)
    assert b.ewma == 0.2 * w + 0.1 * (1.0 - w)
    assert b.record(503, 0.1, None, 16.0) == 1
    assert b.record(0, None, "connect", 17.0) == 2
    assert b.errors == {"connect": 1} and b.requests_by_class[5] == 1
    assert b.record(204, 0.1, None, 18.0) == 0 and b.consecutive_failures == 0
