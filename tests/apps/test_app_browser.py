"""The Gradio app end to end in headless Chromium: one generation in the Diffusion tab, one
completion in the Language tab; a screenshot is saved as a test artifact.

Needs gradio, selenium and Debian's ``chromium`` + ``chromium-driver`` (``.ci/run`` installs them);
skipped locally when they are missing, a failure in CI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "apps" / "app.py"
ARTIFACTS = Path(os.environ.get("MMSKIP_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"))
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _missing() -> str | None:
    for mod in ("gradio", "selenium"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install -e '.[dev]')"
    if not (CHROMIUM and DRIVER):
        return "chromium / chromedriver not found (apt-get install -y chromium chromium-driver)"
    return None


if _missing():
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run in CI: {_missing()}", pytrace=False)
    pytest.skip(_missing(), allow_module_level=True)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    spec = importlib.util.spec_from_file_location("mmskip_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.build_app()
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def _tab(driver, name: str) -> None:
    tab = WebDriverWait(driver, 60).until(
        EC.element_to_be_clickable((By.XPATH, f"//button[@role='tab' and contains(., '{name}')]")))
    tab.click()


def _text(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def test_diffusion_and_language_tabs_in_a_real_browser(server, browser):
    browser.get(server)
    _tab(browser, "Diffusion")
    browser.find_element(By.ID, "d-go").click()
    WebDriverWait(browser, 240).until(lambda d: "speedup" in _text(d, "d-stats"))
    for elem in ("d-base", "d-fast", "d-fewer"):
        assert browser.find_element(By.ID, elem).find_elements(By.TAG_NAME, "img"), f"no image in #{elem}"
    stats = _text(browser, "d-stats")
    assert "PSNR to baseline" in stats and "×" in stats
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "app_diffusion.png"))

    _tab(browser, "Language")
    browser.find_element(By.ID, "lm-go").click()
    WebDriverWait(browser, 240).until(lambda d: "tokens/s" in _text(d, "lm-stats"))
    assert "speedup" in _text(browser, "lm-stats")
    assert browser.find_element(By.CSS_SELECTOR, "#lm-plain textarea").get_attribute("value").strip()
    browser.save_screenshot(str(ARTIFACTS / "app_language.png"))
