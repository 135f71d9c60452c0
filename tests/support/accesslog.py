"""The access logger set up as ``logs.setup_logging`` leaves it, for tests that read its lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from balancer.accesslog import LOGGER, AccessLogHandler


@contextmanager
def batched_access_log() -> Iterator[tuple[AccessLogHandler, io.StringIO]]:
    """The batching handler alone on the access logger, writing to a string; restored after."""
    saved = (LOGGER.handlers[:], LOGGER.filters[:], LOGGER.propagate, LOGGER.level)
    stream = io.StringIO()
    handler = AccessLogHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.filters[:] = []
    LOGGER.propagate = False
    LOGGER.setLevel(logging.INFO)
    try:
        yield handler, stream
    finally:
        handler.close()
        LOGGER.handlers[:], LOGGER.filters[:], LOGGER.propagate, _ = saved
        LOGGER.setLevel(saved[3])
