"""The spacing tables and claims: summaries against the best base, criteria's rank correlation, the generated prose,
notebook parameter checks, and the spacing grid on a tiny run against independent recomputation."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import dode
from dode.tools import report
from dode.core.distill import VALIDATION_SEED, _first_unless_beaten, distillation, shared_grids
from dode.core.guard import MARGIN
from dode.experiments.evaluate import evaluate_spacings, evaluation_data
from dode.experiments.summary import criterion_correlation, spacing_summary
from dode.experiments.tables import paper_table, spacing_table
from dode.core.reference import reference_solution


def toy_results():
    """Two solvers, two NFEs; D-ODE auto beats the best base except for heun at NFE 5."""
    rows = []
    for solver, nfe, base, best, paper_dode, auto in (("ddim", 3, 5.0, 4.0, 1.0, 0.8), ("ddim", 5, 2.0, 1.5, 0.3, 0.2),
                                                       ("heun", 3, 900.0, 3.0, 10.0, 2.0), ("heun", 5, 50.0, 0.5, 2.0, 0.6)):
        for variant, value, spacing in (("base", base, "karras" if solver == "heun" else "leading"),
                                        ("best-base", best, "trailing"), ("dode", paper_dode, "leading"),
                                        ("dode-auto", auto, "linspace")):
            rows.append({"solver": solver, "nfe": nfe, "variant": variant, "fd_pixel": value, "spacing": spacing,
                         "shrink": 0.5 if (variant == "dode-auto" and nfe == 5) else (1.0 if variant.startswith("dode") else None)})
    return pd.DataFrame(rows)


def test_spacing_summary_compares_with_the_best_base_and_the_gap_to_the_floor():
    summary = spacing_summary(toy_results(), floor=0.1).set_index(["solver", "nfe"])
    assert summary.at[("ddim", 5), "dode-auto_vs_best"] == pytest.approx(0.2 / 1.5)
    assert summary.at[("ddim", 5), "dode-auto_gap_closed"] == pytest.approx((1.5 - 0.2) / (1.5 - 0.1))
    assert summary.at[("heun", 5), "dode-auto_vs_best"] == pytest.approx(1.2)
    assert summary.at[("heun", 5), "best-base_spacing"] == "trailing"
    assert list(summary.index.get_level_values(0)) == ["ddim", "ddim", "heun", "heun"]


def test_headline_counts_wins_and_names_every_loss_with_its_numbers():
    summary = spacing_summary(toy_results(), floor=0.1)
    text = report.headline(summary, "fd_pixel", 0.1)
    assert "better in 3 of 4" in text and "worse in 1" in text
    assert "heun NFE 5: 0.600 (linspace) against 0.500 (trailing)" in text
    ratios = [0.8 / 4.0, 0.2 / 1.5, 2.0 / 3.0, 0.6 / 0.5]
    assert f"median ratio {np.median(ratios):.3f}" in text


def test_tables_put_the_best_base_and_auto_rows_under_their_solver_with_their_spacings():
    results = toy_results()
    table = paper_table(results, "fd_pixel")
    assert list(table.index) == ["DDIM", "DDIM best spacing", "D-DDIM", "D-DDIM auto",
                                 "EDM", "EDM best spacing", "D-EDM", "D-EDM auto"]
    spacings = spacing_table(results)
    assert spacings.at["EDM", "NFE 3"] == "karras" and spacings.at["EDM best spacing", "NFE 5"] == "trailing"
    assert spacings.at["D-DDIM auto", "NFE 5"] == "linspace x0.5"  # a shrunk fit shows its factor
    assert spacings.at["D-DDIM auto", "NFE 3"] == "linspace"


def test_criterion_correlation_against_scipy_and_the_pick_rate():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    rows = []
    for solver in ("ddim", "deis"):
        for nfe in (3, 5):
            true = rng.uniform(0.1, 2.0, size=4)
            for k, value in enumerate(true):
                rows.append({"solver": solver, "nfe": nfe, "fd_pixel": value, "val_good": value * 1.1 + 0.01,
                             "val_noisy": value + rng.normal(scale=1.0)})
    sweep = pd.DataFrame(rows)
    table = criterion_correlation(sweep).set_index("criterion")
    assert table.at["good", "spearman_all"] == pytest.approx(1.0)
    assert table.at["good", "picks_the_best"] == 1.0
    assert table.at["noisy", "spearman_all"] == pytest.approx(spearmanr(sweep.val_noisy, sweep.fd_pixel).statistic)
    picks = np.mean([c.val_noisy.idxmin() == c.fd_pixel.idxmin() for _, c in sweep.groupby(["solver", "nfe"])])
    assert table.at["noisy", "picks_the_best"] == pytest.approx(picks)


def test_the_spacing_grid_rows_are_what_their_schedulers_score(gmm, one_thread):
    """A tiny grid: every spacing is in the sweep; the table rows are the paper's spacing, the best base by the true
    metric, and auto's pick; re-scoring a saved fit and a base spacing independently gives the same numbers. A
    sweep row is scored in the metric's feature space only, unless it is a table row too (every feature)."""
    data = evaluation_data(gmm, 200, seed=1000, reference_samples=2000, features=("pixel", "digits"),
                           progress=False)
    teacher = dode.Teacher(gmm, batch_size=40, seed=0, substeps=10)
    validation = dode.Teacher(gmm, batch_size=40, seed=VALIDATION_SEED, substeps="fine")
    results, sweep = evaluate_spacings(gmm, data, solvers=["ddim", "deis"], nfes=[4], fit_teacher=teacher,
                                       validation=validation, criteria=("rmse",), features=("pixel", "digits"),
                                       progress=False)
    assert list(results.columns[results.columns.str.startswith("fd_")]) == ["fd_pixel", "fd_digits"]
    assert results.fd_digits.notna().all() and sweep.fd_pixel.notna().all()
    kinds = {"base": "base", "best-base": "base", "dode": "dode"}  # table rows that are sweep rows
    for _, row in results[results.variant.isin(list(kinds))].iterrows():
        cell = sweep[(sweep.solver == row.solver) & (sweep.spacing == row.spacing)
                     & (sweep.variant == kinds[row.variant])]
        assert cell.fd_digits.iloc[0] == row.fd_digits
    assert sweep.fd_digits.isna().sum() >= len(sweep) - 2 * 4  # at most 4 table rows per solver: no feature network
    for variant in ("base", "best-base"):  # FD-digits of a table row, from its samples drawn anew
        row = results[(results.solver == "deis") & (results.variant == variant)].iloc[0]
        x = dode.sample(gmm, "deis", 4, 200, seed=1000, spacing=row.spacing, progress=False)
        assert row.fd_digits == pytest.approx(dode.frechet_distance(x, data.reference, features="digits"), rel=1e-9)
    assert set(sweep[sweep.solver == "deis"].spacing) == set(dode.get_solver("deis").spacings)
    assert len(sweep) == 2 * (3 + 6)
    for solver in ("ddim", "deis"):
        rows = results[results.solver == solver].set_index("variant")
        cells = sweep[sweep.solver == solver]
        bases = cells[cells.variant == "base"].set_index("spacing")
        assert rows.at["best-base", "fd_pixel"] == bases.fd_pixel.min()
        assert rows.at["best-base", "spacing"] == bases.fd_pixel.idxmin()
        assert rows.at["base", "spacing"] == dode.get_solver(solver).default_spacing
        chosen = cells[cells.chosen & (cells.variant == "dode")]
        assert len(chosen) == 1 and rows.at["dode-auto", "spacing"] == chosen.spacing.iloc[0]
    # independent re-scoring: a base spacing through dode.sample, and the D-ODE greedy row from its lambdas
    row = sweep[(sweep.solver == "deis") & (sweep.spacing == "karras") & (sweep.variant == "base")].iloc[0]
    x = dode.sample(gmm, "deis", 4, 200, seed=1000, spacing="karras", progress=False)
    assert dode.rmse(x, data.exact) == pytest.approx(row.rmse_exact, rel=1e-9)
    reference = reference_solution(gmm, validation.seed, validation.batch_size).samples
    x = dode.sample(gmm, "deis", 4, 40, seed=VALIDATION_SEED, spacing="karras", progress=False)
    assert row.val_rmse == pytest.approx(dode.rmse(x, reference), rel=1e-9)
    greedy = sweep[(sweep.solver == "ddim") & (sweep.spacing == "trailing") & (sweep.variant == "dode")].iloc[0]
    with teacher.sharing(shared_grids(gmm, "ddim", 4).values()):  # taught as auto taught it
        refit = dode.distill(gmm, "ddim", 4, spacing="trailing", teacher=teacher, guard=False)
    assert json.loads(greedy.lambdas) == pytest.approx(refit.lambdas, abs=1e-6)
    x = dode.sample(gmm, refit, 4, 200, seed=1000, progress=False)
    assert dode.rmse(x, data.exact) == pytest.approx(greedy.rmse_exact, rel=1e-5)
    assert torch.isfinite(torch.tensor(results.fd_pixel.values)).all()


