"""Staging of pretrained weight files (LPIPS backbones now, the Inception FID network later).

Training machines are offline: nothing here ever downloads from the internet. A weight file is
either already in the torch hub cache (where torchvision looks for it), at a local path, or at an
fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``) from which it is copied into the
cache. Anything else raises :class:`WeightsNotFoundError` with a one-line message saying which
file is missing, where it should go and where the official copy can be downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import torch

from cmray.storage import local_temp_beside

if TYPE_CHECKING:
    from cmray.core.lpips import LPIPSDistance

# net name -> (file name torchvision expects in the hub cache, official download URL).
KNOWN_WEIGHTS: dict[str, tuple[str, str]] = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": (
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    ),
}

LPIPS_DESCRIPTION = "LPIPS backbone weights"
LPIPS_SETTING = "metric.lpips_weights"


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weight file is neither cached, at the given path, nor at the given URL."""


def torch_hub_checkpoint_path(filename: str) -> Path:
    """Where torchvision/torch.hub look for ``filename``; honours ``$TORCH_HOME``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def missing_weights_message(
    description: str,
    filename: str,
    looked_at: str | os.PathLike[str],
    download_url: str | None,
    setting: str | None = None,
) -> str:
    """One-line, actionable explanation of a missing weight file.

    Kept to one line so it survives log collectors and Ray's exception summaries intact.
    """
    cache_path = torch_hub_checkpoint_path(filename)
    looked_at = str(looked_at)
    where = "there" if looked_at == str(cache_path) else str(cache_path)
    fetch = f"download {download_url}" if download_url else f"obtain '{filename}'"
    msg = (
        f"{description} '{filename}' not found at {looked_at}; "
        f"this machine is offline: {fetch} and put it {where}"
    )
    if setting:
        msg += f", or set {setting} to a local path or fsspec URL (s3://bucket/path/{filename})"
    return " ".join(msg.splitlines())


def _default_download_url(filename: str) -> str | None:
    for known_filename, url in KNOWN_WEIGHTS.values():
        if known_filename == filename:
            return url
    return None


def _is_url(source: str) -> bool:
    return "://" in source


def _copy_atomically(fs: fsspec.AbstractFileSystem, remote_path: str, dest: Path) -> None:
    # Concurrent workers on one node must never see (or load) a half-written weight file.
    with local_temp_beside(dest) as tmp:
        fs.get_file(remote_path, tmp)


def _stage_from_url(url: str, dest: Path, not_found: WeightsNotFoundError) -> Path:
    fs, remote_path = fsspec.core.url_to_fs(url)
    if not fs.isfile(remote_path):
        raise not_found
    remote_size = fs.size(remote_path)
    # Weight files are immutable releases, so an equal size is taken as "already staged"; this
    # saves re-downloading hundreds of MB on every worker start.
    if dest.is_file() and remote_size is not None and dest.stat().st_size == remote_size:
        return dest
    _copy_atomically(fs, remote_path, dest)
    return dest


def stage_weights(
    filename: str,
    source: str | os.PathLike[str] | None = None,
    *,
    description: str = "pretrained weights",
    download_url: str | None = None,
    setting: str | None = None,
) -> Path:
    """Return a local path holding the weight file ``filename``.

    ``source`` is None (the file must already be in the torch hub cache), a local file path (used
    in place), or an fsspec URL (copied into the hub cache unless already there with the same
    size). ``description``, ``download_url`` and ``setting`` only shape the error message;
    ``download_url`` defaults to the official URL of a file in :data:`KNOWN_WEIGHTS`.
    """
    cache_path = torch_hub_checkpoint_path(filename)
    url = download_url or _default_download_url(filename)

    def not_found(looked_at: str | os.PathLike[str]) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            missing_weights_message(description, filename, looked_at, url, setting)
        )

    if source is None:
        if cache_path.is_file():
            return cache_path
        raise not_found(cache_path)

    source = os.fspath(source)
    if _is_url(source):
        return _stage_from_url(source, cache_path, not_found(source))

    local = Path(source).expanduser()
    if local.is_file():
        return local
    raise not_found(local)


def stage_lpips_backbone(net: str = "vgg", source: str | os.PathLike[str] | None = None) -> Path:
    """Stage the torchvision ImageNet backbone file that LPIPS ``net`` ('vgg' or 'alex') needs."""
    if net not in KNOWN_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(KNOWN_WEIGHTS)}")
    filename, url = KNOWN_WEIGHTS[net]
    return stage_weights(
        filename, source, description=LPIPS_DESCRIPTION, download_url=url, setting=LPIPS_SETTING
    )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict on CPU; ``weights_only`` refuses pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lpips(net: str = "vgg", source: str | os.PathLike[str] | None = None) -> LPIPSDistance:
    """Build the frozen LPIPS metric from staged backbone weights (no network access)."""
    from cmray.core.lpips import LPIPSDistance

    path = stage_lpips_backbone(net, source)
    return LPIPSDistance(load_state_dict(path), net=net)
