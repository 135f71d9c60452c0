"""How balancer's own processes talk: pickled messages framed by a 4-byte length.

A supervisor and its workers (balancer/mirror.py) and the app and its check process
(balancer/checker.py) run the same code, so a message is any picklable value: a checked Config
travels as itself. The config's read-only mappings (``MappingProxyType``, which pickle cannot
name) travel as such. A child started by balancer dies with it (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import copyreg
import ctypes
import io
import pickle
import signal
import struct
import sys
from types import MappingProxyType
from typing import IO, Any

HEADER = struct.Struct("!I")


def read_only(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    """Rebuilds a config's read-only mapping on the receiving side."""
    return MappingProxyType(d)


def _reduce_mapping(m: MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return read_only, (dict(m),)


def frame(message: Any) -> bytes:
    """``message`` pickled behind its length (pickle's errors, when it cannot be)."""
    buf = io.BytesIO()
    buf.write(b"\0\0\0\0")
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _reduce_mapping}
    pickler.dump(message)
    HEADER.pack_into(buf.getbuffer(), 0, buf.tell() - HEADER.size)
    return buf.getvalue()


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next framed message; raises asyncio.IncompleteReadError when the peer is gone."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return pickle.loads(await reader.readexactly(size))


def read_message_from(stream: IO[bytes]) -> Any:
    """The next framed message from a blocking stream; EOFError when the peer is gone."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        raise EOFError("the peer is gone")
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        raise EOFError("the peer is gone")
    return pickle.loads(body)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans); elsewhere the end
    of file on the pipe to the parent ends it."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no libc: EOF still ends us
            pass
