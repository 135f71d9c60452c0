"""TLS, both ways, with certificates made here (tests/support/certs.py) and real handshakes.

- The listener: ``tls: {cert, key}`` is checked when the config loads (one line naming the file);
  ``balancer run`` terminates TLS 1.2 and 1.3 with forward-secret AEAD suites, refuses TLS 1.0
  and 1.1 and weak suites in the handshake, bounds a handshake that never comes, tells backends
  ``X-Forwarded-Proto: https``, and loads a renewed certificate on SIGHUP.
- Backends: ``https://`` URLs are verified by default (a test CA via ``backend_tls.ca`` works,
  an untrusted certificate is a 502), ``server_name`` picks the name checked, ``verify: false``
  connects and says so in the log.
- The admin door: loopback by default, and ``POST /reload`` needs the bearer token when set.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import ssl
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from balancer.config import ConfigError
from balancer.loading import parse_config
from tests.support.certs import Pair, issue, make_ca, self_signed
from tests.support.hardening import ParsingBackend, parsing_backend, record
from tests.support.net import free_port, name_app
from tests.support.proc import BalancerProcess, pool_config, run_cli, write_config
from tests.support.proxy import RawClient, run_proxy


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("certs")
    ca = make_ca(folder)
    return {
        "folder": folder, "ca": ca, "server": issue(folder, ca),
        "rsa": issue(folder, ca, name="rsa", rsa=True),
        "renewed": issue(folder, ca, name="renewed"),
        "named": issue(folder, ca, name="named", names=("DNS:api.internal",)),
        "untrusted": self_signed(folder),
    }


def client_context(ca: Pair, version: ssl.TLSVersion | None = None,
                   ciphers: str | None = None) -> ssl.SSLContext:
    """A verifying client context for our CA, pinned to ``version`` if given. For versions
    and suites OpenSSL no longer offers by default, the client lowers its own security level
    so that it really offers them: the refusal must come from the proxy."""
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2 or ciphers is not None:
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    ctx.set_alpn_protocols(["http/1.1", "h2"])
    return ctx


# --------------------------------------------------------------------------- the config


def tls_config(**tls: Any) -> dict[str, Any]:
    return {"tls": tls, "pools": {"web": {"backends": ["http://10.0.0.1:80",
                                                      "http://10.0.0.2:80"]}}}


def problems(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    return info.value.problems


def test_a_bad_certificate_or_key_is_one_line_naming_the_file(
        certs: dict[str, Any]) -> None:
    folder: Path = certs["folder"]
    server, other = certs["server"], certs["untrusted"]
    encrypted = folder / "encrypted.key"
    import subprocess
    subprocess.run(["openssl", "pkey", "-in", str(server.key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True, capture_output=True)
    cases = {
        "missing key file": (dict(cert=str(server.cert), key=str(folder / "nope.key")),
                             f"tls: cannot read the private key {folder / 'nope.key'}"),
        "key of another certificate": (dict(cert=str(server.cert), key=str(other.key)),
                                       f"tls: the private key {other.key} does not belong to "
                                       f"the certificate {server.cert}"),
        "encrypted key": (dict(cert=str(server.cert), key=str(encrypted)),
                          f"tls: the private key {encrypted} is encrypted"),
        "key given as the certificate": (dict(cert=str(server.key), key=str(server.key)),
                                         f"tls: {server.key} holds no PEM certificate"),
        "no key": (dict(cert=str(server.cert)), "tls.key: is required"),
    }
    for name, (tls, wanted) in cases.items():
        got = problems(tls_config(**tls))
        ok = len(got) == 1 and got[0].startswith(wanted)
        record("TLS", f"config refused: {name}", status=None, expected=None, ok=ok)
        assert len(got) == 1 and got[0].startswith(wanted), (name, got)
    assert parse_config(tls_config(cert=str(server.cert), key=str(server.key))).tls is not None


def test_balancer_check_prints_the_tls_problem_and_exits_1(
        certs: dict[str, Any], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {
        **tls_config(cert=str(certs["server"].cert), key=str(certs["untrusted"].key))})
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "tls" in line]
    assert len(lines) == 1 and "does not belong to the certificate" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_backend_tls_options_are_checked(certs: dict[str, Any]) -> None:
    pool = {"backends": ["https://10.0.0.1", "https://10.0.0.2"]}
    assert problems({"pools": {"web": {**pool, "backend_tls": {"ca": str(certs["server"].key)}}}}
                    ) == [f"pools.web.backend_tls.ca: cannot load CA certificates from "
                          f"{certs['server'].key}: no certificate or crl found"]
    assert problems({"pools": {"web": {"backends": ["http://10.0.0.1", "http://10.0.0.2"],
                                       "backend_tls": {"verify": False}}}}
                    ) == ["pools.web.backend_tls: applies to https:// backends, and this pool "
                          "has none"]
    loaded = parse_config({"pools": {"web": {**pool, "backend_tls": {
        "ca": str(certs["ca"].cert), "server_name": "api.internal"}}}})
    assert {b.tls.server_name for b in loaded.pools["web"].backends} == {"api.internal"}


# --------------------------------------------------------------------------- the listener


@asynccontextmanager
async def tls_balancer(tmp_path: Path, pair: Pair,
                       **top: Any
                       ) -> AsyncIterator[tuple[BalancerProcess, int, list[ParsingBackend]]]:
    """``balancer run`` with TLS on a free port, in front of two parsing backends."""
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pair.cert, cert)
    shutil.copy(pair.key, key)
    async with parsing_backend() as a, parsing_backend() as b:
        port = free_port()
        config = write_config(tmp_path / "tls.yaml", {
            "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
            "tls": {"cert": str(cert), "key": str(key)},
            "pools": {"web": pool_config([a.port, b.port])}, **top})
        async with BalancerProcess(config) as proc:
            yield proc, port, [a, b]
        assert "Traceback" not in proc.log, proc.log


async def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """TLS to ``port`` as ``localhost``: (the protocol version, or None), (error reason)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10)
    except ssl.SSLError as exc:
        return None, exc.reason
    except ConnectionError as exc:
        return None, type(exc).__name__
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    return version, None


