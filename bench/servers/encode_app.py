"""The encode/broadcaster peer: PyPI ``broadcaster[redis]`` behind a Starlette websocket endpoint.

    python bench/servers/encode_app.py --port 8002 --redis-url redis://127.0.0.1:6379/0 --prefix bc

Written the way its README's chat example is: the endpoint accepts, then (in an
anyio task group, next to a receiver that ends the group when the client goes)
``async with broadcast.subscribe(channel)`` and ``await websocket.send_text(event.message)``
for each event. One channel per conversation: ``P:{C}:json``, the JSON copy the
bench publisher sends next to every script publish (encode/broadcaster's Redis
backend ``.decode()``s payloads as text, so it cannot read the msgpack of
``P:{C}:live``). uvicorn runs with the gateway's own choices: uvloop, httptools,
the websockets sans-I/O implementation, no access log.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import uvicorn
from peer_cli import peer_args
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from broadcaster import Broadcast


def create_app(redis_url: str, prefix: str) -> Starlette:
    broadcast = Broadcast(redis_url)

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def receiver(websocket: WebSocket) -> None:
        async for _ in websocket.iter_text():
            pass

    async def sender(websocket: WebSocket, channel: str) -> None:
        async with broadcast.subscribe(channel=channel) as subscriber:
            async for event in subscriber:  # type: ignore[union-attr]
                await websocket.send_text(event.message)

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        conv = websocket.query_params.get("conv_id", "")
        channel = f"{prefix}:{{{conv}}}:json"
        async with anyio.create_task_group() as task_group:

            async def run_receiver() -> None:
                await receiver(websocket)
                task_group.cancel_scope.cancel()

            task_group.start_soon(run_receiver)
            await sender(websocket, channel)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        try:
            yield
        finally:
            await broadcast.disconnect()

    return Starlette(routes=[Route("/healthz", healthz), WebSocketRoute("/ws", ws_endpoint)], lifespan=lifespan)


def main() -> None:
    args = peer_args(__doc__, 8002)
    uvicorn.run(create_app(args.redis_url, args.prefix), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", ws="websockets-sansio", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
