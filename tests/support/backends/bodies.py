"""Checkable bodies: what a faulty backend answers, and what the tests send it.

``body_for`` writes the backend's name and the request id, then a fixed pattern up to the asked
size, so ``check_body`` can tell a whole answer from a cut one (and say who wrote it).
``/download`` bodies repeat ``BLOCK`` (period 16), so ``pattern_ok`` can check any piece of one
at any offset; ``upload_blocks`` sends the same pattern up and digests it on the way.
"""

from __future__ import annotations

import hashlib
from typing import Any, AsyncIterator

PATTERN = b"0123456789abcdef" * 4096  # 64 KiB of filler
BLOCK = PATTERN * 4  # what /download sends, again and again (period 16: checkable anywhere)
_REFERENCE = BLOCK * 9  # 2.25 MiB: any piece of up to 2 MiB, at any offset, is in here


def body_for(name: str, rid: str, size: int) -> bytes:
    """The body a backend answers: ``<name> <rid>\\n`` then filler, exactly ``size`` bytes
    (or just the first line when it is longer)."""
    first = f"{name} {rid}\n".encode()
    if size <= len(first):
        return first
    rest = size - len(first)
    return first + (PATTERN * (rest // len(PATTERN) + 1))[:rest]


def check_body(body: bytes, rid: str, size: int) -> str | None:
    """The name of the backend that wrote ``body`` for ``rid``, or None if it is not exactly
    what ``body_for`` writes (cut short, padded, someone else's)."""
    first, _, _ = body.partition(b"\n")
    name, _, got_rid = first.decode("latin-1").partition(" ")
    if got_rid != rid or body != body_for(name, rid, size):
        return None
    return name


def pattern_ok(data: bytes, offset: int) -> bool:
    """Whether ``data`` (up to 2 MiB), found at ``offset`` of a /download body, is what was
    sent there."""
    start = offset % 16
    return len(data) <= 2 << 20 and data == _REFERENCE[start:start + len(data)]


def upload_blocks(size: int, block: int = 1 << 18) -> tuple[AsyncIterator[bytes], Any]:
    """An upload body of ``size`` pattern bytes as an async iterator, and the sha256 object
    that is fed as it is sent (compare its hexdigest with the backend's answer)."""
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            data = BLOCK[:min(block, left)]
            digest.update(data)
            left -= len(data)
            yield data

    return body(), digest
