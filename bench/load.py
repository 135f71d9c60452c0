"""Driving load: wrk when installed, the bundled ``pyload.py`` otherwise; one result type."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non2xx: int


class LoadError(RuntimeError):
    """The load generator failed or printed something we cannot read."""


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise LoadError(f"cannot read latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(text: str) -> LoadResult:
    """Read ``wrk --latency`` output: totals, the 50%/99% lines, socket errors, non-2xx."""
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.MULTILINE)
    p50 = re.search(r"^\s*50(?:\.000)?%\s+(\S+)", text, re.MULTILINE)
    p99 = re.search(r"^\s*99(?:\.000)?%\s+(\S+)", text, re.MULTILINE)
    if not (total and rps and p50 and p99):
        raise LoadError("cannot read wrk's output (was --latency given?):\n" + text.strip())
    errors = sum(int(n) for n in re.findall(
        r"(?:connect|read|write|timeout) (\d+)", _line(text, "Socket errors:")))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    return LoadResult(
        requests=int(total.group(1)),
        seconds=_ms(total.group(2) + total.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        errors=errors,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
    )


def _line(text: str, prefix: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith(prefix):
            return line
    return ""


def load_tool(choice: str) -> str:
    """``wrk`` or ``python`` for ``--load auto|wrk|python``."""
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise LoadError("--load wrk: wrk is not installed (apt-get install wrk)")
    return choice


def run_load(tool: str, url: str, connections: int, seconds: float,
             pin_cpu: int | None) -> LoadResult:
    """One closed-loop run of ``connections`` keep-alive clients for ``seconds``
    (whole seconds for wrk, which takes no fractions)."""
    if tool == "wrk":
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                "--timeout", "5s", url]
    else:
        argv = [sys.executable, str(HERE / "pyload.py"), url, "-c", str(connections),
                "-d", str(seconds)]
    if pin_cpu is not None:
        argv = ["taskset", "-c", str(pin_cpu), *argv]
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=seconds + 60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{tool} did not finish within {seconds + 60:.0f}s") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-500:]
        raise LoadError(f"{tool} exited with {done.returncode} for {url}: {said}")
    if tool == "wrk":
        return parse_wrk(done.stdout)
    try:
        return LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError) as exc:
        raise LoadError(f"cannot read pyload's output: {exc}: {done.stdout[-500:]}") from None
