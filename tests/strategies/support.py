"""Builders shared by the strategy tests: real configs, real Backends, a real Pool."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from balancer.backend import Backend
from balancer.config import parse_config
from balancer.pool import Pool
from balancer.strategies import PickContext, Strategy, build_strategy

#: Every built-in strategy, by registry name.
BUILT_IN = ("round_robin", "least_connections", "random", "power_of_two", "ewma",
            "consistent_hash")


def pool_config(weights: Sequence[int], strategy: str | dict[str, Any] = "round_robin",
                first_port: int = 9000) -> Any:
    """A parsed pool ``p`` whose backends ``b0, b1, ...`` carry ``weights`` (never dialled)."""
    backends = [{"url": f"http://127.0.0.1:{first_port + i}", "name": f"b{i}", "weight": w}
                for i, w in enumerate(weights)]
    config = parse_config({"pools": {"p": {"strategy": strategy, "backends": backends}}})
    return config.pools["p"]


def make_backends(weights: Sequence[int], first_port: int = 9000) -> list[Backend]:
    return [Backend(b, "p") for b in pool_config(weights, first_port=first_port).backends]


def make_pool(weights: Sequence[int], strategy: str | dict[str, Any] = "round_robin",
              seed: int = 1) -> Pool:
    config = pool_config(weights, strategy)
    return Pool(config, [Backend(b, "p") for b in config.backends], rng=random.Random(seed),
                clock=lambda: 0.0)


def make_strategy(name: str, backends: Sequence[Backend], seed: int = 1,
                  **options: Any) -> Strategy:
    config = parse_config({"pools": {"p": {
        "strategy": {"name": name, **options},
        "backends": [{"url": b.url, "name": b.name, "weight": b.weight} for b in backends],
    }}}).pools["p"]
    return build_strategy(config.strategy, backends, random.Random(seed))


def sequential_shares(pool: Pool, picks: int,
                      ctx: Callable[[int], PickContext] = lambda n: PickContext(),
                      latency: float = 0.01) -> dict[str, float]:
    """Each backend's share of ``picks`` requests sent one at a time: begin, then finish at
    once with ``latency``, so nothing is ever in flight when the next one is picked."""
    counts: Counter[str] = Counter()
    for n in range(picks):
        b = pool.pick(ctx(n))
        pool.begin(b)
        counts[b.name] += 1
        pool.finish(b, status=200, latency=latency)
    return {b.name: counts[b.name] / picks for b in pool.backends}


def expected_shares(weights: Sequence[int]) -> dict[str, float]:
    total = sum(weights)
    return {f"b{i}": w / total for i, w in enumerate(weights)}
