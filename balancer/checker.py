"""A reload's check in a child process, so the serving loop never waits for it.

A reload reads, parses and judges the new file (``loading.check_file``: the guard simulates
traffic for seconds of pure Python) and builds the strategies' tables (``Pool.prepare``).
Done in a thread of the serving process, that work shares one GIL with the event loop: on one
core a reload stalled requests 10-25 ms (bench/reloadstall.py). Here it runs in a child
interpreter, which ``balancer run`` starts before it serves and keeps (``warm``; one started by
a reload exits after ``IDLE`` seconds unused): the serving process sends the path and gets
back, pickled, the checked config with its tables, in about a millisecond on its loop. The
guard's other work runs there too (``call``: probation's simulation, DNS discovery's verdict,
a rollback's tables). On a core it shares with the loop, the child steps aside every 0.5 ms
of work and before each import (``gil.courteous``), and its heap of imported code is frozen
(a full collection over it held the core 9-14 ms), so the loop seldom waits for it longer
than a scheduler tick; it dies with its parent.

What the child answers, the parent raises or returns exactly as ``check_file`` would: the same
ConfigError, UnreadableConfig or Refused with the same lines. A config whose check kills the
child (a plug-in that crashes the interpreter, a config that exhausts memory) is refused,
and the parent stays up. Only when the child cannot be started, or its answer cannot be
pickled (a plug-in's table), is the check done in a thread as before (balancer/gil.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from balancer.config import ConfigError, UnreadableConfig
from balancer.fleet import prepare_pools
from balancer.gil import courteous
from balancer.loading import Applied, Refused, beside, check_file, import_strategies
from balancer.pool import PreparedPool
from balancer.wire import die_with_parent, frame, read_message, read_message_from

log = logging.getLogger("balancer.app")

#: The check process's niceness above its parent's. Its courtesy (a 0.5 ms pause after each
#: 0.5 ms of work) already bounds how long the loop waits for it; a lower priority only
#: stretched the check: at 10, on one saturated core, a reload took 5 s, not 1 s, and the
#: machine's own stalls (10-25 ms, as often without a reload) fell in that longer window.
NICE = 0
#: A check process started by a reload and unused this long exits (seconds); the next
#: reload starts another. One started by ``warm`` (``balancer run``) stays.
IDLE = 600.0
#: The longest a check may take (seconds): one stuck (a plug-in's endless loop) is stopped
#: and the reload refused, so that the reloads after it are not stuck behind it.
TIMEOUT = 300.0
#: The directory holding this ``balancer`` package: the child imports the same code.
_ROOT = str(Path(__file__).resolve().parents[1])
_START = ("import gc; gc.disable(); import sys; sys.path.insert(0, sys.argv[1]); "
          "from balancer.gil import courteous; courteous(imports=True); "
          "from balancer.checker import main; sys.exit(main())")

Prepared = dict[str, PreparedPool]
T = TypeVar("T")


class CheckFailed(Exception):
    """The check raised something other than a config's problems (a plug-in's bug), or the
    check process died while checking; ``str()`` is the one line for the reload's answer."""


