"""One training step: prompts -> embeddings, latents -> noisy latents -> UNet -> loss -> backward -> update.

This is the step the trainer runs and the GPU benchmark times. It works on models that are already built
(real pipelines or random-weight full-size models), so `benchmarks/` can call it directly:

    models = StepModels(unet=unet, text_encoders=[te1, te2], noise_scheduler=DDPMScheduler(...), arch="sdxl")
    step = TrainStep(models, optimizer, params, flat=FlatLoRA(...) or None, accelerator=Accelerator(...),
                     options=StepOptions(seed=0))
    loss = step(batch, global_step)   # batch: latents, input_ids (one tensor per text encoder) or
                                      # prompt_embeds/pooled_prompt_embeds, time_ids (SDXL), n_class

Randomness of the step (diffusion noise, timesteps, noise offset) comes from a generator seeded by
(seed, global step, the micro-batch's place in the step's global batch), never from the global RNG: a resumed
run repeats exactly what the uninterrupted one would have done, Flat-LoRA's own noise cannot shift it, and N
processes draw what one process with N-fold gradient accumulation draws for the same batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .flat import FlatLoRA, noise_key
from .fused_lora import fused_lora_switch
from .norms import compute_dtype_norms


@dataclass
class StepModels:
    unet: nn.Module
    text_encoders: list[nn.Module]
    noise_scheduler: Any  # a diffusers DDPMScheduler (training schedule)
    arch: str  # "sd15" | "sdxl"


@dataclass
class StepOptions:
    seed: int = 0
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    max_grad_norm: float | None = 1.0
    train_text_encoder: bool = False
    bf16_norms: bool = False  # under bf16 autocast the UNet's norms return bf16 (norms.py; the trainer's default)
    fused_lora: bool = False  # under mixed precision the LoRA layers' up projection adds in one GEMM (fused_lora.py)


def encode_prompts(text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor], arch: str):
    """(prompt_embeds, pooled_prompt_embeds or None) as the SD / SDXL pipelines compute them for training:
    SD 1.x: the last hidden state; SDXL: both encoders' penultimate hidden states concatenated, and the
    pooled projection of the second encoder."""
    if arch != "sdxl":
        encoder = text_encoders[0]
        return encoder(input_ids[0].to(encoder.device))[0], None
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder) is what SDXL uses
        hidden.append(out.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    return embeds, pooled.reshape(embeds.shape[0], -1)


def step_generator(device: torch.device, seed: int, global_step: int, micro_step: int, rank: int = 0,
                   num_processes: int = 1) -> torch.Generator:
    """The generator of one micro-step's diffusion noise and timesteps (independent of Flat-LoRA's keys:
    a different leading constant).

    Keyed by the micro-batch's slot in the step's global batch, micro_step * num_processes + rank: accelerate
    gives process r the loader's batches r, r + N, ..., so the slot is the batch's place in the loader's order
    within the step, and N processes draw exactly what one process with N-fold accumulation draws for the same
    batches (the check of benchmarks/multi_gpu.py). One process: the slot is micro_step, as before."""
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_key(seed ^ 0x5EED, global_step, micro_step * num_processes + rank, 0xD1FF, 0))
    return gen


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep (for Min-SNR weighting)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    a = alphas_cumprod[timesteps]
    return a / (1.0 - a)


def diffusion_loss(
    models: StepModels,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None,
    time_ids: torch.Tensor | None,
    generator: torch.Generator,
    options: StepOptions,
    n_class: int = 0,
) -> torch.Tensor:
    """Noise-prediction loss of one batch; with prior preservation the last `n_class` items are class images."""
    scheduler = models.noise_scheduler
    bsz = latents.shape[0]
    gen_device = generator.device
    noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
    if options.noise_offset:
        noise += options.noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator, device=gen_device, dtype=torch.float32
        )
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=gen_device)
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    kwargs = {}
    if models.arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}
    pred = models.unet(noisy, timesteps, prompt_embeds, return_dict=False, **kwargs)[0]

    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise

    prior_loss = None
    if n_class:
        pred, pred_prior = pred[:-n_class], pred[-n_class:]
        target, target_prior = target[:-n_class], target[-n_class:]
        timesteps = timesteps[:-n_class]
        prior_loss = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")

    if options.snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        # Min-SNR weighting (Hang et al. 2023): min(SNR, gamma) / SNR, +1 in the denominator for v-prediction.
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, options.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
        per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        loss = (per_item * weights).mean()
    if prior_loss is not None:
        loss = loss + options.prior_loss_weight * prior_loss
    return loss


@dataclass
class StepBatch:
    latents: torch.Tensor
    input_ids: list[torch.Tensor] | None = None  # one per text encoder (when they run in the step)
    prompt_embeds: torch.Tensor | None = None  # precomputed (frozen, cached text encoders)
    pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    n_class: int = 0


def _input_dtype_matters(layer: nn.Module) -> bool:
    """Whether a peft LoRA layer computes on its input outside autocast's matmuls: dropout (the input's dtype
    changes the rounding of the scaled survivors) or DoRA (its elementwise magnitude terms). Such a layer keeps
    peft's cast."""
    dropouts = getattr(layer, "lora_dropout", {})
    return (any(isinstance(d, nn.Dropout) and d.p > 0 for d in dropouts.values())
            or any(getattr(layer, "use_dora", {}).values()))


