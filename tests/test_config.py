"""The config loader: YAML → frozen dataclasses, every mistake reported with its path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from balancer.config import (
    Address,
    Config,
    ConfigError,
    parse_address,
    parse_duration,
)
from balancer.loading import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def pool(*backends: object, **extra: object) -> dict[str, object]:
    return {"pools": {"web": {"backends": list(backends), **extra}}}


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5),
    (3, 3.0), (0.25, 0.25), ("10", 10.0), (" 2s ", 2.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["2 weeks", "s", "-1s", True, None, [1], "1d"])
def test_bad_durations_say_what_is_expected(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_negative_number_duration_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        parse_duration(-1)


def test_duration_in_a_config_names_its_path() -> None:
    found = problems(pool("http://127.0.0.1:9001", "http://127.0.0.1:9002",
                          health_check={"interval": "soon"}))
    assert found == [("pools.web.health_check.interval: must be a duration like 500ms, 2s or 1m,"
                     " got 'soon'")]


def test_durations_parse_into_the_model() -> None:
    c = parse_config(pool("http://127.0.0.1:9001", "http://127.0.0.1:9002",
                          health_check={"interval": "500ms", "timeout": "1s"},
                          timeouts={"connect": 2, "read": "1m"}, queue_timeout="250ms"))
    web = c.pools["web"]
    assert web.health_check is not None
    assert (web.health_check.interval, web.health_check.timeout) == (0.5, 1.0)
    assert (web.timeouts.connect, web.timeouts.read, web.queue_timeout) == (2.0, 60.0, 0.25)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(("text", "address"), [
    ("0.0.0.0:8080", Address("0.0.0.0", 8080)),
    ("127.0.0.1:0", Address("127.0.0.1", 0)),
    ("[::1]:9100", Address("::1", 9100)),
    (":8080", Address("0.0.0.0", 8080)),
    (8080, Address("0.0.0.0", 8080)),
    ("localhost:80", Address("localhost", 80)),
])
def test_addresses(text: object, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(("bad", "why"), [
    ("8080", "host:port"), ("::1:8080", "brackets"), ("host:http", "number"),
    ("host:70000", "0..65535"), ("", "host:port"), ("[::1]8080", "ipv6"),
])
def test_bad_addresses_say_why(bad: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address(bad)


@pytest.mark.parametrize(("listen", "admin"), [
    ("127.0.0.1:8080", "127.0.0.1:8080"),
    ("0.0.0.0:8080", "127.0.0.1:8080"),     # the wildcard covers the admin's address
    ("0.0.0.0:8080", 8080),                 # a bare admin port is 127.0.0.1:port
    ("127.0.0.1:8080", "0.0.0.0:8080"),
    ("[::]:8080", "127.0.0.1:8080"),        # :: is dual-stack: it covers IPv4 too
    ("[::1]:8080", "[0:0::1]:8080"),
    ("127.1:8080", "127.0.0.1:8080"),
    ("0.0.0.0:8080", "localhost:8080"),
    ("localhost:8080", "LOCALHOST:8080"),
])
def test_listen_and_admin_on_one_socket_are_refused_naming_both(listen: object,
                                                                admin: object) -> None:
    # It passed `check` and failed at `run` (issue 9): now the config check says so.
    found = problems({"listen": listen, "admin": admin, **pool("http://127.0.0.1:9001")})
    a, l_ = parse_address(admin, "127.0.0.1"), parse_address(listen)
    assert found == [f"admin: {a} is where listen ({l_}) accepts clients: one port cannot serve "
                     f"both; give admin a port of its own"]


@pytest.mark.parametrize(("listen", "admin"), [
    ("127.0.0.1:8080", "127.0.0.1:9100"),   # other ports
    ("127.0.0.1:0", "127.0.0.1:0"),         # 0: each gets a port of its own
    ("127.0.0.1:8080", "127.0.0.2:8080"),   # other addresses
    ("0.0.0.0:8080", "[::1]:8080"),         # the IPv4 wildcard does not cover IPv6
    ("localhost:8080", "127.0.0.2:8080"),
])
def test_listen_and_admin_that_can_both_bind_are_accepted(listen: object, admin: object) -> None:
    c = parse_config({"listen": listen, "admin": admin, **pool("http://127.0.0.1:9001")})
    assert c.admin == parse_address(admin, "127.0.0.1")


def test_ipv6_address_prints_with_brackets() -> None:
    assert str(Address("::1", 9100)) == "[::1]:9100"


def test_backend_urls_normalise() -> None:
    c = parse_config(pool({"url": "http://LOCALHOST"}, {"url": "https://[::1]:8443/"}))
    a, b = c.pools["web"].backends
    assert (a.scheme, a.host, a.port, a.name, a.url) == (
        "http", "localhost", 80, "localhost:80", "http://localhost:80")
    assert (b.scheme, b.host, b.port, b.name) == ("https", "::1", 8443, "[::1]:8443")


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://127.0.0.1:9001", "scheme must be http or https"),
    ("http://127.0.0.1:9001/app", "must not carry a path"),
    ("http://user:pw@127.0.0.1:9001", "credentials"),
    ("http://127.0.0.1:99999", "invalid port"),
    ("127.0.0.1:9001", "scheme"),
])
def test_bad_backend_urls_name_the_entry(url: str, why: str) -> None:
    found = problems(pool("http://127.0.0.1:9002", {"url": url}))
    assert len(found) == 1
    assert found[0].startswith("pools.web.backends[1].url: ")
    assert why in found[0]


@pytest.mark.parametrize(("url", "host", "loopback"), [
    ("http://0.0.0.0:9001", "0.0.0.0", "127.0.0.1"),
    ("http://[::]:9001", "::", "::1"),
    ("http://[0:0::0]:9001", "0:0::0", "::1"),
    ("http://0:9001", "0", "127.0.0.1"),
    ("http://0x0:9001", "0x0", "127.0.0.1"),
    ("http://00.0.0.0:9001", "00.0.0.0", "127.0.0.1"),
    ("http://[::ffff:0.0.0.0]:9001", "::ffff:0.0.0.0", "127.0.0.1"),
    ("https://0.0.0.0", "0.0.0.0", "127.0.0.1"),
])
def test_unspecified_backend_address_is_refused_naming_the_key(url: str, host: str,
                                                               loopback: str) -> None:
    # On Linux a connection to 0.0.0.0 reaches this machine: beside 127.0.0.1:9001 it would
    # be one server counted as two (issue 9).
    found = problems(pool("http://127.0.0.1:9001", {"url": url}))
    assert found == [(f"pools.web.backends[1].url: {host} is not an address to connect to (on "
                      f"Linux it reaches this machine's loopback): write {loopback} for this "
                      f"machine, or the backend's own address")]


@pytest.mark.parametrize("url", ["http://127.1:9001", "http://[::1]:9001", "http://10.0.0.1",
                                 "http://zero.example:9001", "http://0.0.0.1:9001"])
def test_other_numeric_hosts_are_backend_addresses(url: str) -> None:
    assert len(parse_config(pool("http://127.0.0.1:9002", url)).pools["web"].backends) == 2


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("data", "line"), [
    ({"listn": "0.0.0.0:8080", **pool("http://127.0.0.1:9001")},
     "listn: unknown key (did you mean 'listen'?)"),
    ({"guard": {"max_shares": 0.5}, **pool("http://127.0.0.1:9001")},
     "guard.max_shares: unknown key (did you mean 'max_share'?)"),
    (pool({"url": "http://127.0.0.1:9001", "wieght": 2}),
     "pools.web.backends[0].wieght: unknown key (did you mean 'weight'?)"),
    (pool("http://127.0.0.1:9001", health_check={"intervall": "2s"}),
     "pools.web.health_check.intervall: unknown key (did you mean 'interval'?)"),
    (pool("http://127.0.0.1:9001", alow_concentration="staging"),
     "pools.web.alow_concentration: unknown key (did you mean 'allow_concentration'?)"),
])
def test_unknown_keys_are_errors_with_a_suggestion(data: object, line: str) -> None:
    assert line in problems(data)


def test_unknown_key_far_from_any_gets_no_suggestion() -> None:
    found = problems({"zzzzzz": 1, **pool("http://127.0.0.1:9001")})
    assert found == ["zzzzzz: unknown key"]


# --------------------------------------------------------------------------- all at once


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    data = {
        "listen": "nowhere",
        "guard": {"max_share": 1.5, "min_backends": 0},
        "pools": {
            "web": {
                "strategy": "no_such_strategy",
                "backends": [
                    {"url": "http://127.0.0.1:9001", "weight": -3},
                    {"url": "http://127.0.0.1:9002", "backup": "yes"},
                    {"name": "x"},
                ],
                "retries": 99,
            },
        },
        "routes": [{"pool": "wbe"}],
    }
    found = problems(data)
    expected_starts = [
        "listen: ",
        "guard.max_share: must be between 0 and 1, got 1.5",
        "guard.min_backends: must be >= 1, got 0",
        "pools.web.strategy: unknown strategy 'no_such_strategy'",
        "pools.web.backends[0].weight: must be >= 0, got -3",
        "pools.web.backends[1].backup: must be true or false, got 'yes'",
        "pools.web.backends[2].url: is required",
        "pools.web.retries: must be <= 10, got 99",
        "routes[0].pool: no pool named 'wbe' (pools: web)",
    ]
    for start in expected_starts:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected_starts), found


def test_duplicate_backend_names_point_at_the_first() -> None:
    found = problems(pool({"url": "http://127.0.0.1:9001", "name": "a"},
                          {"url": "http://127.0.0.1:9002", "name": "a"}))
    assert found == [("pools.web.backends[1].name: 'a' is already the name of "
                     "pools.web.backends[0]")]


def test_routes_are_required_with_several_pools() -> None:
    data = {"pools": {"a": {"backends": ["http://127.0.0.1:1"]},
                      "b": {"backends": ["http://127.0.0.1:2"]}}}
    assert problems(data) == ["routes: is required when there is more than one pool (a, b)"]


def test_one_pool_needs_no_routes() -> None:
    c = parse_config(pool("http://127.0.0.1:9001"))
    assert [(r.pool, r.host, r.path_prefix) for r in c.routes] == [("web", None, "/")]


def test_keys_left_out_load_as_the_model_defaults() -> None:
    # The model is the one place a default is written; the loader and ProxySettings read it.
    from balancer.config import (
        BackendConfig,
        ClientConfig,
        GuardConfig,
        HealthCheckConfig,
        OutlierConfig,
        PoolConfig,
        TimeoutsConfig,
        defaults,
    )
    from balancer.proxy import ProxySettings

    c = parse_config(pool("http://127.0.0.1:9001", health_check={}, outlier_detection={},
                          timeouts={}, backend_tls={}))
    top = defaults(Config)
    assert (c.listen, c.admin, c.drain_timeout, c.admin_token, c.access_log) == (
        top["listen"], top["admin"], top["drain_timeout"], top["admin_token"], top["access_log"])
    assert (c.guard, c.client) == (GuardConfig(), ClientConfig())
    web = c.pools["web"]
    assert (web.health_check, web.outlier_detection, web.timeouts) == (
        HealthCheckConfig(), OutlierConfig(), TimeoutsConfig())
    for name, value in defaults(PoolConfig).items():
        if name not in ("health_check",):  # health_check: {} turns probes on
            assert getattr(web, name) == value, name
    backend = web.backends[0]
    for name, value in defaults(BackendConfig).items():
        assert getattr(backend, name) == value, name
    settings, client = ProxySettings(), ClientConfig()
    for f in dataclasses.fields(ClientConfig):
        if f.name != "max_clients":  # None means "half the open-files limit": the app decides
            assert getattr(settings, f.name) == getattr(client, f.name), f.name
    assert settings.access_log == bool(top["access_log"])  # on, as the config's default


def test_parsed_config_is_immutable() -> None:
    c = parse_config(pool("http://127.0.0.1:9001"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.guard.max_share = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.pools["other"] = c.pools["web"]  # type: ignore[index]


# --------------------------------------------------------------------------- files


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("pools:\n  web:\n    backends: [http://127.0.0.1:9001\n  api: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    [line] = info.value.problems
    assert line.startswith(f"{f}: line ")
    assert "invalid YAML" in line
    # The column and line point into the file, not at a Python traceback.
    assert "column" in line


def test_yaml_syntax_error_line_number_is_the_right_one(tmp_path: Path) -> None:
    f = tmp_path / "tab.yaml"
    f.write_text("listen: ':8080'\npools:\n  web:\n\tbackends: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.problems[0].startswith(f"{f}: line 4, column 1: invalid YAML")


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.problems == [f"{f}: cannot read: No such file or directory"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.problems == [f"{f}: the config must be a mapping at the top level"]


def test_shipped_config_loads() -> None:
    c = load_config(ROOT / "config" / "balancer.yaml")
    assert set(c.pools) == {"web", "api"}
    assert c.pools["web"].health_check is not None
    assert [b.name for b in c.pools["web"].backends if b.backup] == ["web-spare"]


def test_plugin_strategy_next_to_the_config_file_is_importable(tmp_path: Path) -> None:
    (tmp_path / "my_plugin_here.py").write_text(
        "from balancer.strategies.round_robin import RoundRobin\n"
        "class Mine(RoundRobin):\n    name = 'mine'\n")
    f = tmp_path / "c.yaml"
    f.write_text("pools:\n  web:\n    strategy: 'my_plugin_here:Mine'\n"
                 "    backends: ['http://127.0.0.1:9001', 'http://127.0.0.1:9002']\n")
    import sys

    before = list(sys.path)
    c = load_config(f)
    assert c.pools["web"].strategy.name == "my_plugin_here:Mine"
    assert sys.path == before  # the directory was on the path only while loading


def test_plugin_that_does_not_exist_names_the_module(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("pools:\n  web:\n    strategy: 'not_a_module_anywhere:Mine'\n"
                 "    backends: ['http://127.0.0.1:9001']\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.problems == [
        ("pools.web.strategy: cannot import strategy module 'not_a_module_anywhere': "
        "No module named 'not_a_module_anywhere'")]
