"""environment.yml (conda users) and pyproject.toml (pip, make) must describe the same environment."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [r for r in pip_section if not r.startswith("-e")]
    assert sorted(map(_name, listed)) == sorted(map(_name, declared))
    # same version floors too
    assert {_name(r): r.replace(" ", "") for r in listed} == {_name(r): r.replace(" ", "") for r in declared}
    assert "-e ." in pip_section
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python", "") == project["requires-python"]


def test_notebooks_are_committed_normalised_and_without_outputs():
    """Cell ids (nbformat 4.5 warns and invents them otherwise), no outputs or execution counts (executed copies
    belong in results/), and valid against nbformat's schema."""
    import nbformat

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        ids = [cell.get("id") for cell in nb.cells]
        assert None not in ids and len(set(ids)) == len(ids), path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.id)


def test_the_notebook_filter_strips_what_jupyterlab_saves_before_git_sees_it(tmp_path):
    """`make setup` registers nbstripout as a git filter (the Makefile's notebook-filter) for notebooks/*.ipynb
    (.gitattributes): a notebook saved with outputs is staged without them, its cell ids and tags kept, and an
    executed copy in results/notebooks/ is staged as it is."""
    import shutil
    import subprocess
    import sys

    import nbformat

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    shutil.copy(ROOT / ".gitattributes", tmp_path / ".gitattributes")
    subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "notebook-filter", f"PY={sys.executable}"],
                   cwd=tmp_path, check=True)
    assert "nbstripout" in git("config", "filter.nbstripout.clean")
    committed = nbformat.read(ROOT / "notebooks" / "01_quickstart.ipynb", as_version=4)
    executed = nbformat.from_dict(committed)
    for i, cell in enumerate(c for c in executed.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {i}\n")]
    for folder in ("notebooks", "results/notebooks"):
        (tmp_path / folder).mkdir(parents=True)
        nbformat.write(executed, tmp_path / folder / "01_quickstart.ipynb")
    git("add", ".")
    staged = nbformat.reads(git("show", ":notebooks/01_quickstart.ipynb"), as_version=4)
    assert staged.cells == committed.cells  # outputs and counts gone; ids, tags and sources as committed
    assert all(c.outputs == [] for c in staged.cells if c.cell_type == "code")
    kept = nbformat.reads(git("show", ":results/notebooks/01_quickstart.ipynb"), as_version=4)
    assert kept.cells == executed.cells and any(c.get("outputs") for c in kept.cells)
    # the file on disk is untouched: JupyterLab keeps showing its outputs
    assert nbformat.read(tmp_path / "notebooks" / "01_quickstart.ipynb", as_version=4).cells == executed.cells
