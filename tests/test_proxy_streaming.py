"""100 MB each way through the proxy in its own process, with its memory measured.

The other end stalls for a second mid-transfer (a slow client on the download, a slow backend
on the upload): without flow control both ways the proxy would buffer what the fast side sends
meanwhile. Peak RSS (VmHWM) is read from /proc while the proxy runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
import yaml

from tests.support.backends import special_app
from tests.support.net import run_app

SIZE = 100 * 1024 * 1024
#: How much the proxy's peak RSS may grow over its idle RSS while 100 MB pass through.
MAX_GROWTH = 40 * 1024 * 1024


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """A backend here, and the proxy in front of it in a subprocess: (proxy URL, proxy pid)."""
    async with run_app(special_app("big")) as port:
        config = tmp_path / "proxy.yaml"
        config.write_text(yaml.safe_dump(
            {"pools": {"web": {"backends": [f"http://127.0.0.1:{port}"]}}}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.proxy_server", str(config), "0",
            "--no-access-log", stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stderr is not None
            line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
            m = re.search(r"listening on (\S+)", line)
            assert m, line
            yield f"http://{m.group(1)}", proc.pid
        finally:
            proc.kill()
            await proc.wait()


async def test_100mb_download_with_a_stalling_client_keeps_memory_flat(
        proxied: tuple[str, int]) -> None:
    url, pid = proxied
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(url + "/") as r:  # warm up: imports, first connection
            await r.read()
        before = memory(pid)["VmRSS"]
        got = 0
        async with s.get(url + f"/download?size={SIZE}") as r:
            assert r.status == 200
            got += len(await r.content.readexactly(1 << 20))
            await asyncio.sleep(1.0)  # the backend could send ~all of it meanwhile
            async for chunk in r.content.iter_chunked(1 << 20):
                got += len(chunk)
    growth = memory(pid)["VmHWM"] - before
    print(f"download: proxy peak RSS grew {growth / 2**20:.1f} MiB for {SIZE / 2**20:.0f} MiB")
    assert got == SIZE
    assert growth < MAX_GROWTH


async def test_100mb_upload_to_a_stalling_backend_keeps_memory_flat(
        proxied: tuple[str, int]) -> None:
    url, pid = proxied
    block = bytes(range(256)) * 1024  # 256 KiB
    digest = hashlib.sha256()
    for _ in range(SIZE // len(block)):
        digest.update(block)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(SIZE // len(block)):
            yield block

    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(url + "/") as r:
            await r.read()
        before = memory(pid)["VmRSS"]
        # The backend stops reading for a second after the first MiB (?pause=1).
        async with s.post(url + "/upload?pause=1", data=body()) as r:
            assert r.status == 200
            assert await r.json() == {"bytes": SIZE, "sha256": digest.hexdigest()}
    growth = memory(pid)["VmHWM"] - before
    print(f"upload: proxy peak RSS grew {growth / 2**20:.1f} MiB for {SIZE / 2**20:.0f} MiB")
    assert growth < MAX_GROWTH
