"""How long a gateway's event loop stalls: ``GET /healthz`` over kept-alive connections, every few ms.

``/healthz`` does no work, so its round trip on loopback is the time the request waited for
the gateway's event loop: a round trip of 2 s means the loop ran something else for ~2 s.
The probe runs in a thread of its own with blocking sockets, so the harness's own event
loop (parsing big answers of the load clients) cannot stretch the numbers. Under
``--workers`` each connection lands on one worker (SO_REUSEPORT): :func:`owner_pid` says which.

Standard library only.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from pathlib import Path
from typing import Any

SLOW_MS = 100.0
"""A round trip above this counts as a stall."""


class LagProbe:
    """``connections`` kept-alive probes of ``127.0.0.1:port``, one request each every ``interval`` s."""

    def __init__(self, port: int, connections: int = 1, interval: float = 0.05) -> None:
        self.port, self.interval = port, interval
        self.conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(connections)]
        self.phase = "start"
        self.began = time.monotonic()
        self.began_wall = time.time()
        self.samples: list[tuple[str, int, float, float]] = []  # (phase, connection, seconds since start, rtt ms)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lagprobe", daemon=True)

    def start(self) -> LagProbe:
        for conn in self.conns:
            conn.connect()
        self._thread.start()
        return self

    def local_ports(self) -> list[int]:
        return [conn.sock.getsockname()[1] if conn.sock else 0 for conn in self.conns]

    def _one(self, conn: http.client.HTTPConnection) -> float:
        t0 = time.monotonic()
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        return 1000 * (time.monotonic() - t0)

    def _run(self) -> None:
        while not self._stop.is_set():
            for index, conn in enumerate(self.conns):
                at = time.monotonic() - self.began
                try:
                    rtt = self._one(conn)
                except (OSError, http.client.HTTPException):
                    self.errors += 1
                    conn.close()  # reconnects on the next request
                    continue
                self.samples.append((self.phase, index, at, rtt))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=35)
        for conn in self.conns:
            conn.close()

    def summary(self, phase: str | None = None, connections: list[int] | None = None) -> dict[str, Any]:
        """Max / p99 round trip (ms), stalls over :data:`SLOW_MS`, and the five longest with their time;
        of one phase and some connections (default: all)."""
        rows = [s for s in self.samples if (phase is None or s[0] == phase)
                and (connections is None or s[1] in connections)]
        rtts = sorted(s[3] for s in rows)
        worst = sorted(rows, key=lambda s: -s[3])[:5]
        return {"samples": len(rtts), "errors": self.errors if phase is None and connections is None else None,
                "max_ms": round(rtts[-1], 1) if rtts else None,
                "p99_ms": round(rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))], 1) if rtts else None,
                "stalls_over_100ms": sum(r > SLOW_MS for r in rtts),
                "stalls_over_1s": sum(r > 1000 for r in rtts),
                "longest": [{"phase": p, "connection": c, "at_s": round(t, 1), "ms": round(r, 1),
                             "at": time.strftime("%H:%M:%S", time.localtime(self.began_wall + t))}
                            for p, c, t, r in worst]}


def owner_pid(local_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of our connection from ``local_port`` (Linux /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == local_port and fields[3] == "01":  # ESTABLISHED, the server's end
                inode = fields[9]
                break
        if inode:
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None
