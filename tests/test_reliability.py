"""Nothing lost, ever (issue #17): each way a run or the app could lose work, hang or end in a traceback,
checked on tiny offline models (64 px, CPU). The seeded SIGKILL schedule is in test_fault_injection.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flatlora_diffusion import cli
from flatlora_diffusion.config import ConfigError, config_from_args, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ==========================================================================================================
# 9. every numeric setting has a range, in the one definition (flags, YAML and the web form all get it)
# ==========================================================================================================
BASE = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "/nonexistent"]


@pytest.mark.parametrize("flag,value,fragment", [
    ("--max_grad_norm", "-1", "--max_grad_norm must be in (0"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number"),
    ("--learning_rate", "inf", "--learning_rate must be a finite number"),
    ("--lr_warmup_steps", "-5", "--lr_warmup_steps must be in [0"),
    ("--flat_sigma", "50", "--flat_sigma must be in [0, 1]"),
    ("--resolution", "1000000", "--resolution must be in [8, 8192]"),
    ("--rank", "100000", "--rank must be in [1, 1024]"),
    ("--adam_beta1", "2", "--adam_beta1 must be in [0, 1)"),
    ("--seed", "-1", "--seed must be in [0, 4294967295]"),
    ("--dataloader_num_workers", "-2", "--dataloader_num_workers must be in [0, 256]"),
    ("--text_encoder_lr", "-1e-4", "--text_encoder_lr"),
    ("--adam_epsilon", "0", "--adam_epsilon"),
])
def test_numeric_settings_out_of_range_are_refused_by_flag_yaml_and_form(tmp_path, flag, value, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        config_from_args(BASE + [flag, value])
    assert fragment in str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{flag[2:]}: {value if value not in ('nan', 'inf') else '.' + value}\n")
    with pytest.raises(ConfigError) as e:
        config_from_args(BASE + ["--config", str(cfg)])
    assert fragment in str(e.value)
    from app.submit import prepare_runs  # the web form goes through make_config too

    with pytest.raises(ConfigError) as e:
        prepare_runs(tmp_path / "runs", {"pretrained_model_name_or_path": "org/model", "dataset_name": "x/y",
                                         flag[2:]: float(value) if "." in value or value in ("nan", "inf") or "e" in value
                                         else int(value)})
    assert fragment in str(e.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_abbreviated_and_empty_flags_are_refused(capsys):
    err = _one_line_error(capsys, ["train", *BASE, "--learning_rat", "1e-4"])
    assert "unknown flag --learning_rat; did you mean --learning_rate?" in err
    err = _one_line_error(capsys, ["train", *BASE, "--output_dir", ""])
    assert "--output_dir must name a folder" in err


# ==========================================================================================================
# 6. YAML: no aliases ("billion laughs"), bounded size
# ==========================================================================================================
BILLION_LAUGHS = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8)) + "instance_prompt: *i\n"


def test_yaml_aliases_and_huge_files_are_refused_by_train_config_and_preset_upload(tmp_path, capsys):
    evil = tmp_path / "evil.yaml"
    evil.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 1500
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(evil)
    err = _one_line_error(capsys, ["train", "--config", str(evil)])
    assert "aliases" in err
    from app.form import load_preset

    with pytest.raises(ConfigError, match="aliases"):
        load_preset(evil)
    big = tmp_path / "big.yaml"
    big.write_text("instance_prompt: '" + "x" * (2 * 1024 * 1024) + "'\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_yaml(big)
    # an anchor without alias is harmless and still fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("rank: &r 8\n")
    assert load_yaml(ok) == {"rank": 8}
