"""Drive a served demo in headless Chromium (Selenium): upload an image, press Compare, wait, screenshot.

Used by the browser test and to regenerate ``docs/demo.png``::

    python -m mgll.demo.screenshot http://127.0.0.1:7860/ /tmp/mgll-demo-examples/synthetic-diabetic-retinopathy.png docs/demo.png

Debian's ``chromium`` and ``chromium-driver`` are used as installed (``/usr/bin``), so Selenium
Manager never looks for a browser online; the flags keep Chromium from calling out as well.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mgll.io import atomic_write_bytes

__all__ = ["CHROME_FLAGS", "PageResult", "chromium_paths", "compare_in_browser"]

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


@dataclass
class PageResult:
    status: str
    base: str
    swapped: str
    base_bars: str
    heatmap_shown: bool
    screenshot: Path | None


def chromium_paths() -> tuple[Path, Path]:
    """(browser, driver): from PATH, else Debian's locations (which may not exist; callers check)."""
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return Path(browser), Path(driver)


def compare_in_browser(url: str, image: str | os.PathLike, screenshot: str | os.PathLike | None = None,
                       width: int = 1400, full_page: bool = False, timeout: float = 90.0,
                       heat_label: str | None = None) -> PageResult:
    """Upload ``image`` through the page's file input, click Compare and wait until both answers are shown.

    ``heat_label`` ("disease: glaucoma") is typed into the heat-map dropdown first, as a user would.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()
    image = Path(image).resolve()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(browser)
    for flag in (*CHROME_FLAGS, f"--window-size={width},1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=opts)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, timeout)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))[0]
        upload.send_keys(str(image))
        # the upload is finished when the file row (with its server-side download link) is shown
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#image-input td.filename[aria-label="{image.name}"]'))
        if heat_label:
            box = driver.find_element(By.CSS_SELECTOR, "#heat-label input")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(heat_label)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'li[role=option][aria-label="{heat_label}"]'))
            box.send_keys(Keys.ENTER)
        driver.find_element(By.ID, "compare-btn").click()

        def answered(d):
            texts = [d.find_element(By.ID, i).text for i in ("base-answer", "swapped-answer")]
            return texts if all(t.startswith("Answer:") for t in texts) else None

        base, swapped = wait.until(answered)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap img"))
        result = PageResult(
            status=driver.find_element(By.ID, "status").text,
            base=base,
            swapped=swapped,
            base_bars=driver.find_element(By.ID, "base-probs").text,
            heatmap_shown=bool(driver.find_elements(By.CSS_SELECTOR, "#heatmap img")),
            screenshot=None,
        )
        if screenshot is not None:
            if full_page:
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(width, int(height) + 40)
                time.sleep(1.0)  # let the layout settle at the new size
            result.screenshot = atomic_write_bytes(screenshot, driver.get_screenshot_as_png())
        return result
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("image")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--heat-label", help='heat-map label to pick first, e.g. "disease: glaucoma"')
    args = p.parse_args(argv)
    r = compare_in_browser(args.url, args.image, args.out, width=args.width, full_page=True, heat_label=args.heat_label)
    print(f"{r.status}\nbase: {r.base}\nswapped: {r.swapped}\nwrote {r.screenshot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
