"""``--workers 1`` against ``--workers 2``: the capacity of one gateway host, interleaved on a shared box.

    python bench/workers.py                          # fanout and chat, 2 rounds of (1, 2) and (2, 1)
    python bench/workers.py --rounds 3 --scenarios fanout -- --steps 40000,80000,120000

Each measurement is one ``bench/run.py --quick --servers ours`` run (its clients, publisher,
ladder and pass rule: nothing lost, p99 < 100 ms), with our gateway started through a
wrapper that appends ``--workers N`` to its command line. Rounds alternate the order (1
then 2, 2 then 1) so that a change in the machine's other load hits both about equally;
the load averages before and after each run are printed with its results. Anything after
``--`` goes to every ``bench/run.py`` run. run.py counts the CPU of the process it started
only (the supervisor), so its per-delivery CPU figures are not comparable between the two;
this script reads the workers' CPU time itself (``/proc``), over the whole run.

Standard library only, run with the project's python (run.py then re-executes itself in
its tools venv, as always).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TOKEN_ENV = "BENCH_WORKERS_TOKEN"


def wrapper(directory: Path, python: str, workers: int, token: str) -> Path:
    """A 'python' for run.py's ``--gateway-python``: the real one, with ``--workers N`` appended and
    ``token`` in its environment (which its workers inherit: how :class:`CpuWatch` finds them)."""
    path = directory / f"python-workers-{workers}"
    path.write_text(f'#!/bin/sh\nexec env {TOKEN_ENV}={token} "{python}" "$@" --workers {workers}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class CpuWatch(threading.Thread):
    """Adds up the CPU of the gateway processes (those with ``TOKEN_ENV=token``) from the moment the
    load clients run (run.py starts them once the gateway answers: imports and start-up are not
    counted) to the end, sampled every half second (the last half second of an exiting process is
    missed)."""

    def __init__(self, token: str) -> None:
        super().__init__(daemon=True)
        self.marker, self.done = f"{TOKEN_ENV}={token}".encode(), threading.Event()
        self.client = str(BENCH / "client.py").encode()
        self.total = 0.0
        self.counting = False
        self._last: dict[int, float] = {}

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()
        self.sample()

    def sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        gateways: dict[int, float] = {}
        clients = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if self.marker not in (entry / "environ").read_bytes():
                    clients = clients or self.client in (entry / "cmdline").read_bytes()
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            gateways[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
        for pid, cpu in gateways.items():
            if self.counting:
                self.total += cpu - self._last.get(pid, 0.0)
            self._last[pid] = cpu
        self.counting = self.counting or clients


def measure(python: str, workers: int, scenario: str, extra: list[str], directory: Path) -> dict[str, Any]:
    out = directory / f"run-{scenario}-{workers}-{time.monotonic_ns()}.json"
    token = secrets.token_hex(6)
    gateway_python = wrapper(directory, python, workers, token)
    argv = [python, str(BENCH / "run.py"), "--quick", "--scenarios", scenario, "--servers", "ours",
            "--gateway-python", str(gateway_python), "--max-others", "1000", "--retries", "0",
            "--quiet-budget", "0", "--json", str(out), *extra]
    load0 = os.getloadavg()
    watch = CpuWatch(token)
    watch.start()
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    watch.done.set()
    watch.join()
    if done.returncode != 0:
        raise SystemExit(f"run.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(out.read_text())
    run = results["shapes"][scenario]["ours"]
    delivered = sum(s["received"] for s in run["steps"])
    return {"workers": workers, "scenario": scenario, "capacity_dps": run["capacity_dps"],
            "steps": [(s["target_dps"], s["dps"], s["p99_ms"], s["lost"], s["pass"]) for s in run["steps"]],
            "gateway_cpu_s": round(watch.total, 1), "delivered": delivered,
            "gateway_us_per_delivery": round(1e6 * watch.total / delivered, 2) if delivered else None,
            "seconds": round(time.monotonic() - began), "load_before": [round(x, 2) for x in load0],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scenarios", default="fanout,chat", help="comma-separated run.py shapes")
    parser.add_argument("--workers", type=int, default=2, help="the count compared with 1")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    results: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            order = (1, args.workers) if round_ % 2 == 0 else (args.workers, 1)
            for workers in order:
                result = measure(sys.executable, workers, scenario, extra, directory)
                results.append(result)
                print(json.dumps(result), flush=True)
    print()
    print("| scenario | workers | capacity d/s (each run) | gateway µs/delivery | load avg (1 min) before→after |")
    print("| --- | --- | --- | --- | --- |")
    for scenario in sorted({r["scenario"] for r in results}):
        for workers in (1, args.workers):
            runs = [r for r in results if r["scenario"] == scenario and r["workers"] == workers]
            capacity = ", ".join(f"{r['capacity_dps']:,}" for r in runs)
            cost = ", ".join(str(r["gateway_us_per_delivery"]) for r in runs)
            load = ", ".join(f"{r['load_before'][0]}→{r['load_after'][0]}" for r in runs)
            print(f"| {scenario} | {workers} | {capacity} | {cost} | {load} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
