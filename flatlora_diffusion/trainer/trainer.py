"""Trainer: one training run inside its run folder, from loaded models to the finished LoRA files.

Read `run` top to bottom: set-up -> resume -> loop -> finish. The parts live in the mixins of this package, one
concern each; they share the Trainer's state (below) and call each other's methods through `self`. (Mixins, not
separate objects: the parts share most of this state, and each method reads as it did when they were one class.)

    setup.py        SetupMixin        accelerator, models + LoRA, optimizer + lr schedule, Flat-LoRA, the step
    batches.py      BatchesMixin      dataset and loader, latent cache, a loader batch -> StepBatch
    parking.py      ParkingMixin      frozen models the step no longer needs off the GPU until validation
    images.py       ImagesMixin       class images, validation images
    loop.py         LoopMixin         the epochs, the loss read one step late, metrics and status while training
    checkpoints.py  CheckpointsMixin  save, publish, rotate, resume; the finite check
    lora_files.py   LoraFilesMixin    the LoRA files of a step

State (set by): plan, cfg, run_dir, cancelled (__init__); acc, weight_dtype (setup: _make_accelerator);
components, is_sdxl, validation_norms, validation_lora, trained_models, pissa_initial (setup: _load_models);
dataset, dataloader, num_images, num_class_images, embedding_cache, training_prompts (batches); parked,
validation_embeds (parking); params, optimizer, lr_scheduler, steps_per_epoch, num_epochs (setup:
_build_optimizer); flat (setup: _build_flat); step, global_step, first_epoch (setup: _prepare_accelerate;
global_step moves on in the loop and is set by a resume); started, pending_loss, status_written (loop).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..hub import push_run
from .batches import BatchesMixin
from .checkpoints import CheckpointsMixin
from .errors import Cancelled
from .images import ImagesMixin
from .loop import LoopMixin
from .lora_files import LoraFilesMixin
from .parking import ParkingMixin
from .setup import SetupMixin

if TYPE_CHECKING:
    from ..run_dir import RunDir
    from ..train import Plan

logger = logging.getLogger("flatlora_diffusion")


class Trainer(SetupMixin, BatchesMixin, ParkingMixin, ImagesMixin, LoopMixin, CheckpointsMixin, LoraFilesMixin):
    """One run in its folder; train() makes it after preflight, with the folder locked and the cancel flag."""

    def __init__(self, plan: Plan, run: RunDir, cancelled: dict):
        self.plan, self.cfg, self.run_dir, self.cancelled = plan, plan.cfg, run, cancelled

    def run(self) -> None:
        self._make_accelerator()
        self._load_models()
        self._prepare_data()
        self._park_idle_models()
        self._unet_to_device()
        self._build_optimizer()
        self._build_flat()
        self._prepare_accelerate()
        self._resume()
        try:
            self._loop()
            self._finish()
        except Cancelled:
            raise Cancelled(self._save_cancelled_step()) from None

    def _save_cancelled_step(self) -> str:
        """Cancel keeps the work: a checkpoint (so that --resume_from_checkpoint latest continues exactly) and
        the LoRA files of the last finished step. Cancelled is raised only between optimizer steps (or during
        validation images, which come after a step), so the state saved is a whole step's. Returns the
        run's status message."""
        acc, run, step = self.acc, self.run_dir, self.global_step
        if step == 0:
            return "cancelled before the first step; nothing to save"
        if acc.num_processes > 1:  # the other processes may not have heard the cancel: no collective save
            return f"cancelled at step {step}"
        self._status(f"cancelled: saving step {step}")
        if not run.checkpoint_dir(step).exists():
            self._save_checkpoint()
        self._check_finite()
        self._write_run_lora_files()
        logger.info("cancelled at step %d: saved %s and the LoRA files", step, run.checkpoint_dir(step).name)
        return (f"cancelled at step {step}; {run.checkpoint_dir(step).name} and the LoRA files of that step are saved "
                f"(resume with --resume_from_checkpoint latest)")

    def _status(self, message: str) -> None:
        if self.acc.is_main_process:
            self.run_dir.set_status("running", step=getattr(self, "global_step", 0),
                                    total=self.cfg.max_train_steps or 0, message=message)

    def _finish(self) -> None:
        cfg, acc, run = self.cfg, self.acc, self.run_dir
        acc.wait_for_everyone()
        self._validate()  # the final step (skipped when it was just made)
        self._check_finite()  # a NaN LoRA is never written
        if acc.is_main_process:
            self._status("writing LoRA files")
            self._write_run_lora_files()
            message = "done"
            if cfg.push_to_hub:
                self._status("uploading to the hub")
                message = push_run(cfg, run.path)
            run.set_status("completed", step=self.global_step, total=cfg.max_train_steps, message=message, eta_seconds=0)
        acc.end_training()
