"""DNS service discovery against a real DNS server on loopback, through the real proxy.

The DNS server (tests/support/dns.py) answers real queries on a free UDP port and its records
change while the proxy runs. Backends are real aiohttp servers on distinct loopback addresses
(127.0.0.2, 127.0.0.3, … all on one port, since A records carry no port), each answering with
its own address. The proxy is the real App in-process (so tests can look at its live objects),
the real CLI for ``balancer check``, or ``balancer run --workers 2`` (each worker told apart by
its request ids' prefix, as the backends see them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer.app import App
from balancer.config import ConfigError, parse_config
from balancer.discovery import MIN_INTERVAL, expand, next_delay
from tests.support.dns import DNSServer
from tests.support.net import free_port, run_app
from tests.support.proc import BalancerProcess, RunningBalancer, run_cli, write_config
from tests.support.traffic import Traffic, until

WAIT = 10.0
NAME = "web.balancer.test"
IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    backends = Fleet()
    try:
        yield backends
    finally:
        await backends.aclose()


def backend_app(name: str, probes: Counter[str],
                served: set[tuple[str, str]] | None = None) -> web.Application:
    """Answers with ``name``; ``/slow?s=0.5`` answers after that many seconds; counts the
    health probes (``/healthz``) it gets in ``probes[name]``; adds (the request id's process
    prefix, ``name``) to ``served`` for every other request."""

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/healthz":
            probes[name] += 1
        elif served is not None:
            served.add((request.headers.get("X-Request-ID", "")[:8], name))
        delay = float(request.query.get("s", "0"))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class Fleet:
    """Backends on distinct loopback addresses sharing one port, started and stopped singly."""

    def __init__(self) -> None:
        self.port = free_port(IPS[0])
        self.probes: Counter[str] = Counter()
        #: (request id prefix: which proxy process sent it, address) of the requests served.
        self.served: set[tuple[str, str]] = set()
        self._running: dict[str, AsyncExitStack] = {}

    async def start(self, *ips: str) -> None:
        for ip in ips:
            stack = AsyncExitStack()
            await stack.enter_async_context(run_app(backend_app(ip, self.probes, self.served),
                                                     host=ip, port=self.port))
            self._running[ip] = stack

    async def stop(self, ip: str) -> None:
        await self._running.pop(ip).aclose()

    async def aclose(self) -> None:
        for ip in list(self._running):
            await self.stop(ip)


def config(dns: DNSServer, port: int, entry: dict[str, Any] | None = None,
           **top: Any) -> dict[str, Any]:
    """One pool ``web`` whose only entry is the discovered name (plus ``entry`` settings)."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "resolver": [dns.nameserver],
        "pools": {"web": {"backends": [{"url": f"http://{NAME}:{port}", "discovery": "dns",
                                        "resolve_interval": "1s", **(entry or {})}],
                          **top.pop("pool", {})}},
        **top,
    }


async def settle(traffic: Traffic, answered: set[str], n: int = 30) -> None:
    """Wait until ``n`` requests in a row are answered by exactly ``answered``."""
    async with asyncio.timeout(WAIT):
        while set(await traffic.sample(n)) != answered:
            pass


@asynccontextmanager
async def running(tmp_path: Path, data: dict[str, Any]) -> AsyncIterator[App]:
    """The App for ``data``, started; drained at the end."""
    app = App(str(write_config(tmp_path / "balancer.yaml", data)))
    await app.start()
    try:
        yield app
    finally:
        await app.drain(2.0)


def addresses(app: App) -> set[str]:
    return {b.host for b in app.pools["web"].backends}


