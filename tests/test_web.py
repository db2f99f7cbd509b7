"""The operator's web page, driven by Debian's chromium through Playwright, against a
real `popguard up`: every screen's data, live updates through an injected hang and
its repair, the event stream's replay, the roles and CSRF, an acknowledgement, a
phone in dark mode, and the pages with JavaScript off.

The screenshots are kept in artifacts/web-screenshots/ (the test output names it).
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from popguard.testing.net import free_loopback_address
from popguard.testing.organization import popguard, popguard_output, wait_until

pytestmark = pytest.mark.timeout(900)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WEB_PORT = 8088
LIVE_TIMEOUT = 240_000  # ms: a hang is found and repaired within a minute or two on 2 cores

# An operator's own health set that alerts at once and escalates at once, on every
# mailbox server: there is an open alert to acknowledge within seconds of `up`.
ALERTING_SET = """
name = "Web.Test"
health_group = "ServiceComponents"
role = "mailbox"

[[probes]]
name = "WebTestCounterProbe"
kind = "counter"
counters = { pop3be = "AverageCommandProcessingTimeMs" }
recurrence = 3
timeout = 2

[[monitors]]
name = "WebTestMonitor"
kind = "sample-above"
probe = "WebTestCounterProbe"
threshold = 0.000001
samples = 1
ladder = [{ state = "Degraded", after = 0 }]

[[responders]]
name = "WebTestEscalate"
kind = "escalate"
monitor = "WebTestMonitor"
state = "Degraded"
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium (Playwright cannot download a browser of its own here), for
    this module only: Playwright's sync API runs an event loop in the test's thread
    while it is started, and pytest-playwright's session-wide browser would keep it
    running under every asyncio test that this xdist worker runs afterwards."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class WebOrganization:
    def __init__(self, data: Path, cas: str) -> None:
        self.data = data
        self.url = f"http://{cas}:{WEB_PORT}/"
        self.host = cas
        user, password = (data / "web-operator.txt").read_text().split()
        self.operator = (user, password)
        self.viewer = ("watcher", "viewer-password-1234")
        popguard_output(data, "new-webuser", self.viewer[0], "--role", "viewer",
                        "--password-stdin", stdin=self.viewer[1] + "\n")  # fmt: skip

    def cli_json(self, *args: str) -> Any:
        return json.loads(popguard_output(self.data, *args, "--format", "json"))


@pytest.fixture(scope="module")
def web_org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebOrganization]:
    data = tmp_path_factory.mktemp("web") / "data"
    data.mkdir(mode=0o700)
    config = data / "popguard.toml"
    config.write_text("[faults]\nenabled = true\n")
    config.chmod(0o600)
    sets = data / "health" / "sets"
    sets.mkdir(parents=True)
    (sets / "Web.Test.toml").write_text(ALERTING_SET)
    addresses = [free_loopback_address() for _ in range(3)]
    started = popguard(data, "up", "--detach", "--frontend-address", addresses[0], "--address",
                       addresses[1], "--second-address", addresses[2])  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        # `up` says where the page is and how to log in.
        assert f"web page    http://{addresses[0]}:{WEB_PORT}/ (on cas1)" in started.stdout
        assert f"password in {(data / 'web-operator.txt').resolve()}" in started.stdout
        assert (data / "web-operator.txt").stat().st_mode & 0o777 == 0o600
        yield WebOrganization(data, addresses[0])
    finally:
        popguard(data, "down")


# Kept after the run (pytest's own tmp dirs are rotated away by later runs).
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "web-screenshots"


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"test_web: screenshots in {SHOTS}")
    return SHOTS


def log_in(page: Page, org: WebOrganization, who: tuple[str, str]) -> None:
    page.goto(org.url + "login")
    page.fill("input[name=user]", who[0])
    page.fill("input[name=password]", who[1])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(org.url) + r"$"))


@pytest.fixture
def operator_page(browser: Browser, web_org: WebOrganization) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    log_in(page, web_org, web_org.operator)
    yield page
    context.close()


