"""Spacing as a first-class choice (dode/grids.py, solvers.py, distill.py): every solver on every spacing diffusers
supports for it, explicit grids, distill's guard and ``spacing="auto"``, each against an independent computation (the
closed-form Gaussian ODE, diffusers' own loop, the fit and the criterion recomputed through ``dode.sample``)."""
import json
import re

import numpy as np
import pytest
import torch

import dode
from dode.core.distill import VALIDATION_SEED, shared_grids
from dode.core.timegrid import TimeGrid
from dode.models.registry import training_sigmas
from dode.core.sampling import integrate, seeded_noise
from dode.core.scheduler import grid_scheduler, make_scheduler
from dode.core.solvers import GRID_SOLVERS, set_grid, spacing_of
from dode.core.reference import reference_solution

# What diffusers 0.42 lets each scheduler choose (docs/design.md, "What diffusers does that the code relies on"),
# written out here rather than read back.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas",
               "lu": "use_lu_lambdas"}
SUPPORTED = {
    "ddim": TIMESTEP_SPACINGS,
    "pndm": TIMESTEP_SPACINGS,
    # dode's iPNDM takes its grid from EulerDiscreteScheduler: every timestep and sigma spacing of Euler
    "ipndm": (*TIMESTEP_SPACINGS, "karras", "exponential", "beta"),
    "dpm_solver_2": ("linspace", "karras", "exponential", "beta"),  # no timestep_spacing: its own linspace
    "dpm_solver_pp_2m": (*TIMESTEP_SPACINGS, "karras", "exponential", "beta", "lu"),
    "deis": (*TIMESTEP_SPACINGS, "karras", "exponential", "beta"),
    # Heun derives its sigma range from its timesteps: each sigma spacing also over leading and trailing timesteps
    "heun": (*TIMESTEP_SPACINGS, "karras", "exponential", "beta", "karras+leading", "karras+trailing",
             "exponential+leading", "exponential+trailing", "beta+leading", "beta+trailing"),
    "unipc": (*TIMESTEP_SPACINGS, "karras", "exponential", "beta"),
}
PAPER = {"ddim": "leading", "pndm": "leading", "ipndm": "leading", "dpm_solver_2": "exponential", "dpm_solver_pp_2m": "lu",
         "deis": "linspace", "heun": "karras", "unipc": "trailing"}
PAIRS = [(solver, spacing) for solver in dode.SOLVERS for spacing in SUPPORTED[solver]]
NFE = 5  # possible for every solver (Heun: 3 steps, PLMS: 4)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see the repository's conftest.py


def grid_of(solver, model, spacing, nfe):
    scheduler = make_scheduler(solver, model, spacing)
    scheduler.set_timesteps(dode.get_solver(solver).steps_for(nfe))
    return scheduler, TimeGrid.of(scheduler)


def sigma_min(model):
    return float(training_sigmas(model.scheduler_config)[0])


# ---------------------------------------------------------------------------------------------------------------
# the spacings themselves
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_each_solver_offers_exactly_the_spacings_diffusers_has_and_defaults_to_the_papers(solver):
    info = dode.get_solver(solver)
    assert tuple(info.spacings) == SUPPORTED[solver]
    assert info.default_spacing == PAPER[solver]
    # diffusers ignores an unknown option with only a logged warning: every setting must be one its class takes
    accepted = set(info.scheduler_class.from_config({}).config)
    for settings in info.spacings.values():
        assert set(settings) <= accepted, (solver, set(settings) - accepted)


@pytest.mark.parametrize("solver, spacing", PAIRS)
def test_a_spacing_sets_its_diffusers_flag_and_only_that_one(gmm, solver, spacing):
    config = make_scheduler(solver, gmm, spacing).config
    sigmas, _, timesteps = spacing.partition("+")  # Heun's "karras+leading": both options
    for name, flag in SIGMA_FLAGS.items():
        if flag in config:
            assert config[flag] is (name == sigmas), (flag, config[flag])
    assert sigmas not in SIGMA_FLAGS or SIGMA_FLAGS[sigmas] in config
    if spacing in TIMESTEP_SPACINGS and solver != "dpm_solver_2":
        assert config["timestep_spacing"] == spacing
    if timesteps:
        assert config["timestep_spacing"] == timesteps
    assert "timestep_spacing" not in config or solver != "dpm_solver_2"
    assert spacing_of(make_scheduler(solver, gmm, spacing)) == spacing
    assert spacing_of(dode.DODEScheduler(make_scheduler(solver, gmm, spacing), [0.0] * NFE,
                                         dode.get_solver(solver).steps_for(NFE))) == spacing
    assert spacing_of(make_scheduler(solver, gmm)) == PAPER[solver]


