"""Draw the dose-response figure of points measured apart (``dose_tuning.py`` CSVs), one curve each.

The figure is `irm-lens compare-steering`'s (``dose_response_figure``): lift with its 95% CI
against the perplexity ratio, filled markers where every degeneration check passes. Points of
one intervention measured in several runs join one curve; a point measured twice is kept once.

    python scripts/frontier_figure.py docs/results/steering-joy/dose-tuning/dose_*.csv \\
        --alignment joy --scale caa=4 --label caa="CAA (layer 12)" \\
        --out docs/results/steering-joy/tuning_frontier.png

``--out`` names a self-contained ``.html`` page, or a ``.png`` of it drawn by headless Chromium.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from irm_lens._io import atomic_write_text
from irm_lens.cli import named_values
from irm_lens.compare import SteeringComparison
from irm_lens.evaluate import DegenerationThresholds
from irm_lens.report.figures import dose_response_figure


def read_points(paths: list[str], scales: dict[str, float], labels: dict[str, str]) -> pd.DataFrame:
    """The CSVs' rows, each intervention's scales multiplied by ``scales`` (a vector file's own
    scale) and its name replaced by ``labels``; duplicates dropped."""
    table = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    table["scale"] = table.scale * table.intervention.map(scales).fillna(1.0)
    table = table.drop_duplicates(["intervention", "scale", "decoding"])
    table["intervention"] = table.intervention.map(lambda name: labels.get(name, name))
    return table.sort_values(["decoding", "intervention", "scale"]).reset_index(drop=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csvs", nargs="+")
    p.add_argument("--alignment", required=True)
    p.add_argument("--scale", action="append", default=[], help="NAME=S: that file's own scale")
    p.add_argument("--label", action="append", default=[], help="NAME=TEXT: the legend's name")
    p.add_argument("--max-perplexity-ratio", type=float, default=None,
                   help="leave out points past this ratio (they stretch the log axis)")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="a .html file, or a .png (headless Chromium)")
    args = p.parse_args()
    try:
        scales = {k: float(v) for k, v in named_values(args.scale, "--scale", "S").items()}
    except ValueError as exc:
        raise SystemExit(f"--scale takes NAME=S with S a number: {exc}") from exc
    table = read_points(args.csvs, scales, named_values(args.label, "--label", "TEXT"))
    if args.max_perplexity_ratio is not None:
        far = table.perplexity_ratio > args.max_perplexity_ratio
        print(f"left out {int(far.sum())} points past ratio {args.max_perplexity_ratio:g}")
        table = table[~far]
    comparison = SteeringComparison(args.alignment, table, pd.DataFrame(), (),
                                    DegenerationThresholds())
    figure = dose_response_figure(comparison).update_layout(width=1150)
    if args.title:
        figure.update_layout(title=args.title)
    out = Path(args.out)
    if out.suffix == ".html":
        atomic_write_text(out, figure.to_html(include_plotlyjs=True, full_html=True))
    elif out.suffix == ".png":
        _screenshot(figure.to_html(include_plotlyjs=True, full_html=True), out)
    else:
        raise SystemExit(f"--out {out}: name a .html or a .png file")
    print(f"{out}: {len(table)} points")


def _screenshot(html: str, png: Path) -> None:
    """The page as headless Chromium draws it (plotly's own PNG export needs kaleido)."""
    browser = shutil.which("chromium")
    if browser is None:
        raise SystemExit("a .png needs headless Chromium (apt-get install chromium); "
                         "write a .html instead")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        page.write_text(html, encoding="utf-8")
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--window-size=1200,470", "--hide-scrollbars",
                        "--virtual-time-budget=10000",
                        f"--screenshot={png.resolve()}", page.as_uri()],
                       check=True, capture_output=True)


if __name__ == "__main__":
    main()
