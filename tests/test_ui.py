"""The Prefect UI shows a tiny build's flow run and, once its Artifacts tab is opened, the build's
artifacts: a real headless Chromium (Debian's chromium + chromium-driver, which `make test` installs
through tests/install_browser.sh) driven by selenium against the session's server. Without the
browser the test is skipped, as `make test` said before any test ran; under CI=true it fails.
The screenshot is kept as a test output."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_build import music, tiny_spec

pytestmark = pytest.mark.prefect
OUTPUT = Path(__file__).parent / "output"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def tiny_run(prefect_api, tmp_path_factory) -> dict:
    """A completed tiny build with its artifacts: the session's newest, else one built here."""
    import httpx

    def newest() -> dict | None:
        runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={
            "flows": {"name": {"any_": ["build-training-set"]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
            "sort": "END_TIME_DESC", "limit": 1}).json()
        return runs[0] if runs else None

    if newest() is None:
        tmp_path = tmp_path_factory.mktemp("ui")
        done = music("build", str(tiny_spec(tmp_path, "tiny")))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = newest()
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    return {**run, "artifact_keys": sorted({a["key"] for a in artifacts if a["type"] == "table"})}


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        missing = "needs Debian's chromium and chromium-driver (tests/install_browser.sh installs them; make test runs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_flow_run_page_shows_the_run_and_its_artifacts(browser, tiny_run, prefect_api, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert tiny_run["artifact_keys"], "the build published no table artifacts"
    page = f"{prefect_api.removesuffix('/api')}/runs/flow-run/{tiny_run['id']}"
    browser.get(page)
    wait = WebDriverWait(browser, 60, poll_frequency=0.5)
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    wait.until(lambda _: tiny_run["name"] in body() and "Completed" in body())
    # The artifacts are behind the Artifacts tab (a URL parameter does not open it).
    tab = wait.until(lambda _: [e for e in browser.find_elements(By.XPATH, "//*[normalize-space(.)='Artifacts']")
                                if e.is_displayed()][-1:])[0]
    tab.click()
    wait.until(lambda _: all(key in body() for key in tiny_run["artifact_keys"][:3]))
    shown = [key for key in tiny_run["artifact_keys"] if key in body()]

    shot = tmp_path / "flow-run-artifacts.png"
    browser.save_screenshot(str(shot))
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(shot, OUTPUT / shot.name)
    (OUTPUT / "flow-run-artifacts.json").write_text(json.dumps({"page": page, "run": tiny_run["name"], "artifacts_shown": shown}, indent=1))
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert len(shown) >= 3, (shown, body()[:2000])
