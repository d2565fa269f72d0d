"""The console in a real browser: headless Chromium driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` (``scripts/with-services`` installs them); the
driver is ``/usr/bin/chromedriver``, so Selenium never tries to download one. Under
``CI=true`` a missing browser fails these tests instead of skipping them.

Every page visited is saved as a PNG in the test's temporary folder (``NN-name.png``), and
the page on screen when a test fails as ``FAILED.png`` (pytest keeps the folders of its last
three runs; the path is printed).
"""

from __future__ import annotations

import http.server
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from rainer_server.commit import Commit
from tests.conftest import service_missing
from tests.live import TEST_SECRET_KEY
from tests.live import LiveServer
from tests.live import start_live_server
from tests.storage_contract import T0

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 10

POLICY = """
rules:
  - keys: "secret.*"
    read: [admin]
    write: [admin]
  - keys: "*"
    read: [writer, reader, admin]
    write: [writer, admin]
"""

POOL_V1 = b'{\n  "size": 10,\n  "timeout": 5\n}\n'
POOL_V2 = b'{\n  "size": 20,\n  "timeout": 5,\n  "max": 40\n}\n'
POOL_V3 = b'{\n  "size": 25,\n  "timeout": 5,\n  "max": 40\n}\n'


def _webdriver(javascript: bool = True, size: str = "1280,1000"):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        service_missing(f"selenium is not installed: {exc}")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            service_missing(f"{path} is missing (Debian's chromium and chromium-driver)")
    # Never let Selenium Manager look for (or download) a browser or a driver.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={size}", "--lang=en-US", "--disable-extensions",
                     "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    try:
        return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:  # a browser that does not start is a missing service
        service_missing(f"cannot start headless Chromium: {exc}")


@pytest.fixture(scope="module")
def chromium():
    driver = _webdriver()
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    live = start_live_server({
        "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/rainer.db",
        "RAINER_AUTH": "token",
        "RAINER_POLICY": str(tmp_path / "policy.yaml"),
        "RAINER_SECRET_KEY": TEST_SECRET_KEY,
    })
    storage = live.app.extensions["rainer"].database_storage
    for version, payload, author, comment in (
        (1, POOL_V1, "alice", "first pool size"),
        (2, POOL_V2, "bob", "bigger pool, a max"),
        (3, POOL_V3, "carol", "25 is enough"),
    ):
        mtime = T0 + timedelta(days=version * 3, hours=version * 5, minutes=version * 7)
        storage.save(Commit("web.pool", version, payload, author, comment, mtime))
    for n in range(60):
        storage.save(Commit(f"svc.{n:02d}.threads", 1, b'{"threads": %d}\n' % n, "alice", "", T0))
    storage.save(Commit("secret.db", 1, b'{"password": "hunter2"}', "admin", "", T0))
    yield live
    live.stop()


