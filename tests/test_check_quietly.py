"""A reload's check shares the interpreter with the serving loop (balancer/gil.py): it must
leave no cyclic garbage for the collector to find later, and the YAML loader that gives way
between tokens must answer exactly what ``yaml.safe_load`` answers."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.config import ConfigError, parse_yaml
from balancer.guard import evaluate
from balancer.loading import load_config, parse_config
from balancer.simulation import Simulation


def hashed_pool(n: int) -> dict[str, Any]:
    return {"pools": {"web": {
        "strategy": "consistent_hash",
        "backends": [{"name": f"b{i}", "url": f"http://127.0.0.1:{9000 + i}",
                      "weight": 2 if i == 3 else 1} for i in range(n)]}}}


def test_a_check_leaves_no_cyclic_garbage() -> None:
    """Every simulated pass used to leave Simulation → Pool → Simulation behind (~90 objects a
    pass, 34 passes for 16 backends): the next young collection, in a reload's thread or the
    loop's, then paid for all of them at once."""
    config = parse_config(hashed_pool(16))
    gc.collect()
    was = gc.isenabled()
    gc.disable()  # nothing collected meanwhile: what the check leaves is counted below
    try:
        report = evaluate(config, resolve=False)
        found = gc.collect()
    finally:
        if was:
            gc.enable()
    assert report.ok, report.errors
    assert found == 0


def test_a_replay_simulation_is_freed_without_the_collector() -> None:
    gc.collect()
    gc.disable()
    try:
        sim = Simulation(parse_config(hashed_pool(3)).pools["web"])
        sim.advance(1.0)
        assert sim.now == 1.0
        del sim
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0


@pytest.mark.parametrize("text", [
    "pools:\n  web:\n    backends: [http://127.0.0.1:9001, http://127.0.0.1:9002]\n",
    "a: &x {k: [1, 2.5, -3, ~, true, 'q''s', \"e\\n\"]}\nb: *x\nc: |\n  block\nd: >-\n  f\n",
    "",
])
def test_the_yaml_loader_reads_what_safe_load_reads(text: str) -> None:
    assert parse_yaml(text, "x.yaml") == yaml.safe_load(text)


@pytest.mark.parametrize("text", [
    "pools:\n  web:\n\tbackends: []\n",  # a tab the C loader would take
    "a: [1,\t2]\n",
    "a: {b: 1\n",
    "a: *missing\n",
    "- a\nb: 1\n",
])
def test_the_yaml_loader_refuses_what_safe_load_refuses_in_the_same_words(
        tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(yaml.YAMLError) as expected:
        yaml.safe_load(text)
    mark = expected.value.problem_mark
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.problems == [f"{f}: line {mark.line + 1}, column {mark.column + 1}: "
                                   f"invalid YAML: {expected.value.problem}"]


def test_a_config_parses_alike_in_a_worker_thread(tmp_path: Path) -> None:
    """In a worker thread the loader steps aside now and then (balancer/gil.py); the result is
    the same config."""
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(hashed_pool(16)))
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(load_config(f)))
    worker.start()
    worker.join(30)
    assert got == [load_config(f)]
