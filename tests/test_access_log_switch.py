"""The access log through a real `balancer run`: a JSON line per request, off by config."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp

from tests.support.net import name_app, run_app
from tests.support.proc import BalancerProcess, pool_config, write_config


def _access_lines(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_access_log_lines_then_off_after_reload(tmp_path: Path) -> None:
    async with run_app(name_app("a")) as pa, run_app(name_app("b")) as pb:
        data = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0",
                "pools": {"web": pool_config([pa, pb])}}
        config = write_config(tmp_path / "balancer.yaml", data)
        async with BalancerProcess(config) as proc, aiohttp.ClientSession() as session:
            address = await proc.wait_ready()
            url = f"http://{address}/hello?x=1"
            for _ in range(5):
                async with session.get(url, headers={"X-Request-ID": "abc-1"}) as resp:
                    assert resp.status == 200
                    await resp.read()
            # Lines are written in batches (at most 0.1 s late).
            for _ in range(50):
                lines = _access_lines(proc.lines_since(0))
                if len(lines) >= 5:
                    break
                await asyncio.sleep(0.05)
            assert len(lines) == 5
            first = lines[0]
            assert first["request_id"] == "abc-1" and first["method"] == "GET"
            assert first["path"] == "/hello?x=1" and first["pool"] == "web"
            assert first["status"] == 200 and first["backend"] in (f"b{pa}", f"b{pb}")
            for key in ("time", "client", "upstream_time", "total_time", "bytes"):
                assert key in first

            write_config(config, {**data, "access_log": False})
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            await proc.wait_for("reload applied", since=mark)
            mark = proc.mark()
            for _ in range(5):
                async with session.get(url) as resp:
                    assert resp.status == 200
                    await resp.read()
            await asyncio.sleep(0.3)
            assert _access_lines(proc.lines_since(mark)) == []
