"""A ``backend_tls`` change on reload reaches the backends that stay, from their next connection.

A kept backend keeps its state across a reload, and used to keep its pooled upstream
connections and the SSL context and SNI name they were made with, so ``verify: false → true``
went unnoticed until a restart. Here ``balancer run`` proxies to two https backends whose
certificates a test CA signed, with warm keep-alive connections to both, and each reload
(SIGHUP) changes only ``backend_tls``: the next request answers as the new settings say.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.certs import issue, make_ca
from tests.support.net import free_port
from tests.support.proc import BalancerProcess, write_config
from tests.test_tls import https_backend


async def test_backend_tls_change_is_used_by_the_next_connection_to_a_kept_backend(
        tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    pair = issue(tmp_path, ca)
    async with https_backend(pair, "a") as a, https_backend(pair, "b") as b:
        port = free_port()

        def config(backend_tls: dict[str, Any]) -> Path:
            return write_config(tmp_path / "c.yaml", {
                "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
                "access_log": False,
                "pools": {"web": {
                    "backends": [{"url": f"https://127.0.0.1:{p}", "name": n}
                                 for n, p in (("a", a), ("b", b))],
                    "retries": 1, "backend_tls": backend_tls,
                    # failures must not eject: each answer here is the TLS settings' doing
                    "outlier_detection": {"consecutive_failures": 1000}}}})

        async with BalancerProcess(config({"verify": False})) as proc, \
                aiohttp.ClientSession() as client:

            async def get() -> tuple[int, str]:
                async with client.get(f"http://127.0.0.1:{port}/") as r:
                    return r.status, await r.text()

            async def reload(backend_tls: dict[str, Any]) -> None:
                mark = proc.mark()
                config(backend_tls)
                proc.send(signal.SIGHUP)
                await proc.wait_for("reload applied", since=mark)

            # verify: false: both serve, and their keep-alive connections stay pooled.
            assert {(await get())[1] for _ in range(4)} == {"a", "b"}

            # verify: true, the system's CAs only: the pooled connections are not reused;
            # the next connection verifies the certificate and fails.
            await reload({"verify": True})
            status, body = await get()
            assert status == 502 and "certificate verify failed" in body, (status, body)

            # The test CA: verified, served again.
            await reload({"ca": str(ca.cert)})
            assert {(await get())[1] for _ in range(4)} == {"a", "b"}

            # server_name the certificate does not carry: the next connection checks it.
            await reload({"ca": str(ca.cert), "server_name": "other.test"})
            status, body = await get()
            assert status == 502 and "certificate verify failed" in body, (status, body)
            await reload({"ca": str(ca.cert)})
            assert (await get())[0] == 200
        assert "backend_tls changed: new connections use it" in proc.log
        assert "Traceback" not in proc.log, proc.log


async def test_a_ca_file_renewed_in_place_is_used_after_sighup(tmp_path: Path) -> None:
    """An internal CA rotated the usual way: the bundle at the same path gets the new CA, the
    backends get certificates it signed, then SIGHUP. The reload must load the file again
    (the config text did not change): with the old CA every new connection would fail."""
    old_ca, new_ca = make_ca(tmp_path, "old-ca"), make_ca(tmp_path, "new-ca")
    old_pair = issue(tmp_path, old_ca, name="old")
    new_pair = issue(tmp_path, new_ca, name="new")
    bundle = tmp_path / "ca-bundle.pem"
    shutil.copy(old_ca.cert, bundle)
    contexts = [ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) for _ in range(2)]
    for ctx in contexts:
        ctx.load_cert_chain(str(old_pair.cert), str(old_pair.key))
    async with https_backend(contexts[0], "a") as a, https_backend(contexts[1], "b") as b:
        port = free_port()
        config = write_config(tmp_path / "c.yaml", {
            "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
            "access_log": False,
            "pools": {"web": {
                "backends": [{"url": f"https://127.0.0.1:{p}", "name": n}
                             for n, p in (("a", a), ("b", b))],
                "retries": 1, "backend_tls": {"ca": str(bundle)},
                "outlier_detection": {"consecutive_failures": 1000}}}})
        async with BalancerProcess(config) as proc, aiohttp.ClientSession() as client:

            async def get() -> tuple[int, str]:
                async with client.get(f"http://127.0.0.1:{port}/") as r:
                    return r.status, await r.text()

            assert {(await get())[1] for _ in range(4)} == {"a", "b"}
            # The rotation: new certificates on the backends (for new handshakes), the new CA
            # in the bundle under the same name, then SIGHUP with the config unchanged.
            for ctx in contexts:
                ctx.load_cert_chain(str(new_pair.cert), str(new_pair.key))
            shutil.copy(new_ca.cert, bundle)
            mark = proc.mark()
            proc.send(signal.SIGHUP)
            await proc.wait_for("reload applied", since=mark)
            # Eight at once: more than the connections pooled before, so new ones are made.
            answers = await asyncio.gather(*(get() for _ in range(8)))
            assert {body for _, body in answers} == {"a", "b"}, answers
            assert {status for status, _ in answers} == {200}, answers
        assert "backend_tls changed: new connections use it" in proc.log
        assert "Traceback" not in proc.log, proc.log

