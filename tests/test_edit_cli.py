"""``cmray edit`` end to end on a checkpoint trained here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmray.cli import main


@pytest.fixture(scope="module")
def model_dir(digits_model: str) -> Path:
    return Path(digits_model)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("edit-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d / "in.png", d / "mask.png"


def edit(model: Path, task: str, image: Path, out: Path, *extra: str) -> int:
    """``cmray edit`` in-process; ``extra`` adds flags such as ``--mask PATH``."""
    args = ["edit", "--model", str(model), "--task", task, "--input", str(image)]
    return main([*args, "--out", str(out), *extra])


@pytest.mark.parametrize(
    ("task", "panels"),
    [
        ("inpaint", 3),
        ("colorize", 3),
        ("super_resolution", 3),
        ("stroke", 2),
        ("denoise", 3),
        ("interpolate", 8),
    ],
)
def test_every_task_writes_its_panels(
    model_dir: Path, images: tuple[Path, Path], tmp_path: Path, task: str, panels: int
) -> None:
    out = tmp_path / f"{task}.png"
    assert edit(model_dir, task, images[0], out, "--mask", str(images[1]), "--factor", "2") == 0
    width, height = Image.open(out).size
    assert (width, height) == (64 * panels, 64)  # 16x16 panels drawn 4x, nearest neighbour


def test_inpainting_keeps_the_known_pixels(
    model_dir: Path, images: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "inpaint.png"
    edit(model_dir, "inpaint", images[0], out, "--mask", str(images[1]))
    panels = np.asarray(Image.open(out).convert("RGB"))[::4, ::4]  # drawn 4x: back to 16 px
    source, result = panels[:, :16], panels[:, 32:48]
    known = np.ones((16, 16), bool)
    known[4:12, 4:12] = False
    assert np.array_equal(result[known], source[known])
    assert not np.array_equal(result[~known], source[~known])


def test_a_missing_mask_or_model_is_a_one_line_error(
    model_dir: Path, images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "x.png"
    assert edit(model_dir, "inpaint", images[0], out) == 2
    assert edit(tmp_path / "none", "stroke", images[0], out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "needs --mask" in lines[0] and "no checkpoint" in lines[1]
