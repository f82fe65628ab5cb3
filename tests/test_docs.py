"""The documentation holds together: a short README, links and anchors that resolve (offline: http links are not
fetched), module paths that exist, a CITATION.cff that validates, and a licence that matches pyproject's."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
README_LINES = 250

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[([^\]\n]*)\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code: what links and headings are read from."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (links as their text, no formatting) in lower case, every
    character that is not a letter, digit, space, hyphen or underscore dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on ``page``; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [target for _, target in _LINK.findall(prose(page.read_text()))]


def test_slugs_follow_githubs_rules(tmp_path):
    assert slug("How `make reproduce` runs") == "how-make-reproduce-runs"
    assert slug("Beyond the paper: joint refinement and learned time grids") == \
        "beyond-the-paper-joint-refinement-and-learned-time-grids"
    assert slug("unet-digits and FD-digits") == "unet-digits-and-fd-digits"
    assert slug("Where [results](results.md) land, 2-D_plots!") == "where-results-land-2-d_plots"
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n## Notes\n\n```bash\n# not a heading\n```\n\n## Notes\n")
    assert anchors(page) == {"title", "notes", "notes-1"}


def test_the_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = {target.split("#")[0] for target in links(ROOT / "README.md")}
    for page in ("docs/api.md", "docs/grids-and-guard.md", "docs/pretrained.md", "docs/fid.md", "docs/benchmarks.md",
                 "docs/reproducing.md", "docs/results.md", "docs/design.md", "CITATION.cff", "LICENSE"):
        assert page in linked, f"README.md does not link to {page}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not fetched, the tests run offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def _resolves(dotted: str) -> bool:
    """Whether ``dode.a.b.c`` is a module, or an attribute reached from the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_every_dode_name_and_path_the_docs_mention_exists():
    """Module paths and names (``dode.core.distill``, ``dode.Teacher``) and repository files (``dode/core/fit.py``,
    ``tests/test_layers.py``) named anywhere in README.md and docs/, code blocks included: none left behind by a
    move."""
    missing = {}
    for page in PAGES:
        text = page.read_text()
        names = set(re.findall(r"(?<![\w/.-])dode(?:\.[A-Za-z_]\w*)+", text))
        paths = {p.rstrip("/.,") for p in re.findall(r"(?<![\w/.-])(?:dode|tests|scripts|notebooks|docs)/[\w./-]*", text)}
        gone = [n for n in sorted(names) if not _resolves(n)]
        gone += [p for p in sorted(paths) if not (ROOT / p).exists()]
        if gone:
            missing[page.relative_to(ROOT).as_posix()] = gone
    assert not missing, f"named in the docs but not in the package or the repository: {missing}"


def _validate(path: Path) -> subprocess.CompletedProcess:
    """``cffconvert --validate -i path``, cffconvert's own command line, in a fresh process."""
    return subprocess.run([sys.executable, "-c", "import sys; from cffconvert.cli.cli import cli; sys.exit(cli())",
                           "--validate", "-i", str(path)], capture_output=True, text=True, timeout=120)


def test_citation_cff_validates_and_a_broken_copy_does_not(tmp_path):
    pytest.importorskip("cffconvert", reason="make setup installs it: pip install --no-deps cffconvert==2.0.0")
    done = _validate(ROOT / "CITATION.cff")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid according to schema version 1.2.0" in done.stdout
    broken = tmp_path / "CITATION.cff"  # the validator can fail: without its required title
    broken.write_text("".join(line for line in (ROOT / "CITATION.cff").read_text().splitlines(keepends=True)
                              if not line.startswith("title:")))
    refused = _validate(broken)
    assert refused.returncode != 0 and "'title' is a required property" in refused.stdout + refused.stderr


def test_the_citation_names_this_version_and_the_paper_and_the_readme_gives_both():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] == PROJECT["name"]
    assert str(cff["version"]) == PROJECT["version"] and cff["license"] == PROJECT["license"]
    paper = next(r for r in cff.get("references", []) + [cff.get("preferred-citation", {})]
                 if r.get("type") == "conference-paper")
    assert paper["title"] == "Distilling ODE Solvers of Diffusion Models into Smaller Steps" and paper["year"] == 2024
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == \
        [("Kim", "Sanghwan"), ("Tang", "Hao"), ("Yu", "Fisher")]
    readme = (ROOT / "README.md").read_text()
    bibtex = re.findall(r"```bibtex\n(.*?)```", readme, re.S)
    assert bibtex, "README.md has no BibTeX block"
    entries = re.findall(r"@(\w+)\{[^,]+,(.*?)\n\}", bibtex[0], re.S)
    kinds = {kind: body for kind, body in entries}
    assert set(kinds) == {"inproceedings", "software"}
    assert "Kim, Sanghwan and Tang, Hao and Yu, Fisher" in kinds["inproceedings"]
    assert re.sub(r"[{}]", "", paper["title"]) in re.sub(r"[{}]", "", kinds["inproceedings"])
    assert f"version = {{{PROJECT['version']}}}" in " ".join(kinds["software"].split())


def test_the_licence_file_is_the_licence_pyproject_declares():
    assert PROJECT["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.splitlines()[0] == "MIT License"
    holder = yaml.safe_load((ROOT / "CITATION.cff").read_text())["authors"][0]["name"]
    assert re.search(rf"^Copyright \(c\) \d{{4}} {re.escape(holder)}$", text, re.M)
    flat = " ".join(text.split())
    for clause in ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
                   "The above copyright notice and this permission notice shall be included in all copies or "
                   "substantial portions of the Software.",
                   'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND'):
        assert clause in flat
