"""DNS service discovery: a backend entry whose name resolves to many addresses, one backend each.

``discovery: dns`` on a backend entry makes its url's host a name to resolve (a Kubernetes
headless Service, a compose service scaled to N replicas); every address it resolves to is a
backend named ``<entry name>@<address>:<port>`` with the entry's weight, backup flag and
max_connections. Whom to ask is the top-level ``resolver`` list (default: /etc/resolv.conf),
as nginx's ``resolver`` and HAProxy's ``resolvers`` do. dnspython does the DNS: it takes custom
nameservers and ports, reports TTLs and has an asyncio resolver; a DNS client is not ours to
write.

Two moments, one rule: the guard judges the real set of addresses, never the name.

- **Load time** (``balancer check``, start, every reload): ``expand`` resolves each name once,
  with a bounded timeout, and replaces the entry by the backends it finds, so the guard sees the
  real set: a name with one address in a pool that needs two is refused like any other
  concentration. A name that does not resolve makes the config invalid, with the entry's path.
- **Run time**: ``DiscoveryService`` re-resolves each name at min(resolve_interval, TTL), but
  never more often than ``MIN_INTERVAL``. A new answer becomes a candidate config (the pool with
  that entry's backends replaced) that the guard judges before anything changes; when it passes,
  the App swaps it in as it applies a reload: addresses that stay keep their Backend object
  (state, counters, warm connections), new ones join, and gone ones drain (no new requests,
  in-flight ones finish, then their connections close). When the guard refuses it (the name
  collapsed to one address), the pool keeps its last good set, a warning is logged once, and
  ``pool.discovery_refused`` raises ``balancer_pool_concentrated`` (and shows on /status) until
  DNS recovers or a reload judges afresh. Such a reload resolves the name again, so while DNS
  still gives one address the reload is refused too: the last good set keeps serving.

A look-up that fails (timeout, SERVFAIL) or that finds no address at all (NXDOMAIN, no records)
keeps the last good set: a DNS hiccup must not empty a pool, and serving from addresses that
may be stale is never worse than serving none (health checks take dead ones out). HAProxy's
``hold nx`` / ``hold timeout`` make the same choice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from balancer.appview import AppView
from balancer.config import (
    Address,
    BackendConfig,
    Config,
    ConfigError,
    PoolConfig,
    default_backend_name,
)
from balancer.guard import GuardReport, evaluate

log = logging.getLogger("balancer.discovery")

#: Never re-resolve a name more often than this (seconds), whatever its TTL says.
MIN_INTERVAL = 1.0
#: Overall bound on one name's look-up (A and AAAA together), at load time and at run time.
TIMEOUT = 2.0
#: Bound on one query to one nameserver, within TIMEOUT (a lost packet is retried once).
QUERY_TIMEOUT = 1.0

R = TypeVar("R", bound=dns.resolver.BaseResolver)


class ResolveError(Exception):
    """A name gave no usable answer; the message says which and why, in one line."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a name resolves to now: sorted addresses, and the lowest TTL among the answers."""

    addresses: tuple[str, ...]
    ttl: float | None


# --------------------------------------------------------------------------- resolving


def make_resolver(nameservers: Sequence[Address]) -> dns.resolver.Resolver:
    """A blocking resolver (load time) asking ``nameservers``, or the system's."""
    return _configure(dns.resolver.Resolver, nameservers)


def make_async_resolver(nameservers: Sequence[Address]) -> dns.asyncresolver.Resolver:
    """An asyncio resolver (run time) asking ``nameservers``, or the system's."""
    return _configure(dns.asyncresolver.Resolver, nameservers)


def _configure(cls: type[R], nameservers: Sequence[Address]) -> R:
    """A resolver with no cache of its own (our schedule honours TTLs: every look-up asks
    afresh), bounded by TIMEOUT.

    The system's search domains and ndots are kept even with custom nameservers, so a short
    name (``web`` for a Service in the balancer's own namespace) means what it means to the
    rest of the machine. Raises ConfigError when there is nothing to ask.
    """
    try:
        resolver = cls(configure=True)
    except dns.resolver.NoResolverConfiguration:
        if not nameservers:
            raise ConfigError([("resolver: not set, and the system has no nameserver "
                                "(/etc/resolv.conf); list nameservers under resolver:")]) from None
        resolver = cls(configure=False)
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port)
                                for a in nameservers]
    resolver.cache = None
    resolver.timeout = QUERY_TIMEOUT
    resolver.lifetime = TIMEOUT
    return resolver


