"""The base solvers: diffusers schedulers configured as in the paper, counted in NFE, on any supported spacing.

A new solver is one entry in ``_SOLVERS``: the scheduler class, its settings, the time-grid spacings diffusers
supports for it (and the paper's), how many model evaluations (NFE) one ``set_timesteps(n)`` costs, and whether
its steps read their noise levels from ``scheduler.sigmas`` (then ``set_grid`` can give it any time grid).
Nothing else in the package is solver-specific.

Spacings (``SPACINGS``) are diffusers' own options: ``"leading"``, ``"trailing"``, ``"linspace"``
(``timestep_spacing``), ``"karras"``, ``"exponential"``, ``"beta"`` (``use_*_sigmas``) and ``"lu"`` (logSNR-uniform,
``use_lu_lambdas``), each where the scheduler has it; Heun, whose sigma spacings span the range of its timestep
spacing, also has ``"karras+leading"`` and the like (both options set). A spacing can also be an explicit list of noise levels, one
per step, for the solvers whose steps read ``scheduler.sigmas``.

Flow-matching models (``dode.core.schedule.is_flow``) have their own solvers (``FLOW_SOLVERS``): diffusers'
FlowMatch Euler and Heun, and DPM-Solver++ and UniPC on flow sigmas. Their spacings are the sampler's ``shift``
(``"shift3"``: shift 3, the others on the model's own; dynamic shifting with ``mu`` is the shift e^mu), and Euler's
Karras, exponential and beta sigmas. ``solvers_for(model)`` lists the solvers of a model's kind.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .flowmatch import TrailingFlowMatchEulerScheduler, TrailingFlowMatchHeunScheduler
from .timegrid import TimeGrid
from .ipndm import IPNDMDiscreteScheduler
from .schedule import is_flow

#: every spacing name, in the order tables list them
SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential", "beta", "lu", "karras+leading",
            "karras+trailing", "exponential+leading", "exponential+trailing", "beta+leading", "beta+trailing")
_SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas",
                "lu": "use_lu_lambdas"}
_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
_SIGMA_SPACINGS = ("karras", "exponential", "beta")


def _spacing_options(names, timestep_spacing: bool = True) -> dict:
    """The scheduler settings of each spacing: one flag on and every other off, on a full-range linspace grid.
    ``"karras+leading"`` (Heun, which derives its sigma range from its timesteps): Karras sigmas over the range of
    the leading timesteps, as diffusers gives them for ``use_karras_sigmas=True, timestep_spacing="leading"``."""
    flags = sorted({_SIGMA_FLAGS[n.split("+")[0]] for n in names if n.split("+")[0] in _SIGMA_FLAGS})
    options = {}
    for name in names:
        sigmas, _, timesteps = name.partition("+")
        settings = {flag: flag == _SIGMA_FLAGS.get(sigmas) for flag in flags}
        if timestep_spacing:
            settings["timestep_spacing"] = timesteps or (name if name in _TIMESTEP_SPACINGS else "linspace")
        options[name] = settings
    return options


@dataclass(frozen=True)
class Solver:
    """A base solver: a diffusers scheduler class with fixed settings, its spacings and its NFE <-> steps map."""

    name: str
    scheduler_class: type
    settings: dict = field(default_factory=dict)
    #: spacing name -> the scheduler settings that select it (``_spacing_options``)
    spacings: dict = field(default_factory=dict)
    #: the paper's spacing, the default of ``make_scheduler`` and ``distill``
    default_spacing: str = "leading"
    #: model evaluations made by ``set_timesteps(steps)``
    nfe_of_steps: Callable[[int], int] = lambda steps: steps
    min_steps: int = 1
    paper: str = ""
    #: its ``step`` reads every noise level from ``scheduler.sigmas``, so ``set_grid`` can move them
    custom_grid: bool = False
    #: for a solver whose scheduler steps on integer timesteps: (scheduler class, settings) of a scheduler that
    #: makes exactly its update on any grid of noise levels (``grid_form``); explicit and learned grids use it
    grid_form: tuple | None = None
    #: a solver of flow-matching models (``FLOW_SOLVERS``); its scheduler config comes from ``flow_config``
    flow: bool = False
    #: spacing name -> the scheduler class that makes it where that is not ``scheduler_class`` (a grid no config
    #: option gives: FlowMatch Euler and Heun's "trailing", ``dode.core.flowmatch``)
    spacing_classes: dict = field(default_factory=dict)

    def class_for(self, spacing: str) -> type:
        """The scheduler class of a named spacing."""
        return self.spacing_classes.get(spacing, self.scheduler_class)

    @property
    def classes(self) -> tuple:
        """Every scheduler class of this solver: its own, then its spacings'."""
        return (self.scheduler_class, *self.spacing_classes.values())

    @property
    def takes_grid(self) -> bool:
        """An explicit or learned time grid is possible: on its own scheduler, or on its ``grid_form``."""
        return self.custom_grid or self.grid_form is not None

    def steps_for(self, nfe: int) -> int:
        """The ``num_inference_steps`` that costs exactly ``nfe`` model evaluations (ValueError if none)."""
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)):
            raise TypeError(f"nfe must be an integer, got {nfe!r}")
        possible = [s for s in range(self.min_steps, nfe + 1) if self.nfe_of_steps(s) == nfe]
        if not possible:
            smallest = self.nfe_of_steps(self.min_steps)
            valid = sorted({self.nfe_of_steps(s) for s in range(self.min_steps, self.min_steps + 6)})
            hint = f"NFE must be at least {smallest}" if nfe < smallest else f"possible NFE: {', '.join(map(str, valid))}, ..."
            raise ValueError(f"solver {self.name!r} cannot make exactly {nfe} model evaluations ({hint})")
        return possible[0]

    def check_spacing(self, spacing):
        """A spacing name this solver supports, or an explicit grid as a float64 array; ValueError otherwise."""
        supported = (", ".join(map(repr, self.spacings)) + (", a list of noise levels" if self.takes_grid else "")
                     + ", or 'auto' (dode.distill: the best on validation seeds)")
        if spacing is None:
            return self.default_spacing
        if isinstance(spacing, str):
            if spacing not in self.spacings:
                raise ValueError(f"solver {self.name!r} does not support spacing {spacing!r}; supported: {supported}")
            return spacing
        if not self.takes_grid:
            raise ValueError(f"solver {self.name!r} cannot take an explicit grid of noise levels (its diffusers "
                             f"scheduler steps on integer timesteps, and no scheduler makes exactly its update on "
                             f"other levels); supported: {supported}")
        try:
            grid = np.asarray(spacing, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"spacing must be a name or a list of noise levels, got {spacing!r}") from None
        if grid.ndim != 1 or len(grid) == 0:
            raise ValueError(f"an explicit grid is a flat list of noise levels, one per step, got {spacing!r}")
        check_levels(grid)
        return grid


