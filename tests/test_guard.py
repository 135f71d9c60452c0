"""The concentration guard, rule by rule, on parsed configs (the CLI has its own tests).

Strategies defined here are plug-ins the configs name as ``tests.test_guard:Class``: the guard
must judge a strategy by what it does, so the tests give it strategies that misbehave.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from balancer import guard, sameserver
from balancer.backend import Backend
from balancer.config import Config, ConfigError
from balancer.guard import GuardReport, evaluate, format_diff, format_shares
from balancer.loading import parse_config
from balancer.strategies.base import PickContext, Strategy

# --------------------------------------------------------------------------- test strategies


class NaiveLeastConnections(Strategy):
    """Fewest in flight first, ties toward the first backend (Traefik's 3:1 → 10:0 bug)."""

    name = "naive_least_connections"

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        yield from sorted(self.backends, key=lambda b: b.in_flight / b.weight)


class LowestLatency(Strategy):
    """Lowest peak EWMA first, no randomness: one lucky fast answer keeps a backend ahead."""

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        yield from sorted(self.backends, key=lambda b: b.ewma * (b.in_flight + 1))


class FirstUp(Strategy):
    """Always the first backend first; the next ones only when it cannot take the request."""

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        yield from self.backends


class SeededRandom(Strategy):
    """Uniform random choice from the strategy's rng: shows that the guard seeds it."""

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        yield self.rng.choice(self.backends)
        yield from self.backends


class Nothing(Strategy):
    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        return iter(())


class Broken(Strategy):
    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        raise RuntimeError("boom")


class Spy(Strategy):
    """Round robin that records what the pool showed it: overlap and reported latencies."""

    seen_in_flight: ClassVar[list[int]] = []
    seen_busiest: ClassVar[list[int]] = []
    seen_ewma: ClassVar[list[float]] = []

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.turn = 0

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        Spy.seen_in_flight.append(sum(b.in_flight for b in self.backends))
        Spy.seen_busiest.append(max(b.in_flight for b in self.backends))
        Spy.seen_ewma.append(max(b.ewma for b in self.backends))
        self.turn += 1
        n = len(self.backends)
        for k in range(n):
            yield self.backends[(self.turn + k) % n]


# --------------------------------------------------------------------------- helpers


def backends(*weights: int, backup: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [{"name": f"web{i + 1}", "url": f"http://127.0.0.1:{9001 + i}", "weight": w,
             "backup": i in backup} for i, w in enumerate(weights)]


def config(entries: list[dict[str, Any]] | list[str], strategy: Any = "round_robin",
           guard_cfg: dict[str, Any] | None = None, **pool: Any) -> Config:
    return parse_config({"guard": guard_cfg or {},
                         "pools": {"web": {"strategy": strategy, "backends": entries, **pool}}})


def check(cfg: Config, resolve: bool = False) -> GuardReport:
    return evaluate(cfg, resolve=resolve)


# --------------------------------------------------------------------------- the report


def test_balanced_pool_is_accepted_with_its_shares() -> None:
    report = check(config(backends(1, 1, 1)))
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.shares == {"web": {"web1": pytest.approx(1 / 3, abs=0.001),
                                     "web2": pytest.approx(1 / 3, abs=0.001),
                                     "web3": pytest.approx(1 / 3, abs=0.001)}}


def test_report_is_frozen() -> None:
    report = check(config(backends(1, 1)))
    with pytest.raises(AttributeError):
        report.errors = []  # type: ignore[misc]


# --------------------------------------------------------------------------- min_backends


def test_single_backend_is_refused_naming_pool_backend_and_share() -> None:
    report = check(config(backends(1)))
    assert not report.ok
    assert ("pools.web: only 1 distinct active backend: backend web1 would receive 100% of "
            "traffic; guard.min_backends is 2") in report.errors
    assert "pools.web: backend web1 would receive 100% of traffic (max_share 50%)" in report.errors
    assert report.worst_failure == {"web": None}


@pytest.mark.parametrize(("weights", "backup"), [((1, 0, 0), ()), ((1, 1, 1), (1, 2))])
def test_weight_zero_and_backups_are_not_active(weights: tuple[int, ...],
                                                backup: tuple[int, ...]) -> None:
    report = check(config(backends(*weights, backup=backup)))
    assert any("only 1 distinct active backend: backend web1 would receive 100%" in e
               for e in report.errors), report.errors
    assert report.shares["web"]["web1"] == 1.0
    assert report.shares["web"]["web2"] == 0.0


def test_all_backups_means_no_active_backend() -> None:
    report = check(config(backends(1, 1, backup=(0, 1))))
    assert ("pools.web: no active backend (every backend is a backup or has weight 0); "
            "guard.min_backends is 2") in report.errors
    # Backups still serve when there is no primary; the simulation shows where it goes.
    assert report.shares["web"] == {"web1": 0.5, "web2": 0.5}


def test_all_weights_zero_is_no_active_backend() -> None:
    assert check(config(backends(0, 0))).errors == [
        ("pools.web: no active backend (every backend is a backup or has weight 0); "
        "guard.min_backends is 2")]


def test_min_backends_is_configurable() -> None:
    cfg = config(backends(1, 1), guard_cfg={"min_backends": 3})
    assert check(cfg).errors == [
        "pools.web: only 2 distinct active backends (web1 and web2); guard.min_backends is 3"]
    assert check(config(backends(1), guard_cfg={"min_backends": 1, "max_share": 1})).ok


# --------------------------------------------------------------------------- same server


def test_localhost_and_loopback_address_are_one_server() -> None:
    try:
        local = {i[4][0] for i in socket.getaddrinfo("localhost", None)}
    except OSError:
        pytest.skip("localhost does not resolve on this machine")
    if "127.0.0.1" not in local:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    cfg = config([{"name": "web1", "url": "http://localhost:9001"},
                  {"name": "web2", "url": "http://127.0.0.1:9001"}])
    report = check(cfg, resolve=True)
    assert ("pools.web: backends web1 and web2 are the same server (http://localhost:9001, "
            "http://127.0.0.1:9001); together they would receive 100% of traffic"
            ) in report.errors
    assert any(e.startswith("pools.web: only 1 distinct active backend: web1 and web2 are one "
                            "server, which would receive 100%") for e in report.errors)


def test_without_resolving_names_are_compared_as_written() -> None:
    cfg = config([{"name": "web1", "url": "http://localhost:9001"},
                  {"name": "web2", "url": "http://127.0.0.1:9001"}])
    assert check(cfg, resolve=False).ok


@pytest.mark.parametrize(("a", "b", "same"), [
    ("http://[::1]:9001", "http://[0:0:0:0:0:0:0:1]:9001", True),
    ("http://[::ffff:127.0.0.1]:9001", "http://127.0.0.1:9001", True),
    ("http://127.0.0.1:80", "http://127.0.0.1", True),
    ("http://127.1:9001", "http://127.0.0.1:9001", True),
    ("http://0x7f.1:9001", "http://127.0.0.1:9001", True),
    ("http://[::ffff:7f00:1]:9001", "http://127.1:9001", True),
    ("http://127.0.0.1:9001", "http://127.0.0.1:9002", False),
    ("http://127.0.0.1:443", "https://127.0.0.1:443", False),
])
def test_addresses_are_normalised_before_comparing(a: str, b: str, same: bool) -> None:
    report = check(config([{"name": "x", "url": a}, {"name": "y", "url": b}]))
    dup = [e for e in report.errors if "are the same server" in e]
    assert bool(dup) is same, report.errors


@pytest.mark.parametrize("resolve", [False, True])
def test_loopback_written_another_way_is_the_same_server(resolve: bool) -> None:
    # 127.1 is what the C resolver makes 127.0.0.1 of: compared as that, with or without DNS.
    cfg = config([{"name": "web1", "url": "http://127.1:9001"},
                  {"name": "web2", "url": "http://127.0.0.1:9001"}])
    report = check(cfg, resolve=resolve)
    assert ("pools.web: backends web1 and web2 are the same server (http://127.1:9001, "
            "http://127.0.0.1:9001); together they would receive 100% of traffic"
            ) in report.errors
    assert not report.warnings


@pytest.mark.parametrize(("address", "reaches"), [
    ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("::ffff:0.0.0.0", "127.0.0.1"),
    ("0", "127.0.0.1"), ("127.1", "127.0.0.1"), ("::ffff:127.0.0.1", "127.0.0.1"),
    ("localhost", None),
])
def test_an_address_is_compared_as_what_a_connection_to_it_reaches(address: str,
                                                                   reaches: str | None) -> None:
    # The config refuses 0.0.0.0 as written; a name may still resolve to it (an /etc/hosts
    # line, a DNS answer), and then it is the loopback it reaches.
    assert sameserver.normal_ip(address) == reaches


def test_three_entries_for_one_server_are_one_group() -> None:
    cfg = config([{"name": n, "url": "http://[::1]:9001"} for n in ("a", "b", "c")]
                 + [{"name": "d", "url": "http://[::1]:9002"}])
    dup = [e for e in check(cfg).errors if "same server" in e]
    assert dup == [("pools.web: backends a, b and c are the same server (http://[::1]:9001); "
                   "together they would receive 75% of traffic")]


def test_a_name_that_does_not_resolve_is_a_warning_and_compared_by_name() -> None:
    cfg = config([{"name": "web1", "url": "http://no-such-host.invalid:9001"},
                  {"name": "web2", "url": "http://127.0.0.1:9001"}])
    report = check(cfg, resolve=True)
    assert report.ok, report.errors
    assert report.warnings == [("pools.web: backend web1: host 'no-such-host.invalid' does not "
                               "resolve here; compared with the other backends by name only")]


def test_resolving_is_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A resolver that hangs cannot be produced on loopback, so this one test stands in a
    # getaddrinfo that never answers: the guard must give up at its deadline.
    release = threading.Event()
    monkeypatch.setattr(sameserver.socket, "getaddrinfo",
                        lambda *a, **k: release.wait(60) and [])
    monkeypatch.setattr(sameserver, "RESOLVE_TIMEOUT", 0.2)
    cfg = config([{"name": "web1", "url": "http://slow.example:9001"},
                  {"name": "web2", "url": "http://127.0.0.1:9002"}])
    started = time.monotonic()
    try:
        report = check(cfg, resolve=True)
    finally:
        release.set()
    assert time.monotonic() - started < 10  # not 60: the look-up was abandoned
    assert report.ok
    assert any("'slow.example' does not resolve here" in w for w in report.warnings)


# --------------------------------------------------------------------------- shares


def test_weights_9_to_1_are_refused_with_the_share() -> None:
    report = check(config(backends(9, 1)))
    assert report.errors == [("pools.web: backend web1 would receive 90% of traffic "
                             "(max_share 50%)")]
    assert report.shares["web"] == {"web1": 0.9, "web2": 0.1}


@pytest.mark.parametrize("weights", [(1, 1), (2, 1, 1), (51, 49), (1, 1, 1, 1)])
def test_a_share_at_the_limit_or_within_tolerance_passes(weights: tuple[int, ...]) -> None:
    assert check(config(backends(*weights))).ok


def test_a_share_past_the_tolerance_is_refused() -> None:
    # 53% is past 50% + the stated tolerance (2 points).
    assert guard.TOLERANCE == 0.02
    report = check(config(backends(53, 47)))
    assert report.errors == [("pools.web: backend web1 would receive 53% of traffic "
                             "(max_share 50%)")]


def test_max_share_is_configurable() -> None:
    cfg = config(backends(1, 1, 1), guard_cfg={"max_share": 0.3})
    assert len(check(cfg).errors) == 3
    assert check(config(backends(3, 1), guard_cfg={"max_share": 0.75})).ok


def test_a_plugin_that_prefers_the_first_backend_is_refused() -> None:
    report = check(config(backends(1, 1, 1), strategy="tests.test_guard:FirstUp"))
    assert "pools.web: backend web1 would receive 100% of traffic (max_share 50%)" in report.errors


def test_sequential_load_exposes_ties_toward_the_first_backend() -> None:
    """Overlapping requests spread a naive least-connections strategy; one at a time, every
    request sees zero in flight everywhere and the tie goes to web1 (Traefik's 3:1 → 10:0)."""
    cfg = config(backends(1, 1), strategy="tests.test_guard:NaiveLeastConnections")
    concurrent = guard.simulate(cfg.pools["web"], guard.synthetic_traffic(cfg.pools["web"]),
                                concurrency=guard.CONCURRENCY)
    assert concurrent["web1"] < 0.7  # would pass on overlapping traffic alone
    report = check(cfg)
    assert report.errors == [("pools.web: backend web1 would receive 100% of traffic when "
                             "requests arrive one at a time (max_share 50%)")]


def test_sequential_load_exposes_a_naive_latency_aware_strategy() -> None:
    report = check(config(backends(1, 1, 1), strategy="tests.test_guard:LowestLatency"))
    assert len(report.errors) == 1
    assert re.fullmatch(r"pools\.web: backend web\d would receive [\d.]+% of traffic when "
                        r"requests arrive one at a time \(max_share 50%\)", report.errors[0])


def test_the_simulation_overlaps_requests_and_reports_outcomes() -> None:
    cfg = config(backends(1, 1, 1), strategy="tests.test_guard:Spy")
    traffic = guard.synthetic_traffic(cfg.pools["web"], count=600)
    Spy.seen_in_flight.clear()
    Spy.seen_ewma.clear()
    guard.simulate(cfg.pools["web"], traffic, concurrency=8)
    assert max(Spy.seen_in_flight) == 7  # the 8th request sees 7 others in flight
    assert Spy.seen_ewma[0] == 0 and max(Spy.seen_ewma) > 0  # finish() fed latencies back
    Spy.seen_in_flight.clear()
    guard.simulate(cfg.pools["web"], traffic, concurrency=1)
    assert set(Spy.seen_in_flight) == {0}


def test_max_connections_hold_requests_back_until_a_slot_frees() -> None:
    cfg = config(backends(1, 1), strategy="tests.test_guard:Spy", max_connections=1)
    Spy.seen_busiest.clear()
    shares = guard.simulate(cfg.pools["web"], guard.synthetic_traffic(cfg.pools["web"], count=400),
                            concurrency=16)
    # Each server holds one request at a time, as the live pool would enforce; the others
    # wait for a slot rather than overload a backend.
    assert max(Spy.seen_busiest) == 1
    assert shares["web1"] == pytest.approx(0.5, abs=0.02)


def test_the_simulation_is_deterministic() -> None:
    cfg = config(backends(1, 1, 1), strategy="tests.test_guard:SeededRandom")
    first, second = check(cfg), check(cfg)
    assert first.shares == second.shares
    assert first.worst_failure == second.worst_failure
    # It is random (not round robin in disguise) and close to even.
    shares = list(first.shares["web"].values())
    assert len(set(shares)) > 1
    assert all(abs(s - 1 / 3) < 0.02 for s in shares)


def test_a_strategy_that_raises_is_refused_with_the_exception() -> None:
    report = check(config(backends(1, 1), strategy="tests.test_guard:Broken"))
    assert report.errors == [("pools.web: strategy 'tests.test_guard:Broken' failed on simulated "
                             "traffic: RuntimeError: boom")]


def test_a_strategy_that_never_chooses_is_refused() -> None:
    report = check(config(backends(1, 1), strategy="tests.test_guard:Nothing"))
    assert report.errors == [("pools.web: strategy 'tests.test_guard:Nothing' failed on simulated "
                             "traffic: RuntimeError: it chose no backend for any request")]


def test_synthetic_traffic_varies_what_strategies_key_on() -> None:
    cfg = config(backends(1, 1))
    traffic = guard.synthetic_traffic(cfg.pools["web"], count=1000)
    assert len({c.client_ip for c in traffic}) > 990
    assert len({c.path for c in traffic}) > 990
    for name in ("x-user-id", "x-session-id", "authorization", "host", "user-agent"):
        assert len({c.header(name) for c in traffic}) > 20, name
    assert len({c.cookie("session") for c in traffic}) > 990
    assert any(":" in c.client_ip for c in traffic)  # some IPv6 clients too


def test_synthetic_traffic_follows_the_routes() -> None:
    cfg = parse_config({
        "pools": {"api": {"backends": backends(1, 1)}, "web": {"backends": backends(1, 1)}},
        "routes": [{"host": "api.example.com", "path_prefix": "/v1", "pool": "api"},
                   {"pool": "web"}],
    })
    traffic = guard.synthetic_traffic(cfg.pools["api"], [cfg.routes[0]], count=200)
    assert {c.header("host") for c in traffic} == {"api.example.com"}
    assert all(c.path.startswith("/v1/") for c in traffic)


# --------------------------------------------------------------------------- failures


def test_worst_single_failure_is_reported() -> None:
    report = check(config(backends(2, 1, 1)))
    assert report.ok
    failed, taker, share = report.worst_failure["web"]  # type: ignore[misc]
    assert failed in ("web2", "web3") and taker == "web1"
    assert share == pytest.approx(2 / 3, abs=0.02)


def test_two_backends_fail_over_completely() -> None:
    assert check(config(backends(1, 1))).worst_failure == {"web": ("web1", "web2", 1.0)}


def test_max_share_after_failure_refuses_the_worst_case() -> None:
    cfg = config(backends(2, 1, 1), guard_cfg={"max_share_after_failure": 0.6})
    [error] = check(cfg).errors
    assert error.startswith("pools.web: if web")
    assert " fails, web1 takes 6" in error
    assert error.endswith("% of traffic (guard.max_share_after_failure 60%)")
    assert check(config(backends(2, 1, 1), guard_cfg={"max_share_after_failure": 0.7})).ok


def test_backups_take_over_only_when_every_primary_is_down() -> None:
    report = check(config(backends(1, 1, 1, backup=(2,))))
    assert report.shares["web"]["web3"] == 0.0
    assert report.worst_failure["web"] is not None
    assert report.worst_failure["web"][2] == 1.0


# --------------------------------------------------------------------------- the override


def test_allow_concentration_downgrades_every_refusal_to_a_warning_with_the_reason() -> None:
    cfg = config(backends(1), allow_concentration="staging has one server (OPS-123)")
    report = check(cfg)
    assert report.ok and report.errors == []
    assert len(report.warnings) == 2
    for w in report.warnings:
        assert w.startswith("pools.web: ALLOWED CONCENTRATION: ")
        assert w.endswith("accepted because allow_concentration: "
                          "'staging has one server (OPS-123)'")
    assert any("backend web1 would receive 100% of traffic" in w for w in report.warnings)
    assert any("guard.min_backends is 2" in w for w in report.warnings)


def test_allow_concentration_is_per_pool() -> None:
    cfg = parse_config({
        "pools": {"staging": {"backends": backends(1), "allow_concentration": "one box"},
                  "web": {"backends": backends(9, 1)}},
        "routes": [{"host": "staging.example.com", "pool": "staging"}, {"pool": "web"}],
    })
    report = check(cfg)
    assert report.errors == [("pools.web: backend web1 would receive 90% of traffic "
                             "(max_share 50%)")]
    assert all(w.startswith("pools.staging: ALLOWED CONCENTRATION") for w in report.warnings)


# --------------------------------------------------------------------------- routes


def test_a_pool_no_route_reaches_is_a_warning() -> None:
    cfg = parse_config({
        "pools": {"web": {"backends": backends(1, 1)}, "old": {"backends": backends(1, 1)}},
        "routes": [{"pool": "web"}, {"path_prefix": "/old", "pool": "old"}],
    })
    report = check(cfg)
    assert report.ok
    assert report.warnings == ["pools.old: no route reaches this pool; it gets no traffic"]


def test_a_route_behind_a_narrower_one_still_reaches() -> None:
    cfg = parse_config({
        "pools": {"web": {"backends": backends(1, 1)}, "api": {"backends": backends(1, 1)}},
        "routes": [{"path_prefix": "/v1", "pool": "web"}, {"path_prefix": "/v10", "pool": "api"},
                   {"host": "a.example.com", "pool": "api"}, {"pool": "web"}],
    })
    assert check(cfg).warnings == []


# --------------------------------------------------------------------------- formatting


def test_format_shares_aligns_names_and_percentages() -> None:
    text = format_shares(check(config(backends(2, 1, 1))))
    lines = text.splitlines()
    assert lines[:4] == ["pool web", "  web1   50%", "  web2   25%", "  web3   25%"]
    assert lines[4].startswith("  worst single failure: if web")


def test_format_diff_shows_before_and_after() -> None:
    old = check(config(backends(1, 1, 1)))
    new = check(config(backends(1)))
    assert format_diff(old, new).splitlines() == [
        "pool web",
        "  web1   33% → 100%  *",
        "  web2   33% → removed  *",
        "  web3   33% → removed  *",
        "* share changed",
    ]


def test_format_diff_without_a_change_has_no_legend() -> None:
    report = check(config(backends(1, 1)))
    assert format_diff(report, report).splitlines() == [
        "pool web", "  web1   50% → 50%", "  web2   50% → 50%"]


def test_format_diff_shows_added_backends_and_pools() -> None:
    old = check(config(backends(1, 1)))
    new = check(parse_config({
        "pools": {"web": {"backends": backends(1, 1, 1, 1)}, "api": {"backends": backends(1, 1)}},
        "routes": [{"host": "api.example.com", "pool": "api"}, {"pool": "web"}],
    }))
    lines = format_diff(old, new).splitlines()
    assert lines[:5] == ["pool web", "  web1   50% → 25%  *", "  web2   50% → 25%  *",
                         "  web3   new → 25%  *", "  web4   new → 25%  *"]
    assert lines[5:] == ["pool api (new pool)", "  web1   new → 50%  *", "  web2   new → 50%  *",
                         "* share changed"]
    assert format_diff(new, old).splitlines()[-4] == "pool api (removed)"


def test_format_diff_without_an_old_report() -> None:
    assert format_diff(None, check(config(backends(1, 1)))).splitlines()[1] == \
        "  web1   new → 50%  *"


# --------------------------------------------------------------------------- hash keys


def hashed(key: str, routes: list[dict[str, Any]], **pool: Any) -> Config:
    pytest.importorskip("balancer.strategies.consistent_hash")
    return parse_config({
        "pools": {"api": {"strategy": {"name": "consistent_hash", "key": key},
                          "backends": backends(1, 1, 1), **pool},
                  "web": {"backends": backends(1, 1)}},
        "routes": [*routes, {"pool": "web"}],
    })


def test_hashing_on_a_host_every_route_pins_is_refused() -> None:
    cfg = hashed("header:Host", [{"host": "api.example.com", "pool": "api"}])
    report = check(cfg)
    assert ("pools.api: consistent_hash key header:host only takes the values the routes to "
            "this pool pin (api.example.com), so every request hashes alike; ") in (
        report.errors[0])
    assert report.errors[0].endswith("would receive 100% of traffic")
    # The simulation sees the same thing on its own: the routes pin the Host it sends.
    assert any(e.endswith("would receive 100% of traffic (max_share 50%)") for e in report.errors)


def test_two_pinned_hosts_hash_to_at_most_two_backends() -> None:
    cfg = hashed("header:host", [{"host": "a.example.com", "pool": "api"},
                                 {"host": "b.example.com", "path_prefix": "/x", "pool": "api"}])
    assert any("(a.example.com, b.example.com), so requests hash to at most 2 backends" in e
               for e in check(cfg).errors)


@pytest.mark.parametrize("routes", [
    [{"path_prefix": "/api", "pool": "api"}],                   # any host reaches it
    [{"host": "*.example.com", "pool": "api"}],                 # many hosts reach it
])
def test_hashing_on_a_host_that_varies_is_accepted(routes: list[dict[str, Any]]) -> None:
    report = check(hashed("header:Host", routes))
    assert report.ok, report.errors


@pytest.mark.parametrize("key", ["client_ip", "path", "header:X-Tenant", "cookie:sid"])
def test_hashing_on_what_varies_is_accepted(key: str) -> None:
    cfg = hashed(key, [{"host": "api.example.com", "pool": "api"}])
    report = check(cfg)
    assert report.ok, report.errors
    assert all(abs(s - 1 / 3) < 0.03 for s in report.shares["api"].values())


REPLAY = "see how real traffic splits with balancer check --replay LOG"
BOUND = "balance_factor (e.g. 1.25) bounds any one backend's load; "


@pytest.mark.parametrize(("key", "says"), [
    ("header:X-Tenant", "consistent_hash key header:X-Tenant: requests without it fall back to "
                        "the client address, and clients behind one NAT or proxy share one "
                        "backend; "),
    ("cookie:sid", "consistent_hash key cookie:sid: requests without it fall back to the client "
                   "address, and clients behind one NAT or proxy share one backend; "),
    ("path", "consistent_hash key path: requests for one path share one backend, so a site where "
             "most requests are for / sends most of them to one; "),
    ("header:Host", "consistent_hash key header:Host: a site served under one name sends every "
                    "request to one backend; "),
    ("client_ip", "consistent_hash key client_ip: clients behind one NAT or proxy (or a CDN "
                  "edge) share an address, and so one backend; "),
])
def test_a_hash_key_gets_one_warning_pointing_to_replay(key: str, says: str) -> None:
    # Simulated traffic always carries the key; real clients may not (issue 9): one line, a
    # warning (the config is accepted), naming the pool.
    report = check(hashed(key, [{"path_prefix": "/api", "pool": "api"}]))
    assert report.ok, report.errors
    assert report.warnings == [f"pools.api: {says}{BOUND}{REPLAY}"]


def test_with_balance_factor_the_warning_only_points_to_replay() -> None:
    cfg = parse_config({"pools": {"api": {
        "strategy": {"name": "consistent_hash", "key": "client_ip", "balance_factor": 1.25},
        "backends": backends(1, 1)}}})
    [line] = check(cfg).warnings
    assert line.endswith("share an address, and so one backend; " + REPLAY)


def test_a_pinned_host_key_is_refused_without_the_warning() -> None:
    report = check(hashed("header:Host", [{"host": "api.example.com", "pool": "api"}]))
    assert not report.ok
    assert report.warnings == []


def test_the_stream_varies_the_header_or_cookie_a_hash_key_names() -> None:
    cfg = hashed("cookie:sid", [{"pool": "api"}])
    traffic = guard.synthetic_traffic(cfg.pools["api"], count=500)
    assert len({c.cookie("sid") for c in traffic}) == 500
    cfg = hashed("header:X-Tenant", [{"pool": "api"}])
    traffic = guard.synthetic_traffic(cfg.pools["api"], count=500)
    assert len({c.header("x-tenant") for c in traffic}) == 500


def test_a_constant_hash_key_never_loads() -> None:
    with pytest.raises(ConfigError) as info:
        hashed("tenant-42", [{"pool": "api"}])
    assert info.value.problems[0].startswith("pools.api.strategy.key: must be client_ip, path, ")


def test_allow_concentration_covers_a_pinned_hash_key() -> None:
    cfg = hashed("header:Host", [{"host": "api.example.com", "pool": "api"}],
                 allow_concentration="one tenant per host, by design")
    report = check(cfg)
    assert report.ok
    assert any("header:host only takes the values" in w and "by design" in w
               for w in report.warnings)


# --------------------------------------------------------------------------- every built-in


def builtin(name: str) -> str:
    """A built-in strategy name, skipping until its module has landed."""
    from balancer.strategies import STRATEGIES

    pytest.importorskip(STRATEGIES[name].partition(":")[0])
    return name


BUILTINS = ["round_robin", "least_connections", "random", "power_of_two", "consistent_hash",
            "ewma"]


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("weights", [(1, 1), (1, 1, 1), (2, 1, 1), (1, 1, 1, 1, 1)])
def test_every_builtin_is_accepted_when_it_spreads(name: str, weights: tuple[int, ...]) -> None:
    """Within the tolerance, including the randomised and latency-aware ones, in both passes."""
    report = check(config(backends(*weights), strategy=builtin(name)))
    assert report.ok, report.errors
    total = sum(weights)
    for i, w in enumerate(weights):
        assert report.shares["web"][f"web{i + 1}"] == pytest.approx(w / total, abs=0.03)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_is_refused_at_9_to_1(name: str) -> None:
    [error] = check(config(backends(9, 1), strategy=builtin(name))).errors
    found = re.fullmatch(r"pools\.web: backend web1 would receive ([\d.]+)% of traffic"
                         r"( when requests arrive one at a time)? \(max_share 50%\)", error)
    assert found, error
    assert 87 <= float(found.group(1)) <= 93


def test_simulated_pools_do_not_log_as_if_they_were_live(caplog: pytest.LogCaptureFixture) -> None:
    """A reload simulates while the proxy serves: a simulated panic must not reach the logs,
    while a real pool's panic still does."""
    from balancer.pool import Pool

    cfg = config(backends(1, 1, 1), panic_threshold=0.9)
    with caplog.at_level("WARNING", logger="balancer.pool"):
        report = check(cfg)
        assert report.worst_failure["web"] is not None  # failures were simulated, in panic
        assert [r for r in caplog.records if "panic" in r.getMessage()] == []
        live = [Backend(b, "web") for b in cfg.pools["web"].backends]
        pool = Pool(cfg.pools["web"], live)
        live[0].healthy = False
        pool.state_changed()
    assert any("panic: only 2 of 3 backends healthy" in r.getMessage() for r in caplog.records)
