"""Tests for cmray.config: YAML + dotted overrides into validated dataclasses."""

# RUF009 cannot see that param() returns a dataclasses.field; the project-wide fix is
# [tool.ruff.lint.flake8-bugbear] extend-immutable-calls = ["cmray.config.param"].

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from cmray.config import (
    ConfigError,
    add_config_args,
    apply_overrides,
    config_from_args,
    config_help,
    dump_yaml,
    exit_on_config_error,
    flatten,
    from_dict,
    load_config,
    param,
    save_config,
    to_dict,
)


@dataclass
class TrainConfig:
    lr: float = param(2e-4, help="Adam learning rate", gt=0)
    batch_size: int = param(64, help="global batch size", ge=1)
    steps: int = param(1000, help="optimizer steps", ge=0)


@dataclass
class CDConfig:
    mu: float = param(0.95, help="EMA decay of the target network", ge=0, lt=1)
    metric: Literal["l1", "l2", "lpips", "pseudo_huber"] = param("lpips", help="distance d(x, y)")
    channels: tuple[int, ...] = param((64, 128), help="UNet channels per level", ge=1)
    seed: int | None = param(None, help="RNG seed; null draws one")
    sigma_data: float | None = param(0.5, help="data std; null estimates it", gt=0)
    use_ema: bool = param(True, help="sample from the EMA weights")
    tags: list[str] = param(default_factory=list, help="free-form run tags")
    sampler: str = param("onestep", help="sampler name", choices=("onestep", "multistep"))


@dataclass
class Experiment:
    name: str = param("demo", help="run name")
    train: TrainConfig = param(default_factory=TrainConfig, help="optimizer settings")
    cd: CDConfig = param(default_factory=lambda: CDConfig(mu=0.9), help="distillation settings")


@dataclass
class Required:
    lr: float = param(help="no default on purpose")


@dataclass
class NeedsRequired:
    train: Required = param(help="section without a default")


@dataclass
class Window:
    lo: float = param(0.0, help="window start")
    hi: float = param(1.0, help="window end")

    def __post_init__(self) -> None:
        if self.lo >= self.hi:
            raise ConfigError(f"window.lo = {self.lo} must be below window.hi = {self.hi}")


@dataclass
class Pair:
    size: tuple[int, int] = param((32, 32), help="height and width", ge=1)


@dataclass
class Undocumented:
    x: int = 1


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def message(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, "config errors must be one line"
    assert text.startswith("config error: ")
    return text


# ---------------------------------------------------------------- defaults and loading


def test_defaults_when_no_file_and_no_overrides() -> None:
    cfg = load_config(Experiment, None)
    assert cfg.train == TrainConfig()
    assert cfg.cd.mu == 0.9  # the default_factory's instance, not the class default
    assert cfg.cd.channels == (64, 128)
    assert cfg.cd.tags == []


def test_yaml_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.001\ncd:\n  channels: [32, 64, 96]\n")
    cfg = load_config(Experiment, path)
    assert cfg.train.lr == 0.001
    assert cfg.train.batch_size == 64  # untouched keys keep defaults
    assert cfg.cd.channels == (32, 64, 96)  # a YAML list becomes the declared tuple
    assert cfg.cd.mu == 0.9  # a partial section keeps the default instance's other values


def test_set_beats_yaml_and_later_set_beats_earlier(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.001\n  steps: 5\n")
    cfg = load_config(Experiment, path, ["train.lr=0.5", "train.steps=7", "train.steps=9"])
    assert cfg.train.lr == 0.5
    assert cfg.train.steps == 9


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_config(Experiment, write(tmp_path, "")) == load_config(Experiment, None)
    cfg = load_config(Experiment, write(tmp_path, "train:\n", "b.yaml"), ["train.steps=3"])
    assert cfg.train == TrainConfig(steps=3)


# ---------------------------------------------------------------- coercion


def test_exponent_string_is_accepted_as_float(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-4 without a dot as the string "1e-4".
    path = write(tmp_path, "train:\n  lr: 1e-4\n")
    assert load_config(Experiment, path).train.lr == pytest.approx(1e-4)
    assert load_config(Experiment, None, ["train.lr=3e-5"]).train.lr == pytest.approx(3e-5)


def test_int_accepted_for_float_and_stored_as_float() -> None:
    cfg = from_dict(Experiment, {"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_integral_values_accepted_for_int_fields() -> None:
    cfg = from_dict(Experiment, {"train": {"steps": "1e6", "batch_size": 128.0}})
    assert cfg.train.steps == 1_000_000 and isinstance(cfg.train.steps, int)
    assert cfg.train.batch_size == 128 and isinstance(cfg.train.batch_size, int)


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("no", False), ("'yes'", True), ("0", False)]
)
def test_bool_words(text: str, expected: bool) -> None:
    assert load_config(Experiment, None, [f"cd.use_ema={text}"]).cd.use_ema is expected


def test_optional_accepts_null_and_value() -> None:
    assert load_config(Experiment, None, ["cd.seed=7"]).cd.seed == 7
    assert load_config(Experiment, None, ["cd.sigma_data=null"]).cd.sigma_data is None


def test_list_and_fixed_tuple() -> None:
    cfg = load_config(Experiment, None, ["cd.tags=[a, b]"])
    assert cfg.cd.tags == ["a", "b"]
    assert from_dict(Pair, {"size": [16, 8]}).size == (16, 8)
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Pair, {"size": [16, 8, 4]})
    assert "size = [16, 8, 4] has the wrong type; expected a list of 2 ints" in message(excinfo)


# ---------------------------------------------------------------- error messages


def test_unknown_key_names_full_dotted_key_and_accepted_keys() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["train.lrr=0.1"])
    assert message(excinfo) == (
        "config error: unknown key 'train.lrr' (accepted keys in 'train': batch_size, lr, steps)"
    )
    assert excinfo.value.key == "train.lrr"


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Experiment, {"trian": {}})
    assert message(excinfo) == (
        "config error: unknown key 'trian' (accepted keys at top level: cd, name, train)"
    )


