"""The access log: one JSON object per request on the ``balancer.access`` logger.

It runs once per request, so it is built to be cheap: the line is formatted by hand (no
``json.dumps`` unless a value needs escaping, names quoted once), the timestamp is formatted
once per millisecond, and the line is handed straight to the logger's handlers (to the batch
itself in the usual set-up). ``Logger.info`` would
walk the stack to find the caller's file and line and fill a full ``LogRecord`` (most of the
~9 µs it costs); an access record's source is always this module, so those fields are constants.
The proxy asks ``enabled()`` first, so a disabled log costs one check.

What ``balancer check --replay`` needs (balancer/replay.py) is in the line too: the request's
``host`` as the router matched it, and under ``keys`` the inputs a ``consistent_hash`` key of
the serving pool (and ``access_log.record``) names, each as a keyed 8-byte blake2b digest: equal
values give equal digests, raw values (user ids, session cookies) never reach the log.
Which inputs a pool records, and the digest key, are fixed when the config loads
(``KeyRecorder``); a pool with nothing to record adds nothing to its lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any, Protocol, TextIO

__all__ = ["LOGGER", "PROCESS_KEY", "AccessLogHandler", "KeyRecorder", "digest", "digest_key",
           "enabled", "write"]

LOGGER = logging.getLogger("balancer.access")
_INFO = logging.INFO


class AccessRecord(logging.LogRecord):
    """A LogRecord built without the stack walk: only the line and the time vary."""

    def __init__(self, line: str, created: float) -> None:  # noqa: D107 - no super(): on purpose
        fields = self.__dict__  # formatters read the instance dict ("%(levelname)s" % d)
        fields.update(_CONSTANT)
        fields["msg"] = line
        fields["created"] = created
        fields["msecs"] = (created - int(created)) * 1000
        fields["relativeCreated"] = (created - _START) * 1000


_START: float = logging._startTime  # type: ignore[attr-defined]
_CONSTANT = {
    "name": LOGGER.name, "args": None, "levelno": logging.INFO, "levelname": "INFO",
    "pathname": __file__, "filename": os.path.basename(__file__), "module": "accesslog",
    "funcName": "write", "lineno": 0, "exc_info": None, "exc_text": None, "stack_info": None,
    "thread": threading.get_ident(), "threadName": threading.current_thread().name,
    "processName": "MainProcess", "process": os.getpid(), "taskName": None,
}

# The line's time is formatted once per millisecond: ``_stamp`` holds it for every ``now`` in
# [_from, _until), the millisecond's span less a margin wider than a float's rounding of a
# time (<0.5 us until 2242), so that the exact rule in ``_new_stamp`` decides at its edges.
_from = _until = 0.0
_stamp = ""
_second = -1
_second_text = ""
_MARGIN = 2e-6
# Names (pools, backends) come from the config: a pair is quoted once, then looked up.
_places: dict[tuple[str | None, str | None], str] = {}


def enabled() -> bool:
    """Whether a line would go anywhere (the level check is cached by ``logging``)."""
    return LOGGER.isEnabledFor(_INFO)


_time = time.time
_floor = math.floor


def _new_stamp(now: float) -> str:
    """``now`` as the line's time (ISO 8601 UTC, milliseconds truncated); the part up to the
    seconds is formatted once per second."""
    global _from, _until, _stamp, _second, _second_text
    sec = _floor(now)  # int(now) for a time after 1970, in a third of the instructions
    if sec != _second:
        _second = sec
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
    ms = _floor((now - sec) * 1000)
    _stamp = _second_text + _MILLIS[ms]
    _from = sec + ms / 1000 + _MARGIN
    _until = sec + (ms + 1) / 1000 - _MARGIN
    return _stamp


_MILLIS = [f"{ms:03d}Z" for ms in range(1001)]


def _place(pool: str | None, backend: str | None) -> str:
    """``"pool":…,"backend":…`` for a pool and backend name, quoted once per pair."""
    if len(_places) > 4096:
        _places.clear()
    quoted = _places[pool, backend] = (f'"pool":{"null" if pool is None else json.dumps(pool)}'
                                       f',"backend":'
                                       f'{"null" if backend is None else json.dumps(backend)}')
    return quoted


def _text(value: bytes) -> str:
    """A request's bytes as a JSON string (the parser already refused control characters)."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return json.dumps(value.decode("latin-1"))
    # Searched as str: ``in`` on bytes is several times slower here (0.30 vs 0.07 us).
    if '"' in text or "\\" in text:
        return json.dumps(text)
    return '"' + text + '"'


