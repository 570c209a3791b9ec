"""A drop-in for diffusers' train_dreambooth_lora.py / train_dreambooth_lora_sdxl.py (issue 16, item 1):
every flag of both scripts is accepted with the same meaning and default, or with a one-line warning that
it is ignored; booleans take True/False values; --optimizer is case-insensitive; --help shows defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flatlora_diffusion import cli
from flatlora_diffusion.config import IGNORED_FLAGS, TrainConfig, config_from_args

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "/nonexistent"]

# The flags of diffusers' two DreamBooth LoRA scripts (read from examples/dreambooth at the 0.40-0.42
# releases), with a value to pass ("" for a store_true flag) and the script's default. None = no default.
DIFFUSERS_FLAGS = {
    "pretrained_model_name_or_path": ("org/model", None),
    "pretrained_vae_model_name_or_path": ("org/vae", None),
    "revision": ("main", None),
    "variant": ("fp16", None),
    "tokenizer_name": ("org/tok", None),
    "dataset_name": ("org/data", None),
    "dataset_config_name": ("default", None),
    "instance_data_dir": ("/nonexistent", None),
    "cache_dir": ("/tmp/cache", None),
    "image_column": ("image", "image"),
    "caption_column": ("text", None),
    "repeats": ("2", 1),
    "class_data_dir": ("/tmp/class", None),
    "instance_prompt": ("a photo of sks dog", None),
    "class_prompt": ("a photo of a dog", None),
    "validation_prompt": ("a sks dog", None),
    "num_validation_images": ("2", 4),
    "validation_epochs": ("25", 50),
    "with_prior_preservation": ("", False),
    "prior_loss_weight": ("0.5", 1.0),
    "num_class_images": ("10", 100),
    "output_dir": ("out", "lora-dreambooth-model"),
    "output_kohya_format": ("", False),
    "seed": ("0", None),
    "resolution": ("64", None),  # 512 SD / 1024 SDXL: an architecture default, checked below
    "center_crop": ("", False),
    "random_flip": ("", False),
    "train_text_encoder": ("", False),
    "train_batch_size": ("1", 4),
    "sample_batch_size": ("2", 4),
    "num_train_epochs": ("2", 1),
    "max_train_steps": ("10", None),
    "checkpointing_steps": ("5", 500),
    "checkpoints_total_limit": ("2", None),
    "resume_from_checkpoint": ("latest", None),
    "gradient_accumulation_steps": ("2", 1),
    "gradient_checkpointing": ("", False),
    "learning_rate": ("1e-4", None),  # 5e-4 SD / 1e-4 SDXL
    "text_encoder_lr": ("5e-6", None),  # the learning rate SD / 5e-6 SDXL
    "scale_lr": ("", False),
    "lr_scheduler": ("cosine", "constant"),
    "snr_gamma": ("5.0", None),
    "lr_warmup_steps": ("0", 500),
    "lr_num_cycles": ("1", 1),
    "lr_power": ("1.0", 1.0),
    "dataloader_num_workers": ("0", 0),
    "optimizer": ("AdamW", "AdamW"),
    "use_8bit_adam": ("", False),
    "adam_beta1": ("0.9", 0.9),
    "adam_beta2": ("0.999", 0.999),
    "prodigy_beta3": ("0.9", None),
    "prodigy_decouple": ("False", True),
    "adam_weight_decay": ("1e-2", None),  # 1e-2 SD / 1e-4 SDXL
    "adam_weight_decay_text_encoder": ("1e-3", 1e-3),
    "adam_epsilon": ("1e-8", 1e-8),
    "prodigy_use_bias_correction": ("True", True),
    "prodigy_safeguard_warmup": ("True", True),
    "max_grad_norm": ("1.0", 1.0),
    "push_to_hub": ("", False),
    "hub_token": ("hf_x", None),
    "hub_model_id": ("me/lora", None),
    "logging_dir": ("logs", "logs"),
    "allow_tf32": ("", False),
    "report_to": ("tensorboard", "tensorboard"),
    "mixed_precision": ("no", None),
    "prior_generation_precision": ("fp32", None),
    "local_rank": ("-1", -1),
    "enable_xformers_memory_efficient_attention": ("", False),
    "rank": ("8", 4),
    "lora_dropout": ("0.1", 0.0),
    "use_dora": ("", False),
    "image_interpolation_mode": ("nearest_exact", "lanczos"),
    "pre_compute_text_embeddings": ("", False),
    # only meaningful for other model families: accepted, ignored with a warning
    "tokenizer_max_length": ("77", None),
    "text_encoder_use_attention_mask": ("", False),
    "validation_images": ("a.png", None),
    "class_labels_conditioning": ("timesteps", None),
    "do_edm_style_training": ("", False),
}

# Defaults that differ on purpose; the README's "Differences from diffusers' scripts" says why.
DIFFERENT_DEFAULTS = {"output_kohya_format": True, "report_to": None}
ALIASES = {"pre_compute_text_embeddings": "cache_text_embeddings"}


def _argv(name, value):
    return [f"--{name}"] + ([value] if value else [])


@pytest.mark.parametrize("name", sorted(DIFFUSERS_FLAGS))
def test_every_diffusers_flag_is_accepted(name, capsys):
    value, _ = DIFFUSERS_FLAGS[name]
    needs = ["--class_prompt", "a dog", "--class_data_dir", "/tmp/c"] if name == "with_prior_preservation" else []
    cfg = config_from_args(BASE + needs + _argv(name, value))
    err = capsys.readouterr().err.strip().splitlines()
    if name in IGNORED_FLAGS:
        assert len(err) == 1 and err[0].startswith(f"warning: --{name} is ignored: "), err
    else:
        assert err == []
        field = ALIASES.get(name, name)
        assert field in TrainConfig.field_names()
        if not value:
            assert getattr(cfg, field) is True


def test_a_whole_diffusers_command_line_with_every_flag_parses(capsys):
    argv = []
    for name, (value, _) in DIFFUSERS_FLAGS.items():
        argv += _argv(name, value)
    cfg = config_from_args(argv)
    assert cfg.prodigy_decouple is False and cfg.image_interpolation_mode == "nearest_exact"
    assert cfg.lr_scheduler == "cosine" and cfg.rank == 8 and cfg.validation_epochs == 25
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(IGNORED_FLAGS) - 2  # the two crops_coords flags of the older SDXL script were not given


def test_defaults_are_diffusers_defaults():
    for name, (_, default) in DIFFUSERS_FLAGS.items():
        if name in IGNORED_FLAGS or name in ALIASES:
            continue
        ours = getattr(TrainConfig(), name)
        expected = DIFFERENT_DEFAULTS.get(name, default)
        if name == "validation_prompt":
            assert ours == []  # a list here (several prompts); none by default, as diffusers
        else:
            assert ours == expected, (name, ours, expected)
    for arch, (resolution, lr, te_lr, wd) in {"sd15": (512, 5e-4, 5e-4, 1e-2), "sdxl": (1024, 1e-4, 5e-6, 1e-4)}.items():
        cfg = TrainConfig().resolve_arch_defaults(arch)
        assert (cfg.resolution, cfg.learning_rate, cfg.text_encoder_lr, cfg.adam_weight_decay) == (resolution, lr, te_lr, wd)
    # SD 1.x: the text encoder follows a given --learning_rate, as train_dreambooth_lora.py's does
    assert TrainConfig(learning_rate=3e-3).resolve_arch_defaults("sd15").text_encoder_lr == 3e-3
    assert TrainConfig(learning_rate=3e-3, text_encoder_lr=1e-5).resolve_arch_defaults("sd15").text_encoder_lr == 1e-5


@pytest.mark.parametrize("spelling,value", [("--center_crop=True", True), ("--center_crop=False", False),
                                            ("--center_crop true", True), ("--center_crop false", False),
                                            ("--center_crop", True), ("--prodigy_decouple=False", False),
                                            ("--prodigy_decouple false", False), ("--no_prodigy_decouple", False),
                                            ("--prodigy_decouple", True)])
def test_booleans_take_true_and_false(spelling, value):
    cfg = config_from_args(BASE + spelling.split())
    name = spelling.split()[0].split("=")[0].removeprefix("--").removeprefix("no_")
    assert getattr(cfg, name) is value


def test_a_bad_boolean_is_one_line(capsys):
    code = cli.main(["train", *BASE, "--center_crop=maybe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "center_crop" in err[0], err


@pytest.mark.parametrize("given,stored", [("AdamW", "AdamW"), ("adamw", "AdamW"), ("ADAMW", "AdamW"),
                                          ("prodigy", "prodigy"), ("Prodigy", "prodigy")])
def test_optimizer_is_case_insensitive_in_flags_and_yaml(given, stored, tmp_path):
    assert config_from_args(BASE + ["--optimizer", given]).optimizer == stored
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"optimizer: {given}\n")
    assert config_from_args(BASE + ["--config", str(yaml_file)]).optimizer == stored


def test_an_ignored_key_in_a_yaml_file_warns_too(tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("do_edm_style_training: true\nrank: 8\n")
    assert config_from_args(BASE + ["--config", str(yaml_file)]).rank == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --do_edm_style_training is ignored"), err


def test_help_shows_defaults_and_version_prints(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--rank RANK LoRA rank. [default: 4]" in text
    assert "[default: 500]" in text and "[default: AdamW]" in text and "[default: cosine]" in text
    from flatlora_diffusion import __version__

    for argv in (["--version"], ["train", "--version"]):
        assert cli.main(argv) == 0
        assert capsys.readouterr().out.strip() == f"flatlora-diffusion {__version__}"
    result = subprocess.run([sys.executable, str(ROOT / "train_dreambooth_flat.py"), "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"flatlora-diffusion {__version__}"
