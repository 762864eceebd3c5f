"""The operator's dashboard (fleet/dashboard/) in a real headless Chromium.

Everything is real: mosquitto (the `broker` fixture), fleet.ingest.Ingest
filling a SQLite registry, the API (fleet.api.create_app) served by uvicorn
on a loopback port, and Debian's chromium driven over the Chrome DevTools
Protocol (a small client below, on the `websockets` package). The test reads
the page as an operator would: figures, badges, rows, chart points, the
messages shown, and checks them against the registry.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion
from websockets.sync.client import connect

from fleet import keys as K
from fleet import releases as R
from fleet import rollouts as RO
from fleet import tokens
from fleet.api import create_app
from fleet.ingest import Ingest
from fleet.registry import Registry
from fleet.settings import Settings
from tests.fleet import payloads as P
from tests.harness.broker import subscribe

CHROMIUM = "/usr/bin/chromium"

pytestmark = [pytest.mark.broker, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed at "
                                 "/usr/bin/chromium (make test installs it: apt-get install chromium)")]

REFRESH_MS = 250
VIEWER, OPERATOR = "viewer-kimura", "operator-sato"


# -- a small Chrome DevTools Protocol client ------------------------------------------

class CDPError(Exception):
    """Chromium answered a command with an error."""


class Page:
    """One headless Chromium with one tab, driven over the DevTools Protocol.

    Commands are answered in order on one websocket; events that arrive in
    between (network requests, console messages, exceptions) are kept in
    `events` for the checks at the end of a test.
    """

    def __init__(self, profile: Path, log: Path):
        self._stack = contextlib.ExitStack()
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-proxy-server", "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self._log)
        try:
            port, path = self._devtools_address(profile / "DevToolsActivePort")
            self.ws = self._stack.enter_context(connect(f"ws://127.0.0.1:{port}{path}", max_size=None,
                                                        proxy=None, open_timeout=10))
            self._ids = itertools.count(1)
            self.events: list[dict] = []
            self.session = None
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                self.send(f"{domain}.enable")
            self.viewport(1280, 800)
        except BaseException:
            self.close()
            raise

    def _devtools_address(self, port_file: Path, timeout: float = 15.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}; see {self._log.name}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if len(lines) >= 2:
                return lines[0], lines[1]
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not open its DevTools port within {timeout:g} s; see {self._log.name}")

    def send(self, method: str, **params) -> dict:
        """Run one command (on the tab once attached) and return its result."""
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=mobile)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        origin = "/".join(url.split("/")[:3])
        self.wait("document.readyState === 'complete' && location.origin === %s" % json.dumps(origin),
                  what=f"{url} to load")

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 8.0, what: str | None = None):
        """Poll until the expression is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                shown = self.js("document.body.innerText.slice(0, 1500)")
                raise AssertionError(f"timed out waiting for {what or expression}; the page shows:\n{shown}")
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.wait("(() => { const e = document.querySelector(%s); if (!e || !e.offsetParent) return null;"
                        " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                        " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()" % json.dumps(selector),
                        what=f"{selector} to be visible")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it and type the text as keyboard input."""
        self.click(selector)
        self.js("document.querySelector(%s).select()" % json.dumps(selector))
        self.send("Input.insertText", text=text)

    def text(self, selector: str) -> str:
        return self.js("(document.querySelector(%s) || {}).innerText" % json.dumps(selector)) or ""

    def visible(self, selector: str) -> bool:
        return bool(self.js("(() => { const e = document.querySelector(%s); return !!e && !!e.offsetParent; })()"
                            % json.dumps(selector)))

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def requests(self) -> list[dict]:
        """Every request the page made: {url, method, headers}."""
        self.js("1")  # collect the events that arrived since the last command
        return [e["params"]["request"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def js_errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert, and error log entries that are not about HTTP statuses."""
        self.js("1")
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text"))
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error" \
                    and p["entry"]["source"] != "network":
                out.append(f"{p['entry']['source']}: {p['entry']['text']}")
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        with contextlib.suppress(Exception):
            self._stack.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


# -- the fleet: broker, ingest, registry, API --------------------------------------

