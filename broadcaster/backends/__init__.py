"""Backends behind :class:`broadcaster.backend.Backend`: ``memory`` and ``redis`` (also Redis Cluster)."""

from __future__ import annotations

from broadcaster.backend import Backend, BackendSettings


def backend_from_url(url: str | None, *, key_prefix: str = "bc", settings: BackendSettings | None = None) -> Backend:
    """``None`` or ``memory://``: the embedded backend; ``redis://``, ``rediss://``, ``redis+cluster://``: Redis."""
    if url is None or url in ("", "memory://"):
        from broadcaster.backends.memory import MemoryBackend

        return MemoryBackend(settings)
    if url.startswith(("redis://", "rediss://", "redis+cluster://", "unix://")):
        from broadcaster.backends.redis import RedisBackend

        return RedisBackend(url, key_prefix=key_prefix, settings=settings)
    raise ValueError(f"unsupported backend URL {url!r}: use redis://, rediss:// or redis+cluster://")
