"""The web page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by selenium loads /, uploads a CamVid picture, waits for the overlay, checks the legend
against the API's answer and the class under the pointer, and saves a screenshot
(OFFSEG_SERVE_SCREENSHOT=path to keep it, e.g. for docs/serve.md)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servehelpers import camvid_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"the browser test needs headless Chromium at {CHROMIUM} and {CHROMEDRIVER}: {INSTALL}")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="the browser test needs selenium: pip install selenium"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",  # as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",  # a closed network refuses Chromium's own connections
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_segments_an_upload_and_shows_the_legend(server_url, browser, camvid, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = camvid_images(3)[-1]
    answer = httpx.post(f"{server_url}/v1/segment", content=path.read_bytes(), timeout=60).json()
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["labels_png"]))))

    browser.get(server_url + "/")
    WebDriverWait(browser, 30).until(lambda d: "offseg-t" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    section = WebDriverWait(browser, 120).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".result[data-state='done'], .result[data-state='error']")
    )
    assert section.get_attribute("data-state") == "done", section.find_element(By.CLASS_NAME, "status").text
    # the overlay: the label canvas holds the picture's label map, over the picture, at the slider's opacity
    canvas = section.find_element(By.CSS_SELECTOR, "canvas.labels")
    assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (
        labels.shape[1],
        labels.shape[0],
    )
    assert (
        browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth",
            section.find_element(By.CSS_SELECTOR, "img.under"),
        )
        == labels.shape[1]
    )
    slider = section.find_element(By.CSS_SELECTOR, "input.opacity")
    browser.execute_script("arguments[0].value = 0.3; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert float(canvas.value_of_css_property("opacity")) == pytest.approx(0.3)
    # the legend: every present class with its area, largest first, as the API answered
    rows = section.find_elements(By.CSS_SELECTOR, ".legend tbody tr")
    shown = [(int(r.get_attribute("data-class-id")), r.find_element(By.CLASS_NAME, "area").text) for r in rows]
    expected = [
        (c["id"], f"{100 * c['fraction']:.1f} %") for c in sorted(answer["classes"], key=lambda c: -c["fraction"])
    ]
    assert shown == expected
    # the class under the pointer: move to the middle of the overlay view
    view = section.find_elements(By.CSS_SELECTOR, ".view")[1]
    ActionChains(browser).move_to_element(view).perform()
    readout = section.find_element(By.CLASS_NAME, "pointer")
    x, y = (int(v) for v in readout.text.rsplit("(pixel ", 1)[1].rstrip(")").split(", "))
    assert abs(x - labels.shape[1] // 2) <= 2 and abs(y - labels.shape[0] // 2) <= 2
    card = httpx.get(f"{server_url}/v1/model").json()
    assert readout.text.startswith(card["classes"][int(labels[y, x])]["name"] + " (")

    browser.execute_script("arguments[0].value = 0.6; arguments[0].dispatchEvent(new Event('input'))", slider)
    screenshot = tmp_path / "serve-page.png"
    browser.execute_script("arguments[0].scrollIntoView()", section)
    assert browser.save_screenshot(str(screenshot)) and Image.open(screenshot).size[0] > 0
    if os.environ.get("OFFSEG_SERVE_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["OFFSEG_SERVE_SCREENSHOT"])
