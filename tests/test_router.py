"""Router: host (exact, wildcard) and path prefix on segment boundaries, first match wins."""

from __future__ import annotations

import pytest

from balancer.backend import Backend
from balancer.config import parse_config
from balancer.pool import Pool
from balancer.router import Router, host_without_port, normalize_path


def router(routes: list[dict[str, str]], pools: tuple[str, ...] = ("api", "web", "img")
           ) -> tuple[Router, dict[str, Pool]]:
    cfg = parse_config({
        "pools": {name: {"backends": [f"http://10.0.0.{i + 1}:80"]}
                  for i, name in enumerate(pools)},
        "routes": routes,
    })
    built = {n: Pool(pc, [Backend(b, n) for b in pc.backends]) for n, pc in cfg.pools.items()}
    return Router(cfg.routes, built), built


def name(pool: Pool | None) -> str | None:
    return None if pool is None else pool.name


def test_first_match_wins_and_no_match_is_none() -> None:
    r, _ = router([
        {"host": "api.example.com", "path_prefix": "/v1", "pool": "api"},
        {"host": "api.example.com", "pool": "web"},
        {"path_prefix": "/img", "pool": "img"},
    ])
    assert name(r.route(b"api.example.com", b"/v1/users")) == "api"
    assert name(r.route(b"api.example.com", b"/v2/users")) == "web"
    assert name(r.route(b"other.example.com", b"/img/logo.png")) == "img"
    assert r.route(b"other.example.com", b"/") is None


def test_path_prefix_matches_on_segment_boundaries() -> None:
    r, _ = router([{"path_prefix": "/api", "pool": "api"}, {"path_prefix": "/", "pool": "web"}])
    for path in (b"/api", b"/api/", b"/api/v1", b"/api?x=1", b"/api/v1?q=/apix"):
        assert name(r.route(b"h", path)) == "api", path
    for path in (b"/apis", b"/api-v2", b"/ap", b"/"):
        assert name(r.route(b"h", path)) == "web", path


def test_prefix_ending_in_slash_is_a_plain_prefix() -> None:
    r, _ = router([{"path_prefix": "/static/", "pool": "img"}, {"pool": "web"}])
    assert name(r.route(b"h", b"/static/a.css")) == "img"
    assert name(r.route(b"h", b"/static")) == "web"  # the slash is part of the prefix


def test_wildcard_host_matches_subdomains_only() -> None:
    r, _ = router([{"host": "*.example.com", "pool": "api"}, {"pool": "web"}])
    assert name(r.route(b"a.example.com", b"/")) == "api"
    assert name(r.route(b"a.b.example.com", b"/")) == "api"
    assert name(r.route(b"example.com", b"/")) == "web"
    assert name(r.route(b"badexample.com", b"/")) == "web"


def test_route_host_is_compared_lowercased_and_without_port() -> None:
    r, _ = router([{"host": "API.Example.com:8443", "pool": "api"}, {"pool": "web"}])
    assert name(r.route(b"api.example.com", b"/")) == "api"
    assert host_without_port(b"api.example.com:8080") == b"api.example.com"
    assert host_without_port(b"[::1]:8080") == b"[::1]"
    assert host_without_port(b"[::1]") == b"[::1]"


def test_encoded_or_dotted_paths_cannot_slip_past_a_route() -> None:
    r, _ = router([{"path_prefix": "/admin", "pool": "api"}, {"pool": "web"}])
    for path in (b"/%61dmin/x", b"/%61%64min", b"/public/../admin", b"//admin",
                 b"/./admin/", b"/admin/./x"):
        assert name(r.route(b"h", path)) == "api", path
    assert name(r.route(b"h", b"/admin%2Fx")) == "web"  # an encoded slash stays data


@pytest.mark.parametrize("raw, expected", [
    (b"/", b"/"), (b"/a/b/../c", b"/a/c"), (b"/a/./b/", b"/a/b/"), (b"/../../a", b"/a"),
    (b"//a///b", b"/a/b"), (b"/%7Euser/%41", b"/~user/A"), (b"/a%2fb", b"/a%2Fb"),
    (b"/a/..", b"/"), (b"/a/b/..", b"/a/"),
])
def test_normalize_path(raw: bytes, expected: bytes) -> None:
    assert normalize_path(raw) == expected


def test_single_catch_all_route_needs_no_walk() -> None:
    r, pools = router([{"pool": "web"}])
    assert r.route(b"anything", b"/at/all") is pools["web"]


def test_unknown_pool_is_one_clear_line() -> None:
    cfg = parse_config({"pools": {"web": {"backends": ["http://10.0.0.1:80"]}}})
    pools = {"web": Pool(cfg.pools["web"], [Backend(b, "web") for b in cfg.pools["web"].backends])}
    from balancer.config import RouteConfig
    with pytest.raises(ValueError, match=r"routes\[0\]\.pool: no pool named 'api'"):
        Router((RouteConfig(pool="api"),), pools)