async def https_get(port: int, ctx: ssl.SSLContext, path: str = "/") -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost")
    c = RawClient(reader, writer)
    try:
        await c.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        r = await c.response()
        return r.status, writer.get_extra_info("ssl_object")
    finally:
        writer.transport.abort()


@asynccontextmanager
async def lenient_server(pair: Pair) -> AsyncIterator[int]:
    """A TLS server that accepts anything down to TLS 1.0 and any suite: the control showing
    that our client really offers what the proxy refuses."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.load_cert_chain(str(pair.cert), str(pair.key))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


#: (name, client pinned to, its only suites, the version the proxy agrees to or None)
HANDSHAKES: list[tuple[str, ssl.TLSVersion, str | None, str | None]] = [
    ("TLS 1.3", ssl.TLSVersion.TLSv1_3, None, "TLSv1.3"),
    ("TLS 1.2", ssl.TLSVersion.TLSv1_2, None, "TLSv1.2"),
    ("TLS 1.1", ssl.TLSVersion.TLSv1_1, None, None),
    ("TLS 1.0", ssl.TLSVersion.TLSv1, None, None),
    ("TLS 1.2, CBC/SHA1 suite only", ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA", None),
    ("TLS 1.2, RSA key exchange (no forward secrecy) only", ssl.TLSVersion.TLSv1_2,
     "AES128-GCM-SHA256:AES256-GCM-SHA384", None),
]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_termination_modern_protocols_only(certs: dict[str, Any],
                                                     tmp_path: Path) -> None:
    ca = certs["ca"]  # an RSA certificate: RSA key exchange is possible, and must be refused
    async with tls_balancer(tmp_path, certs["rsa"],
                            client={"header_timeout": "1s"}) as (proc, port, backends):
        status, sslobj = await https_get(port, client_context(ca))
        assert status == 200 and sslobj.selected_alpn_protocol() == "http/1.1"
        seen = [r for be in backends for r in be.requests if r.complete]
        assert seen and seen[-1].header(b"x-forwarded-proto") == [b"https"]
        record("TLS", "HTTPS request through balancer run", status=status, expected=200,
               ok=status == 200)

        outcomes, control = {}, {}
        async with lenient_server(certs["rsa"]) as lenient:
            for name, version, suites, want in HANDSHAKES:
                ctx = client_context(ca, version, suites)
                control[name] = (await handshake(lenient, ctx))[0]
                outcomes[name] = await handshake(port, ctx)
                ok = outcomes[name][0] == want and control[name] is not None
                record("TLS", f"handshake: {name}", status=None, expected=None, ok=ok,
                       version=outcomes[name][0], refused=outcomes[name][1])
        # The client really offered each (a lenient server agreed); the proxy agreed only to
        # TLS 1.2+ with a forward-secret AEAD suite. (uvloop resets a refused handshake.)
        assert all(control.values()), control
        assert {name: got[0] for name, got in outcomes.items()} == \
            {name: want for name, _, _, want in HANDSHAKES}, outcomes

        # Plain HTTP on the TLS port, and a TCP connection that never starts a handshake.
        async with await RawClient.open(port) as plain:
            await plain.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert await plain.closed()
        async with await RawClient.open(port) as silent:
            assert await silent.closed(timeout=10)  # ssl_handshake_timeout = header_timeout
        record("TLS", "plain HTTP and a silent client on the TLS port", status=None,
               expected=None, ok=True)
        status, _ = await https_get(port, client_context(ca))  # still serving
        assert status == 200


async def test_a_renewed_certificate_is_served_after_sighup(certs: dict[str, Any],
                                                           tmp_path: Path) -> None:
    ca = certs["ca"]
    async with tls_balancer(tmp_path, certs["server"]) as (proc, port, _):
        _, before = await https_get(port, client_context(ca))
        assert dict(x[0] for x in before.getpeercert()["subject"])["commonName"] == "server"
        shutil.copy(certs["renewed"].cert, tmp_path / "live.pem")
        shutil.copy(certs["renewed"].key, tmp_path / "live.key")
        mark = proc.mark()
        proc.send(signal.SIGHUP)
        await proc.wait_for(r"tls: certificate .* loaded", since=mark)
        status, after = await https_get(port, client_context(ca))
        name = dict(x[0] for x in after.getpeercert()["subject"])["commonName"]
    record("TLS", "renewed certificate loaded on SIGHUP", status=status, expected=200,
           ok=name == "renewed")
    assert status == 200 and name == "renewed"


# --------------------------------------------------------------------------- to backends


@asynccontextmanager
async def https_backend(pair: Pair | ssl.SSLContext, name: str = "secure"
                        ) -> AsyncIterator[int]:
    """An https backend answering its name, with ``pair``'s certificate (or a context the
    test keeps, to renew the certificate while it runs)."""
    if isinstance(pair, ssl.SSLContext):
        ctx = pair
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    runner = web.AppRunner(name_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def through(port: int, backend_tls: dict[str, Any] | None) -> tuple[int, str]:
    pool: dict[str, Any] = {"backends": [{"url": f"https://127.0.0.1:{port}", "name": "s"}],
                            "retries": 0}
    if backend_tls is not None:
        pool["backend_tls"] = backend_tls
    async with run_proxy({"pools": {"web": pool}}) as px:
        async with aiohttp.ClientSession() as s:
            async with s.get(px.url + "/") as r:
                return r.status, await r.text()


async def test_https_backends_are_verified(certs: dict[str, Any],
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="balancer")
    ca = str(certs["ca"].cert)
    results = {}
    async with https_backend(certs["server"]) as good, \
            https_backend(certs["untrusted"]) as untrusted, \
            https_backend(certs["named"]) as named:
        results["trusted by the pool's CA"] = (await through(good, {"ca": ca}), 200)
        results["untrusted certificate"] = (await through(untrusted, None), 502)
        results["untrusted, pool CA given"] = (await through(untrusted, {"ca": ca}), 502)
        results["certificate for another name"] = (
            await through(good, {"ca": ca, "server_name": "other.test"}), 502)
        results["server_name matching the certificate"] = (
            await through(named, {"ca": ca, "server_name": "api.internal"}), 200)
        results["verify: false"] = (await through(untrusted, {"verify": False}), 200)
    for name, ((status, _body), want) in results.items():
        record("TLS", f"https backend: {name}", status=status, expected=want,
               ok=status == want)
    assert {k: v[0][0] for k, v in results.items()} == {k: v[1] for k, v in results.items()}
    assert results["trusted by the pool's CA"][0][1] == "secure"
    for name in ("untrusted certificate", "untrusted, pool CA given",
                 "certificate for another name"):
        assert "certificate verify failed" in results[name][0][1]  # why, in the 502's detail
    assert "NOT verified (verify: false)" in caplog.text


async def test_https_backends_are_probed_with_the_pools_backend_tls(
        certs: dict[str, Any], tmp_path: Path) -> None:
    """Health probes trust what the pool's ``backend_tls`` trusts and check the name it names.
    With the system's defaults, every probe of a backend behind a private CA failed and took
    it out of rotation: the whole pool down, a 503 for every client."""
    ca = str(certs["ca"].cert)
    hc = {"path": "/", "interval": 0.2, "timeout": 2, "healthy_threshold": 1,
          "unhealthy_threshold": 1}

    def https(*named: tuple[str, int]) -> list[dict[str, str]]:
        return [{"url": f"https://127.0.0.1:{port}", "name": name} for name, port in named]

    async with https_backend(certs["named"], "a") as a, https_backend(certs["named"], "b") as b, \
            https_backend(certs["untrusted"], "x") as x, \
            https_backend(certs["untrusted"], "y") as y:
        port = free_port()
        config = write_config(tmp_path / "probed.yaml", {
            "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
            "pools": {
                "web": {"backends": https(("a", a), ("b", b)), "health_check": hc,
                        "backend_tls": {"ca": ca, "server_name": "api.internal"}},
                "bad": {"backends": https(("x", x), ("y", y)), "health_check": hc,
                        "backend_tls": {"ca": ca}}},
            "routes": [{"host": "bad.test", "pool": "bad"}, {"pool": "web"}]})
        async with BalancerProcess(config) as proc:
            # The probes verify: a certificate the pool's CA did not sign takes its backend out.
            await proc.wait_for(r"pool bad: backend [xy] is DOWN: .*certificate verify failed")
            await asyncio.sleep(1.0)  # five probe intervals for pool web
            served = []
            async with aiohttp.ClientSession() as s:
                for _ in range(10):
                    async with s.get(f"http://127.0.0.1:{port}/") as r:
                        assert r.status == 200, await r.text()
                        served.append(await r.text())
        assert sorted(set(served)) == ["a", "b"]
        assert "pool web: backend" not in proc.log, proc.log  # never DOWN


# --------------------------------------------------------------------------- the admin door


async def test_admin_is_on_loopback_by_default_and_reload_needs_the_token(
        tmp_path: Path) -> None:
    assert str(parse_config({"pools": {"web": {"backends": ["http://10.0.0.1:80",
                                                              "http://10.0.0.2:80"]}}}).admin
               ) == "127.0.0.1:9100"
    assert str(parse_config({"admin": 9200, "pools": {"web": {"backends": [
        "http://10.0.0.1:80", "http://10.0.0.2:80"]}}}).admin) == "127.0.0.1:9200"
    async with parsing_backend() as a, parsing_backend() as b:
        admin = free_port()
        config = write_config(tmp_path / "a.yaml", {
            "listen": f"127.0.0.1:{free_port()}", "admin": f":{admin}",
            "admin_token": "s3cret", "pools": {"web": pool_config([a.port, b.port])}})
        async with BalancerProcess(config):
            url = f"http://127.0.0.1:{admin}"
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/reload") as r:
                    missing = r.status
                async with s.post(url + "/reload",
                                  headers={"Authorization": "Bearer wrong"}) as r:
                    wrong = r.status
                async with s.post(url + "/reload",
                                  headers={"Authorization": "Bearer s3cret"}) as r:
                    right = r.status
                async with s.get(url + "/status") as r:
                    status_page = r.status
    ok = (missing, wrong, right, status_page) == (401, 401, 200, 200)
    record("doors", "admin on loopback; reload needs the bearer token", status=missing,
           expected=401, ok=ok)
    assert (missing, wrong, right, status_page) == (401, 401, 200, 200)
