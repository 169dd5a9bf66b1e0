"""``broadcaster-gateway``: run a gateway (and ``broadcaster-gateway token`` to mint a dev token).

Exit status: 0 after a drain (SIGTERM / SIGINT); 2 bad option or configuration
(profiles file, plugin, auth key...); 69 the backend (Redis) stayed unreachable at
start-up, with one line on stderr naming its address (credentials redacted) and
what to check; 3 any other start-up failure (uvicorn's own code, with a traceback).
With ``--workers N`` the supervisor exits with a worker's start-up status, 1 when a worker
did not exit 0 after the drain, 70 when a worker kept failing (gateway.workers).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import fields
from typing import Any

from broadcaster.errors import BackendUnavailable
from broadcaster.urls import redact_url, url_addresses
from gateway.settings import HELP, LIST_OPTIONS, Settings, settings_from, worker_count

EXIT_BAD_CONFIG = 2
EXIT_STARTUP_FAILED = 3  # uvicorn's STARTUP_FAILURE
EXIT_BACKEND_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE

EPILOG = f"""\
subcommands:
  token                 mint an HS256 development token for --auth-secret
                        (broadcaster-gateway token --help)

exit status:
  0                     stopped after a drain (SIGTERM, SIGINT)
  {EXIT_BAD_CONFIG}                     bad option or configuration
  {EXIT_BACKEND_UNAVAILABLE}                    Redis unreachable at start-up (one line says where and what to check)
  {EXIT_STARTUP_FAILED}                     any other start-up failure (with a traceback)
  70                    --workers: a worker kept exiting within 30 s of its start (5 times in a row)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcaster-gateway",
        usage="broadcaster-gateway [options]\n       broadcaster-gateway token --secret S [token options]",
        description="Websocket gateway. Every option can also be set as BROADCASTER_<OPTION> in the\n"
                    "environment (options win). Without --redis-url it runs on the embedded in-memory backend.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{HELP[f.name]} (env {Settings.env_name(f.name)}; default {default!r})"
        if f.name in LIST_OPTIONS:
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        elif isinstance(default, bool):  # a flag (env: 1/0, true/false)
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)
    return parser


def _token(argv: Sequence[str]) -> int:
    from gateway.auth import mint_token

    parser = argparse.ArgumentParser(prog="broadcaster-gateway token", description="Mint an HS256 development token.")
    env_secret = os.environ.get(Settings.env_name("auth_secret")) or None
    parser.add_argument("--secret", required=env_secret is None, default=env_secret,
                        help=f"the gateway's --auth-secret (env {Settings.env_name('auth_secret')})")
    parser.add_argument("--sub", default="dev")
    parser.add_argument("--convs", default="*", help="comma-separated conversation ids or globs")
    parser.add_argument("--profiles", default="default", help="comma-separated profile names")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    args = parser.parse_args(argv)
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    print(mint_token(args.secret, sub=args.sub, convs=convs, profiles=profiles, ttl=args.ttl))
    return 0


