"""The shipped digits classifier behind the fd_digits proxy: accuracy, shapes, errors, FD."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cmray.eval.digits_classifier import (
    DIGITS_CLASSIFIER_FILE,
    SHIPPED_PATH,
    DigitsClassifier,
    accuracy,
    digits_images,
    held_out_mask,
    load_digits_classifier,
    save_digits_classifier,
    train_digits_classifier,
)
from cmray.eval.frechet import frechet_distance_of
from cmray.weights import WeightsNotFoundError


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Tiny convolutions run many times slower on two threads of a busy two-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_images()


@pytest.fixture(scope="module")
def model() -> DigitsClassifier:
    return load_digits_classifier()


def test_the_shipped_file_is_small_and_classifies_held_out_digits(
    model: DigitsClassifier, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = digits
    held = held_out_mask(len(labels))
    assert SHIPPED_PATH.name == DIGITS_CLASSIFIER_FILE
    assert SHIPPED_PATH.stat().st_size < 500_000
    assert int(held.sum()) == 360
    assert accuracy(model, images[held], labels[held]) >= 0.95


@pytest.mark.parametrize("size", [16, 32, 8])
def test_outputs_have_the_documented_shapes_and_dtypes(model: DigitsClassifier, size: int) -> None:
    images = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        pool, logits = model(images)
    assert pool.shape == (5, 64) and pool.dtype == torch.float32
    assert logits.shape == (5, 10) and logits.dtype == torch.float32


def test_a_twice_upscaled_digit_gives_the_same_features(
    model: DigitsClassifier, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # Area resizing undoes pixel replication exactly, so a 32 x 32 sample is judged as at 16.
    images = digits[0][:8]
    big = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    with torch.no_grad():
        torch.testing.assert_close(model(big)[0], model(images)[0])


def test_float_images_are_refused(model: DigitsClassifier) -> None:
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(2, 3, 16, 16))


def test_the_class_names_its_figures_as_a_proxy() -> None:
    assert DigitsClassifier.frechet_name == "fd_digits"
    assert DigitsClassifier.score_name == "classifier_score_digits"
    assert "not comparable with FID" in DigitsClassifier.description


def test_a_missing_file_names_the_file_and_the_rebuild_command(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / DIGITS_CLASSIFIER_FILE
    with pytest.raises(WeightsNotFoundError) as info:
        load_digits_classifier(str(missing))
    message = str(info.value)
    assert DIGITS_CLASSIFIER_FILE in message and str(missing) in message
    assert "python -m cmray.eval.digits_classifier --out" in message
    assert "\n" not in message


def test_a_state_dict_of_another_network_is_refused_clearly(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), wrong)
    with pytest.raises(ValueError, match="not a DigitsClassifier state dict"):
        load_digits_classifier(wrong)


def test_real_digits_are_far_closer_to_each_other_than_to_noise(
    model: DigitsClassifier, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images = digits[0]
    noise = torch.randint(
        0, 256, (900, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        real, fake = model(images)[0], model(noise)[0]
    real_vs_real = frechet_distance_of(real[0::2], real[1::2])  # two disjoint halves
    real_vs_noise = frechet_distance_of(real[0::2], fake)
    # Seen with the shipped file: about 3 against about 5,000.
    assert real_vs_real < 20
    assert real_vs_noise > 100 * real_vs_real


@pytest.mark.usefixtures("one_thread")
def test_retraining_with_the_same_seed_is_deterministic(tmp_path: Path) -> None:
    first, metrics = train_digits_classifier(seed=3, epochs=1)
    second, _ = train_digits_classifier(seed=3, epochs=1)
    assert 0.0 <= metrics["held_out_accuracy"] <= 1.0
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # What is saved is what loads, byte-identical for equal weights.
    save_digits_classifier(first, tmp_path / "a.pt")
    save_digits_classifier(second, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    loaded = load_digits_classifier(tmp_path / "a.pt")
    for name, value in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
