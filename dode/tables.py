"""The paper's tables: one row per base solver and one per its D-ODE version, one column per NFE, best in bold."""
from __future__ import annotations

import pandas as pd

from .solvers import SOLVERS, get_solver

VARIANTS = ("base", "dode", "dode-joint", "dode-joint+timesteps")


def row_label(solver: str, variant: str) -> str:
    """"DDIM", "D-DDIM" (the paper's greedy fit), "D-DDIM joint", "D-DDIM joint+timesteps"."""
    paper = get_solver(solver).paper
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return paper if variant == "base" else f"D-{paper}" + variant[4:].replace("-", " ")


def paper_table(results: pd.DataFrame, metric: str = "fd") -> pd.DataFrame:
    """Numeric table: index = solver rows in the paper's order (base, D-ODE, its refinements), columns = NFE."""
    table = results.pivot_table(index=["solver", "variant"], columns="nfe", values=metric)
    order = [(s, v) for s in SOLVERS for v in VARIANTS if (s, v) in table.index]
    table = table.loc[order]
    table.index = [row_label(s, v) for s, v in order]
    table.columns = [f"NFE {n}" for n in table.columns]
    return table


def _formatted(table: pd.DataFrame, bold, digits: int) -> pd.DataFrame:
    best = table.min(axis=0)
    out = table.copy().astype(object)
    for col in table.columns:
        for row in table.index:
            value = table.at[row, col]
            if pd.isna(value):
                out.at[row, col] = "–"
            else:
                text = f"{value:.{digits}f}"
                out.at[row, col] = bold(text) if value == best[col] else text
    return out


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    return _formatted(table, lambda s: f"**{s}**", digits).to_markdown()


def to_latex(table: pd.DataFrame, digits: int = 3) -> str:
    formatted = _formatted(table, lambda s: f"\\textbf{{{s}}}", digits)
    formatted.index = [label.replace("_", r"\_") for label in formatted.index]
    return formatted.to_latex(escape=False, column_format="l" + "r" * len(table.columns))
