"""Where dode runs: the device (``resolve_device``), torch's CPU threads (``use_threads``) and the shipped weights.

The bottom layer with ``schedule`` and ``hub``: it imports nothing from dode.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

#: Weights trained by this project and shipped with the package (``make models`` retrains them).
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when there is a GPU, else the CPU; a device this machine does not have is a ValueError
    that says so (rather than torch's assertion deep inside the first model call)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N' ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} asked for, but this torch build sees no CUDA GPU "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='auto' "
                             "or 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but Apple's MPS backend is not available here; use 'cpu'")
    return device


#: the environment variable that sets dode's torch threads (``use_threads``)
THREADS_ENV = "DODE_NUM_THREADS"


def use_threads(num_threads: int | None = None) -> int:
    """Set torch's CPU threads for dode's tiny models (``wanted_threads``), and return the count in use.

    The embedded models run 30-80x slower with torch's default thread count on a machine with other work (their
    operations are too small to split). ``load_model`` calls it for the embedded models; the notebooks call it with
    their ``num_threads`` parameter.
    """
    num_threads = wanted_threads(num_threads)
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def wanted_threads(num_threads: int | None = None) -> int:
    """The torch threads ``use_threads`` sets: ``num_threads`` when given, else ``$DODE_NUM_THREADS``, else torch's
    own choice when ``$OMP_NUM_THREADS`` is set (the usual way to ask), else 1."""
    if num_threads is None and os.environ.get(THREADS_ENV):
        num_threads = os.environ[THREADS_ENV]
    if num_threads is None:
        return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else 1
    try:
        num_threads = int(num_threads)
    except (TypeError, ValueError):
        num_threads = 0
    if num_threads < 1:
        raise ValueError(f"num_threads (or ${THREADS_ENV}) must be a positive integer, got {num_threads!r}")
    return num_threads


def _cpu_model() -> str:
    """The CPU's name with its family, model and stepping (the name alone is often just "Xeon Processor")."""
    import platform

    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        return (f"{fields['model name']} (family {fields.get('cpu family')}, model {fields.get('model')}, "
                f"stepping {fields.get('stepping')})")
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def machine(torch_threads: int | None = None) -> dict:
    """What the last bits of a result depend on: the platform, the CPU model, numpy's and scipy's BLAS (library, kernel,
    threads), torch's CPU kernels (capability, MKL, threads: ``torch_threads``, default this process's) and the
    environment variables that steer them."""
    import platform

    import threadpoolctl

    blas = [{key: pool.get(key) for key in ("prefix", "internal_api", "version", "architecture", "num_threads",
                                             "threading_layer")}
            for pool in threadpoolctl.threadpool_info() if pool.get("user_api") == "blas"]
    steering = ("OPENBLAS_", "MKL_", "ONEDNN_", "DNNL_", "OMP_NUM_THREADS", THREADS_ENV)
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(), "blas": blas,
        "torch_cpu": {"capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch_threads or torch.get_num_threads(),
                      "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available()},
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(steering)},
    }


def describe_machine(record: dict | None) -> str:
    """One line from a ``machine()`` record (or an older record with only platform and CPUs)."""
    if not record:
        return "an unrecorded machine"
    blas = ", ".join(f"{b['prefix']} {b['version']} ({b['architecture']}, {b['num_threads']} threads)"
                     for b in record.get("blas", [])) or "not recorded"
    torch_cpu = record.get("torch_cpu")
    kernels = (f"torch on {torch_cpu['capability']}, {torch_cpu['threads']} threads" if torch_cpu
               else "torch kernels not recorded")
    env = record.get("environment") or {}
    return (f"{record.get('cpu_model', 'CPU model not recorded')}, {record.get('cpus')} CPUs, "
            f"{record.get('platform')}; BLAS {blas}; {kernels}"
            + (f"; {' '.join(f'{k}={v}' for k, v in env.items())}" if env else ""))
