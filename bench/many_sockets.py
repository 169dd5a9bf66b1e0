"""Many idle websockets on one gateway (one process, or ``--workers N``): accept rate, memory per socket,
idle CPU, event-loop stalls, fan-out at that size.

    python bench/many_sockets.py --workers 3           # 50,000 sockets / 5,000 convs over 3 worker processes
    python bench/many_sockets.py --sockets 18000 --convs 1800 --rates 1000,2000   # one process
    python bench/many_sockets.py --smoke               # 1,000 sockets (tests/test_bench_scenarios_smoke.py)
    python bench/many_sockets.py --smoke --workers 2   # the same over 2 workers (same test file)

Run it with the project's python (``.venv/bin/python``); it needs redis-server on PATH.
A private ``redis-server`` and one gateway (``python -m gateway.cli``, ``--ping-interval``,
``--max-connections`` above the target, ``--workers``); the open-files limit is raised to the
hard limit here, which the gateway and the clients inherit. The limit is per process: where the
hard limit is below the target (20,000 on some VMs), ``--workers`` spreads the sockets over
several processes on the same port (SO_REUSEPORT). Memory, CPU and open files of the gateway are
the sums over the supervisor and its workers; how the sockets spread is in ``per_worker``.
Loopback has one ephemeral port range per (source address, destination): each
``bench/wsload.py`` client process binds its sockets to its own source address
``127.0.0.2``, ``127.0.0.3``... (all of 127/8 is local on Linux).

1. **Ramp**: sockets are opened in waves of ``--wave`` (each socket counts once it got its
   ``ws.subscribed``): connections/s per wave, the gateway's RSS and open files after each.
   The ramp stops at the first wave with failures (what failed is in the JSON).
2. **Idle**: ``--idle-seconds`` with nothing published: the gateway's CPU (pings every
   ``--ping-interval`` s, answered by the clients; presence heartbeats) and closes, if any.
3. **Fan-out**: a paced publisher (``bench/loadpub.py``) over every conversation at each of
   ``--rates`` events/s for ``--step-seconds``: deliveries/s, lost, p50/p99, gateway CPU. A step
   passes with nothing lost and p99 < 100 ms; the ladder stops after two failures.
4. **Check**: every socket ends at its conversation's last seq, no gap, no duplicate.

Throughout, a probe thread (``bench/lagprobe.py``) asks ``/healthz`` every 50 ms over kept-alive
connections (several per worker): its round trips are how long each worker's event loop stalled
(``loop_lag``: max / p99 / stalls over 100 ms and 1 s per phase, the five longest, and per worker).

Results: a JSON file and a markdown summary (``--json`` / ``--markdown``; printed too).
Exit status 1 when a socket failed to connect or missed / duplicated an event.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lagprobe import LagProbe, owner_pid
from scenario_support import (
    BENCH,
    ROOT,
    Child,
    ProcGroup,
    children_of,
    cpu_seconds,
    drain,
    fd_count,
    finish_all,
    gather_calls,
    latency,
    log,
    machine,
    merge_checks,
    private_redis,
    raise_nofile,
    renice,
    rss_bytes,
    table,
    write_outputs,
)

from devtools.procs import Supervised, free_port, http_status
from gateway.workers import current_slot

P99_LIMIT_MS = 100.0


def metrics_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def gateway_waits(port: int) -> dict[str, float]:
    """Sums and counts of the gateway's publish-to-dispatch and queue-wait histograms (its /metrics),
    summed over labels (``worker`` under ``--workers``)."""
    out: dict[str, float] = {}
    for line in metrics_text(port).splitlines():
        sample, _, value = line.rpartition(" ")
        name = sample.split("{", 1)[0]
        if name.startswith(("broadcaster_publish_to_dispatch_seconds_", "broadcaster_queue_wait_seconds_")) and \
                name.endswith(("_sum", "_count")):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def workers_up(port: int) -> int:
    """How many ``--workers`` workers answered the merged /metrics scrape."""
    return sum(line.startswith("broadcaster_worker_up{") and line.endswith(" 1.0")
               for line in metrics_text(port).splitlines())


def mean_ms(before: dict[str, float], after: dict[str, float], family: str) -> float | None:
    count = after.get(f"{family}_count", 0.0) - before.get(f"{family}_count", 0.0)
    total = after.get(f"{family}_sum", 0.0) - before.get(f"{family}_sum", 0.0)
    return round(1000 * total / count, 2) if count > 0 else None


def worker_index(pid: int) -> int | None:
    """The ``--workers`` slot of a worker process (from the environment its supervisor gave it), None if none."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    slot = current_slot(dict(item.partition("=")[::2] for item in items if "=" in item))
    return None if slot is None else slot.index