@pytest.mark.parametrize("solver", dode.SOLVERS)
def test_every_spacing_really_moves_the_grid(gmm, solver):
    """At NFE 6 (Heun: 7) no two spacings of a solver give the same noise levels, with one exception diffusers
    makes by construction: DPM-Solver++'s logSNR-uniform grid ("lu", lambda = -log sigma) is the log-uniform
    ("exponential") one, equal up to float32 rounding; only its timesteps are rounded where the other's are cut."""
    nfe = 7 if solver == "heun" else 6
    grids = {spacing: grid_of(solver, gmm, spacing, nfe)[1] for spacing in SUPPORTED[solver]}
    for a in grids:
        for b in grids:
            if a >= b:
                continue
            if {a, b} == {"lu", "exponential"}:
                np.testing.assert_allclose(grids[a].states, grids[b].states, rtol=1e-6, atol=0)
                gap = np.abs(np.subtract(grids[a].timesteps, grids[b].timesteps))
                assert gap.max() == 1 and gap.min() == 0
            else:
                assert not np.allclose(grids[a].states, grids[b].states, rtol=1e-3, atol=0), (a, b)


def test_leading_ddim_starts_at_800_from_pure_noise_and_evaluates_last_at_0(gmm, wrap):
    """The paper's DDIM grid linspace(0, T, N + 1)[:N] at NFE 5: t = 800, 600, 400, 200, 0; then the clean state."""
    scheduler, grid = grid_of("ddim", gmm, None, 5)
    sigmas = training_sigmas(gmm.scheduler_config)
    assert grid.timesteps == (800, 600, 400, 200, 0)
    assert grid.start == pytest.approx(sigmas[800], rel=1e-12) and grid.initial_scale == 1.0
    np.testing.assert_allclose(grid.after, [*sigmas[[600, 400, 200, 0]], 0.0], rtol=1e-12)
    seen = []
    counting = wrap(gmm, alter=lambda out, call: out)
    original = counting.forward

    def forward(x, t):
        seen.append(float(t))
        return original(x, t)

    counting.forward = forward
    x, traj = dode.sample(counting, "ddim", 5, 4, seed=2, return_trajectory=True, progress=False)
    assert seen == [800.0, 600.0, 400.0, 200.0, 0.0]
    assert torch.equal(traj.states[0], seeded_noise(gmm.sample_shape, 4, 2))  # pure noise, unscaled, at t = 800


@pytest.mark.parametrize("solver", ["ddim", "pndm"])
def test_linspace_ddim_and_plms_step_to_t_minus_t_over_n_not_to_the_next_timestep(gaussian, solver):
    """diffusers' DDIM and PLMS step from t to t - T // n whatever the spacing put next; with "linspace" at NFE 6
    (5 PLMS steps) that is 999 -> 833 (DDIM) or 999 -> 799 (PLMS), while the next evaluation is at 799 or 749. The
    state after the first step lies on the exact ODE at the level TimeGrid reports, not at the next timestep's."""
    scheduler, grid = grid_of(solver, gaussian.model, "linspace", 6)
    sigmas = training_sigmas(gaussian.model.scheduler_config)
    step = 1000 // (6 if solver == "ddim" else 5)
    assert grid.timesteps[:2] == ((999, 799) if solver == "ddim" else (999, 749))
    assert grid.after[0] == pytest.approx(sigmas[999 - step], rel=1e-12)
    _, traj = dode.sample(gaussian.model, solver, 6, 16, seed=1, spacing="linspace", return_trajectory=True,
                          progress=False)

    def distance(sigma):
        exact = gaussian.ddpm_state(traj.states[0], 1.0, grid.start, sigma).float()
        return (traj.states[1] - exact).abs().max().item()

    assert distance(grid.after[0]) < 0.25 * distance(sigmas[grid.timesteps[1]])


# ---------------------------------------------------------------------------------------------------------------
# every solver x spacing: the states, the teacher's targets, lambda = 0
# ---------------------------------------------------------------------------------------------------------------
def final_level(model, solver, spacing, nfe):
    """The noise level of the returned sample, written out: DEIS lands on the smallest training level, DDIM and
    PLMS on the level of t - T // n from their last timestep t (clean below t = 0), the others on sigma = 0."""
    scheduler, _ = grid_of(solver, model, spacing, nfe)
    if solver == "deis":
        return sigma_min(model)
    if solver in ("ddim", "pndm"):
        last = int(scheduler.timesteps[-1]) - 1000 // scheduler.num_inference_steps
        return 0.0 if last < 0 else float(training_sigmas(model.scheduler_config)[last])
    return 0.0


