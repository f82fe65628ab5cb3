"""iPNDM for DDPM-style discrete schedules: the paper's "PNDM" rows, as a diffusers scheduler.

iPNDM (the improved pseudo-numerical method of the DEIS paper, Zhang & Chen 2022) is a linear multistep method
on the noise prediction with the DDIM transfer. With e~ the Adams-Bashforth combination of the latest noise
predictions, of the highest order the history allows (up to ``max_order``)::

    e~     = [1] | [3/2, -1/2] | [23, -16, 5] / 12 | [55, -59, 37, -9] / 24   applied to (eps_i, eps_{i-1}, ...)
    x_next = sqrt(abar_next / abar) x + (sqrt(1 - abar_next) - sqrt(abar_next / abar) sqrt(1 - abar)) e~

One model evaluation per step (NFE = steps). With ``max_order=1`` it is DDIM (eta 0), bit for bit on the same
timesteps. In sigma = sqrt((1 - abar) / abar) the update is x / sqrt(abar) += (sigma_next - sigma) e~: Adams-
Bashforth steps of the probability-flow ODE dy/dsigma = eps, y = x / sqrt(abar), on the grid's own step sizes
(the coefficients are those for equal steps, as in iPNDM).

diffusers' own ``IPNDMScheduler`` is written for the continuous cosine (v-diffusion) parametrisation, so this is
a separate class for discrete beta schedules. Its time grid comes from diffusers' ``EulerDiscreteScheduler`` on
the same config, so every spacing option means what it means there (``timestep_spacing``, ``use_karras_sigmas``,
``use_exponential_sigmas``, ``use_beta_sigmas``); the last step always goes to the clean sample (sigma 0). Like
the other sigma-array schedulers, its steps read every noise level from ``scheduler.sigmas``, so
``dode.core.solvers.set_grid`` (learned grids) can move them.

The step counter follows diffusers' sigma schedulers (``EulerDiscreteScheduler``): ``step_index`` is None after
``set_timesteps``; the first ``step`` (or ``scale_model_input``) of a run starts at ``begin_index`` when a pipeline
set one (``set_begin_index``), else at the index of its ``timestep``, and each ``step`` advances it by one. So a
run may start part way (image-to-image: ``add_noise`` at ``timesteps[k]``, then steps over ``timesteps[k:]``); the
multistep history starts empty there (the first step of every run is order 1). ``step`` takes DDIM's arguments
(``eta``, ``use_clipped_model_output``, ``generator``, ``variance_noise``, ``return_dict``, in DDIM's order):
iPNDM is deterministic, so only ``eta`` 0 and no ``variance_noise``.
"""
from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from .schedule import PREDICTION_TYPES, convert_prediction, interpolated_sigma

