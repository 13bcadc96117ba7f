"""``manifest.json``: what a finished set of shards holds, written last so it marks completion."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from cmray.storage import join_url, url_to_fs, write_bytes_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "cmray-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    resolution: int
    encoding: str
    extension: str
    count: int
    shards: list[ShardInfo]
    source: str = ""
    fingerprint: str = ""
    skipped: int = 0
    classes: int = 0
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r} is not {FORMAT!r}")
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)


def manifest_url(root: str) -> str:
    """The manifest of the dataset at ``root``; a URL already naming a .json file is kept."""
    return root if root.endswith(".json") else join_url(root, MANIFEST_NAME)


def shard_urls(manifest: Manifest, manifest_at: str) -> list[str]:
    """Absolute URLs of the shards, which sit beside the manifest."""
    base = manifest_at.rsplit("/", 1)[0]
    return [join_url(base, s.name) for s in manifest.shards]


def read_manifest(url: str) -> Manifest:
    """Load a manifest by its URL or by the dataset directory's URL; one-line error if absent."""
    url = manifest_url(url)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no manifest at {url}: the shards are missing or unfinished")
    with fs.open(path, "rb") as fh:
        return Manifest.from_json(fh.read().decode("utf-8"))


def write_manifest(manifest: Manifest, root: str) -> str:
    url = manifest_url(root)
    write_bytes_atomic(url, manifest.to_json().encode("utf-8"))
    return url
