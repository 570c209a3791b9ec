"""The LoRA files a run writes: pytorch_lora_weights.safetensors (diffusers) and the kohya file in the run
folder, and the diffusers file inside each checkpoint; all with the same provenance metadata."""

from __future__ import annotations

from pathlib import Path

from .. import faults
from ..run_dir import DIFFUSERS_WEIGHTS


class LoraFilesMixin:
    """Part of Trainer (see trainer.py for the state it shares)."""

    def _trained_lora(self):
        """The LoRA of the current step in export's normalized form (for the original base under PiSSA)."""
        from ..export import lora_from_models

        lora = lora_from_models(self._lora_parts(self.components))
        if self.pissa_initial is not None:
            from ..pissa import to_original_base

            lora = to_original_base(lora, self.pissa_initial)
        return lora

    def _file_settings(self) -> dict:
        """What every LoRA file of this run says about its training (safetensors metadata): one source, so
        the diffusers file, the kohya file and a checkpoint's file carry the same provenance."""
        cfg, acc = self.cfg, self.acc
        settings = cfg.to_dict()
        settings.update(flat_seed=cfg.seed, num_train_images=self.num_images, num_reg_images=self.num_class_images,
                        training_started_at=self.run_dir.read_status().get("started_at"),
                        mixed_precision=acc.mixed_precision, optimizer=cfg.optimizer, global_step=self.global_step)
        return settings

    def _write_run_lora_files(self) -> None:
        """pytorch_lora_weights.safetensors (diffusers) and, unless turned off, the kohya file, of this step."""
        from ..export import diffusers_file_contents, save_kohya_lora
        from ..safetensors_io import save_safetensors_atomic

        cfg, run, c = self.cfg, self.run_dir, self.components
        lora, settings = self._trained_lora(), self._file_settings()
        state, metadata = diffusers_file_contents(lora, settings, c.arch)
        save_safetensors_atomic(state, run.path / DIFFUSERS_WEIGHTS, metadata, overwrite=True)
        faults.hit("lora_file")
        if cfg.output_kohya_format:
            save_kohya_lora(self._lora_parts(c), run.path / f"{cfg.output_name}.safetensors", settings, arch=c.arch,
                            dtype=cfg.save_precision, overwrite=True, lora=lora)

    def _write_checkpoint_lora_file(self, folder: Path) -> None:
        """checkpoint-N/pytorch_lora_weights.safetensors: the step's LoRA for diffusers' load_lora_weights(dir)
        and for `export`. Written into the unpublished folder, so the folder's rename publishes it."""
        from safetensors.torch import save_file

        from ..export import diffusers_file_contents

        state, metadata = diffusers_file_contents(self._trained_lora(), self._file_settings(), self.components.arch)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / DIFFUSERS_WEIGHTS), metadata=metadata)

    def _lora_parts(self, c, unwrap: bool = True) -> dict:
        """The LoRA-carrying models by export component name."""
        unwrap_model = self.acc.unwrap_model if unwrap else (lambda m: m)
        parts = {"unet": unwrap_model(c.unet)}
        if self.cfg.train_text_encoder:
            parts["text_encoder"] = unwrap_model(c.text_encoders[0])
            if self.is_sdxl:
                parts["text_encoder_2"] = unwrap_model(c.text_encoders[1])
        return parts
