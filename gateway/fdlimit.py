"""Open-files headroom: the gateway answers 503 before it runs out of file descriptors.

Every websocket is a file descriptor. A gateway at the open-files limit cannot accept
anything: not /metrics, not a Redis reconnect (seen at about 20k sockets with
``ulimit -n 20000``). At start-up the soft limit is raised to the hard one, and
``--max-connections`` is lowered to leave :data:`RESERVED_FDS` for everything else
(Redis pools and pub/sub, scrapes, handshakes being refused).
"""

from __future__ import annotations

import logging

from gateway.settings import Settings

log = logging.getLogger("gateway")

RESERVED_FDS = 256
"""Descriptors kept out of ``--max-connections``: Redis, /metrics, health checks, handshakes in progress."""


def raise_open_files_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (when allowed); the soft limit now in force,
    None when unlimited or unknown (no ``resource`` module)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit above the kernel's nr_open
            log.debug("cannot raise the open-files limit from %d to %s: %s", soft, hard, exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int, open_files: int | None, reserved: int = RESERVED_FDS) -> int:
    """``max_connections`` lowered to fit ``open_files`` descriptors less ``reserved`` (at least 1);
    unchanged when ``open_files`` is None (unlimited)."""
    if open_files is None:
        return max_connections
    return max(1, min(max_connections, open_files - reserved))


def fit_open_files(settings: Settings) -> None:
    """Raise the open-files limit, then lower ``settings.max_connections`` to fit it (logged at WARNING)."""
    limit = raise_open_files_limit()
    cap = connection_cap(settings.max_connections, limit)
    if cap < settings.max_connections:
        log.warning("--max-connections %d lowered to %d: the open-files limit is %s and %d descriptors are kept "
                    "for Redis, /metrics and handshakes (raise the hard limit, e.g. ulimit -Hn or systemd "
                    "LimitNOFILE, to allow more)", settings.max_connections, cap, limit, RESERVED_FDS)
        settings.max_connections = cap
