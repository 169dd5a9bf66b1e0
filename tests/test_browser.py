"""The demo page (gateway/static) in a real headless Chromium, driven by Playwright.

What a user of the demo sees: the page loads the JS client from ``/client/broadcaster-client.js``
and connects; events published with the SDK (and with the page's own form) show up as rows
with their seq and type; when the gateway restarts, the page reconnects on its own and shows
the events published while it was down, in order and once each.

Chromium is the system one (``/usr/bin/chromium``, or ``$BROADCASTER_TEST_CHROMIUM``):
Playwright's own browser downloads are not used. Without Chromium these tests FAIL (CI
installs it); they do not skip. A screenshot of each test's page ends in ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.gateway import GatewayProcess

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - reported by the fixture below
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(60)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
WAIT = 15.0  # seconds: any single UI expectation
RECONNECT_WAIT = 30.0  # seconds: the client backs off exponentially while the gateway is down

# Every status the page shows, in order, recorded from the first script on (before app.js runs).
RECORD_STATUSES = """
window.__statuses = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("status");
  window.__statuses.push(el.dataset.status);
  new MutationObserver(() => {
    const s = el.dataset.status;
    if (window.__statuses[window.__statuses.length - 1] !== s) window.__statuses.push(s);
  }).observe(el, { attributes: true, childList: true, characterData: true, subtree: true });
});
"""


def chromium_path() -> str:
    override = os.environ.get("BROADCASTER_TEST_CHROMIUM")
    candidates = [override] if override else ["/usr/bin/chromium", "chromium", "chromium-browser"]
    for candidate in candidates:
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    pytest.fail(f"Chromium not found (looked for {candidates}): the browser tests need it. "
                "Install it with `apt-get install -y chromium` (.ci/run does), or point "
                "BROADCASTER_TEST_CHROMIUM at a Chromium binary.")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.fail("the `playwright` Python package is missing: pip install -e '.[test]' "
                    "(no `playwright install` needed: the tests use the system Chromium)")
    executable = chromium_path()
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
        except Exception as exc:
            pytest.fail(f"could not launch Chromium at {executable}: {exc}")
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh context and page; page errors and console errors are collected on ``page.problems``."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(WAIT * 1000)
    context.add_init_script(RECORD_STATUSES)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    pg.problems = problems  # type: ignore[attr-defined]
    failed_before = request.session.testsfailed
    try:
        yield pg
    finally:
        if request.session.testsfailed > failed_before:  # leave a picture of the state it failed in
            with contextlib.suppress(Exception):
                ARTIFACTS.mkdir(exist_ok=True)
                pg.screenshot(path=str(ARTIFACTS / f"browser-FAILED-{request.node.name}.png"), full_page=True)
        context.close()


# ---- helpers ---------------------------------------------------------------------------------

def new_conv() -> str:
    return "browser-" + secrets.token_hex(4)


def rows(page: Page) -> list[tuple[int, str]]:
    """(seq, type) of every event row, top to bottom."""
    found: list[list[str]] = page.eval_on_selector_all(
        "#events li.event", "els => els.map(e => [e.dataset.seq, e.dataset.type])")
    return [(int(seq), typ) for seq, typ in found]


def status(page: Page) -> str:
    return str(page.get_attribute("#status", "data-status"))


def statuses(page: Page) -> list[str]:
    return list(page.evaluate("window.__statuses"))


def describe(page: Page) -> str:
    return (f"status={status(page)!r} (history {statuses(page)}), rows={rows(page)}, "
            f"notes={page.eval_on_selector_all('#events li.note', 'els => els.map(e => e.textContent)')}, "
            f"problems={page.problems}")  # type: ignore[attr-defined]


def wait_until(page: Page, check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {describe(page)}")


def open_demo(page: Page, gw: GatewayProcess, conv: str) -> None:
    page.goto(f"{gw.http_url}/?conv={conv}&profile=default&autoconnect=1")
    wait_until(page, lambda: status(page) == "open", "status 'open'")


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000, f"empty screenshot {path}"
    return path


@pytest.fixture
def memory_gateway() -> Iterator[GatewayProcess]:
    env = {"BROADCASTER_REDIS_URL": ""}  # empty = unset: the embedded memory backend
    with GatewayProcess("--drain-seconds", "1", env=env) as gw:
        yield gw


def _delete_prefix(url: str, prefix: str) -> None:
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


# ---- tests -----------------------------------------------------------------------------------

def test_page_loads_and_connects(page: Page, memory_gateway: GatewayProcess) -> None:
    conv = new_conv()
    open_demo(page, memory_gateway, conv)
    assert page.title() == "ws-broadcaster demo"
    assert page.input_value("#conv") == conv
    # Presence counts this page's own connection (polled every 2 s).
    wait_until(page, lambda: page.text_content("#presence") == "1", "presence 1")
    assert rows(page) == []
    assert page.problems == [], page.problems  # type: ignore[attr-defined]
    screenshot(page, "browser-connected.png")


def test_published_events_appear_as_rows(page: Page, memory_gateway: GatewayProcess) -> None:
    from producers import Producer

    conv = new_conv()
    with Producer.from_url(memory_gateway.http_url) as producer:
        first = producer.publish(conv, "chat.message", {"text": "before the page"})
        assert first.seq == 1
        open_demo(page, memory_gateway, conv)
        # History replay (since 0), then live events.
        wait_until(page, lambda: rows(page) == [(1, "chat.message")], "the replayed event")
        live = producer.publish(conv, "llm.delta", {"text": "live from the SDK"})
        assert live.seq == 2
        wait_until(page, lambda: len(rows(page)) == 2, "the live event")

    # The page's own publish form goes through the HTTP API.
    page.fill("#pub-type", "tool.call")
    page.fill("#pub-data", '{"tool": "search", "q": "from the form"}')
    page.click("#publish")
    wait_until(page, lambda: len(rows(page)) == 3, "the event published with the form")
    assert rows(page) == [(1, "chat.message"), (2, "llm.delta"), (3, "tool.call")]
    assert "published seq 3" in (page.text_content("#pub-result") or "")
    row = page.locator('#events li.event[data-seq="2"]')
    assert row.locator(".type").text_content() == "llm.delta"
    assert "live from the SDK" in (row.locator(".data").text_content() or "")
    assert page.problems == [], page.problems  # type: ignore[attr-defined]
    screenshot(page, "browser-events.png")


def test_page_reconnects_after_gateway_restart_without_gaps_or_duplicates(
        page: Page, redis_url: str, key_prefix: str) -> None:
    from producers import Producer

    conv = new_conv()
    args = ("--redis-url", redis_url, "--key-prefix", key_prefix, "--drain-seconds", "1")
    gw = GatewayProcess(*args).start()
    port = gw.port
    producer = Producer.from_url(redis_url, key_prefix=key_prefix)
    try:
        for i in range(1, 4):
            assert producer.publish(conv, "chat.message", {"text": f"before {i}"}).seq == i
        open_demo(page, gw, conv)
        wait_until(page, lambda: [s for s, _ in rows(page)] == [1, 2, 3], "events 1-3")

        gw.stop()  # SIGTERM: the gateway drains (close 1012) and exits
        wait_until(page, lambda: status(page) != "open", "the page to notice the gateway is gone")
        # Published while no gateway runs: straight into Redis (history + fan-out script).
        down = [producer.publish(conv, "llm.delta", {"text": f"while down {i}"}) for i in range(1, 4)]
        assert [r.seq for r in down] == [4, 5, 6]
        page.wait_for_timeout(300)
        assert [s for s, _ in rows(page)] == [1, 2, 3], describe(page)

        gw = GatewayProcess(*args, port=port).start()  # same port: the page's URL
        wait_until(page, lambda: status(page) == "open", "the page to reconnect", RECONNECT_WAIT)
        wait_until(page, lambda: len(rows(page)) >= 6, "the events published while down")
        assert producer.publish(conv, "chat.message", {"text": "after"}).seq == 7
        wait_until(page, lambda: len(rows(page)) >= 7, "the live event after the restart")
        page.wait_for_timeout(300)  # room for a late duplicate to show

        expected = ([(i, "chat.message") for i in (1, 2, 3)] + [(i, "llm.delta") for i in (4, 5, 6)]
                    + [(7, "chat.message")])
        assert rows(page) == expected, describe(page)
        history = statuses(page)
        first_open = history.index("open")
        assert "open" in history[first_open + 1:] and len(history) > first_open + 2, history
        assert page.locator("#events li.note.reset").count() == 0, describe(page)
        # Counted once across the restart: the stopped gateway withdrew its count, the new one reports it.
        wait_until(page, lambda: page.text_content("#presence") == "1", "presence 1 after the restart")
        assert not [p for p in page.problems if "page error" in p], page.problems  # type: ignore[attr-defined]
        path = screenshot(page, "browser-after-restart.png")
        assert path.is_file()
    finally:
        producer.close()
        gw.stop()
        _delete_prefix(redis_url, key_prefix)


def message_text(page: Page, key: str) -> str | None:
    """The text of entity ``key``'s message in the state panel, or None if it has none."""
    found = page.query_selector(f'#state dd[data-key="{key}"] p.message')
    return None if found is None else str(found.text_content())