class ApiServer:
    """fleet.api.create_app(settings) under uvicorn in a thread, on a loopback port it keeps across restarts."""

    def __init__(self, app):
        self.app = app
        self.port = 0
        self.server = None
        self.thread = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="dashboard-test-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "the API server did not stop"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Node:
    """A paho client publishing as the nodes do (QoS 1)."""

    def __init__(self, port: int):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dashboard-test-nodes")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, kind: str, payload: dict, retain: bool = False) -> None:
        self.client.publish(P.topic(kind, payload["node"]), P.encode(payload), qos=1,
                            retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AnsweringNode:
    """One node that answers the commands sent to it (`iwaki/<node>/cmd/#`) the way the firmware
    does, `delay` seconds later: a reply under the command's id (a ping's result is its uptime),
    and for `health` also a health report. `got` lists the commands as (name, command)."""

    def __init__(self, port: int, node: str, *, up_ms: int, delay: float, first_seq: int):
        self.node, self.up_ms, self.delay = node, up_ms, delay
        self.seq = itertools.count(first_seq)
        self.got: list[tuple[str, dict]] = []
        self.timers: list[threading.Timer] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dashboard-test-{node}")
        self.client.on_message = self._command
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribe(self.client, f"{P.ROOT}/{node}/cmd/#")

    def _command(self, client, userdata, message) -> None:
        name = message.topic.rsplit("/", 1)[-1]
        cmd = json.loads(message.payload)
        self.got.append((name, cmd))
        timer = threading.Timer(self.delay, self._answer, (name, cmd))  # not in paho's network thread
        self.timers.append(timer)
        timer.start()

    def _answer(self, name: str, cmd: dict) -> None:
        result = {"up_ms": self.up_ms} if name == "ping" else {}
        self.client.publish(P.topic("reply", self.node),
                            P.encode(P.reply(self.node, seq=next(self.seq), id=cmd["id"], result=result)), qos=1)
        if name == "health":
            self.client.publish(P.topic("health", self.node),
                                P.encode(P.health(self.node, seq=next(self.seq), heap_free=70000)), qos=1)

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.client.disconnect()
        self.client.loop_stop()


def temperature(node: str, seq: int, mean: float) -> dict:
    return P.telemetry(node, seq=seq, ch={"temp_c": {"n": 60, "min": mean - 0.4, "max": mean + 0.5, "mean": mean,
                                                     "last": mean},
                                          "rh_pct": {"n": 60, "min": 40.0, "max": 42.5, "mean": 41.2, "last": 41.0}})


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def open_alerts(settings) -> dict[tuple[str, str], dict]:
    with Registry(settings.db, create=False) as r:
        return {(a["node"], a["kind"]): a for a in r.db["alerts"].rows_where("closed_at IS NULL")}


def stats(settings) -> dict:
    with Registry(settings.db, create=False) as r:
        return r.stats()


class Fleet:
    def __init__(self, settings, ingest, node, api, tokens_by_name):
        self.settings, self.ingest, self.node, self.api = settings, ingest, node, api
        self.tokens = tokens_by_name

    def registry(self) -> Registry:
        return Registry(self.settings.db, create=False)

    def summary(self) -> dict:
        """The fleet summary's figures, counted straight from the registry."""
        with self.registry() as r:
            one = lambda sql: str(r.db.execute(sql).fetchone()[0])  # noqa: E731
            return {
                "nodes": one("SELECT count(*) FROM nodes"),
                "online": one("SELECT count(*) FROM nodes WHERE state = 'online'"),
                "offline": one("SELECT count(*) FROM nodes WHERE state = 'offline'"),
                "unknown": one("SELECT count(*) FROM nodes WHERE state = 'unknown'"),
                "alerting": one("SELECT count(DISTINCT node) FROM alerts WHERE closed_at IS NULL"),
                "alerts-open": one("SELECT count(*) FROM alerts WHERE closed_at IS NULL"),
                "relay-backlog": one("SELECT count(*) FROM upstream WHERE delivered_at IS NULL"),
            }

    def states(self) -> dict[str, str]:
        with self.registry() as r:
            return {n["id"]: n["state"] for n in r.nodes()}

    def telemetry_rows(self, node: str, channel: str) -> int:
        with self.registry() as r:
            return r.db.execute("SELECT count(*) FROM telemetry WHERE node = ? AND channel = ?",
                                [node, channel]).fetchone()[0]


@pytest.fixture
def fleet(tmp_path, broker):
    """A seeded fleet behind the API:

    - env-0001 online and healthy: 6 telemetry windows, a health report, a warning event;
    - env-0002 offline: its state message says "offline" (reason "lost", the last will);
    - env-0003 online with 9 KiB of heap free, so a low_heap alert is open;
    - env-0005 unknown: the broker replayed its retained birth, nobody heard it live.
    """
    settings = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="dashboard-test-fleet")
    node = Node(broker.port)
    node.send("birth", P.birth("env-0005", board="bus-stop"), retain=True)
    ingest = Ingest(settings, reconnect_delay=(0.1, 0.5), stale_check_s=0.1).start()
    api = None
    try:
        # the retained birth arrives once the subscriptions are in place: then nothing sent is missed
        wait_for(lambda: ingest.counts()["stored"] >= 1, what="the retained birth of env-0005")
        node.send("birth", P.birth("env-0001"))
        node.send("state", P.state("env-0001"))
        for seq in range(6):
            node.send("telemetry", temperature("env-0001", seq, 21.0 + seq * 0.3))
        node.send("health", P.health("env-0001", seq=6))
        node.send("event", P.event("env-0001", seq=7))
        node.send("birth", P.birth("env-0002", board="river-gauge"))
        node.send("state", P.state("env-0002", value="offline", reason="lost"))
        node.send("birth", P.birth("env-0003"))
        node.send("health", P.health("env-0003", seq=0, heap_free=9000, rssi=-84))
        wait_for(lambda: {("env-0002", "offline"), ("env-0003", "low_heap")} <= set(open_alerts(settings)),
                 what="the offline and low_heap alerts to open")
        wait_for(lambda: stats(settings)["telemetry_stored"] == 6 and stats(settings)["health_stored"] == 2
                 and stats(settings)["events_stored"] == 1, what="every seeded message stored")
        with Registry(settings.db, create=False) as r:
            issued = {name: tokens.issue(r, name, role, actor="test")
                      for name, role in ((VIEWER, "viewer"), (OPERATOR, "operator"))}
        api = ApiServer(create_app(settings, ingest=ingest))
        api.start()
        yield Fleet(settings, ingest, node, api, issued)
    finally:
        if api is not None and api.server is not None and not api.server.should_exit:
            api.stop()
        ingest.stop()
        node.close()


