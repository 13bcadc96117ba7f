"""Fashion-MNIST from its official idx.gz files: reading, checks, download, shards with labels.

The tests write small files in the official layout; the real files (Debian's
dataset-fashion-mnist, or the public location) go through the same code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import decode_png, read_shard_samples

from cmray.config import ConfigError
from cmray.data import fashion
from cmray.data.config import PrepareConfig
from cmray.data.prepare import prepare
from cmray.data.sources import parse_source


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Images and labels as the official files: big-endian magic and sizes, then uint8 data."""
    images_name, labels_name = fashion.SPLITS[split]
    head = struct.pack(">IIII", fashion.IMAGES_MAGIC, len(images), 28, 28)
    (folder / images_name).write_bytes(gzip.compress(head + images.astype(np.uint8).tobytes()))
    head = struct.pack(">II", fashion.LABELS_MAGIC, len(labels))
    (folder / labels_name).write_bytes(gzip.compress(head + labels.astype(np.uint8).tobytes()))


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (25, 28, 28), dtype=np.uint8)
    labels = np.arange(25) % 10
    folder = tmp_path / "fm"
    folder.mkdir()
    write_idx(folder, "train", images, labels)
    return folder, images, labels


def test_the_source_reads_images_and_labels_in_order(small) -> None:
    folder, images, _ = small
    source = parse_source(f"fashion-mnist:{folder}")
    assert len(source) == 25 and source.spec == f"fashion-mnist:{folder}"
    records = list(source.read({"start": 3, "count": 2}))
    assert [r[0] for r in records] == ["fashion-00003", "fashion-00004"]
    np.testing.assert_array_equal(np.asarray(records[0][1]), images[3])
    assert [r[2] for r in records] == [3, 4]


def test_shards_carry_the_class_labels(small, tmp_path: Path) -> None:
    folder, _, labels = small
    out = tmp_path / "shards"
    cfg = PrepareConfig(source=f"fashion-mnist:{folder}", out=str(out), resolution=16, workers=-1)
    manifest = prepare(cfg, log=lambda _: None)
    assert manifest.count == 25
    samples = {}
    for shard in manifest.shards:
        samples.update(read_shard_samples(out / shard.name))
    for sample in samples.values():
        index = int(json.loads(sample["json"])["source_key"].split("-")[1])
        assert int(sample["cls"]) == labels[index]
        assert decode_png(sample["png"]).shape[:2] == (16, 16)


def test_missing_and_corrupt_files_are_one_line_errors_saying_how_to_get_them(
    small,
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist") as missing:
        parse_source(f"fashion-mnist:{tmp_path / 'nowhere'}")
    assert "\n" not in str(missing.value)
    folder, _, _ = small
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="not a readable gzip file"):
        len(parse_source(f"fashion-mnist:{folder}"))
    write_idx(folder, "train", np.zeros((3, 28, 28)), np.array([1, 2, 11]))
    with pytest.raises(ConfigError, match=r"labels in 0\.\.9"):
        fashion.load_split("train", str(folder))
    images_file = folder / "train-images-idx3-ubyte.gz"
    images_file.write_bytes(gzip.compress(gzip.decompress(images_file.read_bytes())[:-5]))
    with pytest.raises(ConfigError, match="not an idx file"):
        fashion.load_split("train", str(folder))


def test_a_download_is_checked_and_lands_whole_or_not_at_all(small, tmp_path: Path) -> None:
    mirror, _, _ = small
    name = "train-labels-idx1-ubyte.gz"
    good = {name: hashlib.sha256(gzip.decompress((mirror / name).read_bytes())).hexdigest()}
    dest = tmp_path / "cache"
    got = fashion.fetch(name, dest, base_url=mirror.as_uri(), digests=good)
    assert got.read_bytes() == (mirror / name).read_bytes()
    got.unlink()
    with pytest.raises(ConfigError, match="is corrupt"):
        fashion.fetch(name, dest, base_url=mirror.as_uri(), digests={name: "0" * 64})
    with pytest.raises(ConfigError, match="could not download"):
        fashion.fetch(name, dest, base_url=(tmp_path / "none").as_uri(), digests=good)
    assert list(dest.iterdir()) == []  # no file, no .part


def test_the_official_digests_are_the_decompressed_files() -> None:
    """Where Debian's package is installed, its files (recompressed) hold the official data."""
    folder = Path(fashion.DEBIAN_DIR)
    if not folder.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    for name, digest in fashion.DIGESTS.items():
        assert hashlib.sha256(gzip.decompress((folder / name).read_bytes())).hexdigest() == digest


def test_the_fashion_classifier_trains_deterministically_and_loads(tmp_path: Path) -> None:
    """The real training code on small files in the official layout (both splits)."""
    from cmray.eval.digits_classifier import save_digits_classifier
    from cmray.eval.fashion_classifier import (
        FashionClassifier,
        load_fashion_classifier,
        train_fashion_classifier,
    )
    from cmray.eval.features import load_feature_net

    rng = np.random.default_rng(1)
    for split, n in (("train", 64), ("test", 32)):
        labels = np.arange(n) % 10
        # Class-dependent brightness: something learnable in one epoch.
        images = (rng.integers(0, 40, (n, 28, 28)) + 20 * labels[:, None, None]).astype(np.uint8)
        write_idx(tmp_path, split, images, labels)
    first, metrics = train_fashion_classifier(seed=2, epochs=1, path=str(tmp_path))
    second, _ = train_fashion_classifier(seed=2, epochs=1, path=str(tmp_path))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["train_loss"] > 0
    save_digits_classifier(first, tmp_path / "f.pt")
    loaded = load_fashion_classifier(tmp_path / "f.pt")
    assert isinstance(loaded, FashionClassifier) and loaded.frechet_name == "fd_fashion"
    net = load_feature_net("fashion", str(tmp_path / "f.pt"))
    pool, logits = net(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert pool.shape == (2, 64) and logits.shape == (2, 10)
    from cmray.weights import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match=r"cmray\.eval\.fashion_classifier --out"):
        load_fashion_classifier(tmp_path / "missing.pt")


def test_the_shipped_classifier_reads_the_real_test_set() -> None:
    """The shipped weights on Fashion-MNIST's 10,000 test images (`make test` installs Debian's
    files where it can): 85.9% when they were trained."""
    from cmray.eval.digits_classifier import accuracy
    from cmray.eval.fashion_classifier import SHIPPED_PATH, fashion_images, load_fashion_classifier

    if not Path(fashion.DEBIAN_DIR, fashion.SPLITS["test"][0]).is_file():
        pytest.skip("Fashion-MNIST's files are not installed (make fashion-data)")
    images, labels = fashion_images("test")
    assert SHIPPED_PATH.stat().st_size < 500_000
    assert accuracy(load_fashion_classifier(), images, labels) > 0.84
