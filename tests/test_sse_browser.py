"""Real Chromium's ``EventSource`` through nginx (the compose nginx.conf) against 2 gateways, one stopped.

The page opens ``/sse`` through the loopback cluster's nginx (devtools.cluster: Redis, two
gateway processes, nginx), events are published through nginx, the gateway serving the
stream is stopped mid-stream (SIGKILL: no drain, the connection just dies; SIGTERM: it
drains), the browser's own reconnect sends ``Last-Event-ID`` to nginx, which hands it to
the other gateway: the page ends with exactly seq 1..N, each once, in order, and every
event's ``lastEventId`` is ``<epoch>:<seq>``. Also: nginx passes the stream unbuffered (an event published after the
stream opened arrives while the response is still open), and the shipped proxies' SSE
settings (nginx location, Kubernetes ingress path) are what the docs say.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devtools.cluster import LoopbackCluster
from tests.test_browser import ARTIFACTS, browser  # noqa: F401  (the Chromium fixture)

try:
    from playwright.sync_api import Browser, Page
except ImportError:  # pragma: no cover - the browser fixture fails loudly
    pass

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[1]
WAIT = 20.0

OPEN_STREAM = """
([conv]) => {
  window.__sse = { seqs: [], ids: [], hellos: [], subscribed: 0, errors: 0, resets: [] };
  const s = window.__sse;
  const es = new EventSource("/sse?conv_id=" + conv);
  es.addEventListener("ws.hello", (e) => s.hellos.push(JSON.parse(e.data).gateway_id));
  es.addEventListener("ws.subscribed", () => { s.subscribed += 1; });
  es.addEventListener("ws.reset", (e) => s.resets.push(JSON.parse(e.data)));
  es.addEventListener("chat.msg", (e) => { s.seqs.push(JSON.parse(e.data).seq); s.ids.push(e.lastEventId); });
  es.onerror = () => { s.errors += 1; };
  window.__es = es;
}
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(gateways=2, gateway_args=["--drain-seconds", "1", "--sse-retry-ms", "200"],
                         stop_timeout=8) as c:
        yield c


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context()
    pg = context.new_page()
    failed_before = request.session.testsfailed
    try:
        yield pg
    finally:
        if request.session.testsfailed > failed_before:
            with contextlib.suppress(Exception):
                ARTIFACTS.mkdir(exist_ok=True)
                pg.screenshot(path=str(ARTIFACTS / f"sse-browser-FAILED-{request.node.name}.png"))
        context.close()


