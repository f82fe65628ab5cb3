"""Getting a checkpoint: a local folder, the local Hugging Face cache, or the hub, failing fast and clearly offline.

``fetch`` and ``is_available`` serve models, pipelines and saved schedulers alike; ``ModelNotFoundError`` is the
one error for "cannot be had here". Imports nothing from dode.
"""
from __future__ import annotations

import socket
from pathlib import Path


class ModelNotFoundError(OSError):
    """A model name, folder or hub id that cannot be loaded."""


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection within ``timeout`` seconds (offline: fail fast)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: without network, fail in seconds, not after minutes of retries."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and url_reachable(constants.ENDPOINT, timeout)


def is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def is_available(name_or_path) -> bool:
    """Whether ``fetch`` can get it here without waiting: a local folder, a hub id with a copy in the local cache,
    or any hub id while the hub answers."""
    from huggingface_hub import snapshot_download

    name = str(name_or_path)
    if Path(name).expanduser().exists():
        return True
    if not is_hub_id(name):
        return False
    try:
        snapshot_download(name, local_files_only=True)
    except Exception:  # not in the cache (huggingface_hub raises several kinds)
        return _hub_reachable()
    return True


def fetch(load, name_or_path, what: str = "diffusers UNet2DModel", loader: str = "dode.load_model"):
    """``load(path_or_id, **kwargs)`` on a local folder, else on a hub id from the local cache, else from the hub.

    Raises ``ModelNotFoundError`` at once when none has it, offline saying how to use a local folder instead
    (``loader`` names the function to pass the folder to).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        try:
            return load(str(path))
        except Exception as err:
            raise ModelNotFoundError(f"{str(path)!r} is not a loadable {what} folder: {err}") from err
    if not is_hub_id(name):
        raise ModelNotFoundError(f"unknown model {name!r}: not an existing folder, and not a hub id of the form "
                                 "'owner/name'")
    try:  # a copy in the local hub cache needs no network
        return load(name, local_files_only=True)
    except Exception:
        pass
    advice = (f"Download it on a machine with network access (e.g. `huggingface-cli download {name} --local-dir "
              f"./my-model`), copy the folder here and call {loader}('./my-model'). (No local folder named {name!r} "
              "exists either.)")
    if not _hub_reachable():
        raise ModelNotFoundError(f"cannot download {name!r}: the Hugging Face hub is unreachable (offline?). {advice}")
    try:
        return load(name)
    except Exception as err:  # huggingface_hub raises several kinds; all mean "could not get it"
        raise ModelNotFoundError(f"could not download {name!r} ({type(err).__name__}: {err}). {advice}") from err
