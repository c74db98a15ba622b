"""The server's web page in a real headless Chromium: ask about an image and watch the answer
stream in, generate an image and watch the progress bar fill, all without the page reaching any
other origin.

Needs the `janus` binary (env `JANUS_BIN`; the test is skipped without it) and Debian's
`chromium` and `chromium-driver` packages (skipped without them, unless `JANUS_REQUIRE_BROWSER=1`).
Run with:

    JANUS_BIN=target/debug/janus python -m pytest -q janus-serve/tests/test_page.py
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import PIL.Image
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "hf-tiny"
PAGE = ROOT / "janus-serve" / "assets" / "index.html"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# The whole test's time budget; a watchdog ends the server and the browser when it runs out.
TEST_BUDGET_S = 120.0
# The longest any single step (server start-up, an answer, an image) may take.
STEP_S = 60.0


class Deadline:
    """One time budget shared by every wait in the test."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float = STEP_S) -> float:
        """The seconds a step may still take: at most `cap`, never past the overall deadline."""
        return max(0.1, min(cap, self.end - time.monotonic()))


class Watchdog:
    """Stops the given processes once the test's budget is spent, so that no wait on them (an HTTP
    call to the server or to chromedriver) can outlive it."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._processes: list[tuple[subprocess.Popen, bool]] = []
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, process: subprocess.Popen | None, group: bool = False) -> None:
        """Stops `process` when the budget runs out; with `group`, its whole process group."""
        if process is not None:
            self._processes.append((process, group))

    def _fire(self) -> None:
        self.fired = True
        for process, group in self._processes:
            if group:
                stop_group(process)
            else:
                stop(process)

    def cancel(self) -> None:
        self._timer.cancel()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s if the process is still running."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def stop_group(process: subprocess.Popen) -> None:
    """Stops the process group that `process` leads (chromedriver and the browser it started):
    SIGTERM, then SIGKILL after 5 s for whatever is left."""

    def signal_group(sig: int) -> bool:
        try:
            os.killpg(process.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if not signal_group(signal.SIGTERM):
        return
    end = time.monotonic() + 5
    while time.monotonic() < end:
        process.poll()
        if not signal_group(0):
            return
        time.sleep(0.1)
    signal_group(signal.SIGKILL)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def free_port() -> int:
    """A TCP port that nothing on 127.0.0.1 listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: pathlib.Path, chars: int = 4000) -> str:
    """The end of a log file, for failure messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@pytest.fixture
def deadline() -> Deadline:
    return Deadline(TEST_BUDGET_S)


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    dog = Watchdog(TEST_BUDGET_S)
    yield dog
    dog.cancel()


@pytest.fixture
def browser_paths() -> tuple[str, str]:
    """Debian's Chromium and its driver; their absence skips the test unless JANUS_REQUIRE_BROWSER=1."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        reason = f"{' and '.join(missing)} missing: install Debian's chromium and chromium-driver"
        if os.environ.get("JANUS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (JANUS_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def server(browser_paths, deadline: Deadline, watchdog: Watchdog, tmp_path: pathlib.Path) -> Iterator[str]:
    """`janus serve` on the tiny test model, on a free port; yields its base URL once /health answers."""
    binary = os.environ.get("JANUS_BIN")
    if not binary:
        pytest.skip("JANUS_BIN is not set (the path of the janus binary to serve)")
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", "--model", str(MODEL), "--port", str(port), "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    watchdog.watch(process)
    base = f"http://127.0.0.1:{port}"
    try:
        start_by = time.monotonic() + deadline.left()
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with status {process.returncode}:\n{tail(log_path)}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > start_by:
                pytest.fail(f"{base}/health did not answer 200 in time:\n{tail(log_path)}")
            time.sleep(0.2)
        yield base
    finally:
        stop(process)
        # Shown by pytest when the test fails.
        print(f"server log (exit status {process.returncode}):\n{tail(log_path)}")


@pytest.fixture
def driver(browser_paths, watchdog: Watchdog, tmp_path: pathlib.Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium through Debian's chromedriver (never Selenium Manager: no downloads)."""
    chromium, chromedriver = browser_paths
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1200,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # chromedriver leads its own process group, so that the browser it starts can be stopped with it.
    service = Service(
        executable_path=chromedriver,
        log_output=str(tmp_path / "chromedriver.log"),
        popen_kw={"start_new_session": True},
    )
    browser = webdriver.Chrome(service=service, options=options)
    watchdog.watch(service.process, group=True)
    try:
        browser.set_page_load_timeout(30)
        browser.set_script_timeout(30)
        yield browser
    finally:
        try:
            browser.quit()
        finally:
            if service.process is not None:
                stop_group(service.process)
            shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def write_png(path: pathlib.Path) -> pathlib.Path:
    """A 64x48 RGB gradient."""
    image = PIL.Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, 128) for y in range(48) for x in range(64)])
    image.save(path)
    return path


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    """The element's text content (also for hidden elements, unlike WebElement.text)."""
    return driver.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)