def check_levels(grid: np.ndarray) -> None:
    if not (np.all(np.isfinite(grid)) and np.all(grid > 0) and np.all(np.diff(grid) < 0)):
        raise ValueError(f"a time grid must be positive and strictly descending, got {np.asarray(grid).tolist()}")


_ALL = _TIMESTEP_SPACINGS + _SIGMA_SPACINGS
_SOLVERS = [
    # the paper's DDIM: uniform timesteps linspace(0, T, N + 1)[:N], i.e. leading. On other noise levels its update
    # is iPNDM's of order 1 (the DDIM transfer with the newest eps), which steps on scheduler.sigmas
    Solver("ddim", DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True),
           _spacing_options(_TIMESTEP_SPACINGS), "leading", paper="DDIM",
           grid_form=(IPNDMDiscreteScheduler, dict(max_order=1))),
    # PLMS: the warm-up evaluates the first timestep twice, so n steps cost n + 1 NFE. No grid form: its warm-up
    # and its multistep combination are tied to PNDMScheduler's integer timesteps.
    Solver("pndm", PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=True),
           _spacing_options(_TIMESTEP_SPACINGS), "leading",
           nfe_of_steps=lambda steps: steps + 1, min_steps=2, paper="PLMS"),
    # the paper's "PNDM" is iPNDM (dode.core.ipndm): Adams-Bashforth on eps with the DDIM transfer, one NFE per step;
    # its grid is EulerDiscreteScheduler's, so it has every spacing; uniform in t as the paper's DDIM ("leading")
    Solver("ipndm", IPNDMDiscreteScheduler, dict(max_order=4), _spacing_options(_ALL), "leading",
           paper="iPNDM", custom_grid=True),
    # the paper's DPM-Solver: uniform in logSNR, which is exponential (log-uniform) sigmas
    Solver("dpm_solver_2", DPMSolverSinglestepScheduler,
           dict(solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero"),
           _spacing_options(("linspace", *_SIGMA_SPACINGS), timestep_spacing=False), "exponential",
           paper="DPM-Solver", custom_grid=True),
    Solver("dpm_solver_pp_2m", DPMSolverMultistepScheduler,
           dict(solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero"),
           _spacing_options((*_ALL, "lu")), "lu", paper="DPM-Solver++", custom_grid=True),
    Solver("deis", DEISMultistepScheduler, dict(solver_order=3), _spacing_options(_ALL), "linspace",
           paper="DEIS", custom_grid=True),
    # EDM: Karras rho = 7. Heun: two evaluations per step except the last (an Euler step to sigma = 0), 2n - 1 NFE.
    # Its sigma spacings span the range of its timestep spacing, so each comes over leading and trailing too.
    Solver("heun", HeunDiscreteScheduler, {},
           _spacing_options((*_ALL, *(f"{s}+{t}" for s in _SIGMA_SPACINGS for t in ("leading", "trailing")))),
           "karras",
           nfe_of_steps=lambda steps: 2 * steps - 1, paper="EDM", custom_grid=True),
    Solver("unipc", UniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2", final_sigmas_type="zero"),
           _spacing_options(_ALL), "trailing", paper="UniPC", custom_grid=True),
]

#: the sampler shifts offered as spacings of the flow solvers (``"shift3"``: shift 3); the plain names keep the
#: model's own shift (``scheduler_config["shift"]``). SD3 samples at 3.0; Flux's dynamic shifting at 512-1024 px
#: is e^0.5 ... e^1.15, about 1.6 to 3.2; below 1 the steps crowd at low noise (small images)
FLOW_SHIFTS = (0.5, 2.0, 3.0)


def _flow_spacings(own: str, shift_key: str, sigma_spacings=(), trailing: bool = False) -> dict:
    """The spacings of a flow solver: its own grid (``own``: "linspace" from 1 to sigma_min for the FlowMatch
    schedulers; "trailing", 1 - 1/T down to (1 - 1/T) / n, the one grid of DPM-Solver++ and UniPC's flow sigmas) on
    the model's shift; with ``trailing``, Flux's linspace(1, 1/n, n) on the model's shift too (its class in
    ``Solver.spacing_classes``); the own grid at each of ``FLOW_SHIFTS``; the sigma spacings on the model's shift."""
    flags = {_SIGMA_FLAGS[n]: False for n in sigma_spacings}
    options = {own: dict(flags), **({"trailing": dict(flags)} if trailing else {})}
    options.update({f"shift{k:g}": {**flags, shift_key: k} for k in FLOW_SHIFTS})
    options.update({name: {**flags, _SIGMA_FLAGS[name]: True} for name in sigma_spacings})
    return options


_FLOW_SOLVERS = [
    # diffusers' FlowMatch Euler (SD3's and Flux's default): one evaluation per step, linspace in sigma from 1 to
    # sigma_min (its last step is the jump from sigma_min to 0); "trailing": Flux's pipeline grid, 1 to 1/n
    Solver("flow_euler", FlowMatchEulerDiscreteScheduler, {},
           _flow_spacings("linspace", "shift", _SIGMA_SPACINGS, trailing=True), "linspace", paper="FlowMatch Euler",
           custom_grid=True, flow=True, spacing_classes={"trailing": TrailingFlowMatchEulerScheduler}),
    # Heun on the flow: two evaluations per step but the last (Euler to 0), 2n - 1 NFE
    Solver("flow_heun", FlowMatchHeunDiscreteScheduler, {}, _flow_spacings("linspace", "shift", trailing=True),
           "linspace", nfe_of_steps=lambda steps: 2 * steps - 1, paper="FlowMatch Heun", custom_grid=True, flow=True,
           spacing_classes={"trailing": TrailingFlowMatchHeunScheduler}),
    Solver("flow_dpm_solver_pp_2m", DPMSolverMultistepScheduler,
           dict(solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero"),
           _flow_spacings("trailing", "flow_shift"), "trailing", paper="DPM-Solver++ (flow)", custom_grid=True,
           flow=True),
    Solver("flow_unipc", UniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2", final_sigmas_type="zero"),
           _flow_spacings("trailing", "flow_shift"), "trailing", paper="UniPC (flow)", custom_grid=True, flow=True),
]

#: the solver names, in the order of the paper's tables
SOLVERS: tuple[str, ...] = tuple(s.name for s in _SOLVERS)
#: the solvers of flow-matching models
FLOW_SOLVERS: tuple[str, ...] = tuple(s.name for s in _FLOW_SOLVERS)
_BY_NAME = {s.name: s for s in (*_SOLVERS, *_FLOW_SOLVERS)}
#: the solvers that take any time grid (explicit grids, learned grids): their own scheduler's ``set_grid``, or
#: their ``grid_form`` (DDIM); every flow solver does too (``Solver.takes_grid``)
GRID_SOLVERS: tuple[str, ...] = tuple(s.name for s in _SOLVERS if s.takes_grid)


def solvers_for(model) -> tuple[str, ...]:
    """The solvers of a model's kind: ``FLOW_SOLVERS`` for a flow-matching model, ``SOLVERS`` otherwise."""
    return FLOW_SOLVERS if is_flow(model.scheduler_config) else SOLVERS


#: the scheduler-config keys a Flux pipeline computes its dynamic shift ``mu`` from (FlowMatch Euler's)
_DYNAMIC_SHIFT_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")


def flow_config(solver: "Solver", config: dict) -> dict:
    """A flow model's scheduler config (``num_train_timesteps``, ``shift``) as ``solver``'s scheduler takes it: the
    FlowMatch schedulers' ``shift``; DPM-Solver++ and UniPC's flow sigmas, ``flow_prediction`` and ``flow_shift``."""
    config = dict(config)
    steps, shift = int(config.get("num_train_timesteps") or 1000), float(config.get("shift", 1.0))
    if solver.scheduler_class is FlowMatchEulerDiscreteScheduler:  # and what a Flux pipeline reads to compute its mu
        return {"num_train_timesteps": steps, "shift": shift,
                **{key: config[key] for key in _DYNAMIC_SHIFT_KEYS if key in config}}
    if solver.scheduler_class is FlowMatchHeunDiscreteScheduler:
        return {"num_train_timesteps": steps, "shift": shift}
    return {"num_train_timesteps": steps, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "flow_shift": shift}


def check_kind(solver: "Solver", model) -> None:
    """ValueError unless ``solver`` is of the model's kind (a flow solver for a flow-matching model)."""
    flow = is_flow(model.scheduler_config)
    if solver.flow != flow:
        kind = "a flow-matching model" if flow else "a diffusion model (DDPM-style schedule)"
        raise ValueError(f"solver {solver.name!r} is for {'flow-matching' if solver.flow else 'diffusion'} models, "
                         f"and {getattr(model, 'name', 'this model')} is {kind}; its solvers: "
                         f"{', '.join(solvers_for(model))}")


def get_solver(name: str) -> Solver:
    if isinstance(name, Solver):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}; for flow-matching "
                         f"models: {', '.join(FLOW_SOLVERS)}") from None