def state(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = page.evaluate("() => JSON.parse(JSON.stringify(window.__sse))")
    return value


def wait_state(page: Page, what: str, ok: Any, timeout: float = WAIT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        current = state(page)
        if ok(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; page state: {current}")
        page.wait_for_timeout(25)


def publish(http: httpx.Client, conv: str, i: int, deadline: float) -> dict[str, Any]:
    """Publish event ``i`` (id ``e{i}``, so a retry is idempotent) through nginx until it lands."""
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = http.post(f"/v1/conversations/{conv}/events", json={"type": "chat.msg", "data": {"i": i},
                                                                  "id": f"e{i}"})
            if r.status_code == 200:
                body: dict[str, Any] = r.json()
                return body
            last = (r.status_code, r.text[:200])
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"publish {i} never succeeded: {last!r}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm-drain"])
def test_eventsource_through_nginx_survives_a_stopped_gateway(cluster: LoopbackCluster, page: Page, sig: int) -> None:
    """SIGKILL: the connection just dies. SIGTERM: the gateway drains, ends the stream (and ends at
    once any stream opened on it meanwhile); either way EventSource reconnects elsewhere and resumes."""
    for i, child in enumerate(cluster.gateways):
        if not child.running:
            cluster.start_gateway(i)
    conv, events = "sse-" + secrets.token_hex(4), 40
    page.goto(cluster.url + "/healthz")  # any page of the load balancer's origin
    page.evaluate(OPEN_STREAM, [conv])
    first = wait_state(page, "the stream to open", lambda s: s["subscribed"] == 1)
    victim_id = first["hellos"][0]
    victim = next(i for i in range(2) if cluster.gateway_id(i) == victim_id)

    with httpx.Client(base_url=cluster.url, timeout=5) as http:
        deadline = time.monotonic() + 40
        epoch = publish(http, conv, 0, deadline)["epoch"]
        # unbuffered: the first event reaches the page while the response is still open
        wait_state(page, "event 1 through nginx", lambda s: s["seqs"] == [1])
        for i in range(1, events // 2):
            publish(http, conv, i, deadline)
        wait_state(page, "the first half", lambda s: len(s["seqs"]) == events // 2)
        assert cluster.stop_gateway(victim, sig) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        for i in range(events // 2, events):  # published while the browser reconnects
            publish(http, conv, i, deadline)

    final = wait_state(page, f"seq 1..{events} after the reconnect", lambda s: len(s["seqs"]) >= events)
    assert final["seqs"] == list(range(1, events + 1)), final
    assert final["ids"] == [f"{epoch}:{seq}" for seq in range(1, events + 1)]
    assert final["resets"] == []
    assert final["errors"] >= 1 and final["subscribed"] >= 2, final  # it did lose the stream and come back
    assert final["hellos"][-1] != victim_id, final
    page.evaluate("() => window.__es.close()")


def test_shipped_proxies_pass_sse_unbuffered_with_long_timeouts() -> None:
    conf = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    block = conf[conf.index("location = /sse {"):]
    block = block[:block.index("}")]
    for directive in ("proxy_buffering off;", "proxy_cache off;", "proxy_read_timeout 3600s;",
                      "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "error_page 502 503 504 =200 @sse_retry;"):
        assert directive in block, directive
    ingress = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "ingress.yaml").read_text())
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    paths = {p["path"]: p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths["/sse"]["pathType"] == "Exact"


def test_nginx_turns_no_gateway_into_a_retry_and_passes_refusals(cluster: LoopbackCluster,
                                                                  tmp_path: Path) -> None:
    """EventSource stops for good on any status but 200: with no gateway to take the stream, the shipped
    nginx answers an empty 200 stream saying ``retry:`` (the browser comes back); a gateway's own
    refusal (here 400) still reaches the client as it is."""
    import shutil

    from devtools.cluster import render_nginx_prefix
    from devtools.procs import Supervised, free_port

    for i, child in enumerate(cluster.gateways):
        if not child.running:
            cluster.start_gateway(i)
    refused = httpx.get(cluster.url + "/sse?conv_id=x&convid=typo", timeout=5)
    assert refused.status_code == 400 and refused.json()["error"] == "bad_request"

    dead, lb_port = free_port(), free_port()  # nothing listens on `dead`
    conf = render_nginx_prefix(tmp_path, REPO / "deploy" / "nginx" / "nginx.conf", "127.0.0.1", lb_port, [dead])
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = Supervised("nginx", [nginx_bin, "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr", "-g",
                                 "daemon off;"], tmp_path / "nginx.out").start()
    try:
        nginx.wait_until(lambda: _listening(lb_port), 10, what=f"nginx on {lb_port}")
        answer = httpx.get(f"http://127.0.0.1:{lb_port}/sse?conv_id=x", timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert answer.text.startswith("retry: 1000\n") and "data:" not in answer.text
    finally:
        nginx.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


JS_CLIENT = """
async ([conv, transport]) => {
  const { BroadcasterClient } = await import("/client/broadcaster-client.js");
  // behind a proxy that refuses upgrades, a websocket never opens
  class BlockedWebSocket {
    constructor() {
      this.readyState = 0;
      setTimeout(() => { this.readyState = 3; this.onclose?.({ code: 1006 }); }, 5);
    }
    send() {}
    close() {}
  }
  const s = (window.__js = { seqs: [], transports: [], statuses: [] });
  const client = new BroadcasterClient({ url: "/ws", transport, WebSocket: BlockedWebSocket, pingIntervalMs: 0,
                                         backoff: { initialMs: 50, maxMs: 300 } });
  client.on("event", (e) => s.seqs.push(e.seq));
  client.on("transport", (d) => s.transports.push(d.transport));
  client.on("status", (d) => s.statuses.push(d.status));
  client.on("subscribed", () => { s.subscribed = true; s.transport = client.transport; });
  client.subscribe(conv, { since: 0 });
  window.__client = client;
}
"""


@pytest.mark.parametrize("transport", ["sse", "auto"])
def test_js_client_sse_transport_in_chromium_through_nginx(cluster: LoopbackCluster, page: Page,
                                                          transport: str) -> None:
    """The JS client's SSE transport in a real browser (fetch streaming through nginx); ``auto`` gets there
    after its websocket fails to open."""
    for i, child in enumerate(cluster.gateways):
        if not child.running:
            cluster.start_gateway(i)
    conv = "jsse-" + secrets.token_hex(4)
    with httpx.Client(base_url=cluster.url, timeout=5) as http:
        deadline = time.monotonic() + 20
        for i in range(3):
            publish(http, conv, i, deadline)
        page.goto(cluster.url + "/healthz")
        page.evaluate(JS_CLIENT, [conv, transport])
        _wait_js(page, "the replay over SSE", lambda s: s["seqs"] == [1, 2, 3])
        for i in range(3, 6):
            publish(http, conv, i, deadline)
        final = _wait_js(page, "live events over SSE", lambda s: s["seqs"] == [1, 2, 3, 4, 5, 6])
    assert final["transport"] == "sse"
    assert final["transports"] == (["sse"] if transport == "auto" else [])
    page.evaluate("() => window.__client.close()")


def _wait_js(page: Page, what: str, ok: Any) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        current: dict[str, Any] = page.evaluate("() => JSON.parse(JSON.stringify(window.__js || {}))")
        if current and ok(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; page state: {current}")
        page.wait_for_timeout(25)
