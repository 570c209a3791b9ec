"""The Hugging Face Hub (--push_to_hub): everything the upload needs, checked before training; the upload after."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import ConfigError, TrainConfig

logger = logging.getLogger("flatlora_diffusion")


def hub_repo_id(cfg: TrainConfig) -> str:
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name  # diffusers' default: the folder's name


def check_hub(cfg: TrainConfig) -> None:
    """--push_to_hub: everything the upload needs is checked before hours of training, not after."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = hub_repo_id(cfg)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"--push_to_hub: {repo_id!r} is not a hub repository name (letters, digits, '-', '_', "
                          f"'.', optionally 'user/'); set --hub_model_id") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        raise ConfigError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it, or train without "
                          "--push_to_hub and upload the run folder later")
    token = cfg.hub_token or huggingface_hub.get_token()
    if not token:
        raise ConfigError("--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass "
                          "--hub_token")
    try:
        huggingface_hub.HfApi().whoami(token=token)
    except Exception as e:  # no network, a revoked token: either way the upload would fail at the end
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--push_to_hub: the hub did not accept the token ({detail})") from None


def push_run(cfg: TrainConfig, run_path: Path) -> str:
    """Upload the run's files; returns the status message. The training succeeded whatever the upload
    does, so a failure is one logged line and the run stays "completed" (its files are all there)."""
    import huggingface_hub

    try:
        repo_id = huggingface_hub.create_repo(hub_repo_id(cfg), exist_ok=True, token=cfg.hub_token).repo_id
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=cfg.output_dir, token=cfg.hub_token,
                                      ignore_patterns=["checkpoints/*", "step_*", "*.partial", "trainer.lock",
                                                       ".*.tmp"])
    except Exception as e:  # network, permissions, quota: none of them undoes the training
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        logger.error("the upload to the hub failed (%s); the run's files are in %s", detail, run_path)
        return f"done; the upload to the hub failed: {detail}"
    logger.info("uploaded to https://huggingface.co/%s", repo_id)
    return f"done; uploaded to {repo_id}"
