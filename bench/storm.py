"""Reconnect storm: a gateway SIGKILLed under load, its clients resume through nginx on the others.

    python bench/storm.py                          # 3 gateways, 10,000 clients / 1,000 convs, 1,000 events/s
    python bench/storm.py --backoff none,full      # one run per reconnect backoff, same shape
    python bench/storm.py --smoke                  # 150 clients / 30 convs (tests/test_bench_scenarios_smoke.py)

Run it with the project's python (``.venv/bin/python``): it needs nginx and redis-server on
PATH. What it does, bounded in time and all on 127.0.0.1:

1. a private ``redis-server``; three gateways behind nginx (``devtools.cluster.LoopbackCluster``
   with compose's ``deploy/nginx/nginx.conf``, copied with more ``worker_connections`` and no
   access log: every websocket through nginx holds two of its connections);
2. ``--clients`` followers (``bench/wsload.py`` processes) of ``--convs`` conversations, all
   through nginx (least_conn spreads them over the three gateways); each checks its seqs;
3. a paced publisher (``bench/loadpub.py``: the publish script, as any producer) at ``--rate``
   events/s round-robin over every conversation, for ``--before`` + ``--after`` seconds;
4. after ``--before`` seconds the gateway holding closest to a third of the clients is
   SIGKILLed; its clients reconnect through nginx (after ``--backoff``: ``none``, ``full`` =
   our Python client's full jitter from ``--backoff-initial``, ``equal`` = our JS client's)
   and resume with ``since``/``epoch`` of the last event they saw;
5. once the publisher is done, every client must end at its conversation's last seq, with no
   gap, no duplicate and no ``ws.reset``.

Measured: time from the kill until every moved client has every event up to its resume
point (``ws.subscribed``'s seq), reconnect delays, Redis connections (``INFO clients``) and
ops/s (``INFO stats``, sampled every ``--sample-interval``), CPU of each gateway and of nginx,
and the p99 latency of live events for the clients that were *not* moved, before the kill,
during the storm (kill until every moved client recovered) and after. Results: a JSON file
and a markdown summary (``--json`` / ``--markdown``; printed too). Exit status 1 when any
client lost, duplicated or was reset.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scenario_support import (
    BENCH,
    Child,
    RedisInfo,
    cpu_seconds,
    finish_all,
    gather_calls,
    latency,
    log,
    machine,
    merge_checks,
    private_redis,
    quantiles,
    raise_nofile,
    renice,
    table,
    write_outputs,
)

from devtools.cluster import NGINX_CONF, LoopbackCluster

try:
    import psutil
except ImportError:  # pragma: no cover - the project's dev venv has it
    psutil = None


def nginx_conf(directory: Path, connections: int) -> Path:
    """Compose's nginx.conf with ``connections`` per worker, the open-files limit to match, no access log."""
    text = NGINX_CONF.read_text()
    text = re.sub(r"worker_connections \d+;", f"worker_connections {connections};", text)
    text = text.replace("worker_processes auto;", f"worker_processes auto;\nworker_rlimit_nofile {connections};")
    text = re.sub(r"access_log /dev/stdout upstreamlog;", "access_log off;", text)
    path = directory / "nginx-storm.conf"
    path.write_text(text)
    return path


def nginx_pids(master: int) -> list[int]:
    if psutil is None:
        return [master]
    try:
        return [master, *(c.pid for c in psutil.Process(master).children())]
    except psutil.Error:
        return [master]


