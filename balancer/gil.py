"""Sharing the interpreter with the event loop while a worker thread computes.

A reload checks its config (the guard's simulation) and builds hash tables in a worker thread
while the event loop serves requests. Pure Python that never blocks keeps the GIL until the
interpreter's switch interval (5 ms) forces it out, and only then does the loop get it back,
for each of its wake-ups: requests stalled 10-30 ms a reload (bench/reloadstall.py). The long
loops call ``give_way`` every fraction of a millisecond of work instead: in a worker thread it
blocks for 0.1 ms, long enough for a waiting loop to take the GIL (a zero sleep releases it
but takes it straight back before the loop's thread has woken). In the main thread (``balancer
check``) it does nothing.
"""

from __future__ import annotations

import threading
import time

_MAIN = threading.main_thread()
#: How long a worker thread steps aside (seconds).
PAUSE = 0.0001


def give_way() -> None:
    """Let a waiting event loop run, when called from a worker thread."""
    if threading.current_thread() is not _MAIN:
        time.sleep(PAUSE)