class Checker:
    """The serving process's side: one request at a time, through one child process."""

    def __init__(self, config_path: str) -> None:
        #: Plug-ins next to this file are importable in ``call``s too (its directory).
        self.config_path = config_path
        self._proc: Child | None = None
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._reaped: asyncio.Future[int] | None = None  # the idle child's exit
        self._keep = False  # ``warm``: no idle exit

    async def check(self, path: str) -> tuple[Applied, Prepared | None]:
        """``check_file(path)`` and each pool's ``Pool.prepare``, done in the child. Raises
        what ``check_file`` raises, or CheckFailed."""
        reply = await self._request({"check": path})
        if reply is None:
            return await asyncio.to_thread(check_file, path), None
        if "applied" in reply:
            applied: Applied = reply["applied"]
            try:  # the pools are built here: their strategies must be importable here too
                await asyncio.to_thread(import_strategies, applied.config, path)
            except Exception as exc:
                raise CheckFailed(f"{type(exc).__name__}: {exc}") from None
            return applied, reply["prepared"]
        if "refused" in reply:
            raise Refused(*reply["refused"])
        if "invalid" in reply:
            unreadable, problems, source = reply["invalid"]
            raise (UnreadableConfig if unreadable else ConfigError)(problems, source)
        log.error("reload: checking %s failed:\n%s", path, reply["trace"].rstrip())
        raise CheckFailed(reply["failed"])

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child: the guard's other computations (probation's simulation,
        DNS discovery's verdict, a rollback's tables), so they too leave the loop's GIL alone.
        ``fn`` is a module-level function; what it raises is raised here (CheckFailed when the
        child died or the exception cannot travel). In a thread when there is no child, or when
        the arguments or the result cannot be pickled."""
        reply = await self._request({"call": (fn, args), "beside": self.config_path})
        if reply is None:
            return await asyncio.to_thread(fn, *args)
        if "result" in reply:
            result: T = reply["result"]
            return result
        if "raised" in reply:
            raise reply["raised"]
        log.error("%s failed in the check process:\n%s", fn.__name__, reply["trace"].rstrip())
        raise CheckFailed(reply["failed"])

    async def warm(self) -> None:
        """Start the check process now, wait until it answers, and keep it (no idle exit).

        ``balancer run`` calls this before it serves: the process's start (an interpreter and
        ~150 ms of imports) then never competes with the loop for a core under load, where
        it cost a reload 5-6 ms of stall (bench/reloadstall.py); the first reload is faster."""
        self._keep = True  # _request cancels an idle timer already set, and sets no other
        await self.call(os.getpid)

    async def _request(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The child's reply to ``message``; None when it must be done here instead."""
        async with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            try:
                proc = await self._started()
            except OSError as exc:
                log.warning("cannot start the check process (%s): checking in a thread of "
                            "this one", exc)
                return None
            try:  # what comes back may hold a plug-in's objects: importable here meanwhile
                with beside(self.config_path):
                    reply = await self._ask(proc, message)
            finally:
                if not self._keep:
                    self._idle = asyncio.get_running_loop().call_later(IDLE, self._stop_idle)
        if "unsendable" in reply:
            log.warning("the check process cannot send what was asked (%s): computing it in a "
                        "thread of this one", reply["unsendable"])
            return None
        return reply

    async def _started(self) -> Child:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await Child.start(sys.executable, "-c", _START, _ROOT)
        return self._proc

    async def _ask(self, proc: Child, message: dict[str, Any]) -> dict[str, Any]:
        try:
            try:
                data = frame({**message, "sys_path": list(sys.path)})
            except Exception as exc:  # arguments pickle cannot send
                return {"unsendable": f"{type(exc).__name__}: {exc}"}
            proc.stdin.write(data)
            await proc.stdin.drain()
            reply: dict[str, Any] = await asyncio.wait_for(read_message(proc.stdout), TIMEOUT)
            return reply
        except asyncio.TimeoutError:
            self._proc = None
            proc.kill()
            await proc.wait()
            raise CheckFailed(f"the check took longer than {TIMEOUT:g}s: stopped") from None
        except (OSError, EOFError, asyncio.IncompleteReadError):
            self._proc = None
            try:
                code = await asyncio.wait_for(proc.wait(), 2.0)
            except asyncio.TimeoutError:  # its end of the pipe closed, yet it runs on
                proc.kill()
                code = await proc.wait()
            raise CheckFailed(f"the check process died while checking ({_exit(code)})") \
                from None

    def _stop_idle(self) -> None:
        self._idle = None
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stdin.close()  # end of file: the child exits
            self._reaped = asyncio.ensure_future(proc.wait())  # and leaves no zombie

    async def close(self) -> None:
        """Stop the child (at the end of a drain)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
        except asyncio.TimeoutError:  # in the middle of a long check: not needed any more
            proc.kill()
            await proc.wait()


class Child:
    """The check process and its two pipes on the loop.

    Started by ``subprocess.Popen``, which uses vfork (~0.5 ms here), not by the loop's
    ``subprocess_exec``: uvloop's fork copies the serving process's page tables and held the
    loop 2-7 ms at the first reload (bench/reloadstall.py --sentinel)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdin: asyncio.StreamWriter,
                 stdout: asyncio.StreamReader) -> None:
        self.popen, self.pid, self.stdin, self.stdout = popen, popen.pid, stdin, stdout

    @classmethod
    async def start(cls, *argv: str) -> Child:
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert popen.stdin is not None and popen.stdout is not None
        loop = asyncio.get_running_loop()
        try:
            stdout = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout),
                                         popen.stdout)
            sink, protocol = await loop.connect_write_pipe(
                lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), popen.stdin)
        except BaseException:
            popen.kill()
            popen.wait()
            raise
        return cls(popen, asyncio.StreamWriter(sink, protocol, None, loop), stdout)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        self.popen.kill()

    async def wait(self) -> int:
        """Its exit status (negative: the signal that ended it), reaped in a thread; the pipe
        to it is closed then (the one from it closes at its end of file)."""
        code = await asyncio.to_thread(self.popen.wait)
        self.stdin.close()
        return code


