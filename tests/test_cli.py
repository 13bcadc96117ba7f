import os
from pathlib import Path

import pytest

from cmray import cli

ROOT = Path(__file__).resolve().parents[1]


def test_config_command_prints_resolved_yaml(capsys):
    cfg = str(ROOT / "configs" / "toy2d.yaml")
    assert cli.main(["config", "toy2d", "--config", cfg, "--set", "cd.N=18"]) == 0
    out = capsys.readouterr().out
    assert "N: 18" in out and "sigma_max: 80.0" in out


def test_config_command_rejects_bad_value_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["config", "toy2d", "--set", "ct.mu_variant=mine"])
    assert exc.value.code == 2
    assert "ct.mu_variant = 'mine' is not accepted" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert "cmray 0.1.0" in capsys.readouterr().out


def test_a_search_is_checked_against_the_working_dir_from_anywhere(tmp_path, monkeypatch):
    from cmray.config import ConfigError
    from cmray.jobs import check_config

    monkeypatch.chdir(tmp_path)  # the base config is named relative to the working dir
    config = str(ROOT / "configs" / "tune_toy2d.yaml")
    assert check_config("tune", config, [], str(ROOT)) == "configs/tune_toy2d.yaml"
    with pytest.raises(ConfigError, match=r"configs/nope\.yaml"):
        check_config("tune", config, ["base=configs/nope.yaml"], str(ROOT))
    assert Path.cwd() == tmp_path


@pytest.mark.parametrize("suite", ["digits", "ring"])
def test_a_study_is_checked_row_by_row_before_it_is_submitted(suite, tmp_path, monkeypatch):
    from cmray.config import ConfigError
    from cmray.jobs import check_config

    monkeypatch.chdir(tmp_path)  # its configs are named relative to the working dir
    config = str(ROOT / "configs" / f"reproduce_{suite}.yaml")
    assert check_config("reproduce", config, [], str(ROOT)) == f"configs/reproduce_{suite}.yaml"
    bad = "students.rows=[{name: A, set: [optim.lr=-1]}]"
    with pytest.raises(ConfigError, match=r"space variant = 'A'"):
        check_config("reproduce", config, [bad], str(ROOT))
    assert not (tmp_path / "runs").exists()  # nothing written by the check


def test_submit_sends_the_clusters_token_when_the_machine_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmray.cluster import use_cluster_token

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(var, "")  # recorded, so the end of the test restores each
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not use_cluster_token() and "RAY_AUTH_MODE" not in os.environ  # no token: no auth
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")  # what `ray start` writes
    assert use_cluster_token() and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a user's explicit choice stands
    assert not use_cluster_token() and os.environ["RAY_AUTH_MODE"] == "disabled"