def solver_of(scheduler) -> Solver:
    """The solver a (possibly D-ODE wrapped) scheduler instance belongs to, found by its class (and, for DPM-Solver++
    and UniPC, by whether it runs on flow sigmas)."""
    base = getattr(scheduler, "base_scheduler", scheduler)
    flow = is_flow(base.config) if hasattr(base, "config") else False
    for solver in (*_SOLVERS, *_FLOW_SOLVERS):
        if type(base) in solver.classes and solver.flow == flow:
            return solver
    raise ValueError(
        f"no NFE rule for {type(base).__name__}; supported schedulers: "
        + ", ".join(sorted({c.__name__ for s in (*_SOLVERS, *_FLOW_SOLVERS) for c in s.classes}))
    )


def scheduler_class_named(name: str):
    """A scheduler class by its name: one of the solvers' (dode's own iPNDM included) or any of diffusers'."""
    for cls in (c for solver in (*_SOLVERS, *_FLOW_SOLVERS) for c in solver.classes):
        if cls.__name__ == name:
            return cls
    return getattr(diffusers, name, None) if isinstance(name, str) else None


def spacing_of(scheduler) -> str | None:
    """The spacing name a scheduler's config selects (None when it matches none of its solver's)."""
    base = getattr(scheduler, "base_scheduler", scheduler)
    solver, config = solver_of(scheduler), base.config
    matching = [(len(settings), -i, name) for i, (name, settings) in enumerate(solver.spacings.items())
                if solver.class_for(name) is type(base) and all(config.get(k) == v for k, v in settings.items())]
    return max(matching)[2] if matching else None  # the most specific ("shift3" over the plain flow grid)


