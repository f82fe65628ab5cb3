"""Summaries of a results table (``evaluate_grid``, ``evaluate_spacings``) and of a spacing sweep.

``gap_summary`` and ``spacing_summary`` are one computation (``_gaps``): per solver and NFE, the metric of each
variant, and for each D-ODE variant its ratio to a reference row and the share of that row's gap to the floor it
closes. They differ in the reference (the paper's base; the best base) and in their column names, which their
readers rely on (``spacing_summary`` is ``03_paper_tables``' ``summary.csv``, read by ``dode.tools.reproduce``).
``criterion_correlation`` says how well each validation criterion ranks a sweep's cells; ``learned_checks`` whether
D-ODE on a learned grid beats the rows it must beat, cell by cell.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.solvers import SOLVERS
from .variants import VARIANTS, suffix


def _gaps(wide: pd.DataFrame, reference: str, variants, floor: float, names) -> pd.DataFrame:
    """``wide`` (one column per variant, rows per solver and NFE) with, for each of ``variants`` it has, the ratio
    to ``reference`` and the share of ``reference``'s gap to ``floor`` closed, in the columns ``names(variant)``
    gives (ratio, gap); the rows in ``SOLVERS`` order, then by NFE."""
    for variant in [v for v in variants if v in wide]:
        ratio, gap = names(variant)
        wide[ratio] = wide[variant] / wide[reference]
        wide[gap] = (wide[reference] - wide[variant]) / (wide[reference] - floor)
    order = {s: i for i, s in enumerate(SOLVERS)}
    return wide.sort_values(["solver", "nfe"], key=lambda c: c.map(order) if c.name == "solver" else c)


def gap_summary(results: pd.DataFrame, floor: float, metric: str = "fd_pixel") -> pd.DataFrame:
    """Per solver and NFE: base, D-ODE (and its refinements, where present), the ratio to base, and the fraction
    of the base-to-floor gap each closes."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric).reset_index()
    return _gaps(wide, "base", [v for v in VARIANTS if v != "base"], floor,
                 lambda variant: ("ratio" + suffix(variant), "gap_closed" + suffix(variant)))


def spacing_summary(results: pd.DataFrame, floor: float, metric: str = "fd_pixel") -> pd.DataFrame:
    """Per solver and NFE: the paper's base, the best base (and its spacing), D-ODE auto (and its spacing), the
    ratio of D-ODE auto to the best base and the share of the best base's gap to the floor it closes."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric).reset_index()
    spacing = results.pivot_table(index=["solver", "nfe"], columns="variant", values="spacing", aggfunc="first")
    wide = wide.join(spacing.add_suffix("_spacing"), on=["solver", "nfe"])
    return _gaps(wide, "best-base", ("dode", "dode-auto", "dode-learned"), floor,
                 lambda variant: (f"{variant}_vs_best", f"{variant}_gap_closed"))


def criterion_correlation(sweep: pd.DataFrame, metric: str = "fd_pixel") -> pd.DataFrame:
    """How well each validation criterion ranks every solver x spacing x NFE x variant cell by ``metric``: the
    Spearman rank correlation, over all cells and within each (solver, NFE) (the choice ``auto`` makes), and
    how often the criterion's pick within a (solver, NFE) is the metric's."""
    from scipy.stats import spearmanr

    rows = []
    for column in [c for c in sweep if c.startswith("val_")]:
        finite = sweep[np.isfinite(sweep[column]) & np.isfinite(sweep[metric])]
        within, agree = [], []
        for _, cell in finite.groupby(["solver", "nfe"]):
            if len(cell) > 2:
                within.append(spearmanr(cell[column], cell[metric]).statistic)
            agree.append(cell[column].idxmin() == cell[metric].idxmin())
        rows.append({"criterion": column.removeprefix("val_"), "cells": len(finite),
                     "spearman_all": spearmanr(finite[column], finite[metric]).statistic,
                     "spearman_within_median": float(np.nanmedian(within)),
                     "picks_the_best": float(np.mean(agree))})
    return pd.DataFrame(rows)


#: the boolean columns of ``learned_checks``: what D-ODE on a learned grid must beat in a cell
LEARNED_CHECKS = ("below_best", "below_auto", "at_or_below_grid")


def learned_checks(results: pd.DataFrame, metric: str = "fd_pixel") -> pd.DataFrame:
    """Per solver and NFE with a D-ODE-on-a-learned-grid row: ``metric`` of the best base, greedy D-ODE auto, the grid
    alone (lambdas 0) and D-ODE on a learned grid, and whether the last is strictly below the best base
    (``below_best``), strictly below greedy D-ODE auto (``below_auto``) and at or below the grid alone
    (``at_or_below_grid``; True where the solver has no grid alone). Rows in ``SOLVERS`` order, then by NFE."""
    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric)
    for variant in ("best-base", "dode-auto", "learned-grid", "dode-learned"):
        if variant not in wide:
            wide[variant] = np.nan
    wide = wide.dropna(subset=["dode-learned"]).reset_index()
    learned = wide["dode-learned"]
    out = pd.DataFrame({"solver": wide["solver"], "nfe": wide["nfe"], "best_base": wide["best-base"],
                        "auto": wide["dode-auto"], "grid_alone": wide["learned-grid"], "learned": learned,
                        "below_best": learned < wide["best-base"], "below_auto": learned < wide["dode-auto"],
                        "at_or_below_grid": wide["learned-grid"].isna() | (learned <= wide["learned-grid"])})
    order = {s: i for i, s in enumerate(SOLVERS)}
    out = out.sort_values(["solver", "nfe"], key=lambda c: c.map(order) if c.name == "solver" else c)
    return out.reset_index(drop=True)