def open_files_limit(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


async def run(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with private_redis(logdir) as (redis_url, redis_pid):
        port = free_port()
        prefix = f"many{os.getpid()}"
        argv = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port", str(port), "--redis-url",
                redis_url, "--key-prefix", prefix, "--log-level", "warning", "--drain-seconds", "0",
                "--history-size", "100", "--history-ttl", "600", "--ping-interval", str(args.ping_interval),
                "--max-connections", str(args.sockets + 1000), "--gateway-id", "many-0"]
        if args.workers > 1:
            argv += ["--workers", str(args.workers)]
        gateway = Supervised("gateway", argv, logdir / "gateway.log", cwd=ROOT).start()
        try:
            gateway.wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 30,
                               what="ready")
            workers = [gateway.pid]
            if args.workers > 1:
                gateway.wait_until(lambda: workers_up(port) == args.workers, 60, what="every worker up")
                workers = children_of(gateway.pid)
            group = ProcGroup(sorted({gateway.pid, *workers}))
            results["gateway_pids"] = {"supervisor": gateway.pid if args.workers > 1 else None, "workers": workers}
            results["gateway_open_files_limit"] = open_files_limit(workers[0])
            probe = LagProbe(port, connections=1 if args.workers == 1 else 4 * args.workers).start()
            owners = [owner_pid(p, workers) if args.workers > 1 else workers[0] for p in probe.local_ports()]
            try:
                results.update(await _measure(args, logdir, redis_url, redis_pid, group, workers, port, prefix,
                                              probe))
            finally:
                probe.stop()
                results["loop_lag"] = lag = {phase: probe.summary(phase) for phase in LAG_PHASES}
                lag["all"] = probe.summary()
                lag["per_worker"] = {str(pid): probe.summary(connections=[i for i, o in enumerate(owners) if o == pid])
                                     for pid in workers}
        finally:
            gateway.stop(timeout=15)
            results["gateway_log_tail"] = gateway.output(3000).splitlines()[-15:]
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results


LAG_PHASES = ("ramp", "idle", "fanout", "check", "close")