class Browser:
    """The driver on one test's server, saving a screenshot of every page it shows."""

    def __init__(self, driver, server: LiveServer, folder: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.server = server
        self.root = server.url.rsplit("/diary", 1)[0]
        self.folder = folder
        self.shots = 0
        self.By = By
        self.wait = WebDriverWait(driver, WAIT_SECONDS)
        self.storage = server.app.extensions["rainer"].database_storage
        self.tokens = server.app.extensions["rainer"].gate.tokens
        # Cookies are per host, not per port: nothing from an earlier test's server.
        driver.execute_cdp_cmd("Network.clearBrowserCookies", {})

    def shot(self, name: str) -> Path:
        self.shots += 1
        path = self.folder / f"{self.shots:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def open(self, path: str, name: str) -> None:
        self.driver.get(self.root + path)
        self.shot(name)

    def find(self, selector: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, selector)

    def all(self, selector: str):
        return self.driver.find_elements(self.By.CSS_SELECTOR, selector)

    def button(self, text: str):
        """The button labelled ``text`` (in the page's main part first), else such a link."""
        found = self.buttons(text)
        assert found, f"no button or link {text!r} on {self.driver.current_url}"
        return found[0]

    def buttons(self, text: str):
        label = f"[normalize-space()='{text}']"
        return (self.driver.find_elements(self.By.XPATH, f"//main//button{label}")
                + self.driver.find_elements(self.By.XPATH, f"//main//a{label}")
                + self.driver.find_elements(self.By.XPATH, f"//header//button{label}")
                + self.driver.find_elements(self.By.XPATH, f"//header//a{label}")
                or self.driver.find_elements(self.By.XPATH, f"//button{label}"))

    def heading(self) -> str:
        return self.find("h1").text

    def text(self) -> str:
        return self.find("body").text

    def go(self, click_on, name: str, heading: str | None = None, contains: str | None = None) -> None:
        """Click, wait until the next page shows (its heading, or a text), screenshot it."""
        old = self.find("html")
        click_on.click()
        self.wait.until(lambda d: _stale(old))
        if heading is not None:
            self.wait.until(lambda d: heading in self.heading())
        if contains is not None:
            self.wait.until(lambda d: contains in self.text())
        self.shot(name)

    def sign_in(self, identity: str) -> None:
        token = self.tokens.create(identity)
        self.open("/ui/sign-in", "sign-in")
        self.find("#token").send_keys(token)
        self.go(self.button("Sign in"), "signed-in", contains=f"Signed in as {identity}")


def _stale(element) -> bool:
    """Whether ``element`` belongs to a page the browser has left."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.common.exceptions import WebDriverException

    try:
        element.tag_name
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:  # Chromium's words for it, mid-navigation
        if "does not belong to the document" in str(exc) or "No node with given id" in str(exc):
            return True
        raise
    return False


@pytest.fixture
def browser(chromium, server, tmp_path, request):
    folder = tmp_path / "screenshots"
    folder.mkdir()
    chromium.set_window_size(1280, 1000)
    b = Browser(chromium, server, folder)
    yield b
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        path = folder / "FAILED.png"
        chromium.save_screenshot(str(path))
        print(f"\nThe page on screen when {request.node.name} failed: {path} "
              f"(every page of the test: {folder})")


# ---------------------------------------------------------------------- the pages


def test_sign_in_with_a_token(browser):
    browser.open("/ui/", "anonymous-keys")
    assert "Not signed in" in browser.text()
    browser.go(browser.find("header .who a"), "sign-in-form", heading="Sign in")
    browser.find("#token").send_keys("rnr_not-a-token")
    browser.go(browser.button("Sign in"), "sign-in-refused", contains="wrong, expired or revoked")
    token = browser.tokens.create("writer")
    browser.find("#token").send_keys(token)
    browser.go(browser.button("Sign in"), "signed-in", heading="Keys")
    assert "Signed in as writer (via token)" in browser.text()
    cookie = browser.driver.get_cookie("rainer_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and token not in cookie["value"]
    # The cookie is not the token: a script on the page cannot read it either.
    assert "rainer_console" not in browser.driver.execute_script("return document.cookie")
    browser.go(browser.button("Sign out"), "signed-out", contains="Signed out.")
    assert "Not signed in" in browser.text()


def test_list_and_filter_keys(browser):
    browser.sign_in("writer")
    browser.open("/ui/", "keys")
    rows = browser.all("table.keys tbody tr")
    assert len(rows) == 50 and "secret.db" not in browser.text()
    assert rows[0].text.startswith("svc.00.threads 1 alice")
    browser.go(browser.button("Next keys →"), "keys-next", contains="web.pool")
    assert [r.text.split()[0] for r in browser.all("table.keys tbody tr")] == (
        [f"svc.{n:02d}.threads" for n in range(50, 60)] + ["web.pool"])
    browser.go(browser.button("← Previous keys"), "keys-previous", contains="svc.00.threads")
    browser.find("#q").send_keys("pool")
    browser.go(browser.button("Filter"), "keys-filtered", contains="Clear")
    assert [r.text.split()[0] for r in browser.all("table.keys tbody tr")] == ["web.pool"]
    browser.open("/ui/?prefix=svc.1", "keys-prefix")
    assert len(browser.all("table.keys tbody tr")) == 10


def test_open_a_key_edit_and_commit(browser):
    browser.sign_in("writer")
    browser.open("/ui/?q=pool", "keys")
    browser.go(browser.driver.find_element(browser.By.LINK_TEXT, "web.pool"), "key", heading="web.pool")
    assert "Current version (3)" in browser.text()
    numbers = [cell.text for cell in browser.all("table.payload td.num")]
    assert numbers == ["1", "2", "3", "4", "5"]
    browser.go(browser.button("Edit"), "edit", heading="Edit web.pool")
    payload = browser.find("#payload")
    assert payload.get_attribute("value") == POOL_V3.decode()
    payload.clear()
    payload.send_keys(POOL_V3.decode().replace("25", "30"))
    browser.find("#comment").send_keys("peak traffic")
    browser.go(browser.button("Review changes"), "review", heading="Review: version 4")
    removed = browser.all("table.diff tr.removed td.code")
    added = browser.all("table.diff tr.added td.code")
    assert len(removed) == len(added) == 1
    assert '"size": 25,' in removed[0].text and '"size": 30,' in added[0].text
    assert browser.storage.get("web.pool").version == 3
    browser.go(browser.button("Commit version 4"), "committed", contains="Committed version 4")
    head = browser.storage.get("web.pool")
    assert head.payload == POOL_V3.replace(b"25", b"30") and head.comment == "peak traffic"
    assert (head.author, head.identity) == ("writer", "writer")


def test_diff_two_versions(browser):
    browser.sign_in("writer")
    browser.open("/ui/keys/web.pool", "key")
    browser.find("#from").clear()
    browser.find("#from").send_keys("1")
    browser.find("#to").clear()
    browser.find("#to").send_keys("3")
    browser.go(browser.button("Compare"), "diff-unified", heading="Changes from version 1 to version 3")
    removed = browser.all("table.diff tr.removed")
    added = browser.all("table.diff tr.added")
    assert len(removed) == 2 and len(added) == 3
    # Highlighted: the changed lines have their own background, the others none.
    colour = added[0].find_element(browser.By.CSS_SELECTOR, "td.code").value_of_css_property(
        "background-color")
    assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
    assert colour != removed[0].find_element(
        browser.By.CSS_SELECTOR, "td.code").value_of_css_property("background-color")
    browser.shot("diff-unified-for-readme")
    browser.go(browser.button("Side by side"), "diff-split", contains="Side by side")
    assert browser.all("table.diff.split td.code.removed") and browser.all("table.diff.split td.code.added")


def test_revert(browser):
    browser.sign_in("writer")
    browser.open("/ui/keys/web.pool", "key")
    rows = browser.all("table.history tbody tr")
    assert [r.text.split()[0] for r in rows] == ["3", "2", "1"]
    revert_to_1 = rows[2].find_element(browser.By.XPATH, ".//button[normalize-space()='Revert to this']")
    browser.go(revert_to_1, "reverted", contains="is version 1's payload again")
    head = browser.storage.get("web.pool")
    assert (head.version, head.payload, head.comment) == (4, POOL_V1, "Revert to version 1")


def test_delete_and_restore(browser):
    browser.sign_in("writer")
    browser.open("/ui/keys/web.pool", "key")
    browser.go(browser.button("Delete…"), "delete-confirm", heading="Delete web.pool?")
    browser.find("#comment").send_keys("retired")
    browser.go(browser.button("Delete web.pool"), "deleted", contains="This key is deleted")
    assert browser.storage.get("web.pool").empty
    browser.go(browser.button("Restore version 3"), "restored", contains="version 3's payload again")
    assert browser.storage.get("web.pool").payload == POOL_V3


def test_a_conflicting_edit(browser):
    browser.sign_in("writer")
    browser.open("/ui/keys/web.pool/edit", "edit")
    payload = browser.find("#payload")
    payload.clear()
    payload.send_keys(POOL_V3.decode().replace('"timeout": 5', '"timeout": 9'))
    # Meanwhile, someone else commits version 4.
    browser.storage.save(Commit("web.pool", 4, POOL_V3.replace(b"40", b"45"), "dave", "max up", T0))
    browser.go(browser.button("Review changes"), "conflict", heading="Someone changed web.pool")
    text = browser.text()
    assert "Version 4 by dave: max up" in text and "The changes conflict" in text
    assert "<<<<<<< version 4 (dave)" in browser.find("#payload").get_attribute("value")
    # Resolve by hand: both changes.
    resolved = POOL_V3.decode().replace('"timeout": 5', '"timeout": 9').replace("40", "45")
    browser.find("#payload").clear()
    browser.find("#payload").send_keys(resolved)
    browser.go(browser.button("Review my resolution"), "review", heading="Review: version 5")
    browser.go(browser.button("Commit version 5"), "committed", contains="Committed version 5")
    assert browser.storage.get("web.pool").payload == resolved.encode()


def test_a_conflict_that_merges_cleanly(browser):
    browser.sign_in("writer")
    browser.storage.save(Commit("wide", 1, b'{\n  "a": 1,\n  "b": 2,\n  "c": 3,\n  "d": 4\n}\n',
                                "alice", "", T0))
    browser.open("/ui/keys/wide/edit", "edit")
    payload = browser.find("#payload")
    text = payload.get_attribute("value")
    payload.clear()
    payload.send_keys(text.replace('"a": 1', '"a": 10'))
    browser.storage.save(Commit("wide", 2, text.replace('"d": 4', '"d": 40').encode(), "dave", "", T0))
    browser.go(browser.button("Review changes"), "conflict", heading="Someone changed wide")
    assert "Both changes merge cleanly" in browser.text()
    browser.go(browser.button("Review the merge"), "review", heading="Review: version 3")
    browser.go(browser.button("Commit version 3"), "committed", contains="Committed version 3")
    assert browser.storage.get("wide").payload == text.replace('"a": 1', '"a": 10').replace(
        '"d": 4', '"d": 40').encode()


def test_a_forbidden_action_is_not_offered(browser):
    browser.sign_in("reader")
    browser.open("/ui/keys/web.pool", "key-as-reader")
    assert "Signed in as reader" in browser.text()
    for label in ("Edit", "Delete…", "Revert to this", "New key"):
        assert browser.buttons(label) == [], label
    browser.open("/ui/keys/web.pool/edit", "edit-refused")
    assert browser.heading() == "Not allowed" and "reader may not write web.pool" in browser.text()
    browser.open("/ui/keys/secret.db", "secret-refused")
    assert browser.heading() == "Not allowed" and "hunter2" not in browser.text()


def test_a_forged_form_post_is_refused(browser, tmp_path):
    """A page elsewhere on this host (same site: the cookie is sent) posts a revert form."""
    browser.sign_in("writer")
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "index.html").write_text(
        "<!doctype html><title>Win a prize</title>"
        f"<form method=post action='{browser.root}/ui/keys/web.pool/revert'>"
        "<input type=hidden name=revert_to value=1><input type=hidden name=next value=4>"
        "<button>Claim your prize</button></form>"
    )
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(forged), **kw)  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        browser.driver.get(f"http://127.0.0.1:{evil.server_port}/index.html")
        browser.shot("forged-page")
        browser.go(browser.button("Claim your prize"), "forged-refused", heading="Form refused")
        assert "CSRF check failed" in browser.text()
    finally:
        evil.shutdown()
        evil.server_close()
    assert browser.storage.get("web.pool").version == 3


def test_keyboard_and_a_phone(browser):
    from selenium.webdriver.common.keys import Keys

    browser.sign_in("writer")
    browser.open("/ui/", "keys")
    body = browser.find("body")
    body.send_keys(Keys.TAB)
    focused = browser.driver.switch_to.active_element
    assert focused.text == "Skip to content"
    focused.send_keys(Keys.ENTER)
    browser.wait.until(lambda d: d.switch_to.active_element.get_attribute("id") == "main")
    # "/" jumps to the filter (the one shortcut the script adds).
    browser.find("body").send_keys("/")
    browser.wait.until(lambda d: d.switch_to.active_element.get_attribute("id") == "q")
    # Every control has a label.
    for field in browser.all("input:not([type=hidden]), textarea, select"):
        field_id = field.get_attribute("id")
        assert field_id and browser.all(f"label[for='{field_id}']"), field.get_attribute("outerHTML")
    # A phone: the page itself never scrolls sideways (wide tables scroll in their box).
    browser.driver.set_window_size(390, 844)
    for path in ("/ui/", "/ui/keys/web.pool", "/ui/keys/web.pool/diff?from=1&view=split"):
        browser.open(path, "phone")
        overflow = browser.driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, (path, overflow)


def test_pages_work_without_javascript(server, tmp_path):
    driver = _webdriver(javascript=False)
    try:
        folder = tmp_path / "screenshots"
        folder.mkdir()
        browser = Browser(driver, server, folder)
        browser.sign_in("writer")
        browser.open("/ui/keys/web.pool/edit", "edit-no-js")
        payload = browser.find("#payload")
        payload.clear()
        payload.send_keys('{"size": 1}\n')
        browser.go(browser.button("Review changes"), "review-no-js", heading="Review: version 4")
        browser.go(browser.button("Commit version 4"), "committed-no-js", contains="Committed")
        assert browser.storage.get("web.pool").payload == b'{"size": 1}\n'
    finally:
        driver.quit()
