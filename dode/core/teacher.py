"""The teacher: the same model solved with many small DDIM steps, read off at the student's own times.

DDIM (eta = 0) is the Euler method of the probability-flow ODE in sigma, so the teacher is diffusers'
``EulerDiscreteScheduler`` on an explicit sigma grid, which can hold any noise level, fractional
timesteps included. Two grids:

- ``substeps=C`` (an integer, the paper's teacher): every interval of the student's grid split into C steps,
  uniform in the training timestep. Each student times is on the grid by construction.
- ``substeps="fine"``: every training timestep. Its trajectory is computed once per start (the exact first noise
  level and initial scale) and shared by every solver and NFE that start there; a student time between two grid
  points is reached by one Euler step from the point above. Starts that agree only to a few digits (a first level
  computed in float32 or float64, Heun's scale) get runs of their own: a fit reads the same targets whichever cells
  the teacher served before it, so a shared teacher changes what a fit costs, never what it fits.

``Teacher.sharing(grids, apart)`` (``spacing="auto"``'s candidates): grids that start at the same noise level
share one run, on their ``envelope``: every grid's levels, and between two of them steps no longer than any of
those grids' own C-split steps there. Each grid's targets then come from a run at least as fine as its own, at the
price of about one. A single grid's envelope is its own C-split grid, so is the run of each grid ``apart`` (the
paper's spacing), and a grid outside the block gets its own run, so a named spacing's fit does not change.
Identical grids (Heun's at NFE 3: twelve spacings, three grids) read one run.

``match="index"`` (an ablation, with an integer C) instead does what the paper's public code does: a DDIM
teacher with C x NFE steps on its own grid (DDIM's original ``range(0, T, T // (C NFE))``, which starts at
t = T - T / (C NFE), not at the student's first time), from the same noise, and every C-th state as the
target whether or not it lies at the student's time. Only the final (clean) state is then aligned.

``precision="float64"``: the noise batch, and so every teacher state, the fits on it and the refinements of
them, in float64 (the seeds' float32 draws, widened exactly). For a model that computes in float64 (the
embedded gmm-digits) a fit then moves between CPU kernel paths by float64's rounding instead of float32's, and
``dode.core.refine`` rounds what its optimiser sees far above that (docs/reproducing.md says what remains).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from .timegrid import TimeGrid
from ..util.runtime import resolve_device
from .schedule import is_flow, level_to_timestep, timestep_to_level, training_sigmas
from .sampling import integrate, seeded_noise


#: ``Teacher(precision=...)``: the dtype of its noise batch and states
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


class Teacher:
    def __init__(self, model, *, batch_size: int = 100, seed: int = 0, substeps: int | str = 10, match: str = "time",
                 device="auto", precision: str = "float32"):
        if substeps != "fine" and (isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1):
            raise ValueError(f"teacher substeps must be a positive integer C (steps per student step) or 'fine', got "
                             f"{substeps!r}")
        if match not in ("time", "index") or (match == "index" and substeps == "fine"):
            raise ValueError(f"match must be 'time', or 'index' with an integer C; got match={match!r}, substeps={substeps!r}")
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
        self.model = model
        self.precision = precision
        self.substeps = substeps
        self.match = match
        self.batch_size = batch_size
        self.seed = seed
        self.device = resolve_device(device)
        self.noise = seeded_noise(model.sample_shape, batch_size, seed).to(self.device, PRECISIONS[precision])
        self._config = dict(model.scheduler_config)
        self._training_sigmas = training_sigmas(self._config)
        self._fine_runs: dict = {}
        self._plan: dict = {}  # while ``sharing``: a grid's key -> the envelope it reads its targets from
        self._shared_runs: dict = {}  # (start key, envelope) -> (levels, states) at its grids' levels
        self.nfe = 0  # model evaluations spent so far

    def __repr__(self):
        return (f"Teacher(substeps={self.substeps!r}, match={self.match!r}, batch_size={self.batch_size}, seed={self.seed}, "
                f"precision={self.precision!r}, nfe so far={self.nfe})")

    @property
    def label(self) -> str:
        """"fine", "C=10", or "C=10, index-matched"."""
        name = "fine" if self.substeps == "fine" else f"C={self.substeps}"
        return name + (", index-matched" if self.match == "index" else "")

    def substep_levels(self, sigmas) -> np.ndarray:
        """Split each interval of a descending sigma grid (ending at 0) into ``self.substeps`` timestep-uniform steps."""
        knots = [float(s) for i, s in enumerate(sigmas) if i == 0 or s != sigmas[i - 1]]
        grid = [knots[0]]
        for high, low in zip(knots[:-1], knots[1:]):
            t_high = self._timestep(high)
            if low > 0:
                inner = np.linspace(t_high, self._timestep(low), self.substeps + 1)[1:-1]
                grid += [*self._level(inner), low]
            elif t_high > self._timestep(self._training_sigmas[0]) + 1e-6:
                # the last step lands on sigma = 0: refine down to the first training timestep, then jump to clean
                inner = np.linspace(t_high, self._timestep(self._training_sigmas[0]), self.substeps)[1:]
                grid += [*self._level(inner), 0.0]
            else:  # from the smallest training sigma (t = 0) the model can only make the final jump
                grid += [0.0]
        return np.asarray(grid)

    def envelope(self, grids) -> np.ndarray:
        """One teacher grid for several student grids (descending noise levels) that start at the same level: every
        level of each, and between two consecutive levels of the union as many timestep-uniform steps as the grid
        that splits that stretch finest (``substep_levels``: C per interval, and on an interval that ends at 0,
        C - 1 down to t = 0 and the jump to 0). For one grid it is ``substep_levels`` of it, exactly."""
        if self.substeps == "fine" or self.substeps < 2:  # (index matching would ignore it)
            raise ValueError(f"an envelope needs an integer teacher with C >= 2 substeps, not {self.substeps!r}")
        grids = [np.asarray([float(s) for i, s in enumerate(g) if i == 0 or s != g[i - 1]]) for g in grids]
        if len({float(f"{g[0]:.6g}") for g in grids}) != 1:
            raise ValueError("an envelope joins grids that start at the same noise level")
        start = float(grids[0][0])
        grids = [np.concatenate([[start], g[1:]]) for g in grids]  # the same start, up to rounding: the first's
        knots = sorted({float(s) for g in grids for s in g[1:]} | {start}, reverse=True)
        knots = [k for i, k in enumerate(knots) if i == 0 or k < knots[i - 1] * (1 - 1e-9)]

        def t(sigma):
            return float(self._timestep(sigma)) if sigma > 0 else float(self._timestep(self._training_sigmas[0]))

        def step(grid, high):  # the timestep length of ``grid``'s own teacher steps just below ``high``
            j = int(np.nonzero(grid >= high * (1 - 1e-9))[0][-1])
            top, bottom = grid[j], grid[j + 1]
            h = (t(top) - t(bottom)) / self.substeps if bottom > 0 else (t(top) - t(0.0)) / (self.substeps - 1)
            return h if h > 1e-6 else 0.0  # from the first training timestep (flow: t = 1) only the jump to clean

        def count(length, h):  # steps of at most h (1 where the grid's own steps there have no length)
            return int(np.ceil(length / h - 1e-9)) if h > 1e-12 else 1

        levels = [start]
        for high, low in zip(knots[:-1], knots[1:]):
            t_high, t_low = t(high), t(low)
            if low == 0.0 and t_high <= t(0.0) + 1e-6:  # from the first training timestep only the jump to clean
                levels.append(0.0)
                continue
            covering = [g for g in grids if g[-1] <= low * (1 + 1e-9)]
            n = max(count(t_high - t_low, step(g, high)) for g in covering)
            inner = np.linspace(t_high, t_low, n + 1)[1:] if low == 0.0 else np.linspace(t_high, t_low, n + 1)[1:-1]
            levels += [*self._level(inner), low]
        return np.asarray(levels)

    def _timestep(self, levels):
        """The model's time input at noise levels (``level_to_timestep``)."""
        return level_to_timestep(levels, self._config)

    def _level(self, timesteps):
        """The noise level at time inputs (``timestep_to_level``)."""
        return timestep_to_level(timesteps, self._config)

    @staticmethod
    def _start_key(start: float, scale: float) -> tuple:
        # Which grids ``sharing`` joins in one envelope, up to rounding: schedulers compute the same first sigma in
        # float32 or float64 (157.407269 or 157.407272), and Heun starts at sigma_max, not sqrt(sigma_max^2 + 1),
        # 2e-5 smaller. A run itself is keyed on its exact start and scale (``_fine_state``, ``targets``).
        return float(f"{start:.6g}"), float(f"{scale:.4g}")

    @staticmethod
    def _grid_key(times: TimeGrid) -> tuple:
        return (Teacher._start_key(times.start, times.initial_scale),
                tuple(float(f"{s:.9g}") for s in times.states[1:]))

    @property
    def _shares(self) -> bool:  # a fine teacher is shared already; index matching and C = 1 have no envelope
        return self.substeps != "fine" and self.match == "time" and self.substeps >= 2

    def share_groups(self, grids) -> list:
        """The grids (``TimeGrid``s) that ``sharing`` teaches by one run each: per start, the distinct grids there
        ({grid key: TimeGrid}; identical grids, twins, are one key); none with ``substeps="fine"``, an index-matched
        teacher or C < 2."""
        if not self._shares:
            return []
        groups: dict = {}
        for times in grids:
            groups.setdefault(self._start_key(times.start, times.initial_scale), {})[self._grid_key(times)] = times
        return list(groups.values())

    @contextmanager
    def sharing(self, grids, apart=()):
        """While open, the grids given (``TimeGrid``s) that start at the same noise level share one teacher run on
        their ``envelope``; a grid alone at its start gets its own C-split grid (its ``envelope``), on one run for it
        and its twins. Each of ``apart`` is taught on its own C-split grid, never joined with others, by one run for
        it and its twins (``spacing="auto"``'s paper spacing, whose fit stays the paper's). With ``substeps="fine"``
        (already shared), an index-matched teacher or C < 2, nothing changes. Runs are made when first asked for,
        and their states at the grids' own levels are kept on the teacher (as a fine teacher keeps its runs)."""
        previous = self._plan
        plan = dict(previous)
        apart = {self._grid_key(g): g for g in apart} if self._shares else {}
        groups = self.share_groups(g for g in grids if self._grid_key(g) not in apart)
        for members in groups + [{key: times} for key, times in apart.items()]:
            grid = [m.states for m in members.values()]
            levels = self.substep_levels(grid[0]) if len(grid) == 1 else self.envelope(grid)
            # the states to keep: at the grids' own levels (the others only carry the run between them)
            kept = sorted({int(np.argmin(np.abs(levels - s))) for m in members.values() for s in m.after})
            plan.update({key: (levels, np.asarray(kept)) for key in members})
        self._plan = plan
        try:
            yield self
        finally:
            self._plan = previous

    def _euler(self, x_ddpm: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
        """DDIM along ``grid`` (descending sigmas) from a DDPM-convention state; every state, DDPM convention. For a
        flow-matching model, FlowMatch Euler along ``grid`` (flow levels), states as they are."""
        if is_flow(self._config):
            euler = FlowMatchEulerDiscreteScheduler.from_config({"num_train_timesteps": len(self._training_sigmas)})
            euler.set_timesteps(len(grid) - 1, device=x_ddpm.device)  # then its levels are the grid's
            euler.sigmas = torch.tensor(np.asarray(grid), dtype=torch.float32)
            euler.timesteps = torch.from_numpy(self._timestep(np.asarray(grid[:-1]))).float().to(x_ddpm.device)
            _, states = integrate(self.model, euler, None, x_ddpm, record=True)
            self.nfe += len(euler.timesteps)
            return states
        euler = EulerDiscreteScheduler.from_config(self.model.scheduler_config)
        euler.set_timesteps(sigmas=list(grid), device=x_ddpm.device)
        x_ve = x_ddpm * float(np.sqrt(1 + grid[0] ** 2))
        _, states = integrate(self.model, euler, None, x_ve / float(euler.init_noise_sigma), record=True)
        self.nfe += len(euler.timesteps)
        return states

    def targets(self, times) -> torch.Tensor:
        """Teacher states at the noise levels of a student's states after each model evaluation.

        ``times``: the student's ``TimeGrid`` (or a scheduler after ``set_timesteps``, read once here). The teacher
        starts where the student starts (same noise, same noise level, same initial scale). Returns
        (nfe, batch, *shape) in the DDPM convention, on the CPU.
        """
        if not isinstance(times, TimeGrid):
            times = TimeGrid.of(times)
        start, scale, wanted = times.start, times.initial_scale, times.after
        x_start = self.noise * scale
        if self.match == "index":
            steps = self.substeps * len(wanted)
            count = len(self._training_sigmas)
            leading = np.arange(0, count, count // steps)[:steps][::-1]
            levels = np.append(self._training_sigmas[leading], 0.0)
            return self._euler(x_start, levels)[self.substeps :: self.substeps]
        if self.substeps != "fine":
            shared = self._plan.get(self._grid_key(times))
            if shared is not None:
                envelope, kept = shared
                run = (float(scale), envelope.tobytes())  # the envelope holds its exact start
                if run not in self._shared_runs:
                    self._shared_runs[run] = (envelope[kept], self._euler(x_start, envelope)[kept])
                levels, states = self._shared_runs[run]
            else:
                levels = self.substep_levels(times.states)
                states = self._euler(x_start, levels)
            index = [int(np.argmin(np.abs(levels - s))) for s in wanted]
            return states[index]
        return torch.stack([self._fine_state(x_start, start, scale, s) for s in wanted])

    def solution(self) -> torch.Tensor:
        """The ODE solution of the teacher's noise batch from pure noise at the first training noise level, on a
        fine run (every training timestep) whatever ``substeps`` is: ``dode.Reference("fine")``, the validation
        reference before the cheaper default (``dode.core.reference``). (batch, *shape), on the CPU."""
        top = float(self._training_sigmas[-1])
        return self._fine_state(self.noise, top, 1.0, 0.0)

    def _fine_state(self, x_start, start: float, scale: float, sigma: float) -> torch.Tensor:
        key = (float(start), float(scale))  # exact: see the module's docstring
        if key not in self._fine_runs:
            below = self._training_sigmas[self._training_sigmas < start * (1 - 1e-6)][::-1]
            grid = np.concatenate([[start], below, [0.0]])
            self._fine_runs[key] = (grid, self._euler(x_start, grid))
        grid, states = self._fine_runs[key]
        j = int(np.nonzero(grid >= sigma * (1 - 1e-6))[0][-1])  # the last grid point at or above sigma
        if abs(grid[j] - sigma) <= 1e-6 * max(sigma, 1e-12):
            return states[j]
        return self._euler(states[j].to(self.device), np.array([grid[j], sigma]))[-1]
