"""The ablation studies (dode.experiments.studies, notebooks/05_ablations) and evaluate_grid's FID mode (notebooks/06_pretrained),
each row checked against the calls it stands for, made here directly."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import dode
from dode.experiments import studies
from dode.experiments.evaluate import evaluate_grid, evaluate_scheduler, evaluation_data, fitting_rmse, teacher_distances
from dode.core.distill import distillation, refine_fit
from dode.evaluation.metrics import frechet_distance
from dode.core.scheduler import DODEScheduler, make_scheduler

NFE = 3
TIMING = ("sample_seconds", "refine_seconds", "fit_seconds")


@pytest.fixture(scope="module")
def data(gmm):
    return evaluation_data(gmm, 40, reference_samples=400, progress=False)


def scores(row) -> dict:
    """A row without its timings (the only numbers that change from run to run)."""
    return {k: v for k, v in dict(row).items() if k not in TIMING}


def direct(gmm, data, scheduler, nfe=NFE) -> dict:
    return scores(evaluate_scheduler(gmm, scheduler, nfe, data, seed=1000))


def test_teacher_scale_rows_are_the_direct_fits_and_zero_lambdas_give_the_base(gmm, data):
    table = studies.teacher_scale(gmm, data, "ddim", NFE, [2, "fine"])
    assert list(table.columns) == ["teacher", "fd_pixel", "rmse_exact", "total_variance", "sample_seconds", "lambdas"]
    assert list(table["teacher"]) == ["2", "fine"]
    fitted = dode.distill(gmm, "ddim", NFE, teacher="fine", guard=False)
    expected = {"teacher": "fine", **direct(gmm, data, fitted), "lambdas": [round(v, 3) for v in fitted.lambdas]}
    assert scores(table.iloc[1]) == expected
    assert table.at[0, "lambdas"] != table.at[1, "lambdas"]  # the teacher matters
    zero = DODEScheduler(make_scheduler("ddim", gmm), [0.0] * NFE, NFE)  # lambda = 0: the base solver itself
    assert direct(gmm, data, zero) == direct(gmm, data, "ddim")
    assert (table["fd_pixel"] < direct(gmm, data, "ddim")["fd_pixel"]).all()


def test_batch_size_study_fits_each_batch_on_its_own_seeds(gmm, data):
    table = studies.distillation_batch_size(gmm, data, "ddim", NFE, [10], 2)
    assert list(table[["batch_size", "fit_seed"]].itertuples(index=False, name=None)) == [(10, 0), (10, 10_000)]
    fitted = dode.distill(gmm, "ddim", NFE, batch_size=10, seed=10_000, guard=False)
    assert table.at[1, "lambdas"] == [round(v, 3) for v in fitted.lambdas] != table.at[0, "lambdas"]
    assert scores(table.iloc[1])["fd_pixel"] == direct(gmm, data, fitted)["fd_pixel"]


def test_index_matching_drops_impossible_solvers_and_ends_with_the_bases(gmm, data):
    table = studies.index_matching(gmm, data, ["ddim", "heun"], 4, seed=1000)  # heun cannot make 4
    assert list(table["solver"]) == ["ddim"] * 3
    assert list(table["targets"]) == ["time-matched", "index-matched", "none (base)"]
    assert not isinstance(table.at[2, "lambdas"], list)  # NaN: the base has no lambdas
    assert scores(table.iloc[2].drop("lambdas")) == {"solver": "ddim", "targets": "none (base)",
                                                     **direct(gmm, data, "ddim", 4)}
    index = dode.distill(gmm, "ddim", 4, teacher=dode.Teacher(gmm, substeps=10, match="index"), guard=False)
    assert table.at[1, "lambdas"] == [round(v, 3) for v in index.lambdas]


def test_generalisation_is_teacher_distances_on_both_batches(gmm):
    table = studies.generalisation(gmm, "ddim", NFE, seed=1000)
    assert list(table.columns) == ["evaluation", "sigma", "rmse_teacher", "seeds", "variant"]
    assert len(table) == 4 * NFE
    heldout = dode.Teacher(gmm, batch_size=100, seed=1000, substeps=10)
    expected = teacher_distances(gmm, "ddim", NFE, heldout)
    got = table[(table.seeds == "held out (1000-1099)") & (table.variant == "base")]
    np.testing.assert_array_equal(got["rmse_teacher"].to_numpy(), expected["rmse_teacher"].to_numpy())
    final = table[table.evaluation == NFE].set_index(["seeds", "variant"])["rmse_teacher"]
    assert final["fitting batch (0-99)", "dode"] < final["fitting batch (0-99)", "base"]


def test_refinement_rows_modes_and_fit_errors(gmm, data):
    table, fits = studies.refinement(gmm, data, ["ddim", "pndm"], NFE, refine_teacher=10)
    ddim, pndm = table[table.solver == "ddim"], table[table.solver == "pndm"]
    assert list(ddim["fit"]) == ["greedy", "joint", "timesteps", "joint+timesteps", "none (base)"]
    assert list(pndm["fit"]) == ["greedy", "joint", "none (base)"]  # pndm takes no grid
    assert set(fits) == {("ddim", f) for f in ddim["fit"][:-1]} | {("pndm", f) for f in pndm["fit"][:-1]}
    teacher = dode.Teacher(gmm, batch_size=100, seed=0, substeps=10)
    greedy = dode.distill(gmm, "ddim", NFE, teacher=teacher, guard=False)
    row = ddim.set_index("fit").loc["greedy"]
    assert row["lambdas"] == [round(v, 3) for v in greedy.lambdas] and row["iterations"] == 0
    assert row["fit_rmse_teacher"] == fitting_rmse(gmm, greedy, teacher)
    joint = refine_fit(gmm, distillation(gmm, "ddim", NFE, teacher=teacher, guard=False), teacher,
                       "joint").scheduler  # unguarded, from the same greedy fit
    assert ddim.set_index("fit").loc["joint", "lambdas"] == [round(v, 3) for v in joint.lambdas]
    errors = ddim.set_index("fit")["fit_rmse_reference"]
    assert errors["joint+timesteps"] <= errors["greedy"]  # it fits the batch's reference solution
    reference = dode.sample(gmm, dode.REFERENCE.solver, dode.REFERENCE.steps, 100, seed=0,
                            spacing=dode.REFERENCE.spacing, progress=False)  # the same, another way
    fitted = fits["ddim", "joint+timesteps"]
    assert errors["joint+timesteps"] == pytest.approx(
        float(torch.sqrt(torch.mean((dode.sample(gmm, fitted, NFE, 100, seed=0, progress=False).double()
                                     - reference.double()) ** 2))), rel=1e-5)
    assert ddim.set_index("fit").loc["timesteps", "lambdas"] == [0.0] * NFE  # the grid alone
    assert ddim.set_index("fit").loc["timesteps", "grid"] != ddim.set_index("fit").loc["greedy", "grid"]
    base = table[table.fit == "none (base)"].set_index("solver")
    assert base.at["pndm", "fd_pixel"] == direct(gmm, data, "pndm")["fd_pixel"]


def test_seed_spread_refits_on_each_batch_and_its_summary(gmm, data, validation):
    table = studies.seed_spread(gmm, data, ["pndm", "ddim"], NFE, [0, 100], learned_starts=1, learned_iterations=2)
    assert list(table.columns) == ["solver", "fit_seed", "variant", "fd_pixel", "rmse_exact", "total_variance",
                                   "sample_seconds", "kept", "fit_seconds"]
    assert list(table[["solver", "fit_seed", "variant"]].itertuples(index=False, name=None)) == [
        ("ddim", 0, "dode-auto"), ("ddim", 0, "dode-learned"), ("ddim", 100, "dode-auto"),
        ("ddim", 100, "dode-learned")]
    auto = dode.distill(gmm, "ddim", NFE, spacing="auto", teacher=dode.Teacher(gmm, batch_size=100, seed=100, substeps=10),
                        validation=validation, progress=False)
    assert scores(table.iloc[2].drop(["kept"])) == {"solver": "ddim", "fit_seed": 100, "variant": "dode-auto",
                                                    **direct(gmm, data, auto)}
    assert table.iloc[0]["kept"] is None and isinstance(table.iloc[1]["kept"], (bool, np.bool_))
    summary = studies.seed_summary(table)
    fd = table.groupby(["solver", "variant"])["fd_pixel"]
    for (solver, variant), values in fd:
        lo, hi, mid = values.min(), values.max(), float(np.median(values))
        assert summary.loc[(solver, variant)].tolist() == pytest.approx([mid, lo, hi, (hi - lo) / mid])


def test_evaluate_grid_with_data_matches_the_direct_calls(gmm, data):
    table = evaluate_grid(gmm, data, solvers=["ddim", "heun"], nfes=[NFE, 4], progress=False)  # no heun at 4
    assert list(table[["solver", "nfe", "variant"]].itertuples(index=False, name=None)) == [
        ("ddim", 3, "base"), ("ddim", 3, "dode"), ("ddim", 4, "base"), ("ddim", 4, "dode"), ("heun", 3, "base"),
        ("heun", 3, "dode")]
    teacher = dode.Teacher(gmm, batch_size=100, seed=0, substeps=10)
    fitted = dode.distill(gmm, "heun", NFE, teacher=teacher, guard=False)
    row = table.iloc[5]
    assert row["lambdas"] == json.dumps([round(v, 6) for v in fitted.lambdas])
    assert row["fit_rmse_teacher"] == fitting_rmse(gmm, fitted, teacher)
    assert {k: row[k] for k in ("fd_pixel", "rmse_exact", "total_variance")} == direct(gmm, data, fitted)
    assert {k: table.iloc[4][k] for k in ("fd_pixel", "rmse_exact", "total_variance")} == direct(gmm, data, "heun")


def test_evaluate_grid_fid_mode_decodes_scores_keeps_samples_and_saves(gmm, data, validation, tmp_path):
    reference = data.reference[:200]
    decoded = []

    def decode(x):  # a stand-in autoencoder: any map from samples to images
        decoded.append(len(x))
        return x.clamp(-1, 1)

    samples = {}
    table = evaluate_grid(gmm, solvers=["ddim"], nfes=[NFE], num_samples=30, batch_size=10, reference=reference,
                          fid_features="pixel", decode=decode, guard=True, validation=validation, samples=samples,
                          keep=4, save_dir=tmp_path, progress=False)
    assert list(table.columns) == ["solver", "variant", "nfe", "fid", "sample_seconds", "fid_seconds", "fit_seconds",
                                   "lambdas"]
    assert decoded == [30, 30] and set(samples) == {("ddim", NFE, "base"), ("ddim", NFE, "dode")}
    fitted = dode.distill(gmm, "ddim", NFE, validation=validation, progress=False)  # the guarded fit
    assert json.loads(table.at[1, "lambdas"]) == fitted.lambdas and table.at[0, "lambdas"] == ""
    assert table.at[0, "fit_seconds"] == 0.0 < table.at[1, "fit_seconds"]
    for i, scheduler in enumerate(("ddim", fitted)):
        images = dode.sample(gmm, scheduler, NFE, 30, seed=1000, progress=False).clamp(-1, 1)
        assert table.at[i, "fid"] == frechet_distance(images, reference, features="pixel")
        assert torch.equal(samples["ddim", NFE, table.at[i, "variant"]], images[:4])
    assert DODEScheduler.from_pretrained(tmp_path / f"ddim-nfe{NFE}").lambdas == fitted.lambdas  # saved
    no_reference = evaluate_grid(gmm, solvers=["ddim"], nfes=[NFE], num_samples=10, teacher="fine", progress=False)
    assert no_reference["fid"].isna().all() and list(no_reference["variant"]) == ["base", "dode"]
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_grid(gmm, solvers=["ddim"], nfes=[NFE])
