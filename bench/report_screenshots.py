"""Screenshots of the HTML reports (bench/results/eval-report.png, patch-report.png, eval-sweep-report.png): the demo's
reports (bench/results/ordinary/demo-*-report.json, the figures in README) and an eval with an eps sweep
(ordinary/sweep-eval-report.json), re-rendered by the current `hardener.reports.report`, then
drawn by headless Chromium (Debian: `apt-get install chromium`), cropped to the page and reduced to 64 colours.

    python bench/report_screenshots.py [CHROMIUM]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

from hardener.reports import report

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,4000"]


def refresh(rep: dict) -> dict:
    """What harden derives from a report's results, as it derives it now (the demo's reports are older): the schema
    id, reduced budgets, the threat models that ran and did not, the summary, the quick note."""
    from hardener.cli.commands.patch import QUICK_NOTE

    rep["schema"] = report.SCHEMAS[rep["command"]]
    rep["reduced_budgets"] = report.reduced_budgets(rep)
    rep["threat_models"] = {t: v for t, v in report.THREAT_TEXT.items()
                            if any(t in m.get("threats", {}) for m in rep["models"].values())}
    rep["threats_not_run"] = report.threats_not_run(rep)
    report.summarise(rep)
    if (rep.get("report_budget") or {}).get("verdict") is False:
        rep["report_budget"]["note"] = QUICK_NOTE
    return rep


# name of the screenshot -> the report drawn: the demo's two (make demo), and an eval with an eps sweep (the demo runs
# none) of the default recipe's Fashion-MNIST patch (bench/ordinary_path.sh default; its command is in the report)
SOURCES = {"eval": "ordinary/demo-eval-report.json", "patch": "ordinary/demo-patch-report.json",
           "eval-sweep": "ordinary/sweep-eval-report.json"}


def shoot(kind: str, chromium: str, tmp: Path) -> Path:
    rep = refresh(json.loads((RESULTS / SOURCES[kind]).read_text()))
    page, raw = tmp / f"{kind}.html", tmp / f"{kind}.png"
    page.write_text(report.to_html(rep), encoding="utf-8")
    subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp / kind}", f"--screenshot={raw}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    im = Image.open(raw).convert("RGB")
    background = Image.new("RGB", im.size, im.getpixel((im.width - 1, im.height - 1)))
    bottom = ImageChops.difference(im, background).getbbox()[3]  # the page's end
    out = RESULTS / f"{kind}-report.png"
    im.crop((96, 0, 1184, min(im.height, bottom + 40))).quantize(colors=64).save(out, optimize=True)
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for kind in SOURCES:
            print(shoot(kind, sys.argv[1] if len(sys.argv) > 1 else "chromium", Path(d)))
