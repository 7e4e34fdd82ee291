"""The call board and relay-client.js in a real browser: Debian's Chromium driven by Playwright.

The browser is never downloaded: without /usr/bin/chromium these tests skip, or fail when
RELAY_TEST_STRICT=1. One browser serves the whole module; each test gets fresh browser contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    Dialog,
    Locator,
    Page,
    Request,
    async_playwright,
    expect,
)

from relay.app import create_app
from relay.auth import TokenIssuer
from relay.demo import DemoStack, demo_settings, demo_stack
from relay.serving import running_server
from relay.simulator import Simulator

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
    "--no-first-run",
]
POP_BUDGET_SECONDS = 0.5  # DialStack's Screen Pop rule: the record pops within 500 ms
WAIT_MS = 10_000  # upper bound of any wait for the page; reconnections back off for seconds
ACCT = "acct_demo"
OTHER = "acct_other"
CALLER = "+14155550123"
LINE = "+14155559876"

OpenPage = Callable[[str], Awaitable[Page]]


def chromium_path() -> str:
    """Debian's Chromium (apt install chromium); a test run never downloads a browser."""
    if os.access(CHROMIUM, os.X_OK):
        return str(CHROMIUM)
    message = f"{CHROMIUM} is missing: install Debian's chromium package to run the browser tests"
    if os.environ.get("RELAY_TEST_STRICT") == "1":
        pytest.fail(message)
    pytest.skip(message)


def incoming(call_id: str | None, name: str | None, number: str = CALLER) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event": "call.incoming",
        "from_number": number,
        "from_name": name,
        "to_number": LINE,
        "user_id": None,
    }
    if call_id is not None:
        data["call_id"] = call_id
    return data


def progress(kind: str, call_id: str, number: str = CALLER, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "call_id": call_id, "from_number": number, "to_number": LINE, **fields}


