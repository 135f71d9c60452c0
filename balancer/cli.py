"""The command line: ``balancer run | check | demo``.

Exit codes: 0 success, 1 a refused or invalid config (or a failed run), 2 usage errors (and,
for `check`, a file that cannot be read).
Each command lives in the module that owns it; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys

from balancer import __version__
from balancer.config import Config, defaults
from balancer.config.values import workers_count

# Defaults from the model (balancer/config/model.py), not written again here.
_ADMIN, _DRAIN = defaults(Config)["admin"], f"{defaults(Config)['drain_timeout']:g}s"
RUN_EPILOG = f"""\
reloading (the running config stays when the guard refuses the new one):
  kill -HUP PID                 re-read FILE and apply it if the guard accepts it
  POST /reload                  the same over the admin address (config key admin,
                                default {_ADMIN}); with admin_token set it needs
                                Authorization: Bearer TOKEN. 200 applied, 409 refused
  --watch                       the same whenever FILE's content changes

stopping:
  SIGTERM or SIGINT             stop accepting, let requests in flight finish for up
                                to drain_timeout (default {_DRAIN}), then exit 0

environment:
  BALANCER_LOG_LEVEL            DEBUG, INFO (default), WARNING or ERROR; logs go to
                                stderr, one line each

exit codes: 0 after a clean drain, 1 when the config is refused or invalid or an
address cannot be bound
"""

CHECK_EPILOG = """\
exit codes:
  0  the config would load (warnings, if any, on stderr)
  1  refused by the guard or invalid: one line per problem on stderr, naming where;
     with --against, also an OLD that is invalid (its lines start "--against:")
  2  a usage error, or a file (FILE or OLD) that cannot be read

In the share diff of --against, "*" marks a backend whose share changed.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancer",
        description="An HTTP load balancer that refuses configs that would concentrate traffic.",
    )
    parser.add_argument("--version", action="version", version=f"balancer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="serve traffic with a config", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument("--watch", action="store_true",
                     help="reload when the config file's content changes (a mounted ConfigMap),"
                          " with the guard deciding as on SIGHUP")
    run.add_argument("--workers", type=_workers, metavar="N|auto",
                     help="worker processes serving listen (overrides the config's workers;"
                          " auto: one per core this process may run on; default 1)")

    check = sub.add_parser("check", help="validate a config and simulate its traffic shares",
                           epilog=CHECK_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    check.add_argument("--against", metavar="OLD",
                       help="the config now deployed: print each backend's share before → after")
    check.add_argument("--replay", action="append", metavar="LOG",
                       help="replay a recorded log (balancer's JSON access log, or nginx combined)"
                            " under the config; exit 1 if its shares break the guard's rules"
                            " (repeatable)")
    check.add_argument("--host", metavar="NAME",
                       help="with --replay: the host of requests whose log line has none"
                            " (nginx combined records no host)")

    demo = sub.add_parser("demo", help="run three demo backends behind the proxy, no setup needed")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080; 0 = any)")
    demo.add_argument("--admin-port", type=int, default=9100,
                      help="admin port (default 9100; 0 = any)")
    return parser


def _workers(text: str) -> int | str:
    """``--workers``: a whole number >= 1, or ``auto``."""
    if text == "auto":
        return text
    try:
        return workers_count(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 1 or auto, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        from balancer.check import main_check, main_replay

        if args.replay:
            return main_replay(args.config, args.replay, args.host, args.against)
        return main_check(args.config, args.against)
    if args.command == "run":
        from balancer.run import main_run

        return main_run(args.config, watch=args.watch, workers=args.workers)
    if args.command == "demo":
        from balancer.demo import main_demo

        return main_demo(args.port, args.admin_port)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
