"""``broadcaster-publish CONV TYPE JSON``: publish one event from the shell and print the result as JSON.

Exit status: 0 published, 2 bad input (JSON, conversation id, type, ...), 1 the
backend stayed unreachable for the retry budget or refused the credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import orjson

from broadcaster.errors import BackendUnavailable, BroadcasterError, ValidationError
from producers.producer import Producer

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcaster-publish",
        description="Publish one event to a conversation, straight to Redis or through a gateway's HTTP API.")
    parser.add_argument("conv", metavar="CONV", help="conversation id")
    parser.add_argument("type", metavar="TYPE", help="event type, e.g. chat.message")
    parser.add_argument("data", metavar="JSON", help="event data as JSON, e.g. '{\"text\": \"hi\"}'")
    parser.add_argument("--id", help="event id (idempotency: republishing it is a no-op)")
    parser.add_argument("--key", help="state key: the event becomes the conversation's state entry for it")
    parser.add_argument("--url", default=os.environ.get("BROADCASTER_REDIS_URL", DEFAULT_URL),
                        help="redis://, rediss://, redis+cluster:// or http(s):// gateway URL "
                             f"(env BROADCASTER_REDIS_URL; default {DEFAULT_URL})")
    parser.add_argument("--key-prefix", default=os.environ.get("BROADCASTER_KEY_PREFIX", "bc"),
                        help="Redis key prefix (env BROADCASTER_KEY_PREFIX; default bc)")
    parser.add_argument("--publish-key", help="HTTP: the gateway's publish key (Authorization: Bearer)")
    parser.add_argument("--retry-budget", type=float, default=10.0,
                        help="seconds to retry while the backend is unreachable (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"broadcaster-publish: JSON is not valid JSON: {exc}", file=sys.stderr)
        return 2
    try:
        with Producer.from_url(args.url, key_prefix=args.key_prefix, publish_key=args.publish_key,
                               retry_budget=args.retry_budget) as producer:
            result = producer.publish(args.conv, args.type, data, id=args.id, key=args.key)
    except ValidationError as exc:
        print(f"broadcaster-publish: invalid {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        print(f"broadcaster-publish: backend unavailable: {exc}", file=sys.stderr)
        return 1
    except BroadcasterError as exc:
        print(f"broadcaster-publish: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(result._asdict()).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
