"""dode: D-ODE solvers over diffusers schedulers (Kim, Tang & Yu, CVPR 2024).

The whole public API::

    model = dode.load_model("gmm-digits")                      # models.py
    dode.SOLVERS, dode.make_scheduler("ddim", model)            # solvers.py
    scheduler = dode.distill(model, "ddim", nfe=5)              # distill.py (+ teacher.py)
    x = dode.sample(model, scheduler, nfe=5, num_samples=64)    # sampling.py
    dode.frechet_distance(x, reference), dode.rmse(x, exact)    # metrics.py
    scheduler.save_pretrained("ddim-5"); dode.DODEScheduler.from_pretrained("ddim-5")  # scheduler.py
"""
__version__ = "0.1.0"

from .distill import distill, least_squares_lambda
from .metrics import frechet_distance, rmse
from .models import MODELS, ModelNotFoundError, load_model
from .ode import solve_ode
from .sampling import Trajectory, sample, seeded_noise
from .scheduler import DODEScheduler
from .solvers import SOLVERS, get_solver, make_scheduler
from .teacher import Teacher

__all__ = [
    "DODEScheduler", "MODELS", "ModelNotFoundError", "SOLVERS", "Teacher", "Trajectory", "distill",
    "frechet_distance", "get_solver", "least_squares_lambda", "load_model", "make_scheduler", "rmse",
    "sample", "seeded_noise", "solve_ode",
]