async def admin_get(app: App, path: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://{app.admin.address}{path}") as r:
        assert r.status == 200
        return await r.text()


async def concentrated_metric(app: App) -> str:
    return next(line for line in (await admin_get(app, "/metrics")).splitlines()
                if line.startswith('balancer_pool_concentrated{pool="web"}'))


# --------------------------------------------------------------------------- config


def test_config_keys_and_their_mistakes() -> None:
    cfg = parse_config({
        "resolver": ["127.0.0.1:5353", "10.0.0.2", "[::1]:53"],
        "pools": {"web": {"backends": [
            {"url": f"http://{NAME}:8000", "discovery": "dns", "resolve_interval": "2s"}]}},
    })
    assert [str(a) for a in cfg.resolver] == ["127.0.0.1:5353", "10.0.0.2:53", "[::1]:53"]
    (entry,) = cfg.pools["web"].backends
    assert (entry.name, entry.discovery, entry.resolve_interval) == (NAME, "dns", 2.0)

    with pytest.raises(ConfigError) as bad:
        parse_config({
            "resolver": ["dns.example:53"],
            "pools": {"web": {"backends": [
                {"url": "http://10.0.0.1:8000", "discovery": "dns"},
                {"url": "http://a.test:1", "resolve_interval": "1s"},
                {"url": "http://b.test:1", "discovery": "srv"},
                {"url": "http://c.test:1", "discovery": "dns", "resolve_intervall": "1s"}]}},
        })
    assert bad.value.problems == [
        ("resolver[0]: must be a nameserver's IP address, optionally with a port, like 10.0.0.2"
         " or 10.0.0.2:53 (a name would need a resolver itself), got 'dns.example:53'"),
        ("pools.web.backends[0].url: discovery: dns needs a host name to resolve, got the"
         " address '10.0.0.1'"),
        "pools.web.backends[1].resolve_interval: only applies with discovery: dns",
        ("pools.web.backends[2].discovery: must be \"dns\" (the only kind of discovery),"
         " got 'srv'"),
        ("pools.web.backends[3].resolve_intervall: unknown key (did you mean"
         " 'resolve_interval'?)"),
    ]


def test_next_resolution_follows_the_ttl_within_bounds() -> None:
    entry = parse_config({"pools": {"web": {"backends": [
        {"url": f"http://{NAME}:80", "discovery": "dns", "resolve_interval": "30s"}]}}}
    ).pools["web"].backends[0]
    assert next_delay(entry, 5) == 5  # the answer expires before the interval
    assert next_delay(entry, 300) == 30  # the interval comes first
    assert next_delay(entry, 0) == MIN_INTERVAL  # never faster than the floor
    assert next_delay(entry, None) == 30


# --------------------------------------------------------------------------- load time


def test_expand_turns_the_name_into_one_backend_per_address(dns_server: DNSServer) -> None:
    dns_server.set(NAME, ["127.0.0.3", "127.0.0.2", "::1"], ttl=30)
    cfg = expand(parse_config(config(dns_server, 8000, {"weight": 3, "max_connections": 7})))
    found = cfg.pools["web"].backends
    assert [b.name for b in found] == [f"{NAME}@127.0.0.2:8000", f"{NAME}@127.0.0.3:8000",
                                       f"{NAME}@[::1]:8000"]
    assert [b.url for b in found] == ["http://127.0.0.2:8000", "http://127.0.0.3:8000",
                                      "http://[::1]:8000"]
    assert {(b.weight, b.max_connections, b.discovery) for b in found} == {(3, 7, None)}
    assert {b.discovered_from.name for b in found if b.discovered_from} == {NAME}
    assert expand(cfg) is cfg  # nothing left to resolve


def test_a_name_that_does_not_resolve_is_invalid_and_says_where(dns_server: DNSServer) -> None:
    data = config(dns_server, 8000)
    with pytest.raises(ConfigError) as nx:
        expand(parse_config(data))
    assert nx.value.problems == [
        f"pools.web.backends[0].url: discovery: {NAME}: no such name (NXDOMAIN)"]

    dns_server.set(NAME, ["127.0.0.2"])
    dns_server.fail("drop")  # a resolver that never answers: bounded, then one clear line
    started = time.monotonic()
    with pytest.raises(ConfigError) as down:
        expand(parse_config(data))
    assert down.value.problems == [
        f"pools.web.backends[0].url: discovery: {NAME}: DNS timeout after 2s"]
    assert time.monotonic() - started < WAIT


def test_check_judges_the_addresses_not_the_name(dns_server: DNSServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "web.yaml", config(dns_server, 8000))
    dns_server.set(NAME, ["127.0.0.2"])
    one = run_cli("check", "-c", str(cfg))
    assert one.returncode == 1, one.stderr
    assert (f"{cfg}: pools.web: only 1 distinct active backend: backend {NAME}@127.0.0.2:8000"
            f" would receive 100% of traffic; guard.min_backends is 2") in one.stderr

    dns_server.set(NAME, IPS[:3])
    three = run_cli("check", "-c", str(cfg))
    assert three.returncode == 0, three.stderr
    for ip in IPS[:3]:
        assert f"{NAME}@{ip}:8000   33%" in three.stdout, three.stdout


# --------------------------------------------------------------------------- run time


async def test_scale_up_new_address_takes_traffic_and_old_ones_keep_their_state(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path) -> None:
    await fleet.start(*IPS[:3])
    dns_server.set(NAME, IPS[:2])
    checked = config(dns_server, fleet.port,
                     pool={"health_check": {"path": "/healthz", "interval": "200ms"}})
    async with running(tmp_path, checked) as app:
        before = {b.host: b for b in app.pools["web"].backends}
        async with Traffic(app.address.port) as load:
            await settle(load, set(IPS[:2]))
            dns_server.set(NAME, IPS[:3])
            await settle(load, set(IPS[:3]))
        assert load.failures == []
        after = {b.host: b for b in app.pools["web"].backends}
        assert after[IPS[0]] is before[IPS[0]] and after[IPS[1]] is before[IPS[1]]
        assert after[IPS[0]].requests_total > 0 and after[IPS[2]].requests_total > 0
        assert app.pools["web"].discovery_refused is None
        # The health checker heard of the new address too: it is probed like the others.
        await until(lambda: fleet.probes[IPS[2]] >= 2, "health probes of the new address")


async def test_scale_down_under_load_drains_without_a_failed_request(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="balancer.discovery")
    await fleet.start(*IPS[:3])
    dns_server.set(NAME, IPS[:3])
    async with running(tmp_path, config(dns_server, fleet.port)) as app:
        gone = next(b for b in app.pools["web"].backends if b.host == IPS[2])
        url = f"http://127.0.0.1:{app.address.port}/slow?s=1.0"
        async with Traffic(app.address.port) as load, aiohttp.ClientSession() as session:
            await settle(load, set(IPS[:3]))
            # Slow requests in flight to every address while the name shrinks.
            slow = [asyncio.create_task(session.get(url)) for _ in range(6)]
            await until(lambda: gone.in_flight > 0, "a slow request at the leaving address")
            dns_server.set(NAME, IPS[:2])
            await until(lambda: addresses(app) == set(IPS[:2]), "the address removed")
            assert gone.draining
            responses = await asyncio.gather(*slow)
            assert sorted(r.status for r in responses) == [200] * 6
            assert IPS[2] in {await r.text() for r in responses}  # finished where it began
            # Once its last request is done its connections close; then it may go away.
            await until(lambda: gone.connections is None or gone.connections.closed,
                        "the drained backend's connections closed")
            await fleet.stop(IPS[2])
            await settle(load, set(IPS[:2]), n=60)
        assert load.failures == [], load.failures[:5]
        assert load.total > 100
        assert f"now resolves to 2 address(es) (removed {IPS[2]}): applied" in caplog.text


async def test_collapse_to_one_address_is_refused_and_raises_the_concentration_metric(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    await fleet.start(*IPS[:2])
    dns_server.set(NAME, IPS[:2])
    async with running(tmp_path, config(dns_server, fleet.port)) as app:
        pool = app.pools["web"]
        assert (await concentrated_metric(app)).endswith(" 0.0")
        async with Traffic(app.address.port) as load:
            await settle(load, set(IPS[:2]))
            asked = time.monotonic()
            dns_server.set(NAME, IPS[:1])
            await until(lambda: pool.discovery_refused is not None, "the refusal")
            assert dns_server.queries_for(NAME, since=asked)
            # The pool keeps its last good set, and both addresses keep serving.
            assert addresses(app) == set(IPS[:2])
            assert set(await load.sample(40)) == set(IPS[:2])
            assert (await concentrated_metric(app)).endswith(" 1.0")
            status = json.loads(await admin_get(app, "/status"))
            assert status["pools"]["web"]["discovery_refused"] == pool.discovery_refused
            assert (pool.discovery_refused or "").startswith(f"{NAME} resolves to {IPS[0]}: ")
            refusals = [r.getMessage() for r in caplog.records
                        if "discovery change refused" in r.getMessage()]
            assert len(refusals) == 1, refusals  # logged once, not at every look-up
            assert (f"pool web: discovery change refused, keeping the last good set: {NAME}"
                    f" now resolves to {IPS[0]} (removed {IPS[1]}), and the guard says: "
                    f"only 1 distinct active backend") in refusals[0]
            # A reload now resolves the name again and is refused the same way.
            reload = await app.reload()
            assert not reload.applied and addresses(app) == set(IPS[:2])
            assert any("only 1 distinct active backend" in line for line in reload.problems)
            assert pool.discovery_refused is not None

            # DNS recovers: the flag and the metric clear.
            dns_server.set(NAME, IPS[:2])
            await until(lambda: pool.discovery_refused is None, "the refusal cleared")
            assert (await concentrated_metric(app)).endswith(" 0.0")
        assert load.failures == []


async def test_allow_concentration_lets_the_collapse_through_with_a_warning(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    await fleet.start(*IPS[:2])
    dns_server.set(NAME, IPS[:2])
    data = config(dns_server, fleet.port, pool={"allow_concentration": "canary pool"})
    async with running(tmp_path, data) as app:
        dns_server.set(NAME, IPS[:1])
        await until(lambda: addresses(app) == {IPS[0]}, "the single address applied")
        assert app.pools["web"].discovery_refused is None
        assert "ALLOWED CONCENTRATION" in caplog.text


async def test_ttl_shorter_than_the_interval_is_respected_and_the_floor_holds(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path) -> None:
    await fleet.start(*IPS[:3])
    dns_server.set(NAME, IPS[:2], ttl=1)
    data = config(dns_server, fleet.port, {"resolve_interval": "1h"})
    async with running(tmp_path, data) as app:
        # Re-asked when the answer expires (1 s), not after resolve_interval (1 h).
        dns_server.set(NAME, IPS[:3], ttl=0)
        await until(lambda: addresses(app) == set(IPS[:3]), "the TTL-driven look-up")
        # TTL 0 does not make it spin: at most one look-up (A + AAAA) per MIN_INTERVAL.
        since = time.monotonic()
        await asyncio.sleep(3 * MIN_INTERVAL)
        rounds = len(dns_server.queries_for(NAME, since=since)) / 2
        assert 1 <= rounds <= 4, dns_server.queries_for(NAME, since=since)


@pytest.mark.parametrize("outage", ["servfail", "stopped"])
async def test_resolver_failure_keeps_the_last_good_set(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        outage: str) -> None:
    await fleet.start(*IPS[:2])
    dns_server.set(NAME, IPS[:2])
    async with running(tmp_path, config(dns_server, fleet.port)) as app:
        pool = app.pools["web"]
        kept = set(pool.backends)
        if outage == "stopped":
            dns_server.stop()  # nothing answers: each look-up times out
        else:
            dns_server.fail(outage)
        await until(lambda: "keeping the last good set" in caplog.text, "the warning")
        async with Traffic(app.address.port) as load:
            await asyncio.sleep(2 * MIN_INTERVAL)  # further failed look-ups change nothing
            assert set(await load.sample(20)) == set(IPS[:2])
        assert set(pool.backends) == kept and load.failures == []
        assert pool.discovery_refused is None  # a failure is not a concentration
        warnings = [r for r in caplog.records if "keeping the last good set" in r.getMessage()]
        assert len(warnings) == 1, [w.getMessage() for w in warnings]


async def test_reload_reseeds_discovery(dns_server: DNSServer, fleet: Fleet,
                                        tmp_path: Path) -> None:
    await fleet.start(*IPS)
    dns_server.set(NAME, IPS[:2])
    dns_server.set("api.balancer.test", IPS[2:])
    data = config(dns_server, fleet.port)
    async with running(tmp_path, data) as app:
        assert addresses(app) == set(IPS[:2])
        entry = data["pools"]["web"]["backends"][0]
        entry["url"] = f"http://api.balancer.test:{fleet.port}"
        write_config(Path(app.config_path), data)
        assert (await app.reload()).applied
        assert addresses(app) == set(IPS[2:])
        # The new name is followed, the old one no longer.
        dns_server.set(NAME, IPS[:1])
        dns_server.set("api.balancer.test", IPS[1:])
        await until(lambda: addresses(app) == set(IPS[1:]), "the new name followed")
        assert app.pools["web"].discovery_refused is None


async def test_a_discovery_change_is_on_probation_and_rolled_back_when_it_concentrates(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """DNS drops a healthy replica while another one is dead: the guard accepts two addresses,
    but only one is in rotation. Probation sees the change (not a death during it) is to blame,
    restores the three addresses, and later offers of the same set are not applied again."""
    caplog.set_level(logging.WARNING)
    await fleet.start(*IPS[:2])  # IPS[2] resolves but nothing listens there
    dns_server.set(NAME, IPS[:3])
    data = config(dns_server, fleet.port, guard={"probation": "10s"},
                  pool={"health_check": {"path": "/healthz", "interval": "200ms",
                                         "unhealthy_threshold": 1}, "panic_threshold": 0.3})
    async with running(tmp_path, data) as app:
        await until(lambda: not app.pools["web"].backends[2].healthy, "IPS[2] down")
        async with Traffic(app.address.port) as load:
            await settle(load, set(IPS[:2]))
            dns_server.set(NAME, [IPS[1], IPS[2]])
            await until(lambda: app.rollbacks == 1, "the discovery change rolled back")
            assert addresses(app) == set(IPS[:3])
            await settle(load, set(IPS[:2]))
            await asyncio.sleep(2.5)  # two more offers of the same set: not applied
            assert addresses(app) == set(IPS[:3]) and app.rollbacks == 1
        assert load.failures == []
        results = [e["result"] for e in app.reload_events]
        assert results == ["applied", "rolled_back"], app.reload_events
        assert app.reload_events[0]["reason"] == "DNS discovery change"
        assert "1 of 2 backends down (health check)" in app.reload_events[1]["reason"]
        said = [r.getMessage() for r in caplog.records
                if "rebuilds a config rolled back" in r.getMessage()]
        assert len(said) == 1, said


async def by_worker(fleet: Fleet, url: str, n: int = 60) -> dict[str, set[str]]:
    """``n`` GETs, each on a new connection (the kernel spreads them over the workers): the
    addresses each proxy process (its request-id prefix) sent them to."""
    fleet.served.clear()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        for _ in range(n):
            async with s.get(url + "/") as r:
                assert r.status == 200, await r.text()
    seen: dict[str, set[str]] = {}
    for worker, ip in fleet.served:
        seen.setdefault(worker, set()).add(ip)
    return seen


async def test_every_worker_takes_a_discovery_change_and_none_takes_a_refused_one(
        dns_server: DNSServer, fleet: Fleet, tmp_path: Path) -> None:
    # `balancer run --workers 2`: the supervisor resolves and judges, the workers follow.
    await fleet.start(*IPS[:3])
    dns_server.set(NAME, IPS[:2])
    data = config(dns_server, fleet.port)
    rb = RunningBalancer(tmp_path, data["pools"], resolver=data["resolver"])
    rb.proc = BalancerProcess(rb.path, "--workers", "2")
    async with rb:
        seen = await by_worker(fleet, rb.url)
        assert len(seen) == 2 and all(ips == set(IPS[:2]) for ips in seen.values()), seen

        mark = rb.proc.mark()
        dns_server.set(NAME, IPS[:3])
        await rb.proc.wait_for("now resolves to 3 address", since=mark)
        async with asyncio.timeout(WAIT):  # every worker applies the supervisor's change
            while len(seen := await by_worker(fleet, rb.url)) != 2 or any(
                    ips != set(IPS[:3]) for ips in seen.values()):
                pass

        # One address left: concentration, refused once for all; no worker moves.
        mark = rb.proc.mark()
        dns_server.set(NAME, IPS[2:3])
        await rb.proc.wait_for("discovery change refused", since=mark)
        await asyncio.sleep(0.5)
        for _ in range(2):
            seen = await by_worker(fleet, rb.url)
            assert len(seen) == 2 and all(ips == set(IPS[:3]) for ips in seen.values()), seen
        refusals = [line for line in rb.proc.lines_since(mark)
                    if "discovery change refused" in line]
        assert len(refusals) == 1, refusals  # the supervisor's, once: no worker resolves
