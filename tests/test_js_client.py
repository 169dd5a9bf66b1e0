"""Runs the JS client's node tests (clients/js) as part of the Python suite.

``npm ci`` first when ``node_modules`` is missing, then ``npm test`` with this venv's
``broadcaster-gateway`` on PATH and ``BROADCASTER_GATEWAY_CMD`` set to this interpreter's
``-m gateway.cli``, so the end-to-end tests in ``test/gateway.test.js`` and
``test/tokens.test.js`` start real gateways from the code under test. Fails (never skips)
when node or npm is missing, when a node test fails, and when the gateway tests did not
actually run (a skipped suite).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "clients" / "js"
ARTIFACTS = ROOT / "test-artifacts"
NPM_TEST_TIMEOUT = 120.0
NPM_CI_TIMEOUT = 120.0
MIN_NODE = 20

pytestmark = pytest.mark.timeout(NPM_TEST_TIMEOUT + NPM_CI_TIMEOUT + 30)

SUMMARY_RE = re.compile(r"^#\s*(tests|suites|pass|fail|cancelled|skipped|todo)\s+(\d+)\s*$", re.MULTILINE)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the JS client tests need Node.js >= {MIN_NODE} and npm "
                    "(apt-get install -y nodejs npm; .ci/run installs them)")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["BROADCASTER_GATEWAY_CMD"] = f"{shlex.quote(sys.executable)} -m gateway.cli"
    env["BROADCASTER_GATEWAY_REQUIRED"] = "1"  # a gateway that cannot start fails its tests, never skips them
    env.update(npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false",
               NO_COLOR="1", FORCE_COLOR="0")
    return env


def _run(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in clients/js; on timeout kill it and every process it started (gateways too)."""
    proc = subprocess.Popen(command, cwd=JS_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Collect the whole tree first: the gateways run detached, in process groups of their own.
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        for p in [*tree, psutil.Process(proc.pid)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        out, _ = proc.communicate()
        text = out.decode(errors="replace")
        pytest.fail(f"`{' '.join(command)}` did not finish within {timeout:.0f}s:\n{text[-8000:]}")
    return proc.returncode, out.decode(errors="replace")


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if not match:
        pytest.fail(f"cannot tell the version of {node}: {version!r}")
    return int(match.group(1))


GATEWAY_TEST_FILES = ("gateway.test.js", "tokens.test.js", "join-leave.test.js")
"""Node test files whose top-level ``describe`` suites drive real gateways."""


def gateway_suites() -> list[str]:
    """The top-level ``describe`` names of the real-gateway test files: the suites that must run."""
    names: list[str] = []
    for name in GATEWAY_TEST_FILES:
        found = re.findall(r'^describe\(\s*"([^"]+)"', (JS_DIR / "test" / name).read_text(), re.MULTILINE)
        assert found, f"no describe() suites found in clients/js/test/{name}"
        names += found
    return names


def test_js_client_node_tests_pass_against_this_gateway() -> None:
    node, npm = _tool("node"), _tool("npm")
    major = _node_major(node)
    assert major >= MIN_NODE, f"Node.js {major} is too old: the JS client tests need >= {MIN_NODE}"
    env = _env()

    if not (JS_DIR / "node_modules" / ".package-lock.json").is_file():
        code, out = _run([npm, "ci", "--no-audit", "--no-fund"], env, NPM_CI_TIMEOUT)
        assert code == 0, f"npm ci failed in {JS_DIR} (exit {code}):\n{out[-8000:]}"

    # TAP output whatever node's default reporter is: the summary and SKIP directives are parsed below.
    code, out = _run([npm, "test", "--", "--test-reporter=tap"], env, NPM_TEST_TIMEOUT)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "js-client-tests.tap").write_text(out)
    tail = out[-8000:]
    assert code == 0, f"npm test failed (exit {code}); full output in test-artifacts/js-client-tests.tap:\n{tail}"

    summary = {name: int(value) for name, value in SUMMARY_RE.findall(out)}
    assert {"tests", "pass", "fail", "skipped"} <= summary.keys(), f"no node test summary in the output:\n{tail}"
    assert summary["tests"] > 0 and summary["pass"] == summary["tests"], summary
    for key in ("fail", "cancelled", "skipped", "todo"):
        assert summary.get(key, 0) == 0, f"{key} {summary[key]}:\n{tail}"
    # node counts a skipped describe() in none of the numbers above: look for SKIP directives too.
    skipped = [line.strip() for line in out.splitlines() if re.search(r"^\s*ok \d+ - .*# (SKIP|TODO)\b", line)]
    assert not skipped, "tests were skipped:\n" + "\n".join(skipped)

    for suite in gateway_suites():
        ran = re.search(rf"^ok \d+ - {re.escape(suite)}\s*$", out, re.MULTILINE)
        assert ran, f"gateway suite {suite!r} did not run and pass:\n{tail}"
        block = out[out.find(f"# Subtest: {suite}"):ran.start()]
        passed = re.findall(r"^ {4}ok \d+ - ", block, re.MULTILINE)
        assert passed, f"gateway suite {suite!r} ran no tests:\n{block[-4000:]}"