def test_wrong_type_message() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["train.lr=abc"])
    assert message(excinfo) == "config error: train.lr = 'abc' has the wrong type; expected a float"


def test_wrong_type_for_optional_mentions_null() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Experiment, {"cd": {"seed": "x"}})
    assert message(excinfo).endswith("cd.seed = 'x' has the wrong type; expected an int or null")


def test_wrong_type_inside_tuple_names_the_element() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Experiment, {"cd": {"channels": [64, "wide"]}})
    assert "cd.channels[1] = 'wide' has the wrong type; expected an int" in message(excinfo)


def test_section_given_a_scalar() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Experiment, {"train": 3})
    assert "train = 3 has the wrong type; expected a mapping" in message(excinfo)


def test_out_of_range_message() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["cd.mu=1.5"])
    assert message(excinfo) == "config error: cd.mu = 1.5 is out of range; accepted: 0 <= value < 1"


def test_one_sided_range_and_elementwise_tuple_range() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["train.batch_size=0"])
    assert message(excinfo).endswith("train.batch_size = 0 is out of range; accepted: value >= 1")
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["cd.channels=[64, 0]"])
    assert "cd.channels[1] = 0 is out of range" in message(excinfo)


def test_literal_choice_message() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["cd.metric=l3"])
    assert message(excinfo) == (
        "config error: cd.metric = 'l3' is not accepted; choose one of: l1, l2, lpips, pseudo_huber"
    )


def test_param_choices_message() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Experiment, {"cd": {"sampler": "euler"}})
    assert message(excinfo).endswith("choose one of: onestep, multistep")


@pytest.mark.parametrize("value", [True, "true"])
def test_bool_not_accepted_for_int(value: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Experiment, {"train": {"steps": value}})
    assert "train.steps = " in message(excinfo)
    assert "has the wrong type; expected an int" in message(excinfo)


def test_bool_not_accepted_for_float_nor_fraction_for_int() -> None:
    with pytest.raises(ConfigError, match="expected a float"):
        from_dict(Experiment, {"train": {"lr": False}})
    with pytest.raises(ConfigError, match=r"train\.steps = 1\.5 has the wrong type"):
        from_dict(Experiment, {"train": {"steps": 1.5}})


def test_number_not_accepted_for_string() -> None:
    # YAML has already turned 0123 into 83; refusing beats silently storing "83".
    with pytest.raises(ConfigError, match="name = 83 has the wrong type; expected a string"):
        load_config(Experiment, None, ["name=0123"])
    assert load_config(Experiment, None, ["name='0123'"]).name == "0123"


def test_missing_required_field_names_dotted_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(NeedsRequired, {})
    assert message(excinfo) == "config error: 'train.lr' is required"
    assert from_dict(NeedsRequired, {"train": {"lr": 0.1}}).train.lr == 0.1


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", ".lr=3"])
def test_malformed_set(bad: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_overrides({}, [bad])
    assert message(excinfo) == f"config error: --set {bad!r} needs the form key=value"


def test_set_into_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'train\.lr' is a value, not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, missing)
    assert message(excinfo) == f"config error: config file '{missing}' does not exist"


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, path)
    assert "is not valid YAML" in message(excinfo)
    assert "line" in message(excinfo)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping of sections, got a list"):
        load_config(Experiment, write(tmp_path, "- 1\n- 2\n"))


