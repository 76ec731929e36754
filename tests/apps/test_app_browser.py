"""The Gradio app end to end in headless Chromium: every tab is opened and RUN with small inputs
(its button clicked, its result waited for and checked, no error toast), a bad input shows one
clear message, and screenshots are saved as test artifacts (``app_tabs.png`` shows every tab's header).

Needs gradio, selenium and Debian's ``chromium`` + ``chromium-driver`` (``.ci/run`` installs them);
skipped locally when they are missing, a failure in CI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "apps" / "app.py"
ARTIFACTS = Path(os.environ.get("MMSKIP_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"))
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TABS = ["Language", "Diffusion", "Vision", "Video", "MuE", "Tune", "Analysis"]


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
def browser(server):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    driver.get(server)
    yield driver
    driver.quit()


def _tab(driver, name: str) -> None:
    tab = WebDriverWait(driver, 60).until(
        EC.element_to_be_clickable((By.XPATH, f"//button[@role='tab' and contains(., '{name}')]")))
    tab.click()


def _text(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def _fill(driver, css: str, value: str | int) -> None:
    """Type ``value`` into the input or textarea at ``css`` the way a user's edit reaches Svelte."""
    driver.execute_script(
        "const el = document.querySelector(arguments[0]);"
        "const proto = el.tagName === 'TEXTAREA' ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;"
        "Object.getOwnPropertyDescriptor(proto, 'value').set.call(el, arguments[1]);"
        "for (const kind of ['input', 'change']) el.dispatchEvent(new Event(kind, {bubbles: true}));"
        "el.dispatchEvent(new Event('blur'));", css, str(value))


def _errors(driver) -> list[str]:
    return [t.get_attribute("textContent") for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body'].error")]


def _run(driver, button: str, result: str, expect: str, timeout: float = 240) -> str:
    """Click ``button``, wait until ``result`` shows ``expect`` (or an error toast), return the result."""
    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, timeout).until(lambda d: expect in _text(d, result) or _errors(d))
    assert not _errors(driver), _errors(driver)
    return _text(driver, result)


def _has_image(driver, elem_id: str) -> bool:
    return bool(driver.find_element(By.ID, elem_id).find_elements(By.TAG_NAME, "img"))


def test_every_tab_runs_in_a_real_browser(browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.XPATH, "//button[@role='tab']")) == len(TABS))
    assert [b.text for b in browser.find_elements(By.XPATH, "//button[@role='tab']")] == TABS

    _tab(browser, "Language")
    _fill(browser, "#lm-tokens input[type=number]", 8)
    stats = _run(browser, "lm-go", "lm-stats", "tokens/s")
    assert "pairs" in stats and "FLOPs bound" in stats
    assert browser.find_element(By.CSS_SELECTOR, "#lm-plain textarea").get_attribute("value").strip()

    _tab(browser, "Diffusion")
    _fill(browser, "#d-steps input[type=number]", 6)
    stats = _run(browser, "d-go", "d-stats", "PSNR to baseline")
    assert "baseline (6 steps)" in stats and "recompute 1 step in 3" in stats and "3 pairs" in stats
    assert all(_has_image(browser, e) for e in ("d-base", "d-fast", "d-fewer-img"))
    browser.save_screenshot(str(ARTIFACTS / "app_tabs.png"))  # every tab's header and a diffusion result

    _tab(browser, "Vision")
    stats = _run(browser, "v-go", "v-stats", "prefill FLOPs fraction")
    assert "held-out accuracy" in stats and _has_image(browser, "v-image")

    _tab(browser, "Video")
    _fill(browser, "#vv-example input[type=number]", 8)  # the last two-clip video is reachable
    stats = _run(browser, "vv-go", "vv-stats", "KV cache per frame")
    assert "9 held-out two-clip videos" in stats and _has_image(browser, "vv-image")

    _tab(browser, "MuE")
    stats = _run(browser, "m-go", "m-stats", "decoder layer-tokens run")
    assert "exact match" in stats and _has_image(browser, "m-image")

    _tab(browser, "Tune")
    _fill(browser, "#t-model input", "stdlib-lm")
    _fill(browser, "#t-floor textarea, #t-floor input", "agreement=0")
    _fill(browser, "#t-budget textarea, #t-budget input", "2")
    _fill(browser, "#t-inputs input[type=number]", 1)
    table = _run(browser, "t-go", "t-table", "trials;")
    assert "speedup (median, IQR)" in table and _has_image(browser, "t-plot")

    _tab(browser, "Analysis")
    _fill(browser, "#a-text textarea", Path(json.__file__).read_text()[:1500])
    summary = _run(browser, "a-go", "a-summary", "median relative layer contribution")
    assert "layers" in summary and browser.find_element(By.ID, "a-plots").find_elements(By.TAG_NAME, "img")
    browser.save_screenshot(str(ARTIFACTS / "app_analysis.png"))


def test_a_bad_input_shows_one_clear_message(browser):
    _tab(browser, "Diffusion")
    _fill(browser, "#d-model input", "")
    browser.find_element(By.ID, "d-go").click()
    WebDriverWait(browser, 60).until(lambda d: any("the pipeline field is empty" in e for e in _errors(d)))
    assert "model_index.json in directory" not in " ".join(_errors(browser))


@pytest.mark.skipif(not os.environ.get("MMSKIP_APP_SCREENSHOT"), reason="set MMSKIP_APP_SCREENSHOT=PATH to redraw it")
def test_readme_screenshot(browser):
    """The app's picture in docs/cli.md: every tab's header and the Diffusion tab's default run (30 steps).
    ``MMSKIP_APP_SCREENSHOT=apps/app_screenshot.png pytest tests/apps/test_app_browser.py``."""
    browser.refresh()  # the defaults back, no toasts left from other tests
    _tab(browser, "Diffusion")
    _fill(browser, "#d-steps input[type=number]", 30)
    _run(browser, "d-go", "d-stats", "baseline (30 steps)")
    browser.set_window_size(1400, 1450)
    browser.save_screenshot(os.environ["MMSKIP_APP_SCREENSHOT"])