def test_the_api_docs_solver_table_lists_each_solvers_spacings_paper_first():
    readme = (report.ROOT / "docs" / "api.md").read_text()
    for name in dode.SOLVERS:
        solver = dode.get_solver(name)
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        listed = [s.strip() for s in row.strip("| ").split("|")[-1].split(",")]
        expected = [solver.default_spacing] + [s for s in solver.spacings if s != solver.default_spacing]
        assert listed == expected + (["explicit"] if solver.custom_grid else []), (name, listed)


def test_the_learned_rows_are_what_distill_refine_fits_on_the_refinements_own_batch(gmm, one_thread, monkeypatch):
    """With a refinement teacher on another batch, notebook 02's learned rows are exactly ``dode.distill(refine=...)``
    against that teacher (its own auto fit first); with one that teaches as the fitting teacher does (another
    object), they start from the table's own auto fit, with no second one."""
    import dode.experiments.evaluate as evaluate

    fits = []
    monkeypatch.setattr(evaluate, "distillation", lambda *a, **k: fits.append(k["teacher"]) or distillation(*a, **k))
    data = evaluation_data(gmm, 100, seed=1000, reference_samples=1000, progress=False)
    teacher = dode.Teacher(gmm, batch_size=20, seed=0, substeps=4)
    validation = dode.Teacher(gmm, batch_size=20, seed=VALIDATION_SEED, substeps="fine")
    own = dode.Teacher(gmm, batch_size=30, seed=0, substeps=4)
    common = dict(solvers=["dpm_solver_pp_2m"], nfes=[3], validation=validation, learned_nfes=[3],
                  learned_solvers=["dpm_solver_pp_2m"], learned_starts=2, learned_iterations=4, progress=False)
    results, _ = evaluate_spacings(gmm, data, fit_teacher=teacher, refine_teacher=own, **common)
    assert fits == [teacher, own]
    rows = results.set_index("variant")
    for variant, mode in (("learned-grid", "timesteps"), ("dode-joint", "joint"), ("dode-learned", "joint+timesteps")):
        fitted = dode.distill(gmm, "dpm_solver_pp_2m", 3, teacher=own, validation=validation, refine=mode,
                              refine_starts=2, refine_iterations=4, progress=False)
        assert json.loads(rows.at[variant, "lambdas"]) == pytest.approx(fitted.lambdas, abs=1e-6), variant
        grid = json.loads(rows.at[variant, "grid"])
        assert (grid is None and fitted.grid is None) or grid == pytest.approx(fitted.grid, rel=1e-6, abs=1e-6), variant
        assert rows.at[variant, "validation"] == pytest.approx(fitted.fit_info["refine"]["validation"], rel=1e-9)
    assert json.loads(rows.at["dode-learned", "grid"]) is not None
    assert "moment_weight" not in results  # one weight: nothing chosen, no column (make reproduce's rows as before)
    fits.clear()
    same = dode.Teacher(gmm, batch_size=20, seed=0, substeps=4)  # another object, the same teaching
    again, _ = evaluate_spacings(gmm, data, fit_teacher=teacher, refine_teacher=same, **common)
    assert fits == [teacher]