@pytest.fixture
def page(tmp_path):
    p = Page(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    yield p
    p.close()


def sign_in(page: Page, fleet: Fleet, name: str, api: ApiServer | None = None) -> None:
    page.goto(f"{(api or fleet.api).url}/?refresh={REFRESH_MS}")
    page.type("#token", fleet.tokens[name])
    page.click("#signin-form button[type=submit]")
    page.wait("!document.getElementById('main').hidden && document.getElementById('sum-nodes').textContent !== '–'",
              what="the dashboard after signing in")


def shown_summary(page: Page) -> dict:
    return page.js("Object.fromEntries([...document.querySelectorAll('[data-testid^=summary-]')]"
                   ".map(e => [e.dataset.testid.slice(8), e.textContent.trim()]))")


def shown_nodes(page: Page) -> list[list[str]]:
    """[node id, state badge text] per row of the node list, top to bottom."""
    return page.js("[...document.querySelectorAll('#nodes-body tr')]"
                   ".map(tr => [tr.querySelector('th').innerText, tr.querySelector('td.state .badge').innerText])")


def wait_summary(page: Page, fleet: Fleet) -> dict:
    """Wait until the page's figures are the registry's; return them."""
    expected = fleet.summary()
    deadline = time.monotonic() + 8
    while True:
        shown = {k: v for k, v in shown_summary(page).items() if k in expected}
        if shown == expected:
            return shown
        assert time.monotonic() < deadline, f"summary shows {shown}, the registry says {expected}"
        time.sleep(0.05)


def assert_local_and_quiet(page: Page, fleet: Fleet, api: ApiServer | None = None) -> None:
    """Every request went to the API on loopback, every API call carried a bearer token,
    and no script error happened."""
    url = (api or fleet.api).url
    requests = page.requests()
    urls = [r["url"] for r in requests]
    assert any(u.startswith(f"{url}/api/v1/summary") for u in urls), urls
    strays = [u for u in urls if not u.startswith(f"{url}/")]
    assert not strays, f"requests that left the fleet's loopback API: {strays}"
    unsigned = [r["url"] for r in requests if "/api/" in r["url"]
                and not r["headers"].get("Authorization", "").startswith("Bearer iwk_")]
    assert not unsigned, f"API calls without the bearer token: {unsigned}"
    assert page.js_errors() == []


# -- the tests ------------------------------------------------------------------------

def test_summary_and_node_list_show_the_registry_and_follow_new_messages(fleet, page, tmp_path):
    sign_in(page, fleet, VIEWER)
    before = wait_summary(page, fleet)
    assert (before["nodes"], before["online"], before["offline"], before["unknown"], before["alerting"]) == \
        ("4", "2", "1", "1", "2")

    states = fleet.states()
    page.wait(f"document.querySelectorAll('#nodes-body tr').length === {len(states)}", what="every node listed")
    rows = shown_nodes(page)
    assert dict(rows) == states
    # problems first: offline, then with an open alert, then unknown, then healthy
    assert [node for node, _ in rows] == ["env-0002", "env-0003", "env-0005", "env-0001"]
    assert page.text("tr[data-node='env-0002'] td.state") == "offline (lost)"
    assert page.text("tr[data-node='env-0002'] td.board") == "river-gauge"
    assert page.text("tr[data-node='env-0003'] td.alerts") == "1"
    assert page.text("tr[data-node='env-0003'] td.heap") == "8.8 KiB"
    assert page.text("tr[data-node='env-0005'] td.seen") == "never"
    page.screenshot(tmp_path / "nodes.png")

    page.js("window.stillTheSamePage = true")
    fleet.node.send("birth", P.birth("env-0009", board="ev-charger"))
    fleet.node.send("state", P.state("env-0009"))
    wait_for(lambda: fleet.states().get("env-0009") == "online", what="env-0009 stored online")
    page.wait("document.querySelector(\"tr[data-node='env-0009'] td.state .badge\")?.innerText === 'online'",
              what="the new node to appear online")
    after = wait_summary(page, fleet)
    assert (after["nodes"], after["online"]) == ("5", "3")
    assert page.js("window.stillTheSamePage") is True  # updated in place, not reloaded

    page.js("const f = document.getElementById('state-filter'); f.value = 'offline';"
            " f.dispatchEvent(new Event('change'))")
    assert shown_nodes(page) == [["env-0002", "offline"]]

    page.viewport(390, 844, mobile=True)
    page.wait("document.documentElement.scrollWidth <= window.innerWidth", what="no sideways scrolling at 390 px")
    page.screenshot(tmp_path / "nodes-narrow.png")
    assert_local_and_quiet(page, fleet)


def test_node_page_charts_one_point_per_telemetry_row_and_grows_live(fleet, page, tmp_path):
    sign_in(page, fleet, VIEWER)
    page.click("tr[data-node='env-0001'] th a")
    page.wait("location.hash === '#/nodes/env-0001' && document.getElementById('node-title').innerText === 'env-0001'",
              what="the node page")
    points = "document.querySelectorAll('#node-charts figure[data-channel=%s] circle.pt').length"
    for channel in ("temp_c", "rh_pct"):
        rows = fleet.telemetry_rows("env-0001", channel)
        assert rows == 6
        page.wait(f"{points % channel} === {rows}", what=f"{rows} points on the {channel} chart")
    assert page.js("document.querySelectorAll('#node-charts figure[data-channel=temp_c] polygon.band').length") == 1
    assert page.js("document.querySelectorAll('#node-health figure[data-channel=heap_free] circle.pt').length") == 1
    assert "sensor.failed" in page.text("#node-events")

    fleet.node.send("telemetry", temperature("env-0001", 8, 23.5))
    wait_for(lambda: fleet.telemetry_rows("env-0001", "temp_c") == 7, what="the 7th telemetry row stored")
    page.wait(f"{points % 'temp_c'} === 7", what="the new reading on the chart")
    page.screenshot(tmp_path / "node.png")
    assert_local_and_quiet(page, fleet)


def test_operator_acknowledges_an_alert_and_a_viewer_is_told_why_not(fleet, page, tmp_path):
    alert = open_alerts(fleet.settings)[("env-0003", "low_heap")]
    button = f"#alerts-table button[data-ack='{alert['id']}']"

    sign_in(page, fleet, VIEWER)
    page.click("nav a[href='#/alerts']")
    page.click(button)
    message = page.wait("(() => { const m = document.getElementById('alert-message');"
                        " return !m.hidden && m.innerText; })()", what="the refusal")
    assert "403" in message and "operator" in message, message
    page.wait(f"document.querySelector(\"{button}\").disabled", what="acknowledging to be disabled for a viewer")
    assert open_alerts(fleet.settings)[("env-0003", "low_heap")]["acked_at"] is None
    page.screenshot(tmp_path / "alerts-viewer.png")

    page.click("#signout")
    page.wait("!document.getElementById('signin').hidden && !localStorage.getItem('iwaki.token')",
              what="the sign-in form after signing out")
    page.type("#token", fleet.tokens[OPERATOR])
    page.click("#signin-form button[type=submit]")
    page.wait(f"document.querySelector(\"{button}\")?.disabled === false", what="an Acknowledge button for an operator")
    page.click(button)
    page.wait(f"document.querySelector(\"#alerts-table tr[data-alert='{alert['id']}'] td.acked\")"
              f".innerText.startsWith('by {OPERATOR}')", what="the alert shown as acknowledged")
    assert "acknowledged" in page.text("#alert-message")
    assert open_alerts(fleet.settings)[("env-0003", "low_heap")]["acked_by"] == OPERATOR
    assert_local_and_quiet(page, fleet)


def test_a_wrong_token_is_refused_with_a_clear_message(fleet, page):
    page.goto(f"{fleet.api.url}/?refresh={REFRESH_MS}")
    page.type("#token", "iwk_" + "x" * 43)
    page.click("#signin-form button[type=submit]")
    error = page.wait("(() => { const e = document.getElementById('signin-error'); return !e.hidden && e.innerText; })()",
                      what="the sign-in error")
    assert "refused" in error and "401" in error, error
    assert not page.visible("#main")
    assert page.js("localStorage.getItem('iwaki.token')") is None
    assert_local_and_quiet(page, fleet)


def test_connection_lost_banner_shows_while_the_api_is_down_and_clears_after(fleet, page):
    sign_in(page, fleet, VIEWER)
    assert not page.visible("#offline-banner")
    fleet.api.stop()
    page.wait("!document.getElementById('offline-banner').hidden", what="the connection-lost banner")
    assert page.text("#updated").startswith("Connection lost")
    assert page.js("document.getElementById('sum-nodes').textContent") == "4"  # the last figures stay
    fleet.api.start()
    page.wait("document.getElementById('offline-banner').hidden", what="the banner to clear")
    assert page.text("#updated").startswith("Last updated")
    assert_local_and_quiet(page, fleet)


def test_rollout_page_shows_waves_and_nodes_and_only_an_operator_may_pause(fleet, page, tmp_path):
    K.create(tmp_path / "keys")
    with fleet.registry() as reg:
        R.build("1.2.0", ["env-station"], None, tmp_path / "keys", tmp_path / "releases", reg, "tanaka")
        rid = RO.start(reg, "1.2.0", ["1", "100%"], soak_s=0, actor="tanaka")["id"]

    def registry_state() -> str:
        with fleet.registry() as reg:
            return RO.detail(reg, rid)["state"]

    sign_in(page, fleet, OPERATOR)
    page.click("nav a[href='#/rollouts']")
    row = f"#rollouts-table tr[data-rollout='{rid}']"
    page.wait(f"document.querySelector(\"{row} td.state .badge\")?.innerText === 'running'", what="the rollout listed")
    assert page.text(f"{row} td.release") == "1.2.0"
    assert page.text(f"{row} td.counts") == "2 pending"
    assert page.text(f"{row} td.waves").strip() == "wave 1 of 2 (0 done)"
    assert page.text(f"{row} td.rate") == "–"
    assert page.text("#releases-table tr[data-release='1.2.0'] td:nth-of-type(2)") == "env-station"

    page.click(f"{row} th a")
    page.wait(f"location.hash === '#/rollouts/{rid}' && document.getElementById('rollout-title').innerText"
              f" === 'Rollout {rid}: release 1.2.0'", what="the rollout page")
    deployments = page.wait("(() => { const rows = [...document.querySelectorAll('#rollout-deployments tbody tr')];"
                            " return rows.length === 2 && rows.map(tr => [tr.dataset.node,"
                            " tr.querySelector('td.wave').innerText, tr.querySelector('td.state').innerText]); })()",
                            what="both deployments")
    assert deployments == [["env-0001", "1", "pending"], ["env-0003", "2", "pending"]]  # online first, by id
    waves = page.js("[...document.querySelectorAll('#rollout-waves tbody tr td.progress')].map(td => td.innerText.trim())")
    assert waves == ["0 of 1 finished", "0 of 1 finished"]
    assert page.js("document.querySelector('[data-testid=rollout-resume]').disabled") is True

    page.click("[data-testid=rollout-pause]")
    page.wait("document.querySelector('#rollout-state .badge')?.innerText === 'paused'", what="the rollout paused")
    assert f"paused by {OPERATOR}" in page.text("#rollout-state")
    assert "now paused" in page.text("#rollout-message")
    assert registry_state() == "paused"
    page.wait("document.querySelector('[data-testid=rollout-resume]').disabled === false",
              what="Resume to be offered")
    page.screenshot(tmp_path / "rollout-operator.png")

    page.click("#signout")
    page.wait("!document.getElementById('signin').hidden", what="the sign-in form after signing out")
    page.type("#token", fleet.tokens[VIEWER])
    page.click("#signin-form button[type=submit]")  # back on the same rollout page
    page.wait("document.querySelector('#rollout-state .badge')?.innerText === 'paused'", what="the page as a viewer")
    with fleet.registry() as reg:
        RO.resume(reg, rid, "tanaka")
    page.wait("document.querySelector('#rollout-state .badge')?.innerText === 'running'"
              " && document.querySelector('[data-testid=rollout-pause]').disabled === false",
              what="the resumed rollout, live")
    page.click("[data-testid=rollout-pause]")
    message = page.wait("(() => { const m = document.getElementById('rollout-message');"
                        " return !m.hidden && m.innerText; })()", what="the refusal")
    assert "403" in message and "operator" in message, message
    assert page.js("document.querySelector('[data-testid=rollout-pause]').disabled") is True
    assert registry_state() == "running"
    page.screenshot(tmp_path / "rollout-viewer.png")
    assert_local_and_quiet(page, fleet)


# -- commands from the node page --------------------------------------------------------

COMMAND_NOTICE = ("(() => { const m = document.getElementById('node-command-message');"
                  " return m.hidden ? null : m.innerText; })()")
COMMANDS_DISABLED = "[...document.querySelectorAll('#view-node button[data-node-command]')].map(b => b.disabled)"


def open_node(page: Page, node: str) -> None:
    page.js(f"location.hash = '#/nodes/{node}'")
    page.wait(f"document.getElementById('node-title').innerText === '{node}'"
              f" && document.querySelector('[data-testid=node-ping]').dataset.node === '{node}'",
              what=f"the page of {node}")


def node_fetches(page: Page, api: ApiServer, node: str) -> int:
    """How many times the page fetched the node (once per refresh of its page)."""
    return sum(r["url"] == f"{api.url}/api/v1/nodes/{node}" and r["method"] == "GET" for r in page.requests())


def command_notice_hidden(page: Page) -> bool:
    return page.js(COMMAND_NOTICE) is None


def commands_audited(fleet: Fleet) -> list[tuple]:
    with fleet.registry() as r:
        return [(a["actor"], a["target"], a["detail"]) for a in r.db["audit"].rows_where("action = 'node.command'")]


def test_operator_pings_a_node_and_asks_it_for_a_health_report(fleet, page, tmp_path):
    answering = AnsweringNode(fleet.settings.mqtt_port, "env-0001",
                              up_ms=3_723_000, delay=1.0, first_seq=8)
    try:
        sign_in(page, fleet, OPERATOR)
        open_node(page, "env-0001")
        page.wait(f"{COMMANDS_DISABLED}.join() === 'false,false'", what="the command buttons enabled for an operator")
        assert page.js("[...document.querySelectorAll('#view-node button[data-node-command]')]"
                       ".map(b => [b.type, b.innerText, b.getAttribute('aria-label')])") == [
            ["button", "Ping", "Ping env-0001"],
            ["button", "Report health now", "Report health now from env-0001"]]
        assert command_notice_hidden(page)

        page.click("[data-testid=node-ping]")
        # while the node takes its time, the page keeps refreshing: the notice and the disabled buttons stay
        fetches = node_fetches(page, fleet.api, "env-0001")
        waiting = []
        deadline = time.monotonic() + 12
        while True:
            # one evaluation, so the text and the buttons are of the same moment
            text, disabled = page.js(f"[{COMMAND_NOTICE}, {COMMANDS_DISABLED}]")
            if (text or "").startswith("env-0001 answered"):
                break
            assert time.monotonic() < deadline, f"no answer shown; the notice says {text!r}"
            waiting.append((text, disabled))
            time.sleep(0.05)
        assert node_fetches(page, fleet.api, "env-0001") >= fetches + 2, "the page did not refresh while waiting"
        assert waiting and all(text and disabled == [True, True] for text, disabled in waiting), waiting
        assert any(text.startswith("Ping sent to env-0001") and "waiting for its answer" in text
                   for text, _ in waiting), waiting
        answer = page.js(COMMAND_NOTICE)
        match = re.fullmatch(r"env-0001 answered the ping in (\d+\.\d) s: up 1 h 02 min\.", answer)
        assert match, answer
        assert 0.9 <= float(match.group(1)) < 10, answer  # the node waited 1 s before answering
        assert page.js("document.getElementById('node-command-message').className") == "notice ok"
        page.wait(f"{COMMANDS_DISABLED}.join() === 'false,false'", what="the buttons enabled again")

        assert [name for name, _ in answering.got] == ["ping"]
        cmd_id = answering.got[0][1]["id"]
        assert commands_audited(fleet) == [(OPERATOR, "env-0001", f"ping {cmd_id}")]
        posts = [r for r in page.requests() if r["method"] == "POST"]
        assert [r["url"] for r in posts] == [f"{fleet.api.url}/api/v1/nodes/env-0001/commands"]
        assert {k.lower(): v for k, v in posts[0]["headers"].items()}.get("content-type") == "application/json"
        assert json.loads(posts[0]["postData"]) == {"name": "ping"}
        page.screenshot(tmp_path / "node-ping.png")

        # Report health now, from the keyboard: the node answers and its new report is charted
        heap_points = "document.querySelectorAll('#node-health figure[data-channel=heap_free] circle.pt').length"
        assert page.js(heap_points) == 1
        page.js("document.querySelector('[data-testid=node-report-health]').focus()")
        for kind in ("keyDown", "keyUp"):
            page.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))
        page.wait(f"({COMMAND_NOTICE} || '').startsWith('env-0001 is publishing a health report now')",
                  timeout=12, what="the health command's answer")
        assert [name for name, _ in answering.got] == ["ping", "health"]
        page.wait(f"{heap_points} === 2", what="the new health report on the chart")
        assert stats(fleet.settings)["health_stored"] == 3

        # a node that does not answer: the page says so, and why it may not have
        page.js("app.commandWaitMs = 1500")
        open_node(page, "env-0002")
        assert command_notice_hidden(page)  # the last page's answer is not shown under another node
        page.click("[data-testid=node-ping]")
        missing = page.wait(f"({COMMAND_NOTICE} || '').startsWith('No answer') && {COMMAND_NOTICE}",
                            what="the missing answer")
        assert missing.startswith("No answer from env-0002 within 1.5 s (the node is offline;"), missing
        page.wait(f"{COMMANDS_DISABLED}.join() === 'false,false'", what="the buttons enabled again")
        assert len(commands_audited(fleet)) == 3
        assert_local_and_quiet(page, fleet)
    finally:
        answering.close()


