"""The demo page as a live inspector (issue #19), in the system Chromium driven by Playwright.

What it must show: a marker for seqs the profile hides (a gap is never silent), the
publish time and delivering gateway of every event, presence, reconnects, resumes and
``ws.reset`` as they happen, and events per second on a canvas; it connects on load
(``autoconnect=0`` waits for the button). Screenshots are kept in ``test-artifacts/``.
The browser fixtures are the ones of ``tests/test_browser.py`` (system Chromium, fail
rather than skip when it is missing).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from producers import Producer
from tests.support.gateway import GatewayProcess
from tests.test_browser import browser, page  # noqa: F401  (fixtures)

try:
    from playwright.sync_api import Page
except ImportError:  # pragma: no cover - the browser fixture fails with the reason
    Page = object  # type: ignore[assignment,misc]

pytestmark = pytest.mark.timeout(90)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WAIT = 15.0
MEMORY = {"BROADCASTER_REDIS_URL": ""}  # empty = unset: the embedded backend


def _conv() -> str:
    return "inspector-" + secrets.token_hex(4)


def _text(pg: Page, selector: str) -> str:
    return (pg.text_content(selector) or "").strip()


def _rows(pg: Page) -> list[tuple[int, str]]:
    found: list[list[str]] = pg.eval_on_selector_all(
        "#events li.event", "els => els.map(e => [e.dataset.seq, e.dataset.type])")
    return [(int(seq), kind) for seq, kind in found]


def _notes(pg: Page, kind: str) -> list[str]:
    return list(pg.eval_on_selector_all(f"#events li.note.{kind}", "els => els.map(e => e.textContent)"))


def _until(pg: Page, check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        pg.wait_for_timeout(50)  # poll interval
    listing = pg.eval_on_selector_all("#events li", "els => els.map(e => e.className + ': ' + e.textContent)")
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; status "
                         f"{pg.get_attribute('#status', 'data-status')!r}; list {listing[-12:]}; "
                         f"problems {pg.problems}")  # type: ignore[attr-defined]


def _screenshot(pg: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    pg.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000, f"empty screenshot {path}"


@pytest.fixture
def gateway() -> Iterator[GatewayProcess]:
    with GatewayProcess("--gateway-id", "gw-inspect", "--drain-seconds", "1", env=MEMORY) as gw:
        yield gw


def test_hidden_seqs_time_gateway_presence_and_rate(page: Page, gateway: GatewayProcess) -> None:  # noqa: F811
    conv = _conv()
    with Producer.from_url(gateway.http_url) as producer:
        for kind in ("chat.message", "debug.trace", "debug.trace", "chat.message"):
            producer.publish(conv, kind, {"kind": kind})
        page.goto(f"{gateway.http_url}/?conv={conv}")  # no autoconnect parameter: it connects on load
        _until(page, lambda: _rows(page) == [(1, "chat.message"), (4, "chat.message")], "events 1 and 4")

        gap = page.locator("#events li.gap")
        assert gap.count() == 1
        assert (gap.get_attribute("data-from"), gap.get_attribute("data-to")) == ("2", "3")
        assert "2\u20133" in (gap.text_content() or "") and "hidden by profile 'default'" in (gap.text_content() or "")
        # the marker sits between the rows it separates
        order = page.eval_on_selector_all("#events li.event, #events li.gap", "els => els.map(e => e.className)")
        assert order == ["event", "gap", "event"], order

        first = page.locator('#events li.event[data-seq="1"]')
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", first.locator(".time").text_content() or "")
        assert first.locator(".gateway").text_content() == "gw-inspect"
        assert _text(page, "#stat-gateway") == "gw-inspect"
        assert _text(page, "#stat-hidden") == "2" and _text(page, "#stat-shown") == "2"
        assert _text(page, "#stat-latest") == "4"
        _until(page, lambda: _text(page, "#presence") == "1", "presence 1")
        _until(page, lambda: "default: 1" in _text(page, "#presence-profiles"), "presence by profile")
        assert _notes(page, "connection") and "connected to gateway gw-inspect" in _notes(page, "connection")[0]

        producer.publish_many([(conv, "chat.message", {"n": i}) for i in range(30)])
        _until(page, lambda: len(_rows(page)) == 32, "the 30 live events")
        _until(page, lambda: int(_text(page, "#rate-total") or 0) >= 34, "the rate chart counting every seq")
        drawn = page.evaluate("""() => {
            const c = document.getElementById("rate");
            const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
            return n;
        }""")
        assert drawn > 50, f"the chart drew {drawn} pixels"

    # the event list fills the page rather than a strip of it
    box = page.locator("#events-panel").bounding_box()
    assert box is not None and box["height"] >= 0.5 * 900, box
    assert page.problems == [], page.problems  # type: ignore[attr-defined]
    _screenshot(page, "demo-inspector.png")


def test_reconnect_resume_and_reset_appear_as_they_happen(page: Page) -> None:  # noqa: F811
    conv = _conv()
    first = GatewayProcess("--gateway-id", "gw-a", "--drain-seconds", "1", env=MEMORY).start()
    port = first.port
    second: GatewayProcess | None = None
    try:
        with Producer.from_url(first.http_url) as producer:
            producer.publish(conv, "chat.message", {"text": "one"})
            producer.publish(conv, "chat.message", {"text": "two"})
        page.goto(f"{first.http_url}/?conv={conv}&autoconnect=1")
        _until(page, lambda: [seq for seq, _ in _rows(page)] == [1, 2], "events 1-2")

        first.stop()  # drains: close 1012; the memory backend's conversation is gone with it
        _until(page, lambda: any("disconnected from gw-a" in n and "1012" in n for n in _notes(page, "connection")),
               "the disconnect note")
        second = GatewayProcess("--gateway-id", "gw-b", "--drain-seconds", "1", env=MEMORY, port=port).start()
        _until(page, lambda: any("reconnected to gateway gw-b" in n and "resuming after seq 2" in n
                                 for n in _notes(page, "connection")), "the reconnect note", 30)
        _until(page, lambda: any("epoch_changed" in n for n in _notes(page, "reset")), "the ws.reset note")
        assert _text(page, "#stat-reconnects") == "1" and _text(page, "#stat-resets") == "1"
        assert _text(page, "#stat-gateway") == "gw-b"

        httpx.post(f"{second.http_url}/v1/conversations/{conv}/events",
                   json={"type": "chat.message", "data": {"text": "new epoch"}}).raise_for_status()
        _until(page, lambda: [seq for seq, _ in _rows(page)] == [1, 2, 1], "seq 1 of the new epoch")
        latest = page.locator("#events li.event").last
        assert latest.locator(".gateway").text_content() == "gw-b"
        assert page.locator("#events li.gap").count() == 0  # a reset is not a hidden range
        assert not [p for p in page.problems if "page error" in p], page.problems  # type: ignore[attr-defined]
        _screenshot(page, "demo-inspector-reset.png")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_autoconnect_0_waits_for_the_button(page: Page, gateway: GatewayProcess) -> None:  # noqa: F811
    conv = _conv()
    page.goto(f"{gateway.http_url}/?conv={conv}&autoconnect=0")
    _until(page, lambda: page.get_attribute("#status", "data-status") == "idle", "status idle")
    assert "press Connect" in _text(page, "#status-detail")
    presence = httpx.get(f"{gateway.http_url}/v1/conversations/{conv}/presence").json()
    assert presence["connections"] == 0
    page.click("#connect")
    _until(page, lambda: page.get_attribute("#status", "data-status") == "open", "status open after Connect")
