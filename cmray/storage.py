"""fsspec helpers shared by the data writer, the stream and weight staging.

Every URL fsspec understands works: a plain path, ``file://``, ``s3://``, ``gs://``. S3 endpoints
and credentials come from the usual AWS environment (``AWS_ENDPOINT_URL``, instance roles), so
the same code runs against AWS, an S3-compatible store, or a loopback test server.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it."""
    return fsspec.core.url_to_fs(url)


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's cwd); URLs as given."""
    return path if not path or "://" in path else str(Path(path).resolve())


def join_url(base: str, *names: str) -> str:
    """``base/name`` for paths and URLs alike (``s3://b/p`` + ``x.tar`` -> ``s3://b/p/x.tar``)."""
    return "/".join([base.rstrip("/"), *names])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def local_temp_beside(dest: str | os.PathLike[str]) -> Iterator[str]:
    """A temp file next to ``dest`` that replaces it on success and vanishes on failure.

    Being in the same directory makes ``os.replace`` an atomic rename, so readers see the old
    file or the complete new one, never a half-written one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards and manifests are meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_file_atomic(local_file: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Upload ``local_file`` so ``path`` appears only when complete.

    Object stores (S3, GCS) publish an object only when its upload completes, so a direct put
    is already atomic there; local and network filesystems get a temp file and a rename.
    """
    if is_local(fs):
        with local_temp_beside(path) as tmp:
            fs.put_file(local_file, tmp)
    else:
        fs.put_file(local_file, path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (see ``put_file_atomic``)."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        with local_temp_beside(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    else:
        fs.pipe_file(path, data)
