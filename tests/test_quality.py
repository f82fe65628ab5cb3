"""The claim of the method on the exact testbed: at NFE 5, D-ODE samples are better than the base solver's."""
import pytest

import dode

NFE = 5


@pytest.fixture(scope="module")
def data(gmm):
    return {
        "reference": gmm.sample_data(10_000, seed=10_000),
        "exact": dode.solve_ode(gmm, 500, seed=1000, progress=False),
    }


@pytest.fixture(scope="module")
def fitted(gmm, validation):
    """distill's defaults (the paper's spacing, the guard on the default validation seeds), one fit per solver."""
    fits = {}

    def fit(solver):
        if solver not in fits:
            fits[solver] = dode.distill(gmm, solver, NFE, validation=validation)
        return fits[solver]

    return fit


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_dode_lowers_the_frechet_distance_to_the_mixture(gmm, data, fitted, solver):
    base = dode.sample(gmm, solver, NFE, 2000, seed=1000, progress=False)
    distilled = dode.sample(gmm, fitted(solver), NFE, 2000, seed=1000, progress=False)
    fd_base = dode.frechet_distance(base, data["reference"])
    fd_dode = dode.frechet_distance(distilled, data["reference"])
    assert fd_dode < fd_base, (fd_dode, fd_base)


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_dode_moves_samples_closer_to_the_exact_ode_solution(gmm, data, fitted, solver):
    base = dode.sample(gmm, solver, NFE, 500, seed=1000, progress=False)
    distilled = dode.sample(gmm, fitted(solver), NFE, 500, seed=1000, progress=False)
    assert dode.rmse(distilled, data["exact"]) < dode.rmse(base, data["exact"])
