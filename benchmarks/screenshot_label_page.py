"""The README's picture of the labelling page (``soundsight label``), taken in Chromium.

Indexes ESC-50 fold 2 (aisfx, the default), starts ``soundsight label`` on it, searches
with a dog clip (an upload), marks the first four hits "is dog" / "is not dog" by
clicking, as ESC-50's metadata says, trains the heads, and saves the page as
``benchmarks/results/label_page.png``. Needs the dev extra (Playwright) and
``/usr/bin/chromium`` (``scripts/install-system-deps.sh``); about a minute on 2 cores::

    python benchmarks/screenshot_label_page.py [--work /tmp/label_page]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench_serve import free_port

ROOT = Path(__file__).resolve().parents[1]
ESC = ROOT.parent / "shared" / "datasets" / "esc50-fold2"
OUT = ROOT / "benchmarks" / "results" / "label_page.png"
CHROMIUM = "/usr/bin/chromium"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/label_page")
    args = parser.parse_args()
    import pandas as pd
    from playwright.sync_api import sync_playwright

    from soundsight.search import Index, build_index

    meta = pd.read_csv(ESC / "meta" / "esc50.csv")
    category = dict(zip(meta["filename"], meta["category"], strict=True))
    built = Path(args.work) / "esc-index"
    build_index([ESC / "audio"], built, progress=True)  # incremental: reruns are quick
    index = Path(args.work) / "page-index"  # a fresh copy: no labels from an earlier run
    shutil.rmtree(index, ignore_errors=True)
    shutil.copytree(built, index)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "soundsight.cli", "label", str(index), "--port", str(port)]
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        query = sorted((ESC / "audio").glob("*-A-0.flac"))[0]  # a dog (ESC target 0)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("text=embedded with").wait_for(timeout=20_000)
            page.fill("#label", "dog")
            page.set_input_files("#query-file", str(query))
            page.locator("#hits li").first.wait_for(timeout=60_000)
            hits, reader = page.locator("#hits li"), Index(index)
            for k in range(4):  # answered as ESC-50's metadata says, as a user would
                hit = hits.nth(k)
                name = Path(reader.windows([int(hit.get_attribute("data-row"))]).file[0])
                verdict = "button.yes" if category[name.name] == "dog" else "button.no"
                hit.locator(verdict).click()
                page.locator("#status:has-text('(saved)')").wait_for(timeout=10_000)
            reader.close()
            page.click("#train")
            page.locator("#heads-card").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # the thumbnails in view
            page.screenshot(path=str(OUT), full_page=False)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