def check_states_on_the_exact_ode(gaussian, solver, spacing, nfe, samples=16):
    """Each recorded state sits where the exact ODE, started from the previous state, puts it: much closer to the
    exact flow to the level TimeGrid attaches to it than to the flow to either neighbouring level (which an
    off-by-one in the labels would attach). Checked where the solvers are accurate (sigma >= 1, steps of at most
    30 % in sigma; Heun's second stage steps from the level above its own) and the neighbour's exact state is
    distinguishable (by 2e-3: at high noise DDPM-convention states barely move, and diffusers rounds the timesteps
    of Karras, exponential and beta levels, a ~1e-4 error on every step). Returns how many states were checked."""
    x, traj = dode.sample(gaussian.model, solver, nfe, samples, seed=3, spacing=spacing, return_trajectory=True,
                          progress=False)
    assert traj.states.shape == (nfe + 1, samples, *gaussian.shape) and len(traj.sigmas) == nfe + 1
    assert float(traj.sigmas[-1]) == pytest.approx(final_level(gaussian.model, solver, spacing, nfe), rel=1e-6)
    assert torch.equal(traj.states[-1], x)
    assert np.all(np.diff(traj.sigmas.numpy()) <= 0)
    sig = traj.sigmas.tolist()

    def exact(k, sigma):
        return gaussian.ddpm_state(traj.states[k - 1], 1.0, sig[k - 1], sigma).float()

    checked = 0
    for k in range(1, nfe):
        if sig[k] < 1:
            break
        above = min(s for s in sig[:k] if s > sig[k])  # the level this step started from
        if above > 1.3 * sig[k]:
            continue
        right = exact(k, sig[k])
        wrong = [exact(k, s) for s in (sig[k - 1], sig[k + 1]) if s != sig[k]]
        wrong = [w for w in wrong if (w - right).abs().max().item() > 2e-3]
        if not wrong:
            continue
        error = (traj.states[k] - right).abs().max().item()
        assert error < 0.25 * min((traj.states[k] - w).abs().max().item() for w in wrong), (k, sig[k])
        checked += 1
    return checked


@pytest.mark.parametrize("solver, spacing", PAIRS)
def test_state_noise_levels_match_the_exact_gaussian_ode_on_every_spacing(gaussian, solver, spacing):
    nfe = 81 if solver == "heun" else 40  # Heun: 41 steps, as many levels as the others
    checked = check_states_on_the_exact_ode(gaussian, solver, spacing, nfe)
    assert checked >= 5


@pytest.mark.parametrize("solver, spacing", PAIRS)
def test_teacher_targets_lie_on_the_exact_ode_at_the_students_levels_on_every_spacing(gaussian, solver, spacing):
    """The fine teacher's target k is close to the exact ODE state at the student's k-th level (from the student's
    own start and initial scale), much closer than the exact states at the neighbouring levels are to it."""
    teacher = dode.Teacher(gaussian.model, batch_size=16, seed=1, substeps="fine")
    scheduler, grid = grid_of(solver, gaussian.model, spacing, NFE)
    targets = teacher.targets(grid)
    # the start written out: the first sigma of the schedulers that hold them, else the first timestep's level
    sigmas = training_sigmas(gaussian.model.scheduler_config)
    start = float(scheduler.sigmas[0]) if dode.get_solver(solver).custom_grid else \
        float(sigmas[int(scheduler.timesteps[0])])
    assert grid.start == pytest.approx(start, rel=1e-6)
    x0 = teacher.noise * float(scheduler.init_noise_sigma)
    if solver == "heun":  # sigma space: x0 + sigma * noise
        x0 = x0 / np.sqrt(1 + start**2)

    def exact(s):
        return gaussian.ddpm_state(x0, 1.0, start, s).float()

    def dist(a, b):
        return (a - b).abs().max().item()

    levels = grid.states.tolist()
    compared = 0
    for k, sigma in enumerate(grid.after):
        error = dist(targets[k], exact(sigma))
        assert error < 0.02, (k, sigma, error)
        for s in (levels[k], levels[k + 2] if k + 2 < len(levels) else None):
            if s is not None and s != sigma and dist(exact(s), exact(sigma)) > 0.05:
                assert error < 0.1 * dist(exact(s), exact(sigma)), (k, sigma, s)
                compared += 1
    assert compared >= 2


@pytest.mark.parametrize("solver, spacing", PAIRS)
def test_zero_lambdas_reproduce_the_base_scheduler_bit_for_bit_on_every_spacing(gmm, solver, spacing):
    steps = dode.get_solver(solver).steps_for(NFE)
    base, base_traj = dode.sample(gmm, solver, NFE, 16, seed=7, spacing=spacing, return_trajectory=True,
                                  progress=False)
    zero = dode.DODEScheduler(make_scheduler(solver, gmm, spacing), [0.0] * NFE, steps)
    wrapped, wrapped_traj = dode.sample(gmm, zero, NFE, 16, seed=7, return_trajectory=True, progress=False)
    assert torch.equal(base, wrapped) and torch.equal(base_traj.states, wrapped_traj.states)
    assert torch.equal(base_traj.sigmas, wrapped_traj.sigmas)
    if spacing != PAPER[solver]:  # and the spacing is not a no-op
        assert not torch.equal(base, dode.sample(gmm, solver, NFE, 16, seed=7, progress=False))


