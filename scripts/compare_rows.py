"""Two notebook 02 runs' rows side by side: how far each variant's metric moved, which kept/dropped verdicts flipped,
and what the learned checks count in each, over the cells both runs hold. For a check under other kernels of a part
of ``make learned-rows``:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m dode.tools.learned_rows --solvers ddim unipc \\
        --out build/avx2
    python scripts/compare_rows.py results/learned_rows/unet-digits.csv build/avx2/learned_rows/unet-digits.csv
"""
from __future__ import annotations

import argparse

import pandas as pd

from dode.experiments.summary import LEARNED_CHECKS, learned_checks

KEY = ["solver", "nfe", "variant"]


def compare(first: pd.DataFrame, second: pd.DataFrame, metric: str, rtol: float) -> pd.DataFrame:
    """Per variant: rows in both, rows within ``rtol`` of each other, identical rows, the largest relative move and
    the kept/dropped verdicts that differ."""
    both = first.merge(second, on=KEY, suffixes=("_a", "_b"))
    if both.empty:
        raise SystemExit("the two runs hold no row in common")
    both["move"] = (both[f"{metric}_b"] - both[f"{metric}_a"]).abs() / both[f"{metric}_a"].abs()
    both["flipped"] = both.kept_a.fillna("").astype(str) != both.kept_b.fillna("").astype(str)
    return both.groupby("variant", sort=False).agg(
        rows=("move", "size"), within=("move", lambda m: int((m <= rtol).sum())),
        identical=("move", lambda m: int((m == 0).sum())), largest=("move", "max"),
        flipped=("flipped", "sum")).reset_index()


def counts(rows: pd.DataFrame, metric: str, cells: set) -> dict:
    """How many of ``cells`` (solver, nfe) pass each learned check in ``rows``."""
    checks = learned_checks(rows, metric)
    checks = checks[[(s, n) in cells for s, n in zip(checks.solver, checks.nfe)]]
    return {"cells": len(checks), **{c: int(checks[c].sum()) for c in LEARNED_CHECKS}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="a results.csv (or learned_rows/<model>.csv)")
    parser.add_argument("second")
    parser.add_argument("--metric", default="fd_digits")
    parser.add_argument("--rtol", type=float, default=0.02, help="relative move counted as within (default 2 %%)")
    args = parser.parse_args(argv)
    first, second = pd.read_csv(args.first), pd.read_csv(args.second)
    print(compare(first, second, args.metric, args.rtol).to_markdown(index=False, floatfmt=".3g"))
    cells = set(map(tuple, first[["solver", "nfe"]].values.tolist())) & set(
        map(tuple, second[["solver", "nfe"]].values.tolist()))
    print()
    print(pd.DataFrame([{"run": args.first, **counts(first, args.metric, cells)},
                        {"run": args.second, **counts(second, args.metric, cells)}]).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