def test_a_viewer_is_told_it_cannot_send_commands_and_the_buttons_stay_disabled(fleet, page, tmp_path):
    answering = AnsweringNode(fleet.settings.mqtt_port, "env-0001", up_ms=1000, delay=0, first_seq=8)
    try:
        sign_in(page, fleet, VIEWER)
        open_node(page, "env-0001")
        page.wait(f"{COMMANDS_DISABLED}.join() === 'false,false'", what="the buttons, before the API refused any")
        page.click("[data-testid=node-ping]")
        message = page.wait(f"({COMMAND_NOTICE} || '').includes('403') && {COMMAND_NOTICE}", what="the refusal")
        assert message.startswith("You cannot send commands to nodes (403 forbidden):"), message
        assert "viewer" in message and "operator" in message, message
        assert page.js(COMMANDS_DISABLED) == [True, True]
        titles = page.js("[...document.querySelectorAll('#view-node button[data-node-command]')].map(b => b.title)")
        assert all(t.startswith("Not allowed:") and "viewer" in t for t in titles), titles
        # still disabled after the page refreshed a few times, and on another node's page
        fetches = node_fetches(page, fleet.api, "env-0001")
        wait_for(lambda: node_fetches(page, fleet.api, "env-0001") >= fetches + 3, what="three refreshes")
        assert page.js(COMMANDS_DISABLED) == [True, True]
        assert page.js(COMMAND_NOTICE) == message  # the notice stays too
        open_node(page, "env-0003")
        assert page.js(COMMANDS_DISABLED) == [True, True]
        page.screenshot(tmp_path / "node-viewer.png")
        time.sleep(0.3)
        assert answering.got == [] and commands_audited(fleet) == []
        assert_local_and_quiet(page, fleet)
    finally:
        answering.close()


