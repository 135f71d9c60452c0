"""Wiring and lifecycle: build the live objects from a config, serve, reload, drain.

The App owns the objects every other part reads (pools, backends, the proxy's state) and is the
only place that replaces them. A reload is checked completely (parse, validate, guard) before
anything changes, then applied in one synchronous step, so the event loop never runs a request
against a half-applied config: kept servers keep their Backend object (state, counters, pooled
connections), kept pools keep their Pool object, and the router is swapped in one assignment.
Requests already in flight finish on the objects they started with.

Every applied reload then runs on probation (balancer/probation.py): if a pool it changed
becomes concentrated by the change's doing, ``rollback`` restores the previous config by the
same path. Serving until a signal, and the command itself, are balancer/run.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from balancer import __version__
from balancer.backend import Backend
from balancer.checker import Checker, CheckFailed
from balancer.config import Address, Config, ConfigError
from balancer.fleet import Fleet, Plan
from balancer.loading import (
    Applied,
    Refused,
    check_file,
    describe_pools,
    listener_tls,
    share_diff,
    top_share,
)
from balancer.pool import Pool
from balancer.probation import TICK, Finding, Probation
from balancer.proxy import ProxyState, protocol_factory
from balancer.proxystate import settings_for
from balancer.router import Router

log = logging.getLogger("balancer.app")
T = TypeVar("T")

#: How often a drain looks again for requests still in flight (seconds).
POLL = 0.02


# --------------------------------------------------------------------------- the app


class Service(Protocol):
    """Something that runs beside the proxy (health checks, admin app, live monitor).

    ``start`` runs once the listener is bound, ``stop`` once requests have drained, and
    ``on_reload`` after every applied reload, when ``app.config`` and ``app.pools`` are new.
    """

    async def start(self, app: App) -> None: ...

    async def stop(self) -> None: ...

    def on_reload(self, app: App) -> None: ...


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``problems`` lists why it was refused; ``diff`` the share changes."""

    applied: bool
    problems: list[str] = field(default_factory=list)
    diff: str = ""
    #: Resolves when the probation of an applied reload ends: ``{"result": "kept" |
    #: "rolled_back" | "superseded" | "ended", "reason": …}``; None when there is none.
    probation: asyncio.Future[dict[str, Any]] | None = None


class StartError(Exception):
    """The proxy cannot start serving (address in use, not assignable…); one line."""


