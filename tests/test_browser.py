"""The web page in a real headless browser (Debian's chromium + chromium-driver through Selenium):
upload a real fixture image, the table lists every label with its threshold and mark, the heatmap
appears, and a file that is not an image shows the server's reason. Skipped only without chromium.

Set CXRLAB_SCREENSHOT=path to keep the page's screenshot (docs/web_page.png was made that way)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from test_export import LABELS, one_thread, tiny_checkpoint  # noqa: F401 (autouse)
from test_server import running

CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not CHROMEDRIVER.exists() or not chromium:
        pytest.skip("no chromium/chromium-driver here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,820"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, shared_data):
    from cxrlab.inference.export import export_onnx
    from cxrlab.inference.server import create_app

    model = os.environ.get("CXRLAB_PAGE_MODEL")  # the screenshot used a trained model
    if not model:
        tmp = tmp_path_factory.mktemp("page")
        model = tmp / "model.onnx"
        export_onnx(tiny_checkpoint(tmp / "ckpt", "lcl"), model, check=[shared_data / "nih" / "00000001_000.png"])
    with running(create_app(model, workers=1)) as url:
        yield url


def _wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_upload_table_heatmap_and_error(browser, page_url, shared_data, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    assert "not a medical device" in browser.find_element(By.ID, "disclaimer").text.lower()
    _wait(browser, lambda d: "labels" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(shared_data / "nih" / "00000001_000.png"))
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#labels tbody tr"))
    model_labels = [x["label"] for x in httpx.get(page_url + "/labels").json()["labels"]]
    if not os.environ.get("CXRLAB_PAGE_MODEL"):
        assert model_labels == list(LABELS)
    names = [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows]
    assert sorted(names) == sorted(model_labels)  # every label, once
    probabilities = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)  # sorted by probability
    for row in rows:
        cells = row.find_elements(By.TAG_NAME, "td")
        p, t = float(cells[1].text), float(cells[2].text)
        assert cells[3].text.endswith("positive" if p >= t else "negative")
    # the heatmap of the most probable label is drawn (a decoded PNG from the server)
    _wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('heatmap'); return i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0"))
    caption = browser.find_element(By.ID, "heatmap-caption").text
    assert caption.startswith(names[0] + ": p = ")
    # choosing another label redraws the heatmap for it
    rows[-1].click()
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(names[-1] + ": p = "))
    rows = browser.find_elements(By.CSS_SELECTOR, "#labels tbody tr")
    rows[0].click()
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(names[0] + ": p = "))
    shot = os.environ.get("CXRLAB_SCREENSHOT")
    browser.save_screenshot(shot or str(tmp_path / "page.png"))
    # a file that is not an image, whatever its name: the server's reason is shown
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text, not pixels")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    error = _wait(browser, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed()
                  else None)
    assert "not_an_image.png" in error.text and "not a PNG, JPEG or DICOM" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
