"""``make guard-reference``: does a cheap validation reference make the guard decide as the 1000-step one does?

For every embedded model, solver and NFE, every spacing's greedy fit is judged on the validation seeds against each
reference in ``REFERENCES``, with ``distill``'s own decision code (``Judge.scores``, ``choose``, ``_decide``), by the
FD criterion in the feature space of the model's metric (pixel on gmm-digits, digits on unet-digits), as the
notebooks validate:

- the paper's spacing: the shrink factor, and kept or dropped (factor > 0);
- ``spacing="auto"``: the spacing chosen, and its factor;
- the rank correlation (Spearman) of the criterion over every spacing at factors 0, 1/4, ..., 1.

A student's samples do not depend on the reference, so each sampling run is made once and scored against every
reference. Writes results/guard_reference/decisions.csv (one row per model, solver, NFE and reference),
results/guard_reference/provenance.json and results/guard_reference.md (agreement with the fine reference, every
cell that differs, and the cheapest reference that agrees on at least ``AGREEMENT`` of the decisions).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

import dode
from ..core.distill import VALIDATION_SEED, _decide, fit_candidates
from ..core.guard import MARGIN, Judge, choose, insanity
from ..core.reference import REFERENCE, Reference, evaluations_per_sample
from ..core.teacher import Teacher
from ..experiments.checks import possible
from ..models.registry import get_model
from ..util.runtime import use_threads
from .provenance import provenance

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("gmm-digits", "unet-digits")
NFES = (3, 4, 5, 6, 8, 10)
FINE = Reference("fine")
#: the references compared with the fine one, cheapest first: high-order solvers on Karras grids, which converge on
#: both embedded models (iPNDM on linspace grids does not on unet-digits: 20-50 steps all stay 0.02 RMS from the
#: converged solution, where the 1000-step run is 0.003)
REFERENCES = (Reference("ipndm", "linspace", 30), Reference("unipc", "karras", 30), Reference("deis", "karras", 40),
              Reference("unipc", "karras", 40), Reference("ipndm", "karras", 40), Reference("deis", "karras", 60),
              Reference("unipc", "karras", 60))
AGREEMENT = 0.95  # the share of decisions a reference must make as the fine one does
FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the rank correlation compares the criterion


class _SharedRuns(Judge):
    """A judge whose sampling runs come from ``runs`` ((candidate scheduler, factor) -> samples), shared by judges
    with other references."""

    def __init__(self, *args, runs: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs_cache = runs

    def samples(self, scheduler, scale: float = 1.0, nfe: int | None = None) -> torch.Tensor:
        key = (id(scheduler), float(scale))
        if key not in self.runs_cache:
            self.runs_cache[key] = super().samples(scheduler, scale, nfe)
        return self.runs_cache[key]


def _decisions(judge: Judge, candidates: list, solver) -> dict:
    """The paper's spacing's and ``auto``'s decisions by ``judge`` (candidates' scores are not touched)."""
    paper = next(c for c in candidates if c.spacing == solver.default_spacing)
    scores = judge.scores(paper.fitted)
    _, factor = choose([scores], MARGIN, 0)
    own = [copy.copy(c) for c in candidates]
    for c in own:
        c.scores = judge.scores(c.fitted, search=False)
    chosen, auto_factor = _decide(own, judge, solver, True, MARGIN, progress=False)
    return {"paper_factor": factor, "paper_kept": factor > 0, "auto_spacing": own[chosen].label,
            "auto_factor": auto_factor, "auto_kept": auto_factor > 0}


def features_of(name: str) -> str:
    """The feature space a model's notebooks validate in: that of its registry metric (``fd_digits``: digits)."""
    metric = get_model(name).metric
    return metric.removeprefix("fd_") if metric.startswith("fd_") else "pixel"


