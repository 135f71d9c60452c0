#!/usr/bin/env python3
"""Run every hardening family and write what happened to docs/reliability.md.

    python scripts/reliability.py                 # the full run (what docs/reliability.md shows)
    python scripts/reliability.py --quick         # CI sizes, to try the script (a few minutes)
    python scripts/reliability.py --out FILE      # somewhere else

Two pytest runs, each in its own process with a JUnit report:

- the client side (bad input, smuggling, limits, slow clients, TLS, doors, fuzzing), through
  ``tests.support.hardening.run_input_suite``, which counts every case its tests record;
- the backend side (tests/test_faults.py, tests/test_resources.py) with ``BALANCER_LONG=1``
  (1 GiB each way, 10,000 idle connections, the long kill/restart soak), whose tests write their
  figures (requests sent, succeeded, failed, retried; peak RSS; fds) to ``$BALANCER_FIGURES``.

The document is written whatever the outcome: a family whose tests failed says so, with the
failing test ids. The exit status is 1 when any test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.hardening import FILES, _junit, run_input_suite  # noqa: E402

BACKEND_FILES = ("tests/test_faults.py", "tests/test_resources.py")
#: Fuzz examples in the full run (the CI runs test_fuzz.FUZZ_EXAMPLES).
FULL_FUZZ = 3000

#: What each injected backend fault is, for the reader of the document.
FAULT_MEANING = {
    "reset": "reads the request, then resets the connection (RST), no answer",
    "close": "reads the request, then closes the connection (FIN), no answer",
    "garbage": "answers bytes that are not HTTP",
    "badframe": "answers with both Content-Length and Transfer-Encoding",
    "hang": "accepts, reads the request, never answers (timeouts.read 1 s)",
    "slow": "answers after 200 ms",
    "long": "body longer than its Content-Length (the extra bytes follow at once)",
    "double": "a second, unasked-for response right after the first",
    "short": "half the body, then closes (body shorter than announced)",
    "midway": "half the body, then resets (killed mid-answer)",
    "stall": "half the body, then nothing (stalled mid-answer, timeouts.read 1 s)",
    "SIGKILL mid-answer": "a backend process SIGKILLed while streaming a 2 MiB answer",
    "SIGKILL before answering": "a backend process SIGKILLed holding a GET and a POST",
    "every primary failing, a backup up": "one primary refuses connections, one resets them",
    "every backend hangs": "all three accept and never answer (timeouts.read 500 ms)",
}


# --------------------------------------------------------------------------- running


def run_backend_suite(long: bool, timeout: float = 3600.0) -> dict[str, Any]:
    """The backend-side tests in a pytest subprocess: totals, failures, and their figures."""
    files = [f for f in BACKEND_FILES if (ROOT / f).exists()]
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        figures_path = Path(tmp) / "figures.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = dict(os.environ, BALANCER_FIGURES=str(figures_path))
        if long:
            env["BALANCER_LONG"] = "1"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *files]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        figures = ([json.loads(line) for line in figures_path.read_text().splitlines()]
                   if figures_path.exists() else [])
        tests, failures = _junit(junit)
    return {
        "command": ("BALANCER_LONG=1 " if long else "") + "python -m pytest " + " ".join(files),
        "returncode": proc.returncode,
        "duration_s": round(time.monotonic() - started, 1),
        "tests": tests,
        "failures": failures,
        "figures": figures,
        "output_tail": proc.stdout[-3000:] if proc.returncode else "",
    }


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    distro = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    versions = []
    for mod in ("uvloop", "httptools", "aiohttp"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except (ImportError, AttributeError):
            pass
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--", "balancer") else ""
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores" + (f", {mem}" if mem else ""),
        "os": f"{distro}, Linux {platform.release()}",
        "python": f"Python {platform.python_version()}, " + ", ".join(versions),
        "commit": f"{commit}{dirty}",
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --------------------------------------------------------------------------- the document


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def outcome(ok: int, tried: int, failed_tests: list[str]) -> str:
    if failed_tests:
        return f"**FAILED**: {', '.join(f'`{t}`' for t in failed_tests)}"
    if ok == tried:
        return f"all {tried:,} as expected"
    return f"**{tried - ok:,} of {tried:,} not as expected**"


def failed_in(failures: list[str], *needles: str) -> list[str]:
    """The failing test ids (``module::name``) whose names contain one of ``needles``."""
    return [f.split("::", 1)[1] for f in failures if any(n in f for n in needles)]


def render(client: dict[str, Any], backend: dict[str, Any], info: dict[str, str],
           command: str, started: datetime, seconds: float) -> str:
    figures: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for fig in backend["figures"]:
        figures[fig["family"]].append(fig)
    failing = {f.split("::", 1)[1] for f in backend["failures"]}

    def passed(fig: dict[str, Any]) -> bool:
        return fig.get("test", "").split("::", 1)[-1] not in failing

    faults = figures["backend faults"]
    soak = figures["kill/restart soak"]
    memory = figures["memory"]
    fds = figures["fds"]
    out: list[str] = []
    w = out.append
    w("# Reliability figures")
    w("")
    w("What the hardening suites tried against `balancer run`, how many times, and what "
      "happened. Written by `scripts/reliability.py`; do not edit by hand, re-run it:")
    w("")
    w("```")
    w(command)
    w("```")
    w("")
    w(f"- **Date**: {started:%Y-%m-%d %H:%M} UTC ({seconds / 60:.1f} minutes)")
    w(f"- **Machine**: {info['cpu']}; {info['os']}")
    w(f"- **Software**: {info['python']}; balancer at `{info['commit']}`")
    w(f"- **Test runs**: client side {_totals(client)}; backend side {_totals(backend)}")
    w("")
    w("Everything ran on loopback: the proxy as its own process (`balancer run`, or the request "
      "path alone where the client-side tests say so), real backends, real clients.")
    w("")

    # --- summary
    w("## Summary")
    w("")
    w("| family | tried | outcome |")
    w("|---|---:|---|")
    for name, fam in client["families"].items():
        tried = fam.get("examples", fam["cases"])
        unit = "generated requests" if "examples" in fam else "cases"
        w(f"| {name} | {tried:,} {unit} | {outcome(fam['ok'], fam['cases'], [])} |")
    if client["failures"]:
        w(f"| client-side tests | {sum(client['tests'].values())} tests | "
          f"{outcome(0, 0, [f.split('::', 1)[1] for f in client['failures']])} |")
    fault_requests = sum(f["sent"] for f in faults)
    fault_bad = [f for f in faults if f["truncated"] or f["sent_twice"] or not passed(f)]
    fault_tests = failed_in(backend["failures"], "fault", "killed", "backup")
    w(f"| backend faults, {len(faults)} kinds and framings | {fault_requests:,} requests | "
      f"{outcome(len(faults) - len(fault_bad), len(faults), fault_tests)}"
      f"{': every invariant held' if not fault_bad and not fault_tests else ''} |")
    for s in soak:
        w(f"| kill/restart soak | {s['requests']:,} requests, b1 killed "
          f"{s['actions'].get('kill b1', 0)} times | {s['failed'].get('GET', 0)} GET failed, "
          f"{s['posts_sent_twice']} POST sent twice, {s['truncated']} truncated"
          f"{' — **FAILED**' if not passed(s) else ''} |")
    memory_tests = failed_in(backend["failures"], "memory", "idle")
    w(f"| memory | {len(memory)} measurements | "
      f"{outcome(sum(passed(m) for m in memory), len(memory), memory_tests)} |")
    w(f"| file descriptors | {len(fds)} checks | "
      f"{outcome(sum(passed(f) for f in fds), len(fds), [])} |")
    w("")

    # --- client side
    w("## Client side: bad input, smuggling, limits, slow clients, TLS, doors, fuzzing")
    w("")
    w(f"`{client['command']}` — {client['duration_s']} s, {_totals(client)}. Each case is a "
      "request (or connection) the tests sent and the answer they required: a precise 4xx, "
      "501/505 where HTTP says so, or a plain close; never another 5xx, a hang or a traceback; "
      "nothing ambiguous forwarded.")
    w("")
    w("| family | cases | as expected | answers seen |")
    w("|---|---:|---:|---|")
    for name, fam in client["families"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in fam["statuses"].items())
        w(f"| {name} | {fam['cases']:,} | {fam['ok']:,} | {statuses} |")
    if client["failures"]:
        w("")
        w("Failing tests: " + ", ".join(f"`{f}`" for f in client["failures"]))
    w("")

    # --- backend faults
    w("## Backend faults, by kind")
    w("")
    w(f"`{backend['command']}` — {backend['duration_s']} s, {_totals(backend)}.")
    w("")
    w("Three backends behind `balancer run`; one of them fails each request it gets in the way "
      "named, while 8 clients send GETs and POSTs (every fourth a POST), each with its own "
      "request id. The backends count the ids they read (the truth about what was sent twice); "
      "the client checks every body byte for byte. *Hit* is how many requests the faulty "
      "backend got; *retried* is the proxy's `balancer_upstream_retries_total`.")
    w("")
    w("| fault | what the backend does | framing | requests | hit | succeeded | failed | "
      "retried | truncated | POST sent twice | required |")
    w("|---|---|---|---:|---:|---:|---|---:|---:|---:|---|")
    for f in faults:
        failed = ", ".join(f"{m} {n}" for m, n in f["failed"].items() if n) or "0"
        mark = "" if passed(f) else " **FAILED**"
        w(f"| {f['kind']}{mark} | {FAULT_MEANING.get(f['kind'], '')} | {f['framing']} | "
          f"{f['sent']} | {f['hit_faulty']} | {f['ok']} | {failed} | {f['retried']} | "
          f"{f['truncated']} | {f['sent_twice']} | {f['expected']} |")
    w("")
    w("*Required*, per method: **retried** — the client never sees the failure (the attempt "
      "failed before any byte reached it, so the request went to another backend); **502/504** "
      "— a POST is never sent again, so the client gets the proxy's error; **aborted** — the "
      "answer had begun, so the client connection is cut and the client sees an incomplete "
      "response, never a complete-looking short one; **ok** — not a failure at all (a body "
      "longer than its length is framed by the parser, the rest dropped with the connection). "
      "One limit HTTP itself sets: an answer with neither a length nor chunks ends when its "
      "connection does, so one cut short by a clean close cannot be told from a whole one and "
      "is passed on as complete (a reset still aborts it).")
    w("")

    # --- soak
    w("## Kill/restart soak")
    w("")
    for s in soak:
        acts = ", ".join(f"{k} ×{v}" for k, v in s["actions"].items())
        errs = ", ".join(f"{k} {v}" for k, v in s["upstream_errors"].items())
        w(f"{s['requests']:,} requests from 8 clients (every eighth a POST) in {s['seconds']} s "
          f"through `balancer run` over three backend processes, while: {acts}. b1 served "
          f"requests in {s['b1_runs_serving']} of its {s['b1_runs']} lives.")
        w("")
        w("| | GET | POST |")
        w("|---|---:|---:|")
        w(f"| sent | {s['sent'].get('GET', 0):,} | {s['sent'].get('POST', 0):,} |")
        w(f"| succeeded | {s['ok'].get('GET', 0):,} | {s['ok'].get('POST', 0):,} |")
        w(f"| failed (client-visible) | {s['failed'].get('GET', 0):,} | "
          f"{s['failed'].get('POST', 0):,} |")
        w("")
        w(f"Retried by the proxy: {s['retried']:,}. Failed attempts it counted: {errs}. "
          f"Truncated answers: {s['truncated']}. POSTs that reached a backend twice: "
          f"{s['posts_sent_twice']}. Proxy fds before and after: {s['fds'][0]} → {s['fds'][1]}."
          + ("" if passed(s) else " **The test FAILED.**"))
        w("")
        w("A failed POST is one that had reached a backend that then died or reset: it is "
          "answered 502 and never sent again, because the proxy cannot know whether it was "
          "acted on. The target — no client-visible failure for idempotent requests — "
          + ("held." if not s["failed"].get("GET") else "**was missed.**"))
        w("")

    # --- memory
    w("## Memory")
    w("")
    w("Peak RSS (`VmHWM` from `/proc/PID/status`) of the `balancer run` process against its RSS "
      "just before, for a transfer where the far end stalls for a second; and RSS per idle "
      "keep-alive client connection (each had one request answered, then stays open).")
    w("")
    w("| case | RSS before | peak RSS / RSS with them | growth | per connection |")
    w("|---|---:|---:|---:|---:|")
    for m in memory:
        mark = "" if passed(m) else " **FAILED**"
        if "connections" in m:
            w(f"| {m['case']}{mark} | {mib(m['rss_before'])} | {mib(m['rss_with'])} | "
              f"{mib(m['rss_with'] - m['rss_before'])} | {m['bytes_per_connection']:,} bytes |")
        else:
            w(f"| {m['case']}{mark} | {mib(m['rss_before'])} | {mib(m['peak_rss'])} | "
              f"{mib(m['growth'])} | |")
    w("")

    # --- fds
    w("## File descriptors")
    w("")
    w("Open fds of the proxy (`/proc/PID/fd`): before; while holding the connections (or "
      "just after the load, idle upstream connections still open); and once everything is "
      "closed (idle upstream connections close after 4 s).")
    w("")
    w("| case | before | holding | after |")
    w("|---|---:|---:|---:|")
    for f in fds:
        w(f"| {f['case']}{'' if passed(f) else ' **FAILED**'} | {f['baseline']} | "
          f"{f['held']} | {f['after']} |")
    for s in soak:
        w(f"| the kill/restart soak | {s['fds'][0]} | | {s['fds'][1]} |")
    w("")
    if backend["failures"]:
        w("## Failing backend-side tests")
        w("")
        for f in backend["failures"]:
            w(f"- `{f}`")
        w("")
    return "\n".join(out)


def _totals(run: dict[str, Any]) -> str:
    t = run["tests"]
    parts = [f"{t.get('passed', 0)} passed"]
    for key in ("failed", "errors", "skipped"):
        if t.get(key):
            parts.append(f"{t[key]} {key}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI sizes (200 MB, 2,000 connections, short soak, CI fuzz count)")
    parser.add_argument("--fuzz-examples", type=int, default=None,
                        help=f"hypothesis examples for the fuzzer (full run: {FULL_FUZZ})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    fuzz = args.fuzz_examples if args.fuzz_examples is not None else (
        None if args.quick else FULL_FUZZ)
    command = "python scripts/reliability.py" + (" --quick" if args.quick else "") + (
        f" --fuzz-examples {args.fuzz_examples}" if args.fuzz_examples is not None else "")

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    files = tuple(f for f in FILES if (ROOT / f).exists())
    print(f"client side: {' '.join(files)} ...", file=sys.stderr, flush=True)
    client = run_input_suite(fuzz_examples=fuzz, files=files)
    print(f"  {_totals(client)} in {client['duration_s']} s", file=sys.stderr)
    print(f"backend side: {' '.join(BACKEND_FILES)} ...", file=sys.stderr, flush=True)
    backend = run_backend_suite(long=not args.quick)
    print(f"  {_totals(backend)} in {backend['duration_s']} s", file=sys.stderr)
    for run in (client, backend):
        if run["output_tail"]:
            print(run["output_tail"], file=sys.stderr)

    text = render(client, backend, machine(), command, started, time.monotonic() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if client["failures"] or backend["failures"] or client["returncode"] \
        or backend["returncode"] else 0


if __name__ == "__main__":
    sys.exit(main())
