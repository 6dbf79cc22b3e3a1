"""The HTML report opened in a real headless browser (Debian's chromium, which `.ci/run` installs):
the page loads, and its figures render — the screenshot has the plotted ink that the same page with
its images removed lacks."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from stamen.report import build_report
from test_sweep_report import fake_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs it)")


def screenshot(page, png):
    """Headless chromium renders ``page`` into ``png`` (flags: no sandbox as root, no network chatter)."""
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={png.parent / 'profile'}",
                    "--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    return mpimg.imread(str(png))[..., :3]


def ink(image) -> float:
    """Fraction of pixels that are not (near) white."""
    return float((image.min(axis=-1) < 0.9).mean())


def test_the_html_report_renders_its_figures_in_a_browser(tmp_path):
    runs = [fake_run(tmp_path, f"r{i}", lr=0.1 * (1 + i % 2), seed=i, acc=0.5 + 0.1 * i, up=1000 * (1 + i))
            for i in range(4)]
    report = build_report(runs, tmp_path / "report")
    html = report.html.read_text()
    assert html.count("data:image/png;base64,") >= 2
    bare = tmp_path / "report" / "bare.html"
    bare.write_text(re.sub(r'<img [^>]*>', "", html))
    with_figures = screenshot(report.html, tmp_path / "page.png")
    without = screenshot(bare, tmp_path / "bare.png")
    assert with_figures.shape == without.shape and with_figures.shape[1] == 1200
    # the page itself (title, table) renders in both; the figures add plotted ink
    assert ink(without) > 0.001
    assert ink(with_figures) > ink(without) + 0.01, (ink(with_figures), ink(without))
    assert not np.array_equal(with_figures, without)
