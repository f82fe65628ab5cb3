"""The paper's tables: one row per base solver and one per its D-ODE version, one column per NFE, best in bold."""
from __future__ import annotations

import pandas as pd

from .solvers import SOLVERS, get_solver

#: every row kind of a results table, in table order, with the words after the solver's name in its label
VARIANT_LABELS = {
    "base": "",                       # the base solver on the paper's spacing
    "best-base": " best spacing",     # the best base over diffusers' spacings (by the true metric)
    "dode": "",                       # the paper's greedy D-ODE on the paper's spacing ("D-" in front)
    "dode-auto": " auto",             # D-ODE, spacing chosen on validation seeds
    "dode-learned": " learned grid",  # D-ODE auto with a learned time grid
    "dode-joint": " joint",           # all lambdas refined jointly
    "dode-joint+timesteps": " joint+timesteps",
}
VARIANTS = tuple(VARIANT_LABELS)


def row_label(solver: str, variant: str) -> str:
    """"DDIM", "DDIM best spacing", "D-DDIM" (the paper's greedy fit), "D-DDIM auto", "D-DDIM learned grid", ..."""
    paper = get_solver(solver).paper
    if variant not in VARIANT_LABELS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return ("" if variant in ("base", "best-base") else "D-") + paper + VARIANT_LABELS[variant]


def paper_table(results: pd.DataFrame, metric: str = "fd") -> pd.DataFrame:
    """Numeric table: index = solver rows in the paper's order (base, D-ODE, its refinements), columns = NFE."""
    table = results.pivot_table(index=["solver", "variant"], columns="nfe", values=metric)
    order = [(s, v) for s in SOLVERS for v in VARIANTS if (s, v) in table.index]
    table = table.loc[order]
    table.index = [row_label(s, v) for s, v in order]
    table.columns = [f"NFE {n}" for n in table.columns]
    return table


def spacing_table(results: pd.DataFrame) -> pd.DataFrame:
    """The spacing behind every cell of ``paper_table`` (rows and columns alike); a guarded D-ODE whose lambdas
    were shrunk shows the factor ("leading x0.5")."""
    results = results.copy()
    if "shrink" in results:
        shrunk = results["shrink"].notna() & (results["shrink"] < 1)
        results.loc[shrunk, "spacing"] = results.loc[shrunk, "spacing"] + " x" + results.loc[shrunk, "shrink"].map("{:.3g}".format)
    table = results.pivot_table(index=["solver", "variant"], columns="nfe", values="spacing", aggfunc="first")
    order = [(s, v) for s in SOLVERS for v in VARIANTS if (s, v) in table.index]
    table = table.loc[order].fillna("–")
    table.index = [row_label(s, v) for s, v in order]
    table.columns = [f"NFE {n}" for n in table.columns]
    return table


def _formatted(table: pd.DataFrame, bold, digits: int) -> pd.DataFrame:
    """Every cell printed with ``digits`` decimals; every cell that prints as the column's best is bold, so ties
    (at the printed precision) are all bold."""
    out = table.copy().astype(object)
    for col in table.columns:
        values = table[col]
        best = f"{values.min():.{digits}f}" if values.notna().any() else None
        for row in table.index:
            value = values.at[row]
            if pd.isna(value):
                out.at[row, col] = "–"
            else:
                text = f"{value:.{digits}f}"
                out.at[row, col] = bold(text) if text == best else text
    return out


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    return _formatted(table, lambda s: f"**{s}**", digits).to_markdown()


def to_latex(table: pd.DataFrame, digits: int = 3) -> str:
    formatted = _formatted(table, lambda s: f"\\textbf{{{s}}}", digits)
    formatted.index = [label.replace("_", r"\_") for label in formatted.index]
    return formatted.to_latex(escape=False, column_format="l" + "r" * len(table.columns))
