"""The Python cost of balancer's request path alone: no sockets, no kernel, no other process.

    python bench/pathcost.py                       # this checkout
    python bench/pathcost.py --src DIR [--src DIR]  # other checkouts' balancer/, interleaved
    python bench/pathcost.py --case hashed          # consistent_hash on a header the access
                                                    # log records (a keyed digest per line)
    python bench/pathcost.py --instructions [--src DIR --src DIR]
                                                    # machine instructions per request, counted
                                                    # by valgrind: the same to ~0.1% from run to
                                                    # run, on a loaded machine too

A socket benchmark (run.py) on this shared 2-core VM moves by ±10–20% between rounds, more
than most single changes to the request path are worth. This drives the real objects of
``balancer run`` (the App built from templates/balancer.yaml, ClientConnection, Exchange, Pool,
UpstreamConnection, the access log) through their protocol callbacks, with transports that
only count writes, and reports CPU µs per request (best of ``--reps``): the same bytes as wrk
sends and nginx answers, parsed by the same httptools. Differences of ~0.2 µs are visible;
what it leaves out (syscalls, the event loop's epoll, uvloop's buffers) is in run.py's figure.
Each source tree runs in its own interpreter, alternating, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
#: ``--case hashed``: the pool hashes on X-Tenant, so each access line records its digest.
REQUEST_HASHED = REQUEST[:-2] + b"X-Tenant: acme\r\n\r\n"
HASHED_STRATEGY = 'strategy: {name: consistent_hash, key: "header:X-Tenant"}'
# What the nginx backend of run.py answers on "/".
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 19:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


class CountingTransport:
    """Just enough of an asyncio transport for the request path; writes are counted."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.writes = 0
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0


async def measure(config: str, requests: int, reps: int, request: bytes = REQUEST) -> float:
    """CPU µs per request, best of ``reps`` batches (imports balancer from sys.path)."""
    from balancer import logs
    from balancer.app import App
    from balancer.proxy import ClientConnection
    from balancer.upstream import UpstreamConnection, UpstreamPool

    # The access log on, batched, as shipped, into /dev/null: a real run's file costs a write
    # per batch; an io.StringIO would grow to hundreds of MB and slow every append.
    sink = open(os.devnull, "w")  # open for the whole measurement
    logs.setup_logging(stream=sink)
    app = App(config)
    for pool in app.pools.values():
        for backend in pool.backends:
            upool = backend.connections = UpstreamPool(backend)
            up = UpstreamConnection(upool)
            up.connection_made(CountingTransport(("127.0.0.1", 1)))  # type: ignore[arg-type]
            upool.release(up, True)  # one warm keep-alive connection per backend
    client = ClientConnection(app.state)
    out = CountingTransport(("127.0.0.1", 5555))
    client.connection_made(out)  # type: ignore[arg-type]
    gc.collect()
    gc.freeze()  # as app.main_run does after start-up
    gc.set_threshold(10_000, 20, 20)
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        for _ in range(requests):
            client.data_received(request)
            client.current.upstream.data_received(RESPONSE)  # type: ignore[union-attr]
        best = min(best, (time.process_time() - t) / requests * 1e6)
        await asyncio.sleep(0.15)  # the access log's batch timer fires between batches
    if out.writes != reps * requests:
        raise SystemExit(f"expected {reps * requests} answers, the client got {out.writes}")
    return best


def child(src: str, requests: int, reps: int, case: str = "plain",
          counted: bool = False) -> None:
    if counted:
        # Under valgrind a request takes ~50x as long: a clock that advances 28 us a call keeps
        # the access log's once-a-millisecond timestamp as cheap as at full speed.
        time.time = itertools.count(1.78e9, 28e-6).__next__
    sys.path.insert(0, src)
    import uvloop

    import balancer

    if not balancer.__file__ or not balancer.__file__.startswith(os.path.abspath(src)):
        raise SystemExit(f"imported {balancer.__file__}, not the tree in {src}")
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "balancer.yaml"
        text = (HERE / "templates" / "balancer.yaml").read_text()
        for key, port in (("$port", 18080), ("$admin_port", 18081), ("$backend1", 18082),
                          ("$backend2", 18083), ("$workers", 1)):  # never bound: App()
            # only builds objects
            text = text.replace(key, str(port))
        if case == "hashed":
            text = text.replace("strategy: round_robin", HASHED_STRATEGY)
        # One process is what this measures; trees older than `workers` refuse the key.
        text = "\n".join(line for line in text.splitlines() if not line.startswith("workers:"))
        config.write_text(text)
        request = REQUEST_HASHED if case == "hashed" else REQUEST
        print(f"{uvloop.run(measure(str(config), requests, reps, request)):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", help="a checkout holding balancer/ (repeatable;"
                    " default: this one)")
    ap.add_argument("--requests", type=int, default=40_000, help="per batch")
    ap.add_argument("--reps", type=int, default=5, help="batches; the best is kept")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per source")
    ap.add_argument("--case", choices=("plain", "hashed"), default="plain",
                    help="plain: round robin (default); hashed: consistent_hash on a header")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per request under valgrind (cachegrind) instead:"
                         " the difference between runs of 500 and 2,500 requests")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.requests, args.reps, args.case, args.counted)
        return
    srcs = [os.path.abspath(s) for s in (args.src or [str(HERE.parent)])]
    if args.instructions:
        counted = {src: instructions(src, args.case) for src in srcs}
        for src, per in counted.items():
            print(f"{per:9,d} instructions/request  {per / counted[srcs[0]]:.3f} of the first"
                  f"  {src}")
        return
    results: dict[str, list[float]] = {s: [] for s in srcs}
    for _ in range(args.rounds):
        for src in srcs:
            done = subprocess.run(
                [sys.executable, __file__, "--child", src, "--requests", str(args.requests),
                 "--reps", str(args.reps), "--case", args.case], capture_output=True,
                text=True, cwd=src, timeout=600, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{src}: {(done.stderr or done.stdout).strip()[-800:]}")
            results[src].append(float(done.stdout.split()[-1]))
    first = min(results[srcs[0]])
    for src, values in results.items():
        best = min(values)
        print(f"{best:6.2f} µs/request of Python (runs: {', '.join(f'{v:.2f}' for v in values)})"
              f"  {best / first:.3f} of the first  {src}")


def instructions(src: str, case: str) -> int:
    """Instructions per request of ``src``'s request path (no gc.freeze noise: one batch)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("bench/pathcost.py: --instructions needs valgrind (apt-get install "
                         "valgrind)")
    counts = []
    for n in (500, 2500):
        done = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no",
             "--cachegrind-out-file=/dev/null", sys.executable, __file__, "--child", src,
             "--requests", str(n), "--reps", "1", "--case", case, "--counted"],
            capture_output=True, text=True, cwd=src, timeout=900, check=False,
            env={**os.environ, "PYTHONHASHSEED": "0"})
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"{src}: {(done.stderr or done.stdout).strip()[-800:]}")
        counts.append(int(found.group(1).replace(",", "")))
    return (counts[1] - counts[0]) // 2000


if __name__ == "__main__":
    main()