# ---------------------------------------------------------------------------------------------------------------
# explicit grids
# ---------------------------------------------------------------------------------------------------------------
def custom_levels(steps):
    return list(np.geomspace(80.0, 0.05, steps))


@pytest.mark.parametrize("solver", [s for s in GRID_SOLVERS if dode.get_solver(s).custom_grid])
def test_an_explicit_grid_is_set_grid_on_the_same_levels(gmm, solver):
    steps = dode.get_solver(solver).steps_for(NFE)
    levels = custom_levels(steps)
    scheduler = grid_scheduler(solver, gmm, levels)
    assert isinstance(scheduler, dode.DODEScheduler)
    assert scheduler.nfe == NFE and scheduler.lambdas == [0.0] * NFE and scheduler.grid == levels
    noise = seeded_noise(gmm.sample_shape, 12, 5)
    by_hand = make_scheduler(solver, gmm)
    by_hand.set_timesteps(steps)
    set_grid(by_hand, levels)
    expected, expected_states = integrate(gmm, by_hand, None, noise, record=True)
    got, traj = dode.sample(gmm, solver, NFE, 12, seed=5, spacing=levels, return_trajectory=True, progress=False)
    assert torch.equal(got, expected) and torch.equal(traj.states, expected_states)
    np.testing.assert_allclose(TimeGrid.of(by_hand).steps, levels, rtol=1e-6)
    assert torch.equal(traj.sigmas, torch.from_numpy(TimeGrid.of(by_hand).states))


@pytest.mark.parametrize("solver", ["unipc", "heun", "dpm_solver_2"])
def test_distill_on_an_explicit_grid_is_the_sequential_least_squares_fit_on_set_grids_scheduler(gmm, solver):
    """The greedy fit recomputed by hand: diffusers' scheduler with set_grid, the corrected output written out,
    every trial run from the start, and numpy's least squares against the teacher's states at the same levels."""
    steps = dode.get_solver(solver).steps_for(NFE)
    levels = custom_levels(steps)
    teacher = dode.Teacher(gmm, batch_size=12, seed=3, substeps=10)
    fitted = dode.distill(gmm, solver, NFE, spacing=levels, teacher=teacher, guard=False)
    assert fitted.grid == levels
    assert fitted.fit_info["spacing"] == fitted.fit_info["spacing_requested"] == "explicit"

    def run(lambdas, last):
        """The DDPM-convention state after evaluation ``last`` with these lambdas."""
        scheduler = make_scheduler(solver, gmm)
        scheduler.set_timesteps(steps)
        set_grid(scheduler, levels)
        grid = TimeGrid.of(scheduler)
        x, previous = teacher.noise * scheduler.init_noise_sigma, None
        for k, t in enumerate(scheduler.timesteps[: last + 1]):
            output = gmm(scheduler.scale_model_input(x, t), t)
            corrected = output if previous is None else output + lambdas[k] * (output - previous)
            previous = output
            x = scheduler.step(corrected, t, x).prev_sample
        return (x / np.sqrt(1 + grid.after[last] ** 2) if grid.sigma_space else x).double(), grid

    targets = teacher.targets(run([0.0] * NFE, 0)[1]).double()
    lambdas = [0.0] * NFE
    for k in range(1, NFE):
        base = run(lambdas, k)[0]
        unit = run(lambdas[:k] + [1.0] + lambdas[k + 1:], k)[0]
        v, r = (unit - base).flatten().numpy(), (targets[k] - base).flatten().numpy()
        lambdas[k] = float(np.linalg.lstsq(v[:, None], r, rcond=None)[0][0])
    assert fitted.lambdas == pytest.approx(lambdas, rel=1e-5, abs=1e-8)
    assert max(abs(v) for v in lambdas) > 0.01  # a fit that moves something


def test_an_explicit_grid_at_a_named_spacings_levels_fits_that_spacings_lambdas(gmm):
    """Linspace levels sit on integer timesteps, which set_grid reaches as fractional ones within float32 rounding:
    the same fit, up to that rounding."""
    teacher = dode.Teacher(gmm, batch_size=12, seed=3, substeps=10)
    levels = list(grid_of("unipc", gmm, "linspace", NFE)[1].steps)
    explicit = dode.distill(gmm, "unipc", NFE, spacing=levels, teacher=teacher, guard=False)
    named = dode.distill(gmm, "unipc", NFE, spacing="linspace", teacher=teacher, guard=False)
    assert explicit.lambdas == pytest.approx(named.lambdas, rel=1e-3, abs=1e-6)
    assert explicit.grid == levels and named.grid is None


