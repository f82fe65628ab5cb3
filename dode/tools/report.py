"""The prose ``make reproduce`` writes from the result files: results/README.md (each model's claims, tables and
provenance, ready to cite) and the generated block of docs/results.md ("Known results"). ``dode.tools.reproduce``
runs the notebooks and calls ``write_summary`` after a full run; everything here reads result files only.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..util.runtime import describe_machine

ROOT = Path(__file__).resolve().parents[2]
#: the docs page that holds the generated claims, between the ``RESULTS_BLOCK`` markers
RESULTS_PAGE = ROOT / "docs" / "results.md"


def headline(summary, metric: str, floor: float, tolerance: float = 0.01, costs: dict | None = None) -> str:
    """Prose of what D-ODE auto does against the best base, from a ``spacing_summary`` table: wins, ties (within
    ``tolerance``), losses with their numbers, the median ratio, and ``costs`` (median seconds of ``auto`` and
    of one greedy fit)."""
    import pandas as pd

    cells = summary.dropna(subset=["best-base", "dode-auto"])
    ratio = cells["dode-auto"] / cells["best-base"]
    wins, losses = cells[ratio < 1 - tolerance], cells[ratio > 1 + tolerance]
    lines = [f"D-ODE with `spacing=\"auto\"` against the best base a user could configure (the best of diffusers' "
             f"spacings for that solver and NFE, by `{metric}` on the evaluation seeds): better in {len(wins)} of "
             f"{len(cells)} solver x NFE cells, within {tolerance:.0%} in {len(cells) - len(wins) - len(losses)}, "
             f"worse in {len(losses)}; median ratio {ratio.median():.3f} (floor {floor:.3f})."]
    if len(losses):
        lines.append("Where it does not win: " + "; ".join(
            f"{r.solver} NFE {r.nfe}: {r['dode-auto']:.3f} ({r['dode-auto_spacing']}) against "
            f"{r['best-base']:.3f} ({r['best-base_spacing']})" for _, r in losses.iterrows()) + ".")
    paper = cells["dode"] / cells["base"] if "dode" in cells and "base" in cells else pd.Series(dtype=float)
    if len(paper):
        lines.append(f"The paper's method on the paper's spacing (D-ODE against its own base) has a median ratio of "
                     f"{paper.median():.3f}; against the best base, {(cells['dode'] / cells['best-base']).median():.3f}.")
    if costs is not None:
        lines.append(f"Cost on this machine: `spacing=\"auto\"` took a median {costs['auto']:.2f} s per solver and "
                     f"NFE (every spacing fitted and validated; the validation reference is made once per process and "
                     f"shared), against "
                     f"{costs['greedy']:.2f} s for one greedy fit.")
    return " ".join(lines)  # the learned grids: learned_claims


def learned_claims(results, metric: str) -> str:
    """Prose on the learned grids from a model's ``results.csv`` rows (empty where it holds none): what the lambdas
    add on top of a learned grid, what the grid adds on top of the lambdas, and what each fit costs."""
    from ..experiments.tables import FIT_SECONDS

    wide = results.pivot_table(index=["solver", "nfe"], columns="variant", values=metric)
    seconds = results.pivot_table(index=["solver", "nfe"], columns="variant", values="fit_seconds")
    if "dode-learned" not in wide or "learned-grid" not in wide:
        return ""
    both = wide.dropna(subset=["dode-learned", "learned-grid"])
    if both.empty:
        return ""
    nfes = sorted({n for _, n in both.index})
    lam = both["dode-learned"] / both["learned-grid"]
    low = lam[[n <= 5 for _, n in both.index]]
    grid = (both["dode-learned"] / both["dode-auto"]).median()
    lines = [f"Learned grids ({len(both)} solver x NFE cells, NFE {', '.join(map(str, nfes))}): D-ODE with lambdas and "
             f"grid learned together against the base solver on a grid learned alone (lambdas 0, same starts and "
             f"iterations): median ratio {lam.median():.3f}"
             + (f", at or below 0.5x in {int((low <= 0.5).sum())} of {len(low)} cells at NFE 5 and below" if len(low)
                else "") + f". What the grid adds on top of the lambdas: median ratio {grid:.3f} to greedy D-ODE auto."]
    best = (both["dode-learned"] / wide.loc[both.index, "best-base"]).median()
    lines.append(f"Against the best base on diffusers' spacings, D-ODE learned grid has a median ratio of {best:.3f}.")
    costs = {v: seconds[v].median() for v in ("learned-grid", "dode-joint", "dode-learned", "dode-auto") if v in seconds}
    lines.append("Median fit seconds per solver and NFE: " + ", ".join(
        f"{name} {costs[v]:.1f} s" for v, name in (("dode-auto", "greedy D-ODE auto"), ("learned-grid", "grid alone"),
                                                  ("dode-joint", "joint lambdas"), ("dode-learned", "lambdas and grid"))
        if v in costs) + f" ({FIT_SECONDS}).")
    return " ".join(lines)


RESULTS_BLOCK = ("<!-- results: written by make reproduce from results/; do not edit by hand -->", "<!-- /results -->")


def update_block(page: Path, text: str) -> bool:
    """Replace the text between the ``RESULTS_BLOCK`` markers of ``page`` (if it has them); True if it did."""
    if not page.is_file():
        return False
    content = page.read_text()
    start, end = RESULTS_BLOCK
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    page.write_text(head + start + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1])
    return True


def write_summary(results: Path, manifest: dict) -> str | None:
    """results/README.md: each model's headline table and claims, generated from the result files, with
    provenance, ready to cite. Returns the claims, which also go into the "Known results" block of ``RESULTS_PAGE``
    when ``results`` is the repository's results/; None, writing nothing, where no 02 run is in the manifest."""
    import pandas as pd

    if not any(name.startswith("02_distill_solvers-") for name in manifest["runs"]):
        return None

    env = manifest["environment"]
    sections, claims = [], []
    for name in sorted(manifest["runs"]):
        if not name.startswith("02_distill_solvers-"):
            continue
        model = name.removeprefix("02_distill_solvers-")
        folder = results / model
        evaluation = json.loads((folder / "evaluation.json").read_text())
        metric = evaluation["metric"]
        floor = evaluation["floor"].get(metric.removeprefix("fd_"), 0.0)
        if not (folder / "summary.csv").is_file() or not (folder / f"table_{metric}.md").is_file():
            continue
        summary = pd.read_csv(folder / "summary.csv")
        correlation = pd.DataFrame(evaluation.get("criterion_correlation", []))
        costs = None
        if (folder / "results.csv").is_file() and (folder / "spacings.csv").is_file():
            rows, sweep = pd.read_csv(folder / "results.csv"), pd.read_csv(folder / "spacings.csv")
            if "fit_seconds" in sweep:
                costs = {"auto": rows.loc[rows.variant == "dode-auto", "fit_seconds"].median(),
                         "greedy": sweep.loc[sweep.variant == "dode", "fit_seconds"].median()}
        text = headline(summary, metric, floor, costs=costs)
        learned = learned_claims(pd.read_csv(folder / "results.csv"), metric) if (folder / "results.csv").is_file() \
            else ""
        if learned:
            text += " " + learned
        for spread_file in sorted(folder.glob("ablation_seeds_summary-nfe*.csv")):
            spread = pd.read_csv(spread_file)
            spread = spread[spread.variant == "dode-learned"]
            if len(spread):
                nfe = spread_file.stem.rsplit("-nfe", 1)[1]
                text += (f" Refitted on {len(pd.read_csv(folder / f'ablation_seeds-nfe{nfe}.csv').fit_seed.unique())} "
                         f"fitting batches, D-ODE learned grid at NFE {nfe} varies by at most "
                         f"{spread.range_over_median.max():.1%} of its median ("
                         + ", ".join(f"{r.solver} {r['median']:.3f}, {r['min']:.3f}-{r['max']:.3f}"
                                     for _, r in spread.iterrows()) + ").")
        claims.append(f"- **{model}** (`{metric}`, {evaluation['num_samples']} held-out samples per cell, NFE "
                      f"{', '.join(map(str, sorted(summary.nfe.unique())))}): {text}")
        if not correlation.empty:
            picks = ", ".join(f"`{r.criterion}` {r.spearman_all:.3f} (picks the best spacing in "
                              f"{r.picks_the_best:.0%} of solver x NFE cells)" for r in correlation.itertuples())
            claims.append(f"  Validation criteria, Spearman rank correlation with `{metric}` over every cell: {picks}.")
        sections.append(f"""## {model}: `{metric}` (lower is better)

{evaluation['num_samples']} samples per cell (seeds {evaluation['evaluation_seeds'][0]}-{evaluation['evaluation_seeds'][1]}),
against {evaluation['reference']}. D-ODE lambdas fitted on seeds {evaluation['fit_seeds'][0]}-{evaluation['fit_seeds'][1]}
with teacher C = {evaluation['teacher']}; spacings chosen and guarded on seeds
{evaluation['validation_seeds'][0]}-{evaluation['validation_seeds'][1]}. Floor (the reference solution's own score):
**{floor:.3f}**. Heun makes only odd NFE (2n - 1); its even columns are empty.

{text}

{(folder / f"table_{metric}.md").read_text()}
The spacing behind each cell is in `{model}/table_spacings.md`; every solver x spacing x NFE x (base, D-ODE) cell
in `{model}/spacings.csv` and `figures/spacings-{model}.png`.
""" + ("" if not (folder / "table_learned.md").is_file() else f"""
### Learned grids: the grid alone, the lambdas alone, both

The best base, the base on a learned grid (lambdas 0), greedy D-ODE auto, its lambdas refined jointly, lambdas and
grid learned together (`{model}/table_learned.md`):

{(folder / "table_learned.md").read_text()}""") + ("" if correlation.empty else f"""
How well each validation criterion predicts `{metric}` (Spearman rank correlation over every cell, its median
within each solver and NFE, and how often the criterion's pick is the true best):

{correlation.to_markdown(index=False, floatfmt=".3f")}
"""))
    for name in sorted(manifest["runs"]):  # notebook 07: a flow-matching model's table and its prose
        page = results / name.removeprefix("07_flow-") / "flow.md"
        if name.startswith("07_flow-") and page.is_file():
            model, body = name.removeprefix("07_flow-"), page.read_text().split("\n", 2)[2].strip()
            sections.append(f"## {model}: flow matching, `fd_pixel` (lower is better)\n\n{body}\n\nEvery base spacing "
                            f"and fit in `{model}/flow.csv`; the figure in `figures/flow-{model}.png` (docs/flow.md).\n")
            run = manifest["runs"][name]
            claims.append(f"- **{model}** (flow matching, `fd_pixel`; notebook 07 at `{run.get('git_commit', '?')[:7]}`, "
                          f"{run['wall_seconds']} s): {body.split(chr(10) * 2)[-1]}")
    runs = "\n".join(f"| {name} | `{r['notebook']}` | {r['wall_seconds']} | {r['finished']} |"
                     for name, r in manifest["runs"].items())
    text = f"""# Results

Written by `make reproduce` (`python -m dode.tools.reproduce`) from the result files; do not edit by hand.

{chr(10).join(sections)}
Every table (Markdown and LaTeX) is in `<model>/table_<metric>.md|tex`, every number in `<model>/results.csv`,
every fitted DODEScheduler in `<model>/schedulers/`, the figures in `figures/`, the executed notebooks in
`notebooks/`, and each run's parameters and outputs in `manifest.json`.

## Provenance

git commit `{env['git_commit']}`{' (with uncommitted changes)' if env['git_dirty'] else ''}; {describe_machine(env['machine'])};
Python {env['machine']['python']}; torch {env['packages']['torch']},
diffusers {env['packages']['diffusers']}, torchmetrics {env['packages']['torchmetrics']}; wall time
{env['wall_seconds']} s with {env['parameters'].get('jobs', 1)} runs at once.

| run | notebook | wall seconds | finished (UTC) |
|---|---|---|---|
{runs}
"""
    (results / "README.md").write_text(text)
    block = "\n".join(claims) + (f"\n\n(`make reproduce` at `{env['git_commit']}`, {env['wall_seconds']} s on "
                                 f"{env['machine']['cpus']} CPUs; tables: results/README.md.)")
    if results.resolve() == (ROOT / "results").resolve():
        update_block(RESULTS_PAGE, block)
    return block
