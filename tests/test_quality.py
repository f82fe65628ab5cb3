"""The claim of the method on the exact testbed: at NFE 5, D-ODE samples are better than the base solver's."""
import pytest

import dode

NFE = 5
PNDM_FD = pytest.mark.xfail(strict=True, reason=(
    "measured: greedy D-PNDM follows the exact ODE more closely (lower RMSE, test below) but shrinks the sample "
    "variance (total variance 15.4 against 19.5 for the exact ODE at 2000 samples), and base PLMS at NFE 5 is "
    "already close in distribution (pixel FD 0.52), so the pixel FD rises; see README, 'Known results'"))


@pytest.fixture(scope="module")
def data(gmm):
    return {
        "reference": gmm.sample_data(10_000, seed=10_000),
        "exact": dode.solve_ode(gmm, 500, seed=1000, progress=False),
    }


@pytest.mark.parametrize("solver", [pytest.param(s, marks=PNDM_FD) if s == "pndm" else s for s in dode.SOLVERS])
def test_dode_lowers_the_frechet_distance_to_the_mixture(gmm, data, solver):
    fitted = dode.distill(gmm, solver, NFE)
    base = dode.sample(gmm, solver, NFE, 2000, seed=1000, progress=False)
    distilled = dode.sample(gmm, fitted, NFE, 2000, seed=1000, progress=False)
    fd_base = dode.frechet_distance(base, data["reference"])
    fd_dode = dode.frechet_distance(distilled, data["reference"])
    assert fd_dode < fd_base, (fd_dode, fd_base)


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_dode_moves_samples_closer_to_the_exact_ode_solution(gmm, data, solver):
    fitted = dode.distill(gmm, solver, NFE)
    base = dode.sample(gmm, solver, NFE, 500, seed=1000, progress=False)
    distilled = dode.sample(gmm, fitted, NFE, 500, seed=1000, progress=False)
    assert dode.rmse(distilled, data["exact"]) < dode.rmse(base, data["exact"])
