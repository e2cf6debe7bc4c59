"""The web page in a real headless browser (Debian's chromium + chromium-driver through Selenium):
upload a real fixture image, the table lists every label with its threshold and mark, the image and
the heatmap appear with a colour scale, a synthetic-data model says so, several files make a list in
which each image opens on its own top label, and a file that is not an image shows the server's reason
(naming the file once). Skipped only without chromium.

Set CXRLAB_SCREENSHOT=path to keep the page's screenshot after the first upload, CXRLAB_SCREENSHOT_LIST=path
after the several-file upload (docs/web_page.png was made that way, CXRLAB_PAGE_MODEL naming a trained model)."""
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
                 "--window-size=1200,1000"):
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


def _image_loaded(driver, element_id):
    return driver.execute_script(
        f"const i = document.getElementById('{element_id}'); "
        "return i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null")


def _predicted_top(page_url, path) -> str:
    labels = httpx.post(page_url + "/predict", files={"files": (path.name, path.read_bytes())}).json()["results"][0]["labels"]
    return max(labels, key=lambda e: e["probability"])["label"]


def test_upload_table_heatmap_and_error(browser, page_url, shared_data, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    assert "not a medical device" in browser.find_element(By.ID, "disclaimer").text.lower()
    _wait(browser, lambda d: "labels" in d.find_element(By.ID, "model").text)
    synthetic = not os.environ.get("CXRLAB_PAGE_MODEL")
    if synthetic:  # the test model's card says synthetic:...: the page says so, plainly
        assert browser.find_element(By.ID, "provenance").text.startswith("trained on synthetic radiographs (synthetic:")
        assert "say nothing about real chest X-rays" in browser.find_element(By.ID, "synthetic").text
    browser.find_element(By.ID, "file").send_keys(str(shared_data / "nih" / "00000001_000.png"))
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#labels tbody tr"))
    model_labels = [x["label"] for x in httpx.get(page_url + "/labels").json()["labels"]]
    if synthetic:
        assert model_labels == list(LABELS)
    names = [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows]
    assert sorted(names) == sorted(model_labels)  # every label, once
    probabilities = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)  # sorted by probability
    for row in rows:
        cells = row.find_elements(By.TAG_NAME, "td")
        p, t = float(cells[1].text), float(cells[2].text)
        if p != t:  # equal at three decimals: the mark follows the unrounded values
            assert cells[3].text.endswith("positive" if p > t else "negative")
    # the image itself (rendered by the server at 512 px) and the heatmap of the most probable label
    assert _wait(browser, lambda d: _image_loaded(d, "image")) == [512, 512]
    assert _wait(browser, lambda d: _image_loaded(d, "heatmap")) == [512, 512]
    caption = browser.find_element(By.ID, "heatmap-caption").text
    assert caption.startswith(names[0] + ": p = ")
    assert browser.find_element(By.ID, "scale").is_displayed()
    assert "map minimum" in browser.find_element(By.ID, "scale").text
    assert browser.find_elements(By.CSS_SELECTOR, "#files li") == [] or not browser.find_element(By.ID, "files").is_displayed()
    # choosing another label redraws the heatmap for it
    rows[-1].click()
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(names[-1] + ": p = "))
    rows = browser.find_elements(By.CSS_SELECTOR, "#labels tbody tr")
    rows[0].click()
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(names[0] + ": p = "))
    shot = os.environ.get("CXRLAB_SCREENSHOT")
    browser.save_screenshot(shot or str(tmp_path / "page.png"))
    # a file that is not an image, whatever its name: the server's reason is shown, naming the file once
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text, not pixels")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    error = _wait(browser, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed()
                  else None)
    assert error.text.count("not_an_image.png") == 1 and "not a PNG, JPEG or DICOM" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    icon = httpx.get(page_url + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def test_several_files_each_opens_on_its_own_top_label(browser, page_url, shared_data, tmp_path):
    """Three files at once (one unreadable) make a list; the first readable one is shown; picking another
    shows its image and its own top label, not the label picked for the one before; a DICOM is drawn."""
    from selenium.webdriver.common.by import By

    png, dcm = shared_data / "covid" / "16747_3_1.jpg", shared_data / "dicom" / "siim_pneumothorax_example.dcm"
    cut = tmp_path / "cut.png"
    cut.write_bytes((shared_data / "nih" / "00027426_000.png").read_bytes()[:300])
    browser.get(page_url)
    _wait(browser, lambda d: "labels" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in (png, cut, dcm)))
    items = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#files li") if len(
        d.find_elements(By.CSS_SELECTOR, "#files li")) == 3 else None)
    assert browser.find_element(By.ID, "files").is_displayed()
    assert [i.find_element(By.CLASS_NAME, "name").text for i in items] == [png.name, "cut.png", dcm.name]
    assert items[1].text.count("cut.png") == 1 and "cut.png: " not in items[1].text  # the reason, no repeated name
    assert items[0].text.startswith(f"{png.name} top: {_predicted_top(page_url, png)} ")
    assert "selected" in items[0].get_attribute("class")
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(_predicted_top(page_url, png)))
    # pick a label the DICOM's top label is not, then open the DICOM: its own top label is shown
    dicom_top = _predicted_top(page_url, dcm)
    other = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#labels tbody tr") if r.get_attribute("data-label") != dicom_top)
    other.click()
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(other.get_attribute("data-label")))
    items[2].click()
    _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(dicom_top + ": p = "))
    assert browser.find_element(By.ID, "image-caption").text == dcm.name
    assert _wait(browser, lambda d: _image_loaded(d, "image")) == [512, 512]  # the DICOM itself, drawn
    selected = browser.find_element(By.CSS_SELECTOR, "#labels tbody tr.selected").get_attribute("data-label")
    assert selected == dicom_top
    # the unreadable one: its reason, once named
    browser.find_elements(By.CSS_SELECTOR, "#files li")[1].click()
    error = _wait(browser, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed()
                  else None)
    assert error.text.count("cut.png") == 1 and not browser.find_element(By.ID, "result").is_displayed()
    shot = os.environ.get("CXRLAB_SCREENSHOT_LIST")  # docs/web_page.png: the list, the letterboxed JPEG
    if shot:
        items[0].click()
        _wait(browser, lambda d: _image_loaded(d, "image") and _image_loaded(d, "heatmap"))
        browser.save_screenshot(shot)


def test_flat_heatmap_is_flagged(browser, tmp_path, shared_data):
    """A label whose map is one colour (a linear head's CAM that ReLU zeroes everywhere) gets a visible
    note under the heatmap; a label with a varying map does not."""
    from selenium.webdriver.common.by import By
    from test_heatmap_flat import _zero_and_varying_labels

    from cxrlab.inference.server import create_app

    image = shared_data / "nih" / "00000001_000.png"
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", "linear")
    flat_label, varying_label = _zero_and_varying_labels(checkpoint, image)
    with running(create_app(checkpoint, workers=1)) as url:
        browser.get(url)
        _wait(browser, lambda d: "labels" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(image))
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#labels tbody tr"))
        for label, flat in ((flat_label, True), (varying_label, False), (flat_label, True)):
            browser.find_element(By.CSS_SELECTOR, f'#labels tbody tr[data-label="{label}"]').click()
            _wait(browser, lambda d: d.find_element(By.ID, "heatmap-caption").text.startswith(label + ": p = "))
            note = browser.find_element(By.ID, "flat")
            assert note.is_displayed() == flat
            if flat:
                assert note.text.startswith(f"flat map: this model gives no spatial evidence for {label}")