def card(page: Page, call_id: str) -> Locator:
    return page.locator(f'.call[data-call-id="{call_id}"]')


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[DemoStack]:
    async with demo_stack(call_interval_seconds=None) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Opens pages in fresh contexts; fails the test on any uncaught error or dialog in them."""
    contexts: list[BrowserContext] = []
    problems: list[str] = []

    async def open_at(url: str) -> Page:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

        async def dismiss(dialog: Dialog) -> None:
            problems.append(f"dialog: {dialog.message}")
            await dialog.dismiss()

        page.on("dialog", dismiss)
        await page.goto(url)
        return page

    yield open_at
    for context in contexts:
        await context.close()
    assert problems == []


async def open_board(open_page: OpenPage, relay_url: str, token: str) -> Page:
    page = await open_page(f"{relay_url}/#token={token}")
    await expect(page.locator("#relay-link")).to_have_attribute("data-state", "open")
    return page


# --- the board -------------------------------------------------------------------------------


async def test_incoming_call_pops_within_500ms_and_follows_the_call(
    stack: DemoStack, open_page: OpenPage
) -> None:
    page = await open_board(open_page, stack.relay_url, stack.token(ACCT))
    await expect(page.locator("#account")).to_have_text(ACCT)
    pop = card(page, "call_pop")

    started = time.perf_counter()
    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_pop", "John Smith"))
    await pop.wait_for(state="visible", timeout=WAIT_MS)
    assert time.perf_counter() - started < POP_BUDGET_SECONDS

    await expect(pop.locator(".caller")).to_have_text("John Smith")
    await expect(pop.locator(".number")).to_have_text("+1 (415) 555-0123")
    await expect(pop.locator(".line")).to_have_text("+1 (415) 555-9876")
    await expect(pop).to_have_attribute("data-status", "ringing")

    await stack.simulator.inject(ACCT, "call.answered", progress("call.answered", "call_pop"))
    await expect(pop).to_have_attribute("data-status", "answered")
    await expect(pop.locator(".status")).to_have_text("On call")

    transfer = progress("call.transfer", "call_pop", transferred_to="1001")
    await stack.simulator.inject(ACCT, "call.transfer", transfer)
    await expect(pop.locator(".transfer")).to_have_text("ext. 1001")

    end = progress("call.end", "call_pop", status="completed", duration_seconds=325)
    await stack.simulator.inject(ACCT, "call.end", end)
    await expect(pop).to_have_attribute("data-status", "ended")
    await expect(pop.locator(".status")).to_have_text("Ended")
    await expect(pop.locator(".elapsed")).to_have_text("5:25")
    await expect(page.locator(".call")).to_have_count(1)


async def test_unknown_caller_without_call_id_gets_a_card_that_later_events_adopt(
    stack: DemoStack, open_page: OpenPage
) -> None:
    page = await open_board(open_page, stack.relay_url, stack.token(ACCT))
    number = "+442079460123"
    await stack.simulator.inject(ACCT, "call.incoming", incoming(None, None, number))
    ringing = page.locator(".call").first
    await expect(ringing.locator(".caller")).to_have_text("Unknown caller")
    await expect(ringing.locator(".number")).to_have_text("+44 20 7946 0123")

    answered = progress("call.answered", "call_late_id", number)
    await stack.simulator.inject(ACCT, "call.answered", answered)
    await expect(card(page, "call_late_id")).to_have_attribute("data-status", "answered")
    await expect(page.locator(".call")).to_have_count(1)


async def test_caller_name_renders_as_text_never_as_html(
    stack: DemoStack, open_page: OpenPage
) -> None:
    page = await open_board(open_page, stack.relay_url, stack.token(ACCT))
    hostile = '<img src=x onerror="window.__pwned=1;alert(1)">'
    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_xss", hostile))

    await expect(card(page, "call_xss").locator(".caller")).to_have_text(hostile)
    assert await page.locator("img").count() == 0
    assert await page.evaluate("window.__pwned") is None


async def test_a_board_shows_only_the_calls_of_its_tokens_account(
    stack: DemoStack, open_page: OpenPage
) -> None:
    mine = await open_board(open_page, stack.relay_url, stack.token(ACCT))
    theirs = await open_board(open_page, stack.relay_url, stack.token(OTHER))

    await stack.simulator.inject(OTHER, "call.incoming", incoming("call_theirs", "Their Caller"))
    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_mine", "My Caller"))
    # Both events went through the same relay: once each page shows its own, the other had its chance.
    await expect(card(theirs, "call_theirs")).to_be_visible()
    await expect(card(mine, "call_mine")).to_be_visible()

    await expect(mine.locator(".call")).to_have_count(1)
    await expect(theirs.locator(".call")).to_have_count(1)
    await expect(mine.locator("#account")).to_have_text(ACCT)
    await expect(theirs.locator("#account")).to_have_text(OTHER)


async def test_board_screenshot_with_calls_in_every_state(
    stack: DemoStack, open_page: OpenPage, tmp_path: Path
) -> None:
    page = await open_board(open_page, stack.relay_url, stack.token(ACCT))
    inject = stack.simulator.inject
    await inject(ACCT, "call.incoming", incoming("call_s1", "María García", "+13125550142"))
    await inject(ACCT, "call.answered", progress("call.answered", "call_s1", "+13125550142"))
    await inject(
        ACCT, "call.end", progress("call.end", "call_s1", status="completed", duration_seconds=754)
    )
    await inject(ACCT, "call.incoming", incoming("call_s2", None, "+447700900456"))
    await inject(
        ACCT, "call.end", progress("call.end", "call_s2", status="missed", duration_seconds=0)
    )
    outbound = progress(
        "call.initiated", "call_s3", LINE, to_number="+12125550187", user_id="user_7"
    )
    await inject(ACCT, "call.initiated", {**outbound, "from_number": LINE})
    await inject(ACCT, "call.incoming", incoming("call_s4", "Siobhán O'Brien", "+16175550111"))
    await inject(ACCT, "call.answered", progress("call.answered", "call_s4", "+16175550111"))
    transfer = progress("call.transfer", "call_s4", "+16175550111", transferred_to="1004")
    await inject(ACCT, "call.transfer", transfer)
    await inject(ACCT, "call.incoming", incoming("call_s5", "ACME PLUMBING LLC", "+14045550163"))
    await inject(ACCT, "call.answered", progress("call.answered", "call_s5", "+14045550163"))
    await inject(ACCT, "call.incoming", incoming("call_s6", "Wei Zhang", "+12065550178"))

    await expect(card(page, "call_s6")).to_be_visible()
    await expect(card(page, "call_s4")).to_have_attribute("data-status", "transferred")
    await expect(page.locator("#count-ringing")).to_have_text("2")  # a ringing and a dialing call
    await expect(page.locator("#count-active")).to_have_text("2")
    await expect(page.locator("#count-ended")).to_have_text("2")
    await expect(page.locator(".call").first).to_have_attribute("data-call-id", "call_s6")

    shot = tmp_path / "board.png"
    await page.screenshot(path=shot, animations="disabled")
    assert shot.read_bytes().startswith(b"\x89PNG")


# --- outages ---------------------------------------------------------------------------------


class Outage:
    """A TCP forwarder in front of the relay: cutting it is, for the browser, the relay going away
    while the relay itself (and its replay buffer) stays up."""

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def open(self) -> str:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_reader, target_writer = await asyncio.open_connection(*self._target)
        pipes = [
            asyncio.create_task(self._pipe(reader, target_writer)),
            asyncio.create_task(self._pipe(target_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for end in (writer, target_writer):
                end.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        sink.close()


async def test_events_missed_during_an_outage_arrive_once_when_the_board_reconnects(
    stack: DemoStack, open_page: OpenPage
) -> None:
    outage = Outage(stack.relay_url)
    board_url = await outage.open()
    try:
        page = await open_board(open_page, board_url, stack.token(ACCT))
        await stack.simulator.inject(ACCT, "call.incoming", incoming("call_before", "Zoë Clarke"))
        await expect(card(page, "call_before")).to_be_visible()

        await outage.cut()
        await expect(page.locator('#banner[data-kind="relay-down"]')).to_be_visible(timeout=WAIT_MS)
        answered = progress("call.answered", "call_before")
        await stack.simulator.inject(ACCT, "call.answered", answered)
        await stack.simulator.inject(ACCT, "call.incoming", incoming("call_during", "Renée Dubois"))

        await outage.open()
        await expect(page.locator('#banner[data-kind="recovered"]')).to_have_text(
            "Back online.", timeout=WAIT_MS
        )
        await expect(card(page, "call_before")).to_have_attribute("data-status", "answered")
        await expect(card(page, "call_during")).to_be_visible()
        await expect(page.locator(".call")).to_have_count(2)
    finally:
        await outage.cut()


async def test_banner_shows_while_the_relay_is_stopped_and_clears_when_it_is_back(
    open_page: OpenPage,
) -> None:
    simulator = Simulator(accounts=(ACCT,), call_interval_seconds=None)
    async with simulator.serve() as simulator_url:
        # The same settings (and so the same token secret) for both runs of the relay.
        settings = demo_settings(simulator_url, simulator.secret_key)
        assert settings.auth.secret is not None
        issuer = TokenIssuer(settings.auth.secret.get_secret_value(), 600)
        token, _ = issuer.issue(ACCT, 600)

        async with running_server(create_app(settings)) as relay_url:
            page = await open_board(open_page, relay_url, token)
            await simulator.inject(ACCT, "call.incoming", incoming("call_first", "Oliver Taylor"))
            await expect(card(page, "call_first")).to_be_visible()
        banner = page.locator("#banner")
        await expect(banner).to_have_attribute("data-kind", "relay-down", timeout=WAIT_MS)
        await expect(banner).to_be_visible()

        port = urlsplit(relay_url).port
        assert port is not None
        async with running_server(create_app(settings), port=port):
            # A new relay process knows none of the old ids: the board hears relay.reset and says so.
            await expect(banner).to_have_attribute("data-kind", "recovered", timeout=WAIT_MS)
            await expect(banner).to_contain_text("may be missing")
            await simulator.inject(ACCT, "call.incoming", incoming("call_after", "Amelia Evans"))
            await expect(card(page, "call_after")).to_be_visible()
            await expect(card(page, "call_first")).to_be_visible()


async def test_banner_shows_while_the_upstream_is_down(open_page: OpenPage) -> None:
    async with demo_stack(call_interval_seconds=None, accounts=(ACCT,)) as own:
        page = await open_board(open_page, own.relay_url, own.token(ACCT))
        await expect(page.locator("#upstream-link")).to_have_attribute("data-state", "connected")

        faults = own.simulator.faults
        faults.fail_status, faults.fail_count = 503, 1_000
        faults.drop_every_seconds = 0.1  # ends the relay's open upstream stream
        banner = page.locator("#banner")
        await expect(banner).to_have_attribute("data-kind", "upstream-down", timeout=WAIT_MS)

        faults.fail_status, faults.fail_count, faults.drop_every_seconds = None, 0, None
        await expect(banner).to_have_attribute("data-kind", "recovered", timeout=WAIT_MS)
        await expect(banner).to_have_text("Back online.")


# --- relay-client.js on its own ----------------------------------------------------------------

CLIENT_SETUP = """async () => {
  const { connectRelay } = await import('/static/relay-client.js');
  window.fetches = 0;
  window.states = [];
  window.calls = [];
  window.tokens = [];
  window.relay = connectRelay({
    fetchToken: async () => {
      window.fetches += 1;
      return window.tokens.length ? window.tokens.shift() : { token: await window.mintToken() };
    },
    onStateChange: (state) => window.states.push(state),
  });
}"""


async def client_page(
    open_page: OpenPage, stack: DemoStack, ttl: int = 600
) -> tuple[Page, list[str]]:
    """A page of the relay's origin with relay-client.js loaded as `window.relay`, not yet connected.

    Returns the page and the /v1/events URLs it requests.
    """
    page = await open_page(f"{stack.relay_url}/healthz")
    streams: list[str] = []

    def requested(request: Request) -> None:
        if "/v1/events" in request.url:
            streams.append(request.url)

    page.on("request", requested)
    await page.expose_function("mintToken", lambda: stack.token(ACCT, ttl))
    await page.evaluate(CLIENT_SETUP)
    return page, streams


async def received(page: Page, count: int) -> list[Any]:
    await page.wait_for_function(f"window.calls.length >= {count}", timeout=WAIT_MS)
    calls: list[Any] = await page.evaluate("window.calls")
    return calls


async def test_client_connects_on_first_on_and_off_removes_handlers(
    stack: DemoStack, open_page: OpenPage
) -> None:
    page, streams = await client_page(open_page, stack)
    assert await page.evaluate("[window.relay.state, window.fetches]") == ["idle", 0]

    await page.evaluate("""() => {
        window.first = (data, meta) => window.calls.push(['first', data, meta]);
        window.second = (data, meta) => window.calls.push(['second', data.call_id, meta.type]);
        window.relay.on('call.incoming', window.first);
        window.relay.on('call.incoming', window.second);
        window.relay.on('call.incoming', window.second);  // once per handler, like addEventListener
        window.relay.on('note', (data) => window.calls.push(['note', data]));
    }""")
    # The first on() opened exactly one connection (which may already be open: it is fast).
    state, fetches = await page.evaluate("[window.relay.state, window.fetches]")
    assert (state, fetches) in (("connecting", 1), ("open", 1))
    await page.wait_for_function("window.relay.state === 'open'", timeout=WAIT_MS)
    assert len(streams) == 1

    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_c1", "A"))
    first, second = await received(page, 2)
    assert first[0] == "first"
    assert first[1]["call_id"] == "call_c1"
    assert first[2]["type"] == "call.incoming"
    assert first[2]["id"]
    assert second == ["second", "call_c1", "call.incoming"]

    await page.evaluate("window.relay.off('call.incoming', window.first)")
    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_c2", "B"))
    assert (await received(page, 3))[2] == ["second", "call_c2", "call.incoming"]

    await page.evaluate("window.relay.off('call.incoming')")
    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_c3", "C"))
    await stack.simulator.inject(ACCT, "note", "plain text, not JSON")
    assert (await received(page, 4))[3] == ["note", "plain text, not JSON"]
    assert len(await page.evaluate("window.calls")) == 4  # nothing for call_c3

    await page.evaluate("window.relay.close()")
    assert await page.evaluate("window.relay.state") == "closed"
    assert len(streams) == 1


async def test_client_refetches_its_token_when_the_relay_refuses_it(
    stack: DemoStack, open_page: OpenPage
) -> None:
    page, streams = await client_page(open_page, stack)
    await page.evaluate("""() => {
        window.tokens.push('not-a-valid-token');
        window.relay.on('call.incoming', (data) => window.calls.push(data.call_id));
    }""")
    await page.wait_for_function("window.relay.state === 'open'", timeout=WAIT_MS)
    assert await page.evaluate("[window.fetches, window.states]") == [
        2,
        ["connecting", "reconnecting", "open"],
    ]
    assert "token=not-a-valid-token" in streams[0]
    assert "token=not-a-valid-token" not in streams[1]

    await stack.simulator.inject(ACCT, "call.incoming", incoming("call_after_401", "D"))
    assert await received(page, 1) == ["call_after_401"]


async def test_client_renews_its_token_and_resumes_without_gaps_or_repeats(
    stack: DemoStack, open_page: OpenPage
) -> None:
    # Two-second tokens: the client renews each at 80% of its lifetime, reconnecting each time.
    page, streams = await client_page(open_page, stack, ttl=2)
    await page.evaluate(
        "window.relay.on('call.incoming', (data, meta) => window.calls.push([data.call_id, meta.id]))"
    )
    await page.wait_for_function("window.relay.state === 'open'", timeout=WAIT_MS)

    sent: list[str] = []
    async with asyncio.timeout(WAIT_MS / 1000):
        while len(streams) < 3:  # two renewals, events flowing all along
            call_id = f"call_r{len(sent)}"
            await stack.simulator.inject(ACCT, "call.incoming", incoming(call_id, "R"))
            sent.append(call_id)
            await asyncio.sleep(0.05)  # pacing the injections, not synchronisation
    last = f"call_r{len(sent)}"
    await stack.simulator.inject(ACCT, "call.incoming", incoming(last, "R"))
    sent.append(last)

    await page.wait_for_function(
        f"window.calls.some(([callId]) => callId === '{last}')", timeout=WAIT_MS
    )
    calls = await page.evaluate("window.calls")
    assert [call_id for call_id, _ in calls] == sent
    assert len({relay_id for _, relay_id in calls}) == len(sent)
    assert all("last_event_id=" in url for url in streams[1:])
    assert await page.evaluate("window.fetches") >= 3
    assert await page.evaluate("window.states") == ["connecting", "open"]
