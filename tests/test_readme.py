"""The README against the committed results: its generated block is what the results give, and every measured
number in its results sections is in the results."""
from __future__ import annotations

import json
import re
import shutil

from dode import reproduce

ROOT = reproduce.ROOT
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "results"
#: the README sections that report measurements
RESULT_SECTIONS = ("Known results", "unet-digits and FD-digits", "Beyond the paper: joint refinement and learned time grids",
                   "Benchmarks")
_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])|\d+(?:\.\d+)? ?%")


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def results_text() -> str:
    """Every text file under results/: tables, CSVs, JSON, the generated README, executed notebooks."""
    return "\n".join(p.read_text(errors="replace") for p in RESULTS.rglob("*")
                     if p.is_file() and p.suffix in (".md", ".csv", ".json", ".tex", ".ipynb"))


def test_the_known_results_block_is_what_the_result_files_give(tmp_path):
    """write_summary regenerates the block from a copy of the committed result files: README and results agree."""
    manifest = json.loads((RESULTS / "manifest.json").read_text())
    for path in RESULTS.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json", ".md") and "notebooks" not in path.parts:
            target = tmp_path / path.relative_to(RESULTS)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    block = reproduce.write_summary(tmp_path, manifest)
    start, end = reproduce.README_BLOCK
    assert README.split(start, 1)[1].split(end, 1)[0].strip() == block.strip()
    assert (tmp_path / "README.md").read_text() == (RESULTS / "README.md").read_text()


def test_every_measured_number_in_the_readme_results_sections_is_in_the_results():
    """The hand-written prose; the generated block is checked whole by the test above."""
    corpus = results_text()
    start, end = reproduce.README_BLOCK
    missing = {}
    for title in RESULT_SECTIONS:
        text = section(title)
        if start in text:
            text = text.split(start, 1)[0] + text.split(end, 1)[1]
        for number in _DECIMAL.findall(text):
            if number.replace(" ", "") not in corpus and number not in corpus:
                missing.setdefault(title, []).append(number)
    assert not missing, f"README numbers not in results/ (copied by hand and stale?): {missing}"


def test_the_reproduce_time_on_the_first_screen_is_the_manifests():
    wall = json.loads((RESULTS / "manifest.json").read_text())["environment"]["wall_seconds"]
    stated = re.search(r"`make reproduce` takes about (\d+) min", README)
    assert stated and int(stated.group(1)) == round(wall / 60), (stated, wall)
    assert README.index("make reproduce") < README.index("## Quickstart") < 60 * 120  # on the first screen
    assert len(README[: README.index("## The notebooks")].splitlines()) <= 75
