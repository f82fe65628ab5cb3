"""The paper's tables: one row per base solver and one per its D-ODE version, one column per NFE, best in bold.

The rows, their order and labels are ``dode.experiments.variants.VARIANTS``."""
from __future__ import annotations

import pandas as pd

from ..core.solvers import SOLVERS, get_solver
from .variants import LEARNED_ROWS, REFINED_VARIANTS, VARIANTS, get_variant


def row_label(solver: str, variant: str) -> str:
    """"DDIM", "DDIM best spacing", "DDIM learned grid" (lambdas 0), "D-DDIM" (the paper's greedy fit),
    "D-DDIM auto", "D-DDIM learned grid", ..."""
    row = get_variant(variant)
    return ("D-" if row.dode else "") + get_solver(solver).paper + row.label


def paper_table(results: pd.DataFrame, metric: str = "fd", variants=VARIANTS) -> pd.DataFrame:
    """Numeric table: index = solver rows in the paper's order (base, D-ODE, its refinements; those of
    ``variants`` present), columns = NFE."""
    table = results.pivot_table(index=["solver", "variant"], columns="nfe", values=metric)
    order = [(s, v) for s in SOLVERS for v in variants if (s, v) in table.index]
    table = table.loc[order]
    table.index = [row_label(s, v) for s, v in order]
    table.columns = [f"NFE {n}" for n in table.columns]
    return table


#: what the learned table's fit seconds count (notebook 03's caption, results/README.md's prose)
FIT_SECONDS = ("what distill(refine=...) costs: the auto fit it starts from, on the refinement's batch, and the "
               "refinement; D-ODE on a learned grid's include the learned grid alone and the joint lambdas, two of its "
               "starts")


def learned_table(results: pd.DataFrame, metric: str = "fd") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(quality, cost) over ``LEARNED_ROWS`` at the NFEs where the learned rows exist: ``metric``, and the
    seconds each row's fit took (``FIT_SECONDS``; the best base is picked on evaluation data, no fit). A cell a solver cannot have (no grid for PLMS) is empty."""
    nfes = sorted(set(results.loc[results["variant"].isin(REFINED_VARIANTS), "nfe"]))
    rows = results[results["nfe"].isin(nfes)]
    quality = paper_table(rows, metric, LEARNED_ROWS)
    cost = paper_table(rows.assign(fit_seconds=rows["fit_seconds"].fillna(0.0)), "fit_seconds", LEARNED_ROWS)
    return quality, cost


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
