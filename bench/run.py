"""The benchmark: balancer against nginx and HAProxy, side by side, in interleaved rounds.

    python bench/run.py            # 3 rounds, wrk -d10s (about 6 minutes with all three proxies)
    python bench/run.py --quick    # 1 round, -d2s: a smoke test that the harness works

Follows ../shared/BENCHMARKING.md: the proxy under test pinned to CPU 0, backend and load
generator to CPU 1, one process/worker/thread per proxy, rounds interleaved (A, B, C, A, B, C…),
ratios to nginx taken within the same round. Every figure is read from the kernel or from the
load generator; every process and temp file is gone when the script ends, however it ends.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find bench.*

from bench.idle import bytes_per_idle_connection
from bench.load import LoadError, load_tool, run_load
from bench.procstat import TICKS_PER_SECOND, CpuSample, cpu_split, cpu_ticks, peak_rss_kib
from bench.report import (
    SCENARIOS,
    Measurement,
    Results,
    detail_table,
    headline_table,
    load_results,
    scaling_table,
    summarise,
)
from bench.servers import (
    PROXIES,
    REPO,
    VARIANTS,
    Backend,
    Processes,
    Proxy,
    StartError,
    proxy_missing,
    start_backend,
    start_proxy,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 2 s per load, 100 idle connections: checks the harness")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per load run (default 10; quick 2)")
    ap.add_argument("--idle", type=int, help="idle keep-alive connections (default 1000)")
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help="comma-separated, from: %(default)s (missing ones are skipped); "
                         f"also {', '.join(VARIANTS)} for A/B runs")
    ap.add_argument("--loads", default=",".join(name for name, _, _ in SCENARIOS),
                    help="comma-separated, from: %(default)s")
    ap.add_argument("--alt-src", type=Path, metavar="DIR",
                    help="for balancer-alt: a checkout whose balancer/ package to run")
    ap.add_argument("--backend", choices=("auto", "nginx", "builtin"), default="auto")
    ap.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--retries", type=int,
                    help="re-runs of a measurement disturbed by foreign CPU load (default 2; "
                         "quick 0)")
    ap.add_argument("--workers", default="1", metavar="N[,N…]",
                    help="workers per proxy (nginx worker_processes, HAProxy nbthread, balancer "
                         "--workers); several, e.g. 1,2, run each proxy at each count in the "
                         "same rounds, unpinned (default 1: pinned to one core)")
    ap.add_argument("--json", type=Path, help="write raw results here (default bench/results/)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: print the tables of an earlier run's raw results")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.idle = args.idle if args.idle is not None else (100 if args.quick else 1000)
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    try:
        args.workers = sorted({int(n) for n in str(args.workers).split(",")})
    except ValueError:
        ap.error(f"--workers takes whole numbers, e.g. 1,2 (got {args.workers!r})")
    if args.workers[0] < 1:
        ap.error("--workers: at least 1")
    return args


class Bench:
    """One run: the processes, where each is pinned, and the measurements taken."""

    def __init__(self, args: argparse.Namespace, procs: Processes) -> None:
        self.args = args
        self.procs = procs
        cpus = sorted(os.sched_getaffinity(0))
        # More than one worker needs more than one core: then nothing is pinned, and the
        # proxy, the backend and the load generator share every core (the ratios carry over).
        self.pinned = procs.pin and len(cpus) >= 2 and args.workers == [1]
        self.proxy_cpu = cpus[0] if self.pinned else None
        self.load_cpu = cpus[1] if self.pinned else None
        self.tool = load_tool(args.load)
        self.results = Results()

    def measure(self, proxy: Proxy, backend: Backend, scenario: tuple[str, str, int],
                rnd: int) -> Measurement:
        """One load run, re-run while foreign processes took more than their share of a core."""
        best: Measurement | None = None
        for attempt in range(1, self.args.retries + 2):
            m = self._measure_once(proxy, backend, scenario, rnd)
            m.attempts = attempt
            if best is None or max(m.foreign.values()) < max(best.foreign.values()):
                best = m
            if not m.disturbed:
                break
            print(f"    foreign CPU load {max(m.foreign.values()):.0%}: "
                  f"{'re-running' if attempt <= self.args.retries else 'keeping the calmest'}",
                  flush=True)
        assert best is not None
        return best

    def _measure_once(self, proxy: Proxy, backend: Backend, scenario: tuple[str, str, int],
                      rnd: int) -> Measurement:
        name, path, conns = scenario
        url = f"http://127.0.0.1:{proxy.port}{path}"
        cpu0, proxy0, backend0 = CpuSample.take(), cpu_split(proxy.proc.pid), \
            cpu_ticks(backend.proc.pid)
        ours0 = _children_and_self_seconds()
        started = time.monotonic()
        result = run_load(self.tool, url, conns, self.args.duration, self.load_cpu)
        elapsed = time.monotonic() - started
        user, system = (now - then for now, then in zip(cpu_split(proxy.proc.pid), proxy0))
        proxy_ticks = user + system
        backend_ticks = cpu_ticks(backend.proc.pid) - backend0
        ours = (_children_and_self_seconds() - ours0) * TICKS_PER_SECOND
        busy = CpuSample.take().since(cpu0)
        foreign: dict[str, float] = {}
        span = elapsed * TICKS_PER_SECOND
        if self.pinned:
            assert self.proxy_cpu is not None and self.load_cpu is not None
            foreign["proxy cpu"] = max(0.0, busy[self.proxy_cpu] - proxy_ticks) / span
            foreign["load cpu"] = max(0.0, busy[self.load_cpu] - backend_ticks - ours) / span
        elif busy:  # unpinned: what others took of the whole machine, per core on average
            others = sum(busy.values()) - proxy_ticks - backend_ticks - ours
            foreign["machine"] = max(0.0, others) / span / len(busy)
        cpu_us = proxy_ticks / TICKS_PER_SECOND / max(result.requests, 1) * 1e6
        return Measurement(proxy.label, name, rnd, result, cpu_us, foreign,
                           workers=proxy.workers,
                           proxy_busy=proxy_ticks / span, load_busy=(backend_ticks + ours) / span,
                           system_share=system / max(proxy_ticks, 1))

    def run(self) -> Results:
        a = self.args
        wanted = [p.strip() for p in a.proxies.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in PROXIES + VARIANTS]
        if unknown:
            raise SystemExit(f"bench/run.py: unknown proxy {unknown[0]!r} "
                             f"(known: {', '.join(PROXIES + VARIANTS)})")
        kinds = []
        names = {name for name, _, _ in SCENARIOS}
        self.scenarios = [sc for sc in SCENARIOS if sc[0] in a.loads.split(",")]
        if not self.scenarios or not set(a.loads.split(",")) <= names:
            raise SystemExit(f"bench/run.py: --loads takes names from: {', '.join(names)}")
        for kind in wanted:
            why = proxy_missing(kind, a.alt_src)
            if why:
                print(f"skipping {kind}: {why}")
            else:
                kinds.append(kind)
        backend_kind = a.backend
        if backend_kind == "auto":
            backend_kind = "nginx" if shutil.which("nginx") else "builtin"
        self._header(backend_kind, kinds)

        backend = start_backend(self.procs, backend_kind, self.load_cpu)
        proxies = [start_proxy(self.procs, kind, backend, self.proxy_cpu, alt_src=a.alt_src,
                               workers=n)
                   for n in a.workers for kind in kinds if n == 1 or kind != "floor"]
        for proxy in proxies:  # warm up: connection pools filled, caches hot
            run_load(self.tool, f"http://127.0.0.1:{proxy.port}/", 64, 1.0, self.load_cpu)

        for rnd in range(1, a.rounds + 1):
            for scenario in self.scenarios:
                for proxy in proxies:
                    m = self.measure(proxy, backend, scenario, rnd)
                    self.results.measurements.append(m)
                    _progress(a.rounds, m)
        for proxy in proxies:
            self.results.peak_rss_kib[proxy.label] = peak_rss_kib(proxy.proc.pid)
            self.procs.stop(proxy.proc)

        if a.idle > 0:
            for kind in kinds:
                fresh = start_proxy(self.procs, kind, backend, self.proxy_cpu, tag="-idle",
                                    alt_src=a.alt_src)
                per = bytes_per_idle_connection(fresh.proc.pid, fresh.port, a.idle)
                self.results.idle_bytes[kind] = per
                print(f"idle keep-alive: {kind:<14} {per:,.0f} bytes per connection "
                      f"({a.idle} connections)", flush=True)
                self.procs.stop(fresh.proc)
        return self.results

    def _header(self, backend_kind: str, kinds: list[str]) -> None:
        a = self.args
        print(f"balancer benchmark — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        print(f"machine: {_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
              f"{platform.release()}, load average {_loadavg()}")
        print(f"versions: {'; '.join(_versions(kinds + [backend_kind, self.tool]))}")
        pin = (f"proxy on CPU {self.proxy_cpu}, backend + load on CPU {self.load_cpu}"
               if self.pinned else "not pinned (several workers, or no 2 CPUs and taskset)")
        print(f"backend: {backend_kind}; load: {self.tool}; {pin}")
        print(f"workdir: {self.procs.workdir}")
        print(f"rounds: {a.rounds} × {len(self.scenarios)} loads × {len(kinds)} proxies × "
              f"workers {','.join(map(str, a.workers))}, {a.duration:g} s each; proxies: "
              f"{', '.join(kinds) or 'none'}")
        if self.tool == "python":
            print("note: the bundled Python load generator is slower than wrk; it may be the "
                  "bottleneck, so ratios understate the faster proxies")
        print(flush=True)


def _progress(rounds: int, m: Measurement) -> None:
    load = m.load
    foreign = "/".join(f"{v:.0%}" for v in m.foreign.values()) or "n/a"
    print(f"round {m.round}/{rounds}  {m.scenario:<10} {m.proxy:<14} {load.rps:>10,.0f} rps  "
          f"p50 {load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms  "
          f"{m.cpu_us_per_request:6.1f} µs/req  busy {m.proxy_busy:.0%}/{m.load_busy:.0%}  "
          f"errors {load.errors + load.non2xx}  foreign {foreign}", flush=True)


def _children_and_self_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _versions(tools: list[str]) -> list[str]:
    import balancer

    out = [f"python {platform.python_version()}",
           f"balancer {balancer.__version__}{_git_commit()}"]
    cmds = {"nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"], "wrk": ["wrk", "-v"]}
    for tool in dict.fromkeys(tools):
        if tool in cmds:
            done = subprocess.run(cmds[tool], check=False, capture_output=True, text=True,
                                  timeout=10)
            text = (done.stdout + done.stderr).strip().splitlines()
            out.append(text[0] if text else tool)
    return out


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              check=False, capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return f" (commit {done.stdout.strip()})" if done.returncode == 0 else ""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def print_tables(results: Results) -> None:
    counts = sorted({m.workers for m in results.measurements}) or [1]
    for n in counts:
        ms = [m for m in results.measurements if m.workers == n]
        reference = "nginx" if n == 1 else f"nginx×{n}"
        title = "" if counts == [1] else f", {n} worker(s) each"
        summaries = summarise(ms, reference)
        print(f"\n## Per load{title} (median of rounds; ratios = median of same-round ratios "
              f"to {reference})\n")
        print(detail_table(summaries))
        print(f"\n## Summary{title}\n")
        print(headline_table(summaries, results))
    if len(counts) > 1:
        print("\n## Scaling (requests/s with N workers ÷ with 1, same round)\n")
        print(scaling_table(results.measurements))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print_tables(load_results(json.loads(args.report.read_text())))
        return 0
    runs = args.rounds * len(SCENARIOS) * max(3, args.proxies.count(",") + 1) * len(args.workers)
    budget = runs * (args.duration + 5) * (args.retries + 1) + 300
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(int(budget))  # bounded in time whatever happens
    with tempfile.TemporaryDirectory(prefix="balancer-bench-") as tmp:
        procs = Processes(Path(tmp), pin=True)
        bench = Bench(args, procs)
        if bench.pinned:
            assert bench.load_cpu is not None
            os.sched_setaffinity(0, {bench.load_cpu})  # keep this script off the proxy's core
        try:
            results = bench.run()
        except (StartError, LoadError) as exc:
            print(f"bench/run.py: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
            signal.alarm(0)
    print_tables(results)
    out = args.json or REPO / "bench" / "results" / time.strftime("run-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "measurements": [asdict(m) for m in results.measurements],
                               "peak_rss_kib": results.peak_rss_kib,
                               "idle_bytes": results.idle_bytes}, indent=1))
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