def _import_from_cwd() -> None:
    """Let ``--plugin`` and profile ``enrich`` hooks import modules of the current directory.

    A console script's ``sys.path[0]`` is the directory of the script, not the one it was
    started from, so ``--plugin examples.plugins.chat_summary:setup`` failed from the
    repository root with "No module named 'examples'". ``python -m`` and uvicorn put the
    current directory first; here it goes last, so a stray ``redis.py`` in the current
    directory cannot shadow an installed package.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


class StartupWatch(logging.Filter):
    """What the gateway logs while its backend starts, and why a start failed.

    While Redis does not answer yet the backend logs a line per reconnect attempt; here
    they are held back (the last error is kept for the final message) until start-up
    is over (``--log-level debug`` shows them). When it fails because the backend stayed
    unreachable, uvicorn's traceback of that one known error is held back too:
    :func:`backend_unreachable_message` says it in one line.
    """

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose
        self.starting = True
        self.failure: BaseException | None = None
        self.last_error: BaseException | None = None
        self.held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.starting:
            return True
        if record.name == "broadcaster.retry":
            args = record.args if isinstance(record.args, tuple) else ()
            for arg in args:
                if isinstance(arg, BaseException):
                    self.last_error = arg
            self.held_back += 1
            return self.verbose
        if record.name.startswith("uvicorn") and isinstance(self.failure, BackendUnavailable):
            return record.levelno < logging.ERROR  # the traceback and "Application startup failed"
        return True

    def install(self) -> None:
        logging.getLogger("broadcaster.retry").addFilter(self)
        logging.getLogger("uvicorn.error").addFilter(self)

    def watch(self, lifespan: Callable[[Any], AbstractAsyncContextManager[Any]]
              ) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
        """``lifespan`` that records a start-up failure here and ends the watch once started."""

        @asynccontextmanager
        async def watched(app: Any) -> AsyncIterator[Any]:
            started = False
            try:
                async with lifespan(app) as state:
                    started = True
                    self.starting = False
                    if self.held_back and not self.verbose:
                        logging.getLogger("gateway").info(
                            "the backend answered after %d failed connection attempt(s) (last: %s)",
                            self.held_back, self.last_error)
                    yield state
            except BaseException as exc:
                if not started:
                    self.failure = exc
                raise

        return watched


_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("refused",), "nothing accepts connections there: is redis-server running, on that host and port?"),
    (("name or service not known", "nodename nor servname", "temporary failure in name resolution",
      "no address associated"), "the host name does not resolve: check the host in --redis-url"),
    (("wrongpass", "invalid password", "invalid username-password", "noauth", "authentication"),
     "Redis refused the credentials: check the user and password in --redis-url"),
    (("timeout", "timed out"), "no answer in time: check the host, a firewall, and whether the server wants TLS "
                               "(rediss://)"),
    (("ssl", "certificate", "wrong version number"), "TLS failed: rediss:// needs a TLS port, redis:// a plain one"),
)


def backend_unreachable_message(settings: Settings, exc: BaseException, last_error: BaseException | None) -> str:
    """One line: which Redis, why (the last connection error), what to check."""
    url = settings.redis_url or ""
    cause = str(last_error) if last_error is not None else str(exc)
    lowered = cause.lower()
    hint = next((text for needles, text in _HINTS if any(n in lowered for n in needles)),
                "check that Redis runs there and that --redis-url (scheme, host, port, password) is right")
    return (f"broadcaster-gateway: cannot reach Redis at {url_addresses(url)} ({redact_url(url)}) "
            f"at start-up: {cause.rstrip('.')}; {hint} (or leave --redis-url out to run on the embedded backend)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        return _token(argv[1:])
    args = _parser().parse_args(argv)
    try:
        settings = settings_from(vars(args))
    except ValueError as exc:
        print(f"broadcaster-gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _import_from_cwd()
    from gateway import logs, workers

    logs.configure(settings.log_level, settings.log_format)
    count = worker_count(settings.workers)
    if count > 1:  # a supervisor of `count` workers (gateway.workers), each running this function
        return workers.supervise(settings, argv, count)
    slot = workers.current_slot()
    if slot is not None:
        workers.die_with_supervisor(slot)
    from gateway.app import create_app
    from gateway.fdlimit import fit_open_files
    from gateway.server import serve
    from gateway.state import StartupError

    worker = workers.Worker(slot, settings) if slot is not None else None  # tags this worker's log lines
    fit_open_files(settings)
    try:
        app = create_app(settings)
    except (StartupError, ValueError) as exc:
        print(f"broadcaster-gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    sockets = worker.prepare(app) if worker is not None else None
    watch = StartupWatch(verbose=settings.log_level.lower() == "debug")
    watch.install()
    app.router.lifespan_context = watch.watch(app.router.lifespan_context)
    if settings.redis_url:
        logging.getLogger("gateway").info("connecting to Redis at %s (%s)", url_addresses(settings.redis_url),
                                          redact_url(settings.redis_url))
    try:
        serve(app, settings, sockets=sockets)
    except SystemExit:
        if isinstance(watch.failure, BackendUnavailable):
            print(backend_unreachable_message(settings, watch.failure, watch.last_error), file=sys.stderr)
            return EXIT_BACKEND_UNAVAILABLE
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
