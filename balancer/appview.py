"""What the services around the core read of the running app: a typed view.

The admin app, metrics, the live monitor, DNS discovery, health checks and the config watcher
run beside the proxy and are handed the App (balancer/app.py), which sits above them all. They
name here exactly what they read and call, so that none imports app.py, a stand-in in a test
is checked like the App, and a renamed attribute fails mypy instead of a ``getattr`` default
quietly answering. Read-only properties, so an attribute or a property both satisfy them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence, Sized
from typing import Any, Protocol, runtime_checkable

from balancer.config import Config
from balancer.guard import GuardReport
from balancer.pool import Pool

#: A change a service computed (DNS discovery): the live config in, the new one and its guard
#: report out, or None to keep the live one.
Change = Callable[[Config], Awaitable[tuple[Config, GuardReport] | None]]


class TimerCounts(Protocol):
    """The slow-client timers (balancer/slowclients.py): how often each kind fired."""

    @property
    def fired(self) -> Mapping[str, int]: ...


class ClientSideView(Protocol):
    """The client side of the proxy (balancer/proxy.py ``ProxyState``) as /metrics reads it."""

    @property
    def connections(self) -> Sized: ...

    @property
    def timers(self) -> TimerCounts: ...

    @property
    def turned_away(self) -> int: ...


class ReloadOutcome(Protocol):
    """What a reload did (balancer/app.py ``ReloadResult``), as ``POST /reload`` reports it."""

    @property
    def applied(self) -> bool: ...

    @property
    def problems(self) -> list[str]: ...

    @property
    def diff(self) -> str: ...

    @property
    def probation(self) -> Any: ...  # a Future of the probation's outcome, or None


@runtime_checkable
class AppView(Protocol):
    """The running app as the services see it (balancer/app.py ``App`` is the real one; mypy
    holds it to this view through app.py's ``Service``, and tests their stand-ins with
    ``isinstance``)."""

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> str: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def report(self) -> GuardReport: ...

    @property
    def state(self) -> ClientSideView | None: ...  # None: no proxy (a stand-in)

    @property
    def started_at(self) -> float: ...

    @property
    def reloads(self) -> Mapping[str, int]: ...  # {"applied": n, "refused": n}

    @property
    def rollbacks(self) -> int: ...

    @property
    def reload_events(self) -> Sequence[Mapping[str, Any]]: ...  # newest last

    @property
    def probation(self) -> Mapping[str, Any] | None: ...  # {"until", "pools"} while on it

    @property
    def config_text(self) -> str | None: ...  # None: no record of the text as read

    @property
    def config_sha256(self) -> str | None: ...

    @property
    def config_applied_at(self) -> float | None: ...

    @property
    def workers(self) -> Sequence[Mapping[str, Any]]: ...  # per worker process; () for one

    async def reload(self) -> ReloadOutcome: ...

    async def apply_change(self, change: Change, source: object = None) -> bool: ...

    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any: ...  # off the loop
