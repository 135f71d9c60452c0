"""The test backends, all real servers on loopback, from one place.

- ``special_app`` (apps.py): a well-behaved aiohttp backend with an endpoint per behaviour the
  request-path tests need (statuses, a gated stream, big downloads and uploads, slow answers,
  hop-by-hop headers, WebSocket); serve it with ``tests.support.net.run_app``.
- ``RawBackend`` / ``raw_backend`` (raw.py): a bare asyncio server scripted per test, and the
  scripts tests share (``reset_after_request``, ``never_answer``, ``garbage``, ``cut_short``,
  ``until_close``, ``keepalive_then_close``).
- ``FaultyServer`` (faulty.py): an HTTP/1.1 backend that fails on demand, per server or per
  request (``X-Fault``), in every way a real backend fails, counting what it received.
- ``BackendProcess`` (process.py): a ``FaultyServer`` in its own process, to SIGKILL, freeze
  and restart (``python -m tests.support.backends``).
- bodies.py: checkable bodies (``body_for``/``check_body``, ``pattern_ok``, ``upload_blocks``);
  wire.py: the bits of HTTP/1.1 the bare backends speak; server.py: the listener they share.
"""

from tests.support.backends.apps import GATE, special_app
from tests.support.backends.bodies import body_for, check_body, pattern_ok, upload_blocks
from tests.support.backends.faulty import FAULTS, FaultyServer
from tests.support.backends.process import BackendProcess, received_by_all
from tests.support.backends.raw import (
    Handler,
    RawBackend,
    cut_short,
    garbage,
    keepalive_then_close,
    never_answer,
    raw_backend,
    reset_after_request,
    until_close,
)
from tests.support.backends.server import LoopbackServer

__all__ = [
    "FAULTS", "GATE", "BackendProcess", "FaultyServer", "Handler", "LoopbackServer", "RawBackend",
    "body_for", "check_body", "cut_short", "garbage", "keepalive_then_close", "never_answer",
    "pattern_ok", "raw_backend", "received_by_all", "reset_after_request", "special_app",
    "until_close", "upload_blocks",
]
