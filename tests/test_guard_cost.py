"""The guard at the paper's price: a cheap validation reference, computed once per process and model, shared first
evaluations, the cost in fit_info, and the sanity warning (issue 24; docs/grids-and-guard.md)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import dode
from dode.core import reference as reference_module
from dode.core.distill import VALIDATION_SEED
from dode.core.guard import LAMBDA_BOUND, RANGE_BOUND, FitWarning, Judge, insanity
from dode.core.reference import Reference, fingerprint, reference_solution
from dode.core.sampling import count_evaluations

ROOT = Path(__file__).resolve().parents[1]
NFE = 5


def test_the_meter_counts_what_the_model_sees(gmm, wrap):
    """count_evaluations against an independent count (a wrapper counting its forward calls and their rows)."""
    model = wrap(gmm)
    rows = []
    model.alter = lambda out, call: rows.append(len(out)) or out
    with count_evaluations(model) as meter:
        dode.distill(model, "ddim", NFE, guard=False, batch_size=20, progress=False)
    assert meter.calls == model.calls > 0
    assert meter.sample_evaluations == sum(rows) == 20 * meter.calls


def test_a_second_call_runs_no_reference(gmm, wrap):
    """The second distill on the same model (by content, not by object) spends exactly the reference's evaluations
    less, and says the reference was shared."""
    reference_module.clear_cache()
    first_model, second_model = wrap(gmm), wrap(gmm)  # two objects, one content
    first = dode.distill(first_model, "ddim", NFE, progress=False).fit_info["cost"]
    second = dode.distill(second_model, "ddim", NFE, progress=False).fit_info["cost"]
    reference_nfe = dode.REFERENCE.steps
    assert first["sample_evaluations"]["reference"] == 100 * reference_nfe
    assert second["sample_evaluations"]["reference"] == 0 and second["reference_shared"]
    assert first_model.calls * 100 == first["sample_evaluations"]["total"]
    assert (first_model.calls - second_model.calls) == reference_nfe
    assert second_model.calls * 100 == second["sample_evaluations"]["total"]


def test_a_model_changed_in_place_gets_a_new_reference(gmm):
    model = dode.load_model("gmm-digits", device="cpu")
    before = fingerprint(model)
    solution = reference_solution(model, VALIDATION_SEED, 10, progress=False)
    assert reference_solution(model, VALIDATION_SEED, 10, progress=False).shared
    with torch.no_grad():
        model.means.add_(0.01)  # every component moves a little
    assert fingerprint(model) != before
    again = reference_solution(model, VALIDATION_SEED, 10, progress=False)
    assert not again.shared and again.sample_evaluations == 10 * dode.REFERENCE.steps
    assert not torch.equal(again.samples, solution.samples)


def test_the_default_reference_is_closer_to_the_exact_ode_than_any_student(gmm):
    """On gmm-digits the ODE is known (an adaptive solver on the exact denoiser). The default reference (30
    evaluations) is closer to it than DDIM with 100 steps, and within 0.01 RMS, below what the best NFE-10 students
    reach (0.013 and up, results/gmm-digits/results.csv); the 1000-step DDIM reference is within 0.005."""
    seeds = 30
    exact = dode.solve_ode(gmm, seeds, seed=VALIDATION_SEED, progress=False)
    cheap = reference_solution(gmm, VALIDATION_SEED, seeds, progress=False).samples
    fine = reference_solution(gmm, VALIDATION_SEED, seeds, Reference("fine"), progress=False).samples
    ddim = dode.sample(gmm, "ddim", 100, seeds, seed=VALIDATION_SEED, spacing="trailing", progress=False)
    assert dode.rmse(cheap, exact) < min(0.01, dode.rmse(ddim, exact))
    assert dode.rmse(fine, exact) < 0.005


def test_shared_first_evaluations_change_no_score(gmm):
    """The judge remembers the first two evaluations of each run; its scores equal an independent computation
    (sampling the model itself, the criterion against the reference), and each later run costs NFE - 2."""
    validation = dode.Teacher(gmm, batch_size=40, seed=VALIDATION_SEED, substeps="fine")
    fitted = dode.distill(gmm, "deis", NFE, batch_size=20, guard=False, progress=False)
    judge = Judge(gmm, validation, "rmse", torch.device("cpu"), progress=False)
    factors = (0.0, 1.0, 0.5)
    scores = [judge(fitted, f) for f in factors]
    reference = reference_solution(gmm, VALIDATION_SEED, 40, progress=False).samples
    for factor, score in zip(factors, scores):
        scaled = dode.DODEScheduler(fitted.base_scheduler, [factor * v for v in fitted.lambdas],
                                    fitted.num_inference_steps, spacing=fitted.spacing)
        x = dode.sample(gmm, scaled, NFE, 40, seed=VALIDATION_SEED, progress=False)
        assert score == dode.rmse(x, reference)
    assert judge.sample_evaluations == 40 * (NFE + (len(factors) - 1) * (NFE - 2))


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_the_default_guard_costs_at_most_the_fit_again(gmm, solver, validation):
    """The cost target in model evaluations (machine-independent), with the reference shared: the default distill
    costs at most 2x the paper's fit (guard=False); fit_info's count agrees with the meter."""
    reference_solution(gmm, VALIDATION_SEED, 100, progress=False)  # the process has it
    with count_evaluations(gmm) as plain:
        dode.distill(gmm, solver, NFE, guard=False, progress=False)
    with count_evaluations(gmm) as guarded:
        fitted = dode.distill(gmm, solver, NFE, validation=validation, progress=False)
    cost = fitted.fit_info["cost"]["sample_evaluations"]
    assert cost["total"] == guarded.sample_evaluations and cost["fit"] == plain.sample_evaluations
    assert guarded.sample_evaluations <= 2 * plain.sample_evaluations


def test_fit_info_records_the_reference_and_the_cost(gmm, validation):
    fitted = dode.distill(gmm, "ddim", NFE, validation=validation, reference=Reference("ipndm", "trailing", 30),
                          progress=False)
    info = fitted.fit_info
    assert info["validation"]["reference"] == {"solver": "ipndm", "spacing": "trailing", "nfe": 30}
    parts = info["cost"]["sample_evaluations"]
    assert parts["total"] == parts["fit"] + parts["reference"] + parts["validation"]
    assert info["cost"]["relative_to_fit"] == pytest.approx(parts["total"] / parts["fit"])
    assert json.loads(fitted.to_json_string())["fit_info"]["cost"] == json.loads(json.dumps(info["cost"]))


def test_a_refinement_adds_its_cost(gmm, validation):
    """fit_info's cost with refine: the distillation's parts plus the refinement's, which the meter counts too."""
    with count_evaluations(gmm) as meter:
        fitted = dode.distill(gmm, "ddim", 4, batch_size=16, teacher=4, validation=validation, refine="joint",
                              refine_iterations=3, progress=False)
    cost = fitted.fit_info["cost"]["sample_evaluations"]
    assert cost["refine"] == fitted.fit_info["refine"]["sample_evaluations"] > 0
    assert cost["total"] == cost["fit"] + cost["reference"] + cost["validation"] + cost["refine"]
    assert cost["total"] == meter.sample_evaluations


