"""The picture of the leaderboard site in docs/figures: the built index (leaderboard/site/index.html) in
Debian's chromium at 1280 px, the width the browser test checks, top of the page; stored in 256 colours
(an octree palette keeps the plots' colours), so that it stays small in the repository.

    python tools/site_screenshot.py [--site leaderboard/site] [--out docs/figures/leaderboard-site.png]
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

from invarbench.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "leaderboard" / "site")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "leaderboard-site.png")
    parser.add_argument("--height", type=int, default=1100, help="pixels of the page shown (default 1100)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": args.height})
        page.goto((args.site / "index.html").resolve().as_uri())
        picture = page.screenshot(full_page=False)
        browser.close()
    from PIL import Image

    image = Image.open(io.BytesIO(picture)).convert("RGB")
    image = image.quantize(256, method=Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    print(f"wrote {atomic_write_bytes(args.out, buffer.getvalue())}")


if __name__ == "__main__":
    main()