def session_cookie(context: BrowserContext) -> str:
    (cookie,) = [c for c in context.cookies() if c["name"] == "popguard_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return str(cookie["value"])


def post(org: WebOrganization, path: str, form: dict[str, str], cookie: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection(org.host, WEB_PORT, timeout=30)
    try:
        connection.request("POST", path, body=urlencode(form), headers={
            "Cookie": f"popguard_session={cookie}",
            "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_organization_page_lists_every_server_and_health_set(
    operator_page: Page, web_org: WebOrganization, shots: Path
) -> None:
    page = operator_page
    for server in ("cas1", "mbx1", "mbx2"):
        expect(page.locator("table.matrix th[scope=row]", has_text=server)).to_be_visible()
    headers = page.locator("table.matrix thead th").all_inner_texts()
    assert headers[:4] == ["Server", "POP", "POP.Protocol", "POP.Proxy"]
    assert "Web.Test" in headers  # the operator's own health set too

    def same_as_the_command() -> bool:
        """Each cell says what get-healthreport says (read just before: states move)."""
        report = {(r["Server"], r["HealthSet"]): r["AlertValue"]
                  for r in web_org.cli_json("get-healthreport")}  # fmt: skip
        page.reload()
        shown = {
            tuple((cell.get_attribute("data-cell") or "").split("|")): cell.inner_text().split()[-1]
            for cell in page.locator("[data-cell]").all()
            if cell.locator(".state").count()
        }
        return shown == report

    wait_until("the page's cells to be get-healthreport's", same_as_the_command, 120)
    copies = web_org.cli_json("get-mailboxdatabasecopystatus")
    for database in {c["Name"].split("\\")[0] for c in copies}:
        active = next(c["ActiveDatabaseCopy"] for c in copies if c["Name"].startswith(database))
        expect(page.locator(f'[data-active="{database}"]')).to_have_text(active)
    page.screenshot(path=shots / "organization.png", full_page=True)

    # No secret reaches any page: not the API token, nor a mailbox's password, nor a
    # health mailbox's credentials.
    secrets_here = [
        (web_org.data / "health" / "api-token").read_text().strip(),
        (web_org.data / "demo-mailbox.txt").read_text().split()[1],
        *(m["password"] for m in json.loads(
            (web_org.data / "health" / "mailboxes.json").read_text())["databases"].values()),
    ]  # fmt: skip
    for path in (
        "",
        "servers/mbx1",
        "servers/cas1",
        "recovery",
        "copies",
        "events",
        "probe?server=mbx1&identity=POP.Protocol%5CPopDeepTestProbe&resource=DB01",
    ):
        page.goto(web_org.url + path)
        html = page.content()
        assert "Server got itself in trouble" not in html
        for secret in secrets_here:
            assert secret not in html, path


CELL_HISTORY = """() => {
    window.notReloaded = true;
    window.cellShown = [];
    const note = () => {
        const state = document.querySelector('[data-cell="mbx1|POP.Protocol"] .state');
        const text = state ? state.textContent.trim() : "";
        if (text && window.cellShown[window.cellShown.length - 1] !== text) {
            window.cellShown.push(text);
        }
    };
    new MutationObserver(note).observe(document.body,
        {subtree: true, childList: true, characterData: true});
    note();
}"""


def test_a_hang_turns_the_cell_unhealthy_live_and_back_after_the_repair(
    operator_page: Page, web_org: WebOrganization, shots: Path
) -> None:
    page = operator_page
    cell = page.locator('[data-cell="mbx1|POP.Protocol"]')
    expect(cell).to_contain_text("Healthy", timeout=LIVE_TIMEOUT)
    # A mark on this very document: a reload would lose it. And every text the cell
    # shows, however briefly: the restart may mend the hang two seconds after the set
    # went Unhealthy, sooner than a poll of the page would look again.
    page.evaluate(CELL_HISTORY)
    hung = popguard(web_org.data, "inject-fault", "--server", "mbx1", "--service", "pop3be",
                    "--kind", "hang")  # fmt: skip
    assert hung.returncode == 0, hung.stderr
    injected = time.monotonic()
    page.wait_for_function("() => window.cellShown.some(t => t.includes('Unhealthy'))",
                           timeout=LIVE_TIMEOUT)  # fmt: skip
    found = time.monotonic() - injected
    page.screenshot(path=shots / "hang-found.png", full_page=True)
    expect(cell).to_contain_text("Healthy", timeout=LIVE_TIMEOUT)
    expect(cell).not_to_contain_text("Unhealthy")
    print(
        f"on the page: Unhealthy {found:.0f}s after the hang, Healthy again "
        f"{time.monotonic() - injected:.0f}s after it; the cell showed "
        f"{' / '.join(page.evaluate('window.cellShown'))}"
    )  # for the log
    # What repaired it shows on the same page, still without a reload.
    expect(page.locator("#latest")).to_contain_text("[restart-service] on pop3be: Succeeded",
                                                    timeout=60_000)  # fmt: skip
    assert page.evaluate("window.notReloaded") is True
    page.screenshot(path=shots / "hang-repaired.png", full_page=True)
    # The feed tells what happened: the state changes and the engine's restart.
    page.goto(web_org.url + "events")
    feed = page.locator("#feed")
    expect(feed).to_contain_text(re.compile(r"mbx1 POP\.Protocol: \w+ -> Unhealthy"))
    # Back to Healthy straight from Unhealthy or by way of Degraded (the monitor's
    # window may still hold a failed result when the repair's re-run succeeds).
    expect(feed).to_contain_text(re.compile(r"mbx1 POP\.Protocol: (Unhealthy|Degraded) -> Healthy"))
    expect(feed).to_contain_text("[restart-service] on pop3be: Succeeded", timeout=60_000)
    page.goto(web_org.url + "recovery")
    expect(page.locator("#actions")).to_contain_text("restart-service")


def read_events(org: WebOrganization, cookie: str, last: int | None, count: int) -> list[int]:
    """The ids of the first `count` events the stream sends after Last-Event-ID `last`."""
    connection = http.client.HTTPConnection(org.host, WEB_PORT, timeout=60)
    headers = {"Cookie": f"popguard_session={cookie}", "Accept": "text/event-stream"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    ids: list[int] = []
    try:
        connection.request("GET", "/stream", headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        deadline = time.monotonic() + 60
        while len(ids) < count and time.monotonic() < deadline:
            line = response.readline().decode()
            if line.startswith("id: "):
                ids.append(int(line.removeprefix("id: ")))
    finally:
        connection.close()
    return ids


def test_the_event_stream_replays_what_a_reconnecting_page_missed(
    operator_page: Page, web_org: WebOrganization
) -> None:
    page = operator_page
    cookie = session_cookie(page.context)
    page.goto(web_org.url + "servers/mbx2")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    before = int(page.locator("body").get_attribute("data-last-event") or 0)
    for number in range(3):
        status, _ = post(web_org, "/actions/invoke-monitoringprobe", {
            "csrf": csrf, "server": "mbx2", "identity": "POP.Protocol\\PopSelfTestProbe",
            "reason": f"replay test {number}", "back": "/servers/mbx2"}, cookie)  # fmt: skip
        assert status == 303

    def recorded() -> bool:
        page.goto(web_org.url + "events")
        return page.locator("#feed li", has_text="replay test 2").count() == 1

    wait_until("the three actions in the feed", recorded, 60)
    newest = int(page.locator("body").get_attribute("data-last-event") or 0)
    assert newest >= before + 3
    # A page that saw up to newest - 3 reconnects: it gets exactly what came after.
    ids = read_events(web_org, cookie, newest - 3, 3)
    assert ids == [newest - 2, newest - 1, newest]
    # The browser's own EventSource reconnects with Last-Event-ID and the page keeps
    # patching itself (its marker of live updates moves on).
    page.goto(web_org.url)
    expect(page.locator("#live-status")).to_contain_text("live", timeout=30_000)


def test_a_viewer_sees_no_buttons_and_a_post_without_csrf_is_refused(
    browser: Browser, web_org: WebOrganization, operator_page: Page
) -> None:
    context = browser.new_context()
    page = context.new_page()
    log_in(page, web_org, web_org.viewer)
    for path in ("servers/mbx1", "copies", "recovery"):
        page.goto(web_org.url + path)
        expect(page.locator("h1")).to_be_visible()
        assert page.locator("details.action").count() == 0, path
        assert page.locator("form[action^='/actions/']").count() == 0, path
    viewer_cookie = session_cookie(context)
    viewer_csrf = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    form = {"server": "mbx1", "identity": "POP.Protocol\\PopSelfTestProbe", "reason": "x"}
    status, text = post(web_org, "/actions/invoke-monitoringprobe", form | {"csrf": viewer_csrf},
                        viewer_cookie)  # fmt: skip
    assert status == 403 and "viewers" in text
    context.close()
    # An operator's POST without its CSRF token (or with another's) is refused too.
    operator_cookie = session_cookie(operator_page.context)
    assert post(web_org, "/actions/invoke-monitoringprobe", form, operator_cookie)[0] == 403
    status, text = post(web_org, "/actions/invoke-monitoringprobe",
                        form | {"csrf": viewer_csrf}, operator_cookie)  # fmt: skip
    assert status == 403 and "CSRF" in text
    status, _ = post(web_org, "/logout", {}, operator_cookie)
    assert status == 403


def test_an_acknowledgement_needs_a_reason_and_shows_in_the_feed(
    operator_page: Page, web_org: WebOrganization, shots: Path
) -> None:
    page = operator_page

    def open_alert() -> bool:
        alerts = web_org.cli_json("get-alerts", "--server", "mbx2")
        return any(a["MonitorName"] == "WebTestMonitor" and not a["ResolvedTime"]
                   for a in alerts)  # fmt: skip

    wait_until("an open alert on mbx2", open_alert, 120)
    page.goto(web_org.url + "recovery")
    row = page.locator("tr[data-alert^='mbx2|']", has_text="WebTestMonitor").first
    row.locator("summary", has_text="Acknowledge").click()
    reason = row.locator("input[name=reason]")
    # The browser asks for a reason; without the browser's check the server does.
    reason.evaluate("input => input.removeAttribute('required')")
    row.locator("button", has_text="Acknowledge").click()
    expect(page.locator(".error")).to_contain_text("say why (reason)")
    page.goto(web_org.url + "recovery")
    row = page.locator("tr[data-alert^='mbx2|']", has_text="WebTestMonitor").first
    row.locator("summary", has_text="Acknowledge").click()
    row.locator("input[name=reason]").fill("looking at the counters with the storage team")
    # An event arrives while the form is open: the page refreshes its other parts, and
    # leaves the one with the open form as it is.
    refreshed = int(page.locator("body").get_attribute("data-refreshed") or 0)
    csrf = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    status, _ = post(web_org, "/actions/invoke-monitoringprobe", {
        "csrf": csrf, "server": "mbx1", "identity": "POP.Protocol\\PopSelfTestProbe",
        "reason": "an event while a form is open"}, session_cookie(page.context))  # fmt: skip
    assert status == 303
    wait_until("the page to refresh itself",
               lambda: int(page.locator("body").get_attribute("data-refreshed") or 0) > refreshed,
               60)  # fmt: skip
    reason = row.locator("input[name=reason]")
    assert reason.input_value() == "looking at the counters with the storage team"
    row.locator("button", has_text="Acknowledge").click()
    expect(page.locator(".done")).to_contain_text("acknowledged", timeout=60_000)
    (acknowledged,) = [
        a for a in web_org.cli_json("get-alerts", "--server", "mbx2")
        if a["MonitorName"] == "WebTestMonitor" and a["AcknowledgedBy"]
    ][:1]  # fmt: skip
    assert acknowledged["AcknowledgedBy"] == web_org.operator[0]
    assert acknowledged["Acknowledgement"] == "looking at the counters with the storage team"
    page.goto(web_org.url + "events")
    feed = page.locator("#feed")
    expect(feed).to_contain_text(
        f"{web_org.operator[0]} ran acknowledge-alert on alert {acknowledged['Id']} on mbx2",
        timeout=30_000,
    )
    expect(feed).to_contain_text("looking at the counters with the storage team")
    page.screenshot(path=shots / "acknowledged.png", full_page=True)


def test_the_page_reads_on_a_phone_in_dark_mode(
    browser: Browser, web_org: WebOrganization, shots: Path
) -> None:
    phone: ViewportSize = {"width": 390, "height": 844}
    context = browser.new_context(viewport=phone, color_scheme="dark", device_scale_factor=2,
                                  is_mobile=True, has_touch=True)  # fmt: skip
    page = context.new_page()
    log_in(page, web_org, web_org.operator)
    expect(page.locator("table.matrix")).to_be_visible()
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
    assert red + green + blue < 120, background  # dark, from prefers-color-scheme
    # Nothing wider than the phone but the tables' own scrolling boxes.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    # State is told by text and a sign as well as colour.
    expect(page.locator('[data-cell="mbx2|POP"] .state')).to_contain_text(re.compile(r"[✔▲✖⚙○?]"))
    page.screenshot(path=shots / "phone-dark.png", full_page=True)
    page.goto(web_org.url + "servers/mbx1")
    page.screenshot(path=shots / "phone-dark-server.png", full_page=True)
    context.close()


def test_without_javascript_the_pages_still_show_the_data(
    browser: Browser, web_org: WebOrganization, shots: Path
) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    log_in(page, web_org, web_org.operator)
    for server in ("cas1", "mbx1", "mbx2"):
        expect(page.locator("table.matrix th[scope=row]", has_text=server)).to_be_visible()
    assert page.locator("noscript").first.inner_html().count("http-equiv") == 1
    page.goto(web_org.url + "servers/mbx1")
    services = {row["Name"] for row in web_org.cli_json("get-service", "--server", "mbx1")}
    for service in services:
        expect(page.locator("#services")).to_contain_text(service)
    page.goto(web_org.url + "copies")
    for copy in web_org.cli_json("get-mailboxdatabasecopystatus"):
        name = copy["Name"].replace("\\", "\\\\")  # a backslash in a CSS string
        expect(page.locator(f'tr[data-copy="{name}"]')).to_be_visible()
    page.goto(web_org.url + "probe?server=mbx1&identity=POP.Protocol%5CPopSelfTestProbe"
              "&resource=pop3be")  # fmt: skip
    expect(page.locator(".sq").first).to_be_visible()
    expect(page.locator("#uptime")).to_contain_text("24 h")
    page.screenshot(path=shots / "no-javascript-probe.png", full_page=True)
    context.close()


def test_an_operator_restarts_a_service_sets_maintenance_and_moves_a_database(
    operator_page: Page, web_org: WebOrganization
) -> None:
    page = operator_page
    # restart-service: a real restart. delivery is a master and its workers: the
    # master stays (it holds the port) and every worker is a new process.
    (before,) = [r for r in web_org.cli_json("get-service", "--server", "mbx2")
                 if r["Name"] == "delivery"]  # fmt: skip
    assert before["Workers"], before
    page.goto(web_org.url + "servers/mbx2")
    row = page.locator("#services tr", has_text="delivery")
    row.locator("summary", has_text="Restart").click()
    row.locator("input[name=reason]").fill("new TLS certificate")
    row.locator("button", has_text="Restart").click()
    expect(page.locator(".done")).to_contain_text("Running, process id", timeout=60_000)
    (after,) = [r for r in web_org.cli_json("get-service", "--server", "mbx2")
                if r["Name"] == "delivery"]  # fmt: skip
    assert after["Status"] == "Running" and after["ProcessId"] == before["ProcessId"]
    assert after["Workers"] and not set(after["Workers"].split()) & set(before["Workers"].split())
    expect(page.locator(".done")).to_contain_text(f"workers {after['Workers']}")

    # Maintenance: the component state for the Maintenance requester, and a monitor
    # disabled for a duration, as set-servercomponentstate and
    # add-servermonitoringoverride make them.
    page.goto(web_org.url + "servers/mbx2")
    maintenance = page.locator("details.action", has_text="Maintenance").last
    maintenance.locator("summary").click()
    maintenance.locator("select[name=state]").select_option("Active")
    maintenance.locator("input[name=monitor]").fill("POP.Protocol\\PopProcessRestartsMonitor")
    maintenance.locator("input[name=duration]").fill("0.00:05:00")
    maintenance.locator("input[name=reason]").fill("watching restarts by hand")
    maintenance.locator("button").click()
    expect(page.locator(".done")).to_contain_text("PopProcessRestartsMonitor disabled on mbx2",
                                                  timeout=60_000)  # fmt: skip
    (state,) = web_org.cli_json("get-servercomponentstate", "mbx2")
    assert state["Requesters"].get("Maintenance") == "Active"
    overrides = web_org.cli_json("get-servermonitoringoverride", "--server", "mbx2")
    assert any(o["Identity"] == "POP.Protocol\\PopProcessRestartsMonitor"
               and o["PropertyValue"] == "false" for o in overrides)  # fmt: skip

    # A move needs its confirmation; then DB02 is active on mbx1, as the command says.
    page.goto(web_org.url + "copies")
    row = page.locator('tr[data-copy="DB02\\\\mbx1"]')
    row.locator("summary", has_text="Make active").click()
    box = row.locator("input[name=confirm]")
    box.evaluate("input => input.removeAttribute('required')")
    row.locator("input[name=reason]").fill("mbx2 goes into maintenance")
    row.locator("button", has_text="Make active").click()
    expect(page.locator(".error")).to_contain_text("needs its confirmation box ticked")
    page.goto(web_org.url + "copies")
    row = page.locator('tr[data-copy="DB02\\\\mbx1"]')
    row.locator("summary", has_text="Make active").click()
    row.locator("input[name=confirm]").check()
    row.locator("input[name=reason]").fill("mbx2 goes into maintenance")
    row.locator("button", has_text="Make active").click()
    expect(page.locator(".done")).to_contain_text("Succeeded", timeout=150_000)
    copies = web_org.cli_json("get-mailboxdatabasecopystatus")
    assert {c["ActiveDatabaseCopy"] for c in copies if c["Name"].startswith("DB02")} == {"mbx1"}
    page.goto(web_org.url + "events")
    feed = page.locator("#feed")
    expect(feed).to_contain_text("DB02: active copy moved from mbx2 to mbx1", timeout=30_000)
    for action in ("restart-service", "maintenance", "move-activemailboxdatabase"):
        expect(feed).to_contain_text(f"{web_org.operator[0]} ran {action}")
    expect(feed).to_contain_text("refused: moving DB02 to mbx1 needs its confirmation")
