"""The Trainer's checkpoints: the LoRA weights and accelerate's training state (never the frozen base), published
by one rename so that the newest one is always whole; the resume that reads them back; the finite check that keeps
NaN/inf out of every file."""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from .. import faults
from ..config import ConfigError
from .errors import TrainingDiverged

logger = logging.getLogger("flatlora_diffusion")


# Settings that make a run what it is: a checkpoint records them (training_state.json), and a resume with another
# value is refused (train.preflight): it would train a different run, or fail to load the checkpoint at all.
IDENTITY = ("seed", "rank", "lora_alpha", "use_dora", "use_rslora", "init_lora_weights", "lora_target_modules",
            "train_text_encoder", "text_encoder_target_modules", "optimizer", "use_8bit_adam")


class CheckpointsMixin:
    """Part of Trainer (see trainer.py for the state it shares)."""

    def _register_checkpoint_hooks(self) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        acc = self.acc

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                for i, model in enumerate(models):
                    state = get_peft_model_state_dict(acc.unwrap_model(model))
                    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(output_dir, f"lora_{i}.safetensors"))
                    faults.hit("ckpt_file")
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            for i in range(len(models)):
                model = models.pop()
                index = len(models)
                state = load_file(os.path.join(input_dir, f"lora_{index}.safetensors"))
                result = set_peft_model_state_dict(acc.unwrap_model(model), state)
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"checkpoint has unexpected LoRA keys: {result.unexpected_keys[:3]}")

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def _save_checkpoint(self) -> None:
        """Write checkpoint-N.partial, then publish it by one rename, then rotate old ones out: at every
        moment the newest published checkpoint is complete, and nothing non-finite is ever published."""
        cfg, acc, run = self.cfg, self.acc, self.run_dir
        self._check_finite()
        final = run.checkpoint_dir(self.global_step)
        tmp = final.with_name(final.name + ".partial")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            self._write_checkpoint_lora_file(tmp)
        acc.wait_for_everyone()  # every process has written its part before the folder is published
        if acc.is_main_process:
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            for name in files:
                if not name.startswith("lora_"):  # the LoRA files had their hit in the save hook
                    faults.hit("ckpt_file")
            settings = {k: getattr(cfg, k) for k in IDENTITY}
            state = {"global_step": self.global_step, "files": files, "settings": settings}
            (tmp / "training_state.json").write_text(json.dumps(state))
            faults.hit("ckpt_state")
            if final.exists():  # the same step again after a resume from an earlier checkpoint
                run.delete_checkpoint(final)
            os.replace(tmp, final)
            faults.hit("ckpt_published")
            logger.info("saved checkpoint %s", final)
            if cfg.checkpoints_total_limit is not None:
                existing = run.list_checkpoints()
                for _, old in existing[: max(0, len(existing) - cfg.checkpoints_total_limit)]:
                    if old != final:
                        run.delete_checkpoint(old, between=lambda: faults.hit("ckpt_rotate"))
        acc.wait_for_everyone()

    def _check_finite(self) -> None:
        """Raise TrainingDiverged when any trained LoRA weight is NaN/inf (before it could be saved)."""
        with torch.no_grad():
            finite = all(bool(torch.isfinite(p).all()) for p in self.params)
        if not finite:
            raise TrainingDiverged(self._diverged(f"the LoRA weights became non-finite (NaN/inf) at step "
                                                  f"{self.global_step}"))

    def _diverged(self, what: str) -> str:
        if self.acc.mixed_precision == "fp16":
            hint = "use bf16 instead of fp16, or lower --learning_rate"
        else:
            hint = "lower --learning_rate (or --max_grad_norm)"
        good = self.run_dir.list_checkpoints()
        if good:
            keep = (f"the last good state is {good[-1][1]} (step {good[-1][0]}): resume from it with "
                    f"--resume_from_checkpoint {good[-1][1].name}")
        else:
            keep = "no checkpoint had been written yet"
        return f"{what}; {hint}. Nothing non-finite was saved; {keep}"

    def _resume(self) -> None:
        main = self.acc.is_main_process
        candidates = self.plan.resume_candidates
        if not candidates:
            if main:  # a fresh start: no record of an earlier attempt in this folder counts
                self.run_dir.truncate_metrics_after(0)
            return
        for i, path in enumerate(candidates):
            try:
                faults.hit("ckpt_read")
                self.acc.load_state(str(path))
                break
            except Exception as e:  # unreadable (EIO), corrupt, or not of this model
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                detail = next((ln for ln in lines if "mismatch" in ln), lines[0] if lines else "")
                reason = f"{type(e).__name__}: {detail}"
                if i + 1 < len(candidates):
                    logger.warning("cannot load %s (%s); falling back to %s", path.name, reason, candidates[i + 1].name)
                    continue
                raise ConfigError(f"cannot resume from {path} ({reason[:300]})") from None
        self.global_step = json.loads((path / "training_state.json").read_text())["global_step"]
        self._align_lr_schedule()
        self.first_epoch = self.global_step // self.steps_per_epoch
        if main:
            self.run_dir.truncate_metrics_after(self.global_step)
        logger.info("resumed from %s at step %d", path, self.global_step)

    def _align_lr_schedule(self) -> None:
        """The scheduler ticks num_processes times per optimizer step (diffusers' count), so a checkpoint written
        by another number of processes holds another tick count: put the schedule where this run's count is at
        global_step, so that the learning rate goes on from the step reached, not from a shifted point of the
        warm-up or decay. (Same number of processes: nothing changes.)"""
        schedule = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper, or the bare one
        ticks = self.global_step * self.acc.num_processes
        if schedule.last_epoch == ticks or not hasattr(schedule, "lr_lambdas"):
            return
        logger.info("the checkpoint's learning-rate schedule was counted for another number of processes: "
                    "moved from tick %d to %d", schedule.last_epoch, ticks)
        schedule.last_epoch = ticks
        lrs = [base * rule(ticks) for base, rule in zip(schedule.base_lrs, schedule.lr_lambdas)]
        for group, lr in zip(schedule.optimizer.param_groups, lrs):
            group["lr"] = lr
        schedule._last_lr = lrs
