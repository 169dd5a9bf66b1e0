"""``python -m devtools.cluster``: a loopback cluster — Redis, N gateways and nginx — without Docker.

It runs the same pieces as ``docker-compose.yml``, as plain processes on 127.0.0.1, from a
checkout of the repository (a development tool: it is not in the installed distribution,
and it reads compose's own nginx configuration, so the two cannot drift):

* **Redis**: a ``redis-server`` of its own (free port, temp dir, append-only file on),
  unless ``--redis-url`` points at one (``redis://``, ``rediss://``, ``redis+cluster://`` or
  ``redis+sentinel://``; ``BROADCASTER_REDIS_URL`` is *not* consulted, so a run without
  ``--redis-url`` never touches a Redis you care about).
* **Gateways**: ``--gateways N`` (default 3) processes of
  ``python -m gateway.cli --host 127.0.0.1 --port P --redis-url URL --gateway-id gatewayI``
  on free ports, plus whatever gateway options follow ``--`` on the command line.
* **nginx**: *the* ``deploy/nginx/nginx.conf`` of compose, copied into a temp prefix next
  to a generated ``upstream.conf`` that lists the gateways' loopback ports, with its one
  ``listen 8080;`` line rewritten to ``--host``:``--port`` (default 127.0.0.1:8080). It runs
  unprivileged: ``nginx -p PREFIX/ -c PREFIX/nginx.conf -e stderr -g 'daemon off;'``.
  There is no fallback: without nginx the command fails and says how to install it.

Start-up waits for every gateway's ``/readyz`` and for nginx to answer, then prints the
URLs. SIGINT (Ctrl-C) or SIGTERM stops everything in order: SIGTERM to every gateway
(they drain: clients get 1012), nginx graceful quit, Redis shutdown (AOF flushed); then
the temp dirs are removed (``--keep-dir`` keeps them, logs included).

From Python (tests)::

    with LoopbackCluster(gateways=3) as cluster:   # port=None: a free port
        cluster.url, cluster.ws_url("conv_id=demo"), cluster.sse_url("conv_id=demo"), cluster.gateway_urls
        cluster.stop_gateway(1)                     # SIGTERM, wait for the drain
        cluster.stop_gateway(2, signal.SIGKILL)     # no drain
        cluster.start_gateway(1)                    # again, same port and id
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from devtools.procs import PRINT_LOCK, ProcessFailed, Supervised, free_port, http_status, port_is_free, redis_ping

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
"""Compose's load-balancer configuration, the one this cluster runs too."""

DEFAULT_PORT = 8080
UPSTREAM_NAME = "broadcaster_gateways"
"""The upstream block ``deploy/nginx/nginx.conf`` proxies to (it includes ``upstream.conf``)."""
_LISTEN_LINE = re.compile(r"^(\s*)listen 8080;", re.M)
_NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
_RESERVED_GATEWAY_OPTIONS = ("--host", "--port", "--redis-url")


class ClusterError(RuntimeError):
    """The loopback cluster cannot start (a missing program, a process that exited, a timeout)."""


def find_nginx(explicit: str | None = None) -> str:
    """The nginx binary: ``explicit``, else ``nginx`` on PATH, else the usual sbin paths; ClusterError if none."""
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise ClusterError(f"--nginx {explicit!r} is not an executable file")
    found = shutil.which("nginx") or next((p for p in _NGINX_CANDIDATES if os.access(p, os.X_OK)), None)
    if found is None:
        raise ClusterError("nginx is not installed (looked on PATH and in " + ", ".join(_NGINX_CANDIDATES) + "). "
                           "The loopback cluster runs the real load balancer of docker-compose and has no "
                           "fallback: install it (Debian/Ubuntu: apt-get install nginx; macOS: brew install "
                           "nginx) or pass --nginx PATH.")
    return found


def find_nginx_conf(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else compose's ``deploy/nginx/nginx.conf`` of this checkout; ClusterError if it is missing."""
    path = NGINX_CONF if explicit is None else Path(explicit)
    if not path.is_file():
        raise ClusterError(f"nginx configuration {str(path)!r} does not exist")
    return path


def render_nginx_prefix(prefix: Path, conf: Path, host: str, port: int, upstream_ports: Sequence[int]) -> Path:
    """Write PREFIX/nginx.conf (``conf`` with its listen line set to host:port) and PREFIX/upstream.conf."""
    text, count = _LISTEN_LINE.subn(rf"\g<1>listen {host}:{port};", conf.read_text())
    if count != 1:
        raise ClusterError(f"{conf} must contain exactly one 'listen 8080;' line to rewrite (found {count})")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(text)
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in upstream_ports)
    (prefix / "upstream.conf").write_text(
        "# Generated by devtools.cluster: the loopback gateways.\n"
        f"upstream {UPSTREAM_NAME} {{\n    least_conn;\n{servers}    keepalive 16;\n}}\n")
    return prefix / "nginx.conf"


