"""The python-socketio peer (server ``socketio``): ``socketio.AsyncServer`` as an ASGI app on uvicorn.

    python bench/servers/socketio_app.py --port 8003 --redis-url redis://127.0.0.1:6379/0 --prefix bc

Set up the way python-socketio's documentation does for several servers behind one
Redis: ``client_manager=socketio.AsyncRedisManager(url, channel=...)`` (its default
JSON encoding, every message on one channel, read by every server), websocket
transport only. Rooms = conversations: a client emits ``join`` with the room name and
an ack id and is acked once it is in the room. Events arrive from
``bench/emit_socketio.py`` (a write-only ``AsyncRedisManager``) and go out as
``42["event",{...}]``. uvicorn runs with the gateway's own choices (uvloop,
httptools, the websockets sans-I/O implementation, no access log); ``GET /healthz``
answers 200.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import socketio
import uvicorn
from peer_cli import peer_args

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def healthz(scope: Scope, receive: Receive, send: Send) -> None:
    """The non-socket.io part of the app: 200 on ``/healthz``, 404 elsewhere."""
    if scope["type"] != "http":
        return
    ok = scope["path"] == "/healthz"
    await send({"type": "http.response.start", "status": 200 if ok else 404,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok" if ok else b"not found"})


def create_app(redis_url: str, prefix: str) -> socketio.ASGIApp:
    manager = socketio.AsyncRedisManager(redis_url, channel=f"{prefix}-socketio")
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, transports=["websocket"],
                               cors_allowed_origins=[])

    @sio.on("join")  # type: ignore[untyped-decorator]
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, str(room))
        return "joined"

    return socketio.ASGIApp(sio, other_asgi_app=healthz)


def main() -> None:
    args = peer_args(__doc__, 8003)
    uvicorn.run(create_app(args.redis_url, args.prefix), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", ws="websockets-sansio", log_level="warning", access_log=False, backlog=2048,
                lifespan="off")


if __name__ == "__main__":
    main()
