"""The chat page at `/`, driven by headless Chromium (Debian's chromium + chromium-driver, via Selenium)."""

from __future__ import annotations

import shutil

import pytest
from serve_helpers import API_KEY, png_bytes, start_server

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver on PATH")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1000,800",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(serve_dir, one_thread):
    with start_server(serve_dir, max_batch_size=4, default_max_tokens=16) as live:
        yield live


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, predicate, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))


def test_chat_page_streams_an_answer_about_an_attached_image(server, browser, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes((64, 48)))
    browser.get(server.url + "/")
    assert "minillava" in browser.title
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait_for(browser, lambda d: d.find_element(By.ID, "model-name").text == "tiny")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("24")

    browser.find_element(By.ID, "file-input").send_keys(str(image))
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments .thumb img")) == 1)
    browser.find_element(By.ID, "prompt").send_keys("What is in the picture?")
    browser.find_element(By.ID, "send").click()

    answer = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[0]
    wait_for(browser, lambda d: answer.get_attribute("data-state") != "streaming")
    assert answer.get_attribute("data-state") == "done", answer.text
    assert answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    assert int(answer.get_attribute("data-chunks")) > 1  # arrived as several streamed deltas
    assert answer.get_attribute("data-finish") in ("stop", "length")
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert user.find_elements(By.TAG_NAME, "img") and "What is in the picture?" in user.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#attachments .thumb")  # cleared after sending

    # A follow-up with a pasted image: the history (with the first image) goes along.
    paste = """
        const b64 = arguments[0], bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "pasted.png", { type: "image/png" }));
        const paste = new ClipboardEvent("paste", { clipboardData: dt, bubbles: true });
        document.getElementById("prompt").dispatchEvent(paste);
    """
    import base64

    browser.execute_script(paste, base64.b64encode(png_bytes((30, 30), color=(0, 0, 255))).decode())
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments .thumb img")) == 1)
    browser.find_element(By.ID, "prompt").send_keys("and this one?")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    wait_for(browser, lambda d: second.get_attribute("data-state") != "streaming")
    assert second.get_attribute("data-state") == "done", second.text
    history = browser.execute_script(
        "return state.history.map(m => [m.role, Array.isArray(m.content) ? m.content.length : 1])"
    )
    assert history == [["user", 2], ["assistant", 1], ["user", 2], ["assistant", 1]]


def test_chat_page_shows_server_errors(server, browser):
    browser.get(server.url + "/")
    browser.execute_script("localStorage.setItem('minillava.apiKey', 'wrong')")
    browser.refresh()
    wait_for(browser, lambda d: "API key" in d.find_element(By.ID, "model-name").text)
    browser.find_element(By.ID, "prompt").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    answer = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[0]
    wait_for(browser, lambda d: answer.get_attribute("data-state") == "error")
    assert "API key" in answer.text
    assert browser.execute_script("return state.history.length") == 0
    browser.execute_script("localStorage.removeItem('minillava.apiKey')")