def study_cell(model, solver_name: str, nfe: int, teacher: Teacher, validation: Teacher, references,
               features: str = "pixel") -> list:
    """One row per reference (the fine one first) for ``solver_name`` at ``nfe``, judged by FD in ``features``."""
    solver = dode.get_solver(solver_name)
    candidates, _, _ = fit_candidates(model, solver, nfe, list(solver.spacings), teacher)
    runs: dict = {}
    judges = [_SharedRuns(model, validation, "fd", "cpu", features, r, progress=False, runs=runs)
              for r in (FINE, *references)]
    grid = {j.solution.reference: [j.score(j.samples(c.fitted, f)) for c in candidates for f in FACTORS]
            for j in judges}
    sanity = [insanity(c.fit) for c in candidates]
    largest = max(abs(v) for c in candidates for v in c.fit.lambdas)
    reach = max(c.fit.sample_range / c.fit.teacher_range for c in candidates)
    rows = []
    for judge in judges:
        reference = judge.solution.reference
        rho = spearmanr(grid[FINE], grid[reference]).statistic if reference != FINE else 1.0
        rows.append({"model": model.name, "features": features, "solver": solver_name, "nfe": nfe,
                     "reference": reference.label,
                     "reference_nfe": evaluations_per_sample(reference, model), **_decisions(judge, candidates, solver),
                     "spearman": float(rho), "largest_lambda": largest, "sample_reach": reach,
                     "insane_fits": sum(w is not None for w in sanity)})
    return rows


def agreement(decisions: pd.DataFrame) -> pd.DataFrame:
    """Per model and reference: the share of cells whose decisions match the fine reference's (each decision and all
    four together), the median and lowest rank correlation."""
    keys = ["model", "solver", "nfe"]
    fine = decisions[decisions.reference == FINE.label].set_index(keys)
    out = []
    for (model, reference), rows in decisions[decisions.reference != FINE.label].groupby(["model", "reference"],
                                                                                          sort=False):
        rows = rows.set_index(keys)
        base = fine.loc[rows.index]
        same = {name: (rows[name] == base[name]) for name in ("paper_factor", "paper_kept", "auto_spacing",
                                                              "auto_factor")}
        decisions_same = pd.concat(same.values()).mean()
        out.append({"model": model, "reference": reference, "reference_nfe": int(rows.reference_nfe.iloc[0]),
                    "cells": len(rows), **{f"same_{k}": float(v.mean()) for k, v in same.items()},
                    "same_decisions": float(decisions_same), "spearman_median": float(rows.spearman.median()),
                    "spearman_min": float(rows.spearman.min())})
    return pd.DataFrame(out)


