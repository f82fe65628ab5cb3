"""dode: D-ODE solvers over diffusers schedulers (Kim, Tang & Yu, CVPR 2024).

The whole public API::

    model = dode.load_model("gmm-digits")                      # models.py
    dode.SOLVERS, dode.make_scheduler("ddim", model)            # solvers.py (+ ipndm.py, the paper's PNDM)
    scheduler = dode.distill(model, "ddim", nfe=5)              # distill.py (+ teacher.py)
    x = dode.sample(model, scheduler, nfe=5, num_samples=64)    # sampling.py
    dode.frechet_distance(x, reference), dode.rmse(x, exact)    # metrics.py (+ features.py, Inception FID)
    scheduler = dode.distill(model, "unipc", nfe=5, refine="joint+timesteps")  # refine.py: beyond the paper
    pipe = dode.use_dode(pipe, scheduler)                       # pipelines.py: any diffusers pipeline
    torchrun -m dode.distributed ...                            # distributed.py: generation across processes
    scheduler.save_pretrained("ddim-5"); dode.DODEScheduler.from_pretrained("ddim-5")  # scheduler.py
"""
__version__ = "0.1.0"

from .distill import distill, least_squares_lambda
from .metrics import feature_statistics, frechet_distance, load_statistics, rmse, save_statistics
from .ipndm import IPNDMDiscreteScheduler
from .models import MODELS, PREDICTION_TYPES, ModelNotFoundError, as_prediction_type, load_model
from .pipelines import load_pipeline, pipeline_model, use_dode
from .ode import solve_ode
from .sampling import Trajectory, sample, seeded_noise
from .scheduler import DODEScheduler
from .solvers import SOLVERS, get_solver, make_scheduler
from .teacher import Teacher

__all__ = [
    "DODEScheduler", "IPNDMDiscreteScheduler", "MODELS", "ModelNotFoundError", "PREDICTION_TYPES", "SOLVERS", "Teacher", "Trajectory",
    "as_prediction_type", "distill", "feature_statistics", "frechet_distance", "get_solver", "least_squares_lambda",
    "load_model", "load_pipeline", "load_statistics", "make_scheduler", "pipeline_model", "rmse", "sample",
    "save_statistics", "seeded_noise", "solve_ode", "use_dode",
]
