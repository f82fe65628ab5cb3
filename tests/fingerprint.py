"""Prints, one per line as ``name value``, the numbers a small run of the whole chain makes on both embedded models:
load, data draws, a greedy D-ODE fit, sampling, Frechet distances (pixel and FD-digits) and RMSE to the exact ODE.

tests/test_machine_independence.py runs it in subprocesses under other BLAS kernels and thread counts and requires
every number to agree; ``python tests/fingerprint.py 1 2`` prints them here, on one torch thread and on two.
"""
import dode
from dode.experiments.evaluate import evaluate_scheduler, evaluation_data
from dode.util.runtime import use_threads

FEATURES = ("pixel", "digits")


def numbers() -> dict:
    out = {}
    gmm = dode.load_model("gmm-digits", device="cpu")
    use_threads()  # $DODE_NUM_THREADS, as the notebooks
    draws = gmm.sample_data(500, seed=1).double()
    out["gmm draws mean"], out["gmm draws mean abs"] = float(draws.mean()), float(draws.abs().mean())
    data = evaluation_data(gmm, 100, seed=1000, reference_samples=500, features=FEATURES, device="cpu", progress=False)
    out.update({f"gmm floor {f}": v for f, v in data.floor.items()})
    fitted = dode.distill(gmm, "ddim", 4, guard=False, batch_size=50, device="cpu", progress=False)
    out.update({f"gmm lambda {i}": v for i, v in enumerate(fitted.lambdas)})
    for label, scheduler in (("ddim", "ddim"), ("d-ddim", fitted)):
        scores = evaluate_scheduler(gmm, scheduler, 4, data, seed=1000, features=FEATURES, device="cpu")
        out.update({f"gmm {label} {k}": v for k, v in scores.items() if k != "sample_seconds"})

    unet = dode.load_model("unet-digits", device="cpu")
    use_threads()
    fitted = dode.distill(unet, "dpm_solver_pp_2m", 4, guard=False, batch_size=50, device="cpu", progress=False)
    out.update({f"unet lambda {i}": v for i, v in enumerate(fitted.lambdas)})
    x = dode.sample(unet, fitted, 4, 100, seed=1000, device="cpu", progress=False)
    reference = dode.sample(unet, "ddim", 20, 100, seed=1000, device="cpu", progress=False)
    out.update({f"unet d-dpm++ fd_{f}": dode.frechet_distance(x, reference, features=f, device="cpu")
                for f in FEATURES})
    out["unet d-dpm++ rmse to ddim-20"] = dode.rmse(x, reference)
    return out


if __name__ == "__main__":  # ``python tests/fingerprint.py [THREADS ...]``: the numbers on each torch thread count
    import os
    import sys

    for threads in sys.argv[1:] or [os.environ.get("DODE_NUM_THREADS", "1")]:
        os.environ["DODE_NUM_THREADS"] = threads
        for name, value in numbers().items():
            print(f"torch threads {threads}: {name}\t{float(value)!r}")
