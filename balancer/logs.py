"""Logging for ``balancer run``: plain, readable lines on stderr.

An operator reads these lines while something is wrong, so each one stands alone: a time, a
level, where it comes from and one sentence. The access log (one JSON object per request) is
already a complete record, so its lines are written as they are, without that prefix.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from balancer.accesslog import AccessLogHandler

#: The logger the proxy writes its access log to; its lines are passed through bare.
ACCESS_LOGGER = "balancer.access"

_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(level: int | str | None = None, stream: TextIO | None = None) -> None:
    """Send every log line to ``stream`` (stderr); ``BALANCER_LOG_LEVEL`` overrides ``level``.

    Safe to call twice: handlers installed by an earlier call are replaced, not doubled.
    """
    level = os.environ.get("BALANCER_LOG_LEVEL") or level or logging.INFO
    out = stream or sys.stderr

    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_balancer", False)]:
        root.removeHandler(h)
    handler = _handler(out, logging.Formatter(_FORMAT, _DATEFMT))
    root.addHandler(handler)
    try:
        root.setLevel(level.upper() if isinstance(level, str) else level)
    except ValueError:
        root.setLevel(logging.INFO)
        logging.getLogger("balancer").warning(
            "BALANCER_LOG_LEVEL=%s: not a level (DEBUG, INFO, WARNING, ERROR); using INFO",
            level)

    access = logging.getLogger(ACCESS_LOGGER)
    for h in [h for h in access.handlers if getattr(h, "_balancer", False)]:
        access.removeHandler(h)
    # Batched: one write per burst of requests rather than a syscall per line.
    batched = AccessLogHandler(out)
    batched.setFormatter(logging.Formatter("%(message)s"))
    batched._balancer = True  # type: ignore[attr-defined]
    access.addHandler(batched)
    access.propagate = False
    # aiohttp's own access log would repeat, less usefully, what the admin app already says.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _handler(stream: TextIO, formatter: logging.Formatter) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler._balancer = True  # type: ignore[attr-defined]
    return handler
