"""How far a reproduction got: every number a run wrote, compared with the one it replaces.

``snapshot(folder, files)`` reads the numbers of result files (CSV and JSON) before they are overwritten, or from
another folder (``make verify`` compares a fresh run with the committed results/); ``compare(old, new)`` sorts
every cell into identical, within ``RTOL`` (relative), or different, with both values; ``report`` is that as
Markdown. Timing columns and keys (``*seconds*``, ``finished``, ...) change from run to run and are left out.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

#: relative tolerance of "within tolerance": the tables print three significant digits
RTOL = 1e-3
#: columns and JSON keys that measure time or place, not results
_VOLATILE = re.compile(r"seconds|wall|finished|elapsed|duration|timestamp|git_|platform|hostname|^time$",
                       re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)
_SUFFIXES = (".csv", ".json")


def _is_measured(value: str) -> bool:
    """A float written with a point or an exponent (a score, a time), not a name, a count or a list."""
    try:
        float(value)
    except ValueError:
        return False
    return any(c in value for c in ".eE") or value.lower() in ("nan", "inf", "-inf")


def _key_columns(table) -> list:
    """The columns that name a row (solver, variant, nfe, spacing, ...): no measured numbers, no lists."""
    return [column for column in table.columns if not _VOLATILE.search(str(column))
            and not any(v.startswith("[") or _is_measured(v) for v in table[column])]


def _cells_of_csv(path: Path) -> dict:
    """Cells named by their row's key columns ("solver=ddim, nfe=5, variant=base: fd_pixel"), so that a row added
    or removed elsewhere does not shift the others; each row also counts as a cell of its own (it may vanish)."""
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    keys = _key_columns(table)
    values = [c for c in table.columns if c not in keys and not _VOLATILE.search(str(c))]
    cells, seen = {}, {}
    for i, row in table.iterrows():
        label = ", ".join(f"{k}={row[k]}" for k in keys) or f"row {i + 1}"
        seen[label] = seen.get(label, 0) + 1
        label += f" #{seen[label]}" if seen[label] > 1 else ""
        cells[f"{label}: (row)"] = "present"
        cells.update({f"{label}: {column}": row[column] for column in values})
    return cells


def _cells_of_json(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {key: cell for k, v in value.items() if not _VOLATILE.search(str(k))
                for key, cell in _cells_of_json(v, f"{prefix}.{k}" if prefix else str(k)).items()}
    if isinstance(value, list) and not all(isinstance(v, (int, float)) for v in value):
        return {key: cell for i, v in enumerate(value) for key, cell in _cells_of_json(v, f"{prefix}[{i}]").items()}
    return {prefix: json.dumps(value)}


def cells(path: Path) -> dict:
    """{cell name: its text} of a CSV or JSON result file, timing cells left out."""
    path = Path(path)
    if path.suffix == ".csv":
        return _cells_of_csv(path)
    return _cells_of_json(json.loads(path.read_text()))


def snapshot(folder: Path, files) -> dict:
    """{relative path: cells} of those ``files`` under ``folder`` that exist and hold numbers (CSV, JSON)."""
    folder = Path(folder)
    return {f: cells(folder / f) for f in sorted(files) if f.endswith(_SUFFIXES) and (folder / f).is_file()}


def _numbers(text: str):
    """(the text with its numbers blanked, the numbers) of one cell."""
    return _NUMBER.sub("#", text), [float(n) for n in _NUMBER.findall(text)]


def _close(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12


@dataclass
class Verification:
    identical: int = 0
    within: int = 0
    #: (file, cell, old, new) of every cell that differs beyond the tolerance or vanished
    different: list = field(default_factory=list)
    #: (file, cell, None, new) of every cell that was not there before (a new row: a new solver, say)
    added: list = field(default_factory=list)
    #: files with no earlier version to compare with
    new_files: list = field(default_factory=list)
    rtol: float = RTOL

    @property
    def compared(self) -> int:
        return self.identical + self.within + len(self.different)

    @property
    def ok(self) -> bool:
        """Every cell there before is there again within the tolerance, and nothing new appeared."""
        return not (self.different or self.added)


def compare(old: dict, new: dict, rtol: float = RTOL) -> Verification:
    """Every cell of ``new`` (a ``snapshot``) against the same cell of ``old``."""
    result = Verification(rtol=rtol)
    for name in sorted(new):
        if name not in old:
            result.new_files.append(name)
            continue
        before, after = old[name], new[name]
        for cell in sorted(set(before) | set(after)):
            a, b = before.get(cell), after.get(cell)
            if a == b:
                result.identical += 1
                continue
            if a is not None and b is not None:
                (shape_a, xs), (shape_b, ys) = _numbers(a), _numbers(b)
                if shape_a == shape_b and len(xs) == len(ys) and xs and all(_close(x, y, rtol) for x, y in zip(xs, ys)):
                    result.within += 1
                    continue
            (result.added if a is None else result.different).append((name, cell, a, b))
    return result


def report(result: Verification, against: str, limit: int = 200) -> str:
    """Markdown: the counts, then every differing cell with its old and new value (the first ``limit``), then
    the cells that are new."""
    lines = [f"# Verification against {against}", "",
             f"{result.compared} result cells compared: **{result.identical} identical**, {result.within} within "
             f"a relative {result.rtol:g}, **{len(result.different)} different**; {len(result.added)} new cells "
             "(rows that were not there before)."]
    if result.new_files:
        lines += ["", "Nothing to compare with (new files): " + ", ".join(f"`{f}`" for f in result.new_files) + "."]
    for title, cells in (("Different", result.different), ("New", result.added)):
        if cells:
            lines += ["", f"## {title}", "", "| file | cell | before | now |", "|---|---|---|---|"]
            lines += [f"| `{f}` | {c} | {'–' if a is None else a} | {'–' if b is None else b} |"
                      for f, c, a, b in cells[:limit]]
            if len(cells) > limit:
                lines.append(f"\n... and {len(cells) - limit} more.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """``python -m dode.verification BEFORE AFTER``: compare the result files of two results folders (those in
    AFTER's manifest), print the report."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--label", default=None, help="what BEFORE is, for the report's title")
    args = parser.parse_args(argv)
    manifest = json.loads((args.after / "manifest.json").read_text())
    files = {o for run in manifest["runs"].values() for o in run["outputs"]}
    result = compare(snapshot(args.before, files), snapshot(args.after, files))
    print(report(result, args.label or str(args.before)), end="")
    return result


if __name__ == "__main__":
    main()
