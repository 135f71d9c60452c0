"""Sharing the CPU with the event loop while a long check computes beside it.

A reload's check (the guard's simulation) and its hash tables, probation's simulation and DNS
discovery's verdict are computed in a child process (balancer/checker.py), or in a worker
thread when there is none. In a thread, pure Python that never blocks keeps the GIL
until the interpreter's switch interval (5 ms) forces it out, and only then does the loop get
it back, for each of its wake-ups: requests stalled 10-30 ms a reload (bench/reloadstall.py).
In a child process on the loop's core, the kernel lets it run until its next tick (4 ms here).
The long loops call ``give_way`` often (every few dozen iterations: a clock read when it is
not yet time); once ``SLICE`` of work has passed since the computation last stepped aside, it
blocks for ``PAUSE``, long enough for a waiting loop to take the GIL (a zero sleep releases it
but takes it straight back before the loop's thread has woken) and to get a CPU. Time, not a
count of iterations, decides, so a stretch is bounded however slow an iteration is (a plug-in
strategy, a busy machine). In the main thread (``balancer check``, replay) it does nothing,
unless the process is ``courteous`` (the check process).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

_MAIN = threading.main_thread()
#: How long a worker thread steps aside (seconds): as long as a slice, so a check takes at
#: most half a core. With 0.1 ms it took nearly a whole one, and on two busy cores (the load,
#: the backends) the loop's thread then waited for a CPU, not for the GIL: reloads under load
#: stalled it 4.5-5 ms median, 9-18 ms worst; with 0.5 ms, 2.5-4 / 4-6 (bench/reloadstall.py).
PAUSE = 0.0005
#: The most a worker thread computes between two steps aside (seconds): the longest a
#: waiting event loop waits for the GIL, on top of a garbage collection under way.
SLICE = 0.0005

_perf_counter = time.perf_counter


class _Due(threading.local):
    at = 0.0  # perf_counter time of this thread's next step aside
    courteous = False  # set by ``courteous()``: steps aside even as the main thread


_due = _Due()


def courteous(imports: bool = False) -> None:
    """Make ``give_way`` step aside in this (main) thread too: a process that computes for
    the serving process (balancer/checker.py) and may share its core, so that the loop never
    waits for it longer than ``SLICE`` (the kernel alone would let it run a whole tick).

    ``imports``: and before each module it imports from now on. The check process's start
    (~150 ms of imports, under load at the first reload) otherwise took the core in 4 ms
    turns, each a 5-6 ms wait for the loop beside it (bench/reloadstall.py, perf sched)."""
    _due.courteous = True
    _due.at = 0.0
    if imports and _StepAside not in sys.meta_path:
        sys.meta_path.insert(0, _StepAside)


class _StepAside:
    """A finder that finds nothing: consulted first for every import, it only gives way."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        give_way()


def give_way() -> None:
    """Let a waiting event loop run, when called from a worker thread (or a ``courteous``
    process) that has computed for ``SLICE`` since it last did."""
    if _perf_counter() < _due.at:
        return
    if threading.current_thread() is _MAIN and not _due.courteous:
        _due.at = float("inf")  # never again in this thread
        return
    time.sleep(PAUSE)
    _due.at = _perf_counter() + SLICE
