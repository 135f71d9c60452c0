"""config/alerts.yml: valid for Prometheus, behaves as its unit tests say, and uses only metric
names the balancer really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from balancer.metrics import build_registry, render
from tests.test_metrics import make_app
from tests.test_monitor import Clock

CONFIG = Path(__file__).resolve().parent.parent / "config"
RULES = CONFIG / "alerts.yml"
TESTS = CONFIG / "alerts_test.yml"

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed "
                                    "(.ci/run installs Debian's prometheus package)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          cwd=CONFIG, check=False)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    result = run("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_four_alerts_the_issue_asks_for_exist() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = {r["alert"] for g in groups for r in g["rules"]}
    assert {"BalancerTrafficConcentrated", "BalancerBackendDown", "BalancerPoolPanic",
            "BalancerHighUpstreamErrorRate"} <= names
    tested = yaml.safe_load(TESTS.read_text())["tests"]
    covered = {t["alertname"] for case in tested for t in case["alert_rule_test"]}
    assert names <= covered, f"alerts without a promtool test: {names - covered}"


def test_rules_use_only_exported_metric_names() -> None:
    exported = set()
    text = render(build_registry(make_app(Clock()))).decode()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported.add(name)
            if kind == "counter":
                exported.add(f"{name}_total")
    used = set(re.findall(r"\b(balancer_[a-z_]+)\b", RULES.read_text()))
    assert used and used <= exported, f"not exported: {used - exported}"