#: Adams-Bashforth coefficients for equal steps, newest prediction first, by order
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class IPNDMDiscreteScheduler(SchedulerMixin, ConfigMixin):
    """iPNDM on a discrete DDPM noise schedule (eps-, x0- or v-models), one model evaluation per step.

    ``max_order``: the highest Adams-Bashforth order (1-4; 4 is iPNDM, 1 is DDIM). Spacing options as in
    ``EulerDiscreteScheduler``; the default, ``"leading"``, is uniform in t, evaluated at t = 0, T/N, ..., T - T/N:
    the grid of the paper's DDIM (``"trailing"``, uniform from T - 1 down, is the other time-uniform choice).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        max_order: int = 4,
    ):
        if isinstance(max_order, bool) or max_order not in ADAMS_BASHFORTH:
            raise ValueError(f"max_order must be one of {', '.join(map(str, ADAMS_BASHFORTH))}, got {max_order!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        # diffusers computes the schedule and every spacing; this scheduler only steps on them
        self._spacing = EulerDiscreteScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, timestep_spacing=timestep_spacing,
            steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas, final_sigmas_type="zero")
        # the training schedule, as DDIMScheduler has it
        self.betas = self._spacing.betas
        self.alphas = self._spacing.alphas
        self.alphas_cumprod = self._spacing.alphas_cumprod
        self.init_noise_sigma = 1.0  # states are DDPM states sqrt(abar) x0 + sqrt(1 - abar) noise
        self.num_inference_steps = None
        self.timesteps = None
        #: the noise level of each state, (steps + 1,), the last 0; ``set_grid`` may replace it after set_timesteps
        self.sigmas = None
        self._reset()

    def _reset(self):
        self._step_index = None  # the next step's index in timesteps; None until a run's first step
        self._begin_index = None  # where a run starts, when a pipeline says (set_begin_index)
        self._history = []  # noise predictions, newest first

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next step; None after ``set_timesteps`` until the run's first step."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index a run starts at, when set by ``set_begin_index`` (None after ``set_timesteps``)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]``, whatever ``timestep`` its first step gets (pipelines
        call it after ``set_timesteps``)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The index of ``timestep`` in ``schedule_timesteps`` (default ``timesteps``; its entries are distinct)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if torch.is_tensor(timestep):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            value = timestep.item() if torch.is_tensor(timestep) else timestep
            raise ValueError(f"timestep {value} is not one of this schedule's timesteps; step() starts a run at "
                             "one of them (or at set_begin_index's index)")
        return int(indices[0].item())

    def _init_step_index(self, timestep) -> None:
        """A run's first step: its index, and an empty multistep history."""
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        self._history = []

    def __len__(self):
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device=None):
        self._spacing.set_timesteps(num_inference_steps)
        sigmas = self._spacing.sigmas.to(torch.float32).cpu()
        timesteps = self._spacing.timesteps.cpu()
        if torch.equal(timesteps, timesteps.round()):
            # integer timesteps: the model gets integers and the steps use alphas_cumprod itself, as DDIM does
            timesteps = timesteps.round().long()
            alphas = torch.cat([self.alphas_cumprod[timesteps], torch.ones(1)])
        else:
            alphas = self._alphas_of(sigmas)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = timesteps.to(device)
        self.sigmas = sigmas
        self._alphas, self._alphas_for = alphas, sigmas.clone()
        self._reset()

    @staticmethod
    def _alphas_of(sigmas: torch.Tensor) -> torch.Tensor:
        """abar of each level, float32 (float64 for float64 levels: the refinement's gradient checks)."""
        dtype = torch.float64 if sigmas.dtype == torch.float64 else torch.float32
        return (1.0 / (1.0 + sigmas.double() ** 2)).to(dtype)

    def _step_alphas(self) -> torch.Tensor:
        """abar of every state; from ``sigmas`` when they were moved since ``set_timesteps`` (a custom grid), and
        at every step while they carry autograd's graph (``dode.core.solvers.set_levels``)."""
        if self.sigmas.requires_grad:
            return self._alphas_of(self.sigmas)
        if self.sigmas.dtype != self._alphas_for.dtype or not torch.equal(self.sigmas, self._alphas_for):
            self._alphas, self._alphas_for = self._alphas_of(self.sigmas), self.sigmas.clone()
        return self._alphas

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample`` itself (the model takes DDPM states); the first call of a run sets ``step_index``, as
        Euler's does."""
        if self._step_index is None and timestep is not None and self.timesteps is not None:
            self._init_step_index(timestep)
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float | None = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             **kwargs):
        """One iPNDM step from the state at ``timesteps[step_index]`` to the next noise level.

        Args:
            model_output: the model's output at ``sample`` (in the config's ``prediction_type``).
            timestep: the current timestep; read only at a run's first step, to find where the run starts (unless
                ``set_begin_index`` said).
            sample: the current state.
            eta: 0 (or None) only; iPNDM is deterministic (DDIM's or DDPM's scheduler samples with eta > 0).
            use_clipped_model_output: accepted for DDIM's signature; no effect (no x0 clipping here).
            generator: accepted and unused (deterministic).
            variance_noise: None only (deterministic).
            return_dict: a ``SchedulerOutput``, else the tuple ``(prev_sample,)``.
            kwargs: other keywords a pipeline passes are accepted and unused.
        """
        if eta is not None and float(eta) != 0.0:
            raise ValueError(f"eta={eta}: iPNDM is deterministic (eta 0); use DDIM or DDPM for eta > 0")
        if variance_noise is not None:
            raise ValueError("variance_noise: iPNDM is deterministic and adds no noise; use DDIM or DDPM for eta > 0")
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if not 0 <= i < len(self.sigmas) - 1:
            raise RuntimeError(f"step() at index {i}, outside the {len(self.sigmas) - 1} steps of "
                               f"set_timesteps({self.num_inference_steps}); call set_timesteps() before every "
                               "sampling run")
        alphas = self._step_alphas()
        alpha_prod_t, alpha_prod_t_prev = alphas[i], alphas[i + 1]
        eps = convert_prediction(model_output, sample, alpha_prod_t, self.config.prediction_type, "epsilon")
        self._history = [eps, *self._history][: self.config.max_order]
        coefficients = ADAMS_BASHFORTH[len(self._history)]
        if len(self._history) == 1:
            pred_epsilon = self._history[0]
        else:
            pred_epsilon = sum(c * e for c, e in zip(coefficients, self._history))
        # the DDIM transfer, in DDIMScheduler's own arithmetic (so that order 1 is DDIM bit for bit)
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** 0.5 * pred_epsilon) / alpha_prod_t ** 0.5
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + (1 - alpha_prod_t_prev) ** 0.5 * pred_epsilon
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process at training ``timesteps`` (image-to-image pipelines): at an integer timestep its
        ``alphas_cumprod`` (DDIM's arithmetic), at a fractional one (karras and the other sigma spacings) the noise
        level the steps use there, log-sigma linear between training timesteps."""
        timesteps = torch.as_tensor(timesteps)
        if torch.equal(timesteps, timesteps.round()):
            alphas = self.alphas_cumprod.to(original_samples.device, original_samples.dtype)[timesteps.long()]
        else:
            log_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).double().log()
            sigmas = interpolated_sigma(timesteps, log_sigmas)
            alphas = (1.0 / (1.0 + sigmas**2)).to(original_samples.device, original_samples.dtype)
        alphas = alphas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return alphas ** 0.5 * original_samples + (1 - alphas) ** 0.5 * noise
