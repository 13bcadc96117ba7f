"""Where images come from before they become shards: LSUN LMDB, an image folder, or digits.

A source is split into chunks (contiguous key ranges) that Ray tasks convert independently.
Chunks are plain JSON-able dicts so they can be shipped to tasks and fingerprinted for resume.

The bundled small set is scikit-learn's 8x8 handwritten digits (1,797 real scans): it ships
inside the scikit-learn wheel, so the CPU demo and the tests need no download, and its class
labels let the evaluation issue train a small feature network for a proxy Frechet distance.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from cmray.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_FORMS = "lmdb:PATH, folder:PATH, digits or fashion-mnist[:PATH]"

# One source record: a stable key, the image (encoded bytes or a PIL image) and a class label.
Record = tuple[str, "bytes | Image.Image", "int | None"]
Chunk = dict[str, Any]


class Source(Protocol):
    spec: str

    def __len__(self) -> int: ...

    def chunks(self, size: int) -> list[Chunk]: ...

    def read(self, chunk: Chunk) -> Iterator[Record]: ...

    def head(self, n: int) -> Iterator[Record]:
        """The first ``n`` records, without planning chunks (for probing image sizes)."""
        ...


def even_chunks(n: int, size: int) -> list[Chunk]:
    return [{"start": s, "count": min(size, n - s)} for s in range(0, n, size)]


@dataclass
class DigitsSource:
    """scikit-learn's bundled digits as 8x8 greyscale images; 16 grey levels mapped to 0..255."""

    spec: str = "digits"

    def _data(self) -> Any:
        from sklearn.datasets import load_digits

        return load_digits()

    def __len__(self) -> int:
        return len(self._data().target)

    def chunks(self, size: int) -> list[Chunk]:
        return even_chunks(len(self), size)

    def head(self, n: int) -> Iterator[Record]:
        return self.read({"start": 0, "count": min(n, len(self))})

    def read(self, chunk: Chunk) -> Iterator[Record]:
        import numpy as np

        data = self._data()
        for i in range(chunk["start"], chunk["start"] + chunk["count"]):
            pixels = np.rint(data.images[i] * (255.0 / 16.0)).astype(np.uint8)
            yield f"digits-{i:04d}", Image.fromarray(pixels, mode="L"), int(data.target[i])


@dataclass
class FolderSource:
    """Every image file under ``root``, recursively, in sorted relative-path order."""

    root: str
    spec: str = ""
    _files: list[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.spec = self.spec or f"folder:{self.root}"
        if not os.path.isdir(self.root):
            raise ConfigError(f"folder {self.root!r} does not exist", key="source")

    def files(self) -> list[str]:
        """Relative paths, listed once: a big folder is slow to walk, and planning asks twice."""
        if self._files is None:
            root = Path(self.root)
            found = (
                p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            self._files = sorted(p.relative_to(root).as_posix() for p in found)
        return self._files

    def __len__(self) -> int:
        return len(self.files())

    def chunks(self, size: int) -> list[Chunk]:
        files = self.files()
        # The file names travel with the chunk so tasks never re-list millions of files.
        return [
            dict(c, files=files[c["start"] : c["start"] + c["count"]])
            for c in even_chunks(len(files), size)
        ]

    def head(self, n: int) -> Iterator[Record]:
        return self.read({"files": self.files()[:n]})

    def read(self, chunk: Chunk) -> Iterator[Record]:
        for rel in chunk["files"]:
            yield rel, Path(self.root, rel).read_bytes(), None


@dataclass
class LmdbSource:
    """An official LSUN ``<category>_train_lmdb`` export: keys are ids, values webp/jpeg bytes."""

    path: str
    spec: str = ""

    def __post_init__(self) -> None:
        self.spec = self.spec or f"lmdb:{self.path}"
        if not os.path.isfile(os.path.join(self.path, "data.mdb")):
            raise ConfigError(f"{self.path!r} is not an LMDB folder (no data.mdb)", key="source")

    def _env(self) -> Any:
        import lmdb

        # Read-only and lock-free: many Ray tasks read the same export at once.
        return lmdb.open(self.path, readonly=True, lock=False, readahead=False, max_readers=512)

    def __len__(self) -> int:
        with self._env() as env:
            return int(env.stat()["entries"])

    def chunks(self, size: int) -> list[Chunk]:
        # LMDB has no "seek to the i-th key", so the plan records the first key of each chunk
        # (hex, to stay JSON-able) from one pass over the keys alone, which is fast.
        chunks: list[Chunk] = []
        with self._env() as env, env.begin() as txn:
            for i, key in enumerate(txn.cursor().iternext(keys=True, values=False)):
                if i % size == 0:
                    chunks.append({"start": i, "count": 0, "first_key": key.hex()})
                chunks[-1]["count"] += 1
        return chunks

    def head(self, n: int) -> Iterator[Record]:
        with self._env() as env, env.begin() as txn:
            for key, value in itertools.islice(txn.cursor().iternext(), n):
                yield key.decode("ascii", "replace"), bytes(value), None

    def read(self, chunk: Chunk) -> Iterator[Record]:
        with self._env() as env, env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_key(bytes.fromhex(chunk["first_key"])):
                raise KeyError(f"key {chunk['first_key']} vanished from {self.path}")
            for _ in range(chunk["count"]):
                yield cursor.key().decode("ascii", "replace"), bytes(cursor.value()), None
                if not cursor.next():
                    break


def parse_source(spec: str) -> Source:
    """``lmdb:PATH``, ``folder:PATH``, ``digits`` or ``fashion-mnist[:PATH]`` to a source; a
    one-line error otherwise."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return DigitsSource()
    if kind == "fashion-mnist":
        from cmray.data.fashion import FashionMNISTSource

        return FashionMNISTSource(path)
    if kind in ("lmdb", "folder") and path:
        return LmdbSource(path) if kind == "lmdb" else FolderSource(path)
    raise ConfigError(f"source {spec!r} is not one of {SOURCE_FORMS}", key="source")