class LoopbackCluster:
    """Redis (unless ``redis_url``), ``gateways`` gateway processes and nginx on loopback; see the module docstring.

    ``port``: the load balancer's port (None: a free one). ``gateway_args``: more
    ``broadcaster-gateway`` options for every gateway (not ``--host``, ``--port`` or
    ``--redis-url``). ``env``: extra environment of the gateways. ``echo``: copy every
    process's output to stdout, prefixed with its name (always kept in ``<dir>/*.log``).
    ``stop_timeout``: seconds a gateway may take to drain after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        gateways: int = 3,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        redis_url: str | None = None,
        gateway_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        nginx: str | None = None,
        nginx_conf: str | os.PathLike[str] | None = None,
        echo: bool = False,
        keep_dir: bool = False,
        ready_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        die_with_parent: bool = False,
    ) -> None:
        if gateways < 1:
            raise ValueError("gateways must be at least 1")
        for arg in gateway_args:
            if arg.split("=", 1)[0] in _RESERVED_GATEWAY_OPTIONS:
                raise ValueError(f"gateway option {arg.split('=', 1)[0]} is set by the cluster itself "
                                 "(use --port / --redis-url of devtools.cluster)")
        self.gateway_count = gateways
        self.port = port
        self.host = host
        self.external_redis_url = redis_url
        self.gateway_args = list(gateway_args)
        self.env = {**os.environ, **(env or {})}
        self.nginx_binary = nginx
        self.nginx_conf = nginx_conf
        self.echo = echo
        self.keep_dir = keep_dir
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        self.dir: Path | None = None
        self.redis: Supervised | None = None
        self.redis_port: int | None = None
        self.gateways: list[Supervised] = []
        self.gateway_ports: list[int] = []
        self.nginx: Supervised | None = None
        self._started = False

    # -- addresses --

    @property
    def redis_url(self) -> str:
        if self.external_redis_url:
            return self.external_redis_url
        if self.redis_port is None:
            raise RuntimeError("the cluster is not started")
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the load balancer."""
        if self.port is None:
            raise RuntimeError("the cluster is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def ws_url(self, query: str = "") -> str:
        """``ws://HOST:PORT/ws?query`` through the load balancer."""
        return "ws" + self.url[len("http"):] + "/ws" + (f"?{query}" if query else "")

    def sse_url(self, query: str = "") -> str:
        """``http://HOST:PORT/sse?query`` (Server-Sent Events) through the load balancer."""
        return self.url + "/sse" + (f"?{query}" if query else "")

    @property
    def gateway_urls(self) -> list[str]:
        """``http://127.0.0.1:P`` of every gateway, in order (direct, not through nginx)."""
        return [f"http://127.0.0.1:{p}" for p in self.gateway_ports]

    def gateway_id(self, index: int) -> str:
        """The ``--gateway-id`` given to gateway ``index`` (``gateway1``, ``gateway2``...)."""
        return f"gateway{index + 1}"

    # -- lifecycle --

    def start(self) -> LoopbackCluster:
        """Start Redis (if needed), the gateways and nginx; return once all are ready. ClusterError otherwise."""
        if self._started:
            return self
        nginx_binary = find_nginx(self.nginx_binary)  # fail before starting anything else
        conf = find_nginx_conf(self.nginx_conf)
        if self.external_redis_url is None and shutil.which("redis-server") is None:
            raise ClusterError("redis-server is not installed: install Redis 7+ or pass --redis-url")
        if self.port is not None and not port_is_free(self.host, self.port):
            raise ClusterError(f"{self.host}:{self.port} is in use: pick another --port (0: any free port)")
        self._started = True
        atexit.register(self.stop)  # a cluster left running (no `with`, no stop()) is stopped at interpreter exit
        self.dir = Path(tempfile.mkdtemp(prefix="broadcaster-cluster-"))
        try:
            if self.external_redis_url is None:
                self._start_redis()
            if self.port is None:
                self.port = free_port(self.host)
            self.gateway_ports = [free_port() for _ in range(self.gateway_count)]
            self.gateways = [self._gateway_child(i) for i in range(self.gateway_count)]
            for child in self.gateways:
                child.start()
            for i in range(self.gateway_count):
                self._wait_gateway_ready(i)
            self._start_nginx(nginx_binary, conf)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Gateways SIGTERM (drain, in parallel), nginx graceful quit, Redis shutdown; remove the temp dir."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        for child in self.gateways:
            child.send_signal(signal.SIGTERM)
        for child in self.gateways:
            if child.proc is not None:
                child.wait(self.stop_timeout)
        if self.nginx is not None:
            self._stop_nginx(self.nginx)
        if self.redis is not None:
            self.redis.stop(signal.SIGTERM, timeout=15)  # SIGTERM = SHUTDOWN: the AOF is flushed
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one gateway at a time --

    def stop_gateway(self, index: int, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send ``sig`` to gateway ``index`` (SIGTERM: it drains, clients get 1012; SIGKILL: it dies) and wait.

        Returns its exit status. nginx keeps the server line; new connections skip the dead
        port (``proxy_next_upstream error``) until ``start_gateway`` brings it back.
        """
        code = self.gateways[index].stop(sig, self.stop_timeout if timeout is None else timeout)
        assert code is not None
        return code

    def start_gateway(self, index: int) -> None:
        """Start gateway ``index`` again (same port, same id) and wait for its /readyz."""
        if self.gateways[index].running:
            raise RuntimeError(f"{self.gateway_id(index)} is running")
        self.gateways[index] = self._gateway_child(index).start()
        self._wait_gateway_ready(index)

    def logs(self, name: str) -> str:
        """The tail of one process's output: ``redis``, ``nginx`` or ``gateway1``..."""
        for child in [self.redis, self.nginx, *self.gateways]:
            if child is not None and child.name == name:
                return child.output()
        raise KeyError(name)

    def check_running(self) -> list[str]:
        """Names of the processes that have exited (empty while all run)."""
        return [c.name for c in [self.redis, self.nginx, *self.gateways] if c is not None and not c.running]

    # -- internals --

    def _child(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> Supervised:
        # Own process group: a Ctrl-C in the terminal reaches only the supervisor, which stops
        # the children in order (a gateway draining while nginx and Redis are still up).
        assert self.dir is not None
        return Supervised(name, command, self.dir / f"{name}.log", env=env, echo=self.echo, own_group=True,
                          die_with_parent=self.die_with_parent)

    def _wait(self, child: Supervised, check: Callable[[], bool], what: str, hint: str = "") -> None:
        """Poll ``check`` until true (ClusterError, with the log's tail, if ``child`` exits or the deadline passes)."""
        try:
            child.wait_until(check, self.ready_timeout, what=what)
        except ProcessFailed as exc:
            raise ClusterError(f"{exc}{hint}") from exc

    def _start_redis(self) -> None:
        assert self.dir is not None
        redis_dir = self.dir / "redis"
        redis_dir.mkdir()
        self.redis_port = free_port()
        command = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
                   "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                   "--protected-mode", "no", "--logfile", ""]
        self.redis = self._child("redis", command).start()
        port = self.redis_port
        self._wait(self.redis, lambda: redis_ping(port) == b"+PONG", "answering PING")

    def _gateway_child(self, index: int) -> Supervised:
        args = ["--host", "127.0.0.1", "--port", str(self.gateway_ports[index]), "--redis-url", self.redis_url]
        user_set_id = any(a.split("=", 1)[0] == "--gateway-id" for a in self.gateway_args) or self.env.get(
            "BROADCASTER_GATEWAY_ID")
        if not user_set_id:
            args += ["--gateway-id", self.gateway_id(index)]
        command = [sys.executable, "-m", "gateway.cli", *args, *self.gateway_args]
        return self._child(self.gateway_id(index), command, env=self.env)

    def _wait_gateway_ready(self, index: int) -> None:
        child = self.gateways[index]
        url = self.gateway_urls[index] + "/readyz"
        self._wait(child, lambda: http_status(url) == 200, f"ready ({url})")

    def _start_nginx(self, binary: str, conf: Path) -> None:
        assert self.dir is not None and self.port is not None
        prefix = self.dir / "nginx"
        rendered = render_nginx_prefix(prefix, conf, self.host, self.port, self.gateway_ports)
        command = [binary, "-p", f"{prefix}/", "-c", str(rendered), "-e", "stderr", "-g", "daemon off;"]
        self.nginx = self._child("nginx", command).start()
        url = self.url + "/nginx-healthz"
        self._wait(self.nginx, lambda: http_status(url) == 200, f"answering on {self.url}",
                   hint=f"\n(port {self.port} in use?)")

    def _stop_nginx(self, nginx: Supervised) -> None:
        # SIGQUIT: graceful (finish open requests); the gateways are gone, so their sockets are too.
        nginx.send_signal(signal.SIGQUIT)
        if nginx.proc is None:
            return
        try:
            nginx.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.send_signal(signal.SIGTERM)  # fast shutdown
        nginx.wait(10)


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.cluster",
        usage="python -m devtools.cluster [options] [-- gateway options...]",
        description="Run Redis, N broadcaster gateways and nginx (deploy/nginx/nginx.conf, as in docker-compose) "
                    "on loopback, without Docker. Options after `--` go to every gateway, e.g. "
                    "`-- --profiles deploy/k8s/base/profiles.toml --drain-seconds 3`. Ctrl-C stops everything.")
    parser.add_argument("--gateways", type=int, default=3, help="number of gateway processes (default 3)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port of the load balancer (default {DEFAULT_PORT}; 0: a free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address nginx listens on (default 127.0.0.1)")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis (redis://, rediss://, redis+cluster://, redis+sentinel://) instead of "
                             "starting one; "
                             "BROADCASTER_REDIS_URL is not consulted")
    parser.add_argument("--nginx", default=None, help="nginx binary (default: found on PATH or in /usr/sbin)")
    parser.add_argument("--nginx-conf", default=None, help="nginx.conf to use (default: deploy/nginx/nginx.conf)")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for each process")
    parser.add_argument("--keep-dir", action="store_true", help="keep the temp dir (logs, AOF, nginx prefix)")
    parser.add_argument("--quiet", action="store_true", help="do not copy the processes' output to stdout")
    return parser


def _banner(cluster: LoopbackCluster) -> str:
    redis = cluster.redis_url + ("" if cluster.external_redis_url else "  (started here, append-only file on)")
    lines = [
        "",
        f"loopback cluster ready: {cluster.gateway_count} gateway(s) behind nginx",
        f"  demo page    {cluster.url}/",
        f"  websocket    {cluster.ws_url('conv_id=demo')}",
        f"  sse          {cluster.sse_url('conv_id=demo')}   (curl -N)",
        f"  publish      curl -X POST {cluster.url}/v1/conversations/demo/events "
        "-H 'content-type: application/json' -d '{\"type\":\"chat.message\",\"data\":{\"text\":\"hi\"}}'",
        f"  redis        {redis}",
    ]
    for i, url in enumerate(cluster.gateway_urls):
        pid = cluster.gateways[i].pid
        lines.append(f"  {cluster.gateway_id(i):<12} {url}   pid {pid}  (direct: /readyz, /metrics)")
    lines += [f"  files        {cluster.dir}" + ("" if cluster.keep_dir else "  (removed on exit)"),
              "Ctrl-C (or SIGTERM) stops everything: gateways drain (1012), nginx quits, Redis shuts down.", ""]
    return "\n".join(lines)


def _raise_nofile_limit() -> None:
    """nginx.conf asks for 8192 connections per worker: lift the soft open-files limit (inherited) if we can."""
    with contextlib.suppress(Exception):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: Sequence[str] | None = None, *, on_ready: Callable[[LoopbackCluster], Any] | None = None) -> int:
    own, gateway_args = _split_argv(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(own)
    if args.gateways < 1:
        print("devtools.cluster: --gateways must be at least 1", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    try:
        cluster = LoopbackCluster(
            args.gateways, port=args.port or None, host=args.host, redis_url=args.redis_url,
            gateway_args=gateway_args, nginx=args.nginx, nginx_conf=args.nginx_conf, echo=not args.quiet,
            keep_dir=args.keep_dir, ready_timeout=args.ready_timeout, die_with_parent=True)
    except ValueError as exc:
        print(f"devtools.cluster: {exc}", file=sys.stderr)
        return 2
    _raise_nofile_limit()
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            cluster.start()
        except ClusterError as exc:
            print(f"devtools.cluster: {exc}", file=sys.stderr)
            return 1
        with PRINT_LOCK:
            print(_banner(cluster), flush=True)
        if on_ready is not None:
            on_ready(cluster)
        status = 0
        reported: set[str] = set()
        while not stop.wait(0.5):
            for name in cluster.check_running():
                if name in reported:
                    continue
                reported.add(name)
                if name in ("redis", "nginx"):
                    status = 1
                    stop.set()
                    with PRINT_LOCK:
                        print(f"devtools.cluster: {name} exited; stopping:\n{cluster.logs(name)[-2000:]}",
                              file=sys.stderr, flush=True)
                else:  # a gateway killed or drained by hand: the others carry on, as behind any load balancer
                    code = next(c.returncode for c in cluster.gateways if c.name == name)
                    with PRINT_LOCK:
                        print(f"devtools.cluster: {name} exited with status {code}; nginx sends its clients to the "
                              "others", file=sys.stderr, flush=True)
        with PRINT_LOCK:
            print("devtools.cluster: stopping (gateways drain, then nginx, then Redis)...", file=sys.stderr, flush=True)
        return status
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
