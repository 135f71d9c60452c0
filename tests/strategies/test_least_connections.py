"""Weighted least connections: fewest in flight per weight, ties never toward the first."""

from __future__ import annotations

from collections import Counter

from balancer.strategies import PickContext
from tests.strategies.support import make_backends, make_pool, make_strategy

CTX = PickContext()


def test_picks_the_fewest_in_flight_per_weight() -> None:
    backends = make_backends([1, 4, 2])
    strategy = make_strategy("least_connections", backends)
    # loads per weight: 2/1, 4/4, 1/2  → b2 (0.5) is least loaded
    for b, n in zip(backends, (2, 4, 1)):
        b.in_flight = n
    for _ in range(10):
        assert next(strategy.candidates(CTX)).name == "b2"


def test_fallbacks_come_least_loaded_first() -> None:
    backends = make_backends([1, 1, 1, 1])
    for b, n in zip(backends, (3, 0, 7, 1)):
        b.in_flight = n
    strategy = make_strategy("least_connections", backends)
    assert [b.name for b in strategy.candidates(CTX)] == ["b1", "b3", "b0", "b2"]


def test_ties_rotate_instead_of_favouring_the_first_backend() -> None:
    """Everything idle: a first-minimum scan would always answer b0."""
    strategy = make_strategy("least_connections", make_backends([1, 1, 1]))
    seen = Counter(next(strategy.candidates(CTX)).name for _ in range(30))
    assert seen == {"b0": 10, "b1": 10, "b2": 10}


def test_partial_ties_rotate_among_the_tied() -> None:
    backends = make_backends([1, 1, 1, 1])
    backends[0].in_flight = 5
    strategy = make_strategy("least_connections", backends)
    seen = Counter(next(strategy.candidates(CTX)).name for _ in range(300))
    assert set(seen) == {"b1", "b2", "b3"}
    assert min(seen.values()) >= 50, seen


def test_concurrent_load_follows_weights() -> None:
    """Many requests in flight; every 4 picks b0 completes 3 and b1 completes 1 (a weight-3
    server is 3× as fast). Keeping both busy means serving 3:1; piling onto one cannot."""
    pool = make_pool([3, 1], "least_connections")
    b0, b1 = pool.backends
    served = Counter[str]()
    for n in range(1, 4001):
        b = pool.pick(CTX)
        pool.begin(b)
        served[b.name] += 1
        if n > 40 and n % 4 == 0:
            for backend, done in ((b0, 3), (b1, 1)):
                for _ in range(min(done, backend.in_flight)):
                    pool.finish(backend, status=200, latency=0.01)
    assert abs(served["b0"] / 4000 - 0.75) < 0.03, served
