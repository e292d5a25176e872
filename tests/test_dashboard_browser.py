"""The usage dashboard in headless Chromium, against a real ``meterkit serve`` of demo data.

Each view is read back from the page (the charts' data, the gauges' numbers) and compared with
what the HTTP API answers the same key; a screenshot of each view is saved under
``$MK_SCREENSHOTS`` (CI keeps them with the run's output) or the test's temporary directory.
Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them): without them
the tests skip, except under ``CI=true``, where they fail. Every test ends with the browser's
console free of errors (the one refused sign-in excepted), and the page is checked at a phone's
width (390 px) as well as a desktop's.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from served import meterkit, new_key, serve, token_in

DAY = 86_400
NOW = 1_764_590_400 + 5 * 3600  # 2025-12-01T17:00:00Z: the demo's month has begun
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


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


class Served:
    def __init__(self, base: str, token: str, empty_token: str, small_token: str) -> None:
        self.base = base
        self.token = token
        self.empty_token = empty_token
        self.small_token = small_token

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
    token = token_in(meterkit("demo", "--db", db, "--no-serve", "--now", str(NOW), "--days", "30"))
    empty_token = new_key(db, "org_empty")
    # An organization that used two meters of eleven.
    small_token = new_key(db, "org_small")
    for meter, value in (("embeddings", "input_tokens=900"), ("images", "images=3")):
        meterkit(
            "record", meter, "--org", "org_small", "-v", value, "--time", str(NOW - 3 * DAY),
            "--now", str(NOW), "--db", db,
        )  # fmt: skip
    with serve(db, NOW, work / "serve.log") as base:
        yield Served(base, token, empty_token, small_token)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("MK_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (reading the log empties it)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
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
        # (A test that expects an error reads it itself, which empties the log.)
        assert console_errors(driver) == []
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


def binary(n: int) -> str:
    """``n`` bytes as the dashboard writes them: binary units, at most two decimals."""
    units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    scaled, step = float(n), 0
    while abs(scaled) >= 1024 and step < len(units) - 1:
        scaled, step = scaled / 1024, step + 1
    if step == 0:
        return f"{n:,} bytes"
    return f"{round(scaled, 2):,.2f}".rstrip("0").rstrip(".") + f" {units[step]}"


def usage_series(
    served: Served, kind: str, width: str, stack: str, measure: str, *, gauge: bool = False
) -> dict[str, Any]:
    """What the dashboard should draw, from the API: per group, a value per bucket (a gauge's
    level carried across buckets without a reading, unknown before its first)."""
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
    groups: dict[str, list[float | None]] = {}
    read = sum(1 for b in buckets if b["results"])
    for i, b in enumerate(buckets):
        for r in b["results"]:
            name = str(r[stack]) if r[stack] is not None else "(none)"
            values = groups.setdefault(name, [None if gauge else 0] * len(buckets))
            values[i] = (values[i] or 0) + (r[measure] or 0)
    if gauge:
        for values in groups.values():
            for i in range(1, len(values)):
                if values[i] is None:
                    values[i] = values[i - 1]
    return {"buckets": len(buckets), "groups": groups, "read": read}


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
        # The exact figures on hover, with the unit.
        assert box.get_attribute("title").startswith(f"{line['used']:,} {line['unit']} of ")
        if line["unit"] == "bytes":
            assert f"{binary(line['remaining'])} remaining" in text
            assert f"{line['used']:,}" not in text
        elif line["limit"] >= 0:
            assert f"{line['remaining']:,} {line['unit']} remaining" in text
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
    # The refused key's 401 is the console's only error.
    errors = console_errors(browser)
    assert len(errors) == 1 and "401" in errors[0]["message"], errors


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


def test_meters_in_use_are_listed_first(browser: Any, served: Served) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, served, served.small_token)
    wait_for(browser, "ready")
    listed = served.get("/v1/organization/meters", token=served.small_token)["data"]
    in_use = [m["name"] for m in listed if m["in_use"] or m["limited"]]
    rest = [m["name"] for m in listed if not (m["in_use"] or m["limited"])]
    assert in_use == ["embeddings", "images"] and len(rest) == 9
    groups = browser.find_elements(By.CSS_SELECTOR, "#usage-kind optgroup")
    assert [g.get_attribute("label") for g in groups] == ["In use", "No usage in 30 days"]
    shown = [
        [o.get_attribute("value") for o in g.find_elements(By.TAG_NAME, "option")] for g in groups
    ]
    assert shown == [in_use, rest]
    assert browser.find_element(By.ID, "usage-kind").get_attribute("value") == "embeddings"
    assert float(browser.find_element(By.ID, "usage-total").get_attribute("data-total")) == 900
    assert "900 tokens" in browser.find_element(By.ID, "usage-total").text


def test_a_gauge_is_charted_as_its_level_never_summed(
    browser: Any, served: Served, shots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sign_in(browser, served, served.token)
    wait_for(browser, "ready")
    for width, buckets in (("1d", 30), ("1h", 168)):
        Select(browser.find_element(By.ID, "usage-kind")).select_by_value("vector_stores")
        wait_for(browser, "ready")
        Select(browser.find_element(By.ID, "usage-width")).select_by_value(width)
        wait_for(browser, "ready")
        want = usage_series(served, "vector_stores", width, "project_id", "usage_bytes", gauge=True)
        drawn = chart(browser, "usage-chart")
        assert browser.execute_script("return Chart.getChart('usage-chart').config.type") == "line"
        assert len(drawn["labels"]) == want["buckets"] == buckets
        assert {d["label"]: d["data"] for d in drawn["datasets"]} == want["groups"]
        if width == "1h":
            # Readings come once a day: the hours between hold the level, never drop to zero.
            assert want["read"] < buckets / 10
            held = [v for values in want["groups"].values() for v in values if v is not None]
            assert len(held) > buckets and 0 not in held
        latest = sum(v[-1] or 0 for v in want["groups"].values())
        assert latest > 2**20
        total = browser.find_element(By.ID, "usage-total")
        assert total.get_attribute("data-total") is None
        assert int(total.get_attribute("data-latest")) == latest
        assert binary(latest) in total.text and "iB" in total.text
        assert total.get_attribute("title") == f"{latest:,} bytes"
        shot(browser, shots, "usage", f"storage-level-{width}")


PHONE = (390, 844)


def fits(driver: Any) -> None:
    """Nothing scrolls sideways, and no visible element reaches past the screen (less its
    scroll bar)."""
    assert driver.execute_script("return window.innerWidth") == PHONE[0]
    width = driver.execute_script("return document.documentElement.clientWidth")
    outside = driver.execute_script(
        "return [...document.querySelectorAll('body *')]"
        ".filter(e => e.offsetParent !== null)"
        ".map(e => [e.id || e.tagName, e.getBoundingClientRect()])"
        ".filter(([, r]) => r.left < 0 || r.right > arguments[0] + 0.5)"
        ".map(([id, r]) => `${id} ${Math.round(r.left)}..${Math.round(r.right)}`)",
        width,
    )
    assert outside == []
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width


def test_on_a_phone_nothing_scrolls_sideways_or_is_clipped(
    browser: Any, served: Served, shots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.set_window_size(*PHONE)
    # The window's outer size includes no frame headless, but make the inner width exact.
    inner = browser.execute_script("return window.innerWidth")
    if inner != PHONE[0]:
        browser.set_window_size(PHONE[0] * 2 - inner, PHONE[1])
    browser.get(served.base + "/dashboard")
    wait_for(browser, "signed-out")
    fits(browser)
    browser.save_screenshot(str(shots / "phone-signin.png"))
    sign_in(browser, served, served.token)
    wait_for(browser, "ready")
    fits(browser)
    assert chart(browser, "usage-chart")["datasets"]
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(PHONE[0] * 2 - inner if inner != PHONE[0] else PHONE[0], height)
    browser.save_screenshot(str(shots / "phone-dashboard.png"))
    Select(browser.find_element(By.ID, "usage-kind")).select_by_value("vector_stores")
    wait_for(browser, "ready")
    fits(browser)
