"""The Trainer's loop: epochs and batches, the loss read one step late, metrics.jsonl and status.json, and
where in a step Cancel is heard, checkpoints are saved and validation images are made."""

from __future__ import annotations

import logging
import math
import sys
import time

import torch

from .. import faults
from .errors import Cancelled, TrainingDiverged

logger = logging.getLogger("flatlora_diffusion")


class LoopMixin:
    """Part of Trainer (see trainer.py for the state it shares)."""

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, run = self.cfg, self.acc, self.run_dir
        total = cfg.max_train_steps
        self.started = time.time()
        start_step = self.global_step
        if acc.is_main_process:
            run.write_prompts(cfg.validation_prompt)
        self._log_summary()
        if self.global_step == 0 and cfg.validate_at_start:
            self._validate()  # the untrained baseline, step 0
        bar = tqdm(total=total, initial=self.global_step, desc="Steps", disable=not acc.is_local_main_process,
                   file=sys.stderr, dynamic_ncols=True)
        self._status("training")
        for model in self.trained_models:
            model.train()
        try:
            self._epochs(bar, start_step)
        finally:
            bar.close()  # an error message then starts a line of its own

    def _log_summary(self) -> None:
        """The summary diffusers' scripts print before training, so their users find the numbers they know."""
        cfg, acc = self.cfg, self.acc
        total_batch = cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        lines = [
            "***** Running training *****",
            f"  Num examples = {len(self.dataset)}",
            f"  Num batches each epoch = {len(self.dataloader)}",
            f"  Num Epochs = {self.num_epochs}",
            f"  Instantaneous batch size per device = {cfg.train_batch_size}",
            f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}",
            f"  Gradient Accumulation steps = {cfg.gradient_accumulation_steps}",
            f"  Total optimization steps = {cfg.max_train_steps}",
            f"  Flat-LoRA sigma = {cfg.flat_sigma} ({cfg.flat_schedule})" if self.flat is not None and cfg.flat_sigma
            else "  Flat-LoRA = off (plain LoRA)",
        ]
        if self.global_step:
            lines.append(f"  Resuming at step {self.global_step}")
        for line in lines:
            logger.info(line)

    def _epochs(self, bar, start_step: int) -> None:
        cfg, acc = self.cfg, self.acc
        total = cfg.max_train_steps
        losses: list[torch.Tensor] = []
        for epoch in range(self.first_epoch, self.num_epochs):
            self._stop_if_cancelled()
            self.dataloader.set_epoch(epoch)
            loader = self.dataloader
            done_in_epoch = (self.global_step - epoch * self.steps_per_epoch) * cfg.gradient_accumulation_steps
            if done_in_epoch > 0:
                loader = acc.skip_first_batches(self.dataloader, done_in_epoch)
            for batch in loader:
                if not losses:  # between optimizer steps only: a half-accumulated step is never saved
                    self._stop_if_cancelled()
                loss, sigma_t = self.step(self._make_step_batch(batch), self.global_step)
                losses.append(loss)
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                if faults.hit("step") == "nan":
                    with torch.no_grad():  # a diverged update, as a too-high learning rate makes one
                        for p in self.params:
                            p.fill_(float("nan"))
                # The loss is read one step late: reading it now would make the host wait for this step's
                # GPU work before it may queue the next one (the GPU would idle during every step's host part).
                self._log_pending_loss()
                self.pending_loss = (acc.gather(torch.stack(losses).mean().reshape(1)).mean(), self.global_step,
                                     sigma_t, self.lr_scheduler.get_last_lr()[0], epoch, start_step, bar)
                losses.clear()
                saves = self.global_step % cfg.checkpointing_steps == 0 and self.global_step < total
                validates = bool(cfg.validation_steps and self.global_step % cfg.validation_steps == 0)
                if saves or validates or self.global_step >= total:
                    self._log_pending_loss()  # nothing is saved or shown of a step before its loss is checked
                if saves:
                    self._save_checkpoint()
                if validates:
                    self._validate()
                if self.global_step >= total:
                    break
                self._stop_if_cancelled()  # before the next batch is drawn: the state a checkpoint of this step has
            if self.global_step >= total:
                break
            if cfg.validation_epochs and (epoch + 1) % cfg.validation_epochs == 0:
                self._log_pending_loss()
                self._validate()
        self._log_pending_loss()

    def _stop_if_cancelled(self) -> None:
        if self.cancelled["flag"]:
            self._log_pending_loss()
            raise Cancelled()

    def _log_pending_loss(self) -> None:
        """Read, check and log the loss of the last finished step, if not done yet."""
        pending, self.pending_loss = getattr(self, "pending_loss", None), None
        if pending is None:
            return
        loss_t, step, sigma_t, lr, epoch, start_step, bar = pending
        loss = loss_t.item()
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged(f"the loss became {loss} at step {step}"))
        self._log_step(step, loss, sigma_t, lr, epoch, start_step, bar)

    def _log_step(self, step: int, loss: float, sigma_t: float, lr: float, epoch: int, start_step: int, bar) -> None:
        cfg = self.cfg
        elapsed = time.time() - self.started
        rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", sigma=f"{sigma_t:.3g}", lr=f"{lr:.2e}")
        if not self.acc.is_main_process:
            return
        faults.hit("metrics")
        self.run_dir.append_metrics({"step": step, "loss": loss, "lr": lr, "flat_sigma": sigma_t,
                                     "seconds": round(elapsed, 3), "it_per_s": round(rate, 4), "epoch": epoch})
        # status.json is rewritten at most every half second (and at the last step): readers poll it, and
        # a file replaced per step is host time taken from fast steps.
        if step >= cfg.max_train_steps or time.time() - getattr(self, "status_written", 0.0) >= 0.5:
            eta = (cfg.max_train_steps - step) / rate if rate > 0 else None
            self.run_dir.set_status("running", step=step, total=cfg.max_train_steps, message="training",
                                    eta_seconds=eta)
            self.status_written = time.time()
        if self.acc.trackers:
            self.acc.log({"loss": loss, "lr": lr, "flat_sigma": sigma_t}, step=step)
