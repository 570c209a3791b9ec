"""Frozen models off the GPU while they have nothing to do.

With --cache_latents the VAE is needed again only to decode validation images, and frozen text encoders (with
--cache_text_embeddings, the default) only to encode the training and validation prompts once: after that they
hold memory the UNet's step could use (SDXL: ~1.6 GB of text encoders and a 0.3 GB fp32 VAE). diffusers' scripts
delete them; we move them to the CPU ("park" them) once the caches are full and bring the VAE back around
validation images (the encoders only for a prompt not yet encoded).
The weights do not change on the way, so a parked run trains and samples exactly as an unparked one.
Under --low_memory the float8 UNet waits on the CPU the other way round: until the caches are full.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger("flatlora_diffusion")

_EMBED_CHUNK = 64  # prompts encoded at once while filling the cache: bounds the text encoders' activations


class ParkingMixin:
    """Part of Trainer (see trainer.py for the state it shares); sets `parked` (names of parked models)."""

    def _idle_models(self) -> dict[str, torch.nn.Module]:
        """The frozen models the training step no longer needs, by name."""
        cfg, c = self.cfg, self.components
        idle = {}
        if cfg.cache_latents:
            idle["vae"] = c.vae
        if not cfg.train_text_encoder and cfg.cache_text_embeddings:
            idle.update({f"text_encoder{'_' + str(i + 1) if i else ''}": te for i, te in enumerate(c.text_encoders)})
        return idle

    def _can_park(self) -> bool:
        return self.acc.device.type == "cuda"  # on a CPU there is nowhere else to go

    def _move(self, names: list[str], device) -> None:
        models = self._idle_models()
        for name in names:
            models[name].to(device)
        self._release_cached_memory()

    @staticmethod
    def _release_cached_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what moved off goes back to the driver, not only to torch's cache

    def _park_idle_models(self) -> None:
        """After the latent cache: encode every training prompt now, then move the idle models to the CPU."""
        idle = self._idle_models()
        self.validation_embeds = {}  # by prompt; empty: validation encodes its prompts itself
        if any(name.startswith("text_encoder") for name in idle):
            prompts = self.training_prompts
            for start in range(0, len(prompts), _EMBED_CHUNK):
                self._text_inputs(prompts[start:start + _EMBED_CHUNK])
            self._encode_validation_prompts()
        self.parked = sorted(idle) if self._can_park() else []
        if self.parked:
            self._move(self.parked, "cpu")
            logger.info("moved %s to the CPU until validation (their work is cached)", ", ".join(self.parked))

    @contextlib.contextmanager
    def _parked_models_on_device(self, names: list[str] | None = None):
        """The parked models (those of `names` only, when given) on the training device for the block (validation
        images), then back."""
        parked = [n for n in getattr(self, "parked", []) if names is None or n in names]
        if parked:
            self._move(parked, self.acc.device)
        try:
            yield
        finally:
            if parked:
                self._move(parked, "cpu")

    def _unet_to_device(self) -> None:
        """--low_memory: the float8 UNet joins the training device only now, after the latent cache and the parking
        of the idle models. Beside the text encoders and the fp32 VAE encoding a 1024 px picture it made the run's
        peak: 7.4 GiB allocated while caching against 3.5 GiB in a step, 8,379 MiB on nvidia-smi (SDXL, H100,
        benchmarks/results/trainer_memory_low_memory_h100.json). Other runs load it there directly."""
        if self.cfg.low_memory:
            self.components.unet.to(self.acc.device)  # no dtype: the float8 storage stays

    @contextlib.contextmanager
    def _unet_on_device_for_sampling(self):
        """The UNet on the training device for the block (class images made before the latent cache), then back
        where it was: under --low_memory that is the CPU, until _unet_to_device."""
        unet = self.components.unet
        home = next(unet.parameters()).device
        if home == self.acc.device:
            yield
            return
        unet.to(self.acc.device)
        try:
            yield
        finally:
            unet.to(home)
            self._release_cached_memory()
