"""The benchmark harness: it runs end to end, prints its tables, and leaves nothing behind.

No speed is asserted (the machine is shared); these check that the harness measures and
cleans up, and that its arithmetic is right.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import aiohttp
import pytest

from bench.load import LoadResult, parse_wrk
from bench.report import Measurement, summarise
from tests.support.net import free_port, name_app, run_app

BENCH = Path(__file__).resolve().parent.parent / "bench"

SCENARIO_NAMES = {"small c64", "small c8", "64KiB c64"}


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--proxies", "balancer",
         "--json", str(out), *args],
        check=False, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(out.read_text())


def assert_cleaned_up(stdout: str) -> None:
    """The run's work dir is gone, and no process runs from it (its configs live there)."""
    workdir = re.search(r"^workdir: (\S+)", stdout, re.MULTILINE)
    assert workdir, stdout
    assert not Path(workdir[1]).exists()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            assert workdir[1].encode() not in cmdline, cmdline


def assert_numbers(stdout: str, raw: dict, proxies: tuple[str, ...] = ("balancer",)) -> None:
    lines = stdout.splitlines()
    for proxy in proxies:
        assert sum(ln.startswith(f"| {proxy} |") for ln in lines) == 1, stdout  # the summary
        assert sum(ln.startswith(f"| small c64 | {proxy} |") for ln in lines) == 1, stdout
        assert raw["peak_rss_kib"][proxy] > 0
        assert proxy in raw["idle_bytes"]
    ms = raw["measurements"]
    assert {m["scenario"] for m in ms} == SCENARIO_NAMES
    assert {m["proxy"] for m in ms} == set(proxies)
    for m in ms:
        assert m["load"]["requests"] > 0 and m["cpu_us_per_request"] > 0, m
        assert m["load"]["errors"] == 0 and m["load"]["non2xx"] == 0, m


def test_quick_run_against_balancer_and_the_floor(tmp_path: Path) -> None:
    done, raw = run_bench(tmp_path, "--proxies", "balancer,floor")
    assert_numbers(done.stdout, raw, ("balancer", "floor"))
    assert_cleaned_up(done.stdout)


def test_quick_run_with_the_bundled_backend_and_load_generator(tmp_path: Path) -> None:
    """The fallbacks for a machine without nginx and wrk."""
    done, raw = run_bench(tmp_path, "--backend", "builtin", "--load", "python",
                          "--duration", "1", "--idle", "20")
    assert "backend: builtin; load: python" in done.stdout
    assert_numbers(done.stdout, raw)
    assert_cleaned_up(done.stdout)


@pytest.fixture
async def floor() -> AsyncIterator[int]:
    """bench/floor.py in front of two real backends, ``a`` and ``b``; yields its port."""
    async with run_app(name_app("a")) as a, run_app(name_app("b")) as b:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH / "floor.py"), str(port), str(a), str(b),
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
            yield port
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_floor_forwards_with_the_headers_balancer_adds(floor: int) -> None:
    """The floor does the benchmark's work for real: round robin over one kept-alive client
    connection, the forwarding headers both ways, request bodies plain and chunked."""
    url = f"http://127.0.0.1:{floor}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        seen, rids = [], set()
        for _ in range(4):
            async with session.get(f"{url}/headers",
                                   headers={"X-Forwarded-For": "203.0.113.7"}) as resp:
                assert resp.status == 200
                sent = await resp.json()
                seen.append(resp.headers["X-Backend"])
                assert resp.headers["Via"] == "1.1 floor"
                assert sent["X-Request-ID"] == resp.headers["X-Request-ID"]
                rids.add(sent["X-Request-ID"])
                assert sent["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
                assert sent["X-Forwarded-Proto"] == "http"
                assert sent["X-Forwarded-Host"] == sent["Host"] == f"127.0.0.1:{floor}"
                assert sent["Via"] == "1.1 floor"
        assert sorted(seen) == ["a", "a", "b", "b"] and seen[0] != seen[1], seen
        assert len(rids) == 4

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"one ", b"two"):
                yield part

        for body, echoed in ((b"plain body", b"plain body"), (chunks(), b"one two")):
            async with session.post(f"{url}/echo", data=body) as resp:
                assert resp.status == 200
                assert await resp.read() == echoed

    # Keep-alive: two answers on one client connection, the backends taking turns.
    reader, writer = await asyncio.open_connection("127.0.0.1", floor)
    try:
        names = []
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" not in head
            names.append(await asyncio.wait_for(reader.readexactly(1), 10))
        assert sorted(names) == [b"a", b"b"]
    finally:
        writer.close()


WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   690.12us  120.00us   4.10ms   90.00%
    Req/Sec    92.51k     3.01k   96.00k    80.00%
  Latency Distribution
     50%  650.00us
     75%  700.00us
     90%  800.00us
     99%    1.20ms
  920512 requests in 10.00s, 110.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  92051.20
Transfer/sec:     11.00MB
"""


def test_parse_wrk_reads_totals_percentiles_and_errors() -> None:
    r = parse_wrk(WRK_OUTPUT)
    assert r == LoadResult(requests=920512, seconds=10.0, rps=92051.2, p50_ms=0.65,
                           p99_ms=1.2, errors=3, non2xx=4)


def _m(proxy: str, rnd: int, rps: float, cpu_us: float = 10.0) -> Measurement:
    load = LoadResult(int(rps), 1.0, rps, 1.0, 2.0, 0, 0)
    return Measurement(proxy, "small c64", rnd, load, cpu_us, {"proxy cpu": 0.0})


def test_ratios_are_the_median_of_same_round_ratios() -> None:
    # nginx drifts between rounds; balancer's ratio to it within each round is 0.5, 0.6, 0.5,
    # and its CPU per request is 2x, 4x, 2.5x nginx's.
    ms = [_m("nginx", 1, 100.0, 10.0), _m("balancer", 1, 50.0, 20.0),
          _m("nginx", 2, 50.0, 12.0), _m("balancer", 2, 30.0, 48.0),
          _m("nginx", 3, 80.0, 10.0), _m("balancer", 3, 40.0, 25.0)]
    by_proxy = {s.proxy: s for s in summarise(ms)}
    assert by_proxy["nginx"].ratio == 1.0 and by_proxy["nginx"].cpu_ratio == 1.0
    assert by_proxy["balancer"].ratio == pytest.approx(0.5)
    assert by_proxy["balancer"].cpu_ratio == pytest.approx(0.4)
    assert by_proxy["balancer"].rps == 40.0


def test_report_reprints_a_saved_run(tmp_path: Path) -> None:
    raw = {"measurements": [asdict(_m("nginx", 1, 100.0)), asdict(_m("balancer", 1, 50.0))],
           "peak_rss_kib": {"balancer": 2048}, "idle_bytes": {"balancer": 1500.0}}
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--report", str(saved)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    row = next(ln for ln in done.stdout.splitlines() if ln.startswith("| balancer |"))
    assert "0.50 / 1.00 (50 rps)" in row and "2.0" in row and "1,500" in row, row
