"""The JS client's end-to-end tests find the project's gateway the way the docs install it, or fail loudly.

With the README's setup (``.venv/bin/pip install -e .``, nothing on PATH, no variable set)
``npm run test:gateway`` must run the gateway suites against ``.venv/bin/broadcaster-gateway``;
with no gateway at all they must fail, saying how to install one - never skip and pass.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_js_client import JS_DIR, NPM_CI_TIMEOUT, ROOT, SUMMARY_RE, _run, _tool

pytestmark = pytest.mark.timeout(300)

VENV_GATEWAY = ROOT / ".venv" / "bin" / "broadcaster-gateway"


def _readme_env(**extra: str) -> dict[str, str]:
    """A shell after the README's set-up: no venv on PATH, no BROADCASTER_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTER_")}
    node_dir = str(Path(_tool("node")).parent)
    env["PATH"] = os.pathsep.join(dict.fromkeys([node_dir, "/usr/bin", "/bin"]))
    env.update(NO_COLOR="1", FORCE_COLOR="0", npm_config_update_notifier="false", npm_config_fund="false",
               npm_config_audit="false")
    return {**env, **extra}


def _find(env: dict[str, str]) -> dict[str, str]:
    script = 'import("./test-support/gateway.js").then((m) => console.log(JSON.stringify(m.findGateway())))'
    done = subprocess.run([_tool("node"), "--input-type=module", "-e", script], cwd=JS_DIR, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found: dict[str, str] = json.loads(done.stdout)
    return found


def _summary(out: str) -> dict[str, int]:
    return {name: int(value) for name, value in SUMMARY_RE.findall(out)}


@pytest.fixture(scope="module")
def node_modules() -> None:
    if not (JS_DIR / "node_modules" / ".package-lock.json").is_file():
        code, out = _run([_tool("npm"), "ci", "--no-audit", "--no-fund"], _readme_env(), NPM_CI_TIMEOUT)
        assert code == 0, f"npm ci failed in {JS_DIR} (exit {code}):\n{out[-8000:]}"


def test_the_repositorys_venv_gateway_is_found_without_any_setting() -> None:
    assert VENV_GATEWAY.exists(), f"{VENV_GATEWAY} is missing: the README's set-up makes it (pip install -e .)"
    found = _find(_readme_env())
    assert found.get("source") == "the repository's .venv", found
    assert str(VENV_GATEWAY) in found["command"]


def test_broadcaster_gateway_names_the_executable_and_a_bad_one_is_an_error() -> None:
    gateway = Path(sys.executable).parent / "broadcaster-gateway"
    found = _find(_readme_env(BROADCASTER_GATEWAY=str(gateway)))
    assert found.get("source") == "BROADCASTER_GATEWAY" and str(gateway) in found["command"], found
    missing = _find(_readme_env(BROADCASTER_GATEWAY="/nonexistent/broadcaster-gateway"))
    assert "not an executable" in missing.get("error", ""), missing  # no silent fall-back to another gateway


def test_npm_run_test_gateway_runs_with_the_readme_setup(node_modules: None) -> None:
    env = _readme_env(NODE_OPTIONS="--test-reporter=tap")  # the script as written; TAP for the summary
    code, out = _run([_tool("npm"), "run", "test:gateway"], env, 200)
    summary = _summary(out)
    assert code == 0, f"npm run test:gateway failed (exit {code}):\n{out[-6000:]}"
    assert summary.get("tests", 0) > 0 and summary["pass"] == summary["tests"], summary
    assert summary.get("skipped", 0) == 0 and not re.search(r"# SKIP", out), out[-4000:]


def test_without_a_gateway_the_suites_fail_saying_how_to_install_one(node_modules: None) -> None:
    env = _readme_env(BROADCASTER_GATEWAY="/nonexistent/broadcaster-gateway")
    code, out = _run([_tool("node"), "--test", "--test-reporter=tap", "test/gateway.test.js"], env, 120)
    summary = _summary(out)
    assert code != 0, out[-4000:]
    assert summary.get("pass", 0) == 0 and summary.get("fail", 0) > 0 and summary.get("skipped", 0) == 0, summary
    assert "not an executable file" in out