def _answers(host: str, outcomes: Sequence[Any]) -> Resolution:
    """Merge the A and AAAA outcomes (answers or exceptions) of one name into a Resolution."""
    addresses: set[str] = set()
    ttls = []
    missing = 0
    for outcome in outcomes:
        if isinstance(outcome, dns.resolver.NXDOMAIN):
            missing += 1
        elif isinstance(outcome, dns.exception.Timeout):
            raise ResolveError(f"{host}: DNS timeout after {TIMEOUT:g}s")
        elif isinstance(outcome, dns.resolver.NoNameservers):
            raise ResolveError(f"{host}: no nameserver answered (SERVFAIL or refused)")
        elif isinstance(outcome, BaseException):
            raise ResolveError(f"{host}: DNS error: {type(outcome).__name__}: {outcome}")
        elif outcome.rrset is not None:
            ttls.append(outcome.rrset.ttl)
            addresses.update(ipaddress.ip_address(r.address).compressed for r in outcome.rrset)
    if not addresses:
        raise ResolveError(f"{host}: no such name (NXDOMAIN)" if missing
                           else f"{host}: has no A or AAAA records")
    return Resolution(tuple(sorted(addresses, key=_ip_order)),
                      float(min(ttls)) if ttls else None)


def _ip_order(address: str) -> tuple[int, int]:
    """IPv4 before IPv6, each in numeric order."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def resolve(resolver: dns.resolver.Resolver, host: str) -> Resolution:
    """Blocking look-up of ``host`` (load time); raises ResolveError."""
    outcomes: list[Any] = []
    deadline = time.monotonic() + TIMEOUT  # for both questions together, as at run time
    for rdtype in ("A", "AAAA"):
        try:
            outcomes.append(resolver.resolve(
                host, rdtype, search=True, raise_on_no_answer=False,
                lifetime=max(0.001, deadline - time.monotonic())))
        except dns.exception.DNSException as exc:
            outcomes.append(exc)
    return _answers(host, outcomes)


async def resolve_async(resolver: dns.asyncresolver.Resolver, host: str) -> Resolution:
    """Look-up of ``host`` on the event loop (run time); raises ResolveError."""
    outcomes = await asyncio.gather(
        *(resolver.resolve(host, rdtype, search=True, raise_on_no_answer=False)
          for rdtype in ("A", "AAAA")),
        return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome,
                                                                 dns.exception.DNSException):
            raise outcome  # cancellation, or a bug: not a DNS verdict
    return _answers(host, outcomes)


def next_delay(entry: BackendConfig, ttl: float | None) -> float:
    """When to ask again: at the entry's interval or when the answer expires, if sooner."""
    interval = entry.resolve_interval if ttl is None else min(entry.resolve_interval, ttl)
    return max(MIN_INTERVAL, interval)


# --------------------------------------------------------------------------- entries → backends


def found(entry: BackendConfig, address: str) -> BackendConfig:
    """The backend for one address of a discovery entry: its settings, that address."""
    where = default_backend_name(address, entry.port)
    return replace(entry, url=f"{entry.scheme}://{where}", name=f"{entry.name}@{where}",
                   host=address, discovery=None, discovered_from=entry)


def entries(pool: PoolConfig) -> list[BackendConfig]:
    """The discovery entries behind a pool's live backends, in order, once each."""
    return list(dict.fromkeys(b.discovered_from for b in pool.backends if b.discovered_from))


def addresses_of(pool: PoolConfig, entry: BackendConfig) -> set[str]:
    """The addresses the pool now holds for ``entry``."""
    return {b.host for b in pool.backends if b.discovered_from == entry}


def with_addresses(pool: PoolConfig, entry: BackendConfig,
                   addresses: Iterable[str]) -> PoolConfig:
    """``pool`` with ``entry``'s backends replaced by one per address, where they were."""
    new = [found(entry, a) for a in addresses]
    out: list[BackendConfig] = []
    for b in pool.backends:
        if b == entry or b.discovered_from == entry:
            out.extend(new)
            new = []
        else:
            out.append(b)
    return replace(pool, backends=tuple(out + new))