def test_post_init_config_error_propagates() -> None:
    assert from_dict(Window, {"lo": 0.2}).lo == 0.2
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Window, {"lo": 2})
    assert message(excinfo) == "config error: window.lo = 2.0 must be below window.hi = 1.0"


def test_config_error_survives_pickling() -> None:
    # Ray ships exceptions between processes by pickling them.
    with pytest.raises(ConfigError) as excinfo:
        load_config(Experiment, None, ["train.lr=abc"])
    clone = pickle.loads(pickle.dumps(excinfo.value))
    assert isinstance(clone, ConfigError)
    assert str(clone) == str(excinfo.value)
    assert clone.key == "train.lr"


# ---------------------------------------------------------------- declaration checks


def test_param_records_help_and_constraints() -> None:
    field = {f.name: f for f in dataclasses.fields(CDConfig)}["mu"]
    assert field.metadata["help"] == "EMA decay of the target network"
    assert (field.metadata["ge"], field.metadata["lt"]) == (0, 1)
    with pytest.raises(TypeError, match="help"):
        param(1, help=" ")


def test_field_without_param_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match=r"Undocumented\.x must be declared with param"):
        from_dict(Undocumented, {})


def test_config_help_lists_every_leaf() -> None:
    text = config_help(Experiment)
    assert "train.lr (a float; default 0.0002; accepted: value > 0): Adam learning rate" in text
    # the section's default_factory instance sets mu=0.9, overriding the class default 0.95
    assert "cd.mu (a float; default 0.9; accepted: 0 <= value < 1)" in text
    assert "cd.channels (a list of ints; default [64, 128]; accepted: value >= 1)" in text
    assert len(text.splitlines()) == len(flatten(load_config(Experiment, None)))


# ---------------------------------------------------------------- output


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        Experiment, None, ["cd.seed=3", "cd.tags=[x, '1']", "train.lr=1e-8", "name='007'"]
    )
    data = to_dict(cfg)
    assert data["cd"]["channels"] == [64, 128]  # tuples become lists
    text = dump_yaml(cfg)
    assert text.index("name:") < text.index("train:") < text.index("cd:")  # field order
    assert "channels: [64, 128]" in text
    assert load_config(Experiment, write(tmp_path, text)) == cfg


def test_save_config_is_atomic_and_reloads_equal(tmp_path: Path) -> None:
    cfg = load_config(Experiment, None, ["train.steps=42"])
    path = save_config(cfg, tmp_path / "runs" / "resolved.yaml")
    assert load_config(Experiment, path) == cfg
    assert sorted(p.name for p in path.parent.iterdir()) == ["resolved.yaml"]  # no tmp left


def test_save_config_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "train:\n  steps: 1\n", "resolved.yaml")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        save_config(load_config(Experiment, None), path)
    assert path.read_text() == "train:\n  steps: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"]


def test_flatten_gives_dotted_scalar_keys() -> None:
    flat = flatten(load_config(Experiment, None))
    assert flat["train.lr"] == 2e-4
    assert flat["cd.channels"] == "[64, 128]"
    assert flat["cd.seed"] is None
    assert "train" not in flat and "cd" not in flat
    assert flatten({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": 1}


# ---------------------------------------------------------------- command line


def make_parser(default_config: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train")
    add_config_args(parser, default_config)
    return parser


def test_config_from_args(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 5\n")
    args = make_parser(str(path)).parse_args(["--set", "train.lr=0.01", "--set", "cd.mu=0.5"])
    cfg = config_from_args(Experiment, args)
    assert (cfg.train.steps, cfg.train.lr, cfg.cd.mu) == (5, 0.01, 0.5)


def test_config_flag_beats_default_config(tmp_path: Path) -> None:
    default = write(tmp_path, "train:\n  steps: 5\n", "default.yaml")
    other = write(tmp_path, "train:\n  steps: 6\n", "other.yaml")
    args = make_parser(str(default)).parse_args(["--config", str(other)])
    assert config_from_args(Experiment, args).train.steps == 6


def test_print_config_prints_yaml_and_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = make_parser().parse_args(["--set", "train.steps=11", "--print-config"])
    with pytest.raises(SystemExit) as excinfo:
        config_from_args(Experiment, args)
    assert excinfo.value.code == 0
    printed = capsys.readouterr().out
    assert "steps: 11" in printed
    assert load_config(Experiment, write(tmp_path, printed)).train.steps == 11


def test_exit_on_config_error_prints_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    @exit_on_config_error
    def main(argv: list[str]) -> int:
        config_from_args(Experiment, make_parser().parse_args(argv))
        return 0

    assert main([]) == 0
    assert main.__name__ == "main"
    with pytest.raises(SystemExit) as excinfo:
        main(["--set", "cd.metric=l3"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "config error: cd.metric = 'l3' is not accepted; "
        "choose one of: l1, l2, lpips, pseudo_huber\n"
    )
