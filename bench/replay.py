"""How long ``balancer check --replay`` takes on a big log.

    python bench/replay.py                      # 1,000,000 lines, each strategy below
    python bench/replay.py --lines 200000 --format combined

Writes a log of ``--lines`` access lines in a temp dir (balancer's JSON access log as a
``record:``-ing balancer writes it, with a few ordinary log lines mixed in, or nginx combined),
then replays it in this process with ``balancer.replay.run`` under a three-backend pool, once
per strategy, and prints the wall time and the rate. The log is generated, not timed.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer.config import parse_config  # noqa: E402
from balancer.replay import run  # noqa: E402

STRATEGIES = {
    "round_robin": "round_robin",
    "least_connections": "least_connections",
    "ewma": "ewma",
    "consistent_hash header:X-User": {"name": "consistent_hash", "key": "header:X-User"},
}


def write_log(path: Path, lines: int, fmt: str, seed: int = 1) -> None:
    """``lines`` requests, ~200 a second, from 5,000 clients and 50,000 users."""
    rng = random.Random(seed)
    start = 1_796_000_000
    with path.open("w") as out:
        for i in range(lines):
            t = start + i / 200
            client = f"10.{rng.randrange(20)}.{rng.randrange(250)}.{rng.randrange(1, 250)}"
            target = "/" if i % 3 == 0 else f"/item/{rng.randrange(100_000)}"
            if fmt == "combined":
                stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(t))
                out.write(f'{client} - - [{stamp}] "GET {target} HTTP/1.1" 200 512 "-" '
                          f'"bench/1.0"\n')
                continue
            if i % 1000 == 0:
                out.write("2026-12-04 10:00:00.000 INFO balancer.health: a line of the log\n")
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
            took = rng.uniform(0.002, 0.030)
            out.write(f'{{"time":"{stamp}.{int(t * 1000) % 1000:03d}Z","request_id":"r{i:x}",'
                      f'"client":"{client}","method":"GET","host":"shop.example.com",'
                      f'"path":"{target}","pool":"web","backend":"web{i % 3 + 1}",'
                      f'"status":200,"upstream_time":{took * 0.9:.6f},'
                      f'"total_time":{took:.6f},"bytes":512,'
                      f'"keys":{{"header:x-user":"{rng.randrange(50_000):016x}"}}}}\n')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--format", choices=("json", "combined"), default="json")
    ap.add_argument("--only", help="one strategy of: " + ", ".join(STRATEGIES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / f"access.{args.format}.log"
        t = time.perf_counter()
        write_log(log, args.lines, args.format)
        size = log.stat().st_size / 1e6
        print(f"{args.lines:,} {args.format} lines, {size:.0f} MB, written in "
              f"{time.perf_counter() - t:.1f} s (not timed below)")
        for name, strategy in STRATEGIES.items():
            if args.only and args.only != name:
                continue
            config = parse_config({"pools": {"web": {"strategy": strategy, "backends": [
                f"http://10.0.0.{i}:8000" for i in (1, 2, 3)]}}})
            out = io.StringIO()
            t = time.perf_counter()
            code = run(config, [str(log)], host="shop.example.com", out=out, err=out)
            took = time.perf_counter() - t
            shares = [line.strip() for line in out.getvalue().splitlines() if "%" in line]
            print(f"{name:32} {took:6.2f} s  {args.lines / took / 1000:5.0f}k lines/s  "
                  f"exit {code}  {' | '.join(shares)}")


if __name__ == "__main__":
    main()
