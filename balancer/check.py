"""``balancer check``: would this config load? The pre-deployment test for an operator or CI.

Exit 0 when it would load, 1 when it is refused or invalid (every problem on stderr, one line
each, config problems first, then the guard's refusals). On stdout: the verdict, each pool's
simulated shares and worst single failure; with ``--against OLD``, each backend's share
before → after, printed even when the new config is refused, so a reviewer sees the change.
"""

from __future__ import annotations

import sys
from typing import TextIO

from balancer.config import Config, ConfigError, load_config
from balancer.discovery import expand
from balancer.guard import GuardReport, evaluate, format_diff, format_shares, pct


def main_check(config_path: str, against: str | None) -> int:
    """Check ``config_path`` (optionally against the deployed ``against``); the exit code."""
    out, err = sys.stdout, sys.stderr
    try:
        config = expand(load_config(config_path))  # discovery: dns → the addresses it has now
    except ConfigError as exc:
        _lines(err, config_path, exc.problems)
        print(f"{config_path}: invalid ({_count(exc.problems)})", file=out)
        return 1
    report = evaluate(config)
    old = _old_report(against, err) if against else None

    _lines(err, config_path, report.errors)
    _lines(err, config_path, report.warnings, "warning: ")
    verdict = "accepted" if report.ok else f"refused ({_count(report.errors)})"
    print(f"{config_path}: {verdict}", file=out)
    if against:
        print(f"\nshares before ({against}) → after ({config_path}):", file=out)
        print(format_diff(old, report), file=out)
        worst = [f"  pool {p}: if {w[0]} fails, {w[1]} takes {pct(w[2])}"
                 for p, w in report.worst_failure.items() if w is not None]
        if worst:
            print("\nworst single failure:", *worst, sep="\n", file=out)
    else:
        print(format_shares(report), file=out)
    return 0 if report.ok else 1


def main_replay(config_path: str, logs: list[str], host: str | None,
                against: str | None) -> int:
    """``check`` as above, then ``--replay`` (balancer/replay.py): the worse exit code."""
    from balancer.replay import run

    code = main_check(config_path, against)
    try:
        new = expand(load_config(config_path))
        old = expand(load_config(against)) if against else None
    except ConfigError:
        return max(code, 1)  # main_check said why
    return max(code, run(new, logs, host=host, old=old, new_name=config_path,
                         old_name=against or "", out=sys.stdout, err=sys.stderr))


def _old_report(path: str, err: TextIO) -> GuardReport | None:
    """The deployed config's shares; if it no longer loads, say so and compare with nothing."""
    try:
        old: Config = expand(load_config(path))
    except ConfigError as exc:
        _lines(err, path, exc.problems, "warning: --against: ")
        return None
    return evaluate(old)


def _lines(stream: TextIO, source: str, problems: list[str], prefix: str = "") -> None:
    for p in problems:
        print(f"{prefix}{p}" if p.startswith(source) else f"{prefix}{source}: {p}", file=stream)


def _count(problems: list[str]) -> str:
    return f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