def _method(value: bytes) -> str:
    quoted = _methods.get(value)
    if quoted is None:
        quoted = _text(value)
        if len(_methods) < 64:
            _methods[value] = quoted
    return quoted


_methods: dict[bytes, str] = {}


def _host(value: bytes) -> str:
    """A routed host (lower-case, no port) as JSON; the same few hosts come again and again."""
    quoted = _hosts.get(value)
    if quoted is None:
        quoted = _text(value) if value else "null"
        if len(_hosts) < 4096:
            _hosts[value] = quoted
    return quoted


_hosts: dict[bytes, str] = {b"": "null"}


# --------------------------------------------------------------------------- hashed keys

#: The digest key when the config sets no ``access_log.digest_key``: random per process, so
#: digests compare within one process's lifetime only (not across restarts or replicas).
PROCESS_KEY = os.urandom(32)


def digest_key(secret: str | None) -> bytes:
    """The blake2b key for ``access_log.digest_key`` (any length), or ``PROCESS_KEY``."""
    if secret is None:
        return PROCESS_KEY
    return blake2b(secret.encode("utf-8"), digest_size=32, person=b"balancer-log").digest()


def digest(value: str, key: bytes) -> str:
    """A value's 16-hex-digit keyed digest: stable for one key, unreadable without it."""
    return blake2b(value.encode("latin-1", "replace"), digest_size=8, key=key).hexdigest()


class KeyContext(Protocol):
    """What a recorder reads a request's inputs from (strategies.PickContext)."""

    def header(self, name: str) -> str | None: ...

    def cookie(self, name: str) -> str | None: ...


class KeyRecorder:
    """The ``"keys"`` member for one pool's requests: built at load time from its labels
    (``header:x-tenant``, ``cookie:sid``), it only looks up and digests at request time.
    Digests of recent values are kept (bounded): a tenant or session comes back again and
    again, and a dict lookup costs a tenth of a keyed blake2b."""

    __slots__ = ("labels", "_fields", "_key", "_digests", "_single")

    def __init__(self, labels: Sequence[str], key: bytes) -> None:
        self.labels = tuple(labels)
        self._key = key
        # (header?, name, '"label":') per label, each label quoted once here.
        self._fields = tuple((label.startswith("header:"), label.partition(":")[2],
                              json.dumps(label) + ":") for label in self.labels)
        # By value: its quoted digest; with one label (the usual ``consistent_hash`` key),
        # the whole fragment, so that a value seen before costs one lookup.
        self._digests: dict[str | None, str] = {}
        self._single = len(self._fields) == 1

    def __call__(self, ctx: KeyContext) -> str:
        """``,"keys":{...}`` for ``ctx``: a digest per input it carries, null per one it lacks."""
        if self._single:
            is_header, name, quoted = self._fields[0]
            value = ctx.header(name) if is_header else ctx.cookie(name)
            whole = self._digests.get(value)
            if whole is None:
                whole = ',"keys":{' + quoted + self._quoted(value) + "}"
                self._remember(value, whole)
            return whole
        parts = []
        for is_header, name, quoted in self._fields:
            value = ctx.header(name) if is_header else ctx.cookie(name)
            hashed = self._digests.get(value)
            if hashed is None:
                hashed = self._quoted(value)
                self._remember(value, hashed)
            parts.append(quoted + hashed)
        return ',"keys":{' + ",".join(parts) + "}"

    def _quoted(self, value: str | None) -> str:
        return "null" if value is None else '"' + digest(value, self._key) + '"'

    def _remember(self, value: str | None, text: str) -> None:
        digests = self._digests
        if len(digests) >= 4096:
            digests.clear()
        digests[value] = text

    def __repr__(self) -> str:
        return f"<KeyRecorder {', '.join(self.labels)}>"


def write(request_id: bytes, client: str, method: bytes, target: bytes, pool: str | None,
          backend: str | None, status: int, upstream_time: float | None, total_time: float,
          bytes_sent: int, host: bytes = b"", keys: str = "") -> None:
    """Log one finished request. Times in seconds; ``status`` 499: the client went away.

    ``request_id`` must be JSON-safe as it is (the proxy only keeps ids of ``[A-Za-z0-9._:+/=@-]``).
    ``host``: as routed (b"": none); ``keys``: a ``KeyRecorder``'s fragment, or "".
    """
    # One frame per line: the helpers' common cases are inlined (a call costs more than
    # most of them do), what is constant per name is looked up already quoted.
    now = _time()
    stamp = _stamp if _from <= now < _until else _new_stamp(now)
    path = target.decode("latin-1")
    if '"' in path or "\\" in path or not path.isascii():
        path = json.dumps(path)[1:-1]
    line = (f'{{"time":"{stamp}","request_id":"'
            f'{request_id.decode("ascii")}","client":"{client}","method":'
            f'{_methods.get(method) or _method(method)},"host":{_hosts.get(host) or _host(host)}'
            f',"path":"{path}",{_places.get((pool, backend)) or _place(pool, backend)}'
            f',"status":{status},"upstream_time":'
            f'{"null" if upstream_time is None else "%.6f" % upstream_time},"total_time":'
            f'{"%.6f" % total_time},"bytes":{bytes_sent}{keys}}}')
    handlers = LOGGER.handlers
    if len(handlers) == 1:
        handler = handlers[0]
        if (type(handler) is AccessLogHandler and handler.direct and not LOGGER.filters
                and not LOGGER.propagate):
            # The usual set-up (logs.setup_logging): the batching handler alone, writing the
            # line as it is. Appending to its batch is what Logger.handle would end up doing,
            # without the record, the handler lock and the formatter (4.5 -> 2.4 us a line);
            # ``add`` is needed only when the batch is full or has no timer yet.
            lines = handler._lines
            lines.append(line)
            if handler._timer is None or len(lines) >= handler.max_lines:
                handler._added()
            return
    LOGGER.handle(AccessRecord(line, now))


class AccessLogHandler(logging.Handler):
    """Writes access lines in batches: one ``write`` per batch rather than a syscall per line.

    A batch goes out when it reaches ``max_lines`` or ``max_delay`` seconds after its first
    line (a timer on the running event loop), and on ``flush``/``close`` (``logging.shutdown``
    at exit). Lines are written as formatted (``%(message)s`` by default: the JSON object).
    """

    def __init__(self, stream: TextIO, max_lines: int = 256, max_delay: float = 0.1) -> None:
        super().__init__()
        self.stream = stream
        self.max_lines = max_lines
        self.max_delay = max_delay
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    # ``direct``: whether ``write`` may hand lines straight to the batch: they would be
    # written unchanged (no filter, no level above INFO, no formatter other than
    # ``%(message)s``). Kept up to date by the setters below rather than judged per line.
    direct = True

    def _judge(self) -> None:
        fmt = self.formatter
        self.direct = (not self.filters and self.level <= _INFO
                       and (fmt is None or (type(fmt) is logging.Formatter
                                            and fmt._fmt == "%(message)s")))

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._judge()

    def setLevel(self, level: int | str) -> None:
        super().setLevel(level)
        self._judge()

    def addFilter(self, filter: Any) -> None:
        super().addFilter(filter)
        self._judge()

    def removeFilter(self, filter: Any) -> None:
        super().removeFilter(filter)
        self._judge()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record) if self.formatter else record.getMessage())
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        """Append one line to the batch; write the batch when full, or arm its timer."""
        self._lines.append(line)
        self._added()

    def _added(self) -> None:
        """A line was appended: write the batch when full, or arm its timer."""
        if len(self._lines) >= self.max_lines:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: nothing would flush later
                self.flush()
            else:
                self._timer = loop.call_later(self.max_delay, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.flush()
        finally:
            super().close()