def test_a_reference_must_start_from_pure_noise(gmm):
    with pytest.raises(ValueError, match="first training noise level"):
        reference_solution(gmm, VALIDATION_SEED, 4, Reference("ipndm", "leading", 20), progress=False)
    with pytest.raises(ValueError, match="spacing"):
        Reference("ipndm", "sideways", 20)
    with pytest.raises(ValueError, match="dode.Reference"):
        reference_solution(gmm, VALIDATION_SEED, 4, ("ipndm", 20), progress=False)


class _Exploding(torch.nn.Module):
    """gmm-digits' eps times 1 + amplitude * sin(t / 10): an output that swings with the timestep, which a few
    student steps cannot follow. Measured on DDIM at NFE 5 (leading): amplitude 10 sends the fitted samples to 47x
    the teacher's largest |x| with small lambdas, amplitude 50 fits |lambda| of 1e8, amplitude 0.5 fits lambdas
    below 30 and samples within the teacher's range."""

    def __init__(self, model, amplitude: float):
        super().__init__()
        self.model, self.amplitude = model, amplitude
        self.sample_shape, self.scheduler_config = model.sample_shape, model.scheduler_config

    def forward(self, x, t):
        swing = 1 + self.amplitude * torch.sin(torch.as_tensor(t, dtype=torch.float64) / 10)
        return self.model(x, t) * swing.float()


