"""What every built-in strategy owes the pool: each backend exactly once, in preference order,
and a backend that is not ready hands its traffic to the others by weight."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import ConfigError
from balancer.loading import parse_config
from balancer.strategies import PickContext, resolve_strategy
from tests.strategies.support import (
    BUILT_IN,
    make_backends,
    make_pool,
    make_strategy,
    sequential_shares,
)

CONFIGURED: list[tuple[str, dict[str, object]]] = [(name, {}) for name in BUILT_IN] + [
    ("consistent_hash", {"key": "header:X-User", "balance_factor": 1.25}),
    ("consistent_hash", {"key": "cookie:sid"}),
    ("consistent_hash", {"key": "path"}),
]
IDS = [f"{n}{'+' + ','.join(o) if o else ''}" for n, o in CONFIGURED]


@pytest.mark.parametrize("name, options", CONFIGURED, ids=IDS)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_candidates_yield_every_backend_exactly_once(name: str, options: dict[str, object],
                                                     data: st.DataObject) -> None:
    weights = data.draw(st.lists(st.integers(1, 50), min_size=1, max_size=8), label="weights")
    backends = make_backends(weights)
    for b in backends:  # any live state: the order may change, the set may not
        b.in_flight = data.draw(st.integers(0, 20), label="in_flight")
        b.ewma = data.draw(st.sampled_from([0.0, 0.001, 0.05, 2.0]), label="ewma")
    strategy = make_strategy(name, backends, seed=data.draw(st.integers(0, 2**32)), **options)
    user = data.draw(st.text(min_size=0, max_size=8), label="user")
    ctx = PickContext(client_ip=f"10.0.0.{len(user)}", path=f"/u/{user}",
                      headers=[(b"x-user", user.encode()), (b"cookie", f"sid={user}".encode())])
    for _ in range(3):  # stateful strategies advance between picks
        got = list(strategy.candidates(ctx))
        assert sorted(b.name for b in got) == sorted(b.name for b in backends)


@pytest.mark.parametrize("name", BUILT_IN)
def test_no_backends_no_candidates(name: str) -> None:
    """The pool builds a strategy over an empty primary set (every backend a backup)."""
    strategy = resolve_strategy(name).build([], {}, random.Random(0))
    assert list(strategy.candidates(PickContext(client_ip="10.0.0.1"))) == []


@pytest.mark.parametrize("name", BUILT_IN)
def test_one_backend_is_always_the_choice(name: str) -> None:
    [b] = backends = make_backends([3])
    strategy = make_strategy(name, backends)
    for n in range(20):
        assert list(strategy.candidates(PickContext(client_ip=f"10.0.0.{n}"))) == [b]


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_down_backend_spreads_its_traffic_by_weight(name: str) -> None:
    """b0 fails: its share goes to b1, b2, b3 in proportion 1:1:2, not all to a neighbour."""
    pool = make_pool([3, 1, 1, 2], name)
    pool.backends[0].healthy = False
    pool.state_changed()
    shares = sequential_shares(pool, 4000, lambda n: PickContext(
        client_ip=f"10.2.{n >> 8}.{n & 255}"))
    assert shares["b0"] == 0.0
    # Binomial sd ≤ 0.008 at 4000 picks; hashing adds table and key noise: 0.05 covers both.
    assert shares["b1"] == pytest.approx(0.25, abs=0.05), shares
    assert shares["b2"] == pytest.approx(0.25, abs=0.05), shares
    assert shares["b3"] == pytest.approx(0.50, abs=0.05), shares


@pytest.mark.parametrize("name", [n for n in BUILT_IN if n != "consistent_hash"])
def test_unknown_options_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"pools": {"p": {"strategy": {"name": name, "keyy": 1},
                                      "backends": ["http://127.0.0.1:1", "http://127.0.0.1:2"]}}})
    assert err.value.problems == [f"pools.p.strategy.keyy: unknown option for strategy {name}"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_same_seed_same_choices(name: str) -> None:
    """The guard's simulation is seeded: a strategy's randomness comes only from its rng."""
    def run() -> list[str]:
        backends = make_backends([3, 2, 1, 1])
        strategy = make_strategy(name, backends, seed=42)
        return [next(strategy.candidates(PickContext(client_ip=f"10.0.0.{n}"))).name
                for n in range(200)]
    assert run() == run()
