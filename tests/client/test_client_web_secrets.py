"""The camera page against a server with an API key (headless Chromium, fake runtime): the key typed
into the page mints a single-use client secret for each call and is never stored by the page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fake_runtime
import pytest
from client_server import ServerThread
from test_client_web import browser, camera, wait_for  # noqa: F401  (fixtures of the page tests)

from runtime.server.app import SERVER

pytestmark = pytest.mark.browser

STORED = (
    "return [localStorage.getItem('speakwatch.apiKey'), sessionStorage.getItem('speakwatch.apiKey'),"
    " localStorage.length, sessionStorage.length]"
)


def test_page_mints_a_secret_per_call_and_never_stores_the_key(browser: Any, artifacts: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    private = ServerThread(runtime=fake_runtime.FakeRuntime(token_delay=0.01), options={"api_key": "pagekey"})
    private.start()
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    state = lambda: find("#status").get_attribute("data-state")  # noqa: E731
    store = lambda: private._runner.app[SERVER].secrets  # noqa: E731
    try:
        browser.get(private.url + "/")
        # what an older page left behind goes at the next load
        browser.execute_script(
            "localStorage.setItem('speakwatch.apiKey', 'old');"
            " sessionStorage.setItem('speakwatch.apiKey', 'old')"
        )
        browser.refresh()
        wait_for(lambda: state() == "error", 30, "the page to ask for the key")
        assert "API key" in find("#status-text").text
        assert private.run(lambda: len(private.runtime.sessions)) == 0
        key = find("#api-key")
        key.send_keys("pagekey")
        key.send_keys(Keys.TAB)  # the change event connects
        wait_for(lambda: state() == "connected", 30, "the page to connect with a client secret")
        assert browser.execute_script(STORED) == [None, None, 0, 0]
        assert private.run(lambda: len(private.runtime.sessions)) == 1
        # the call was opened with a secret, now spent: none outstanding, one remembered as used
        assert private.run(lambda: (len(store()), len(store()._used))) == (0, 1)

        find("#question").send_keys("who let me in?")
        find("#send").click()
        wait_for(
            lambda: find("#answer").find_element(By.XPATH, "..").get_attribute("data-status") == "completed",
            15,
            "the answer to complete",
        )
        assert "you said: who let me in?" in find("#answer").text
    finally:
        browser.save_screenshot(str(artifacts / "client_web_secrets.png"))
        private.stop()
    errors = [
        e
        for e in browser.get_log("browser")
        if e.get("level") == "SEVERE"
        and "client_secrets" not in e.get("message", "")  # the first, keyless 401
    ]
    assert not errors, errors
