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
from starlette.routing import WebSocketRoute

from broadcaster.backend import Backend
from broadcaster.profiles import ProfileRegistry
from gateway.http_api import ApiError, router
from gateway.settings import Settings
from gateway.state import Gateway
from gateway.ws_endpoint import websocket_endpoint

STATIC_DIR = Path(__file__).parent / "static"


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

    app = FastAPI(title="broadcaster gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway
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
    # A plain Starlette route: FastAPI's websocket route adds dependency solving and exit
    # stacks that cost ~4 KB per open socket and nothing we use.
    app.router.routes.append(WebSocketRoute("/ws", websocket_endpoint))

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=True), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> Response:
            return FileResponse(STATIC_DIR / "index.html")

        @app.get("/client/broadcaster-client.js", include_in_schema=False)
        async def js_client() -> Response:
            return FileResponse(STATIC_DIR / "broadcaster-client.js", media_type="text/javascript")

    return app