def image_width(driver: webdriver.Chrome, element_id: str) -> int:
    """The natural width of an <img> once it is shown and decoded, else 0."""
    return driver.execute_script(
        "const i = document.getElementById(arguments[0]);"
        "return !i.hidden && i.complete ? i.naturalWidth : 0;",
        element_id,
    )


def test_page_is_self_contained() -> None:
    """No script, style sheet, font or image comes from anywhere but the page itself."""
    html = PAGE.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"""@import|url\(\s*["']?(?:https?:)?//""", html, re.I)


def test_page(server: str, driver: webdriver.Chrome, deadline: Deadline, watchdog: Watchdog, tmp_path) -> None:
    """Asks about an image, then generates one, in the browser."""
    try:
        run_page(server, driver, deadline, write_png(tmp_path / "gradient.png"))
    except Exception as error:
        if watchdog.fired:
            pytest.fail(f"the test ran past its {TEST_BUDGET_S:.0f} s budget ({error!r})")
        raise


def run_page(base: str, driver: webdriver.Chrome, deadline: Deadline, png: pathlib.Path) -> None:
    driver.get(base + "/")
    assert driver.title == "Janus"

    # Ask about the image: the answer streams into ask-answer, then the button comes back.
    driver.find_element(By.ID, "ask-image").send_keys(str(png))
    WebDriverWait(driver, deadline.left(10)).until(lambda d: image_width(d, "ask-preview") == 64)
    driver.find_element(By.ID, "ask-question").send_keys("What is shown in this image?")
    driver.find_element(By.ID, "ask-submit").click()

    def answered(d: webdriver.Chrome) -> bool:
        if text_of(d, "ask-error").strip():
            return True
        return bool(text_of(d, "ask-answer").strip()) and d.find_element(By.ID, "ask-submit").is_enabled()

    WebDriverWait(driver, deadline.left()).until(answered, "no answer streamed into #ask-answer")
    assert not text_of(driver, "ask-error").strip(), f"ask-error: {text_of(driver, 'ask-error')}"

    # Generate an image: the progress bar fills and the PNG shows.
    driver.find_element(By.ID, "gen-prompt").send_keys("a photo of a cat")
    driver.find_element(By.ID, "gen-submit").click()

    def generated(d: webdriver.Chrome) -> bool:
        if text_of(d, "gen-error").strip():
            return True
        src = d.find_element(By.ID, "gen-image").get_attribute("src") or ""
        full = d.execute_script("const p = document.getElementById('gen-progress'); return p.value === p.max;")
        return src.startswith("data:image/png;base64,") and full

    WebDriverWait(driver, deadline.left()).until(generated, "no image arrived in #gen-image")
    assert not text_of(driver, "gen-error").strip(), f"gen-error: {text_of(driver, 'gen-error')}"
    assert text_of(driver, "gen-status") == "done"
    WebDriverWait(driver, deadline.left(10)).until(
        lambda d: image_width(d, "gen-image") > 0, "the generated PNG does not decode"
    )
    assert driver.find_element(By.ID, "gen-submit").is_enabled()

    # Everything the page loaded came from the server itself (data: and blob: URLs are local).
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    foreign = [r for r in resources if not r.startswith((base + "/", "data:", "blob:"))]
    assert not foreign, f"requests to other origins: {foreign}"
    assert any(r.startswith(base + "/v1/chat/completions") for r in resources), resources
    assert any(r.startswith(base + "/ui/images") for r in resources), resources

    # No script errors and no failed loads in the console.
    severe = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"console errors: {severe}"
