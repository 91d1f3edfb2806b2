"""Regenerate docs/report.png, the screenshot at the top of README, from a real scan.

It scans the bundled samples with the default model set and every member computed (``--members
all``: the probe's verdict with the ResNet-50's score beside it), writes the report, opens it in
headless Chromium at 1400 px and saves the top of the page. Needs Debian's ``chromium`` and
``chromium-driver`` and ``selenium`` (``make install`` brings selenium). Run from the repository root::

    .venv/bin/python docs/make_screenshot.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from selenium import webdriver

    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        sys.exit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    with tempfile.TemporaryDirectory() as tmp:
        out, page = Path(tmp) / "samples.csv", Path(tmp) / "samples.html"
        subprocess.run([sys.executable, "-m", "detector.cli", "scan", str(ROOT / "data" / "samples"), "--members", "all",
                        "-o", str(out), "--report", str(page), "-q"], check=True, cwd=ROOT)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1400,1500", "--force-device-scale-factor=1", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
        try:
            driver.get(page.resolve().as_uri())
            driver.save_screenshot(str(ROOT / "docs" / "report.png"))
        finally:
            driver.quit()
    print(f"wrote {ROOT / 'docs' / 'report.png'}")


if __name__ == "__main__":
    main()