def _exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


# --------------------------------------------------------------------------- the child


def answer(path: str) -> dict[str, Any]:
    """What the child sends back for ``path``: ``check_file``'s outcome as data."""
    try:
        applied = check_file(path)
    except Refused as exc:
        return {"refused": (exc.report, exc.source, exc.config)}
    except ConfigError as exc:
        return {"invalid": (isinstance(exc, UnreadableConfig), exc.problems, exc.source)}
    except Exception as exc:  # a plug-in's bug: the parent logs the trace and refuses
        return {"failed": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    try:
        prepared: Prepared | None = prepare_pools(applied.config)
    except Exception:  # a plug-in's precompute: the parent's fleet builds it, and says why
        prepared = None
    return {"applied": applied, "prepared": prepared}


def main() -> int:
    """``python -c …checker…``: answer each path read from stdin on stdout, until stdin
    ends (the parent closed it, or died)."""
    die_with_parent()
    if os.getppid() == 1:  # the parent died before PDEATHSIG was set
        return 1
    courteous()
    # The imported code is never garbage: frozen, no collection walks it again (a full one
    # took 7-14 ms). Collections were off while importing (_START), and none runs first: it
    # would hold the CPU ~7 ms to free a few dozen objects.
    gc.freeze()
    gc.enable()
    if NICE:
        try:
            os.nice(NICE)
        except OSError:  # pragma: no cover - not allowed: the same priority, another GIL
            pass
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a plug-in's print() goes to stderr, never into a reply
    while True:
        try:
            request = read_message_from(requests)
        except EOFError:
            return 0
        except Exception as exc:  # a function or value this process cannot import
            reply: dict[str, Any] = {"unsendable": f"{type(exc).__name__}: {exc}"}
        else:
            sys.path[:] = request["sys_path"]
            if "check" in request:
                reply = answer(request["check"])
            else:
                with beside(request["beside"]):
                    reply = result_of(*request["call"])
        replies.write(_framed(reply))
        replies.flush()


def result_of(fn: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Any]:
    """``fn(*args)`` as a reply: its result, or what it raised (as itself when pickle can
    carry it back unchanged, else as text)."""
    try:
        return {"result": fn(*args)}
    except Exception as exc:
        try:
            if type(pickle.loads(pickle.dumps(exc))) is type(exc):
                return {"raised": exc}
        except Exception:  # an exception pickle cannot rebuild
            pass
        return {"failed": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


def _framed(reply: dict[str, Any]) -> bytes:
    """``reply`` framed; without its tables if only they cannot be pickled (a plug-in's)."""
    try:
        return frame(reply)
    except Exception as exc:  # whatever pickle raises on a plug-in's data
        if reply.get("prepared") is not None:
            return _framed({**reply, "prepared": None})
        if "raised" in reply:  # rebuilt, but with something pickle cannot send
            raised = reply["raised"]
            return frame({"failed": f"{type(raised).__name__}: {raised}", "trace": ""})
        return frame({"unsendable": f"{type(exc).__name__}: {exc}"})
