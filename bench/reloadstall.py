"""The event loop's longest stall while a reload rebuilds a 16-backend consistent_hash pool.

    python bench/reloadstall.py [--src DIR ...] [--reloads N] [--connections C] [--rounds R]
                                [--pin [--check-elsewhere] [--sentinel]] [--trace]

For each checkout (``--src``, default this one) a child interpreter runs the real ``App`` of
that checkout's ``balancer`` package on uvloop, as ``balancer run`` does: one
``consistent_hash`` pool of 16 backends (``fastbackend.py``, another process), access log off.
``pyload.py`` (another process) keeps C keep-alive connections busy through it, while a probe
on the proxy's loop sleeps 1 ms at a time and records how late it wakes: the longest wait is
the longest stretch in which the loop ran no request's callbacks. The probe's figure is taken
over a quiet second of load first (the baseline), then over each reload — from the file
change to ``reload()``'s return, plus 100 ms — which moves one backend's weight between 1 and
2, so the table is rebuilt every time; with it, the longest garbage collection in that window
(a collection stops every thread). After each reload the probe watches a window as long
without one: the control, under the same load on the machine as it is at that moment.
Checkouts run one after the other on the same machine, ``--rounds`` times in turn (A B A B: a
burst of other work disturbs both alike), each row with the machine's 1-minute load average
before it (a quiet baseline above ~2 ms says the run was disturbed); every process stops by
itself (time budget) and is stopped at the end (the load by a SIGTERM once the reloads are
done; a load that ended before them fails the run).

``--trace`` says where each wake-up later than 5 ms fell (the reload's check, its apply, the
100 ms after, the control) and what the loop's thread did meanwhile: ran (its CPU time),
waited for this machine's CPU behind another task (its run-queue time: the check process,
say), or neither (a virtual CPU its host descheduled, which the guest cannot see).

``--sentinel`` (with ``--pin``) tells the machine's stalls from the proxy's own. A third process
on the proxy's CPU, at real-time priority (SCHED_FIFO: it preempts whatever that CPU runs, the
proxy and the check process included), sleeps 1 ms at a time as the probe does and notes when
it wakes late: then the CPU itself was away (a virtual CPU its host descheduled; on this VM an
idle machine's sleeper is 6-23 ms late about once a minute, and a busy loop loses 8-16 ms
several times in 20 s, with nothing else runnable). Each of the probe's waits, less the part
the sentinel was late too, is the proxy's own stall: its loop busy, or queued behind the check
process. A proxy made to busy-loop 10 ms every 200 ms shows 10.1 ms of its own in every one.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BACKENDS = 16
PROBE = 0.001  # seconds between probe wake-ups
clock = time.perf_counter  # the probe's and the phases' clock (uvloop's loop.time() is in ms)
LATE = 0.005  # --trace: wake-ups later than this are placed in a phase of the reload
NOTE = 0.0005  # --sentinel: waits later than this are kept, the probe's and the sentinel's


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def config_text(port: int, admin: int, backends: list[int], heavy: int) -> str:
    lines = [f'listen: "127.0.0.1:{port}"', f'admin: "127.0.0.1:{admin}"', "access_log: false",
             "pools:", "  web:", "    strategy: consistent_hash", "    backends:"]
    for i, p in enumerate(backends):
        weight = 2 if i == heavy else 1
        lines.append(f'      - {{name: b{i}, url: "http://127.0.0.1:{p}", weight: {weight}}}')
    return "\n".join(lines) + "\n"


class Collections:
    """The longest garbage collection (any thread: it stops them all) since the last ``reset``
    (seconds), to tell a collection's stall from the rest."""

    def __init__(self) -> None:
        self.worst = (0.0, 0)  # (seconds, generation)
        self._start = 0.0
        #: (perf_counter start, end) of every collection longer than 1 ms (for --trace).
        self.long: list[tuple[float, float]] = []
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            now = time.perf_counter()
            self.worst = max(self.worst, (now - self._start, info["generation"]))
            if now - self._start > 0.001:
                self.long.append((self._start, now))

    def reset(self) -> tuple[float, int]:
        worst, self.worst = self.worst, (0.0, 0)
        return worst


try:  # the kernel's time this thread was runnable but another task had its CPU
    _SCHEDSTAT: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
except OSError:  # not Linux, or no schedstats
    _SCHEDSTAT = None


def run_delay() -> float:
    """Seconds this thread has waited on a run queue (0 when the kernel does not say)."""
    if _SCHEDSTAT is None:
        return 0.0
    return int(os.pread(_SCHEDSTAT, 64, 0).split()[1]) / 1e9


