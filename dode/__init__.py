"""dode: D-ODE solvers over diffusers schedulers (Kim, Tang & Yu, CVPR 2024).

The whole public API::

    model = dode.load_model("gmm-digits")                      # models.py (the registry; testbeds.py, networks.py)
    dode.SOLVERS, dode.make_scheduler("ddim", model)            # solvers.py (+ ipndm.py, the paper's PNDM)
    scheduler = dode.distill(model, "ddim", nfe=5)              # fit.py (+ teacher.py)
    x = dode.sample(model, scheduler, nfe=5, num_samples=64)    # sampling.py
    dode.frechet_distance(x, reference), dode.rmse(x, exact)    # metrics.py (+ features.py, Inception FID)
    scheduler = dode.distill(model, "unipc", nfe=5, refine="joint+timesteps")  # refine.py: beyond the paper
    pipe = dode.use_dode(pipe, scheduler)                       # pipelines.py: any diffusers pipeline
    torchrun -m dode.distributed ...                            # distributed.py: generation across processes
    scheduler.save_pretrained("ddim-5"); dode.DODEScheduler.from_pretrained("ddim-5")  # scheduler.py

``import dode`` loads the core (torch, diffusers' schedulers); evaluation (torchmetrics, PIL) and reporting
(pandas, matplotlib, seaborn) load on first use of a name that needs them.
"""
__version__ = "0.1.0"

import importlib

from .fit import distill, least_squares_lambda
from .ipndm import IPNDMDiscreteScheduler
from .models import MODELS, ModelNotFoundError, load_model
from .ode import solve_ode
from .sampling import Trajectory, sample, seeded_noise
from .schedule import PREDICTION_TYPES, as_prediction_type
from .scheduler import DODEScheduler, make_scheduler
from .solvers import SOLVERS, get_solver
from .teacher import Teacher

#: public names whose modules load on first use: name -> module
_LAZY = {
    **dict.fromkeys(("feature_statistics", "frechet_distance", "load_statistics", "rmse", "save_statistics"), "metrics"),
    **dict.fromkeys(("load_pipeline", "pipeline_model", "use_dode"), "pipelines"),
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("metrics", "features", "pipelines", "experiments", "tables", "plots"):  # dode.metrics.<name>, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DODEScheduler", "IPNDMDiscreteScheduler", "MODELS", "ModelNotFoundError", "PREDICTION_TYPES", "SOLVERS", "Teacher", "Trajectory",
    "as_prediction_type", "distill", "feature_statistics", "frechet_distance", "get_solver", "least_squares_lambda",
    "load_model", "load_pipeline", "load_statistics", "make_scheduler", "pipeline_model", "rmse", "sample",
    "save_statistics", "seeded_noise", "solve_ode", "use_dode",
]
