"""The demo stack's wiring, for real: deploy/local-stack.py as a subprocess.

It brings up the compose topology as local processes (a loopback DNS server standing in for
Docker's, three demo web replicas on their own loopback addresses, balancer discovering them,
Debian's Prometheus with config/alerts.yml), scales the web service to four replicas and back
under load, drives traffic that touches every counter, checks that Prometheus scrapes balancer,
that the alert rules load and evaluate, that every dashboard query returns data, that
demo-break's concentrated config is refused, and tears everything down.
One extra dashboard with a misspelt metric rides along, so the query check is seen to fail too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "balancer.json"

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][0] != "Z"


def test_local_stack_is_wired_and_tears_down(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus (Debian's package; .ci/run installs it) is not installed")
    dashboards = tmp_path / "dashboards"
    dashboards.mkdir()
    shutil.copy(DASHBOARD, dashboards / DASHBOARD.name)
    bad = json.loads(DASHBOARD.read_text())
    bad["panels"] = [bad["panels"][0]]
    bad["panels"][0]["targets"] = [{"expr": "sum(balancer_request_total)", "refId": "A"}]
    (dashboards / "misspelt.json").write_text(json.dumps(bad))

    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local-stack.py"), "--timeout", "150",
         "--dashboards", str(dashboards)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
        check=False)
    out = result.stdout + result.stderr
    summary = json.loads(out.split("\nSTACK ", 1)[1].splitlines()[0])

    # About 20-25 s on 2 cores, most of it waiting on health checks and Prometheus' scrapes.
    # Exactly the planted mistake fails; every real check passes.
    assert summary["failed"] == [f"misspelt.json: {bad['panels'][0]['title']} [A]"], out
    assert result.returncode == 1
    assert "not exported by balancer: ['balancer_request_total']" in out
    queries = sum(len(p["targets"]) for p in json.loads(DASHBOARD.read_text())["panels"])
    assert out.count(f"ok   {DASHBOARD.name}: ") == queries, out
    for line in ("scale up: web@127.0.0.5:", "none failed",
                 "Prometheus scrapes balancer", "alert rules loaded from alerts.yml, all healthy",
                 "demo-break: concentrated config refused (409)",
                 "demo-break put the config file back",
                 "balancer drained and exited 0 on SIGTERM"):
        assert re.search(rf"^  ok   .*{re.escape(line)}", out, re.MULTILINE), out

    # Torn down: no process left (4 replicas at the most, balancer, Prometheus), no temporary
    # directory.
    assert len(summary["pids"]) == 6
    assert not [pid for pid in summary["pids"] if alive(pid)]
    assert not Path(summary["tmp"]).exists()
