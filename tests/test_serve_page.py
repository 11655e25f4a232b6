"""`charlstm serve`'s page in a real headless browser (Chromium driven by Selenium) against a real
server process on a tiny model: a streamed sample that grows as it arrives and that Stop ends on
the server too, the server's 400 for a prime outside the vocabulary, the API key field, and a
run folder's loss curves and reload notice.

Skips, saying why, where Selenium, Chromium or its driver is missing (.ci/run installs Debian's
chromium and chromium-driver). CHARLSTM_SCREENSHOTS=DIR keeps serve-page.png and serve-run.png
there (docs/ holds the published ones)."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from charlstm.checkpoint import load_checkpoint
from charlstm.cli import cli

from tests.conftest import INTERRUPT, OWN_GROUP, SHAKESPEARE_HEAD, TINY, cli_runner, seconds

pytest.importorskip("aiohttp", reason="the serve extra is not installed (pip install 'charlstm[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.chrome.options import Options  # noqa: E402 (after the skip above)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

PORT_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)/")  # the serve contract's startup line
PRIME = "First Citizen:\nBefore we"
WIDTH, HEIGHT = 1280, 900  # the page's viewport, and so the screenshots' size


# ------------------------------------------------------------------------------- the browser

def chromium():
    """Paths of a Chromium (or Chrome) and its chromedriver; skips the test, saying which is missing."""
    binary = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
    driver = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
    if not binary or not driver:
        missing = " and ".join(name for name, path in [("chromium", binary), ("chromedriver", driver)] if not path)
        pytest.skip(f"no {missing} on PATH (Debian: apt-get install chromium chromium-driver)")
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = chromium()
    options = Options()
    options.binary_location = binary
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}"]:
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except Exception as e:  # a driver that does not match the browser, or a browser that cannot start
        pytest.skip(f"{binary} with {driver_path} does not start: {str(e).splitlines()[0]}")
    # --window-size counts the window, not the page: grow it by the difference to a WIDTH x HEIGHT page.
    driver.set_window_size(WIDTH, HEIGHT)
    inner_width, inner_height = driver.execute_script("return [innerWidth, innerHeight]")
    driver.set_window_size(2 * WIDTH - inner_width, 2 * HEIGHT - inner_height)
    yield driver
    driver.quit()


def screenshot(driver, name):
    folder = os.environ.get("CHARLSTM_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(Path(folder) / name))


def text_of(driver, element_id):
    """An element's whole text, hidden or scrolled out of view too (Selenium's .text shows only what
    is visible); "" while the page has not made it."""
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : ''",
                                 element_id)


# --------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run of 40 steps, validated every 5: best.npz, latest.npz and metrics.jsonl."""
    out = tmp_path_factory.mktemp("serve_page")
    corpus = out / "corpus.txt"
    corpus.write_text((SHAKESPEARE_HEAD * 3)[:1000], encoding="utf-8")
    result = cli_runner().invoke(cli, ["train", str(corpus), *TINY, "--steps", "40", "--out", str(out),
                                       "--run", "tiny", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out / "tiny"


class Server:
    def __init__(self, proc):
        self.proc, self.lines, self.url = proc, [], None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self):
        return "".join(self.lines)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=seconds(10)) as response:
            return response.read().decode()

    def metric(self, name):
        match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", self.get("metrics"), re.M)
        assert match, f"/metrics has no {name}"
        return float(match.group(1))


@contextmanager
def serve(source, *options):
    """A `charlstm serve` process on a free port; stopped as Ctrl-C would stop it."""
    argv = [sys.executable, "-m", "charlstm", "serve", str(source), "--port", "0", "--host", "127.0.0.1",
            "--threads", "1", *map(str, options)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **OWN_GROUP)
    server = Server(proc)
    try:
        port = wait_until(lambda: next((m.group(1) for m in map(PORT_LINE.search, server.lines) if m), None),
                          "the server's startup line", server, timeout=120)
        server.url = f"http://127.0.0.1:{port}/"
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(INTERRUPT)
            try:
                proc.wait(timeout=seconds(30))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until(condition, what, server, timeout=30):
    """condition()'s first truthy value, polled until `timeout` seconds; fails, with the server's
    log, when the server exits first or time runs out."""
    deadline = time.monotonic() + seconds(timeout)
    while True:
        value = condition()
        if value:
            return value
        assert server.proc.poll() is None, f"the server exited ({server.proc.returncode}):\n{server.log()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}; server log:\n{server.log()}"
        time.sleep(0.05)


def open_page(driver, server):
    driver.get(server.url)
    wait_until(lambda: text_of(driver, "fact-step"), "the model's facts", server)