async def _measure(args: argparse.Namespace, logdir: Path, redis_url: str, redis_pid: int, gateway: ProcGroup,
                   workers: list[int], port: int, prefix: str, probe: LagProbe) -> dict[str, Any]:
    py = sys.executable
    convs = [f"m{i}" for i in range(args.convs)]
    procs = args.client_procs or max(1, math.ceil(args.sockets / args.per_proc))
    clients = [await Child(f"clients-{i}", [py, str(BENCH / "wsload.py")], logdir / f"clients-{i}.log").start()
               for i in range(procs)]
    publisher = await Child("publisher", [py, str(BENCH / "loadpub.py")], logdir / "publisher.log").start()
    out: dict[str, Any] = {"client_procs": procs, "client_nofile": clients[0].hello.get("nofile")}
    if args.nice:
        for pid in (*gateway.pids, redis_pid, publisher.pid, *(c.pid for c in clients)):
            renice(pid, args.nice)
    try:
        await publisher.call({"cmd": "init", "url": redis_url, "prefix": prefix, "convs": convs,
                              "history_size": 100, "history_ttl": 600, "payload_bytes": 100, "json_copy": False})
        rss0, fds0 = gateway.rss(), gateway.fds()
        rss0_each = {pid: rss_bytes(pid) for pid in workers}
        out["gateway_before"] = {"rss_mb": round(rss0 / 2**20, 1), "open_files": fds0}
        waves: list[dict[str, Any]] = []
        connected = 0
        next_id = 0
        ramp_began = time.monotonic()
        probe.phase = "ramp"
        while next_id < args.sockets:
            size = min(args.wave, args.sockets - next_id)
            batches: list[list[tuple[int, str]]] = [[] for _ in clients]
            for i in range(next_id, next_id + size):
                batches[i % procs].append((i, convs[i % args.convs]))
            next_id += size
            cpu0, t0 = gateway.cpu(), time.monotonic()
            replies = await asyncio.gather(*(
                c.call({"cmd": "connect", "host": "127.0.0.1", "port": port, "clients": b, "reconnect": False,
                        "source": f"127.0.0.{2 + k}", "concurrency": args.concurrency}, timeout=600)
                for k, (c, b) in enumerate(zip(clients, batches, strict=True)) if b))
            seconds = time.monotonic() - t0
            ok = sum(r["ok"] for r in replies)
            failed = sum(r["failed"] for r in replies)
            connected += ok
            wave = {"sockets": connected, "ok": ok, "failed": failed, "seconds": round(seconds, 2),
                    "per_s": round(ok / seconds) if seconds else None,
                    "gateway_cpu_pct": round(100 * (gateway.cpu() - cpu0) / seconds, 1) if seconds else None,
                    "rss_mb": round(gateway.rss() / 2**20, 1), "open_files": gateway.fds(),
                    "open_files_per_worker": [fd_count(pid) for pid in workers],
                    "errors": [r["errors"] for r in replies if r["failed"]]}
            waves.append(wave)
            log(f"ramp: {connected:,} sockets ({ok:,} in {seconds:.1f}s, {failed} failed), "
                f"gateway RSS {wave['rss_mb']} MiB, {wave['open_files']} files")
            if failed:
                break
        ramp_s = time.monotonic() - ramp_began
        rss1 = gateway.rss()
        out.update(ramp=waves, connected=connected, target=args.sockets, ramp_seconds=round(ramp_s, 1),
                   accept_per_s=round(connected / ramp_s) if ramp_s else None,
                   gateway_after_ramp={"rss_mb": round(rss1 / 2**20, 1), "open_files": gateway.fds(),
                                       "kib_per_socket": round((rss1 - rss0) / 1024 / max(1, connected), 2)})
        spread: dict[str, int] = {}
        for status in await gather_calls(clients, {"cmd": "status"}):
            for gid, n in status["gateways"].items():
                spread[gid] = spread.get(gid, 0) + n
        out["sockets_per_gateway_id"] = dict(sorted(spread.items()))
        out["per_worker"] = []
        for pid in workers:
            index = worker_index(pid)
            gid = "many-0" if index is None else f"many-0-w{index}"
            n = spread.get(gid, 0)
            out["per_worker"].append({"pid": pid, "index": index, "gateway_id": gid, "sockets": n,
                                      "rss_mb": round(rss_bytes(pid) / 2**20, 1), "open_files": fd_count(pid),
                                      "kib_per_socket": round((rss_bytes(pid) - rss0_each[pid]) / 1024 / max(1, n), 2)})
        # idle
        await asyncio.sleep(1.0)
        probe.phase = "idle"
        cpu0, rcpu0, t0 = gateway.cpu(), cpu_seconds(redis_pid), time.monotonic()
        closes0 = sum(sum(s["closes"].values()) for s in await gather_calls(clients, {"cmd": "status"}))
        await asyncio.sleep(args.idle_seconds)
        wall = time.monotonic() - t0
        statuses = await gather_calls(clients, {"cmd": "status"})
        out["idle"] = {"seconds": round(wall, 1), "gateway_cpu_pct": round(100 * (gateway.cpu() - cpu0) / wall, 2),
                       "redis_cpu_pct": round(100 * (cpu_seconds(redis_pid) - rcpu0) / wall, 2),
                       "closes": sum(sum(s["closes"].values()) for s in statuses) - closes0,
                       "open": sum(s["open"] for s in statuses), "rss_mb": round(gateway.rss() / 2**20, 1)}
        log(f"idle: gateway {out['idle']['gateway_cpu_pct']}% of a core over {wall:.0f}s, "
            f"{out['idle']['open']} open")
        # fan-out
        probe.phase = "fanout"
        subs: dict[str, int] = {}
        for reply in await gather_calls(clients, {"cmd": "subscribers"}):
            for conv, n in reply.items():
                subs[conv] = subs.get(conv, 0) + n
        totals = [0] * len(convs)
        steps: list[dict[str, Any]] = []
        failures = 0
        for index, rate in enumerate(args.rates, start=1):
            phase = f"step{index}"
            await gather_calls(clients, {"cmd": "phase", "name": phase})
            cpu0, t0, waits0 = gateway.cpu(), time.monotonic(), gateway_waits(port)
            published = await publisher.call({"cmd": "run", "step": index, "rate": rate,
                                              "duration": args.step_seconds}, timeout=args.step_seconds + 120)
            expected = sum(n * subs.get(c, 0) for c, n in zip(convs, published["per_conv"], strict=True))
            for i, n in enumerate(published["per_conv"]):
                totals[i] += n

            async def stayed(phase: str = phase) -> int:
                counts = await gather_calls(clients, {"cmd": "counts"})
                return sum(r["counts"].get(f"{phase}/stay", 0) for r in counts)

            got = await drain(stayed, expected, limit=20, interval=0.2)
            wall = time.monotonic() - t0
            reports = await gather_calls(clients, {"cmd": "report", "keys": [f"{phase}/stay"]})
            lat = latency([r["latency"] for r in reports], f"{phase}/stay")
            step = {"events_per_s": rate, "target_dps": round(rate * connected / args.convs),
                    "dps": round(got / published["elapsed"]) if published["elapsed"] else None,
                    "expected": expected, "received": got, "lost": expected - got,
                    "gateway_cpu_pct": round(100 * (gateway.cpu() - cpu0) / wall, 1),
                    "publisher_behind_ms": published["behind_ms"], **lat}
            waits1 = gateway_waits(port)
            step["gateway_dispatch_mean_ms"] = mean_ms(waits0, waits1, "broadcaster_publish_to_dispatch_seconds")
            step["gateway_queue_wait_mean_ms"] = mean_ms(waits0, waits1, "broadcaster_queue_wait_seconds")
            step["pass"] = step["lost"] == 0 and lat["p99_ms"] < P99_LIMIT_MS
            steps.append(step)
            log(f"fan-out {rate:,} events/s ({step['target_dps']:,} d/s): lost {step['lost']}, "
                f"p99 {lat['p99_ms']} ms, gateway {step['gateway_cpu_pct']}%")
            if not step["pass"]:
                failures += 1
                if failures >= 2:
                    break
        passing = [s for s in steps if s["pass"]]
        out.update(fanout=steps, capacity_dps=max((s["dps"] for s in passing), default=None),
                   capacity_events_per_s=max((s["events_per_s"] for s in passing), default=None))
        probe.phase = "check"
        final = {c: totals[i] for i, c in enumerate(convs)}
        checks = await gather_calls(clients, {"cmd": "check", "final": final})
        check = merge_checks(checks, ("complete", "incomplete", "gaps", "dups", "missing", "resets"))
        reasons: dict[str, int] = {}
        for status in await gather_calls(clients, {"cmd": "status"}):
            for reason, n in status["reset_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        check["reset_reasons"] = reasons
        out["check"] = check
        out["ok"] = connected == args.sockets and check["incomplete"] == 0 and bool(steps)
    finally:
        probe.phase = "close"  # every socket closed at once: a stall of its own
        await finish_all(clients, publisher, close_timeout=60)
    return out


def markdown(r: dict[str, Any]) -> str:
    m, la = r["machine"], r["machine"]["loadavg_start"]
    where = "one gateway process" if r["args"]["workers"] == 1 else f"one gateway of {r['args']['workers']} workers"
    lines = [f"Many sockets on {where}: {m['nproc']} cores, Python {m['python']}, load average "
             f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} at start, {r['loadavg_end'][0]:.2f} at end; open-files limit "
             f"{m['nofile']} (gateway: {r.get('gateway_open_files_limit')}); {r['started']} - {r['finished']}.", ""]
    after = r.get("gateway_after_ramp", {})
    idle = r.get("idle", {})
    lines += table([("sockets connected / target", "convs", "client procs", "accept rate (sockets/s)",
                     "gateway RSS MiB before / after", "KiB per socket", "idle gateway CPU %", "idle closes"),
                    (f"{r.get('connected', 0):,} / {r['args']['sockets']:,}", f"{r['args']['convs']:,}",
                     r.get("client_procs"), r.get("accept_per_s"),
                     f"{r.get('gateway_before', {}).get('rss_mb')} / {after.get('rss_mb')}",
                     after.get("kib_per_socket"), idle.get("gateway_cpu_pct"), idle.get("closes"))])
    if r["args"]["workers"] > 1:
        lines += ["", "Memory, CPU and open files are the sums over the supervisor and its workers. Per worker:", ""]
        lines += table([("worker", "pid", "sockets", "RSS MiB", "KiB per socket", "open files"),
                        *((w["index"], w["pid"], f"{w['sockets']:,}", w["rss_mb"], w["kib_per_socket"],
                           w["open_files"]) for w in r.get("per_worker", []))])
    lag = r.get("loop_lag", {})
    lines += ["", "Event-loop stalls (round trips of /healthz every 50 ms; the worst worker under --workers):", ""]
    lines += table([("phase", "samples", "max ms", "p99 ms", "over 100 ms", "over 1 s", "longest (time, ms)"),
                    *((phase, x["samples"], x["max_ms"], x["p99_ms"], x["stalls_over_100ms"], x["stalls_over_1s"],
                       ", ".join(f"{w['at']} {w['ms']}" for w in x["longest"][:3]))
                      for phase, x in lag.items() if phase != "per_worker")])
    if r["args"]["workers"] > 1:
        lines += ["", "Stalls per worker (all phases): " + "; ".join(
            f"pid {pid}: max {x['max_ms']} ms, {x['stalls_over_100ms']} over 100 ms ({x['samples']} samples)"
            for pid, x in lag.get("per_worker", {}).items())]
    lines += ["", f"Idle: {idle.get('seconds')} s, --ping-interval {r['args']['ping_interval']} s. Ramp waves:", ""]
    lines += table([("sockets", "ok", "failed", "s", "sockets/s", "gateway CPU %", "RSS MiB", "open files",
                     "open files per worker"),
                    *((w["sockets"], w["ok"], w["failed"], w["seconds"], w["per_s"], w["gateway_cpu_pct"],
                       w["rss_mb"], w["open_files"], " / ".join(map(str, w["open_files_per_worker"])))
                      for w in r.get("ramp", []))])
    lines += ["", "Fan-out over every conversation (pass: nothing lost, p99 < 100 ms):", ""]
    lines += table([("events/s", "target d/s", "achieved d/s", "lost", "p50 ms", "p99 ms", "max ms", "gateway CPU %",
                     "publish to dispatch, mean ms", "queue wait, mean ms", "pass"),
                    *((s["events_per_s"], s["target_dps"], s["dps"], s["lost"], s["p50_ms"], s["p99_ms"], s["max_ms"],
                       s["gateway_cpu_pct"], s.get("gateway_dispatch_mean_ms"), s.get("gateway_queue_wait_mean_ms"),
                       "yes" if s["pass"] else "NO") for s in r.get("fanout", []))])
    check = r.get("check", {})
    lines += ["", f"Check: {check.get('complete')} sockets complete, {check.get('incomplete')} not "
              f"(gaps {check.get('gaps')}, duplicates {check.get('dups')}, missing {check.get('missing')}, "
              f"resets {check.get('resets')} {check.get('reset_reasons') or ''}).",
              "Gateway log (last lines): " + " / ".join(r.get("gateway_log_tail", [])[-4:]),
              f"Capacity: {r.get('capacity_dps')} deliveries/s ({r.get('capacity_events_per_s')} events/s)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1,000 sockets / 100 convs, short idle, two small steps")
    parser.add_argument("--sockets", type=int, help="default 50,000 (smoke 1,000)")
    parser.add_argument("--convs", type=int, help="default 5,000 (smoke 100)")
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway processes on the one port (gateway --workers; each has its own open-files "
                             "limit: use it where the hard limit is below --sockets)")
    parser.add_argument("--client-procs", type=int, help="wsload processes (default: sockets / --per-proc)")
    parser.add_argument("--per-proc", type=int, default=12_500, help="sockets per client process (one source address)")
    parser.add_argument("--wave", type=int, help="sockets per ramp wave (default 5,000; smoke 500)")
    parser.add_argument("--concurrency", type=int, default=250, help="handshakes in flight per client process")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--idle-seconds", type=float, help="default 30 (smoke 2)")
    parser.add_argument("--rates", help="fan-out steps, events/s (default 500,1000,2000,4000,8000; smoke 200,500)")
    parser.add_argument("--step-seconds", type=float, help="default 5 (smoke 2)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the gateway, Redis, clients and publisher (e.g. -5 on a shared box; root)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    for name, full, smoke in (("sockets", 50_000, 1_000), ("convs", 5_000, 100), ("wave", 5_000, 500),
                              ("idle_seconds", 30.0, 2.0), ("rates", "500,1000,2000,4000,8000", "200,500"),
                              ("step_seconds", 5.0, 2.0)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    args.rates = [float(x) for x in str(args.rates).split(",") if x.strip()]
    if args.client_procs and args.client_procs > 250:
        parser.error("at most 250 client processes (source addresses 127.0.0.2-251)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = raise_nofile()
    per_process = math.ceil(args.sockets / args.workers)
    if soft < per_process + 1000:
        log(f"warning: open-files limit {soft} (hard {hard}): one gateway process can hold about {soft - 300:,} "
            f"sockets, not {per_process:,} (--workers spreads them over more processes)")
    logdir = Path(tempfile.mkdtemp(prefix="broadcaster-many-"))
    log(f"logs in {logdir}")
    results = asyncio.run(run(args, logdir))
    write_outputs(results, markdown(results), args.json, args.markdown, logdir)
    return 0 if results.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