class Probe:
    """Sleeps ``PROBE`` at a time on the loop; ``worst`` is the longest lateness seen since
    the last ``reset`` (seconds)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.running = True
        #: (woken at, lateness, the loop thread's CPU time meanwhile, its time runnable but
        #: waiting for this machine's CPU meanwhile) of every wake-up later than ``LATE``
        #: (for --trace), in seconds on ``clock``.
        self.late: list[tuple[float, float, float, float]] = []
        #: (due, woken) of every wake-up later than ``NOTE`` (for --sentinel), on ``clock``.
        self.waits: list[tuple[float, float]] = []

    def reset(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    async def run(self) -> None:
        cpu = time.thread_time  # this thread's CPU time: busy late, or off the CPU?
        while self.running:
            start, used, waited = clock(), cpu(), run_delay()
            await asyncio.sleep(PROBE)
            late = clock() - start - PROBE
            if late > self.worst:
                self.worst = late
            if late > NOTE:
                self.waits.append((start + PROBE, start + PROBE + late))
            if late > LATE:
                self.late.append((start + PROBE + late, late, cpu() - used,
                                  run_delay() - waited))


async def measure(reloads: int, connections: int, pin: bool = False,
                  check_elsewhere: bool = False, sentinel: bool = False) -> dict[str, Any]:
    from balancer.app import App  # the checkout on PYTHONPATH

    # --pin: the proxy (its loop and its reload thread) on the first CPU, the backends and the
    # load on the second, as run.py pins: what is left is the proxy's own stalls, not the
    # scheduler's (on 2 shared cores the control windows alone reach 20 ms unpinned).
    cpus = sorted(os.sched_getaffinity(0))
    other = None
    if pin and len(cpus) >= 2:
        other = {cpus[1]}
        os.sched_setaffinity(0, {cpus[0]})

    def elsewhere() -> None:
        if other is not None:
            os.sched_setaffinity(0, other)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    ports = free_ports(BACKENDS + 2)
    port, admin, backends = ports[0], ports[1], ports[2:]
    with tempfile.TemporaryDirectory(prefix="reloadstall-") as tmp:
        path = Path(tmp) / "balancer.yaml"
        path.write_text(config_text(port, admin, backends, heavy=-1), encoding="utf-8")
        backend = subprocess.Popen([sys.executable, str(HERE / "fastbackend.py"),
                                    *map(str, backends)], stdout=subprocess.PIPE,
                                   preexec_fn=elsewhere)
        load: asyncio.subprocess.Process | None = None
        watch: subprocess.Popen[str] | None = None
        budget = 30.0 + reloads * 20.0  # stopped (SIGTERM) when the reloads are done
        if sentinel:
            watch = subprocess.Popen([sys.executable, __file__, "--sentinel-child",
                                      str(cpus[0]), str(budget + 30)],
                                     stdout=subprocess.PIPE, text=True)
        app = None
        try:
            assert backend.stdout is not None and b"ready" in backend.stdout.readline()
            app = App(str(path))
            checker = getattr(app, "checker", None)  # a checkout with a check process
            if checker is not None and check_elsewhere and other is not None:
                started = checker._started

                async def moved() -> Any:  # --check-elsewhere: the check process off CPU 0
                    proc = await started()
                    os.sched_setaffinity(proc.pid, other)
                    return proc

                checker._started = moved
            if hasattr(checker, "warm"):  # as `balancer run` does, before it serves
                await checker.warm()
            await app.start()
            # What `balancer run` does once started (run.py freeze_heap), so collections
            # during a reload cost what they cost in production.
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 20, 20)
            probe, collections = Probe(), Collections()
            loop = asyncio.get_running_loop()
            probe_task = loop.create_task(probe.run())
            load = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "pyload.py"), f"http://127.0.0.1:{port}/",
                "-c", str(connections), "-d", str(budget), stdout=subprocess.PIPE,
                preexec_fn=elsewhere)
            await asyncio.sleep(1.0)  # connections open, pools warm
            probe.reset()
            await asyncio.sleep(1.0)
            baseline = probe.reset()
            stalls, took, pauses, quiet = [], [], [], []
            windows: list[tuple[float, float]] = []  # (start, end) of each reload's window
            controls: list[tuple[float, float]] = []  # and of each control window
            # --trace: (phase, start, end) on ``clock``, to place each late wake-up.
            phases: list[tuple[str, float, float]] = []
            checked = [0.0]
            if checker is not None:
                check = checker.check

                async def timed_check(path: str) -> Any:
                    try:
                        return await check(path)
                    finally:
                        checked[0] = clock()

                checker.check = timed_check
            for i in range(reloads):
                path.write_text(config_text(port, admin, backends, heavy=i % BACKENDS),
                                encoding="utf-8")
                probe.reset()
                collections.reset()
                t0 = time.perf_counter()
                begun = clock()
                result = await app.reload()
                ended = clock()
                mid = checked[0] if begun < checked[0] <= ended else begun
                phases += [("check", begun, mid), ("apply", mid, ended),
                           ("after", ended, ended + 0.1)]
                took.append(time.perf_counter() - t0)
                if not result.applied:
                    raise SystemExit(f"reload refused: {result.problems}")
                await asyncio.sleep(0.1)
                windows.append((begun, clock()))
                stalls.append(probe.reset())
                pauses.append(collections.reset())
                await asyncio.sleep(0.3)
                # The control: a window as long, without a reload, under the same load.
                probe.reset()
                begun = clock()
                await asyncio.sleep(took[-1] + 0.1)
                phases.append(("control", begun, clock()))
                controls.append(phases[-1][1:])
                quiet.append(probe.reset())
            probe.running = False
            await probe_task
            if load.returncode is not None:  # the load ended before the reloads did
                raise SystemExit(f"the load ended before reload {len(took)} of {reloads}")
            load.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(load.communicate(), 40)
            traffic = json.loads(out)
            machine: dict[str, Any] = {}
            if watch is not None:
                watch.send_signal(signal.SIGTERM)
                machine = json.loads(watch.communicate(timeout=10)[0])
        finally:
            if load is not None and load.returncode is None:
                load.kill()
            if watch is not None and watch.returncode is None:
                watch.kill()
            if app is not None:
                await app.drain(1.0)
            backend.send_signal(signal.SIGTERM)
            backend.wait(10)
    return {"baseline_ms": baseline * 1000, "stalls_ms": [s * 1000 for s in stalls],
            "quiet_ms": [q * 1000 for q in quiet],
            "reload_ms": [t * 1000 for t in took], "gc_ms": [(p * 1000, g) for p, g in pauses],
            "rps": traffic["rps"],
            "trace": trace(phases, probe.late, collections.long, Away(machine)),
            "errors": traffic["errors"] + traffic["non2xx"],
            **(own_stalls(probe.waits, machine, windows, stalls, controls, quiet)
               if machine else {})}


class Away:
    """The sentinel's late wake-ups: the spans in which the proxy's CPU itself was away."""

    def __init__(self, machine: dict[str, Any]) -> None:
        self.late = sorted((a, b) for a, b in machine.get("late", []))
        self._ends = [b for _, b in self.late]

    def during(self, due: float, woken: float) -> float:
        """Seconds of (due, woken) in which the sentinel was late too."""
        covered, i = 0.0, bisect.bisect_right(self._ends, due)
        while i < len(self.late) and self.late[i][0] < woken:
            covered += max(0.0, min(woken, self.late[i][1]) - max(due, self.late[i][0]))
            i += 1
        return covered


def own_stalls(waits: list[tuple[float, float]], machine: dict[str, Any],
               windows: list[tuple[float, float]], stalls: list[float],
               controls: list[tuple[float, float]], quiet: list[float]) -> dict[str, Any]:
    """--sentinel: each window's longest wait less the part the sentinel was late too (ms).

    A window whose waits were all under ``NOTE`` keeps its own worst (``stalls``/``quiet``)."""
    away = Away(machine)

    def worst(spans: list[tuple[float, float]], raw: list[float]) -> list[float]:
        out = []
        for (start, end), whole in zip(spans, raw):
            own = [woken - due - away.during(due, woken) for due, woken in waits
                   if start <= woken < end]
            out.append(1000 * (max(own) if own else whole))
        return out

    return {"own_ms": worst(windows, stalls), "own_quiet_ms": worst(controls, quiet),
            "machine_ms": sorted((b - a) * 1000 for a, b in away.late if b - a > LATE),
            "realtime": machine["realtime"]}


def watch_cpu(cpu: int, seconds: float) -> None:
    """--sentinel's process: on ``cpu`` at real-time priority, sleeps ``PROBE`` at a time and
    prints (due, woken) of every wake-up later than ``NOTE``, as JSON, when told to stop
    (SIGTERM) or after ``seconds``. No task of this machine can delay it, so it is late only
    when the CPU is."""
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        realtime = True
    except OSError:  # not root: then the guest's scheduler can delay it too
        realtime = False
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    late: list[tuple[float, float]] = []
    end = clock() + seconds
    while not stop and clock() < end:
        start = clock()
        time.sleep(PROBE)
        woken = clock()
        if woken - start - PROBE > NOTE:
            late.append((start + PROBE, woken))
    print(json.dumps({"realtime": realtime, "late": late}), flush=True)


def trace(phases: list[tuple[str, float, float]],
          late: list[tuple[float, float, float, float]],
          collections: list[tuple[float, float]], away: Away) -> dict[str, Any]:
    """Per phase: its seconds in all, and the wake-ups later than ``LATE`` in it (ms), each
    with the loop thread's CPU time in that wait (``cpu``: ~the wait when the loop was busy)
    and its time runnable while another task of this machine had the CPU (``queued``: the
    check process, say); a wait with neither was outside the machine (a virtual CPU
    descheduled by its host; ``away``: the part --sentinel was late too). ``*``: a
    collection over 1 ms overlapped it."""
    out: dict[str, Any] = {}
    for name, start, end in phases:
        entry = out.setdefault(name, {"seconds": 0.0, "late_ms": []})
        entry["seconds"] += end - start
        for t, x, used, queued in late:
            if start <= t < end:
                during = any(a < t and b > t - x for a, b in collections)
                gone = f", away {away.during(t - x, t) * 1000:.1f}" if away.late else ""
                entry["late_ms"].append(f"{x * 1000:.1f} (cpu {used * 1000:.1f}, queued "
                                        f"{queued * 1000:.1f}{gone}){'*' if during else ''}")
    return out


def child(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(measure(args.reloads, args.connections, args.pin,
                                args.check_elsewhere, args.sentinel))
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", help="a checkout whose balancer/ to measure "
                    "(repeatable; default: this one)")
    ap.add_argument("--reloads", type=int, default=8)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each checkout, in turn")
    ap.add_argument("--pin", action="store_true",
                    help="the proxy on one CPU, backends and load on another (as run.py)")
    ap.add_argument("--check-elsewhere", action="store_true",
                    help="with --pin: the check process (balancer/checker.py) on the other "
                    "CPU, not on the proxy's (where it starts, as a child of the proxy)")
    ap.add_argument("--trace", action="store_true",
                    help="place each wake-up later than LATE in a phase (check, apply, the "
                    "100 ms after, the control)")
    ap.add_argument("--sentinel", action="store_true",
                    help="with --pin: a real-time sleeper on the proxy's CPU, to tell the "
                    "machine's stalls (the CPU away) from the proxy's own")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sentinel-child", nargs=2, type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sentinel_child:
        watch_cpu(int(args.sentinel_child[0]), args.sentinel_child[1])
        return
    if args.sentinel and not args.pin:
        ap.error("--sentinel needs --pin (it watches the proxy's CPU)")
    if args.child:
        child(args)
        return
    print(f"{BACKENDS}-backend consistent_hash pool, {args.connections} connections of load, "
          f"{args.reloads} reloads (a weight change each)")
    print("| checkout | load | loop stall, quiet (ms) | loop stall per reload: median / worst "
          "(ms) | the same in as long a window without a reload | longest collection (ms, "
          "generation) | reload() wall time, median (ms) | requests/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for src in (args.src or [str(HERE.parent)]) * args.rounds:
        load = os.getloadavg()[0]
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
        proc = subprocess.run([sys.executable, __file__, "--child", "--reloads",
                               str(args.reloads), "--connections", str(args.connections),
                               *(["--pin"] if args.pin else []),
                               *(["--check-elsewhere"] if args.check_elsewhere else []),
                               *(["--sentinel"] if args.sentinel else [])],
                              env=env, capture_output=True, text=True,
                              timeout=120 + args.reloads * 25)
        if proc.returncode != 0:
            print(f"{src}: failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        pause, generation = max(r["gc_ms"])
        print(f"| {src} | {load:.1f} | {r['baseline_ms']:.1f} | "
              f"{statistics.median(r['stalls_ms']):.1f} / {max(r['stalls_ms']):.1f} | "
              f"{statistics.median(r['quiet_ms']):.1f} / {max(r['quiet_ms']):.1f} | "
              f"{pause:.1f} (gen {generation}) | {statistics.median(r['reload_ms']):.0f} | "
              f"{r['rps']:,.0f} | {r['errors']} |", flush=True)
        if "own_ms" in r:
            how = "" if r["realtime"] else ", NOT real-time"
            print(f"    less the machine's stalls (the sentinel{how}): the loop's own stall "
                  f"per reload, median / worst "
                  f"{statistics.median(r['own_ms']):.1f} / {max(r['own_ms']):.1f} ms; without "
                  f"a reload {statistics.median(r['own_quiet_ms']):.1f} / "
                  f"{max(r['own_quiet_ms']):.1f} ms; the machine's own stalls over "
                  f"{LATE * 1000:.0f} ms in the run: {[round(m, 1) for m in r['machine_ms']]}",
                  flush=True)
        if args.trace:
            print(f"    reload() wall times (ms): {[round(x) for x in r['reload_ms']]}", flush=True)
            if "own_ms" in r:
                print(f"    the loop's own stall per reload (ms): "
                      f"{[round(x, 1) for x in r['own_ms']]}", flush=True)
            for name, entry in r["trace"].items():
                late = sorted(entry["late_ms"], key=lambda x: -float(x.split()[0]))
                print(f"    {name}: {entry['seconds']:.1f} s, {len(late)} wake-up(s) later "
                      f"than {LATE * 1000:.0f} ms: {late[:12]}", flush=True)


if __name__ == "__main__":
    main()