def grid_form_scheduler(solver: Solver, config):
    """The scheduler that makes ``solver``'s update on any grid (``Solver.grid_form``), from a config."""
    cls, settings = solver.grid_form
    return cls.from_config({**dict(config), **settings})


def set_grid(scheduler, grid) -> None:
    """Move the noise levels of a scheduler's steps, after its ``set_timesteps``, to ``grid``.

    ``grid``: one positive noise level per step, strictly descending, as ``TimeGrid.steps`` returns them; the
    final (clean) level stays the scheduler's own. The model is then called at exactly these levels (their
    fractional training timesteps). Or a ``TimeGrid`` (``TimeGrid.of`` another scheduler of the same solver and step
    count): its levels and its model time inputs, which reproduces that scheduler's run bit for bit, also where
    diffusers hands the model a rounded timestep (``TimeGrid.evaluated``). Only for solvers with ``custom_grid``
    (their steps read ``scheduler.sigmas``).
    """
    from .schedule import level_to_timestep

    if isinstance(grid, TimeGrid):
        levels, timesteps = grid.steps, torch.tensor(grid.step_timesteps)
    else:
        levels = _below_one(scheduler, np.asarray(grid, dtype=np.float64))
        timesteps = torch.from_numpy(level_to_timestep(levels, scheduler.config)).float()
    solver = _grid_solver(scheduler, levels)
    _place(scheduler, solver, torch.from_numpy(levels).float(), timesteps)


