"""Weights hold: over many picks each backend's share stays near weight/total.

Driven through a real Pool, one request at a time (begin, then finish at once), which is the
case where stateful strategies used to fail: nothing is ever in flight, so every pick is a tie.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.backend import Backend
from balancer.strategies import PickContext
from tests.strategies.support import expected_shares, make_pool, sequential_shares

PICKS = 4000
#: Randomised strategies: a share is a binomial proportion with standard deviation at most
#: 0.5 / sqrt(PICKS) ≈ 0.008; 0.04 is five of them, so a correct strategy never fails it.
RANDOM_TOLERANCE = 0.04
#: Deterministic ones (smooth cycles) are exact up to one unfinished cycle.
CYCLE_TOLERANCE = 0.005

weights_lists = st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6)


@pytest.mark.parametrize("name, tolerance", [
    ("round_robin", CYCLE_TOLERANCE),
    ("least_connections", CYCLE_TOLERANCE),
    ("random", RANDOM_TOLERANCE),
    ("power_of_two", RANDOM_TOLERANCE),
    ("ewma", RANDOM_TOLERANCE),
])
@settings(max_examples=20, deadline=None, derandomize=True)
@given(weights=weights_lists)
def test_sequential_share_follows_weight(name: str, tolerance: float,
                                         weights: list[int]) -> None:
    pool = make_pool(weights, name, seed=sum(weights))
    shares = sequential_shares(pool, PICKS)  # equal latencies for ewma: 10 ms each
    for backend, want in expected_shares(weights).items():
        assert shares[backend] == pytest.approx(want, abs=tolerance), (weights, shares)


@pytest.mark.parametrize("name", ["least_connections", "power_of_two", "ewma"])
def test_traefik_case_three_to_one_stays_three_to_one(name: str) -> None:
    """Traefik's own test: weights 3:1 under sequential load became 10:0. Here 3:1 holds."""
    shares = sequential_shares(make_pool([3, 1], name), PICKS)
    assert shares["b0"] == pytest.approx(0.75, abs=RANDOM_TOLERANCE)
    assert shares["b1"] == pytest.approx(0.25, abs=RANDOM_TOLERANCE)


@pytest.mark.parametrize("name", ["least_connections", "power_of_two", "ewma"])
def test_equal_weights_under_concurrency_spread_evenly(name: str) -> None:
    """A closed loop with 8 requests in flight and equal service times: no pile-on either."""
    pool = make_pool([1, 1, 1, 1], name)
    in_flight: list[Backend] = []
    counts = dict.fromkeys((b.name for b in pool.backends), 0)
    for _ in range(PICKS):
        if len(in_flight) == 8:
            pool.finish(in_flight.pop(0), status=200, latency=0.01)
        b = pool.pick(PickContext())
        pool.begin(b)
        in_flight.append(b)
        counts[b.name] += 1
    for n in counts.values():
        assert n / PICKS == pytest.approx(0.25, abs=RANDOM_TOLERANCE), counts


def test_consistent_hash_share_follows_weight_over_many_keys() -> None:
    """Keys spread by weight: the table is built by weighted rendezvous hashing."""
    weights = [5, 3, 2]
    pool = make_pool(weights, "consistent_hash")
    keys = 10_000
    shares = sequential_shares(pool, keys, lambda n: PickContext(client_ip=f"10.1.{n >> 8}."
                                                                 f"{n & 255}"))
    # Key sampling (sd ≤ 0.005 at 10k keys) plus table granularity (sd ≤ 0.006): 0.03 is
    # more than four of both together.
    for backend, want in expected_shares(weights).items():
        assert shares[backend] == pytest.approx(want, abs=0.03), shares
    assert math.isclose(sum(shares.values()), 1.0)
