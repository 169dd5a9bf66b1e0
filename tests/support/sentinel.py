"""A Redis Sentinel deployment owned by a test: one master, replicas, three sentinels, on free loopback ports.

* :class:`SentinelSetup` — ``start()`` launches the master, ``replicas`` replicas
  (``--replicaof`` the master) and ``sentinels`` ``redis-server --sentinel`` processes
  watching service ``mymaster`` (quorum 2, ``down-after-milliseconds`` 500,
  ``failover-timeout`` 2000: a SIGKILLed master is replaced in about 1-2 s) and waits
  until every sentinel knows every replica and the other sentinels. ``url`` is the
  ``redis+sentinel://`` URL; ``master()`` the server the sentinels name master now;
  ``wait_master_change(old)`` polls until a majority names another one; ``failover()``
  is ``SENTINEL FAILOVER``.

Every wait polls with a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import redis

from devtools.procs import HOST, Supervised, free_port, redis_ping
from tests.support.redis_server import RedisServer

SERVICE = "mymaster"


class SentinelProcess:
    """One ``redis-server --sentinel`` on a free port, with a config file of its own (sentinels rewrite it)."""

    def __init__(self, master_port: int, *, quorum: int, down_after_ms: int, failover_timeout_ms: int) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"sentinel-{self.port}-")
        self.config = os.path.join(self.dir, "sentinel.conf")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(f"port {self.port}\nbind {HOST}\nprotected-mode no\ndir {self.dir}\n"
                    f"logfile {os.path.join(self.dir, 'sentinel.log')}\n"
                    f"sentinel monitor {SERVICE} {HOST} {master_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
                    f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n")
        self.process: Supervised | None = None

    def start(self) -> SentinelProcess:
        self.process = Supervised(f"sentinel on port {self.port}", ["redis-server", self.config, "--sentinel"],
                                  os.path.join(self.dir, "sentinel.out")).start()
        self.process.wait_until(lambda: redis_ping(self.port) == b"+PONG", 15.0, interval=0.02)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int | None:
        try:
            with contextlib.closing(self.client()) as c:
                reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        except redis.RedisError:
            return None
        return int(reply[1]) if reply else None

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (see the module docstring)."""

    def __init__(self, *, replicas: int = 1, sentinels: int = 3, down_after_ms: int = 500,
                 failover_timeout_ms: int = 2000, extra_args: tuple[str, ...] = ()) -> None:
        self.servers = [RedisServer(extra_args=extra_args)]
        self.servers += [RedisServer(extra_args=(*extra_args, "--replicaof", HOST, str(self.servers[0].port)))
                         for _ in range(replicas)]
        self.sentinels = [SentinelProcess(self.servers[0].port, quorum=max(1, sentinels // 2 + 1),
                                          down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)
                          for _ in range(sentinels)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"{HOST}:{s.port}" for s in self.sentinels) + f"/{SERVICE}/0"

    def start(self) -> SentinelSetup:
        try:
            for server in self.servers:
                server.start()
            self.wait_replicas_online(len(self.servers) - 1, 20.0)
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_known(20.0)
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_replicas_online(self, count: int, timeout: float, master: RedisServer | None = None) -> None:
        """Poll INFO replication on the master until ``count`` replicas are online, at most 1 s behind."""
        server = master or self.servers[0]
        deadline = time.monotonic() + timeout
        info: dict[str, object] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError), contextlib.closing(server.client()) as c:
                info = c.info("replication")
                online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                          and v.get("state") == "online" and int(v.get("lag", 99)) <= 1]
                if len(online) >= count:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{count} replica(s) not online within {timeout}s: {info}")

    def wait_known(self, timeout: float) -> None:
        """Until every sentinel sees the replicas and the other sentinels (a failover needs the quorum)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            ok = True
            for sentinel in self.sentinels:
                try:
                    with contextlib.closing(sentinel.client()) as c:
                        master = c.execute_command("SENTINEL", "MASTER", SERVICE)
                except redis.RedisError as exc:
                    ok, last = False, exc
                    break
                fields = master if isinstance(master, dict) else dict(zip(master[::2], master[1::2], strict=True))
                last = fields
                if (int(fields["num-slaves"]) < len(self.servers) - 1
                        or int(fields["num-other-sentinels"]) < len(self.sentinels) - 1):
                    ok = False
                    break
            if ok:
                return
            time.sleep(0.05)
        raise RuntimeError(f"sentinels did not discover each other within {timeout}s: {last}")

    def master_port(self) -> int | None:
        """The port a majority of the sentinels name master (None without a majority)."""
        ports = [s.master_port() for s in self.sentinels]
        for port in set(ports):
            if port is not None and ports.count(port) > len(self.sentinels) // 2:
                return port
        return None

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def wait_master_change(self, old_port: int, timeout: float = 30.0) -> RedisServer:
        """Until a majority of sentinels names a master other than ``old_port`` and it says ROLE master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old_port:
                server = next(s for s in self.servers if s.port == port)
                with contextlib.suppress(redis.RedisError), contextlib.closing(server.client()) as c:
                    if c.execute_command("ROLE")[0] == b"master":
                        return server
            time.sleep(0.05)
        raise RuntimeError(f"no new master within {timeout}s (sentinels: {[s.master_port() for s in self.sentinels]})")

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """``SENTINEL FAILOVER`` (a replica promoted, the old master made its replica); the new master.

        Asked again every few seconds until the master changed: a sentinel refuses
        (``-INPROG``, ``-NOGOODSLAVE``) or gives up a failover too soon after another one.
        """
        old = self.master_port()
        assert old is not None, "no master to fail over from"
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.closing(self.sentinels[0].client()) as c:
                try:
                    c.execute_command("SENTINEL", "FAILOVER", SERVICE)
                except redis.RedisError as exc:
                    errors.append(str(exc))
            with contextlib.suppress(RuntimeError):
                return self.wait_master_change(old, min(5.0, max(0.1, deadline - time.monotonic())))
        raise RuntimeError(f"SENTINEL FAILOVER did not change the master within {timeout}s: {errors[-3:]}")

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        for server in self.servers:
            server.cleanup()

    def __enter__(self) -> SentinelSetup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
