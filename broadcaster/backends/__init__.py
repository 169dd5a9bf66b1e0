"""Backends behind :class:`broadcaster.backend.Backend`: ``memory`` and ``redis`` (also Redis Cluster)."""

from __future__ import annotations

from broadcaster.backend import Backend, BackendSettings

REDIS_URL_PREFIXES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://",
                      "rediss+sentinel://", "unix://")


def backend_from_url(
    url: str | None, *, key_prefix: str = "bc", settings: BackendSettings | None = None,
    probe_interval: float = 5.0, probe_timeout: float = 2.0, wait_replicas: int = 0, wait_timeout_ms: int = 1000,
) -> Backend:
    """``None`` or ``memory://``: the embedded backend; ``redis://``, ``rediss://``, ``redis+cluster://``,
    ``rediss+cluster://``, ``redis+sentinel://``, ``rediss+sentinel://``: Redis (``probe_*``: its idle pub/sub
    probe, see RedisBackend; ``wait_*``: WAIT after each publish, see broadcaster.backends.redis.replication)."""
    if url is None or url in ("", "memory://"):
        from broadcaster.backends.memory import MemoryBackend

        return MemoryBackend(settings)
    if url.startswith(REDIS_URL_PREFIXES):
        from broadcaster.backends.redis import RedisBackend

        return RedisBackend(url, key_prefix=key_prefix, settings=settings, probe_interval=probe_interval,
                            probe_timeout=probe_timeout, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
    raise ValueError(f"unsupported backend URL {url!r}: use redis://, rediss://, redis+cluster://, rediss+cluster://, "
                     "redis+sentinel:// or rediss+sentinel://")
