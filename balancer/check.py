"""``balancer check``: would this config load? The pre-deployment test for an operator or CI.

Exit 0 when it would load, 1 when it is refused or invalid (every problem on stderr, one line
each, config problems first, then the guard's refusals), 2 for a usage error or a file that
cannot be read. On stdout: the verdict, each pool's simulated shares and worst single failure;
with ``--against OLD``, each backend's share before → after, printed even when the new config
is refused, so a reviewer sees the change. An OLD that cannot be read is exit 2, one that is
invalid exit 1 (its problems prefixed ``--against:``): a review step that compares with nothing
must not pass.
"""

from __future__ import annotations

import sys
from typing import TextIO

from balancer.config import Config, ConfigError, UnreadableConfig
from balancer.guard import GuardReport, format_diff, format_shares, pct
from balancer.loading import Refused, check_file

#: Before each line about the ``--against`` file, so no reader takes it for the new config's.
AGAINST = "--against: "


def main_check(config_path: str, against: str | None) -> int:
    """Check ``config_path`` (optionally against the deployed ``against``); the exit code."""
    out, err = sys.stdout, sys.stderr
    old: GuardReport | None = None
    old_problems: list[str] = []
    if against:
        try:
            old = judge(against)
        except UnreadableConfig as exc:
            _lines(err, against, exc.problems, AGAINST)
            return 2
        except ConfigError as exc:
            old_problems = exc.problems
    try:
        report = judge(config_path)  # discovery: dns → the addresses it has now
    except ConfigError as exc:
        _lines(err, config_path, exc.problems)
        if isinstance(exc, UnreadableConfig):
            return 2
        _lines(err, against or "", old_problems, AGAINST)
        print(f"{config_path}: invalid ({_count(exc.problems)})", file=out)
        return 1

    _lines(err, config_path, report.errors)
    _lines(err, against or "", old_problems, AGAINST)
    _lines(err, config_path, report.warnings, "warning: ")
    verdict = "accepted" if report.ok else f"refused ({_count(report.errors)})"
    print(f"{config_path}: {verdict}", file=out)
    if old_problems:
        print(f"--against {against}: invalid ({_count(old_problems)}); nothing to compare with",
              file=out)
        print(format_shares(report), file=out)
    elif against:
        print(f"\nshares before ({against}) → after ({config_path}):", file=out)
        print(format_diff(old, report), file=out)
        worst = [f"  pool {p}: if {w[0]} fails, {w[1]} takes {pct(w[2])}"
                 for p, w in report.worst_failure.items() if w is not None]
        if worst:
            print("\nworst single failure:", *worst, sep="\n", file=out)
    else:
        print(format_shares(report), file=out)
    return 0 if report.ok and not old_problems else 1


def judge(path: str) -> GuardReport:
    """The guard's report on ``path`` through the one loading pipeline (``check_file``, as
    ``run`` and every reload load it), refused or not; raises ConfigError when it is invalid
    (UnreadableConfig when the file cannot be read)."""
    try:
        return check_file(path).report
    except Refused as exc:
        return exc.report


def _config(path: str) -> Config:
    """``path`` loaded as ``judge`` loads it (discovery expanded), for ``--replay``."""
    try:
        return check_file(path).config
    except Refused as exc:
        return exc.config


def main_replay(config_path: str, logs: list[str], host: str | None,
                against: str | None) -> int:
    """``check`` as above, then ``--replay`` (balancer/replay.py): the worse exit code."""
    from balancer.replay import run

    code = main_check(config_path, against)
    try:
        new = _config(config_path)
        old = _config(against) if against else None
    except ConfigError:
        return max(code, 1)  # main_check said why
    return max(code, run(new, logs, host=host, old=old, new_name=config_path,
                         old_name=against or "", out=sys.stdout, err=sys.stderr))


def _lines(stream: TextIO, source: str, problems: list[str], prefix: str = "") -> None:
    for p in problems:
        print(f"{prefix}{p}" if p.startswith(source) else f"{prefix}{source}: {p}", file=stream)


def _count(problems: list[str]) -> str:
    return f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
