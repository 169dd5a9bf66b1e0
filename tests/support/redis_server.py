"""Real Redis servers owned by a test: restartable, killable, countable.

* :class:`RedisServer` — one ``redis-server`` on a free loopback port, in a temp dir:
  ``start()`` (waits until PING answers, fails loudly with the server log if it
  cannot), ``kill()`` (SIGKILL), ``restart()`` (same port, same dir: with
  ``appendonly=True`` the data survives), ``stop()``, ``cleanup()``; ``client()`` for
  a blocking redis-py client, ``command_calls("subscribe")`` from INFO commandstats.
* :class:`RedisClusterNodes` — three (or more) ``--cluster-enabled`` masters joined with
  ``redis-cli --cluster create``; ``url`` is the ``redis+cluster://`` URL.

(To make a link to a server silent or cut it, put :class:`tests.support.tcp_proxy.TcpProxy`
in front of it.)

Every wait polls with a deadline; nothing sleeps blindly. Use them as context
managers (``with RedisServer() as server:``) or call ``cleanup()`` in a finally.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import redis

from devtools.procs import HOST, Supervised, free_port, redis_ping

__all__ = ["HOST", "RedisClusterNodes", "RedisServer", "free_port"]


class RedisServer:
    """One ``redis-server`` process of its own (see the module docstring).

    ``appendonly``: persist every write to an AOF in the server's dir, so a SIGKILL
    + ``restart()`` keeps the data. ``cluster``: start with ``--cluster-enabled yes``.
    ``extra_args``: more ``redis-server`` arguments, e.g. ``("--maxmemory", "10mb")``.
    """

    def __init__(self, *, port: int | None = None, appendonly: bool = False, cluster: bool = False,
                 extra_args: Sequence[str] = (), startup_timeout: float = 15.0) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH: these tests need a real Redis")
        self.port = port or free_port(with_bus=cluster)
        self.appendonly = appendonly
        self.cluster = cluster
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-")
        self.logfile = os.path.join(self.dir, "redis.log")
        self.process: Supervised | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command_line(self) -> list[str]:
        args = ["redis-server", "--port", str(self.port), "--bind", HOST, "--dir", self.dir,
                "--logfile", self.logfile, "--daemonize", "no", "--save", "", "--protected-mode", "no",
                "--appendonly", "yes" if self.appendonly else "no", "--enable-debug-command", "local"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "3000"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; raise RuntimeError with its log otherwise."""
        if self.running:
            return self
        # stdout and stderr (what it says before its --logfile is open) go to a file of their own.
        self.process = Supervised(f"redis-server on port {self.port}", self.command_line(),
                                  os.path.join(self.dir, "redis.out")).start()
        self.wait_ready(self.startup_timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll PING until ``+PONG`` (not ``-LOADING``) from our process; RuntimeError if it dies or at the deadline."""
        assert self.process is not None, "start() first"
        pid = self.process.pid
        last = [b""]

        def answers() -> bool:
            last[0] = redis_ping(self.port)
            return last[0] == b"+PONG" and self._answering_pid() == pid

        self.process.wait_until(answers, timeout, interval=0.02,
                                details=lambda: f"(last reply {last[0]!r})\n{self.log_tail()}")

    def _answering_pid(self) -> int | None:
        """The process id of the server answering on our port (another one may hold the port)."""
        try:
            with contextlib.closing(self.client(socket_timeout=1)) as c:
                return int(c.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def kill(self) -> None:
        """SIGKILL the server (no save, no goodbye to clients) and reap it."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        """SIGTERM the server and wait; SIGKILL if it does not exit within 10 s."""
        if self.process is not None:
            self.process.stop(signal.SIGTERM, timeout=10)

    def restart(self) -> RedisServer:
        """Start again on the same port and dir (after ``kill()`` or ``stop()``)."""
        self.kill()
        self.process = None
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "(no log)"

    def client(self, **options: Any) -> redis.Redis:
        """A blocking redis-py client on this server (the caller closes it)."""
        options.setdefault("socket_timeout", 5)
        return redis.Redis(host=HOST, port=self.port, **options)

    def cli(self, *args: str) -> str:
        """Run ``redis-cli -p <port> args...`` and return its stdout (raises on a non-zero exit)."""
        out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=30, check=True)
        return out.stdout

    def command_calls(self, command: str) -> int:
        """How many times ``command`` ran on this server since start (INFO commandstats; 0 if never)."""
        with contextlib.closing(self.client()) as c:
            stats = c.info("commandstats")
        entry = stats.get(f"cmdstat_{command.lower()}")
        return int(entry["calls"]) if entry else 0

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisClusterNodes:
    """A Redis Cluster of ``masters`` master nodes, no replicas, on free loopback ports.

    ``start()`` launches the nodes, runs ``redis-cli --cluster create ... --cluster-replicas 0
    --cluster-yes`` and waits until every node reports ``cluster_state:ok``.
    """

    def __init__(self, masters: int = 3, startup_timeout: float = 30.0) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not on PATH: the cluster tests need it")
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def start(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           capture_output=True, text=True, timeout=60, check=True)
            self.wait_ok(self.startup_timeout)
        except subprocess.CalledProcessError as exc:
            self.cleanup()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{exc.stdout}\n{exc.stderr}") from exc
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_ok(self, timeout: float) -> None:
        """Poll CLUSTER INFO on every node until all say ``cluster_state:ok`` and know every slot."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                try:
                    with contextlib.closing(node.client(socket_timeout=2)) as c:
                        info = c.cluster("INFO")
                except redis.RedisError as exc:
                    states.append(repr(exc))
                    continue
                ok = info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384
                states.append("ok" if ok else f"{node.address}: {info.get('cluster_state')}")
            if all(s == "ok" for s in states):
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok within {timeout}s: {states}")

    def node_for_slot(self, slot: int) -> RedisServer:
        """The node serving ``slot``."""
        with contextlib.closing(self.nodes[0].client()) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
