"""The ASGI application: ``create_app(settings)`` wires a :class:`Gateway` into FastAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from broadcaster.backend import Backend
from broadcaster.profiles import ProfileRegistry
from gateway.control_api import router as control_router
from gateway.http_api import ApiError, router
from gateway.settings import Settings
from gateway.sse import SSE_PATH, SseTransport, sse_endpoint
from gateway.state import Gateway
from gateway.ws_endpoint import websocket_endpoint

STATIC_DIR = Path(__file__).parent / "static"
WS_PATH = "/ws"


class GatewayApp(FastAPI):
    """FastAPI, except that websockets on ``/ws`` skip the middleware stack and router.

    An open websocket keeps its whole ASGI call chain alive for as long as it is open:
    a coroutine frame per middleware and router layer, FastAPI's exit stack, Starlette's
    exception wrappers. That is about 6 KB per idle socket (tracemalloc, BENCHMARKS.md)
    for layers ``/ws`` has no use for: CORS and the exception handlers serve HTTP only,
    and the endpoint checks origins and answers its own errors.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            scope["app"] = self
            await websocket_endpoint(WebSocket(scope, receive, send))
            return
        if scope["type"] == "http" and scope["path"] == SSE_PATH and scope["method"] == "GET":  # same reasons
            scope["app"] = self
            await sse_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, backend: Backend | None = None,
               profiles: ProfileRegistry | None = None) -> FastAPI:
    """Build the app; configuration errors (profiles, plugins) raise here, before serving."""
    settings = settings or Settings()
    gateway = Gateway(settings, backend=backend, profiles=profiles)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = GatewayApp(title="broadcaster gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway
    app.state.sse = SseTransport(gateway)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"error": "invalid", "message": str(exc.errors()[:3])}, status_code=422)

    app.include_router(router)
    app.include_router(control_router)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=True), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> Response:
            return FileResponse(STATIC_DIR / "index.html")

        @app.get("/client/broadcaster-client.js", include_in_schema=False)
        async def js_client() -> Response:
            return FileResponse(STATIC_DIR / "broadcaster-client.js", media_type="text/javascript")

    return app
