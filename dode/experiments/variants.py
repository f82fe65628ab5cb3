"""The variant registry: every kind of result row (a base solver or a D-ODE fit of it), and every refinement.

A variant is one row of the paper's tables and one line style of the figures: its name (the ``variant`` column of
every results file), its label after the solver's name in a table ("D-DDIM auto"), its legend entry, and how it
is fitted. ``evaluate_spacings`` (``dode.experiments.evaluate``) makes every variant in ``VARIANTS`` order; the tables
(``dode.experiments.tables``) and plots (``dode.experiments.plots``) read labels, order and styles from here, and a refined variant names one of
the core's ``REFINEMENTS`` (``dode.core.refine``). A new variant is one entry in ``VARIANTS`` (a new refinement also one
in ``REFINEMENTS``).
"""
from __future__ import annotations

from typing import NamedTuple

from ..core.refine import REFINEMENTS


class Variant(NamedTuple):
    name: str
    label: str  # the words after the solver's name in a table row ("" for the plain ones)
    legend: str  # the legend entry in figures
    dode: bool  # D-ODE lambdas ("D-" in front of the label, solid lines); False: the base solver, dashed
    spacing: str  # "paper" (the solver's paper spacing), "best" (the best base on evaluation data), "auto"
    refine: str | None = None  # the ``REFINEMENTS`` mode applied to the auto fit, None for none
    marker: str = "o"


#: every row kind of a results table, in table order
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("base", "", "base, paper's spacing", False, "paper", marker="o"),
    Variant("best-base", " best spacing", "base, best spacing", False, "best", marker="X"),
    Variant("learned-grid", " learned grid", "base, learned grid (lambdas 0)", False, "auto", "timesteps", "h"),
    Variant("dode", "", "D-ODE, paper's spacing", True, "paper", marker="s"),
    Variant("dode-auto", " auto", "D-ODE auto (spacing picked on validation seeds)", True, "auto", marker="P"),
    Variant("dode-joint", " joint", "D-ODE joint", True, "auto", "joint", "^"),
    Variant("dode-learned", " learned grid", "D-ODE auto, learned grid", True, "auto", "joint+timesteps", "D"),
)}
#: the rows of the paper's tables in 03_paper_tables: the paper's and the spacing comparison
PAPER_VARIANTS = ("base", "best-base", "dode", "dode-auto", "dode-learned")
#: the refinements of an auto fit, which ``evaluate_spacings`` adds at its ``learned_nfes``
REFINED_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.refine)
#: the rows of ``dode.experiments.tables.learned_table``: the best base, greedy D-ODE auto and its refinements
LEARNED_ROWS = ("best-base", "learned-grid", "dode-auto", "dode-joint", "dode-learned")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def suffix(name: str) -> str:
    """The variant in column and folder names beside the plain D-ODE fit's: "" for "dode", "-auto" for "dode-auto",
    "-best-base" for "best-base"."""
    get_variant(name)
    return name.removeprefix("dode") if VARIANTS[name].dode else "-" + name
