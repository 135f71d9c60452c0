"""Where balancer's CPU goes under load: py-spy samples it while wrk drives small requests.

    pip install py-spy
    python bench/hotspots.py [--seconds 10] [--connections 64] [--native] [--out DIR]
    python bench/hotspots.py --perf        # kernel / CPython / httptools / uvloop, with perf

Same set-up as run.py (balancer pinned to CPU 0; nginx backend, wrk and py-spy on CPU 1), then
prints self time (the function on top of the stack) and inclusive time per function and per
file, as shares of the samples in which balancer was busy. ``--native`` includes C frames
(uvloop, httptools, the kernel boundary). The raw stacks stay in ``--out`` for a flame graph
(``flamegraph.pl`` or speedscope.app take them as they are).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find bench.*

from bench.load import load_tool, run_load
from bench.servers import VARIANTS, Processes, StartError, start_backend, start_proxy

#: What each file of the request path is for, to add self time up by area (the profile that
#: says where the CPU beyond a featureless proxy goes). Frames outside ``balancer/`` are the
#: event loop (uvloop's callbacks into Python, epoll, the socket calls made from there).
AREAS = {
    "balancer/http1/": "parsing and the HTTP/1 rules (httptools callbacks, checks)",
    "balancer/proxy.py": "client connection (keep-alive, order, flow control)",
    "balancer/slowclients.py": "client connection (keep-alive, order, flow control)",
    "balancer/exchange.py": "forwarding (heads, answer, retries, timers)",
    "balancer/forward.py": "forwarding (heads, answer, retries, timers)",
    "balancer/upstream.py": "upstream connections (pool, response parsing)",
    "balancer/proxystate.py": "forwarding (heads, answer, retries, timers)",
    "balancer/accesslog.py": "access log",
    "balancer/pool.py": "pool, strategy, backend counters",
    "balancer/backend.py": "pool, strategy, backend counters",
    "balancer/strategies/": "pool, strategy, backend counters",
    "balancer/router.py": "routing",
}


def area_of(path: str) -> str:
    """The area of ``path`` (as ``_short`` gives it)."""
    for prefix, area in AREAS.items():
        if path.startswith(prefix):
            return area
    if path.startswith("balancer/"):
        return "balancer, elsewhere (metrics, monitor, admin, health)"
    return "event loop and what Python calls from it (outside balancer/)"


def summarise(raw: str, top: int = 25) -> str:
    """Self and inclusive shares from py-spy's ``--format raw`` (collapsed stacks)."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_file: Counter[str] = Counter()
    self_area: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        self_fn[frames[-1][0]] += n
        self_file[frames[-1][1]] += n
        self_area[area_of(frames[-1][1])] += n
        for name in {f[0] for f in frames}:
            incl_fn[name] += n
    if not total:
        return "no samples (was the proxy busy? is py-spy allowed to attach?)"

    def table(title: str, counter: Counter[str]) -> str:
        rows = [f"{n / total:6.1%}  {name}" for name, n in counter.most_common(top)]
        return f"{title}\n" + "\n".join(rows)

    return "\n\n".join([f"{total} samples while busy",
                        table("self time by function", self_fn),
                        table("self time by file", self_file),
                        table("self time by area", self_area),
                        table("inclusive time by function", incl_fn)])


def _short(frame: str) -> tuple[str, str]:
    """``func (path/to/file.py:12)`` → (``func (file.py)``, ``file.py``)."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    marker = "/balancer/"
    if marker in "/" + path:  # absolute, or relative to the checkout
        path = "balancer/" + ("/" + path).split(marker, 1)[1]
    else:
        path = path.rsplit("/", 1)[-1] or "?"
    return f"{name} ({path})", path


def _recorder(args: argparse.Namespace, pid: int, out: Path) -> list[str]:
    """The sampling command: py-spy (Python frames) or perf (kernel / CPython / C split)."""
    if args.perf:
        return ["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(out),
                "--", "sleep", str(args.seconds)]
    spy = ["py-spy", "record", "--pid", str(pid), "--duration", str(args.seconds + 1),
           "--rate", "200", "--format", "raw", "-o", str(out)]
    # --native must pause the process to unwind C stacks; plain sampling need not.
    return spy + (["--native"] if args.native else ["--nonblocking"])


def perf_summary(data: Path) -> str:
    """``perf report`` by shared object: kernel, libpython, httptools, uvloop…"""
    done = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio",
                           "--no-children", "-g", "none"], check=False, capture_output=True,
                          text=True, timeout=120)
    rows = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()[:1].isdigit()]
    return "CPU samples by shared object (perf)\n" + "\n".join(rows[:12])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/hotspots.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--path", default="/", help="/ (small) or /64k")
    ap.add_argument("--native", action="store_true", help="py-spy: include C frames")
    ap.add_argument("--perf", action="store_true",
                    help="sample with perf instead: kernel / CPython / httptools / uvloop split")
    ap.add_argument("--proxy", default="balancer", choices=("balancer",) + VARIANTS,
                    help="which balancer to profile (variants as in run.py)")
    ap.add_argument("--alt-src", type=Path, metavar="DIR", help="for --proxy balancer-alt")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    tool_name = "perf" if args.perf else "py-spy"
    if shutil.which(tool_name) is None:
        print(f"bench/hotspots.py: {tool_name} is not installed "
              f"({'apt-get install linux-perf' if args.perf else 'pip install py-spy'})",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / f"hotspots-{args.proxy}.{'perf.data' if args.perf else 'txt'}"
    with tempfile.TemporaryDirectory(prefix="balancer-hotspots-") as tmp:
        cpus = sorted(os.sched_getaffinity(0))
        procs = Processes(Path(tmp), pin=len(cpus) >= 2)
        mine, other = (cpus[0], cpus[1]) if procs.pin else (None, None)
        try:
            backend = start_backend(procs, "nginx" if shutil.which("nginx") else "builtin", other)
            proxy = start_proxy(procs, args.proxy, backend, mine, alt_src=args.alt_src)
            tool = load_tool("auto")
            run_load(tool, f"http://127.0.0.1:{proxy.port}/", 64, 1, other)  # warm up
            pin = ["taskset", "-c", str(other)] if procs.pin else []
            recorder = subprocess.Popen(pin + _recorder(args, proxy.proc.pid, raw_path),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
            result = run_load(tool, f"http://127.0.0.1:{proxy.port}{args.path}",
                              args.connections, args.seconds, other)
            _, err = recorder.communicate(timeout=args.seconds + 60)
            if recorder.returncode != 0:
                print(f"bench/hotspots.py: {tool_name} failed: {err.strip()[-500:]}",
                      file=sys.stderr)
                return 1
        except StartError as exc:
            print(f"bench/hotspots.py: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    print(f"load while sampled: {result.rps:,.0f} requests/s, p50 {result.p50_ms:.2f} ms, "
          f"p99 {result.p99_ms:.2f} ms (sampling costs the proxy a little)\n")
    print(perf_summary(raw_path) if args.perf else summarise(raw_path.read_text()))
    print(f"\nraw samples: {raw_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
