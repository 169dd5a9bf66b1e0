"""The command loop of bench's helper processes: one JSON command a line on stdin, one answer a line on stdout.

Standard library only: the helpers run in different venvs (the project's, the tools one, socketio's).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
"""Answers one command; ``None`` means the command is unknown (or not allowed yet)."""


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


async def serve(hello: dict[str, Any], handle: Handler, last: Collection[str], *,
                dumps: Callable[[Any], bytes] = _json_dumps, loads: Callable[[bytes], Any] = json.loads) -> None:
    """Write ``hello``, then answer each command with ``handle`` until stdin ends or a command in ``last``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(dumps(obj) + b"\n")
        out.flush()

    reply(hello)
    while True:
        line = await reader.readline()
        if not line:
            break
        msg = loads(line)
        cmd = msg["cmd"]
        answer = await handle(msg)
        reply(answer if answer is not None else {"error": f"bad command {cmd!r}"})
        if answer is not None and cmd in last:
            break
