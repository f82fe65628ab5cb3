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
