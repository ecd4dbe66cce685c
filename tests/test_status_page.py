"""The status page in a real headless browser: Debian's chromium driven by Playwright.

Playwright's own browser download cannot work on these machines (and is never run):
the test points Playwright at /usr/bin/chromium, which ``.ci/run`` installs.
"""
from __future__ import annotations

import os
import re

import pytest
import requests

from .conftest import TunnelClient
from .observe import ManagedServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_status_page_shows_the_group_and_its_tunnel(certs, groups_file, procs, tmp_path):
    from playwright.sync_api import sync_playwright

    server = ManagedServer(certs, groups_file)
    procs.append(server)
    client = TunnelClient(server, certs)
    procs.append(client)
    peer = requests.get(server.mgmt("/status"), timeout=5).json()["groups"][0]["tunnels"][0]["peer"]
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
            page.goto(server.mgmt("/"), timeout=15_000)
            group = page.locator('section.group[data-group="app.test"]')
            tunnel = group.locator("tr.tunnel")
            tunnel.wait_for(timeout=10_000)
            assert "app.test" in group.locator("h2").inner_text()
            assert "1 tunnel" in group.locator("h2").inner_text()
            assert peer in tunnel.inner_text()
            assert "authentication: basic (Basic)" in group.inner_text()
            assert page.locator("#summary .badge").inner_text() == "ready"

            # It refreshes itself: requests made now show up without a reload.
            for _ in range(3):
                requests.get(server.url("/hello"), headers={"Host": "app.test"}, timeout=5)
            page.wait_for_function(
                """() => { const c = document.querySelector('section.group[data-group="app.test"] tr.tunnel td:nth-child(3)');
                           return c && c.textContent === "3"; }""", timeout=10_000)
            assert re.search(r"\b3 requests\b", group.inner_text())

            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
    print(f"status page screenshot: {shot}")
    assert errors == []  # no script error, no CSP violation
