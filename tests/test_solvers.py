"""The base solvers: NFE accounting and the noise level of every state they return."""
import numpy as np
import pytest
import torch

import dode
from dode.core.solvers import get_solver
from dode.experiments.checks import possible


def valid_nfes(solver, nfes=range(1, 11)):
    return [nfe for nfe in nfes if possible(solver, nfe)]


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_each_solver_makes_exactly_the_requested_number_of_model_evaluations(gmm, wrap, solver):
    nfes = valid_nfes(solver)
    assert len(nfes) >= 4
    for nfe in nfes:
        counting = wrap(gmm)
        dode.sample(counting, solver, nfe, 4, progress=False)
        assert counting.calls == nfe, (solver, nfe)


def test_nfe_rules_match_the_design():
    assert get_solver("heun").steps_for(5) == 3  # 2n - 1
    assert get_solver("pndm").steps_for(5) == 4  # n + 1, the PLMS warm-up repeats a timestep
    assert get_solver("ddim").steps_for(5) == 5
    assert valid_nfes("heun") == [1, 3, 5, 7, 9]
    assert valid_nfes("pndm") == [3, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("solver, nfe, words", [("heun", 4, "possible NFE: 1, 3, 5"), ("pndm", 2, "at least 3"),
                                                ("ddim", 0, "at least 1")])
def test_impossible_nfe_is_a_clear_error(gmm, solver, nfe, words):
    with pytest.raises(ValueError, match=words):
        dode.sample(gmm, solver, nfe, 2, progress=False)
    with pytest.raises(ValueError, match=words):
        dode.distill(gmm, solver, nfe, batch_size=2)


def test_unknown_solver_lists_the_valid_ones(gmm):
    for call in (lambda: dode.make_scheduler("euler-maruyama", gmm), lambda: dode.sample(gmm, "rk4", 5, 2),
                 lambda: dode.distill(gmm, "rk4", 5)):
        with pytest.raises(ValueError, match="valid solvers: ddim, pndm, ipndm, dpm_solver_2"):
            call()


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_state_noise_levels_match_the_exact_gaussian_ode(gaussian, solver):
    """Each recorded state sits where the exact ODE, started from the previous state, puts it (the paper's spacing;
    every spacing: test_spacing.py).

    On a Gaussian the probability-flow ODE has a closed form. With 40 steps, one solver step from state k-1
    lands close to the exact flow to the noise level we attach to state k, and much farther from the exact
    flow to either neighbouring level, which an off-by-one in the labels would attach (checked where the
    solvers are accurate, sigma >= 1; the last state is the returned sample: clean, but DEIS's, which diffusers
    leaves at the smallest training noise level).
    """
    nfe = 41 if solver == "heun" else 40
    samples, traj = dode.sample(gaussian.model, solver, nfe, 16, seed=3, return_trajectory=True, progress=False)
    assert traj.states.shape == (nfe + 1, 16, *gaussian.shape) and len(traj.sigmas) == nfe + 1
    sigma_min = float(dode.models.registry.training_sigmas(gaussian.model.scheduler_config)[0])
    assert float(traj.sigmas[-1]) == (pytest.approx(sigma_min, rel=1e-6) if solver == "deis" else 0)
    assert torch.equal(traj.states[-1], samples)
    assert np.all(np.diff(traj.sigmas.numpy()) <= 0)
    sig = traj.sigmas.tolist()

    def distance_to_flow(k, sigma):
        exact = gaussian.ddpm_state(traj.states[k - 1], 1.0, sig[k - 1], sigma).float()
        return (traj.states[k] - exact).abs().max().item()

    checked = 0
    for k in range(1, nfe):
        if sig[k] < 1:
            break
        wrong = [s for s in (sig[k - 1], sig[k + 1]) if s != sig[k]]
        assert distance_to_flow(k, sig[k]) < 0.25 * min(distance_to_flow(k, s) for s in wrong), (k, sig[k])
        checked += 1
    # every state above sigma = 1: most of them on uniform timesteps, half on log-uniform levels (DPM-Solver's)
    assert checked >= (20 if solver.startswith("dpm_solver") else 25)