def test_without_a_broker_behind_the_api_a_command_shows_the_503_and_the_page_stays_connected(fleet, page):
    detached = ApiServer(create_app(fleet.settings))  # no ingest: the API cannot reach the nodes
    detached.start()
    try:
        sign_in(page, fleet, OPERATOR, api=detached)
        open_node(page, "env-0001")
        page.wait(f"{COMMANDS_DISABLED}.join() === 'false,false'", what="the command buttons")
        # note whether the connection-lost banner or the stale look ever appears, even for a moment
        page.js("window.lostOnce = false; new MutationObserver(() => { window.lostOnce ||="
                " !document.getElementById('offline-banner').hidden || document.body.classList.contains('stale'); })"
                ".observe(document.body, {attributes: true, subtree: true})")
        page.click("[data-testid=node-ping]")
        message = page.wait(f"({COMMAND_NOTICE} || '').includes('503') && {COMMAND_NOTICE}", what="the 503")
        assert message.startswith("Ping was not sent to env-0001 (503 unavailable): this API is not connected to "
                                  "the nodes' broker"), message
        assert "fleet serve" in message, message
        # a refused command is not a lost connection: no banner, the figures stay current
        fetches = node_fetches(page, detached, "env-0001")
        wait_for(lambda: node_fetches(page, detached, "env-0001") >= fetches + 3, what="three refreshes")
        assert not page.visible("[data-testid=connection-lost]")
        assert page.text("#updated").startswith("Last updated")
        assert page.js("document.body.classList.contains('stale')") is False
        assert page.js("window.lostOnce") is False
        assert page.js(COMMAND_NOTICE) == message
        assert page.js(COMMANDS_DISABLED) == [False, False]  # the next try may work: not disabled for good
        assert commands_audited(fleet) == []
        assert_local_and_quiet(page, fleet, api=detached)
    finally:
        detached.stop()