def test_with_several_moment_weights_a_grid_row_says_which_one_the_guard_kept(gmm, one_thread, tmp_path):
    """Notebook 02's grid rows with ``learned_moments`` of two weights: ``moment_weight`` is the weight the saved
    scheduler's record says was kept (here DDIM NFE 4's grid alone keeps 0, the first, although 4 validates lower:
    by less than the guard's margin), the grid alone is ``dode.distill(refine="timesteps", refine_moments=...)``'s
    fit; empty where the refinement was not kept (DPM-Solver++ NFE 3's grid alone here) and in the joint row (its
    lambdas do not depend on the weight)."""
    data = evaluation_data(gmm, 100, seed=1000, reference_samples=1000, progress=False)
    teacher = dode.Teacher(gmm, batch_size=20, seed=0, substeps=4)
    validation = dode.Teacher(gmm, batch_size=20, seed=VALIDATION_SEED, substeps="fine")
    results, _ = evaluate_spacings(gmm, data, solvers=["ddim", "dpm_solver_pp_2m"], nfes=[3, 4], fit_teacher=teacher,
                                   validation=validation, learned_nfes=[3, 4], learned_solvers=["ddim", "dpm_solver_pp_2m"],
                                   learned_starts=1, learned_iterations=3, learned_moments=[0, 4], save_dir=tmp_path,
                                   progress=False)
    assert results[~results.variant.isin(["learned-grid", "dode-learned"])].moment_weight.isna().all()
    left = results[(results.solver == "dpm_solver_pp_2m") & (results.nfe == 3)].set_index("variant")
    record = dode.DODEScheduler.from_pretrained(tmp_path / "dpm_solver_pp_2m-nfe3-learned-grid").fit_info["refine"]
    assert not left.at["learned-grid", "kept"] and not record.get("kept", False)
    assert math.isnan(left.at["learned-grid", "moment_weight"]) and left.at["learned-grid", "spacing"] != "learned"
    rows = results[(results.solver == "ddim") & (results.nfe == 4)].set_index("variant")
    for variant in ("learned-grid", "dode-learned"):
        record = dode.DODEScheduler.from_pretrained(tmp_path / f"ddim-nfe4-{variant}").fit_info["refine"]
        assert [w["weight"] for w in record["moment_weights"]] == [0, 4] and record["kept"]
        assert rows.at[variant, "moment_weight"] == record["moment_weight"], variant
        scores = [w["validation"] for w in record["moment_weights"]]
        assert record["moment_weight"] == [0, 4][_first_unless_beaten(scores, MARGIN)], variant
        if variant == "learned-grid":  # 4 lower, within the margin: the first weight stays
            assert (1 - MARGIN) * scores[0] <= scores[1] < scores[0] and record["moment_weight"] == 0
    fitted = dode.distill(gmm, "ddim", 4, teacher=teacher, validation=validation, refine="timesteps", refine_starts=1,
                          refine_iterations=3, refine_moments=(0, 4), progress=False)
    assert json.loads(rows.at["learned-grid", "grid"]) == pytest.approx(fitted.grid, rel=1e-6, abs=1e-6)
    assert fitted.fit_info["refine"]["moment_weight"] == rows.at["learned-grid", "moment_weight"]
