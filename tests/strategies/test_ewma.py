"""Peak-EWMA: latency-aware, but never piling everything onto one backend."""

from __future__ import annotations

from collections import Counter

import pytest

from balancer.strategies import PickContext
from tests.strategies.support import make_backends, make_pool, make_strategy, sequential_shares

CTX = PickContext()
PICKS = 4000


def firsts(strategy, picks: int = PICKS) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(next(strategy.candidates(CTX)).name for _ in range(picks))


def test_a_slower_backend_gets_proportionally_fewer_requests() -> None:
    """Equal weights, idle, b1 four times slower: about 4:1, but b1 is not starved."""
    backends = make_backends([1, 1])
    backends[0].ewma, backends[1].ewma = 0.010, 0.040
    seen = firsts(make_strategy("ewma", backends))
    assert seen["b0"] / PICKS == pytest.approx(0.8, abs=0.04), seen


def test_in_flight_load_outweighs_a_latency_edge() -> None:
    """b0 is twice as fast but has 20 requests in flight: b1 (idle) is preferred."""
    backends = make_backends([1, 1])
    backends[0].ewma, backends[1].ewma = 0.010, 0.020
    backends[0].in_flight = 20
    seen = firsts(make_strategy("ewma", backends))
    assert seen["b1"] / PICKS > 0.85, seen


def test_unobserved_latency_counts_as_the_other_candidates() -> None:
    """A backend with no answer yet (ewma 0) is neither flooded nor shunned."""
    backends = make_backends([1, 1])
    backends[0].ewma = 0.5
    seen = firsts(make_strategy("ewma", backends))
    assert seen["b1"] / PICKS == pytest.approx(0.5, abs=0.04), seen


def test_equal_latencies_sequential_follow_weights_through_the_pool() -> None:
    """Traefik's 3:1 case with latencies reported through pool.finish."""
    shares = sequential_shares(make_pool([3, 1], "ewma"), PICKS, latency=0.02)
    assert shares["b0"] == pytest.approx(0.75, abs=0.04), shares


def test_it_reacts_to_measured_latency_through_the_pool() -> None:
    """Reported latencies drive the choice: b0 answers in 5 ms, b1 in 50 ms."""
    pool = make_pool([1, 1], "ewma")
    counts: Counter[str] = Counter()
    for _ in range(PICKS):
        b = pool.pick(CTX)
        pool.begin(b)
        counts[b.name] += 1
        pool.finish(b, status=200, latency=0.005 if b.name == "b0" else 0.050)
    assert counts["b0"] / PICKS > 0.85, counts
    assert counts["b1"] > 0, counts