def _fit_warnings(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = dode.distill(model, "ddim", NFE, batch_size=20, progress=False, **options)
    return fitted, [str(w.message) for w in caught if issubclass(w.category, FitWarning)]


def test_samples_far_outside_the_teachers_warn_once_and_the_guard_says_so(gmm):
    fitted, caught = _fit_warnings(_Exploding(gmm, 10.0))
    assert len(caught) == 1 and "suspicious fit" in caught[0] and "final samples" in caught[0]
    assert fitted.fit_info["warning"] and "suspicious fit" in fitted.fit_info["validation"]["decision"]


def test_a_huge_lambda_warns_once(gmm):
    fitted, caught = _fit_warnings(_Exploding(gmm, 50.0), guard=False)
    assert len(caught) == 1 and "|lambda|" in caught[0] and "final samples" not in caught[0]
    assert max(abs(v) for v in fitted.lambdas) > LAMBDA_BOUND and fitted.fit_info["warning"] == caught[0].split(
        "): ", 1)[1].split("; the guard", 1)[0]


def test_no_warning_on_a_milder_swing_or_the_embedded_model(gmm, validation):
    """The other side: the same construction with a swing the fit can follow, and the embedded model's fit with
    the largest |lambda| of the committed ones (Heun at NFE 3)."""
    milder, caught = _fit_warnings(_Exploding(gmm, 0.5), guard=False)
    assert not caught and milder.fit_info["warning"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)
        fitted = dode.distill(gmm, "heun", 3, validation=validation, progress=False)
    assert fitted.fit_info["warning"] is None


def test_insanity_on_both_sides_of_each_bound():
    class Fit:
        def __init__(self, lam, reach):
            self.lambdas, self.sample_range, self.teacher_range = [0.0, lam], reach, 1.0

    assert insanity(Fit(LAMBDA_BOUND * 0.99, RANGE_BOUND * 0.99)) is None
    assert "lambda" in insanity(Fit(-LAMBDA_BOUND * 1.01, 1.0))
    assert "|x|" in insanity(Fit(1.0, RANGE_BOUND * 1.01))
    assert insanity(Fit(1.0, float("nan"))) is not None


def test_no_committed_fit_is_flagged():
    """Every scheduler make reproduce saved: no warning recorded, lambdas within the bound (the range is checked
    where the fit ran: its fit_info's warning)."""
    configs = sorted(ROOT.glob("results/*/schedulers/*/scheduler_config.json"))
    assert configs
    for path in configs:
        config = json.loads(path.read_text())
        info = config.get("fit_info") or {}
        assert info.get("warning") is None, path
        assert max(abs(v) for v in [*config["lambdas"], *info.get("greedy_lambdas", [])]) <= LAMBDA_BOUND, path


def test_the_default_reference_is_the_one_the_study_chose():
    """dode.REFERENCE is what results/guard_reference/decisions.csv (make guard-reference) picks: the cheapest
    reference that makes at least 95 % of the guard's decisions as the 1000-step one on both embedded models."""
    import pandas as pd

    from dode.tools.guard_reference import AGREEMENT, agreement, chosen

    decisions = pd.read_csv(ROOT / "results/guard_reference/decisions.csv")
    summary = agreement(decisions)
    assert set(summary.model) == {"gmm-digits", "unet-digits"} and AGREEMENT == 0.95
    assert chosen(summary) == dode.REFERENCE.label
    assert f"**Chosen: {dode.REFERENCE.label}**" in (ROOT / "results/guard_reference.md").read_text()
