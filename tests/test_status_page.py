"""The status page (`/ui/`, interface.md section 8) in a real browser: headless Chromium
and chromedriver from Debian's packages, driven by selenium, against a real `canary serve`
whose gates read a real Prometheus. A screenshot of each page is saved under
build/screenshots/ (or $CANARY_SCREENSHOTS), named for the test."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from canary.demo.procs import Prometheus, free_port
from tests.helpers import TOKENS

pytestmark = pytest.mark.e2e

SCREENSHOTS = Path(os.environ.get("CANARY_SCREENSHOTS",
                                  Path(__file__).resolve().parent.parent / "build" / "screenshots"))
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TARGETS = ("web", "api", "shop", "blog")


def _wait(check: Any, what: str, deadline: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy (a deadline, never a fixed sleep)."""
    end = time.monotonic() + deadline
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {deadline}s; last: {got!r}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`canary serve` with four nginx targets and a policy whose gates read a real
    Prometheus: a threshold gate whose value moves with the clock, a compare gate, and an
    errors gate on counters that grow with the clock."""
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail("chromium and chromedriver are needed (scripts/setup installs them)")
    tmp = tmp_path_factory.mktemp("ui")
    prom = Prometheus(tmp / "prometheus", free_port(), targets=[])
    prom.start()
    port = free_port()
    (tmp / "policies").mkdir()
    (tmp / "policies" / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "interval": "1s", "failure_limit": 3, "progress_deadline": "2h",
        "stages": [{"weight": 10, "hold": "1h"}, {"weight": 100, "hold": "1s"}],
        "gates": [{"name": "latency-p99", "query": "vector((time() % 20) / 100)", "max": 0.5},
                  {"name": "latency-vs-stable", "kind": "compare", "max_ratio": 1.5,
                   "query": 'label_replace(vector(0.1), "v", "{{ version }}", "", "")'},
                  {"name": "errors", "kind": "errors",
                   "requests": 'label_replace(vector(floor(time()) * 10), "v", "{{ version }}", '
                               '"", "")',
                   "errors": 'label_replace(vector(floor(time()) / 100), "v", "{{ version }}", '
                             '"", "")'}]}))
    (tmp / "canary.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "state": "sqlite:state.db",
        "prometheus": {"url": prom.url, "timeout": "2s"}, "policies": "policies",
        "auth": {"tokens": [{"name": f"{r}-token", "sha256": hashlib.sha256(t.encode()).hexdigest(),
                             "role": r} for r, t in TOKENS.items()]},
        "targets": {name: {"router": "nginx", "file": f"{name}.conf", "upstream": name,
                           "stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"],
                           "test": ["true"], "reload": ["true"], "policy": "p",
                           "stable_version": "v1"} for name in TARGETS}}))
    log = open(tmp / "controller.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "canary.cli", "serve", "--config",
                             str(tmp / "canary.yaml")], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return requests.get(base + "/readyz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False
        _wait(ready, "the controller ready")
        _wait(lambda: _prom_ready(prom.url), "Prometheus ready", 60)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
        prom.stop()


def _prom_ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def start(base: str, target: str) -> str:
    r = requests.post(base + "/api/v1/rollouts", json={"target": target, "canary_version": "v2"},
                      headers={"Authorization": f"Bearer {TOKENS['pipeline']}"}, timeout=5)
    assert r.status_code == 201, r.text
    rid: str = r.json()["id"]
    _wait(lambda: rollout(base, rid)["applied_weight"] == 10, "weight 10 in force")
    return rid


def rollout(base: str, rid: str) -> dict[str, Any]:
    r = requests.get(f"{base}/api/v1/rollouts/{rid}", timeout=5,
                     headers={"Authorization": f"Bearer {TOKENS['viewer']}"})
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1800", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOTS / f"{request.node.name}.png"))
        driver.quit()


def sign_in(driver: Any, base: str, role: str, page: str = "") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/ui/{page}")
    _wait(lambda: driver.find_element(By.ID, "token").is_displayed(), "the token form")
    driver.find_element(By.ID, "token").send_keys(TOKENS[role])
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    _wait(lambda: f"({role})" in driver.find_element(By.ID, "who").text, "signed in")


def csp_violations(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused" in e["message"]]


def test_the_page_loads_with_a_token_and_lists_live_rollouts_first(server, browser):
    from selenium.webdriver.common.by import By

    finished = start(server, "blog")
    requests.post(f"{server}/api/v1/rollouts/{finished}/abort", json={"reason": "old one"},
                  headers={"Authorization": f"Bearer {TOKENS['pipeline']}"}, timeout=5)
    _wait(lambda: rollout(server, finished)["state"] == "rolled_back", "rolled back")
    live = start(server, "web")
    page = requests.get(server + "/ui/", timeout=5)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "<script>" not in page.text and "http" not in page.text.replace(
        "http-equiv", ""), "no inline script, no external asset"

    sign_in(browser, server, "viewer")
    rows = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#rollouts tbody tr[data-id]"),
                 "the list")
    ids = [r.get_attribute("data-id") for r in rows]
    assert ids.index(live) < ids.index(finished), "live rollouts first"
    assert "rolled back" in rows[ids.index(finished)].text and "old one" in rows[
        ids.index(finished)].text
    assert browser.execute_script("return Object.keys(localStorage).length") == 0
    assert browser.execute_script("return sessionStorage.getItem('canary-token')") == \
        TOKENS["viewer"], "kept for the tab only"
    assert csp_violations(browser) == []


def test_a_live_rollouts_plots_update_and_a_viewer_sees_no_buttons(server, browser):
    from selenium.webdriver.common.by import By

    rid = start(server, "api")
    sign_in(browser, server, "viewer", f"#/r/{rid}")
    summary = _wait(lambda: browser.find_element(By.ID, "r-summary").text, "the summary")
    assert summary.startswith("Progressing") and "10%" in summary

    def dots() -> int:
        return len(browser.find_elements(By.CSS_SELECTOR, "#r-gates svg circle"))

    first = _wait(dots, "gate readings plotted")
    _wait(lambda: dots() > first + 2, "the plots taking in new readings", 45)
    weight = browser.find_element(By.CSS_SELECTOR, "#r-weight svg path[data-series]")
    assert weight.get_attribute("d").startswith("M")
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#r-gates h3")]
    assert titles == ["latency-p99: value against its bound", "latency-vs-stable: canary vs stable",
                      "errors: error rate, canary vs stable (this stage so far)",
                      "errors: evidence that the canary is worse"]
    assert browser.find_elements(By.CSS_SELECTOR, "#r-gates svg path.bound")
    axis = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#r-weight svg text")]
    assert "% of traffic" in axis and any(t.count(":") == 2 for t in axis), "units, time axis"
    assert browser.find_elements(By.CSS_SELECTOR, "#r-actions button") == [], \
        "a viewer may not act: no buttons"
    assert not browser.find_element(By.ID, "r-confirm").is_displayed()
    assert csp_violations(browser) == []
    # readable in the dark too: the page follows prefers-color-scheme
    light = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    dark = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(255, 255, 255)" and dark == "rgb(13, 17, 23)"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "rollout_page_dark.png"))


def test_an_oncall_token_pauses_from_the_page_with_a_reason(server, browser):
    from selenium.webdriver.common.by import By

    rid = start(server, "shop")
    sign_in(browser, server, "oncall", f"#/r/{rid}")
    _wait(lambda: [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#r-actions button")]
          == ["Pause", "Promote", "Abort"], "the buttons its role may use")
    assert not browser.find_element(By.ID, "r-confirm").is_displayed()
    browser.find_element(By.ID, "action-pause").click()
    assert browser.find_element(By.ID, "r-confirm").is_displayed(), "asks for a reason"
    reason = "checking <img src=x onerror=alert(1)> latency"
    browser.find_element(By.ID, "r-reason").send_keys(reason)
    browser.find_element(By.ID, "r-send").click()
    _wait(lambda: rollout(server, rid)["state"] == "paused", "the rollout paused")
    r = rollout(server, rid)
    assert reason in r["reason"] and r["events"][-1]["actor"] == "oncall-token"
    summary = _wait(lambda: browser.find_element(By.ID, "r-summary").text.startswith("Paused")
                    and browser.find_element(By.ID, "r-summary").text, "the page shows it")
    assert reason in summary, "an untrusted string is shown as text"
    assert browser.find_elements(By.CSS_SELECTOR, "img") == [], "and never parsed as HTML"
    _wait(lambda: [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#r-actions button")]
          == ["Resume", "Promote", "Abort"], "resume offered instead of pause")
    assert csp_violations(browser) == []
