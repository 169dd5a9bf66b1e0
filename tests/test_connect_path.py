"""The per-connect savings keep behaviour: the collector threshold a gateway sets at start-up, the
``/ws`` query read from the scope as Starlette read it, and a token decoded without touching the
warnings filters (bench/connect_cost.py measures what they save)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.datastructures import QueryParams
from starlette.websockets import WebSocket

from gateway.auth import Authenticator, mint_token
from gateway.gcpolicy import GC_GEN0_THRESHOLD, tune_young
from gateway.settings import Settings
from gateway.ws_endpoint import _connect_query
from tests.support.gateway import InProcessGateway
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parent.parent
LONG_SECRET = "x" * 40


@pytest.fixture
def gc_threshold() -> Iterator[None]:
    """The test may change the process's thresholds: put them back."""
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_tune_young_raises_young_threshold_only(gc_threshold: None) -> None:
    gc.set_threshold(700, 7, 9)
    tune_young()
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, 7, 9)
    gc.set_threshold(GC_GEN0_THRESHOLD * 3, 10, 10)  # someone chose more: kept
    tune_young()
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD * 3, 10, 10)
    gc.set_threshold(0, 10, 10)  # the collector turned off by threshold: left off
    tune_young()
    assert gc.get_threshold() == (0, 10, 10)


async def test_gateway_start_tunes_gc_and_serves(gc_threshold: None) -> None:
    gc.set_threshold(700, 10, 10)
    async with InProcessGateway(Settings()) as gw:
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
        client = await WsClient.connect(gw.ws_url("conv_id=gc-tuned"))
        try:
            assert (await client.next())["type"] == "ws.hello"
            assert (await client.expect("ws.subscribed"))["conv_id"] == "gc-tuned"
        finally:
            await client.ws.close()


QUERIES = [
    b"", b"conv_id=a", b"conv_id=a&conv_id=b", b"conv_id=a%2Fb&profile=de+bug", b"types=&since=",
    b"conv_id", b"&&conv_id=a&", b"_=1712&conv_id=x", b"conv_id=%C3%A9", b"conv_id=\xe9", b"a=1;b=2",
    b"token=abc.def-ghi_jkl&epoch=3f9c", b"conv_id=a&since=1&since=2",
]


@pytest.mark.parametrize("raw", QUERIES)
def test_connect_query_reads_as_starlette_did(raw: bytes) -> None:
    websocket = WebSocket({"type": "websocket", "query_string": raw, "headers": []}, _never, _never)
    ours, theirs = _connect_query(websocket), QueryParams(raw)
    assert list(ours.items()) == list(theirs.items())
    assert list(ours) == list(theirs)


async def _never(*args: object) -> None:
    raise AssertionError("no I/O expected")


def test_long_secret_decodes_without_catch_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authenticator(LONG_SECRET)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("catch_warnings called on the handshake path")

    token = mint_token(LONG_SECRET, sub="u1")
    with monkeypatch.context() as patched:  # undone before pytest's own catch_warnings at teardown
        patched.setattr(warnings, "catch_warnings", fail)
        grant = auth.verify(token)
    assert grant.subject == "u1"


def test_short_secret_decodes_without_warning() -> None:
    auth = Authenticator("short-secret")
    token = mint_token("short-secret", sub="u2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning on verify fails the test
        assert auth.verify(token).subject == "u2"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", [["--mode", "query"], ["--mode", "message", "--jwt"]])
def test_connect_cost_bench_smoke(tmp_path: Path, options: list[str]) -> None:
    """bench/connect_cost.py end to end, small: every socket resumed and replayed, a cost per connect."""
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "connect_cost.py"), "--clients", "60", "--convs", "6",
                           "--rounds", "1", "--concurrency", "20", "--timeout", "30", "--json", str(out), *options],
                          capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["gateways"].values()
    assert row["errors"] == []
    assert row["connect_us"][0] > 0 and row["connects_per_s"][0] > 0