def set_levels(scheduler, levels: torch.Tensor) -> None:
    """``set_grid`` with the levels as a tensor that stays in autograd's graph: the refinement's exact gradient with
    respect to every noise level (``dode.core.refine``). For one sampling run, after ``set_timesteps``.

    The scheduler's ``sigmas`` become ``levels`` (their dtype kept, the final clean level appended) and its
    ``timesteps`` the differentiable fractional timesteps of the levels (``differentiable_timestep``, the inverse of
    the model's log-linear sigma(t)); its steps are torch arithmetic on ``sigmas``, so d(state)/d(level) flows
    through the update and through the model's time input. DEIS computes its multistep coefficients with
    ``np.log``, which cuts the graph: this scheduler instance gets the same formulas in torch (``_DEIS_UPDATES``;
    use it for one run, not to keep). iPNDM reads ``sigmas`` afresh (no cache) while they carry a graph."""
    from .schedule import differentiable_level_timestep

    solver = _grid_solver(scheduler, levels.detach().double().cpu().numpy())
    levels = _below_one(scheduler, levels.cpu())
    _place(scheduler, solver, levels, differentiable_level_timestep(levels, scheduler.config))
    if isinstance(scheduler, DEISMultistepScheduler):
        for name, update in _DEIS_UPDATES.items():
            setattr(scheduler, name, update.__get__(scheduler))


#: where diffusers' UniPC on flow sigmas puts a level of 1 (pure noise, alpha 0: its update takes log alpha)
_UNIPC_TOP = 1.0 - 1e-6


def _below_one(scheduler, levels):
    """``levels`` (numpy or torch, differentiable) as UniPC on flow sigmas steps on them: a first level of 1 or
    above 1 - 1e-6 moved to 1 - 1e-6, as diffusers' ``set_timesteps`` moves it (at exactly 1 log alpha is -inf and
    the multistep update becomes another method); every other scheduler's as they are."""
    if not (isinstance(scheduler, UniPCMultistepScheduler) and scheduler.config.get("use_flow_sigmas")):
        return levels
    if isinstance(levels, np.ndarray):
        return np.concatenate([np.minimum(levels[:1], _UNIPC_TOP), levels[1:]])
    return torch.cat([levels[:1].clamp(max=_UNIPC_TOP), levels[1:]])


