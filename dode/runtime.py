"""Where dode runs: the device (``resolve_device``), torch's CPU threads (``use_threads``) and the shipped weights.

The bottom layer with ``schedule`` and ``hub``: it imports nothing from dode.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

#: Weights trained by this project and shipped with the package (``make models`` retrains them).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


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
    """Set torch's CPU threads for dode's tiny models, and return the count in use.

    The embedded models run 30-80x slower with torch's default thread count on a machine with other work (their
    operations are too small to split), so: ``num_threads`` when given, else ``$DODE_NUM_THREADS``, else torch's
    own choice when ``$OMP_NUM_THREADS`` is set (the usual way to ask), else 1. ``load_model`` calls it for the
    embedded models; the notebooks call it with their ``num_threads`` parameter.
    """
    if num_threads is None and os.environ.get(THREADS_ENV):
        num_threads = os.environ[THREADS_ENV]
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        num_threads = 1
    try:
        num_threads = int(num_threads)
    except (TypeError, ValueError):
        num_threads = 0
    if num_threads < 1:
        raise ValueError(f"num_threads (or ${THREADS_ENV}) must be a positive integer, got {num_threads!r}")
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads
