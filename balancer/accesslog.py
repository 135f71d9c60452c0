"""The access log: one JSON object per request on the ``balancer.access`` logger.

It runs once per request, so the line is formatted by hand (no ``json.dumps`` unless a value
needs escaping) and the timestamp's seconds part is formatted once per second. The proxy asks
``enabled()`` first, so a disabled log costs one check.
"""

from __future__ import annotations

import json
import logging
import time

__all__ = ["LOGGER", "enabled", "write"]

LOGGER = logging.getLogger("balancer.access")
_INFO = logging.INFO

_second = -1
_stamp = ""
# Names (pools, backends) come from the config: escaped once each, then looked up.
_names: dict[str, str] = {}


def enabled() -> bool:
    """Whether a line would go anywhere (the level check is cached by ``logging``)."""
    return LOGGER.isEnabledFor(_INFO)


def _timestamp(now: float) -> str:
    global _second, _stamp
    sec = int(now)
    if sec != _second:
        _second = sec
        _stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_stamp}.{int((now - sec) * 1000):03d}Z"


def _name(value: str) -> str:
    quoted = _names.get(value)
    if quoted is None:
        if len(_names) > 4096:
            _names.clear()
        quoted = _names[value] = json.dumps(value)
    return quoted


def _text(value: bytes) -> str:
    """A request's bytes as a JSON string (the parser already refused control characters)."""
    if value.isascii() and b'"' not in value and b"\\" not in value:
        return f'"{value.decode("ascii")}"'
    return json.dumps(value.decode("latin-1"))


def write(request_id: bytes, client: str, method: bytes, target: bytes, pool: str | None,
          backend: str | None, status: int, upstream_time: float | None, total_time: float,
          bytes_sent: int) -> None:
    """Log one finished request. Times in seconds; ``status`` 499: the client went away."""
    up = "null" if upstream_time is None else f"{upstream_time:.6f}"
    LOGGER.info(
        f'{{"time":"{_timestamp(time.time())}","request_id":{_text(request_id)},'
        f'"client":"{client}","method":{_text(method)},"path":{_text(target)},'
        f'"pool":{"null" if pool is None else _name(pool)},'
        f'"backend":{"null" if backend is None else _name(backend)},"status":{status},'
        f'"upstream_time":{up},"total_time":{total_time:.6f},"bytes":{bytes_sent}}}')
