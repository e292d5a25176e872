"""The usage dashboard in headless Chromium, against a real ``meterkit serve`` of demo data.

Each view is read back from the page (the charts' data, the gauges' numbers) and compared with
what the HTTP API answers the same key; a screenshot of each view is saved under
``$MK_SCREENSHOTS`` (CI keeps them with the run's output) or the test's temporary directory.
Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them): without them
the tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

DAY = 86_400
NOW = 1_764_590_400 + 5 * 3600  # 2025-12-01T17:00:00Z: the demo's month has begun
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TOKEN = re.compile(r"\b(mk_[0-9a-f]{16}_[A-Za-z0-9_-]{43})\b")


def _missing() -> str | None:
    if CHROMIUM is None or DRIVER is None:
        return "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the dev extras)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _browser_present() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _meterkit(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meterkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout + done.stderr


class Served:
    def __init__(self, base: str, token: str, empty_token: str) -> None:
        self.base = base
        self.token = token
        self.empty_token = empty_token

    def get(self, path: str, token: str | None = None, **params: Any) -> Any:
        r = httpx.get(
            self.base + path,
            params=params,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()

    def pages(self, path: str, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            body = self.get(path, **params)
            out += body["data"]
            if not body["has_more"]:
                return out
            params["page"] = body["next_page"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if _missing():
        pytest.skip("no browser")
    work = tmp_path_factory.mktemp("dashboard")
    db = f"sqlite:///{work / 'demo.db'}"
    printed = _meterkit("demo", "--db", db, "--no-serve", "--now", str(NOW), "--days", "30")
    found = TOKEN.search(printed)
    assert found, printed
    empty = _meterkit(
        "keys", "create", "--org", "org_empty", "--role", "admin", "--scopes", "usage:read",
        "--db", db,
    )  # fmt: skip
    empty_token = TOKEN.search(empty)
    assert empty_token, empty
    port = _free_port()
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "meterkit", "serve", "--db", db, "--port", str(port),
         "--now", str(NOW), "--freeze-clock"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                break
            time.sleep(0.2)
        else:
            pytest.fail("meterkit serve did not answer: " + (work / "serve.log").read_text())
        assert server.poll() is None, (work / "serve.log").read_text()
        yield Served(base, found.group(1), empty_token.group(1))
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("MK_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,2600",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script("return document.body.dataset.state") == state:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"the page did not reach {state!r}: "
        + str(driver.execute_script("return document.body.dataset.state"))
        + " "
        + str(driver.get_log("browser") if hasattr(driver, "get_log") else "")
    )


def sign_in(driver: Any, served: Served, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(served.base + "/dashboard")
    wait_for(driver, "signed-out")
    driver.find_element(By.ID, "key").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()


def chart(driver: Any, canvas: str) -> dict[str, Any]:
    return driver.execute_script(  # type: ignore[no-any-return]
        "const c = Chart.getChart(arguments[0]);"
        "return c ? {labels: c.data.labels,"
        " datasets: c.data.datasets.map(d => ({label: d.label, data: d.data}))} : null;",
        canvas,
    )


def shot(driver: Any, shots: Path, element: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    found = driver.find_element(By.ID, element)
    driver.execute_script("arguments[0].scrollIntoView()", found)
    # Let Chart.js finish laying out before the picture.
    driver.execute_script("return new Promise(r => requestAnimationFrame(() => r()))")
    found.screenshot(str(shots / f"{name}.png"))


def usage_series(served: Served, kind: str, width: str, stack: str, measure: str) -> dict[str, Any]:
    """What the dashboard should draw, from the API: per group, a value per bucket."""
    now = NOW
    span = 7 * DAY if width == "1h" else 30 * DAY
    step = 3600 if width == "1h" else DAY
    start = now - now % step - span + step
    buckets = served.pages(
        f"/v1/organization/usage/{kind}",
        start_time=start,
        bucket_width=width,
        group_by=stack,
        limit=168 if width == "1h" else 31,
    )
    groups: dict[str, list[float]] = {}
    for i, b in enumerate(buckets):
        for r in b["results"]:
            name = str(r[stack]) if r[stack] is not None else "(none)"
            groups.setdefault(name, [0] * len(buckets))[i] += r[measure] or 0
    return {"buckets": len(buckets), "groups": groups}


# -- the views ----------------------------------------------------------------------------------


def test_signed_in_every_view_draws_the_numbers_the_api_answers(
    browser: Any, served: Served, shots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sign_in(browser, served, served.token)
    wait_for(browser, "ready")
    status = served.get("/v1/organization/quota")
    assert browser.find_element(By.ID, "who").text.startswith(status["organization_id"])
    browser.save_screenshot(str(shots / "dashboard.png"))

    # Usage: completions, input tokens per day for 30 days, stacked by model.
    want = usage_series(served, "completions", "1d", "model", "input_tokens")
    drawn = chart(browser, "usage-chart")
    assert Select(browser.find_element(By.ID, "usage-measure")).first_selected_option.text == (
        "input_tokens"
    )
    assert len(drawn["labels"]) == want["buckets"] == 30
    assert {d["label"]: d["data"] for d in drawn["datasets"]} == want["groups"]
    total = sum(sum(v) for v in want["groups"].values())
    assert total > 0
    assert float(browser.find_element(By.ID, "usage-total").get_attribute("data-total")) == total
    assert f"{total:,}" in browser.find_element(By.ID, "usage-total").text
    shot(browser, shots, "usage", "usage-1d-by-model")

    # Hourly buckets for a week, stacked by project.
    Select(browser.find_element(By.ID, "usage-width")).select_by_value("1h")
    wait_for(browser, "ready")
    Select(browser.find_element(By.ID, "usage-stack")).select_by_value("project_id")
    wait_for(browser, "ready")
    want = usage_series(served, "completions", "1h", "project_id", "input_tokens")
    drawn = chart(browser, "usage-chart")
    assert len(drawn["labels"]) == want["buckets"] == 168
    assert {d["label"]: d["data"] for d in drawn["datasets"]} == want["groups"]
    shot(browser, shots, "usage", "usage-1h-by-project")

    # Costs per line item per day.
    start = NOW - NOW % DAY - 29 * DAY
    buckets = served.pages(
        "/v1/organization/costs", start_time=start, group_by="line_item", limit=30
    )
    per_item: dict[str, list[float]] = {}
    for i, b in enumerate(buckets):
        for r in b["results"]:
            per_item.setdefault(r["line_item"], [0.0] * len(buckets))[i] += r["amount"]["value"]
    drawn = chart(browser, "costs-chart")
    got = {d["label"]: d["data"] for d in drawn["datasets"]}
    assert set(got) == set(per_item) and "vector stores" in got
    for item, values in per_item.items():
        assert got[item] == pytest.approx(values, rel=1e-12, abs=1e-12)
    shot(browser, shots, "costs", "costs-per-line-item")

    # Quotas: a gauge per limit, and the spend limit, with the API's numbers.
    assert status["limits"] and status["spend_limit"]
    for line in status["limits"]:
        box = browser.find_element(By.ID, f"gauge-{line['metric']}")
        assert int(box.get_attribute("data-used")) == line["used"]
        assert int(box.get_attribute("data-limit")) == line["limit"]
        text = box.text
        if line["limit"] >= 0:
            assert f"{line['remaining']:,} remaining" in text
        assert ("resets" in text) == (line["reset_at"] is not None)
        gauge = chart(browser, f"gauge-{line['metric']}-chart")
        if line["limit"] >= 0:
            used = min(line["used"], line["limit"])
            assert gauge["datasets"][0]["data"] == [used, line["limit"] - used]
    spend = browser.find_element(By.ID, "gauge-spend")
    assert float(spend.get_attribute("data-used")) == pytest.approx(status["spend_limit"]["used"])
    assert float(spend.get_attribute("data-limit")) == status["spend_limit"]["limit"]
    shot(browser, shots, "quota", "quotas")


def test_the_key_stays_in_the_tab_and_never_in_a_url(browser: Any, served: Served) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, served, served.token)
    wait_for(browser, "ready")
    assert browser.execute_script("return sessionStorage.getItem('meterkit.api_key')") == (
        served.token
    )
    assert browser.execute_script("return localStorage.length") == 0
    assert served.token not in browser.current_url
    browser.refresh()  # still signed in within the tab
    wait_for(browser, "ready")
    browser.find_element(By.ID, "signout").click()
    wait_for(browser, "signed-out")
    assert browser.execute_script("return sessionStorage.getItem('meterkit.api_key')") is None
    assert browser.find_element(By.ID, "app").get_attribute("hidden") is not None


def test_a_wrong_key_is_refused(browser: Any, served: Served, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, served, "mk_0123456789abcdef_" + "A" * 43)
    wait_for(browser, "refused")
    error = browser.find_element(By.ID, "signin-error")
    assert error.is_displayed() and "refused" in error.text
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('meterkit.api_key')") is None
    shot(browser, shots, "signin", "wrong-key")


def test_an_empty_organization_is_shown_as_such(browser: Any, served: Served, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, served, served.empty_token)
    wait_for(browser, "ready")
    assert browser.find_element(By.ID, "who").text.startswith("org_empty")
    for view in ("usage-empty", "costs-empty", "quota-empty"):
        assert browser.find_element(By.ID, view).is_displayed(), view
    assert chart(browser, "usage-chart") is None and chart(browser, "costs-chart") is None
    assert served.get("/v1/organization/quota", token=served.empty_token)["limits"] == []
    browser.save_screenshot(str(shots / "empty-organization.png"))
