"""The request path alone in a process: ``python -m tests.support.proxy_server CONFIG [PORT]``.

For tests that measure the proxy process itself (its memory while bodies stream through) and
for quick benchmarks, without the app's services. Serves ``protocol_factory`` on uvloop at
127.0.0.1:PORT (0 = any), logs like ``balancer run`` does (access log included unless
``--no-access-log``), prints ``listening on 127.0.0.1:<port>`` on stderr once ready, and exits
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

import uvloop

from balancer.backend import Backend
from balancer.loading import load_config
from balancer.logs import setup_logging
from balancer.pool import Pool
from balancer.proxy import ProxySettings, ProxyState, protocol_factory
from balancer.router import Router


async def serve(config_path: str, port: int, access_log: bool) -> None:
    cfg = load_config(config_path)
    pools = {name: Pool(pc, [Backend(bc, name, pc.max_connections) for bc in pc.backends])
             for name, pc in cfg.pools.items()}
    state = ProxyState(Router(cfg.routes, pools), ProxySettings(access_log=access_log))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol_factory(state), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.collect()
    gc.freeze()  # as ``balancer run`` does (app._freeze_heap)
    gc.set_threshold(10_000, 20, 20)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", file=sys.stderr,
          flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--batched-log", action="store_true")
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args()
    setup_logging()
    if args.batched_log:
        from balancer.accesslog import LOGGER, AccessLogHandler
        LOGGER.handlers[:] = [AccessLogHandler(sys.stderr)]
    if args.log_level:
        logging.getLogger("balancer.access").setLevel(args.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.config, args.port, not args.no_access_log))


if __name__ == "__main__":
    main()
