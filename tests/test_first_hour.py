"""Issue #19, "the first hour": every documented command works as written, every mistake says what to do.

Commands are taken from the docs they appear in and run as written (only the port is
added), against real gateways on free ports, with real websocket clients.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from broadcaster.errors import BackendUnavailable, ValidationError
from broadcaster.profiles import ProfileError, ProfileRegistry
from broadcaster.urls import redact_url, url_addresses
from gateway.settings import Settings
from producers import Producer
from producers.cli import DEFAULT_URL
from producers.client import BroadcasterClient, ClientClosed, SubscribeRefused
from tests.support.gateway import InProcessGateway, free_port
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def _env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: the venv's scripts on PATH, no broadcaster settings, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTER_") and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _wait_ready(proc: subprocess.Popen[str], url: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            out, _ = proc.communicate()
            raise AssertionError(f"the gateway exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # poll interval
    raise AssertionError(f"gateway at {url} not ready within {timeout}s")


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


# --- item 1: the example plugin's documented command ---------------------------------------


async def test_the_plugin_command_of_the_example_docstring_works_as_written() -> None:
    source = (ROOT / "examples/plugins/chat_summary.py").read_text()
    [command] = re.findall(r"``(broadcaster-gateway --plugin [^`]+)``", source)
    port = free_port()
    assert (BIN / "broadcaster-gateway").exists(), f"no console script in {BIN}: pip install -e ."
    proc = await asyncio.to_thread(
        subprocess.Popen, ["bash", "-c", f"exec {command} --host 127.0.0.1 --port {port}"], cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await asyncio.to_thread(_wait_ready, proc, f"http://127.0.0.1:{port}")
        watcher = await WsClient.connect(f"ws://127.0.0.1:{port}/ws?conv_id=plugin-doc")
        viewers = await watcher.expect("chat.viewers", timeout=10)  # published by the plugin's on_subscribe
        assert viewers["data"] == {"count": 1}
        await watcher.close()
    finally:
        output = await asyncio.to_thread(_stop, proc)
    assert "No module named" not in output


# --- item 2: broadcaster-publish reaches the quick-start gateway -----------------------------


def test_broadcaster_publish_defaults_to_the_quick_start_gateway() -> None:
    defaults = Settings()
    assert DEFAULT_URL == f"http://{defaults.host}:{defaults.port}"
    help_text = subprocess.run([str(BIN / "broadcaster-publish"), "--help"], env=_env(COLUMNS="100"),
                               capture_output=True, text=True, check=True).stdout
    assert f"default {DEFAULT_URL}" in help_text


def test_the_readme_shows_broadcaster_publish_help_as_it_is() -> None:
    block = README.split("`broadcaster-publish --help`:\n\n```text\n", 1)[1].split("```", 1)[0]
    actual = subprocess.run([str(BIN / "broadcaster-publish"), "--help"], env=_env(COLUMNS="100"),
                            capture_output=True, text=True, check=True).stdout
    assert block.split() == actual.split(), "README's broadcaster-publish --help is out of date"


async def test_broadcaster_publish_as_written_reaches_a_gateway_on_the_embedded_backend() -> None:
    """The README's shell publish line, pointed at a quick-start gateway (embedded backend)."""
    [line] = [ln for ln in README.splitlines() if ln.startswith(".venv/bin/broadcaster-publish ")]
    argv = shlex.split(line)
    async with InProcessGateway() as gw:
        watcher = await WsClient.connect(gw.ws_url("conv_id=demo"))
        await watcher.expect("ws.subscribed")
        # as written, plus where this test's gateway listens (the quick start's is on the default)
        done = await asyncio.to_thread(
            subprocess.run, [str(ROOT / argv[0]), *argv[1:], "--url", gw.http_url], env=_env(),
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert orjson.loads(done.stdout)["seq"] == 1
        event = await watcher.expect("chat.message")
        assert event["data"] == {"text": "from the shell"}
        await watcher.close()


def test_broadcaster_publish_without_a_gateway_says_what_to_start() -> None:
    port = free_port()
    done = subprocess.run([str(BIN / "broadcaster-publish"), "c", "t.x", "1", "--url", f"http://127.0.0.1:{port}",
                           "--retry-budget", "0.2"], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"127.0.0.1:{port}" in done.stderr and "broadcaster-gateway" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_readme_raw_redis_example_says_which_gateways_see_it() -> None:
    section = README.split("## Publishing from another language", 1)[1].split("```sh", 1)[0]
    assert "--redis-url" in section and "--key-prefix" in section and "embedded backend" in section


# --- item 3: Redis unreachable at start ------------------------------------------------------


def test_gateway_start_with_redis_unreachable_prints_one_line_and_exits_69() -> None:
    port = free_port()
    url = f"redis://app:s3cret-pw@127.0.0.1:{port}/0"
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "--port", str(free_port()), "--redis-url", url],
                          env=_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 69, done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "attempt" not in output and "s3cret-pw" not in output
    message = [line for line in output.splitlines() if line.startswith("broadcaster-gateway:")]
    assert len(message) == 1, output
    assert f"Redis at 127.0.0.1:{port}" in message[0] and "redis://app:***@" in message[0]
    assert "redis-server" in message[0]  # what to check
    assert len(output.splitlines()) <= 6, output  # a few start-up log lines and the message, no spam


def test_the_sdk_names_the_url_it_could_not_reach_without_the_password() -> None:
    port = free_port()
    for url in (f"redis://app:s3cret-pw@127.0.0.1:{port}/0", f"http://127.0.0.1:{port}"):
        with Producer.from_url(url, retry_budget=0.2) as producer, pytest.raises(BackendUnavailable) as info:
            producer.publish("c", "t.x", 1)
        assert f"127.0.0.1:{port}" in str(info.value) and "s3cret-pw" not in str(info.value)


def test_the_sdk_scheme_error_lists_every_scheme() -> None:
    with pytest.raises(ValidationError) as info:
        Producer.from_url("ftp://u:pw@h/")
    message = str(info.value)
    for scheme in ("http://", "https://", "redis://", "rediss://", "redis+cluster://"):
        assert scheme in message
    assert "pw@" not in message


def test_urls_are_redacted_and_their_addresses_spelled_out() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://pw@h") == "redis://***@h"
    assert redact_url("rediss://h:1/0?password=pw&db=1") == "rediss://h:1/0?password=***&db=1"
    assert url_addresses("redis+cluster://u:p@a:1,b") == "a:1,b:6379"
    assert url_addresses("http://127.0.0.1:8000") == "127.0.0.1:8000"


# --- item 5: unknown /ws query parameters ----------------------------------------------------


async def test_a_misspelt_ws_parameter_is_refused_naming_it() -> None:
    async with InProcessGateway() as gw:
        async with websockets.connect(gw.ws_url("convid=demo")) as ws:
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 5)
                    assert "ws.hello" not in str(frame), "a typo must not get a hello and silence"
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 4400
        assert "'convid'" in info.value.rcvd.reason and "conv_id" in info.value.rcvd.reason
        # parameters starting with _ are the client's own (cache-busters): ignored
        ok = await WsClient.connect(gw.ws_url("conv_id=demo&_=1712345678"))
        assert (await ok.next())["type"] == "ws.hello"
        assert (await ok.next())["type"] == "ws.subscribed"
        await ok.close()


