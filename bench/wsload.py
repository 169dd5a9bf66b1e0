"""Load-generator process for the storm and many-sockets scenarios: resuming, seq-checking websocket clients.

    python bench/wsload.py

Standard library + orjson (uvloop when installed): it runs with the project's own
python, so the suite's smoke test needs nothing more. Each client follows one
conversation and checks its seqs: every event must be the previous seq + 1 (a
jump is a *gap*, a seq at or below the last one a *duplicate*). When its socket
drops, a client reconnects (optionally after a jittered backoff, see
:func:`backoff_delay`) and resumes with ``since=<last seq>&epoch=<epoch>``.

The websocket is a minimal RFC 6455 client on an ``asyncio.Protocol``: upgrade
request, unmasked server frames (fragments joined), pings answered with pongs, a
close answered and counted. Small per socket (a few hundred bytes of state), so a
process holds tens of thousands.

Driven by a harness over stdin / stdout, one JSON object per line each way:

* ``{"cmd": "connect", "host", "port", "clients": [[id, conv], ...], "source": "127.0.0.2" | null,
  "concurrency": 200, "backoff": {"mode": "none"|"full"|"equal", "initial": s, "max": s},
  "reconnect": true, "timeout": 30}`` -> ``{"ok", "failed", "errors", "seconds"}`` once every socket got
  its ``ws.subscribed`` or failed.
* ``{"cmd": "phase", "name": P}``: latency samples from now on go to phase ``P``.
* ``{"cmd": "victim", "gateway_id": G}``: clients now on gateway ``G`` form the group ``moved``
  (the others ``stay``); samples are kept per (phase, group).
* ``{"cmd": "counts"}`` -> ``{"counts": {"phase/group": events}, "recovered": moved followers recovered}``:
  cheap (no walk over the followers), for polling while load runs.
* ``{"cmd": "status"}`` -> ``{"open", "subscribed", "gateways", "lost", "reconnected",
  "recovered", "attempts", "closes", "events", "failed_handshakes"}``.
* ``{"cmd": "subscribers"}`` -> ``{conv: open subscribed sockets}``.
* ``{"cmd": "check", "final": {conv: seq}}`` -> ``{"complete", "incomplete", "gaps", "dups",
  "missing", "resets", "examples"}``: does each client end at its conversation's final seq?
* ``{"cmd": "report", "keys": [...] | null}`` -> ``{"latency": {"phase/group": bucket map}, "counts", "recovery": [...],
  "reconnect_delay": [...], "attempts": [...]}`` (times in seconds after the loss).
* ``{"cmd": "close"}`` -> ``{"closed"}``, then exit.

Event ``data`` carries ``t``, the publish time in wall-clock microseconds (``loadpub.py``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import resource
import struct
import sys
import time
from collections import Counter
from typing import Any, cast

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hist
from cmdloop import serve

_loads = orjson.loads
_now = time.time
_CONTROL = b'{"type":"ws.'


FIRST_CONNECT_ATTEMPTS = 5
"""Attempts of a client's first connect before the harness counts it as failed."""


def backoff_delay(mode: str, attempt: int, initial: float, maximum: float) -> float:
    """Seconds before reconnect attempt ``attempt`` (0 = the first after a loss).

    ``none``: 0. ``full`` (our Python client): uniform in ``[0, min(max, initial * 2**attempt)]``.
    ``equal`` (our JS client): ``base * (1 - 0.5 * random())`` for the same capped base.
    """
    if mode == "none":
        return 0.0
    base = min(maximum, initial * 2.0 ** min(attempt, 30))
    if mode == "equal":
        return base * (1 - 0.5 * random.random())
    return random.uniform(0, base)


class State:
    """Everything a process measures, shared by its clients."""

    def __init__(self) -> None:
        self.phase = "before"
        self.current: dict[str, Any] = {}
        self.victim: str | None = None
        self.samples: dict[str, Any] = {}
        self.closes: Counter[str] = Counter()
        self.failed_handshakes: Counter[str] = Counter()
        self.events = 0
        self.bad = 0
        self.recovered = 0
        self.reset_reasons: Counter[str] = Counter()

    def set_phase(self, phase: str) -> None:
        """Samples from now on go to ``phase`` (``self.current``: the arrays of this phase, by group)."""
        self.phase = phase
        for group in ("stay", "moved"):
            self.samples.setdefault(f"{phase}/{group}", hist.new_samples())
        self.current = {g: self.samples[f"{phase}/{g}"] for g in ("stay", "moved")}


