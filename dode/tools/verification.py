"""How far a reproduction got: every number a run wrote, compared with the one it replaces.

``snapshot(folder, files)`` reads the numbers of result files (CSV and JSON) before they are overwritten, or from
another folder (``make verify`` compares a fresh run with the committed results/); ``compare(old, new)`` sorts
every cell into four classes, with both values where they differ: identical; within ``ROUNDING`` (relative: the
last bits that another CPU, BLAS kernel or thread count moves); within ``RTOL`` (below the three digits the
tables print, but more than rounding); different. ``report`` is that as Markdown, naming the machines when the
numbers differ. Timing columns and keys (``*seconds*``, ``finished``, ...) change from run to run and are left out.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

#: relative differences up to this are rounding: what another CPU, BLAS kernel or thread count changes
ROUNDING = 1e-6
#: relative differences up to this stay below what the tables print (three significant digits)
RTOL = 1e-3
#: columns and JSON keys that measure time or place, not results
_VOLATILE = re.compile(r"seconds|wall|finished|elapsed|duration|timestamp|git_|platform|hostname|machine|^time$",
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
    """(the text with its numbers blanked, the numbers, as written) of one cell."""
    written = _NUMBER.findall(text)
    return _NUMBER.sub("#", text), [float(n) for n in written], written


#: numbers written with at least this many decimals (the lambdas' 6 in results.csv) and one unit of the last decimal
#: apart are rounding: the same value on either side of a rounding boundary (-0.000983 against -0.000982)
_ROUNDED_DECIMALS = 6


def _last_decimal_apart(x: float, y: float, a: str, b: str) -> bool:
    """Whether two numbers written in fixed notation are at most one unit of the last decimal apart, with at least
    ``_ROUNDED_DECIMALS`` decimals (a trailing zero the writer dropped counts: 0.93886 against 0.938861)."""
    if any(c in text for text in (a, b) for c in "eE"):
        return False
    decimals = max(len(text.split(".", 1)[1]) if "." in text else 0 for text in (a, b))
    return decimals >= _ROUNDED_DECIMALS and abs(x - y) <= 1.5 * 10.0 ** -decimals


@dataclass
class Verification:
    identical: int = 0
    #: (file, cell, old, new) of every cell within a relative ``ROUNDING``
    rounding: list = field(default_factory=list)
    #: (file, cell, old, new) of every cell within a relative ``rtol`` but not ``ROUNDING``
    within_list: list = field(default_factory=list)
    #: (file, cell, old, new) of every cell that differs beyond ``rtol`` or vanished
    different: list = field(default_factory=list)
    #: (file, cell, None, new) of every cell that was not there before (a new row: a new solver, say)
    added: list = field(default_factory=list)
    #: files with no earlier version to compare with
    new_files: list = field(default_factory=list)
    #: {(file, cell): its largest relative difference} of every changed cell (inf: vanished or reshaped)
    moves: dict = field(default_factory=dict)
    #: per file: {class: cells}
    per_file: dict = field(default_factory=dict)
    rtol: float = RTOL

    @property
    def within(self) -> int:
        """Cells that differ, but by no more than a relative ``rtol`` (rounding included)."""
        return len(self.rounding) + len(self.within_list)

    @property
    def compared(self) -> int:
        return self.identical + self.within + len(self.different)

    @property
    def ok(self) -> bool:
        """Every cell there before is there again within ``rtol``, and nothing new appeared."""
        return not (self.different or self.added)

    def beyond(self, rtol: float) -> list:
        """The cells that differ by more than a relative ``rtol`` (at most the ``rtol`` compared with), or are new or
        gone."""
        return [*(c for c in [*self.rounding, *self.within_list] if self.moves[c[:2]] > rtol), *self.different,
                *self.added]


def _relative(a: str, b: str) -> float:
    """The largest relative difference between the numbers of two cells of the same shape (0 for numbers rounded to
    ``_ROUNDED_DECIMALS`` or more decimals that are one unit of the last decimal apart); inf otherwise."""
    (shape_a, xs, texts_a), (shape_b, ys, texts_b) = _numbers(a), _numbers(b)
    if shape_a != shape_b or len(xs) != len(ys) or not xs:
        return math.inf
    worst = 0.0
    for x, y, text_x, text_y in zip(xs, ys, texts_a, texts_b):
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return math.inf
        elif x != y and not _last_decimal_apart(x, y, text_x, text_y):
            worst = max(worst, (abs(x - y) - 1e-12) / max(abs(x), abs(y)))
    return worst


def compare(old: dict, new: dict, rtol: float = RTOL) -> Verification:
    """Every cell of ``new`` (a ``snapshot``) against the same cell of ``old``."""
    result = Verification(rtol=rtol)
    for name in sorted(new):
        if name not in old:
            result.new_files.append(name)
            continue
        before, after = old[name], new[name]
        counts = result.per_file.setdefault(name, dict.fromkeys(("identical", "rounding", "within", "different",
                                                                  "new"), 0))
        for cell in sorted(set(before) | set(after)):
            a, b = before.get(cell), after.get(cell)
            if a == b:
                result.identical += 1
                counts["identical"] += 1
            elif a is None:
                result.added.append((name, cell, a, b))
                counts["new"] += 1
            else:
                off = math.inf if b is None else _relative(a, b)
                kind = "rounding" if off <= ROUNDING else "within" if off <= rtol else "different"
                {"rounding": result.rounding, "within": result.within_list, "different": result.different}[kind] \
                    .append((name, cell, a, b))
                counts[kind] += 1
                result.moves[name, cell] = off
    return result


def _file_table(result: Verification) -> list[str]:
    """One row per file with a difference: its cells by class, and the median and largest relative move of its
    changed numbers."""
    rows = ["| file | identical | rounding | within | different | new | median move | largest move |",
            "|---|---|---|---|---|---|---|---|"]
    by_file = {}
    for (name, _), move in result.moves.items():
        if math.isfinite(move):
            by_file.setdefault(name, []).append(move)
    for name, c in sorted(result.per_file.items()):
        if c["rounding"] + c["within"] + c["different"] + c["new"] == 0:
            continue
        moves = sorted(by_file.get(name, []))
        median, largest = (f"{moves[len(moves) // 2]:.1e}", f"{moves[-1]:.1e}") if moves else ("–", "–")
        rows.append(f"| `{name}` | {c['identical']} | {c['rounding']} | {c['within']} | {c['different']} | "
                    f"{c['new']} | {median} | {largest} |")
    return rows if len(rows) > 2 else []


def report(result: Verification, against: str, limit: int = 200, machines: tuple[str, str] | None = None,
           heading: str = "Verification") -> str:
    """Markdown: the counts, the machines (``machines``: where ``against`` was made, and this one) when a number
    differs, the counts and moves by file, then every cell beyond rounding with its old and new value (the first
    ``limit`` of each class), then the cells that are new."""
    lines = [f"# {heading} against {against}", "",
             f"{result.compared} result cells compared: **{result.identical} identical**, {len(result.rounding)} "
             f"within a relative {ROUNDING:g} (rounding), {len(result.within_list)} within a relative "
             f"{result.rtol:g}, **{len(result.different)} different**; {len(result.added)} new cells "
             "(rows that were not there before)."]
    if machines and (result.within or result.different):
        lines += ["", f"The numbers compared with were made on: {machines[0]}.", "",
                  f"These were made on: {machines[1]}."]
    if result.new_files:
        lines += ["", "Nothing to compare with (new files): " + ", ".join(f"`{f}`" for f in result.new_files) + "."]
    table = _file_table(result)
    if table:
        lines += ["", "## By file", "", "A move is the largest relative difference among a changed cell's numbers (a "
                  "vanished cell or one whose shape changed has none).", "", *table]
    for title, cells in ((f"Within a relative {result.rtol:g}, beyond rounding", result.within_list),
                         ("Different", result.different), ("New", result.added)):
        if cells:
            lines += ["", f"## {title}", "", "| file | cell | before | now |", "|---|---|---|---|"]
            lines += [f"| `{f}` | {c} | {'–' if a is None else a} | {'–' if b is None else b} |"
                      for f, c, a, b in cells[:limit]]
            if len(cells) > limit:
                lines.append(f"\n... and {len(cells) - limit} more.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """``python -m dode.tools.verification BEFORE AFTER``: compare the result files of two results folders (those in
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
