"""Reading recorded traffic for ``balancer check --replay``: balancer's access log and nginx's.

Two formats, told apart line by line, so a log may mix them and may hold other lines:

- balancer's own JSON access log (balancer/accesslog.py), as found on its stderr between the
  ordinary log lines (those are skipped and counted). Its ``host`` is the host the router
  matched; ``keys`` holds keyed digests of the hash-key inputs the config recorded;
  ``total_time`` is how long the request was held, ``upstream_time`` what the pool heard.
- nginx's ``combined`` format: no host (``--host`` supplies one), no duration, no keys.

A line is a ``Request``; lines that are neither are counted in ``LogReader.skipped``. Both
formats are read at some hundred thousand lines a second (bench/replay.py).
"""

from __future__ import annotations

import calendar
import gzip
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from json.scanner import make_scanner
from typing import Any, TextIO

__all__ = ["LogReader", "ReplayError", "Request"]

#: nginx's ``log_format combined``: $remote_addr - $remote_user [$time_local] "$request"
#: $status $body_bytes_sent "$http_referer" "$http_user_agent"
# The C scanner itself: ``decode`` would add a Python frame and a regex for the whitespace
# around the object (~1.5 µs of a line's ~9); text after a line's object is ignored.
_scan: Any = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_COMBINED = re.compile(r'(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+)[^"]*" \d{3} ').match


class ReplayError(Exception):
    """A log that cannot be replayed (unreadable, or no request in it): one line."""


class Request:
    """One recorded request: when it arrived (log seconds), what a strategy may key on, and
    how long it held a backend (``hold``: None when the log does not say)."""

    __slots__ = ("when", "client", "method", "host", "path", "hold", "latency", "keys")

    def __init__(self, when: float, client: str, method: str, host: str | None, path: str,
                 hold: float | None, latency: float | None,
                 keys: dict[str, str | None] | None) -> None:
        self.when = when
        self.client = client
        self.method = method
        self.host = host
        self.path = path
        self.hold = hold
        self.latency = latency
        self.keys = keys


class LogReader:
    """Reads logs one after the other, counting what it read and what it skipped.

    ``labels``: every ``keys`` label met in any line (a label never met was never recorded, so
    every request counts as without it); ``hosts``: whether any line carried a host.
    """

    def __init__(self) -> None:
        self.json = self.combined = self.skipped = 0
        self.labels: set[str] = set()
        self.hosts = False
        self._seconds: dict[str, float] = {}

    @property
    def requests(self) -> int:
        return self.json + self.combined

    def read(self, path: str) -> Iterator[Request]:
        """The requests of ``path`` in log order; ReplayError if it cannot be read or holds
        none. Opened before the first request is asked for, so a bad path fails at once."""
        stream = _open(path)
        return self._requests(path, stream)

    def _requests(self, path: str, stream: TextIO) -> Iterator[Request]:
        before = self.requests
        try:
            with stream:
                for line in stream:
                    request = (self._json(line) if line.startswith("{")
                               else self._combined(line))
                    if request is None:
                        self.skipped += 1
                    else:
                        yield request
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ReplayError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                              ) from None
        if self.requests == before:
            raise ReplayError(f"{path}: no request in it (neither balancer's JSON access "
                              f"lines nor nginx combined lines)")

    def _json(self, line: str) -> Request | None:
        try:
            d: Any = _scan(line, 0)[0]
            client, path, when = d["client"], d["path"], self._iso(d["time"])
        except (ValueError, KeyError, TypeError, IndexError, StopIteration):
            return None
        if type(client) is not str or type(path) is not str:
            return None
        hold = d.get("total_time")
        if type(hold) is not float or hold < 0:  # written as 0.000123: always a float
            hold = None
        latency = d.get("upstream_time")
        if type(latency) is not float or latency < 0:
            latency = hold
        host = d.get("host")
        if type(host) is not str or not host:
            host = None
        elif not self.hosts:
            self.hosts = True
        keys = d.get("keys")
        if keys is not None:
            if type(keys) is dict:
                self.labels.update(keys)
            else:
                keys = None
        self.json += 1
        method = d.get("method")
        return Request(when, client, method if type(method) is str else "GET", host, path,
                       hold, latency, keys)

    def _combined(self, line: str) -> Request | None:
        m = _COMBINED(line)
        if m is None:
            return None
        client, stamp, method, target = m.groups()
        try:
            when = self._local(stamp)
        except ValueError:
            return None
        self.combined += 1
        return Request(when, client, method, None, target, None, None, None)

    def _iso(self, text: str) -> float:
        """``2026-12-04T15:37:02.574Z`` → epoch seconds (the second's part parsed once)."""
        head = text[:19]
        sec = self._seconds.get(head)
        if sec is None:
            sec = self._cache(head, calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")))
        return sec + int(text[20:23] or 0) / 1000

    def _local(self, text: str) -> float:
        """nginx's ``10/Oct/2000:13:55:36 -0700`` → epoch seconds."""
        sec = self._seconds.get(text)
        if sec is None:
            sec = self._cache(text, datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").timestamp())
        return sec

    def _cache(self, text: str, sec: float) -> float:
        if len(self._seconds) > 100_000:
            self._seconds.clear()
        self._seconds[text] = sec
        return sec


def _open(path: str) -> TextIO:
    """``path`` as text (gzip when it ends in ``.gz``), undecodable bytes replaced."""
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by reader
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
