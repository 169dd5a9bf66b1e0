"""``broadcaster-publish CONV TYPE JSON``: publish one event from the shell and print the result as JSON.

By default it publishes through the HTTP API of the gateway the README's quick start
runs (``http://127.0.0.1:8000``), whatever its backend. ``--url redis://...`` publishes
straight to Redis instead, where only gateways started with ``--redis-url`` on that
Redis (and the same ``--key-prefix``) see the event.

Exit status: 0 published, 2 bad input (JSON, conversation id, type, URL...), 1 the
gateway or Redis stayed unreachable for the retry budget, or refused the request.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import orjson

from broadcaster.backends.scripts import LibraryMissing
from broadcaster.errors import BackendUnavailable, BroadcasterError, ValidationError
from producers.producer import Producer

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "BROADCASTER_REDIS_URL"

EPILOG = f"""\
examples:
  broadcaster-publish demo chat.message '{{"text": "hi"}}'
      through the gateway on {DEFAULT_URL} (the quick start's), any backend
  broadcaster-publish demo chat.message '{{"text": "hi"}}' --url redis://127.0.0.1:6379/0
      straight to Redis: seen by gateways started with that --redis-url and key prefix
      (the conversation's namespace policy applies: a gateway must have started there)

exit status: 0 published; 2 bad input; 1 unreachable or refused"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcaster-publish", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Publish one event to a conversation, through a gateway's HTTP API or straight to Redis,\n"
                    "and print the result as JSON.")
    parser.add_argument("conv", metavar="CONV", help="conversation id")
    parser.add_argument("type", metavar="TYPE", help="event type, e.g. chat.message")
    parser.add_argument("data", metavar="JSON", help="event data as JSON, e.g. '{\"text\": \"hi\"}'")
    parser.add_argument("--id", help="event id (idempotency: republishing it is a no-op)")
    parser.add_argument("--key", help="state key: the event becomes the conversation's state entry for it")
    parser.add_argument("--op", choices=["append"],
                        help="append: JSON (an object) is appended to the --key entry: its string values "
                             "extend the entry's, other values replace them (docs/streaming.md)")
    parser.add_argument("--url", default=os.environ.get(URL_ENV) or DEFAULT_URL,
                        help="http(s):// of a gateway, or redis://, rediss://, redis+cluster://, "
                             "redis+sentinel:// to publish straight to Redis "
                             f"(env {URL_ENV}, as for the gateway; default {DEFAULT_URL})")
    parser.add_argument("--key-prefix", default=os.environ.get("BROADCASTER_KEY_PREFIX", "bc"),
                        help="Redis only: key prefix, the gateways' --key-prefix (env BROADCASTER_KEY_PREFIX; "
                             "default bc)")
    env_keys = [k.strip() for k in os.environ.get("BROADCASTER_PUBLISH_KEY", "").split(",") if k.strip()]
    parser.add_argument("--publish-key", default=env_keys[0] if env_keys else None,
                        help="HTTP only: the gateway's publish key, sent as Authorization: Bearer "
                             "(env BROADCASTER_PUBLISH_KEY)")
    parser.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                        help="Redis only: acknowledge only once N replicas have the event (WAIT; "
                             "docs/operations.md); fewer within 1 s exits 1 (default 0: no wait)")
    parser.add_argument("--retry-budget", type=float, default=10.0,
                        help="seconds to retry while the gateway or Redis is unreachable (default 10)")
    return parser


def _unreachable_hint(url: str) -> str:
    if url.partition("://")[0].lower() in ("http", "https"):
        return ("is a gateway running there? Start one with `broadcaster-gateway`, or pass --url with the "
                "gateway's address (or redis://... to publish straight to Redis)")
    return "is Redis running there? Check --url (host, port, password)"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"broadcaster-publish: JSON is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if args.retry_budget < 0:
        print("broadcaster-publish: --retry-budget must be 0 or more", file=sys.stderr)
        return 2
    if args.wait_replicas < 0:
        print("broadcaster-publish: --wait-replicas must be 0 or more", file=sys.stderr)
        return 2
    if args.wait_replicas and args.url.partition("://")[0].lower() in ("http", "https"):
        print("broadcaster-publish: --wait-replicas needs a Redis --url; over HTTP the gateway's "
              "--redis-wait-replicas applies", file=sys.stderr)
        return 2
    options: dict[str, object] = {"wait_replicas": args.wait_replicas} if args.wait_replicas else {}
    try:
        with Producer.from_url(args.url, key_prefix=args.key_prefix, publish_key=args.publish_key,
                               retry_budget=args.retry_budget, **options) as producer:
            result = producer.publish(args.conv, args.type, data, id=args.id, key=args.key, op=args.op)
    except ValidationError as exc:
        print(f"broadcaster-publish: invalid {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        hint = "" if isinstance(exc.__cause__, LibraryMissing) else f"; {_unreachable_hint(args.url)}"
        print(f"broadcaster-publish: unavailable: {exc}{hint}", file=sys.stderr)
        return 1
    except BroadcasterError as exc:
        print(f"broadcaster-publish: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(result._asdict()).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
