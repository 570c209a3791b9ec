"""A fixed set of (image, timestep, diffusion noise) triples and the denoising loss of a model on it.

The set is what makes losses comparable: the images are encoded once (VAE mean, no sampling noise), every
image is center-cropped (no random crop or flip), and the timesteps and noise come from a CPU torch.Generator
seeded by the evaluation seed alone, never by the run. So two runs on one base model, or one run evaluated
twice, see exactly the same triples, and the loss is a deterministic function of the weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import DreamBoothDataset, ImageRecord, collate_fn
from ..models import tokenize
from ..step import encode_prompts

# Separates the triples' generator from the perturbation keys even when both use the same --seed.
_TRIPLES_DOMAIN = 0x7219_1E5


@dataclass
class EvalSet:
    latents: torch.Tensor  # [images, C, h, w], scaled as the UNet sees them
    prompts: list[str]  # one caption per image
    time_ids: torch.Tensor | None  # SDXL micro-conditioning per image [images, 6]; None for SD 1.x/2.x
    image_index: torch.Tensor  # [triples] which image each triple uses
    timesteps: torch.Tensor  # [triples]
    noise: torch.Tensor  # [triples, C, h, w]

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def fingerprint(self) -> str:
        """A digest of the exact triples (and captions): equal digests mean two evaluations saw the same data,
        timesteps and noise, which is what pairing runs draw by draw requires."""
        digest = hashlib.blake2b(digest_size=12)
        for tensor in (self.latents, self.image_index, self.timesteps, self.noise):
            digest.update(tensor.contiguous().numpy().tobytes())
        digest.update("\n".join(self.prompts).encode())
        if self.time_ids is not None:
            digest.update(self.time_ids.numpy().tobytes())
        return digest.hexdigest()


def preprocess(records: Sequence[ImageRecord], resolution: int, interpolation: str = "lanczos") -> dict:
    """Pixels in [-1, 1], prompts and SDXL time ids of every image, resized and center-cropped like training
    with --center_crop (deterministic: the data module's own code, seeded, with flips off)."""
    dataset = DreamBoothDataset(list(records), resolution=resolution, center_crop=True, random_flip=False,
                                interpolation=interpolation, seed=0)
    return collate_fn([dataset[i] for i in range(len(dataset))])


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE latents (distribution mean, so no sampling noise), shifted and scaled as in training."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for chunk in pixel_values.split(batch_size):
        mean = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean
        out.append(((mean - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def make_triples(num_images: int, latent_shape: Sequence[int], num_triples: int, num_train_timesteps: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, timestep, noise) of each triple. Images are used in turn (equally often when the count
    divides); timesteps are stratified over [0, T) (one per equal-width stratum, a random point in it), which
    estimates the average over t with less variance than i.i.d. timesteps at the same cost."""
    from ..flat import noise_key

    gen = torch.Generator(device="cpu").manual_seed(noise_key(seed, _TRIPLES_DOMAIN, 0, 0, 0))
    strata = torch.arange(num_triples, dtype=torch.float64) + torch.rand(num_triples, generator=gen,
                                                                         dtype=torch.float64)
    timesteps = (strata * num_train_timesteps / num_triples).floor().long().clamp_(0, num_train_timesteps - 1)
    noise = torch.randn((num_triples, *latent_shape), generator=gen, dtype=torch.float32)
    image_index = torch.arange(num_triples) % num_images
    return image_index, timesteps, noise


def build_eval_set(records: Sequence[ImageRecord], vae, arch: str, resolution: int, num_triples: int,
                   num_train_timesteps: int, seed: int, interpolation: str = "lanczos") -> EvalSet:
    batch = preprocess(records, resolution, interpolation)
    latents = encode_images(vae, batch["pixel_values"])
    image_index, timesteps, noise = make_triples(len(latents), latents.shape[1:], num_triples, num_train_timesteps,
                                                 seed)
    time_ids = batch["time_ids"] if arch == "sdxl" else None
    return EvalSet(latents, list(batch["prompts"]), time_ids, image_index, timesteps, noise)


@dataclass
class LossModels:
    """What the denoising loss needs from a loaded base model (with or without LoRA)."""

    unet: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: object  # DDPM (training) schedule
    arch: str


@torch.no_grad()
def _prompt_embeddings(models: LossModels, prompts: list[str]):
    ids = [tokenize(tok, prompts) for tok in models.tokenizers]
    return encode_prompts(models.text_encoders, ids, models.arch)


@torch.no_grad()
def per_triple_losses(models: LossModels, evalset: EvalSet, batch_size: int = 16) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or velocity for v-prediction), per triple.

    Prompts are encoded inside the call: when the text encoders carry LoRA they are perturbed too."""
    unet, scheduler = models.unet, models.noise_scheduler
    device, dtype = unet.device, unet.dtype
    embeds, pooled = _prompt_embeddings(models, evalset.prompts)
    losses = []
    for idx in torch.arange(len(evalset)).split(batch_size):
        image = evalset.image_index[idx]
        latents = evalset.latents[image].to(device, dtype)
        noise = evalset.noise[idx].to(device, dtype)
        t = evalset.timesteps[idx].to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        kwargs = {}
        if models.arch == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[image.to(pooled.device)].to(device, dtype),
                                           "time_ids": evalset.time_ids[image].to(device, dtype)}
        pred = unet(noisy, t, embeds[image.to(embeds.device)].to(device, dtype), return_dict=False, **kwargs)[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        losses.append(err.flatten(1).mean(1).double().cpu())
    return torch.cat(losses)


def denoising_loss(models: LossModels, evalset: EvalSet, batch_size: int = 16) -> float:
    """The mean per-triple loss, summed in float64 (so the order of chunks cannot change the last bits)."""
    losses = per_triple_losses(models, evalset, batch_size)
    value = float(losses.mean())
    if not math.isfinite(value):
        raise FloatingPointError(f"the denoising loss is {value}")
    return value