class Sampler:
    """Redis INFO and the CPU of gateways and nginx, every ``interval`` seconds, until stopped."""

    def __init__(self, redis_port: int, pids: dict[str, list[int]], interval: float) -> None:
        self.info = RedisInfo("127.0.0.1", redis_port)
        self.pids, self.interval = pids, interval
        self.rows: list[dict[str, Any]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        last = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        last_t = time.time()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass
            now = time.time()
            row: dict[str, Any] = {"t": now}
            try:
                row.update(await self.info.sample())
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                row["redis_error"] = str(exc)
            for name, pids in self.pids.items():
                cpu = sum(cpu_seconds(p) for p in pids)
                if cpu >= last[name]:  # a process gone (the victim) reads 0: no sample
                    row[f"cpu_{name}"] = round(100 * (cpu - last[name]) / max(now - last_t, 1e-6), 1)
                last[name] = cpu
            last_t = now
            self.rows.append(row)
        await self.info.close()

    def stop(self) -> None:
        self._stop.set()

    def window(self, start: float, end: float) -> list[dict[str, Any]]:
        return [r for r in self.rows if start <= r["t"] <= end]


def _summary_of(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = [r[key] for r in rows if key in r]
    if not values:
        return {"mean": None, "max": None}
    return {"mean": round(sum(values) / len(values), 1), "max": max(values)}


async def one_run(args: argparse.Namespace, backoff: str, logdir: Path) -> dict[str, Any]:
    run_dir = logdir / f"run-{backoff}"
    run_dir.mkdir()
    with private_redis(run_dir) as (redis_url, redis_pid):
        prefix = f"storm{os.getpid()}{backoff}"
        gateway_args = ["--key-prefix", prefix, "--history-size", str(args.history), "--history-ttl", "600",
                        "--log-level", "warning", "--drain-seconds", "0", *args.gateway_arg]
        cluster = LoopbackCluster(3, redis_url=redis_url, gateway_args=gateway_args, ready_timeout=60,
                                  nginx_conf=nginx_conf(run_dir, args.nginx_connections), keep_dir=True)
        await asyncio.to_thread(cluster.start)
        try:
            return await _measure(args, backoff, cluster, redis_url, redis_pid, run_dir, prefix)
        finally:
            await asyncio.to_thread(cluster.stop)


async def _measure(args: argparse.Namespace, backoff: str, cluster: LoopbackCluster, redis_url: str,
                   redis_pid: int, run_dir: Path, prefix: str) -> dict[str, Any]:
    py = sys.executable
    convs = [f"s{i}" for i in range(args.convs)]
    publisher = await Child("publisher", [py, str(BENCH / "loadpub.py")], run_dir / "publisher.log").start()
    procs = max(1, min(args.client_procs, args.clients))
    clients = [await Child(f"clients-{i}", [py, str(BENCH / "wsload.py")], run_dir / f"clients-{i}.log").start()
               for i in range(procs)]
    result: dict[str, Any] = {"backoff": backoff, "logs": str(run_dir)}
    try:
        await publisher.call({"cmd": "init", "url": redis_url, "prefix": prefix, "convs": convs,
                              "history_size": args.history, "history_ttl": 600, "payload_bytes": 100,
                              "json_copy": False})
        probe = await publisher.call({"cmd": "probe", "step": 0})
        pids = {cluster.gateway_id(i): [cluster.gateways[i].pid] for i in range(3)}
        assert cluster.nginx is not None
        pids["nginx"] = nginx_pids(cluster.nginx.pid)
        pids["redis"] = [redis_pid]
        pids["clients"] = [c.pid for c in clients]
        pids["publisher"] = [publisher.pid]
        if args.nice:
            for pid in (p for group in pids.values() for p in group):
                renice(pid, args.nice)
        port = cluster.port
        assert port is not None
        lb = {"host": "127.0.0.1", "port": port}
        backoff_spec = {"mode": backoff, "initial": args.backoff_initial, "max": args.backoff_max}
        batches: list[list[tuple[int, str]]] = [[] for _ in clients]
        for i in range(args.clients):
            batches[i % procs].append((i, convs[i % args.convs]))
        began = time.monotonic()
        connected = await asyncio.gather(*(c.call({"cmd": "connect", **lb, "clients": b, "concurrency": 100,
                                                   "backoff": backoff_spec, "timeout": args.handshake_timeout},
                                                  timeout=300)
                                           for c, b in zip(clients, batches, strict=True)))
        connect_s = time.monotonic() - began
        failed = sum(r["failed"] for r in connected)
        log(f"[{backoff}] {args.clients - failed}/{args.clients} connected in {connect_s:.1f}s "
            f"({[r['errors'] for r in connected if r['failed']]})")
        statuses = await gather_calls(clients, {"cmd": "status"})
        per_gateway: dict[str, int] = {}
        for s in statuses:
            for gw, n in s["gateways"].items():
                per_gateway[gw] = per_gateway.get(gw, 0) + n
        victim = min(per_gateway, key=lambda g: abs(per_gateway[g] - args.clients / 3))
        victim_index = next(i for i in range(3) if cluster.gateway_id(i) == victim)
        result.update(connect={"ok": args.clients - failed, "failed": failed, "seconds": round(connect_s, 2),
                               "errors": [r["errors"] for r in connected if r["failed"]]},
                      per_gateway=per_gateway, victim=victim)

        sampler = Sampler(int(redis_url.rsplit(":", 1)[1].split("/")[0]), pids, args.sample_interval)
        sampling = asyncio.create_task(sampler.run())
        duration = args.before + args.after
        publishing = asyncio.create_task(publisher.call({"cmd": "run", "step": 1, "rate": args.rate,
                                                         "duration": duration}, timeout=duration + 120))
        started = time.time()
        await asyncio.sleep(args.before)
        await gather_calls(clients, {"cmd": "phase", "name": "storm"})
        moved = sum(r["moved"] for r in await gather_calls(clients, {"cmd": "victim", "gateway_id": victim}))
        killed_at = time.time()
        await asyncio.to_thread(cluster.stop_gateway, victim_index, signal.SIGKILL)
        log(f"[{backoff}] SIGKILLed {victim} ({moved} clients)")
        deadline = time.monotonic() + args.recover_timeout
        recovered = 0
        while time.monotonic() < deadline:
            recovered = sum(c["recovered"] for c in await gather_calls(clients, {"cmd": "counts"}))
            if recovered >= moved:
                break
            await asyncio.sleep(0.1)
        all_recovered_at = time.time()
        await gather_calls(clients, {"cmd": "phase", "name": "after"})
        log(f"[{backoff}] {recovered}/{moved} moved clients recovered {all_recovered_at - killed_at:.2f}s "
            "after the kill")
        published = await publishing
        final = {c: probe["per_conv"][i] + published["per_conv"][i] for i, c in enumerate(convs)}
        check: dict[str, Any] = {}
        settle = time.monotonic() + args.settle
        while True:
            checks = await gather_calls(clients, {"cmd": "check", "final": final})
            check = merge_checks(checks, ("complete", "incomplete", "gaps", "gap_events", "dups", "missing", "resets",
                                          "received"))
            if check["incomplete"] == 0 or time.monotonic() > settle:
                break
            await asyncio.sleep(0.2)
        ended = time.time()
        sampler.stop()
        await sampling
        reports = await gather_calls(clients, {"cmd": "report"})
        statuses = await gather_calls(clients, {"cmd": "status"})
    finally:
        await finish_all(clients, publisher, close_timeout=30)

    maps = [r["latency"] for r in reports]
    from_loss = [x for r in reports for x in r["recovery"] if x is not None]
    from_kill = [x - killed_at for r in reports for x in r["recovered_at"] if x is not None]
    reconnect = [x for r in reports for x in r["reconnect_delay"] if x is not None]
    attempts = [x for r in reports for x in r["attempts"]]
    before_rows = sampler.window(started, killed_at)
    storm_rows = sampler.window(killed_at, max(all_recovered_at, killed_at + 1.0) + args.sample_interval)
    survivors = [cluster.gateway_id(i) for i in range(3) if i != victim_index]
    nginx_log = cluster.logs("nginx")
    result.update(
        clients=args.clients, convs=args.convs, rate=args.rate, moved=moved, recovered=recovered,
        all_recovered_s=round(all_recovered_at - killed_at, 3) if recovered >= moved else None,
        recovery_from_kill_s=quantiles(from_kill), recovery_from_loss_s=quantiles(from_loss),
        reconnect_delay_s=quantiles(reconnect), attempts=quantiles([float(a) for a in attempts]),
        publish={"sent": published["sent"], "elapsed": round(published["elapsed"], 2),
                 "behind_ms": published["behind_ms"], "errors": published["errors"],
                 "seq_mismatch": published["seq_mismatch"]},
        check=check, closes={k: sum(s["closes"].get(k, 0) for s in statuses)
                             for k in {k for s in statuses for k in s["closes"]}},
        failed_handshakes=[s["failed_handshakes"] for s in statuses if s["failed_handshakes"]],
        latency_stay={"before": latency(maps, "before/stay"), "storm": latency(maps, "storm/stay"),
                      "after": latency(maps, "after/stay")},
        latency_moved={"before": latency(maps, "before/moved"), "storm": latency(maps, "storm/moved"),
                       "after": latency(maps, "after/moved")},
        redis={"connected_before": _summary_of(before_rows, "connected_clients"),
               "connected_storm": _summary_of(storm_rows, "connected_clients"),
               "ops_before": _summary_of(before_rows, "instantaneous_ops_per_sec"),
               "ops_storm": _summary_of(storm_rows, "instantaneous_ops_per_sec"),
               "commands": (storm_rows[-1].get("total_commands_processed", 0)
                            - before_rows[-1].get("total_commands_processed", 0)) if storm_rows and before_rows
               else None},
        cpu={name: {"before": _summary_of(before_rows, f"cpu_{name}"), "storm": _summary_of(storm_rows, f"cpu_{name}")}
             for name in pids},
        survivors=survivors, samples=[{**r, "t": round(r["t"] - killed_at, 3)} for r in sampler.rows],
        nginx_warnings=[line for line in nginx_log.splitlines() if "[warn]" in line or "[alert]" in line
                        or "[crit]" in line][-10:],
        seconds=round(ended - started, 1),
        ok=check.get("incomplete", 1) == 0 and recovered >= moved and failed == 0 and moved > 0)
    return result


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Reconnect storm: {m['nproc']} cores, Python {m['python']}, load average "
             f"{m['loadavg_start'][0]:.2f} / {m['loadavg_start'][1]:.2f} / {m['loadavg_start'][2]:.2f} at start, "
             f"{results['loadavg_end'][0]:.2f} at end; {results['started']} - {results['finished']}.", ""]
    rows: list[Sequence[Any]] = [("backoff", "clients / convs", "events/s", "moved", "all moved have every event (s)",
                                  "recovery p50 / p99 (s)", "reconnect p50 / p99 (s)", "complete", "gaps", "dups",
                                  "resets", "stay p99 before / storm / after (ms)", "moved p99 storm (ms)",
                                  "Redis conns before / peak", "Redis ops/s before / peak",
                                  "survivor CPU % before / peak", "nginx CPU % peak",
                                  "load clients CPU % before / peak", "pass")]
    for r in results["runs"]:
        ls, lm, rd = r["latency_stay"], r["latency_moved"], r["redis"]
        cpu = [r["cpu"][g] for g in r["survivors"]]
        rows.append((r["backoff"], f"{r['clients']:,} / {r['convs']:,}", f"{r['rate']:,}", r["moved"],
                     r["all_recovered_s"], f"{r['recovery_from_kill_s']['p50']} / {r['recovery_from_kill_s']['p99']}",
                     f"{r['reconnect_delay_s']['p50']} / {r['reconnect_delay_s']['p99']}",
                     f"{r['check']['complete']}/{r['clients']}", r["check"]["gaps"], r["check"]["dups"],
                     r["check"]["resets"],
                     f"{ls['before']['p99_ms']} / {ls['storm']['p99_ms']} / {ls['after']['p99_ms']}",
                     lm["storm"]["p99_ms"],
                     f"{rd['connected_before']['max']} / {rd['connected_storm']['max']}",
                     f"{rd['ops_before']['mean']} / {rd['ops_storm']['max']}",
                     " + ".join(f"{c['before']['mean']} / {c['storm']['max']}" for c in cpu),
                     r["cpu"]["nginx"]["storm"]["max"],
                     f"{r['cpu']['clients']['before']['mean']} / {r['cpu']['clients']['storm']['max']}",
                     "yes" if r["ok"] else "NO"))
    lines += table(rows)
    lines += ["", "Recovery: from the SIGKILL until a moved client has every event up to the seq of its new "
              "`ws.subscribed` (its replay done, live again). Stay p99: live events of the clients not on the "
              "killed gateway (storm = kill until every moved client recovered). CPU: % of one core, sampled every "
              f"{results['args']['sample_interval']} s (mean before the kill / highest sample in the storm)."]
    return "\n".join(lines) + "\n"


async def run_all(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "runs": [],
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for backoff in args.backoff:
        log(f"run: backoff {backoff}, {args.clients} clients / {args.convs} convs, {args.rate} events/s")
        results["runs"].append(await one_run(args, backoff, logdir))
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["ok"] = all(r["ok"] for r in results["runs"])
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="150 clients / 30 convs, 300 events/s, short windows")
    parser.add_argument("--clients", type=int, help="default 10,000 (smoke 150)")
    parser.add_argument("--convs", type=int, help="default 1,000 (smoke 30)")
    parser.add_argument("--rate", type=float, help="events/s over all conversations (default 1,000; smoke 300)")
    parser.add_argument("--client-procs", type=int, help="wsload processes (default 4; smoke 2)")
    parser.add_argument("--backoff", default="full",
                        help="comma-separated reconnect backoffs, one run each: none, full (Python client), "
                             "equal (JS client)")
    parser.add_argument("--backoff-initial", type=float, default=0.5, help="seconds (the JS client's 0.5 s)")
    parser.add_argument("--backoff-max", type=float, default=5.0)
    parser.add_argument("--before", type=float, help="seconds of publishing before the kill (default 8; smoke 2)")
    parser.add_argument("--after", type=float, help="seconds of publishing after it (default 12; smoke 4)")
    parser.add_argument("--recover-timeout", type=float, default=60.0)
    parser.add_argument("--handshake-timeout", type=float, default=30.0,
                        help="seconds a client's attempt may take to ws.subscribed before it gives up and retries")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of every process of the run (gateways, nginx, Redis, clients, publisher); "
                             "e.g. -5 on a shared box (needs root), as bench/run.py --nice")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds for the last events to arrive")
    parser.add_argument("--history", type=int, default=1000, help="events kept per conversation")
    parser.add_argument("--sample-interval", type=float, default=0.25)
    parser.add_argument("--nginx-connections", type=int, default=19000, help="worker_connections of nginx")
    parser.add_argument("--gateway-arg", action="append", default=[], help="one more gateway option (repeatable)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    small = args.smoke
    for name, full, smoke in (("clients", 10_000, 150), ("convs", 1_000, 30), ("rate", 1_000.0, 300.0),
                              ("client_procs", 4, 2), ("before", 8.0, 2.0), ("after", 12.0, 4.0)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    args.backoff = [b.strip() for b in args.backoff.split(",") if b.strip()]
    if set(args.backoff) - {"none", "full", "equal"}:
        parser.error(f"unknown backoff in {args.backoff}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = raise_nofile()
    if soft < 2 * args.clients // max(1, args.client_procs) + 1000:
        log(f"warning: open-files limit {soft} (hard {hard}) is low for {args.clients} clients")
    logdir = Path(tempfile.mkdtemp(prefix="broadcaster-storm-"))
    log(f"logs in {logdir}")
    results = asyncio.run(run_all(args, logdir))
    write_outputs(results, markdown(results), args.json, args.markdown, logdir)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