class TrainStep:
    """Forward + backward of one micro-batch under Flat-LoRA, and the optimizer update at the end of an
    accumulation window (accelerate decides when gradients are synchronised)."""

    def __init__(
        self,
        models: StepModels,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        accelerator,
        options: StepOptions,
        flat: FlatLoRA | None = None,
        lr_scheduler=None,
    ):
        self.models = models
        self.optimizer = optimizer
        self.params = list(params)
        self.accelerator = accelerator
        self.options = options
        self.flat = flat
        self.lr_scheduler = lr_scheduler
        self._micro = 0
        self._micro_of_step = -1
        self._lora_layers: list[nn.Module] | None = None  # peft's LoRA layers, found on the first step
        self.norms_in_bf16 = compute_dtype_norms(models.unet, options.bf16_norms, accelerator.mixed_precision)
        self.fused_lora_layers = fused_lora_switch([models.unet, *models.text_encoders], options.fused_lora,
                                                   accelerator.mixed_precision)

    def _micro_step(self, global_step: int) -> int:
        if self._micro_of_step != global_step:
            self._micro_of_step, self._micro = global_step, 0
        micro = self._micro
        self._micro += 1
        return micro

    def __call__(self, batch: StepBatch, global_step: int) -> tuple[torch.Tensor, float]:
        """Run one micro-batch; returns (detached loss, sigma_t)."""
        acc = self.accelerator
        micro = self._micro_step(global_step)
        gen = step_generator(acc.device, self.options.seed, global_step, micro, acc.process_index, acc.num_processes)
        flat_ctx = self.flat.perturb(global_step, micro) if self.flat is not None else contextlib.nullcontext(0.0)
        with acc.accumulate(*self._trained_models()):
            with flat_ctx as sigma_t:
                loss = self.loss_and_backward(batch, gen)
            self.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), float(sigma_t or 0.0)

    def update(self) -> None:
        """Clip, optimizer step, lr step (accelerate skips the step inside an accumulation window)."""
        acc = self.accelerator
        if acc.sync_gradients and self.options.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _trained_models(self) -> list[nn.Module]:
        models = [self.models.unet]
        if self.options.train_text_encoder:
            models += self.models.text_encoders
        return models

    @contextlib.contextmanager
    def _lora_inputs_left_in_compute_dtype(self):
        """Under bf16 / fp16 autocast, peft's LoRA layers skip casting their input up to the fp32 LoRA weights'
        dtype: autocast casts it straight back down for the matmul, so (without dropout or DoRA) the result and the
        gradients are bit for bit the same, less two activation-sized copies per layer (SDXL on an H100: -2.9 %
        step time at batch 1 and 4, -1.5 GiB at batch 4; benchmarks/results/mfu_candidates_sdxl_h100.json)."""
        if self.accelerator.mixed_precision not in ("bf16", "fp16"):
            yield
            return
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            models = [self.models.unet, *self.models.text_encoders]
            self._lora_layers = [m for model in models for m in model.modules()
                                 if isinstance(m, BaseTunerLayer) and not _input_dtype_matters(m)]
        before = [layer.cast_input_dtype_enabled for layer in self._lora_layers]
        for layer in self._lora_layers:
            layer.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for layer, value in zip(self._lora_layers, before):
                layer.cast_input_dtype_enabled = value

    def loss_and_backward(self, batch: StepBatch, gen: torch.Generator) -> torch.Tensor:
        """The loss of one micro-batch and its backward (the eager step's and the CUDA graph's body). The LoRA
        layers' input setting and the norms' hold through the backward too: gradient checkpointing recomputes the
        forward there, and its recomputed tensors must match the first forward's."""
        with self._lora_inputs_left_in_compute_dtype(), self.norms_in_bf16(), self.fused_lora_layers():
            loss = self._loss(batch, gen)
            self.accelerator.backward(loss)
        return loss

    def _loss(self, batch: StepBatch, gen: torch.Generator) -> torch.Tensor:
        with self.accelerator.autocast():
            if batch.prompt_embeds is not None:
                embeds, pooled = batch.prompt_embeds, batch.pooled_prompt_embeds
            else:
                embeds, pooled = encode_prompts(self.models.text_encoders, batch.input_ids, self.models.arch)
            return diffusion_loss(
                self.models, batch.latents, embeds, pooled, batch.time_ids, gen, self.options, batch.n_class
            )

