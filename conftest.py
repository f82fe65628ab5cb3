"""Repository-wide pytest configuration (tests/ and nbval over notebooks/).

A notebook whose ``parameters`` cell sets ``model_name`` to a pretrained model (not an embedded one) is skipped where that
model cannot be had (offline, not in the local Hugging Face cache, no such folder) or where there is no GPU for
its full-size defaults; run such a notebook with papermill instead (see its first cell).
"""
from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def _notebook_skip_reason(path) -> str | None:
    import nbformat

    import dode

    for cell in nbformat.read(path, as_version=4).cells:
        if "parameters" in cell.metadata.get("tags", []):
            parameters = {}
            exec(cell.source, parameters)
            break
    else:
        return None
    model_name = parameters.get("model_name")
    if model_name is None or model_name in dode.MODELS:
        return None
    if not dode.models.registry.is_available(model_name):
        return (f"{model_name!r} cannot be had here (offline, not in the local Hugging Face cache, no such folder); "
                "run the notebook with papermill and model_name=<local folder>")
    if not torch.cuda.is_available():
        return "its defaults need a GPU; run it with papermill and smaller parameters on a CPU"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.suffix == ".ipynb":
            reason = _notebook_skip_reason(item.path)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, and then do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
