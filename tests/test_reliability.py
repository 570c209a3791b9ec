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
