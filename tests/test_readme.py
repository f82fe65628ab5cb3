"""The results pages against the committed results: the generated block of docs/results.md is what the result files
give (regenerated, and its headline counts recomputed here from summary.csv), and every measured number in the
hand-written results sections of the docs is in the results."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from dode.tools import report, reproduce

ROOT = reproduce.ROOT
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "results"
PAGE = report.RESULTS_PAGE
#: the hand-written prose that reports measurements: (page, section title; None: the whole page)
RESULT_SECTIONS = [
    ("docs/results.md", None),
    ("docs/pretrained.md", "unet-digits and FD-digits"),
    ("docs/grids-and-guard.md", "Beyond the paper: joint refinement and learned time grids"),
    ("docs/benchmarks.md", None),
]
_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])|\d+(?:\.\d+)? ?%")


def section(page: str, title: str | None) -> str:
    text = (ROOT / page).read_text()
    if title is None:
        return text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{page} has no section {title!r}"
    return match.group(1)


def block(text: str) -> str:
    start, end = report.RESULTS_BLOCK
    assert text.count(start) == 1 and text.count(end) == 1, "the page needs exactly one pair of block markers"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def results_text() -> str:
    """Every text file under results/: tables, CSVs, JSON, the generated README, executed notebooks."""
    return "\n".join(p.read_text(errors="replace") for p in RESULTS.rglob("*")
                     if p.is_file() and p.suffix in (".md", ".csv", ".json", ".tex", ".ipynb"))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """write_summary run on a copy of the committed result files (the executed notebooks left out)."""
    copy = tmp_path_factory.mktemp("results")
    for path in RESULTS.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json", ".md") and "notebooks" not in path.parts:
            target = copy / path.relative_to(RESULTS)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    manifest = json.loads((RESULTS / "manifest.json").read_text())
    return copy, report.write_summary(copy, manifest)


def test_the_known_results_block_is_what_the_result_files_give(regenerated):
    _, claims = regenerated
    assert block(PAGE.read_text()) == claims.strip()
    assert report.RESULTS_BLOCK[0] not in README  # the README links to the page instead
    assert "docs/results.md" in README


def test_results_readme_is_what_the_result_files_give(regenerated):
    copy, _ = regenerated
    assert (copy / "README.md").read_text() == (RESULTS / "README.md").read_text()


def test_the_blocks_headline_counts_are_what_summary_csv_gives():
    """Recomputed here from each model's summary.csv and evaluation.json, not through report.headline."""
    claims = block(PAGE.read_text())
    models = re.findall(r"^- \*\*([\w-]+)\*\* \(`(\w+)`", claims, re.M)
    assert [m for m, _ in models] == sorted(n.removeprefix("02_distill_solvers-") for n in json.loads(
        (RESULTS / "manifest.json").read_text())["runs"] if n.startswith("02_distill_solvers-"))
    for model, metric in models:
        text = claims.split(f"- **{model}**", 1)[1].split("\n- **", 1)[0]
        summary = pd.read_csv(RESULTS / model / "summary.csv")
        evaluation = json.loads((RESULTS / model / "evaluation.json").read_text())
        assert evaluation["metric"] == metric
        cells = summary.dropna(subset=["best-base", "dode-auto"])
        ratio = (cells["dode-auto"] / cells["best-base"]).to_numpy()
        wins, losses = int(np.sum(ratio < 0.99)), int(np.sum(ratio > 1.01))
        floor = evaluation["floor"].get(metric.removeprefix("fd_"), 0.0)
        assert (f"better in {wins} of {len(cells)} solver x NFE cells, within 1% in {len(cells) - wins - losses}, "
                f"worse in {losses}; median ratio {np.median(ratio):.3f} (floor {floor:.3f})") in text, model
        paper = cells.dropna(subset=["dode", "base"])
        assert (f"median ratio of {np.median(paper['dode'] / paper['base']):.3f}; against the best base, "
                f"{np.median(paper['dode'] / paper['best-base']):.3f}") in text, model
        assert f"{evaluation['num_samples']} held-out samples per cell" in text
    environment = json.loads((RESULTS / "manifest.json").read_text())["environment"]
    assert f"`make reproduce` at `{environment['git_commit']}`, {environment['wall_seconds']} s" in claims


def test_write_summary_fills_the_page_block_only_for_the_repositorys_results(regenerated, tmp_path, monkeypatch):
    copy, claims = regenerated
    manifest = json.loads((RESULTS / "manifest.json").read_text())
    start, end = report.RESULTS_BLOCK
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"# Results\n\nbefore\n{start}\nold claims\n{end}\nafter\n")
    monkeypatch.setattr(report, "RESULTS_PAGE", page)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    report.write_summary(copy, manifest)  # another results folder: the page stays as it is
    assert "old claims" in page.read_text()
    shutil.copytree(copy, tmp_path / "results")
    assert report.write_summary(tmp_path / "results", manifest) == claims
    assert page.read_text() == f"# Results\n\nbefore\n{start}\n{claims.strip()}\n{end}\nafter\n"


def test_every_measured_number_in_the_docs_results_sections_is_in_the_results():
    """The hand-written prose; the generated block is checked whole by the tests above."""
    corpus = results_text()
    start, end = report.RESULTS_BLOCK
    missing = {}
    for page, title in RESULT_SECTIONS:
        text = section(page, title)
        if start in text:
            text = text.split(start, 1)[0] + text.split(end, 1)[1]
        for number in _DECIMAL.findall(text):
            if number.replace(" ", "") not in corpus and number not in corpus:
                missing.setdefault(f"{page} {title or ''}".strip(), []).append(number)
    assert not missing, f"numbers in the docs not in results/ (copied by hand and stale?): {missing}"


def test_the_reproduce_time_on_the_first_screen_is_the_manifests():
    wall = json.loads((RESULTS / "manifest.json").read_text())["environment"]["wall_seconds"]
    for page in ("README.md", "docs/reproducing.md"):
        stated = re.search(r"`make reproduce` takes about (\d+) min", (ROOT / page).read_text())
        assert stated and int(stated.group(1)) == round(wall / 60), (page, stated, wall)
    assert README.index("```bash\nmake setup") < README.index("## Quickstart") < 60 * 120  # on the first screen


def test_the_fit_cost_on_the_first_screen_is_the_benchmarks():
    """The README's cost sentence (gmm-digits, DDIM at NFE 5) against results/benchmarks/guard_cost.csv."""
    cost = pd.read_csv(RESULTS / "benchmarks" / "guard_cost.csv")
    row = cost[(cost.model == "gmm-digits") & (cost.solver == "ddim") & (cost.nfe == 5)].iloc[0]
    pattern = (r"the paper's fit is ([\d,]+) model evaluations.*?the default `distill` ([\d,]+) on its first call in a "
               r"process \(([\d.]+)x\) and ([\d,]+) after it \(([\d.]+)x\).*?`spacing=\"auto\"` ([\d,]+) \(([\d.]+)x")
    stated = re.search(pattern.replace(" ", r"\s+"), README, re.S)
    assert stated, "the README's cost sentence moved: update this test"
    numbers = [float(g.replace(",", "")) for g in stated.groups()]
    assert numbers == [row.plain, row["first"], round(row.first_x, 2), row.shared, round(row.shared_x, 2),
                       row.auto, round(row.auto_x, 2)]
    assert stated.start() < README.index("## Quickstart")  # on the first screen