def expand(config: Config) -> Config:
    """``config`` with every ``discovery: dns`` entry replaced by the backends it resolves to.

    Blocking, bounded by TIMEOUT (names are looked up in parallel). A name that gives no address
    is a ConfigError naming the entry. Expanding an expanded config changes nothing.
    """
    todo = [(name, i, b) for name, pool in config.pools.items()
            for i, b in enumerate(pool.backends) if b.discovery == "dns"]
    if not todo:
        return config
    resolver = make_resolver(config.resolver)
    hosts = sorted({b.host for _, _, b in todo})
    with ThreadPoolExecutor(max_workers=min(8, len(hosts)), thread_name_prefix="dns") as ex:
        results = dict(zip(hosts, ex.map(lambda h: _try(resolver, h), hosts)))
    problems = []
    pools = dict(config.pools)
    for name, i, entry in todo:
        result = results[entry.host]
        where = f"pools.{name}.backends[{i}]"
        if isinstance(result, ResolveError):
            problems.append(f"{where}.url: discovery: {result}")
            continue
        pools[name] = with_addresses(pools[name], entry, result.addresses)
    for name, pool in pools.items():
        seen: set[str] = set()
        for b in pool.backends:
            if b.name in seen:
                problems.append(f"pools.{name}.backends: two backends named {b.name!r} once "
                                f"{b.discovered_from.name if b.discovered_from else b.name!r}"
                                f" is resolved")
            seen.add(b.name)
    if problems:
        raise ConfigError(problems, config.source)
    return replace(config, pools=MappingProxyType(pools))


def _try(resolver: dns.resolver.Resolver, host: str) -> Resolution | ResolveError:
    try:
        return resolve(resolver, host)
    except ResolveError as exc:
        return exc


# --------------------------------------------------------------------------- the service