class App:
    """The running balancer: config, pools, the proxy state, services, and their lifecycle."""

    workers: tuple[dict[str, Any], ...] = ()  # one process: none (balancer/supervisor.py)

    def __init__(self, config_path: str, running: Applied | None = None) -> None:
        """Load and guard ``config_path`` (``running``: done already); ConfigError / Refused."""
        self.config_path = config_path
        self.running = running if running is not None else check_file(config_path)
        self.config, self.report = self.running.config, self.running.report

        # Live objects, replaced only by _apply()
        self.fleet = Fleet()
        self.fleet.apply(self.config)
        self.state = ProxyState(Router(self.config.routes, self.pools),
                                settings_for(self.config))

        self.reloads = {"applied": 0, "refused": 0}
        self.rollbacks = 0
        #: Recent reload outcomes, newest last (/status, the dashboard's marks).
        self.reload_events: list[dict[str, Any]] = []
        self._probation: Probation | None = None
        #: Configs undone by a rollback: a discovery change that would rebuild one is not applied.
        self._rolled_back: list[Config] = []
        self._told_rolled_back: list[Config] = []  # said once each
        self.started_at = time.time()
        self.server: asyncio.Server | None = None
        self.services: list[Service] = self._build_services()
        self._started: list[Service] = []
        self._reload_lock = asyncio.Lock()
        self.checker = Checker(config_path)  # a reload's check in a child (balancer/checker.py)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._draining = False
        # TLS on ``listen`` (balancer/tls.py); a reload loads renewed files into it in place.
        self.tls_context = listener_tls(self.config)

    @property
    def pools(self) -> dict[str, Pool]:
        """The live pools by name (the fleet replaces the dict on every apply)."""
        return self.fleet.pools

    def _build_services(self) -> list[Service]:
        """The services that run beside the proxy, in start order (stopped in reverse)."""
        from balancer.admin import AdminServer
        from balancer.discovery import DiscoveryService
        from balancer.health import HealthChecker
        from balancer.monitor import Monitor, MonitorService

        self.monitor = Monitor()  # live traffic shares; read by /metrics, /status, dashboard
        self.admin = AdminServer(self.monitor)  # .address: where it really listens
        self.health = HealthChecker()  # also probes the previous health check on probation
        return [DiscoveryService(), self.health, MonitorService(self.monitor), self.admin]

    # --- what runs (read by admin.py) ----------------------------------------------------

    @property
    def config_text(self) -> str:
        return self.running.text

    @property
    def config_sha256(self) -> str:
        return self.running.sha256

    @property
    def config_applied_at(self) -> float:
        return self.running.at

    @property
    def probation(self) -> dict[str, Any] | None:
        """``{"until": unix time, "pools": [...]}`` while a reload is on probation."""
        p = self._probation
        return p.summary() if p is not None and not p.over else None

    def _event(self, result: str, reason: str | None) -> None:
        self.reload_events.append({"result": result, "reason": reason, "at": time.time()})
        del self.reload_events[:-50]

    # --- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``listen``, start the services, and log what is being served."""
        await self._listen()
        try:
            for service in self.services:
                await service.start(self)
                self._started.append(service)
        except OSError as exc:
            await self._stop_services()
            if self.server is not None:  # a supervisor (balancer/supervisor.py) has none
                self.server.close()
            if service is self.admin:  # AdminServer names the key and address itself
                raise StartError(str(exc)) from None
            raise StartError(f"cannot start {type(service).__name__}: {exc}") from None
        self.started_at = time.time()
        admin = next((getattr(s, "address", None) for s in self.services  # the bound port
                      if getattr(s, "address", None) is not None), self.config.admin)
        log.info("balancer %s listening on %s (admin %s); %s", __version__,
                 self.address, admin, describe_pools(self.config))
        for warning in self.report.warnings:
            log.warning("%s", warning)

    async def _listen(self) -> None:
        """Serve ``listen`` in this process (a supervisor starts its workers instead)."""
        loop = asyncio.get_running_loop()
        addr = self.config.listen
        try:
            tls: dict[str, Any] = {}
            if self.tls_context is not None:  # a handshake is bounded like a request head
                tls = {"ssl": self.tls_context,
                       "ssl_handshake_timeout": self.config.client.header_timeout}
            self.server = await loop.create_server(
                protocol_factory(self.state), addr.host, addr.port,
                reuse_address=True, backlog=1024, **tls)
        except OSError as exc:
            raise StartError(f"listen {addr}: {_reason(exc)}") from None

    @property
    def address(self) -> Address:
        """Where the proxy really listens (the kernel's port when ``listen`` asked for 0)."""
        if self.server is not None and self.server.sockets:
            host, port = self.server.sockets[0].getsockname()[:2]
            return Address(host, port)
        return self.config.listen

    # --- reload --------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Re-read the config file; apply it if it passes, else keep serving the old one."""
        async with self._reload_lock:
            if self._draining:
                return ReloadResult(False, ["draining: reload ignored"], "")
            try:  # in the check process, so that this loop never waits for it
                new, prepared = await self.checker.check(self.config_path)
            except Refused as exc:
                return self._refused(exc.problems, share_diff(self.report, exc.report))
            except ConfigError as exc:
                return self._refused(exc.problems, "")
            except CheckFailed as exc:  # its trace is logged
                return self._refused([f"{self.config_path}: {exc}"], "")
            except Exception as exc:  # a bug in a plug-in strategy must not stop the proxy
                log.exception("reload: checking %s failed", self.config_path)
                return self._refused([f"{self.config_path}: {type(exc).__name__}: {exc}"], "")

            config, report = new.config, new.report
            plan = await asyncio.to_thread(self.fleet.prepare, config, prepared)
            diff = share_diff(self.report, report)
            old = self.config
            probation = self._begin_probation(config)
            gone = self._apply(plan)
            self.report = report
            self.running = new
            self._rolled_back, self._told_rolled_back = [], []  # a new file: judged afresh
            self.reloads["applied"] += 1
            self._event("applied", None)
            log.info("reload applied from %s: %s", self.config_path, describe_pools(config))
            _log_lines(logging.INFO, diff, "shares before → after:")
            for warning in report.warnings:
                log.warning("%s", warning)
            if config.listen != old.listen:
                log.warning("listen changed from %s to %s: takes effect on restart",
                            old.listen, config.listen)
            self._reload_tls(old)
            for backend in gone:
                self.fleet.retire(backend)
            self._tell_services()
            return ReloadResult(True, [], diff, self._watch(probation))

    async def apply_change(self, change: Callable[[Config], Awaitable[tuple[Config, Any] | None]],
                           source: object = None) -> bool:
        """Apply a change to the live config that a service computed and judged (DNS discovery
        changing a pool's backend set), under the reload lock so it never interleaves with a
        reload. ``change`` gets the live config and returns the new one with its guard report,
        or None to keep the live one. Applied like a reload (kept backends keep their state,
        removed ones drain); the other services hear of it through ``on_reload``.
        """
        async with self._reload_lock:
            if self._draining:
                return False
            result = await change(self.config)
            if result is None:
                return False
            config, report = result
            if config in self._rolled_back:
                if config not in self._told_rolled_back:
                    self._told_rolled_back.append(config)
                    log.warning("not applying a change that rebuilds a config rolled back "
                                "earlier (%s); still serving the previous one",
                                describe_pools(config))
                return False
            plan = await self.fleet.plan(config, self.compute)
            probation = self._begin_probation(config)
            gone = self._apply(plan)
            self.report = report
            self.running = replace(self.running, config=config, report=report, at=time.time())
            self._event("applied", "DNS discovery change")
            for backend in gone:
                self.fleet.retire(backend)
            self._tell_services(skip=source)
            self._watch(probation)
            return True

    # --- probation (balancer/probation.py) -----------------------------------------------

    def _begin_probation(self, config: Config) -> Probation | None:
        """Before ``config`` is applied: end a running probation (this change supersedes it)
        and snapshot the pools for a new one, unless ``guard.probation`` is 0."""
        if self._probation is not None and not self._probation.over:
            self._probation.outcome.set_result(
                {"result": "superseded", "reason": "another reload was applied during its "
                                                   "probation", "at": time.time()})
        self._probation = None
        if config.guard.probation <= 0:
            return None
        loop = asyncio.get_running_loop()
        p = Probation(self.running, config, self.pools, self.monitor, loop.time(), time.time())
        self._probation = p
        return p

    def _watch(self, p: Probation | None) -> asyncio.Future[dict[str, Any]] | None:
        """Right after the apply: count from now and judge until the probation ends."""
        if p is None:
            return None
        if p.pools:
            log.info("reload on probation for %gs: pools %s", self.config.guard.probation,
                     ", ".join(p.pools))
        self.spawn(self._run_probation(p))
        return p.outcome

    async def caught_up(self) -> None:
        """Returns once the counters show only traffic served by the config just applied
        (here at once; a supervisor waits for its workers, balancer/supervisor.py)."""

    async def _run_probation(self, p: Probation) -> None:
        loop = asyncio.get_running_loop()
        await self.caught_up()
        p.started_counting(self.pools)  # traffic since the change, and only that
        try:
            while not p.over and p.pools and loop.time() < p.until:
                await asyncio.sleep(TICK)
                if p.over:
                    return
                for finding in p.findings(self.pools, loop.time()):
                    to_blame, why = await p.blame(finding, self.pools, loop.time(),
                                                  self.health.probe,
                                                  partial(self.compute, top_share))
                    if p.over:
                        return
                    if to_blame:
                        await self.rollback(p, finding, why)
                        return
                    p.tell_once(finding, why)
        except Exception:  # a bug here must never leave a reload undecided
            log.exception("probation failed; keeping the reload")
        if not p.over:
            if p.pools:
                log.info("reload kept: probation of %gs passed", self.config.guard.probation)
            self._event("kept", None)
            p.outcome.set_result({"result": "kept", "reason": None, "at": time.time()})
        if self._probation is p:
            self._probation = None

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` off the loop, in the check process (balancer/checker.py): guard work
        (probation's simulation, DNS discovery's verdict, the tables of a change)."""
        return await self.checker.call(fn, *args)

    async def rollback(self, p: Probation, finding: Finding, why: str) -> None:
        """Restore the config that ran before ``p``'s reload, by the path a reload takes."""
        async with self._reload_lock:
            if p.over or self._draining:
                return
            previous = p.previous
            plan = await self.fleet.plan(previous.config, self.compute)
            if p.over or self._draining:  # only a drain can start meanwhile (we hold the lock)
                return
            undone = self.config
            gone = self._apply(plan)
            self.report = previous.report
            self.running = replace(previous, at=time.time())
            self.rollbacks += 1
            self._rolled_back = [*self._rolled_back[-4:], undone]
            log.error("reload rolled back: %s; the change is to blame: %s; serving the "
                      "previous config again (sha256 %s)", finding.reason, why,
                      previous.sha256[:12])
            self._reload_tls(undone)
            for backend in gone:
                self.fleet.retire(backend)
            self._tell_services()
            self._event("rolled_back", finding.reason)
            p.outcome.set_result({"result": "rolled_back", "reason": finding.reason,
                                  "at": time.time()})
            if self._probation is p:
                self._probation = None

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task the app keeps until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reload_tls(self, old: Config) -> None:
        """Renewed certificate files take effect now; TLS on or off takes a restart."""
        new = self.config.tls
        if (new is None) != (self.tls_context is None):
            log.warning("tls %s in the config: takes effect on restart",
                        "turned on" if new is not None else "turned off")
            return
        if new is None or self.tls_context is None:
            return
        from balancer.tls import TlsError, reload_server_context

        try:
            reload_server_context(self.tls_context, new.cert, new.key)
        except TlsError as exc:  # changed since the check: keep serving the loaded pair
            log.error("tls: %s; still serving the previous certificate", exc)
            return
        log.info("tls: certificate %s loaded for new connections", new.cert)

    def _tell_services(self, skip: object = None) -> None:
        for service in self._started:
            if service is skip:
                continue
            try:
                service.on_reload(self)
            except Exception:
                log.exception("reload: %s.on_reload failed", type(service).__name__)

    def _refused(self, problems: list[str], diff: str) -> ReloadResult:
        self.reloads["refused"] += 1
        self._event("refused", problems[0] if problems else None)
        log.error("reload refused, still serving the previous config: %d problem(s) in %s",
                  len(problems), self.config_path)
        _log_lines(logging.ERROR, "\n".join(problems))
        _log_lines(logging.INFO, diff, "shares now → in the refused config:")
        return ReloadResult(False, list(problems), diff)

    def _apply(self, plan: Plan) -> list[Backend]:
        """Swap in ``plan`` (built off the loop by ``Fleet.prepare``); returns the backends it
        removed. No await and no heavy work: atomic on the loop, and short."""
        config = plan.config
        gone = self.fleet.apply(plan)
        self.config = config
        self.state.router = Router(config.routes, self.pools)
        self.state.settings = settings_for(config)
        return gone

    # --- drain ---------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, finish in-flight requests (up to ``timeout``), then close all.

        ``timeout`` defaults to the config's ``drain_timeout``; requests still running then are
        cut. Idle keep-alive connections are closed at once, busy ones after their response.
        """
        if self._draining:
            return
        self._draining = True
        async with self._reload_lock:  # a reload in progress finishes first
            pass
        p = self._probation
        if p is not None and not p.over:
            p.outcome.set_result({"result": "ended", "reason": "draining", "at": time.time()})
        timeout = self.config.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        if self.server is not None:
            self.server.close()
        log.info("draining: stopped accepting; %d request(s) in flight on %d connection(s);"
                 " waiting up to %gs", self.state.in_flight, len(self.state.connections), timeout)
        self.state.begin_drain()
        deadline = loop.time() + timeout
        while (self.state.in_flight or self.state.connections) and loop.time() < deadline:
            await asyncio.sleep(POLL)
        if self.state.in_flight or self.state.connections:
            log.warning("drain timeout (%gs): cutting %d request(s) still in flight on %d"
                        " connection(s)", timeout, self.state.in_flight,
                        len(self.state.connections))
            for conn in list(self.state.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.abort()
        self.state.timers.close()
        await self.fleet.close()
        await self.checker.close()
        await self._stop_services()
        log.info("drained: stopped")

    async def _stop_services(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)

    def __repr__(self) -> str:
        pools = ", ".join(repr(p) for p in self.pools.values())
        return f"<App {self.config_path} [{pools}] reloads={self.reloads}>"


# --------------------------------------------------------------------------- helpers


def _log_lines(level: int, text: str, heading: str = "") -> None:
    """Log ``text`` a line at a time (under ``heading``): every line readable on its own."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and heading:
        log.log(level, "  %s", heading)
    for line in lines:
        log.log(level, "  %s", line)


def _reason(exc: OSError) -> str:
    """The part of an OSError an operator needs (``address already in use``)."""
    text = exc.strerror or str(exc)
    return text.rsplit(": ", 1)[-1].lower() if ": " in text else text.lower()