def test_streamed_answer_grows_in_one_message_and_survives_a_reload(
        page: Page, memory_gateway: GatewayProcess) -> None:
    """#17: an answer streamed with op=append shows as one growing message; a reload mid-answer
    shows the whole message so far (from the hydrated state), then the rest as it comes."""
    from producers import Producer

    conv = new_conv()
    tokens = [f"word{i} " for i in range(30)]
    with Producer.from_url(memory_gateway.http_url) as producer:
        page.goto(f"{memory_gateway.http_url}/?conv={conv}&hydrate=1&autoconnect=1")
        wait_until(page, lambda: status(page) == "open", "status 'open'")
        for t in tokens[:10]:
            producer.publish(conv, "llm.message", {"text": t}, key="answer", op="append")
        wait_until(page, lambda: message_text(page, "answer") == "".join(tokens[:10]), "the first ten tokens")
        assert len(page.query_selector_all("#state dd")) == 1  # one entry, not one per token

        page.reload()  # mid-answer: the page hydrates and must show the whole message so far
        wait_until(page, lambda: status(page) == "open", "status 'open' after the reload")
        wait_until(page, lambda: message_text(page, "answer") == "".join(tokens[:10]), "the message so far")
        for t in tokens[10:]:
            producer.publish(conv, "llm.message", {"text": t}, key="answer", op="append")
        producer.publish(conv, "llm.message", {"text": "".join(tokens), "done": True}, key="answer")
    wait_until(page, lambda: message_text(page, "answer") == "".join(tokens), "the whole answer")
    assert '"done":true' in str(page.text_content('#state dd[data-key="answer"]'))
    assert page.problems == [], page.problems  # type: ignore[attr-defined]
    screenshot(page, "browser-streamed-answer.png")