def differences(decisions: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Every cell where ``reference`` decides otherwise than the fine reference: both decisions side by side."""
    keys = ["model", "solver", "nfe"]
    fine = decisions[decisions.reference == FINE.label].set_index(keys)
    rows = decisions[decisions.reference == reference].set_index(keys)
    names = ["paper_factor", "auto_spacing", "auto_factor"]
    differ = (rows[names] != fine.loc[rows.index, names]).any(axis=1)
    table = pd.concat([fine.loc[differ[differ].index, names].add_suffix(" (fine)"),
                       rows.loc[differ, names].add_suffix(" (cheap)")], axis=1)
    return table.reset_index()


def chosen(summary: pd.DataFrame) -> str | None:
    """The cheapest reference that agrees on at least ``AGREEMENT`` of the decisions on every model (of equally
    cheap ones, the one that agrees most)."""
    ok = summary.groupby(["reference", "reference_nfe"]).same_decisions.min().reset_index()
    ok = ok[ok.same_decisions >= AGREEMENT].sort_values(["reference_nfe", "same_decisions"], ascending=[True, False])
    return None if ok.empty else ok.reference.iloc[0]


def report(decisions: pd.DataFrame, meta: dict) -> str:
    summary = agreement(decisions)
    pick = chosen(summary)
    lines = [
        "# The validation reference: cheap against fine",
        "",
        "Written by `make guard-reference` (`python -m dode.tools.guard_reference`); do not edit by hand. "
        f"{meta['cells']} cells (model x solver x NFE {', '.join(map(str, meta['nfes']))}), each judged on "
        f"{meta['validation']} validation seeds with the FD criterion in the model's metric space (as the notebooks: "
        f"{', '.join(f'{m}: {f}' for m, f in meta['features'].items())}) against the fine reference (DDIM through "
        "every training timestep) and each cheap one, from the same sampling runs; the greedy fits use C = 10 on "
        f"{meta['fit_batch']} samples. Run in {meta['seconds'] / 60:.0f} min ({meta['machine']}).",
        "",
        "## Agreement with the fine reference",
        "",
        "`same_decisions`: the share of the four decisions (paper spacing's factor and kept/dropped, auto's spacing "
        "and factor) over every cell that come out as with the fine reference; `spearman`: the rank correlation of "
        "the criterion over every spacing at factors 0, 1/4, ..., 1.",
        "",
        summary.to_markdown(index=False, floatfmt=".3f"),
        "",
        f"**Chosen: {pick}** (the cheapest at or above {AGREEMENT:.0%} on both models; `dode.core.reference."
        f"REFERENCE` is `{REFERENCE.label}`)." if pick else f"No cheap reference reaches {AGREEMENT:.0%}.",
        "",
    ]
    for reference in [pick] if pick else []:
        table = differences(decisions, reference)
        lines += [f"## Cells where {reference} decides otherwise", "",
                  table.to_markdown(index=False, floatfmt=".4g") if len(table) else "None.", ""]
    fits = decisions[decisions.reference == FINE.label]
    lines += ["## Sanity of every greedy fit", "",
              f"Over every spacing's fit in every cell: largest |lambda| {fits.largest_lambda.max():.4g}, final samples "
              f"reaching at most {fits.sample_reach.max():.3g}x the teacher's max |x|; fits the sanity check flags: "
              f"{int(fits.insane_fits.sum())}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--solvers", nargs="+", default=list(dode.SOLVERS))
    parser.add_argument("--nfes", nargs="+", type=int, default=list(NFES))
    parser.add_argument("--validation", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from decisions.csv")
    args = parser.parse_args(argv)
    folder = args.out / "guard_reference"
    if args.report_only:
        meta = json.loads((folder / "provenance.json").read_text())["parameters"]
        (args.out / "guard_reference.md").write_text(report(pd.read_csv(folder / "decisions.csv"), meta))
        return 0
    use_threads()
    began = time.perf_counter()
    rows = []
    for name in args.models:
        model = dode.load_model(name)
        teacher = Teacher(model, batch_size=100, seed=0, substeps=10, device="cpu")
        validation = Teacher(model, batch_size=args.validation, seed=VALIDATION_SEED, substeps="fine", device="cpu")
        cells = [(s, n) for s in args.solvers for n in args.nfes if possible(s, n)]
        for solver, nfe in tqdm(cells, desc=name):
            rows += study_cell(model, solver, nfe, teacher, validation, REFERENCES, features_of(name))
    decisions = pd.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    decisions.to_csv(folder / "decisions.csv", index=False)
    seconds = time.perf_counter() - began
    meta = {"models": args.models, "features": {m: features_of(m) for m in args.models}, "solvers": args.solvers, "nfes": args.nfes, "validation": args.validation,
            "fit_batch": 100, "cells": int(decisions.groupby(["model", "solver", "nfe"]).ngroups),
            "references": [r.label for r in (FINE, *REFERENCES)], "seconds": seconds,
            "machine": f"{torch.get_num_threads()} torch thread(s)"}
    (folder / "provenance.json").write_text(json.dumps(provenance(meta, seconds), indent=2, default=str) + "\n")
    (args.out / "guard_reference.md").write_text(report(decisions, meta))
    print(f"wrote {folder} and guard_reference.md in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