STATE = State()
STATE.set_phase("before")


class Follower:
    """One logical client of one conversation; survives its sockets (see the module docstring)."""

    __slots__ = ("attempts", "conv", "dups", "epoch", "first_seq", "gap_events", "gaps", "gateway", "group",
                 "ident", "last_seq", "lost_at", "received", "reconnected_at", "recovered_at", "resets",
                 "subscribed", "target", "wire")

    def __init__(self, ident: int, conv: str) -> None:
        self.ident, self.conv = ident, conv
        self.epoch: str | None = None
        self.last_seq = -1  # -1: not subscribed yet
        self.first_seq = 0
        self.received = self.gaps = self.gap_events = self.dups = self.resets = 0
        self.gateway = ""
        self.group = "stay"
        self.subscribed = asyncio.Event()
        self.wire: Wire | None = None
        self.lost_at: float | None = None  # first loss (the storm's)
        self.reconnected_at: float | None = None
        self.recovered_at: float | None = None
        self.target = -1  # the seq in ws.subscribed after the reconnect: recovered once reached
        self.attempts = 0

    def query(self) -> str:
        q = f"conv_id={self.conv}"
        if self.last_seq >= 0 and self.epoch is not None:
            q += f"&since={self.last_seq}&epoch={self.epoch}"
        return q

    def on_object(self, line: bytes, now: float) -> None:
        if line.startswith(_CONTROL):
            obj = _loads(line)
            kind = obj["type"]
            if kind == "ws.hello":
                self.gateway = obj["gateway_id"]
                if STATE.victim is not None and self.lost_at is not None and self.reconnected_at is None:
                    self.reconnected_at = now
            elif kind == "ws.subscribed":
                self.epoch = obj["epoch"]
                if self.last_seq < 0:
                    self.last_seq = self.first_seq = obj["seq"]
                elif self.lost_at is not None and self.recovered_at is None:
                    self.target = obj["seq"]
                    if self.last_seq >= self.target:
                        self.recovered_at = now
                        STATE.recovered += 1
                self.subscribed.set()
                if self.wire is not None and not self.wire.ready.done():
                    self.wire.ready.set_result(None)
            elif kind == "ws.reset":
                self.resets += 1
                STATE.reset_reasons[str(obj.get("reason"))] += 1
                self.epoch = obj["epoch"]
                self.last_seq = obj["seq"]
            return
        try:
            obj = _loads(line)
            seq = obj["seq"]
            sent = obj["data"]["t"]
        except (ValueError, KeyError, TypeError):
            STATE.bad += 1
            return
        STATE.events += 1
        self.received += 1
        last = self.last_seq
        if seq <= last:
            self.dups += 1
            return
        if seq != last + 1 and last >= 0:
            self.gaps += 1
            self.gap_events += seq - last - 1
        self.last_seq = seq
        STATE.current[self.group].append(int(now * 1_000_000) - sent)
        if self.target >= 0 and self.recovered_at is None and seq >= self.target:
            self.recovered_at = now
            STATE.recovered += 1


