"""What every strategy shares: the context it may key on, and the interface it implements.

Selection is pure (the idea comes from pingora): a strategy only yields backends in preference
order; the pool walks them and asks "is this one ready?". A strategy never sees health, never
does I/O, and the guard's simulation drives exactly the objects the live proxy does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from balancer.backend import Backend


class PickContext:
    """What a strategy may key on. Headers are kept raw and indexed only when first asked for,
    and the path and method may be given as the request's bytes and are decoded only when
    read, because most strategies never look at them and the request path should not pay."""

    __slots__ = ("client_ip", "_path", "_method", "_raw", "_headers", "_cookies")

    def __init__(self, client_ip: str = "", path: str | bytes = "/",
                 method: str | bytes = "GET",
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.client_ip = client_ip
        self._path = path
        self._method = method
        self._raw = headers
        self._headers: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def path(self) -> str:
        path = self._path
        if isinstance(path, bytes):
            path = self._path = path.decode("latin-1")
        return path

    @property
    def method(self) -> str:
        method = self._method
        if isinstance(method, bytes):
            method = self._method = method.decode("latin-1")
        return method

    def header(self, name: str) -> str | None:
        """A request header's value by case-insensitive name (the first one when repeated)."""
        if self._headers is None:
            found: dict[str, str] = {}
            for k, v in self._raw:
                found.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
            self._headers = found
        return self._headers.get(name.lower())

    def cookie(self, name: str) -> str | None:
        """A cookie's value from the ``Cookie`` header."""
        if self._cookies is None:
            jar: dict[str, str] = {}
            for part in (self.header("cookie") or "").split(";"):
                k, sep, v = part.strip().partition("=")
                if sep:
                    jar.setdefault(k, v)
            self._cookies = jar
        return self._cookies.get(name)


#: What a strategy's build depends on, per backend in order: (url, weight).
Members = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Prepared:
    """The costly part of a build (``Strategy.precompute``), done ahead for ``members``."""

    members: Members
    data: Any


def members_of(backends: Sequence[Backend]) -> Members:
    return tuple((b.url, b.weight) for b in backends)


class Strategy:
    """Chooses among a pool's backends. Does no I/O and knows nothing about health.

    Subclasses set ``name``, may override ``validate_options`` and ``__init__`` (calling
    super), and implement ``candidates``. Stateful strategies read live load from the
    backends themselves (``in_flight``, ``ewma``), which the pool keeps up to date.

    A strategy whose build is costly (a hash table, a long cycle) puts that work in
    ``precompute``, a pure function of the members' (url, weight): a reload runs it in a
    worker thread (``prepare``) and hands the result to the constructor as ``prepared``, so
    the event loop only wraps it (balancer/fleet.py).
    """

    name: ClassVar[str] = ""
    #: Option names this strategy accepts (anything else is a config error).
    options_allowed: ClassVar[frozenset[str]] = frozenset()
    #: ``first`` and ``after`` say what ``candidates`` yields, without a generator for the
    #: first choice, which is the only one most requests need (round robin).
    split: ClassVar[bool] = False

    def __init__(self, backends: Sequence[Backend], options: Mapping[str, Any],
                 rng: random.Random, prepared: Prepared | None = None) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.options = options
        self.rng = rng

    @classmethod
    def build(cls, backends: Sequence[Backend], options: Mapping[str, Any] | None = None,
              rng: random.Random | None = None, prepared: Prepared | None = None) -> Strategy:
        """A strategy over ``backends`` (weight > 0 only); ``rng`` seeds any randomness;
        ``prepared`` is ``prepare``'s result for them (passed on only when there is one, so
        a plug-in whose constructor takes three arguments keeps working)."""
        if prepared is None:
            return cls(backends, options or {}, rng or random.Random())
        return cls(backends, options or {}, rng or random.Random(), prepared=prepared)

    @classmethod
    def precompute(cls, members: Members, options: Mapping[str, Any]) -> Any:
        """The costly, pure part of a build over ``members``; None: nothing worth doing ahead.
        Must not touch live objects: it runs in a worker thread while requests are served."""
        return None

    @classmethod
    def prepare(cls, members: Members, options: Mapping[str, Any]) -> Prepared | None:
        """``precompute`` ahead of the build, off the event loop (blocking)."""
        data = cls.precompute(members, options)
        return None if data is None else Prepared(members, data)

    def precomputed(self, prepared: Prepared | None) -> Any:
        """``prepared``'s data if it was made for exactly these backends, else computed now
        (a build without a reload, or a plan overtaken by another change)."""
        members = members_of(self.backends)
        if prepared is not None and prepared.members == members:
            return prepared.data
        return self.precompute(members, self.options)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> list[str]:
        """Problems with ``options``, one ``"key: message"`` line each; empty when fine."""
        return [f"{k}: unknown option for strategy {cls.name or cls.__name__}"
                for k in options if k not in cls.options_allowed]

    def first(self, ctx: PickContext) -> int:
        """With ``split``: the index in ``backends`` of the first candidate (-1: none)."""
        raise NotImplementedError

    def after(self, first: int, ctx: PickContext) -> Iterator[Backend]:
        """With ``split``: the candidates after ``backends[first]``, in preference order."""
        raise NotImplementedError

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        """Backends in preference order, each at most once; the pool takes the first ready.
        A ``split`` strategy has it from ``first`` and ``after``."""
        if not self.split:
            raise NotImplementedError
        first = self.first(ctx)
        if first >= 0:
            yield self.backends[first]
            yield from self.after(first, ctx)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {len(self.backends)} backends>"
