"""Take the README's screenshot of `python -m stages.app`: start the app on a model, open the page in headless
Chromium (Debian's chromium + chromium-driver, driven by Selenium, nothing downloaded), pick a known query (the first
listed, in shard order or with --order failures worst target rank first; or --query-id), search and save the page
as a PNG.

    python docs/screenshot_app.py --model data/train/model.pt --index data/index --shards data/shards \
        --per-query data/evaluate --out docs/figures/app.png

tests/test_app_browser.py drives the page with the same functions.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model: Path, index: Path, shards: Path, per_query: Path | None, port: int,
              timeout: float = 60.0) -> subprocess.Popen:
    """`python -m stages.app` on 127.0.0.1:port, once it answers /api/info (its output goes to our stderr)."""
    command = [sys.executable, "-m", "stages.app", "--model", str(model), "--index", str(index), "--shards",
               str(shards), "--port", str(port), "--device", "cpu"]
    if per_query is not None:
        command += ["--per-query", str(per_query)]
    process = subprocess.Popen(command, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode}: {' '.join(command)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=2):
                return process
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    stop_app(process)
    raise RuntimeError(f"the app did not answer on port {port} within {timeout:.0f} s")


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def chromium(width: int = 1280, height: int = 900):
    """A headless Chromium driven through Debian's chromedriver (Selenium Manager is never asked for anything)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager may not go online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def search_known_query(driver, url: str, query_id: str | None = None, order: str = "file", k: int = 10,
                       timeout: float = 20.0) -> list[dict]:
    """Open the page, list the known queries in `order`, pick `query_id` (None: the first listed), set k, search;
    returns the shown results as [{image_id, target}] in rank order."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#queries li.query")))
    if order != "file":
        first = driver.find_element(By.CSS_SELECTOR, "#queries li.query")
        Select(driver.find_element(By.ID, "order")).select_by_value(order)
        wait.until(ready.staleness_of(first))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#queries li.query")))
    if query_id is None:
        item = driver.find_element(By.CSS_SELECTOR, "#queries li.query")
    else:
        item = driver.find_element(By.CSS_SELECTOR, f'#queries li.query[data-query-id="{query_id}"]')
    item.click()
    field = driver.find_element(By.ID, "k")
    field.clear()
    field.send_keys(str(k))
    searches = driver.find_element(By.ID, "results").get_attribute("data-searches")
    driver.find_element(By.ID, "search").click()
    wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-searches") != searches)
    status = driver.find_element(By.ID, "status").text
    if status:
        raise RuntimeError(f"the page says: {status}")
    wait.until(lambda d: all(img.get_property("complete") for img in d.find_elements(By.CSS_SELECTOR, "#results img")))
    return [{"image_id": figure.get_attribute("data-image-id"), "target": "target" in figure.get_attribute("class")}
            for figure in driver.find_elements(By.CSS_SELECTOR, "#results figure.result")]


def screenshot(model: Path, index: Path, shards: Path, per_query: Path | None, out: Path, query_id: str | None = None,
               order: str = "file", k: int = 10, width: int = 1280, height: int = 900) -> list[dict]:
    """Start the app, search a known query in the browser and save the page to `out` (PNG); returns the results."""
    why = missing_browser()
    if why:
        raise SystemExit(f"screenshot_app: {why}")
    port = free_port()
    app = start_app(model, index, shards, per_query, port)
    try:
        driver = chromium(width, height)
        try:
            shown = search_known_query(driver, f"http://127.0.0.1:{port}/", query_id, order, k)
            driver.execute_script("window.scrollTo(0, 0)")
            out.parent.mkdir(parents=True, exist_ok=True)
            if not driver.save_screenshot(str(out)):
                raise RuntimeError(f"Chromium could not save {out}")
        finally:
            driver.quit()
    finally:
        stop_app(app)
    return shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--index", type=Path, default=Path("data/index"))
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--per-query", type=Path, help="evaluate's per-query folder (needed by --order failures)")
    parser.add_argument("--order", choices=["file", "failures"], default="file",
                        help="how the known queries are listed; the first is shown (default: file, shard order)")
    parser.add_argument("--query-id", help="the known query to show (default: the first listed)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/app.png"))
    args = parser.parse_args(argv)
    shown = screenshot(args.model.resolve(), args.index.resolve(), args.shards.resolve(),
                       args.per_query.resolve() if args.per_query else None, args.out, args.query_id, args.order,
                       args.k, args.width, args.height)
    print(f"screenshot_app: {len(shown)} results shown -> {args.out}")


if __name__ == "__main__":
    main()