class Wire(asyncio.Protocol):
    """One websocket of a :class:`Follower` (module docstring: the framing it handles)."""

    def __init__(self, follower: Follower, host: str, port: int, done: asyncio.Future[str | None]) -> None:
        self.follower, self.done = follower, done
        self.ready: asyncio.Future[None] = done.get_loop().create_future()
        """Set on this socket's ws.subscribed."""
        follower.wire = self
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = (f"GET /ws?{follower.query()} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        ).encode()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:end]).split(b" ", 2)[1].decode(errors="replace")
            data = bytes(self.buf[end + 4:])
            self.buf = bytearray()
            if status != "101":
                self._finish(f"HTTP {status}")
                return
            self.upgraded = True
        elif self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf = bytearray()
        self._frames(data)

    def _frames(self, buf: bytes) -> None:
        now = _now()
        pos, size = 0, len(buf)
        follower = self.follower
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = (buf[pos + 2] << 8) | buf[pos + 3], 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if b1 & 0x80:
                head += 4  # a masked server frame is a protocol error; skip the key rather than crash
            end = pos + head + length
            if end > size:
                break
            payload = buf[pos + head:end]
            pos = end
            if b0 == 0x81 and not self.fragments:  # the common case: one whole text frame
                if b"\n" in payload:
                    for line in payload.split(b"\n"):
                        if line:
                            follower.on_object(line, now)
                else:
                    follower.on_object(payload, now)
            else:
                self._frame(b0 & 0x0F, bool(b0 & 0x80), payload, now)
                if self.closed:
                    return
        if pos < size:
            self.buf = bytearray(buf[pos:])

    def _frame(self, opcode: int, fin: bool, payload: bytes, now: float) -> None:
        if opcode == 0x9:
            self._send(0xA, payload)
        elif opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            STATE.closes[str(code)] += 1
            self._send(0x8, payload[:2])
            self._finish(f"close {code}")
        elif opcode in (0x1, 0x2, 0x0):
            if not fin or self.fragments:
                self.fragments.append(payload)
                if not fin:
                    return
                payload, self.fragments = b"".join(self.fragments), []
            follower = self.follower
            for line in payload.split(b"\n"):
                if line:
                    follower.on_object(line, now)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def send_text(self, text: bytes) -> None:
        self._send(0x1, text)

    def _finish(self, why: str | None) -> None:
        if not self.closed:
            self.closed = True
            if not self.done.done():
                self.done.set_result(why)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            STATE.closes["eof"] += 1
        self._finish(f"lost: {exc}" if exc else "eof")

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._send(0x8, struct.pack("!H", 1000))
        self._finish(None)


class Driver:
    """The followers of this process and the tasks that keep them connected."""

    def __init__(self) -> None:
        self.followers: list[Follower] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.timeout = 30.0
        """Seconds an attempt may take from connect to ws.subscribed before it is abandoned (and retried)."""

    async def connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        host, port = msg["host"], msg["port"]
        source: str | None = msg.get("source")
        backoff = msg.get("backoff") or {"mode": "full", "initial": 0.1, "max": 5.0}
        reconnect = bool(msg.get("reconnect", True))
        self.timeout = float(msg.get("timeout", self.timeout))
        gate = asyncio.Semaphore(max(1, msg.get("concurrency", 200)))
        errors: Counter[str] = Counter()
        began = time.monotonic()
        fresh = [Follower(ident, conv) for ident, conv in msg["clients"]]
        self.followers += fresh

        async def first(follower: Follower) -> None:
            # A refused first connect (a gateway's 503 past --max-pending-handshakes, a full accept
            # queue) is retried with the backoff, as a real client does; only the last refusal counts.
            for attempt in range(FIRST_CONNECT_ATTEMPTS):
                async with gate:
                    why = await self._open(follower, host, port, source)
                if why is None:
                    break
                STATE.failed_handshakes[why[:80]] += 1
                if attempt + 1 < FIRST_CONNECT_ATTEMPTS:
                    await asyncio.sleep(backoff_delay(backoff["mode"], attempt, backoff["initial"], backoff["max"]))
            if why is not None:
                errors[why[:160]] += 1
                return
            task = asyncio.create_task(self._keep(follower, host, port, source, backoff, reconnect))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        await asyncio.gather(*(first(f) for f in fresh))
        failed = sum(errors.values())
        return {"ok": len(fresh) - failed, "failed": failed, "errors": dict(errors.most_common(5)),
                "seconds": round(time.monotonic() - began, 3)}

    async def _open(self, follower: Follower, host: str, port: int, source: str | None) -> str | None:
        """Open one socket for ``follower``; None once upgraded, else why not."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: Wire(follower, host, port, done), host, port,
                local_addr=(source, 0) if source else None), self.timeout)
        except (OSError, TimeoutError) as exc:
            return f"{exc.__class__.__name__}: {exc}"
        wire = follower.wire
        assert wire is not None
        try:
            pending: list[asyncio.Future[Any]] = [wire.ready, done]
            await asyncio.wait_for(asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED), self.timeout)
        except TimeoutError:
            wire.close()
            return f"no ws.subscribed within {self.timeout:g} s"
        if done.done():
            return done.result() or "closed"
        return None

    async def _keep(self, follower: Follower, host: str, port: int, source: str | None,
                    backoff: dict[str, Any], reconnect: bool) -> None:
        """Wait for the socket to drop; reconnect (resuming) with backoff, until the harness closes."""
        assert follower.wire is not None
        failures = 0
        while not self.stopping:
            await follower.wire.done
            if self.stopping or not reconnect:
                return
            if follower.lost_at is None:
                follower.lost_at = _now()
            while not self.stopping:
                await asyncio.sleep(backoff_delay(backoff["mode"], failures, backoff["initial"], backoff["max"]))
                follower.attempts += 1
                why = await self._open(follower, host, port, source)
                if why is None:
                    failures = 0
                    break
                STATE.failed_handshakes[why[:80]] += 1
                failures += 1

    def status(self) -> dict[str, Any]:
        fs = self.followers
        return {"open": sum(1 for f in fs if f.wire is not None and not f.wire.closed),
                "subscribed": sum(1 for f in fs if f.subscribed.is_set()),
                "gateways": dict(Counter(f.gateway for f in fs)),
                "lost": sum(1 for f in fs if f.lost_at is not None),
                "reconnected": sum(1 for f in fs if f.reconnected_at is not None),
                "recovered": sum(1 for f in fs if f.recovered_at is not None),
                "attempts": sum(f.attempts for f in fs), "closes": dict(STATE.closes),
                "failed_handshakes": dict(STATE.failed_handshakes.most_common(5)), "events": STATE.events,
                "reset_reasons": dict(STATE.reset_reasons),
                "bad": STATE.bad}

    def subscribers(self) -> dict[str, int]:
        """Open, subscribed followers per conversation."""
        return dict(Counter(f.conv for f in self.followers
                            if f.subscribed.is_set() and f.wire is not None and not f.wire.closed))

    def check(self, final: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {"complete": 0, "incomplete": 0, "gaps": 0, "gap_events": 0, "dups": 0,
                               "missing": 0, "resets": 0, "received": 0, "examples": []}
        for f in self.followers:
            want = final.get(f.conv, 0)
            behind = max(0, want - f.last_seq)
            ok = behind == 0 and f.gaps == 0 and f.dups == 0 and f.resets == 0 and f.last_seq == want
            out["complete" if ok else "incomplete"] += 1
            out["gaps"] += f.gaps
            out["gap_events"] += f.gap_events
            out["dups"] += f.dups
            out["missing"] += behind
            out["resets"] += f.resets
            out["received"] += f.received
            if not ok and len(out["examples"]) < 5:
                out["examples"].append({"id": f.ident, "conv": f.conv, "first": f.first_seq, "last": f.last_seq,
                                        "final": want, "gaps": f.gaps, "dups": f.dups, "resets": f.resets,
                                        "gateway": f.gateway, "lost": f.lost_at is not None})
        return out

    def report(self, keys: list[str] | None = None) -> dict[str, Any]:
        moved = [f for f in self.followers if f.lost_at is not None]
        return {"latency": {k: hist.buckets(v) for k, v in STATE.samples.items() if keys is None or k in keys},
                "counts": {k: len(v) for k, v in STATE.samples.items()},
                "recovery": [round(f.recovered_at - f.lost_at, 4) if f.recovered_at and f.lost_at else None
                             for f in moved],
                "reconnect_delay": [round(f.reconnected_at - f.lost_at, 4) if f.reconnected_at and f.lost_at
                                    else None for f in moved],
                "attempts": [f.attempts for f in moved],
                "lost_at": [f.lost_at for f in moved],
                "recovered_at": [f.recovered_at for f in moved]}

    def set_victim(self, gateway_id: str) -> int:
        STATE.victim = gateway_id
        n = 0
        for f in self.followers:
            f.group = "moved" if f.gateway == gateway_id else "stay"
            n += f.group == "moved"
        return n

    async def close(self) -> int:
        self.stopping = True
        for f in self.followers:
            if f.wire is not None:
                f.wire.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0.2)
        return len(self.followers)


async def main() -> None:
    driver = Driver()

    async def handle(msg: dict[str, Any]) -> dict[str, Any] | None:
        cmd = msg["cmd"]
        if cmd == "connect":
            return await driver.connect(msg)
        if cmd == "phase":
            STATE.set_phase(msg["name"])
            return {"phase": STATE.phase}
        if cmd == "victim":
            return {"moved": driver.set_victim(msg["gateway_id"])}
        if cmd == "counts":
            return {"counts": {k: len(v) for k, v in STATE.samples.items()}, "recovered": STATE.recovered}
        if cmd == "status":
            return driver.status()
        if cmd == "subscribers":
            return driver.subscribers()
        if cmd == "check":
            return driver.check(msg["final"])
        if cmd == "report":
            return driver.report(msg.get("keys"))
        if cmd == "close":
            return {"closed": await driver.close()}
        return None

    await serve({"hello": "wsload", "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, handle, last=("close",),
                dumps=lambda obj: orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), loads=orjson.loads)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


if __name__ == "__main__":
    raise_nofile()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the venv
        asyncio.run(main())
    else:
        uvloop.run(main())