def _grid_solver(scheduler, grid: np.ndarray) -> Solver:
    """The solver of a scheduler that can take ``grid`` (one level per step, positive, strictly descending);
    ValueError naming what is wrong otherwise."""
    solver = solver_of(scheduler)
    if not solver.custom_grid:
        form = f"; for {solver.name}, use dode.core.scheduler.to_grid_form first" if solver.grid_form else ""
        raise ValueError(
            f"{type(scheduler).__name__} ({solver.name}) cannot take a custom time grid: it steps on integer "
            f"timesteps{form}; solvers that can: {', '.join(GRID_SOLVERS)}"
        )
    current = TimeGrid.of(scheduler).steps
    if grid.shape != current.shape:
        raise ValueError(f"this schedule has {len(current)} steps, so the grid needs {len(current)} noise levels, "
                         f"got {len(grid) if grid.ndim == 1 else grid.shape}")
    check_levels(grid)
    return solver


def _place(scheduler, solver: Solver, levels: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Put ``levels`` (one per step) and the model's ``timesteps`` at them on ``scheduler``, its own final (clean)
    level kept, in the levels' dtype; Heun visits every level after the first with both stages of a step."""
    if solver.name in ("heun", "flow_heun"):
        levels, timesteps = levels.repeat_interleave(2)[1:], timesteps.repeat_interleave(2)[1:]
    final = scheduler.sigmas[-1:].detach().to(levels.dtype)
    device = scheduler.timesteps.device
    scheduler.sigmas = torch.cat([levels, final])
    scheduler.timesteps = timesteps.to(device)


def _deis_rhos(scheduler, count: int):
    """(alpha_t, alpha_s0, rho_t, [rho_s0, rho_s1, ...]) of DEIS's step from the ``count`` latest levels to the
    next: rho = sigma_t / alpha_t at each, as diffusers' ``multistep_deis_*_order_update`` has them."""
    i = scheduler.step_index
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i + 1])
    pairs = [scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i - k]) for k in range(count)]
    return alpha_t, pairs[0][0], sigma_t / alpha_t, [s / a for a, s in pairs]


def _deis_second(scheduler, model_output_list, *args, sample=None, **kwargs):
    """diffusers' second-order DEIS update (log-rho, ``algorithm_type="deis"``) in torch: the integral over
    [rho_s0, rho_t] of the linear interpolant in log rho of the two latest outputs."""
    alpha_t, alpha_s0, rho_t, (r0, r1) = _deis_rhos(scheduler, 2)

    def ind(t, b, c):  # the integral of (log t - log c) / (log b - log c) dt
        return t * (-torch.log(c) + torch.log(t) - 1) / (torch.log(b) - torch.log(c))

    m0, m1 = model_output_list[-1], model_output_list[-2]
    coef1 = ind(rho_t, r0, r1) - ind(r0, r0, r1)
    coef2 = ind(rho_t, r1, r0) - ind(r0, r1, r0)
    return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1)


def _deis_third(scheduler, model_output_list, *args, sample=None, **kwargs):
    """diffusers' third-order DEIS update in torch: the quadratic interpolant in log rho of the three latest."""
    alpha_t, alpha_s0, rho_t, (r0, r1, r2) = _deis_rhos(scheduler, 3)

    def ind(t, b, c, d):  # the integral of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d)) dt
        lt, lb, lc, ld = torch.log(t), torch.log(b), torch.log(c), torch.log(d)
        numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
        return numerator / ((lb - lc) * (lb - ld))

    m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
    coef1 = ind(rho_t, r0, r1, r2) - ind(r0, r0, r1, r2)
    coef2 = ind(rho_t, r1, r2, r0) - ind(r0, r1, r2, r0)
    coef3 = ind(rho_t, r2, r0, r1) - ind(r0, r2, r0, r1)
    return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)


#: the DEIS updates ``set_levels`` replaces on an instance (diffusers' call them with ``sample=`` by keyword)
_DEIS_UPDATES = {"multistep_deis_second_order_update": _deis_second,
                 "multistep_deis_third_order_update": _deis_third}
