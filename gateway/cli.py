"""``broadcaster-gateway``: run a gateway (and ``broadcaster-gateway token`` to mint a dev token)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

from gateway.settings import HELP, LIST_OPTIONS, Settings, settings_from


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcaster-gateway",
        description="Websocket gateway. Every option can also be set as BROADCASTER_<OPTION> in the environment "
                    "(options win). Without --redis-url it runs on the embedded in-memory backend.")
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{HELP[f.name]} (env {Settings.env_name(f.name)}; default {default!r})"
        if f.name in LIST_OPTIONS:
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        return _token(argv[1:])
    args = _parser().parse_args(argv)
    try:
        settings = settings_from(vars(args))
    except ValueError as exc:
        print(f"broadcaster-gateway: {exc}", file=sys.stderr)
        return 2
    from gateway import logs
    from gateway.app import create_app
    from gateway.server import serve
    from gateway.state import StartupError

    logs.configure(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except (StartupError, ValueError) as exc:
        print(f"broadcaster-gateway: {exc}", file=sys.stderr)
        return 2
    serve(app, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
