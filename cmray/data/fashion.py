"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): 70,000 greyscale 28x28 images of clothing in
10 classes, as the official four idx.gz files.

Where the files come from, in order:
1. ``fashion-mnist:PATH``: the folder given, and nothing else;
2. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``);
3. a cache folder (``$CMRAY_DATA_CACHE/fashion-mnist``, default ``~/.cache/cmray``), filled on
   first use from the files' public location (``$CMRAY_FASHION_MNIST_URL`` names a mirror).

A download is checked against the digest of its decompressed bytes (Debian recompresses the
files, so the compressed bytes differ while the data do not) and lands under its own name only
when whole. Every file read is checked for the idx layout, its size and its labels 0 to 9.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmray.config import ConfigError
from cmray.data.sources import even_chunks

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
PUBLIC_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
HOW_TO_GET = (
    "apt-get install dataset-fashion-mnist, or give fashion-mnist:PATH, a folder holding "
    "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz"
)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# (images file, labels file) of each split: 60,000 and 10,000 images.
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# SHA-256 of each file's decompressed bytes.
DIGESTS = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def cache_dir() -> Path:
    root = os.environ.get("CMRAY_DATA_CACHE") or Path.home() / ".cache" / "cmray"
    return Path(root) / "fashion-mnist"


def find_files(split: str, path: str = "", download: bool = True) -> tuple[Path, Path]:
    """The split's (images, labels) files: from ``path`` only when given, else Debian's folder,
    else the cache, downloading into it when ``download``."""
    names = SPLITS[split]
    folders = [Path(path)] if path else [Path(DEBIAN_DIR), cache_dir()]
    for folder in folders:
        if all((folder / n).is_file() for n in names):
            return folder / names[0], folder / names[1]
    if path or not download:
        where = path or f"{DEBIAN_DIR} or {cache_dir()}"
        raise ConfigError(f"fashion-mnist: no {' and '.join(names)} in {where}; {HOW_TO_GET}")
    for name in names:
        fetch(name, cache_dir())
    return cache_dir() / names[0], cache_dir() / names[1]


def fetch(name: str, dest: Path, base_url: str = "", digests: dict[str, str] = DIGESTS) -> Path:
    """Download ``name`` from the public location (or ``$CMRAY_FASHION_MNIST_URL``) into
    ``dest``, checked against ``digests``; nothing is left under ``dest/name`` unless whole."""
    import fsspec

    base = base_url or os.environ.get("CMRAY_FASHION_MNIST_URL") or PUBLIC_URL
    url = base.rstrip("/") + "/" + name
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(url, "rb") as src:
            out.write(src.read())
        found = hashlib.sha256(gzip.decompress(Path(tmp).read_bytes())).hexdigest()
        if found != digests[name]:
            raise ConfigError(f"fashion-mnist: {url} is corrupt (sha256 {found[:12]}...)")
        os.replace(tmp, dest / name)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"fashion-mnist: could not download {url} ({exc}); {HOW_TO_GET}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest / name


def _idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format): big-endian magic, ``dims`` sizes, then uint8 data."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise ConfigError(f"fashion-mnist: {path} is not a readable gzip file ({exc})") from exc
    head = np.frombuffer(raw[: 4 * (dims + 1)], dtype=">u4")
    shape = tuple(int(s) for s in head[1:])
    if len(head) != dims + 1 or head[0] != magic or len(raw) != 4 * (dims + 1) + np.prod(shape):
        raise ConfigError(f"fashion-mnist: {path} is not an idx file of the expected layout")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * (dims + 1)).reshape(shape)


def load_split(split: str = "train", path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) of a split, checked."""
    images_file, labels_file = find_files(split, path)
    images = _idx(images_file, IMAGES_MAGIC, 3)
    labels = _idx(labels_file, LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max(initial=0) > 9:
        raise ConfigError(
            f"fashion-mnist: {images_file} holds {images.shape} images and {labels_file} "
            f"{len(labels)} labels; expected N x 28 x 28 and N labels in 0..9"
        )
    return images, labels


@dataclass
class FashionMNISTSource:
    """The training split's 60,000 images with their class labels (a prepare_data source)."""

    path: str = ""
    spec: str = ""
    _cache: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.spec = self.spec or ("fashion-mnist:" + self.path if self.path else "fashion-mnist")
        find_files("train", self.path)  # a missing folder fails here, before any Ray task

    def __getstate__(self) -> dict[str, Any]:
        # Ray tasks read the files themselves: 47 MB of pixels need not travel with each.
        return {**self.__dict__, "_cache": None}

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            self._cache = load_split("train", self.path)
        return self._cache

    def __len__(self) -> int:
        return len(self._data()[1])

    def chunks(self, size: int) -> list[dict[str, int]]:
        return even_chunks(len(self), size)

    def head(self, n: int) -> Iterator[Any]:
        return self.read({"start": 0, "count": min(n, len(self))})

    def read(self, chunk: dict[str, int]) -> Iterator[Any]:
        images, labels = self._data()
        for i in range(chunk["start"], chunk["start"] + chunk["count"]):
            yield f"fashion-{i:05d}", Image.fromarray(images[i], mode="L"), int(labels[i])
