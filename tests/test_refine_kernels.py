"""scripts/refine_kernels.py: --perturb (another kernel's last bits, emulated at a chosen size), --set, --patch."""
import importlib.util

import pytest
import torch

import dode
from dode.tools import reproduce

SPEC = importlib.util.spec_from_file_location("refine_kernels", reproduce.ROOT / "scripts" / "refine_kernels.py")
refine_kernels = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(refine_kernels)


def test_a_perturbed_model_moves_each_output_by_at_most_half_the_width_and_keeps_the_gradient():
    plain, nudged = dode.load_model("gmm-digits"), refine_kernels.perturbed(dode.load_model("gmm-digits"), 1e-9)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    t = torch.tensor(500.0)
    a, b = plain(x, t), nudged(x, t)
    moved = (b - a).abs()
    assert 0 < moved.max() <= 0.5e-9 * a.abs().max() and (moved > 0).float().mean() > 0.9
    assert torch.equal(b - a, nudged(x, t) - a)  # the same pattern every call: a fixed kernel, not noise
    grad_a, = torch.autograd.grad(a.sum(), x)
    grad_b, = torch.autograd.grad(b.sum(), x)
    assert torch.equal(grad_a, grad_b)


def test_a_perturbation_must_have_a_width(capsys):
    with pytest.raises(SystemExit):
        refine_kernels.main(["--perturb", "0"])
    assert "--perturb must be a width > 0" in capsys.readouterr().err


def test_distill_keywords_reach_the_fit_and_held_out_seeds_score_it():
    """--set's keywords go to distill (the optimizer the fit reports is the one asked for), and --heldout scores
    the fit as notebook 02's table does: the same number as sampling its scheduler on those seeds and taking the
    Frechet distance to the data by hand."""
    from dode.evaluation.metrics import feature_statistics, frechet_distance

    options = {"batch_size": 16, "refine_iterations": 3, "refine_starts": 1, "refine_optimizer": "rprop"}
    row, = refine_kernels.fit(["unipc:3"], "float64", "gmm-digits", options, heldout=64)
    assert row["optimizer"] == "rprop" and len(row["grid"]) == 3
    model = dode.load_model("gmm-digits")
    scheduler = dode.DODEScheduler(dode.make_scheduler("unipc", model), row["lambdas"], 3, grid=row["grid"])
    x = dode.sample(model, scheduler, 3, 64, seed=1000, progress=False)
    reference = feature_statistics(model.sample_data(10_000, seed=10**6), "pixel")
    assert row["heldout"] == pytest.approx(frechet_distance(x, reference, features="pixel"), rel=1e-9)


def test_set_takes_python_literals(capsys):
    with pytest.raises(SystemExit):
        refine_kernels.main(["--set", "refine_optimizer=rprop"])  # a bare word is no literal
    assert "--set and --patch take KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        refine_kernels.main(["--heldout", "1"])
    assert "--heldout needs at least 2" in capsys.readouterr().err


def test_patch_sets_refines_constants_for_the_fit_and_puts_them_back():
    """--patch's constants reach the optimiser (Rprop's first step 2^-2 instead of 2^-5 ends elsewhere) and are
    restored after the fit, and after an error inside."""
    from dode.core import refine

    default = refine.RPROP_STEP
    options = {"batch_size": 16, "refine_iterations": 3, "refine_starts": 1}
    plain, = refine_kernels.fit(["unipc:3"], "float64", "gmm-digits", options)
    stepped, = refine_kernels.fit(["unipc:3"], "float64", "gmm-digits", options, patches={"RPROP_STEP": 0.25})
    assert refine.RPROP_STEP == default == 2.0 ** -5
    assert stepped["grid"] != plain["grid"] and stepped["lambdas"] != plain["lambdas"]
    again, = refine_kernels.fit(["unipc:3"], "float64", "gmm-digits", options, patches={"RPROP_STEP": default})
    assert (again["grid"], again["lambdas"]) == (plain["grid"], plain["lambdas"])
    with pytest.raises(RuntimeError), refine_kernels.patched({"RPROP_STEP": 0.5, "PATIENCE": 2}):
        assert (refine.RPROP_STEP, refine.PATIENCE) == (0.5, 2)
        raise RuntimeError
    assert (refine.RPROP_STEP, refine.PATIENCE) == (default, 5)


@pytest.mark.parametrize("argv, message", [
    (["--patch", "rprop_step=0.25"], "constants of dode.core.refine"),
    (["--patch", "NO_SUCH_CONSTANT=1"], "constants of dode.core.refine"),
    (["--patch", "RPROP_STEP=quarter"], "--set and --patch take KEY=VALUE"),
    (["--single", "--perturb", "1e-6"], "no second one to --perturb")])
def test_bad_patches_and_a_single_process_perturbation_are_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        refine_kernels.main(argv)
    assert message in capsys.readouterr().err
