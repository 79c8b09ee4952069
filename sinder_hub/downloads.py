"""Pretrained weights that timm would download: from the local cache when they are there, and one fast
error line when they are not and the network is out of reach (instead of a minute of retries).

timm resolves a name's weights to a Hugging Face hub repo (``hf_hub_id``, or an ``hf-hub:`` spec) or to
a URL. ``weights_within_reach`` looks for them in the hub's (or torch hub's) local cache; if they are
cached, the hub client is told to stay offline while timm loads them; if not, a short connection test
to the host decides between letting timm download and a ``BackboneError`` that says how to use a
local copy instead. Use it around the load: ``with weights_within_reach(name, source): timm.create_model(...)``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .errors import BackboneError

CONNECT_TIMEOUT_S = 5.0
# the weight files timm looks for in a hub repo, in its order
HUB_WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)


def _source(name: str) -> tuple[str, str] | None:
    """``("hf-hub", repo id)`` or ``("url", url)`` of a timm name's or an ``hf-hub:`` spec's weights."""
    if name.startswith("hf-hub:"):
        return "hf-hub", name.removeprefix("hf-hub:").split("@")[0]
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        return "hf-hub", cfg.hf_hub_id
    if cfg.url:
        return "url", cfg.url
    return None


def _cached(kind: str, where: str) -> bool:
    if kind == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(where, name), str) for name in HUB_WEIGHT_FILES)
    import torch.hub

    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(where).path)).is_file()


def _unreachable(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be reached (``None`` when it can)."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


@contextlib.contextmanager
def weights_within_reach(name: str, source: str) -> Iterator[None]:
    """Raise ``BackboneError`` at once when ``name``'s pretrained weights are neither cached nor
    downloadable; keep the hub client offline inside the block when they are cached."""
    found = _source(name)
    if found is None:
        yield
        return
    kind, where = found
    if _cached(kind, where):
        with _offline():
            yield
        return
    if kind == "hf-hub":
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        else:
            endpoint = urlparse(constants.ENDPOINT)
            reason = _unreachable(endpoint.hostname, endpoint.port or 443)
        url = f"{constants.ENDPOINT}/{where}"
        local = f"`hf download {where} --local-dir DIR` where there is a network, then --model DIR"
    else:
        parsed = urlparse(where)
        reason, url = _unreachable(parsed.hostname, parsed.port or 443), where
        local = "download the file where there is a network and pass its path as --model"
    if reason is not None:
        raise BackboneError(
            f"{source}: its pretrained weights ({url}) are not in the local cache and cannot be downloaded "
            f"({reason}); {local}"
        )
    yield


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The weights are cached: the hub client need not ask the network for newer ones (no retries offline)."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