# --- item 6: --help lists the token subcommand -----------------------------------------------


def test_gateway_help_lists_the_token_subcommand_and_exit_codes() -> None:
    out = subprocess.run([str(BIN / "broadcaster-gateway"), "--help"], env=_env(), capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"^  token\s", out, re.M) and "broadcaster-gateway token" in out
    assert re.search(r"^  69\s", out, re.M)
    token_help = subprocess.run([str(BIN / "broadcaster-gateway"), "token", "--help"], env=_env(),
                                capture_output=True, text=True, check=True).stdout
    assert "--secret" in token_help


# --- item 7: the Python client stops on errors a retry cannot fix ----------------------------


def test_the_client_refuses_a_malformed_epoch_at_once() -> None:
    client = BroadcasterClient("ws://127.0.0.1:1", [])
    with pytest.raises(ValueError, match="epoch"):
        asyncio.run(client.subscribe("c", since=1, epoch="not-an-epoch!"))
    with pytest.raises(ValueError, match="types"):
        BroadcasterClient("ws://127.0.0.1:1", ["c"], types="chat.*")  # type: ignore[arg-type]


async def test_the_client_stops_when_the_gateway_refuses_a_subscription() -> None:
    async with InProcessGateway() as gw:
        too_many = [f"t{i}.*" for i in range(17)]  # the gateway allows at most 16 globs: bad_subscribe
        client = BroadcasterClient(gw.ws_url(), ["c"], types=too_many, backoff_initial=0.01, backoff_max=0.05)
        async with client:
            with pytest.raises(SubscribeRefused) as info:
                await asyncio.wait_for(client.get(), 10)
        assert isinstance(info.value, ClientClosed)
        assert info.value.conv_id == "c" and info.value.error_code == "bad_subscribe"
        assert "16" in str(info.value) and "retrying cannot fix" in str(info.value)
        assert client.stats.connections == 1  # no reconnect loop


# --- item 9: small things --------------------------------------------------------------------


def test_a_profile_error_names_its_file_once(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.x]\ninclude = "chat.*"\n')
    with pytest.raises(ProfileError) as info:
        ProfileRegistry.from_file(path)
    assert str(info.value).count(str(path)) == 1, str(info.value)
    assert str(info.value) == f"{path}: profiles.x.include: must be a list of strings"


async def test_malformed_json_gets_a_422_with_its_position() -> None:
    async with InProcessGateway() as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        answer = await http.post("/v1/conversations/c/events", content=b'{"type": "chat.x",\n "data": }',
                                 headers={"content-type": "application/json"})
        assert answer.status_code == 422
        message = answer.json()["message"]
        assert "line 2 column 10" in message and "char 28" in message, message
        empty = await http.post("/v1/conversations/c/events", content=b"", headers={"content-type": "application/json"})
        assert empty.status_code == 422 and "empty" in empty.json()["message"]


def test_the_walk_through_says_a_frame_may_carry_several_objects() -> None:
    walk = README.split("## A five-minute walk-through", 1)[1].split("##", 1)[0]
    hello = [ln for ln in walk.splitlines() if '"ws.hello"' in ln]
    assert len(hello) == 1 and '\\n{"type":"ws.subscribed"' in hello[0]  # printed as one frame
    assert "several JSON objects" in walk
