"""The gateway: FastAPI app, connection pool, HTTP API and CLI over the ``broadcaster`` core."""
