"""The app in a real browser: `mole-diffusion ui` serves the demo world on localhost (a subprocess) and headless
Chromium, driven by Selenium, uses the page as a person would. Writes docs/ui.png and docs/ui-compare.png.

Needs Chromium, its driver, Gradio and Selenium; skips, saying which is missing, without them:

    apt-get install -y chromium chromium-driver
    pip install -e ".[ui]" selenium
    pytest tests/test_ui_browser.py
"""

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [what for what, there in (
    ("Chromium (apt-get install chromium)", CHROMIUM),
    ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
    ("Gradio (pip install -e '.[ui]')", importlib.util.find_spec("gradio")),
    ("Selenium (pip install selenium)", importlib.util.find_spec("selenium")),
) if not there]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the browser test needs {', '.join(MISSING)}")

SCREENSHOT = Path(__file__).parent.parent / "docs" / "ui.png"
TIMEOUT = 180  # seconds for the server to start or a drawing to finish, on 2 busy CPU cores


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """`mole-diffusion ui` on a free port of 127.0.0.1, until the module's tests are done."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("ui") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mole_diffusion.cli", "ui", "--port", str(port), "--device", "cpu"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    address = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"`mole-diffusion ui` exited with {server.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(address, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"`mole-diffusion ui` did not answer on {address} in {TIMEOUT} s:\n{log.read_text()}")
                time.sleep(0.5)
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=f"waiting for {what}")


def element(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def status(driver) -> str:
    return element(driver, "#status").text


def shown_image(driver, css: str) -> Image.Image | None:
    """The picture a gr.Image shows, fetched from the app as the browser fetched it."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"{css} img")
    source = found[0].get_attribute("src") if found else None
    if not source:
        return None
    with urllib.request.urlopen(source, timeout=10) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def generate(driver) -> Image.Image:
    """Click Generate, wait for this click's summary in the status line (it differs from the last one: each
    click here follows a change), return the image."""
    before = status(driver)
    element(driver, "#generate").click()
    wait_for(driver, lambda d: status(d) != before and status(d).startswith(("drew", "error")), "the drawing to finish")
    assert status(driver).startswith("drew"), status(driver)
    return shown_image(driver, "#image")


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: "experts star, stripes, checker" in element(d, "#world").text, "the page to load", 60)


def external_requests(driver) -> list[str]:
    """Every URL the page asked for that is not on this machine (data: URLs are inline)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return [u for u in urls if not u.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))]


def test_page_loads_offline(browser, url):
    open_page(browser, url)
    assert browser.title == "mole-diffusion"
    labels = [label.text for label in browser.find_elements("css selector", "#experts label")]
    assert labels == ["star", "stripes", "checker"]
    assert external_requests(browser) == []  # no analytics, fonts or scripts from the internet


def test_generation_shows_image_and_heatmap(browser, url):
    open_page(browser, url)
    image = generate(browser)
    assert image is not None and image.size == (64, 64) and np.asarray(image).std() > 5  # a picture, not a flat field
    heatmap = shown_image(browser, "#heatmap")
    assert heatmap is not None and heatmap.width > 300 and heatmap.height > 300
    assert "learned gates over star, stripes, checker" in status(browser)
    browser.set_window_size(1400, 1300)  # the controls down to the buttons, the image and the heatmap
    browser.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    browser.set_window_size(1400, 1000)
    assert external_requests(browser) == []


def test_unchecking_an_expert_changes_the_image(browser, url):
    open_page(browser, url)
    everything = np.asarray(generate(browser)).astype(int)
    checker = next(label for label in browser.find_elements("css selector", "#experts label") if label.text == "checker")
    checker.click()
    wait_for(browser, lambda d: not checker.find_element("css selector", "input").is_selected(), "checker to be unchecked", 10)
    masked = np.asarray(generate(browser)).astype(int)
    assert "(checker masked)" in status(browser)
    assert np.abs(everything - masked).max() > 8


def test_compare_shows_every_method_side_by_side(browser, url):
    open_page(browser, url)
    element(browser, "#compare").click()
    wait_for(browser, lambda d: status(d).startswith(("compared", "error")), "the comparison to finish")
    assert status(browser).startswith("compared base, lora star, lora stripes, lora checker, NLA (uniform), sum, MoLE, regional")
    tiles = wait_for(browser, lambda d: len(d.find_elements("css selector", "#gallery img")) >= 8 and
                     d.find_elements("css selector", "#gallery img"), "the gallery's images", 30)
    assert len({tile.get_attribute("src") for tile in tiles}) >= 6  # not one image repeated (NLA and sum may match others)
    browser.set_window_size(1400, 1300)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(SCREENSHOT.with_name("ui-compare.png")))
    browser.set_window_size(1400, 1000)


def test_a_bad_lora_path_is_a_message_and_the_app_keeps_working(browser, url):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, url)
    element(browser, "#model button").click()  # open the model panel
    loras = wait_for(browser, lambda d: element(d, "#loras textarea").is_displayed() and element(d, "#loras textarea"),
                     "the model panel to open", 10)
    lines = loras.get_attribute("value").splitlines()  # the demo world's: star=..., stripes=..., checker=...
    assert lines[0].startswith("star=")
    loras.send_keys(Keys.CONTROL, "a")
    loras.send_keys(Keys.DELETE)
    loras.send_keys("\n".join(["star=/nowhere/star.safetensors", *lines[1:]]))  # a mistyped path
    element(browser, "#load").click()
    wait_for(browser, lambda d: "error" in status(d), "the error message")
    assert "/nowhere/star.safetensors: LoRA file not found" in status(browser)
    assert "still loaded: star, stripes, checker" in status(browser)
    assert generate(browser).size == (64, 64)  # the world loaded before still draws
    assert external_requests(browser) == []
