"""The experiment parameters, in one place: what each notebook runs by default, and what ``make reproduce`` runs.

``DEFAULTS`` are the notebooks' defaults: small (minutes on a laptop; nbval runs them in ``make test``). Each
notebook's ``parameters`` cell holds the same values as literals (``nfe = 5  # ...``, readable where they are
read; papermill's ``-p name value`` overrides them as usual), and ``tests/test_notebook_parameters.py`` keeps the
two equal: every name and value of ``defaults(notebook)`` is a line of that cell and the cell has no other, so
a change to one side alone fails. ``REPRODUCE`` holds what ``make reproduce`` (``dode.tools.reproduce.plan``)
passes on top of them: the paper's grid. ``02_distill_solvers`` and ``04_trajectories`` run on every embedded model,
with the profile its registry entry names (``dode.models.registry.ModelEntry.profile``): "exact" for a model whose
ODE is exact (cheap and judged exactly, so the full grid), "network" for a real network (about 15x dearer per model
call); ``tests/test_parameters.py`` checks that it passes only parameters a notebook has, and valid ones.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

PAPER_NFES = (3, 4, 5, 6, 8, 10)
_RUN = {"device": "auto", "num_threads": None, "out_dir": None}  # every notebook: where and how it runs

DEFAULTS = {
    "01_quickstart": {
        "model_name": "gmm-digits", "solver": "ddim", "nfe": 5, "num_samples": 300, "seed": 1000, **_RUN,
    },
    "02_distill_solvers": {
        "model_name": "gmm-digits", "solvers": "all", "nfes": [3, 5], "num_samples": 300, "reference_samples": 3000,
        "features": ["pixel"], "metric": "fd_pixel", "fine_nfe": 200, "fit_batch_size": 100, "fit_seed": 0,
        "teacher": 10, "validation_size": 100, "learned_nfes": [5], "learned_solvers": ["ddim", "deis"],
        "learned_starts": 2, "learned_iterations": 10, "refine_teacher": "fine", "learned_batch_size": 100,
        "learned_moments": [0], "precision": "float32",
        "criteria": ["rmse", "fd"], "seed": 1000, **_RUN,
    },
    "03_paper_tables": {
        "results_dir": None, "models": ["gmm-digits"], "metrics": ["fd_pixel", "rmse_exact"], "digits": 3,
        "num_threads": None, "out_dir": None,
    },
    "04_trajectories": {
        "model_name": "gmm-digits", "solvers": "all", "nfe": 5, "grid_nfes": [3, 5], "grid_samples": 12,
        "pca_solver": "ddim", "pca_paths": 6, "fit_batch_size": 100, "teacher": 10, "heldout_seed": 1000,
        "heldout_size": 100, **_RUN,
    },
    "05_ablations": {
        "model_name": "gmm-digits", "solver": "ddim", "nfe": 5, "teacher_scales": [2, 10, "fine"],
        "batch_sizes": [10, 100], "fit_repeats": 2, "matching_solvers": ["ddim", "heun"],
        "refine_solvers": ["ddim", "unipc"], "refine_teacher": 10, "seed_solvers": ["dpm_solver_pp_2m"],
        "fit_seeds": [0, 100], "learned_starts": 2, "learned_iterations": 10, "num_samples": 300,
        "reference_samples": 3000, "seed": 1000, **_RUN,
    },
    "07_flow": {
        "model_name": "gmm-digits-flow", "flow_solvers": "all", "nfes": [3, 5], "num_samples": 300,
        "reference_samples": 3000, "learned_iterations": 10, "learned_starts": 1, "seed": 1000, **_RUN,
    },
    # a pretrained diffusers checkpoint at the paper's scale: for a GPU (make reproduce does not run it)
    "06_pretrained": {
        "model_name": "google/ddpm-cifar10-32", "pipeline": False, "prompts": None, "guidance_scale": 7.5,
        "negative_prompt": None, "solvers": "all", "nfes": list(PAPER_NFES), "num_samples": 50_000,
        "batch_size": 500, "fit_batch_size": 100, "fit_seed": 0, "teacher": 10, "spacing": None,
        "validation_size": 100, "reference": None, "features": "inception", "autocast": None, "grid_samples": 16,
        "seed": 1000, **_RUN,
    },
}

REPRODUCE = {
    "01_quickstart": {"model_name": "gmm-digits", "num_samples": 1000},
    "02_distill_solvers": {
        # the paper's NFEs, judged against the exact data distribution; learned grids (the grid alone, joint
        # lambdas, both) at every NFE from three starting spacings, Rprop until its steps settle (at most 200
        # iterations), on the fine teacher and 400 seeds as distill(refine=...) fits by default; the criteria's rank
        # correlation. The fits in float64, as the model computes: far fewer of the learned grids move with the
        # CPU's kernels (docs/reproducing.md)
        "exact": {"solvers": "all", "nfes": list(PAPER_NFES), "num_samples": 2000, "reference_samples": 10_000,
                  "fine_nfe": 200, "teacher": 10, "validation_size": 100, "learned_nfes": list(PAPER_NFES),
                  "learned_solvers": "all", "learned_starts": 3, "learned_iterations": 200, "refine_teacher": "fine",
                  "learned_batch_size": 400, "precision": "float64", "criteria": ["rmse", "fd"]},
        # NFE 4-8, judged against 200-step DDIM samples of the same seeds (5000: the reference solution is most of
        # this run's time); learned grids at NFE 5 for every solver from auto's spacing alone (and, for both,
        # the grid alone), at most 30 iterations. The joint lambdas against the fit's own C = 10 teacher, whose
        # states the fit already has: a fine teacher costs 1000 evaluations of the batch per starting level, and
        # the grids are fitted to the batch's reference solution (30) whatever the teacher
        "network": {"solvers": "all", "nfes": [4, 5, 6, 8], "num_samples": 500, "reference_samples": 5000,
                    "fine_nfe": 200, "teacher": 10, "validation_size": 100, "learned_nfes": [5],
                    "learned_solvers": "all", "learned_starts": 1,
                    "learned_iterations": 30, "refine_teacher": 10, "criteria": []},
    },
    "04_trajectories": {"solvers": "all", "nfe": 5, "grid_nfes": [3, 5, 10], "grid_samples": 16},
    # the flow testbed at the paper's NFEs: every flow solver, 2000 held-out seeds, learned grids 1 x 30 iterations
    "07_flow": {"model_name": "gmm-digits-flow", "nfes": list(PAPER_NFES), "num_samples": 2000,
                "reference_samples": 10_000, "learned_iterations": 30, "learned_starts": 1},
    "05_ablations": {
        "model_name": "gmm-digits", "solver": "ddim", "nfe": 5, "teacher_scales": [2, 5, 10, 20, "fine"],
        "batch_sizes": [10, 25, 100, 400], "fit_repeats": 3, "matching_solvers": "all", "num_samples": 2000,
        "reference_samples": 10_000, "refine_solvers": ["ddim", "ipndm", "dpm_solver_pp_2m", "heun"],
        "refine_teacher": "fine", "seed_solvers": ["ddim", "ipndm", "dpm_solver_pp_2m", "deis"],
        "fit_seeds": [0, 100, 200], "learned_starts": 3, "learned_iterations": 200,
    },
}


def defaults(notebook: str) -> SimpleNamespace:
    """A notebook's default parameters (a fresh copy), as attributes: ``p = defaults("02_distill_solvers")``."""
    if notebook not in DEFAULTS:
        raise ValueError(f"no parameters for {notebook!r}; notebooks: {', '.join(DEFAULTS)}")
    return SimpleNamespace(**copy.deepcopy(DEFAULTS[notebook]))


def reproduce(notebook: str, profile: str | None = None) -> dict:
    """What ``make reproduce`` passes to a notebook (a fresh copy); ``profile`` for the per-model notebooks."""
    values = REPRODUCE[notebook]
    if notebook == "02_distill_solvers":
        if profile not in values:
            raise ValueError(f"unknown reproduce profile {profile!r}; valid: {', '.join(values)}")
        values = values[profile]
    return copy.deepcopy(values)