class DiscoveryService:
    """Re-resolves every discovery entry of the live config on its schedule (a Service).

    One task per (pool, entry). Each proposes its new set to the App through
    ``app.apply_change``, which runs the judgement under the reload lock so a discovery change
    and a reload never interleave. A reload re-seeds: entries that changed or vanished stop,
    new ones start, and refusals are forgotten because the reload judged the real set afresh.
    """

    def __init__(self) -> None:
        self._app: AppView | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._nameservers: tuple[Address, ...] | None = None
        self._tasks: dict[tuple[str, BackendConfig], asyncio.Task[None]] = {}
        # (pool, entry name) → the refused address set / the failure, each logged once
        self._refused: dict[tuple[str, str], tuple[str, ...]] = {}
        self._failing: dict[tuple[str, str], str] = {}

    # --- Service interface (app.py) ------------------------------------------------------

    async def start(self, app: AppView) -> None:
        self._app = app
        self._sync(app)

    def on_reload(self, app: AppView) -> None:
        self._app = app
        self._refused.clear()
        for pool in app.pools.values():
            pool.discovery_refused = None
        self._sync(app)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- membership ----------------------------------------------------------------------

    def _sync(self, app: AppView) -> None:
        """Watch exactly the entries of the live config (restart all if the resolver changed)."""
        if app.config.resolver != self._nameservers:
            for task in self._tasks.values():
                task.cancel()
            self._tasks.clear()
            self._nameservers = app.config.resolver
            self._resolver = None  # built on first use: reads /etc/resolv.conf
        wanted = {(name, e) for name, pool in app.config.pools.items() for e in entries(pool)}
        for key in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(key).cancel()
        for key in wanted - self._tasks.keys():
            pool, entry = key
            self._tasks[key] = asyncio.get_running_loop().create_task(
                self._watch(pool, entry), name=f"discovery {pool}/{entry.name}")

    # --- one entry -----------------------------------------------------------------------

    async def _watch(self, pool: str, entry: BackendConfig) -> None:
        """Resolve at once (learning the TTL), then on the entry's schedule, forever."""
        delay = 0.0
        while True:
            await asyncio.sleep(delay)
            try:
                result = await self._resolve(entry.host)
            except ResolveError as exc:
                self._failed(pool, entry, str(exc))
                delay = next_delay(entry, None)
                continue
            except Exception:  # a bug here must not end discovery for good
                log.exception("pool %s: discovery of %s failed", pool, entry.host)
                delay = next_delay(entry, None)
                continue
            self._recovered(pool, entry)
            delay = next_delay(entry, result.ttl)
            await self._offer(pool, entry, result.addresses)

    async def _resolve(self, host: str) -> Resolution:
        if self._resolver is None:
            try:
                self._resolver = make_async_resolver(self._nameservers or ())
            except ConfigError as exc:
                raise ResolveError(f"{host}: {'; '.join(exc.problems)}") from None
        return await resolve_async(self._resolver, host)

    async def _offer(self, pool: str, entry: BackendConfig, addresses: tuple[str, ...]) -> None:
        """Propose ``addresses`` for ``entry``; the guard decides under the App's lock."""
        app = self._app
        if app is None:
            return
        live = app.config.pools.get(pool)
        if live is None or addresses_of(live, entry) == set(addresses):
            if live is not None:
                self._unrefuse(pool, entry, "its addresses are back to the serving set")
            return

        async def change(config: Config) -> tuple[Config, GuardReport] | None:
            return await self._judge(config, pool, entry, addresses)

        await app.apply_change(change, source=self)

    async def _judge(self, config: Config, pool: str, entry: BackendConfig,
                     addresses: tuple[str, ...]) -> tuple[Config, GuardReport] | None:
        """The config with ``entry`` at ``addresses`` and its guard report, or None (refused,
        or nothing to change any more)."""
        app = self._app
        live = config.pools.get(pool)
        if app is None or live is None or entry not in entries(live):
            return None
        before = addresses_of(live, entry)
        if before == set(addresses):
            return None
        candidate = with_addresses(live, entry, addresses)
        alone = replace(config, pools=MappingProxyType({pool: candidate}))
        verdict = await app.compute(evaluate, alone)  # in the check process (checker.py)
        added = sorted(set(addresses) - before, key=_ip_order)
        removed = sorted(before - set(addresses), key=_ip_order)
        change = _describe(added, removed)
        if not verdict.ok:
            self._refuse(pool, entry, addresses, change, verdict.errors)
            return None
        self._unrefuse(pool, entry, "")
        log.info("pool %s: %s now resolves to %d address(es) (%s): applied", pool, entry.host,
                 len(addresses), change)
        for warning in verdict.warnings:
            log.warning("%s", warning)
        old = app.report
        report = GuardReport(
            errors=[], warnings=list(old.warnings), shares={**old.shares, **verdict.shares},
            worst_failure={**old.worst_failure, **verdict.worst_failure})
        return replace(config, pools=MappingProxyType({**config.pools, pool: candidate})), report

    # --- refusals and failures, each logged once -----------------------------------------

    def _refuse(self, pool: str, entry: BackendConfig, addresses: tuple[str, ...],
                change: str, errors: Sequence[str]) -> None:
        key = (pool, entry.name)
        said = "; ".join(e.removeprefix(f"pools.{pool}: ") for e in errors)
        self._set_flag(pool, f"{entry.host} resolves to {', '.join(addresses)}: {said}")
        if self._refused.get(key) == addresses:
            return
        self._refused[key] = addresses
        log.warning("pool %s: discovery change refused, keeping the last good set: %s now "
                    "resolves to %s (%s), and the guard says: %s", pool, entry.host,
                    ", ".join(addresses), change, said)

    def _unrefuse(self, pool: str, entry: BackendConfig, why: str) -> None:
        if self._refused.pop((pool, entry.name), None) is None:
            return
        if why:
            log.warning("pool %s: discovery refusal cleared: %s %s", pool, entry.host, why)
        still = any(p == pool for p, _ in self._refused)
        if not still:
            self._set_flag(pool, None)

    def _set_flag(self, pool: str, reason: str | None) -> None:
        live = self._app.pools.get(pool) if self._app is not None else None
        if live is not None:
            live.discovery_refused = reason

    def _failed(self, pool: str, entry: BackendConfig, why: str) -> None:
        key = (pool, entry.name)
        if self._failing.get(key) != why:
            self._failing[key] = why
            log.warning("pool %s: discovery: %s; keeping the last good set", pool, why)

    def _recovered(self, pool: str, entry: BackendConfig) -> None:
        if self._failing.pop((pool, entry.name), None) is not None:
            log.warning("pool %s: discovery: %s resolves again", pool, entry.host)

    def __repr__(self) -> str:
        return f"<DiscoveryService {len(self._tasks)} names, {len(self._refused)} refused>"


def _describe(added: Sequence[str], removed: Sequence[str]) -> str:
    parts = []
    if added:
        parts.append("added " + ", ".join(added))
    if removed:
        parts.append("removed " + ", ".join(removed))
    return "; ".join(parts) or "no change"
