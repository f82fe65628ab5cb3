"""dode: D-ODE solvers over diffusers schedulers (Kim, Tang & Yu, CVPR 2024).

The whole public API (the layers, bottom to top, are the folders: util, evaluation, core, models, experiments,
tools; docs/design.md says what goes where)::

    model = dode.load_model("gmm-digits")                      # models/registry.py (models/testbeds.py, networks.py)
    dode.SOLVERS, dode.get_solver("ddim")                       # core/solvers.py (+ core/ipndm.py, the paper's PNDM)
    dode.make_scheduler("ddim", model), dode.grid_scheduler("ddim", model, levels)  # core/scheduler.py
    scheduler = dode.distill(model, "ddim", nfe=5)              # core/distill.py (core/fit.py, guard.py, teacher.py)
    dode.Reference("unipc", "karras", 30)                       # core/reference.py: what the guard validates against
    x = dode.sample(model, scheduler, nfe=5, num_samples=64)    # core/sampling.py
    dode.frechet_distance(x, reference), dode.rmse(x, exact)    # evaluation/metrics.py (+ features.py, Inception FID)
    scheduler = dode.distill(model, "unipc", nfe=5, refine="joint+timesteps")  # core/refine.py: beyond the paper
    pipe = dode.use_dode(pipe, scheduler)                       # models/pipelines.py: any diffusers pipeline
    torchrun -m dode.tools.distributed ...                      # tools/distributed.py: generation across processes
    scheduler.save_pretrained("ddim-5"); dode.DODEScheduler.from_pretrained("ddim-5")  # core/scheduler.py

``import dode`` loads the core (torch, diffusers' schedulers); evaluation (torchmetrics, PIL) and reporting
(pandas, matplotlib, seaborn) load on first use of a name that needs them.
"""
__version__ = "0.1.0"

import importlib

from .core.distill import distill
from .core.fit import least_squares_lambda
from .core.ipndm import IPNDMDiscreteScheduler
from .models.registry import MODELS, ModelNotFoundError, load_model
from .core.ode import solve_ode
from .core.reference import REFERENCE, Reference
from .core.sampling import Trajectory, sample, seeded_noise
from .core.schedule import PREDICTION_TYPES, as_prediction_type
from .core.scheduler import DODEScheduler, grid_scheduler, make_scheduler
from .core.solvers import SOLVERS, get_solver
from .core.teacher import Teacher

#: public names whose modules load on first use: name -> module
_LAZY = {
    **dict.fromkeys(("feature_statistics", "frechet_distance", "load_statistics", "rmse", "save_statistics"),
                    "evaluation.metrics"),
    **dict.fromkeys(("load_pipeline", "pipeline_model", "use_dode"), "models.pipelines"),
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("evaluation", "experiments", "tools"):  # dode.evaluation.metrics.<name>, ...: the heavier layers
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DODEScheduler", "IPNDMDiscreteScheduler", "MODELS", "ModelNotFoundError", "PREDICTION_TYPES", "REFERENCE",
    "Reference", "SOLVERS", "Teacher", "Trajectory",
    "as_prediction_type", "distill", "feature_statistics", "frechet_distance", "get_solver", "grid_scheduler", "least_squares_lambda",
    "load_model", "load_pipeline", "load_statistics", "make_scheduler", "pipeline_model", "rmse", "sample",
    "save_statistics", "seeded_noise", "solve_ode", "use_dode",
]
