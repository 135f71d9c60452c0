"""``balancer check`` through the real command line: exit codes, stderr lines, the tables.

Every shipped example runs as an operator (or CI) would run it, from another directory, so a
plug-in strategy next to its config must be found through the config's own location.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.proc import run_cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "examples"


def check(*args: str, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancer", "check", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd, check=False,
                          stdin=subprocess.DEVNULL, env=env)


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def web(*ports: int, **pool: object) -> dict[str, object]:
    return {"pools": {"web": {"backends": [{"name": f"web{i + 1}", "url": f"http://127.0.0.1:{p}"}
                                           for i, p in enumerate(ports)], **pool}}}


#: Each example the guard refuses, with lines its stderr must hold (pool, backend, share).
REFUSED = {
    "single-backend.yaml": [
        "pools.web: only 1 distinct active backend: backend web1 would receive 100% of traffic",
        "pools.web: backend web1 would receive 100% of traffic (max_share 50%)"],
    "weights-9-1.yaml": ["pools.web: backend web1 would receive 90% of traffic (max_share 50%)"],
    "duplicate-server.yaml": [
        ("pools.web: backends web1 and web2 are the same server (http://localhost:9001, "
        "http://127.0.0.1:9001); together they would receive 100% of traffic")],
    "all-but-one-backup.yaml": [
        "pools.web: only 1 distinct active backend: backend web1 would receive 100% of traffic",
        "pools.web: backend web1 would receive 100% of traffic (max_share 50%)"],
    "plugin-first.yaml": ["pools.web: backend web1 would receive 100% of traffic (max_share 50%)"],
    "failure-concentration.yaml": [
        "pools.web: if web2 fails, web1 takes 6"],  # about 2/3: "66.1%" with round robin
}
ACCEPTED_WITH_WARNING = {"allowed-concentration.yaml"}


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(REFUSED) | ACCEPTED_WITH_WARNING


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_concentrated_example_is_refused(name: str, tmp_path: Path) -> None:
    path = EXAMPLES / name
    result = check("-c", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    for expected in REFUSED[name]:
        assert any(line.startswith(f"{path}: {expected}") for line in errors), (
            expected, result.stderr)
    assert result.stdout.startswith(f"{path}: refused ({len(errors)} problem")
    assert "pool web" in result.stdout  # the shares are still shown


def test_allowed_concentration_is_accepted_with_a_loud_warning(tmp_path: Path) -> None:
    path = EXAMPLES / "allowed-concentration.yaml"
    result = check("-c", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert warnings and all(w.startswith(f"warning: {path}: pools.staging: ALLOWED CONCENTRATION")
                            for w in warnings)
    assert all("'staging has one server (ticket OPS-123)'" in w for w in warnings)
    assert "stage1  100%" in result.stdout


def test_shipped_config_is_accepted_with_shares_and_worst_failure() -> None:
    path = ROOT / "config" / "balancer.yaml"
    result = check("-c", str(path))
    assert result.returncode == 0, result.stderr
    # The api pool hashes on a header: a warning only, that clients without it fall back.
    assert result.stderr.splitlines() == [
        (f"warning: {path}: pools.api: consistent_hash key header:X-User-ID: requests without it "
         "fall back to the client address, and clients behind one NAT or proxy share one "
         "backend; see how real traffic splits with balancer check --replay LOG")]
    out = result.stdout.splitlines()
    assert out[0] == f"{path}: accepted"
    assert "pool web" in out and "pool api" in out
    rows = dict(line.split() for line in out if line.startswith("  ") and line.endswith("%")
                and "fails" not in line)
    assert set(rows) == {"web1", "web2", "web3", "web-spare", "api1", "api2", "api3"}
    assert rows["web-spare"] == "0%"  # a backup takes nothing while the others are up
    assert all(32 <= int(rows[n].rstrip("%")) <= 35 for n in rows if n != "web-spare")
    failures = [line for line in out if line.startswith("  worst single failure: if ")]
    assert len(failures) == 2  # one per pool


def test_invalid_config_lists_every_problem_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", {
        "guard": {"max_sahre": 0.5},
        "pools": {"web": {"backends": [{"url": "http://127.0.0.1:9001", "weight": -3},
                                       {"url": "gopher://127.0.0.1:9002"}]}},
    })
    result = check("-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: guard.max_sahre: unknown key (did you mean 'max_share'?)",
        f"{path}: pools.web.backends[0].weight: must be >= 0, got -3",
        (f"{path}: pools.web.backends[1].url: scheme must be http or https, got "
        "'gopher://127.0.0.1:9002'"),
    ]
    assert result.stdout == f"{path}: invalid (3 problems)\n"


def test_config_problems_and_guard_refusals_are_not_mixed(tmp_path: Path) -> None:
    # A config that does not parse never reaches the guard: its problems come alone.
    path = write(tmp_path / "bad.yaml", web(9001, retries=-1))
    result = check("-c", str(path))
    assert result.returncode == 1
    assert result.stderr == f"{path}: pools.web.retries: must be >= 0, got -1\n"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("pools:\n  web:\n    backends: [\n      {url: http://127.0.0.1:9001\n")
    result = check("-c", str(path))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: line ") and "invalid YAML" in line


def test_missing_file_exits_2(tmp_path: Path) -> None:
    # A file that cannot be read is no verdict on a config: exit 2, like a usage error.
    missing = tmp_path / "nope.yaml"
    result = check("-c", str(missing))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{missing}: cannot read: No such file or directory"]


def test_a_file_that_is_not_utf8_is_invalid_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"pools:\n  web: {backends: [http://caf\xe9:9001]}\n")
    result = check("-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: line 2, column 30: not UTF-8 text (byte 0xe9)"]


@pytest.mark.parametrize("args", [[], ["-c"], ["-c", "x.yaml", "--bogus"], ["--against", "x"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = check(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_against_shows_each_backend_before_and_after_even_when_refused(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", web(9001, 9002, 9003))
    new = write(tmp_path / "new.yaml", web(9001))
    result = check("-c", str(new), "--against", str(old))
    assert result.returncode == 1
    assert f"{new}: pools.web: backend web1 would receive 100% of traffic (max_share 50%)" in (
        result.stderr.splitlines())
    out = result.stdout.splitlines()
    assert out[0] == f"{new}: refused (2 problems)"
    assert f"shares before ({old}) → after ({new}):" in out
    assert "  web1   33% → 100%  *" in out
    assert "  web2   33% → removed  *" in out
    assert "  web3   33% → removed  *" in out
    assert out[out.index("  web3   33% → removed  *") + 1] == "* share changed"


def test_against_an_accepted_change(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", web(9001, 9002))
    new = write(tmp_path / "new.yaml", web(9001, 9002, 9003, 9004))
    result = check("-c", str(new), "--against", str(old))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "  web1   50% → 25%  *" in out
    assert "  web4   new → 25%  *" in out
    assert "worst single failure:" in out
    assert any(line.startswith("  pool web: if web") for line in out)


def test_against_an_old_config_that_is_invalid_exits_1(tmp_path: Path) -> None:
    # A review step that compares with nothing must not pass (issue 9).
    old = write(tmp_path / "old.yaml", {"pools": {"web": {"backend": []}}})
    new = write(tmp_path / "new.yaml", web(9001, 9002))
    result = run_cli("check", "-c", str(new), "--against", str(old))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"--against: {old}: pools.web.backend: unknown key (did you mean 'backends'?)",
        f"--against: {old}: pools.web.backends: is required: a list of backends"]
    out = result.stdout.splitlines()
    assert out[:2] == [f"{new}: accepted",
                       f"--against {old}: invalid (2 problems); nothing to compare with"]
    assert "  web1   50%" in out  # the new config's shares, alone
    assert "→" not in result.stdout


def test_against_an_old_file_that_is_not_yaml_exits_1(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("pools: [\n")
    new = write(tmp_path / "new.yaml", web(9001, 9002))
    result = run_cli("check", "-c", str(new), "--against", str(old))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"--against: {old}: line ") and "invalid YAML" in line


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_against_a_file_that_cannot_be_read_exits_2(tmp_path: Path, kind: str) -> None:
    old = tmp_path / "old.yaml"
    why = "No such file or directory"
    if kind == "directory":
        old.mkdir()
        why = "Is a directory"
    new = write(tmp_path / "new.yaml", web(9001, 9002))
    result = run_cli("check", "-c", str(new), "--against", str(old))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"--against: {old}: cannot read: {why}"]
    assert result.stdout == ""


def test_against_invalid_with_a_refused_new_config_says_both(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", web(9001, retries=-1))
    new = write(tmp_path / "new.yaml", web(9001))
    result = run_cli("check", "-c", str(new), "--against", str(old))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert f"--against: {old}: pools.web.retries: must be >= 0, got -1" in lines
    assert any(line.startswith(f"{new}: pools.web: backend web1 would receive 100%")
               for line in lines)


def test_wildcard_and_loopback_backends_are_refused(tmp_path: Path) -> None:
    # The example: one socket on Linux, once accepted at 50/50.
    path = write(tmp_path / "twin.yaml", {"pools": {"web": {"backends": [
        {"name": "web1", "url": "http://0.0.0.0:9001"},
        {"name": "web2", "url": "http://127.0.0.1:9001"}]}}})
    result = check("-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        (f"{path}: pools.web.backends[0].url: 0.0.0.0 is not an address to connect to (on Linux "
         "it reaches this machine's loopback): write 127.0.0.1 for this machine, or the "
         "backend's own address")]
    assert result.stdout == f"{path}: invalid (1 problem)\n"


def test_plugin_next_to_the_config_is_found_from_any_directory(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "even_plugin.py").write_text(
        "from balancer.strategies.round_robin import RoundRobin\n\n\n"
        "class Even(RoundRobin):\n    name = 'even'\n")
    path = write(conf / "c.yaml", web(9001, 9002, strategy="even_plugin:Even"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = check("-c", str(path), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "  web1   50%" in result.stdout


def test_same_config_same_numbers_in_every_process(tmp_path: Path) -> None:
    """Seeded simulation, stable hashes: string hashing differs per process, the verdict not."""
    path = ROOT / "config" / "balancer.yaml"
    outputs = set()
    for seed in ("1", "2"):
        result = check("-c", str(path), env={**os.environ, "PYTHONHASHSEED": seed})
        assert result.returncode == 0
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_help_lists_the_exit_codes_and_the_diff_mark() -> None:
    result = run_cli("check", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for said in ("exit codes:", "0 the config would load", "1 refused by the guard or invalid",
                 "2 a usage error, or a file (FILE or OLD) that cannot be read",
                 '"*" marks a backend whose share changed'):
        assert said in text, result.stdout
