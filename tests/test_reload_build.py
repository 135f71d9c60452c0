"""What a reload builds is built off the event loop, and swapped in whole.

The consistent_hash table (and any strategy's ``precompute``) is made in the check process
(balancer/checker.py), or in a worker thread by ``Fleet.prepare`` when there is none; the loop
only wraps it (``Fleet.apply``). A prepared build made for other
members than the strategy is given is never used: the strategy builds its own, so a plan
that another change overtook cannot put a wrong table in service.
"""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from balancer.app import App
from balancer.backend import Backend
from balancer.config import BackendConfig, StrategyConfig
from balancer.strategies import build_strategy, prepare_strategy
from balancer.strategies.base import PickContext
from balancer.strategies.consistent_hash import ConsistentHash
from tests.support.net import free_port
from tests.support.proc import write_config


def config(weights: list[int], strategy: str = "consistent_hash") -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
            "access_log": False, "guard": {"probation": 0},
            "pools": {"web": {"strategy": strategy, "backends": [
                {"url": f"http://127.0.0.1:{9000 + i}", "name": f"b{i}", "weight": w}
                for i, w in enumerate(weights)]}}}


async def reload_with_spy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> tuple[App, list[threading.Thread]]:
    """Reload a 6-backend consistent_hash pool to new weights, recording the threads of this
    process that built a table; checks the table swapped in."""
    path = write_config(tmp_path / "c.yaml", config([1, 1, 1, 1, 1, 1]))
    app = App(str(path))
    pool = app.pools["web"]
    kept = pool.backends
    threads: list[threading.Thread] = []
    original = ConsistentHash.precompute.__func__  # type: ignore[attr-defined]

    def spy(cls: type[ConsistentHash], members: Any, options: Any) -> Any:
        threads.append(threading.current_thread())
        return original(cls, members, options)

    monkeypatch.setattr(ConsistentHash, "precompute", classmethod(spy))
    write_config(path, config([1, 1, 3, 1, 1, 1]))
    try:
        result = await app.reload()
    finally:
        await app.checker.close()
    assert result.applied, result.problems
    # Swapped in: the same Pool and Backend objects, the new weight, and a table that gives
    # the heavier backend about three times the slots of the others.
    assert app.pools["web"] is pool and pool.backends == kept
    assert [b.weight for b in pool.backends] == [1, 1, 3, 1, 1, 1]
    strategy = pool.strategy
    assert isinstance(strategy, ConsistentHash)
    owned = [0] * 6
    for k in strategy._owner:
        owned[k] += 1
    assert owned[2] > 2 * max(owned[:2] + owned[3:])
    return app, threads


async def test_a_reload_builds_the_hash_table_in_the_check_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, threads = await reload_with_spy(tmp_path, monkeypatch)
    # The check and the table were made in the child (balancer/checker.py): no thread of
    # this process built one.
    assert threads == []


async def test_without_a_check_process_the_table_is_built_in_a_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    _, threads = await reload_with_spy(tmp_path, monkeypatch)
    # Built (by the guard's check and by Fleet.prepare), never on the loop's thread.
    assert threads and threading.main_thread() not in threads


@pytest.mark.parametrize("name", ["consistent_hash", "round_robin", "least_connections"])
def test_a_build_prepared_for_other_members_is_not_used(name: str) -> None:
    def backends(weights: list[int]) -> list[Backend]:
        return [Backend(BackendConfig(f"http://10.0.0.{i}:80", f"b{i}", "http",
                                      f"10.0.0.{i}", 80, w), "web")
                for i, w in enumerate(weights, 1)]

    strategy = StrategyConfig(name)
    now = backends([1, 2, 1, 1])
    stale = prepare_strategy(strategy, tuple((b.url, 1) for b in now))  # weights before
    fresh = prepare_strategy(strategy, tuple((b.url, b.weight) for b in now))
    assert stale is not None and fresh is not None

    def picks(prepared: Any) -> list[str]:
        s = build_strategy(strategy, now, random.Random(7), prepared)
        return [next(iter(s.candidates(PickContext(client_ip=f"10.1.{i // 256}.{i % 256}"))))
                .name for i in range(400)]

    assert picks(stale) == picks(None) == picks(fresh)