def fill(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


# ----------------------------------------------------------------------------------- the tests

def test_a_sample_streams_and_stop_ends_it_on_the_server(browser, run_dir):
    """The prime shows first and the sample grows after it as pieces arrive; Stop aborts the
    fetch, and the server counts that stream cancelled and none active."""
    # The tiny model writes some 300,000 characters a second (and the server queues them however
    # fast the page reads), so a stream that must still run when Stop comes asks for minutes of them.
    limit = 100_000_000
    with serve(run_dir / "best.npz", "--max-tokens-limit", limit) as server:
        open_page(browser, server)
        assert browser.find_element(By.ID, "key-box").is_displayed() is False  # no key asked
        assert text_of(browser, "fact-shape").startswith("2 × 12 LSTM")
        fill(browser, "prime", PRIME)
        fill(browser, "temperature", "0.5")
        fill(browser, "length", str(limit))
        browser.find_element(By.ID, "generate").click()
        output = lambda: text_of(browser, "output")  # noqa: E731
        first = len(wait_until(lambda: len(output()) > len(PRIME) + 50 and output(), "the sample", server))
        wait_until(lambda: len(output()) > first + 50, "the sample to grow", server)
        assert output().startswith(PRIME)
        assert server.metric("charlstm_streams_active") == 1
        screenshot(browser, "serve-page.png")
        browser.find_element(By.ID, "stop").click()
        wait_until(lambda: server.metric("charlstm_streams_active") == 0, "the stream to end", server, timeout=10)
        assert server.metric("charlstm_streams_cancelled_total") >= 1
        wait_until(lambda: text_of(browser, "status").startswith("Stopped after"), "the stopped status", server)
        stopped = len(output())
        time.sleep(seconds(0.5))
        assert len(output()) == stopped < len(PRIME) + limit
        assert browser.find_element(By.ID, "generate").is_enabled()
        assert not browser.find_element(By.ID, "stop").is_enabled()


def test_a_prime_outside_the_vocabulary_shows_the_servers_400(browser, run_dir):
    with serve(run_dir / "best.npz") as server:
        open_page(browser, server)
        fill(browser, "prime", "First Citizen: \u2603")
        browser.find_element(By.ID, "generate").click()
        status = browser.find_element(By.ID, "status")
        wait_until(lambda: "error" in status.get_attribute("class"), "the error", server)
        assert status.text.startswith("400: ") and "\u2603" in status.text, status.text
        assert text_of(browser, "output-text") == ""


def test_the_key_field_shows_only_with_auth_and_its_key_is_sent(browser, run_dir):
    with serve(run_dir / "best.npz", "--api-key", "s3cret") as server:
        browser.get(server.url)
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        status = browser.find_element(By.ID, "status")
        wait_until(lambda: status.text.startswith("401: "), "the 401", server)
        assert browser.find_element(By.ID, "key-box").is_displayed()
        fill(browser, "api-key", "s3cret" + Keys.ENTER)  # Enter commits the field: its change event
        wait_until(lambda: text_of(browser, "fact-step"), "the facts with the key", server)
        browser.refresh()  # the key was kept
        wait_until(lambda: text_of(browser, "fact-step"), "the facts after a reload", server)
        browser.execute_script("localStorage.clear()")


def test_a_run_folder_draws_its_curves_and_notices_a_newer_best(browser, run_dir, tmp_path):
    """Served from the run folder, the page draws every train and validation record of
    metrics.jsonl; when training goes on and writes a better best.npz, the server loads it and the
    page says so and shows its step."""
    run = tmp_path / "tiny"
    shutil.copytree(run_dir, run)  # training goes on below: the other tests keep the 40-step run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with serve(run) as server:
        open_page(browser, server)
        canvas = browser.find_element(By.ID, "curves")
        counts = lambda: (int(canvas.get_attribute("data-train-points")),  # noqa: E731
                          int(canvas.get_attribute("data-val-points")))
        drawn = (sum("train_loss" in r for r in records), sum("val_loss" in r for r in records))
        wait_until(lambda: all(counts()), "the curves", server)
        assert counts() == drawn and all(drawn)
        assert text_of(browser, "fact-step") == str(json.loads(server.get("api/model"))["step"])

        before = load_checkpoint(run / "best.npz").manifest["step"]
        result = cli_runner().invoke(cli, ["train", "--resume", str(run / "latest.npz"), "--steps", "80", "--quiet"],
                                     catch_exceptions=False)
        assert result.exit_code == 0, result.output
        best = load_checkpoint(run / "best.npz").manifest["step"]
        assert best > before  # the tiny model still improves between steps 40 and 80
        wait_until(lambda: f"step {best}" in text_of(browser, "run-notice"), "the reload notice", server)
        wait_until(lambda: text_of(browser, "fact-step") == str(best), "the new step in the facts", server)
        wait_until(lambda: counts()[0] > drawn[0] and counts()[1] > drawn[1], "the longer curves", server)

        fill(browser, "prime", PRIME)
        fill(browser, "length", "400")
        browser.find_element(By.ID, "generate").click()
        wait_until(lambda: text_of(browser, "status").startswith("Done: 400 characters"), "the sample", server)
        screenshot(browser, "serve-run.png")
