"""Screenshots of `imgstore serve`'s pages for the README, from the demo collection.

    make demo                                   # ./imgstore.db from ./demo-photos
    python benchmarks/screenshots.py [--db imgstore.db] [--photos demo-photos]

Starts `imgstore serve` on a free loopback port, drives Debian's headless Chromium (Selenium)
through the search (chelsea.png uploaded), duplicates, image and collection pages, and writes
JPEGs to benchmarks/results/screenshots/.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

OUT = Path(__file__).resolve().parent / "results" / "screenshots"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="imgstore.db")
    parser.add_argument("--photos", default="demo-photos")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imgstore.cli", "--db", args.db, "serve", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(base + "/api/info")
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    options = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    OUT.mkdir(parents=True, exist_ok=True)

    def settle() -> None:
        driver.execute_script("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        for _ in range(300):
            if driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"):
                return
            time.sleep(0.1)

    def shot(name: str) -> None:
        settle()
        png = driver.get_screenshot_as_png()
        Image.open(io.BytesIO(png)).convert("RGB").save(OUT / f"{name}.jpg", quality=82, optimize=True)
        print(OUT / f"{name}.jpg")

    try:
        driver.get(base + "/")
        driver.find_element(By.ID, "image-input").send_keys(str(Path(args.photos, "originals", "chelsea.png").resolve()))
        for _ in range(600):
            if driver.find_elements(By.CSS_SELECTOR, "#results .card"):
                break
            time.sleep(0.1)
        shot("search")
        driver.get(base + "/duplicates")  # the groups are found in the background; the page turns into them
        for _ in range(6000):
            if driver.find_elements(By.CSS_SELECTOR, "form.group") and not driver.find_elements(By.ID, "dup-search"):
                break
            time.sleep(0.1)
        shot("duplicates")
        driver.get(base + "/collection")
        shot("collection")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