@pytest.mark.parametrize("bad, words", [
    ([80.0, 10.0, 1.0, 0.1], "needs 5 noise levels"),  # one per step: UniPC at NFE 5 takes 5
    ([80.0, 10.0, 20.0, 1.0, 0.1], "strictly descending"),
    ([80.0, 10.0, 1.0, 0.1, 0.0], "positive"),
    ([80.0, 10.0, 1.0, -0.1, -1.0], "positive"),
    ([80.0, float("nan"), 1.0, 0.1, 0.05], "positive and strictly descending"),
    ([[80.0, 10.0], [1.0, 0.1]], "flat list"),
    (["80", "ten"], "name or a list of noise levels"),
])
def test_bad_explicit_grids_are_clear_errors(gmm, bad, words):
    with pytest.raises(ValueError, match=words):
        dode.distill(gmm, "unipc", NFE, spacing=bad, batch_size=2, guard=False)
    if "needs" in words:
        with pytest.raises(ValueError, match="4 noise levels makes 4 model evaluations with unipc, not 5"):
            dode.sample(gmm, "unipc", NFE, 2, spacing=bad, progress=False)
    else:
        with pytest.raises(ValueError, match=words):
            grid_scheduler("unipc", gmm, bad)


def test_plms_refuses_an_explicit_grid(gmm):
    """DDIM takes one through its grid form (tests/test_learned_grids.py); PLMS has none."""
    levels = custom_levels(4)
    for call in (lambda: make_scheduler("pndm", gmm, levels), lambda: dode.sample(gmm, "pndm", 5, 2, spacing=levels),
                 lambda: dode.distill(gmm, "pndm", 5, spacing=levels, batch_size=2, guard=False)):
        with pytest.raises(ValueError, match="cannot take an explicit grid.*integer timesteps.*'leading', 'trailing'"):
            call()


@pytest.mark.parametrize("solver, spacing", [("ddim", "karras"), ("pndm", "lu"), ("dpm_solver_2", "leading"),
                                             ("unipc", "lu"), ("heun", "cosine"), ("deis", "Linspace")])
def test_an_unsupported_spacing_lists_the_supported_ones(gmm, solver, spacing):
    listed = ", ".join(map(repr, SUPPORTED[solver]))
    for call in (lambda: make_scheduler(solver, gmm, spacing), lambda: dode.sample(gmm, solver, 5, 2, spacing=spacing),
                 lambda: dode.distill(gmm, solver, 5, spacing=spacing, batch_size=2)):
        with pytest.raises(ValueError, match=re.escape(f"does not support spacing '{spacing}'; supported: {listed}")):
            call()


@pytest.mark.parametrize("typo", ["Auto", "AUTO", " auto", "auto ", "automatic", "best"])
def test_auto_is_spelled_exactly(gmm, typo):
    with pytest.raises(ValueError, match="does not support spacing.*supported: 'leading', 'trailing', 'linspace'"):
        dode.distill(gmm, "ddim", NFE, spacing=typo, batch_size=2)


