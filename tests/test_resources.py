"""Resource bounds of ``balancer run`` (its own process, measured from /proc).

- Memory stays flat while a large body streams through, each way, with the far end stalling
  for a second mid-transfer (flow control must hold the fast side back rather than buffer).
  Peak RSS (VmHWM) is compared with the RSS before the transfer.
- Memory per idle keep-alive client connection: open N, one request each, hold them.
- File descriptors: holding N connections and closing them gives every fd back.

The default run uses 200 MB and 2,000 connections; ``BALANCER_LONG=1`` adds the 1 GiB transfers
and 10,000 connections (marked slow; scripts/reliability.py runs them).
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.support.backends import BackendProcess, pattern_ok, upload_blocks
from tests.support.load import no_hidden_retries, record_figure
from tests.support.proc import RunningBalancer, fd_count, memory, settle_fds

LONG = os.environ.get("BALANCER_LONG") == "1"
MiB = 1 << 20
long_only = [pytest.mark.slow,
             pytest.mark.skipif(not LONG, reason="set BALANCER_LONG=1 (scripts/reliability.py)")]
SIZES = [pytest.param(200 * MiB, id="200MB"), pytest.param(1 << 30, id="1GiB", marks=long_only)]
CONNECTIONS = [pytest.param(2_000, id="2k"), pytest.param(10_000, id="10k", marks=long_only)]

#: How far the proxy's peak RSS may rise over its RSS before a transfer, whatever its size.
MAX_GROWTH = 40 * MiB
#: Memory one idle keep-alive client connection may cost the proxy (bench/README.md aims at
#: 4 KiB; this bound leaves room for allocator noise on small counts).
MAX_PER_CONNECTION = 12 * 1024


@asynccontextmanager
async def proxy_over_one_backend(tmp_path: Path, **top: Any) -> AsyncIterator[RunningBalancer]:
    """A backend process and ``balancer run`` in front of it (``top``: more config keys)."""
    async with BackendProcess("big", tmp_path) as big:
        pools = {"web": {"backends": [big.entry()],
                         "allow_concentration": "one backend: the proxy is what is measured"}}
        async with RunningBalancer(tmp_path, pools, **top) as px:
            yield px


@pytest_asyncio.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[RunningBalancer]:
    """Fresh for each test, so that each peak RSS is its own."""
    async with proxy_over_one_backend(tmp_path) as px:
        yield px


async def warm(px: RunningBalancer, session: aiohttp.ClientSession) -> int:
    """A few small requests (imports done, first connections made); the RSS after them."""
    for i in range(5):
        async with session.get(px.url + "/item", headers={"X-Request-ID": f"warm-{i}"}) as r:
            assert r.status == 200
            await r.read()
    await asyncio.sleep(0.2)
    return memory(px.pid)["VmRSS"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_download_through_a_stalling_client_keeps_memory_flat(
        proxied: RunningBalancer, size: int, chunked: bool) -> None:
    px = proxied
    got = 0
    bad_at: int | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        no_hidden_retries(s)
        before = await warm(px, s)
        url = f"{px.url}/download?size={size}" + ("&chunked=1" if chunked else "")
        async with s.get(url) as r:
            assert r.status == 200
            first = await r.content.readexactly(MiB)
            got = len(first)
            await asyncio.sleep(1.0)  # a slow client: the backend could send it all meanwhile
            async for chunk in r.content.iter_chunked(MiB):
                if bad_at is None and not pattern_ok(chunk, got):
                    bad_at = got
                got += len(chunk)
    peak = memory(px.pid)["VmHWM"]
    record_figure("memory", case=f"download {size // MiB} MiB "
                  f"({'chunked' if chunked else 'Content-Length'}), client stalls 1 s",
                  bytes=size, rss_before=before, peak_rss=peak, growth=peak - before)
    assert pattern_ok(first, 0) and bad_at is None and got == size, (bad_at, got)
    assert peak - before < MAX_GROWTH, f"peak RSS grew {(peak - before) / MiB:.1f} MiB"


@pytest.mark.parametrize("size", SIZES)
async def test_upload_to_a_stalling_backend_keeps_memory_flat(
        proxied: RunningBalancer, size: int) -> None:
    px = proxied
    body, digest = upload_blocks(size)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        no_hidden_retries(s)
        before = await warm(px, s)
        # The backend stops reading for a second after the first MiB (?pause=1).
        async with s.post(px.url + "/upload?pause=1", data=body,
                          headers={"Content-Length": str(size)}) as r:
            assert r.status == 200
            answer = await r.json(content_type=None)
    peak = memory(px.pid)["VmHWM"]
    record_figure("memory", case=f"upload {size // MiB} MiB (Content-Length), backend stalls 1 s",
                  bytes=size, rss_before=before, peak_rss=peak, growth=peak - before)
    assert answer == {"bytes": size, "sha256": digest.hexdigest(), "backend": "big"}
    assert peak - before < MAX_GROWTH, f"peak RSS grew {(peak - before) / MiB:.1f} MiB"


# --------------------------------------------------------------------------- idle connections


@pytest.fixture
def nofile() -> Iterator[None]:
    """Put RLIMIT_NOFILE back as it was after a test that raised it."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def raise_nofile(needed: int) -> None:
    """Raise this process's fd limit (inherited by the proxy it starts) or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (needed, hard if hard == resource.RLIM_INFINITY or hard >= needed
                            else needed))
    except (ValueError, OSError) as exc:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {needed} (soft {soft}, hard {hard}): {exc}")


REQUEST = b"GET /item?size=64 HTTP/1.1\r\nHost: idle.test\r\nX-Request-ID: idle\r\n\r\n"


async def open_idle(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that has had one request answered, and is now idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return reader, writer


@pytest.mark.parametrize("n", CONNECTIONS)
async def test_idle_keepalive_connections_cost_little_and_give_back_their_fds(
        tmp_path: Path, n: int, nofile: None) -> None:
    raise_nofile(n + 1024)  # before the proxy starts: it inherits the limit
    # max_clients defaults to half the fd limit; here every one of the n is wanted.
    async with proxy_over_one_backend(tmp_path, client={"max_clients": n + 64}) as px:
        await hold_idle(px, n)


async def hold_idle(px: RunningBalancer, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        before = await warm(px, s)
    await asyncio.sleep(0.3)
    fds_before = fd_count(px.pid)
    before = memory(px.pid)["VmRSS"]
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, n, 200):
            held += await asyncio.gather(*(open_idle(px.port) for _ in range(min(200, n - start))))
        await asyncio.sleep(0.5)
        after = memory(px.pid)["VmRSS"]
        fds_held = fd_count(px.pid)
        # Still serving: a new connection gets its answer at once.
        reader, writer = await asyncio.wait_for(open_idle(px.port), 10)
        writer.close()
        # And each held connection is still open, ready for its next request.
        reader, writer = held[len(held) // 2]
        writer.write(REQUEST)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(
            b"HTTP/1.1 200")
    finally:
        for _, writer in held:
            writer.transport.abort()
    per_connection = (after - before) / n
    fds_after = await settle_fds(px.pid, fds_before, timeout=15)
    record_figure("memory", case=f"{n:,} idle keep-alive client connections", connections=n,
                  rss_before=before, rss_with=after, bytes_per_connection=round(per_connection))
    record_figure("fds", case=f"{n:,} client connections held then closed",
                  baseline=fds_before, held=fds_held, after=fds_after)
    assert fds_held >= fds_before + n
    assert per_connection < MAX_PER_CONNECTION, f"{per_connection:.0f} bytes per connection"
    assert fds_after == fds_before, (fds_before, fds_held, fds_after)