def test_auto_belongs_to_distill_and_spacing_to_a_solver_name(gmm):
    for call in (lambda: make_scheduler("unipc", gmm, "auto"), lambda: dode.sample(gmm, "unipc", 5, 2, spacing="auto")):
        with pytest.raises(ValueError, match="does not support spacing 'auto'"):
            call()
    with pytest.raises(ValueError, match="spacing goes with a solver name"):
        dode.sample(gmm, make_scheduler("unipc", gmm), 5, 2, spacing="karras", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the guard and spacing="auto"
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitting(gmm):
    """One fitting batch for the auto tests (C = 10: each fit runs its own refined teacher)."""
    return dode.Teacher(gmm, batch_size=32, seed=0, substeps=10)


def score(model, scheduler, nfe, validation, criterion, **kwargs):
    """The validation criterion recomputed through the public API: dode.sample on the validation seeds against
    the reference ODE solution of the same seeds."""
    x = dode.sample(model, scheduler, nfe, validation.batch_size, seed=validation.seed, progress=False, **kwargs)
    reference = reference_solution(model, validation.seed, validation.batch_size).samples
    if criterion == "rmse":
        return dode.rmse(x, reference)
    return dode.frechet_distance(x, reference, features="pixel")


def expected_choice(info, paper_spacing):
    """The guard's rule, written out from the recorded scores: the best-validating D-ODE fit (any candidate, any
    factor > 0) when it beats the best-validating base (factor 0, any candidate) by more than the margin, else that
    base, or the paper spacing's base where that is within the margin of it. Returns (spacing, factor)."""
    candidates, margin = info["candidates"], info["margin"]
    best_base = min(c["base"] for c in candidates)
    fits = [(score, c["spacing"], float(factor)) for c in candidates for factor, score in c["scores"].items()
            if float(factor) > 0]
    score, spacing, factor = min(fits)
    if score < (1 - margin) * best_base:
        return spacing, factor
    paper = [c for c in candidates if c["spacing"] == paper_spacing and c["base"] <= (1 + margin) * best_base]
    return (paper[0] if paper else min(candidates, key=lambda c: c["base"]))["spacing"], 0.0


def check_the_guard(model, fitted, solver, validation):
    """fit_info against the rule and against the criterion recomputed through dode.sample; the lambdas are the
    chosen factor times the chosen candidate's greedy ones; never worse than any candidate's base."""
    info = fitted.fit_info["validation"]
    spacing, factor = expected_choice(info, PAPER[solver])
    assert fitted.fit_info["spacing"] == spacing and info["shrink"] == factor
    chosen = next(c for c in info["candidates"] if c["spacing"] == spacing)
    assert fitted.fit_info["greedy_lambdas"] == chosen["greedy_lambdas"]
    assert fitted.lambdas == [factor * v for v in chosen["greedy_lambdas"]]
    assert info["base"] == chosen["base"] and info["guarded"] == chosen["scores"][f"{factor:g}"]
    assert chosen["scores"]["0"] == chosen["base"] and chosen["scores"]["1"] == chosen["fitted"]
    assert chosen["best"] == min(chosen["scores"].values())
    criterion, nfe = info["criterion"], fitted.nfe
    got = score(model, fitted, nfe, validation, criterion)
    base = score(model, solver, nfe, validation, criterion, spacing=spacing)
    assert got == pytest.approx(info["guarded"], rel=1e-7) and base == pytest.approx(info["base"], rel=1e-7)
    assert got <= base * (1 + 1e-9)
    # never worse than the best base a user could configure, but for the paper's within the margin of it
    best_base = min(c["base"] for c in info["candidates"])
    assert info["guarded"] <= (1 + info["margin"]) * best_base
    if factor > 0:
        assert info["guarded"] < (1 - info["margin"]) * best_base
    return info


@pytest.mark.parametrize("solver", ["ddim", "unipc"])
def test_auto_and_the_named_spacing_it_picks_give_the_same_fit(gmm, validation, fitting, solver):
    """Where auto keeps D-ODE on a spacing, a user who names that spacing, taught as auto taught it (auto's spacings
    but the paper's share one teacher run per start, shared_grids), gets the same lambdas and scores: its best fit
    beats the best base of all spacings, so it beats its own. (Where auto falls back to the best base, a named
    spacing may still keep its own D-ODE, which beats only its own base.)"""
    auto = dode.distill(gmm, solver, NFE, spacing="auto", teacher=fitting, validation=validation, progress=False)
    info = check_the_guard(gmm, auto, solver, validation)
    assert [c["spacing"] for c in info["candidates"]] == list(SUPPORTED[solver])
    chosen = auto.fit_info["spacing"]
    assert auto.fit_info["spacing_requested"] == "auto" and spacing_of(auto) == chosen
    assert info["shrink"] > 0  # measured: D-ODE wins here (on trailing/linspace for DDIM, on karras for UniPC)
    with fitting.sharing(shared_grids(gmm, solver, NFE).values()):
        named = dode.distill(gmm, solver, NFE, spacing=chosen, teacher=fitting, validation=validation, progress=False)
    assert named.fit_info["spacing"] == named.fit_info["spacing_requested"] == chosen
    assert named.lambdas == auto.lambdas
    assert named.fit_info["greedy_lambdas"] == auto.fit_info["greedy_lambdas"]
    keys = ("base", "fitted", "shrink", "guarded")
    assert {k: named.fit_info["validation"][k] for k in keys} == {k: info[k] for k in keys}


@pytest.mark.parametrize("criterion", ["rmse", "fd"])
def test_the_guard_is_never_worse_than_the_best_base_recomputed_independently(gmm, validation, fitting, criterion):
    fitted = dode.distill(gmm, "dpm_solver_pp_2m", 6, spacing="auto", teacher=fitting, validation=validation,
                          criterion=criterion, progress=False)
    info = check_the_guard(gmm, fitted, "dpm_solver_pp_2m", validation)
    assert info["criterion"] == criterion and info["seeds"] == [VALIDATION_SEED, VALIDATION_SEED + 99]
    assert len(info["candidates"]) == len(SUPPORTED["dpm_solver_pp_2m"])
    # the line search ran where it matters: on the chosen candidate and on the best base's
    best_base = min(info["candidates"], key=lambda c: c["base"])
    for candidate in (best_base, next(c for c in info["candidates"] if c["spacing"] == fitted.fit_info["spacing"])):
        assert {"0", "0.25", "0.5", "0.75", "1"} <= set(candidate["scores"])
    # a candidate's recorded score at some factor, recomputed
    steps = dode.get_solver("dpm_solver_pp_2m").steps_for(6)
    for candidate in info["candidates"][:2]:
        half = dode.DODEScheduler(make_scheduler("dpm_solver_pp_2m", gmm, candidate["spacing"]),
                                  [0.5 * v for v in candidate["greedy_lambdas"]], steps)
        if "0.5" in candidate["scores"]:
            assert score(gmm, half, 6, validation, criterion) == pytest.approx(candidate["scores"]["0.5"], rel=1e-7)


def test_the_guard_shrinks_an_overfitted_fit(gmm, validation):
    """Two fitting samples: DPM-Solver++ (lu) at NFE 5 fits lambdas that validate worse than lambda = 0 on the 100
    validation seeds (measured: pixel FD 0.98 against 0.49); a quarter of them validates best (0.42)."""
    fitted = dode.distill(gmm, "dpm_solver_pp_2m", NFE, batch_size=2, validation=validation, criterion="fd")
    info = check_the_guard(gmm, fitted, "dpm_solver_pp_2m", validation)
    greedy = fitted.fit_info["greedy_lambdas"]
    assert info["fitted"] > info["base"] and 0.0 < info["shrink"] < 1.0 and info["guarded"] < info["base"]
    assert info["decision"] == f"lambdas shrunk by {info['shrink']:g}"
    assert fitted.lambdas == [info["shrink"] * v for v in greedy] and fitted.lambdas != greedy
    # the paper's plain greedy fit keeps the overfitted lambdas and runs no validation
    plain = dode.distill(gmm, "dpm_solver_pp_2m", NFE, batch_size=2, guard=False)
    assert plain.lambdas == greedy and "validation" not in plain.fit_info


def test_the_guard_shrinks_a_fit_that_helps_where_a_part_of_it_helps_more(gmm, validation):
    """DPM-Solver++ (lu) at NFE 5 on the default 100 fitting samples: the fit validates better than the base
    (measured: 0.36 against 0.49) and three quarters of it better still (0.34)."""
    fitted = dode.distill(gmm, "dpm_solver_pp_2m", NFE, validation=validation, criterion="fd")
    info = check_the_guard(gmm, fitted, "dpm_solver_pp_2m", validation)
    assert info["fitted"] < info["base"] and 0.0 < info["shrink"] < 1.0 and info["guarded"] < info["fitted"]


def test_where_lambda_zero_validates_best_the_guard_returns_the_base_bit_for_bit(gmm, validation):
    """PLMS on trailing at NFE 6 (measured: pixel FD 0.45 base, 0.63 fitted, 0.455 at the best factor, 0.125)."""
    fitted = dode.distill(gmm, "pndm", 6, spacing="trailing", validation=validation, criterion="fd")
    info = check_the_guard(gmm, fitted, "pndm", validation)
    assert info["shrink"] == 0.0 and info["guarded"] == info["base"] < info["fitted"]
    assert info["decision"].startswith("lambdas set to 0")
    assert all(v == 0.0 for v in fitted.lambdas) and any(v != 0.0 for v in fitted.fit_info["greedy_lambdas"])
    base = dode.sample(gmm, "pndm", 6, 20, seed=1000, spacing="trailing", progress=False)
    assert torch.equal(dode.sample(gmm, fitted, 6, 20, seed=1000, progress=False), base)


def test_d_ode_must_validate_better_than_the_base_by_the_margin(gmm, validation):
    """DPM-Solver++ on Karras at NFE 6: an eighth of the fit validates 1.6 % better than the base (measured: 0.413
    against 0.420), within the default 2 % margin, so the base comes back; with no margin that eighth is kept."""
    kwargs = dict(spacing="karras", validation=validation, criterion="fd")
    guarded = dode.distill(gmm, "dpm_solver_pp_2m", 6, **kwargs)
    info = check_the_guard(gmm, guarded, "dpm_solver_pp_2m", validation)
    assert info["margin"] == 0.02 and info["shrink"] == 0.0
    best = min(v for k, v in info["candidates"][0]["scores"].items() if k != "0")
    assert (1 - 0.02) * info["base"] <= best < info["base"]
    no_margin = dode.distill(gmm, "dpm_solver_pp_2m", 6, margin=0.0, **kwargs)
    loose = check_the_guard(gmm, no_margin, "dpm_solver_pp_2m", validation)
    assert 0.0 < loose["shrink"] < 1.0 and loose["guarded"] == best
    assert no_margin.fit_info["greedy_lambdas"] == guarded.fit_info["greedy_lambdas"]
    with pytest.raises(ValueError, match="margin must be in"):
        dode.distill(gmm, "dpm_solver_pp_2m", 6, margin=1.0, **kwargs)


def test_the_plain_greedy_fit_runs_no_validation(gmm, wrap):
    counting = wrap(gmm)
    fitted = dode.distill(counting, "unipc", NFE, batch_size=4, guard=False)
    assert "validation" not in fitted.fit_info and fitted.fit_info["spacing"] == "trailing"
    assert counting.calls == fitted.fit_info["teacher_nfe"] + NFE  # the teacher and one student run, nothing else


def test_validation_errors_are_clear(gmm, validation, wrap):
    with pytest.raises(ValueError, match="criterion must be one of"):
        dode.distill(gmm, "ddim", NFE, batch_size=2, criterion="mse")
    with pytest.raises(ValueError, match="validation must be a dode.Teacher"):
        dode.distill(gmm, "ddim", NFE, batch_size=2, validation=100)
    with pytest.raises(ValueError, match="overlap the fitting batch"):
        dode.distill(gmm, "ddim", NFE, batch_size=2, seed=VALIDATION_SEED + 99, validation=validation)
    other = wrap(gmm)
    with pytest.raises(ValueError, match="validation Teacher was built for another model"):
        dode.distill(other, "ddim", NFE, batch_size=2, validation=validation)
    with pytest.raises(ValueError, match="cannot go with guard=False"):
        dode.distill(gmm, "ddim", NFE, batch_size=2, spacing="auto", guard=False)
    with pytest.raises(ValueError, match="margin must be in"):
        dode.distill(gmm, "ddim", NFE, batch_size=2, margin=1.5, validation=validation)


def test_the_fd_criterion_scores_in_the_feature_space_asked_for(gmm, validation, fitting):
    """features="digits" validates by FD-digits: recomputed independently with dode.frechet_distance."""
    fitted = dode.distill(gmm, "ddim", NFE, teacher=fitting, validation=validation, features="digits")
    record = fitted.fit_info["validation"]
    assert record["features"] == "digits"
    x = dode.sample(gmm, "ddim", NFE, validation.batch_size, seed=validation.seed, progress=False)
    reference = reference_solution(gmm, validation.seed, validation.batch_size).samples
    expected = dode.frechet_distance(x, reference, features="digits")
    assert record["base"] == pytest.approx(expected, rel=1e-9)
    assert record["base"] != pytest.approx(dode.frechet_distance(x, reference), rel=1e-3)


def test_a_saved_guarded_auto_fit_keeps_its_validation_record_and_spacing(gmm, validation, fitting, tmp_path):
    fitted = dode.distill(gmm, "heun", NFE, spacing="auto", teacher=fitting, validation=validation, progress=False)
    fitted.save_pretrained(tmp_path)
    loaded = dode.DODEScheduler.from_pretrained(tmp_path)
    assert loaded.fit_info["validation"] == json.loads(json.dumps(fitted.fit_info["validation"]))
    assert loaded.fit_info["spacing"] == fitted.fit_info["spacing"] == spacing_of(loaded) == spacing_of(fitted)
    for key in ("timestep_spacing", *SIGMA_FLAGS.values()):
        assert loaded.config.get(key) == fitted.config.get(key)
    assert loaded.lambdas == fitted.lambdas
    assert torch.equal(dode.sample(gmm, loaded, NFE, 8, progress=False), dode.sample(gmm, fitted, NFE, 8, progress=False))


# ---------------------------------------------------------------------------------------------------------------
# the validation reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("testbed", ["gaussian", "gmm"])
def test_the_teachers_solution_is_the_ode_solution_from_pure_noise_at_the_top_level(request, testbed):
    """Against scipy's solution of the same ODE from the same noise (dode.solve_ode: closed form on a Gaussian, see
    test_ode.py): 1000 DDIM steps are within 2e-3 RMS of it, several times closer than the fine run from another start
    (t = 800, where leading DDIM starts) on the mixture, where the start matters."""
    fixture = request.getfixturevalue(testbed)
    model = fixture.model if testbed == "gaussian" else fixture
    teacher = dode.Teacher(model, batch_size=16, seed=3, substeps=10)
    solution = teacher.solution()
    assert solution.shape == (16, *model.sample_shape) and solution.dtype == torch.float32
    exact = dode.solve_ode(model, 16, seed=3, progress=False, device="cpu")
    error = dode.rmse(solution, exact)
    assert error < 2e-3
    if testbed == "gmm":
        from_800 = dode.Teacher(model, batch_size=16, seed=3, substeps="fine").targets(grid_of("ddim", model, None, 5)[1])
        assert dode.rmse(from_800[-1], exact) > 3 * error
    # made once: a second call reuses the fine run
    spent = teacher.nfe
    assert torch.equal(teacher.solution(), solution) and teacher.nfe == spent
