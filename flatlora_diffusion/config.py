"""TrainConfig: the one definition of every training setting.

The command-line flags (named as in diffusers' train_dreambooth_lora(_sdxl).py, so existing command lines
work unchanged), the YAML config file keys and the web form's fields are all generated from the dataclass
below; each field's metadata carries its help text, its form group and its allowed values.

Order of precedence: dataclass default < YAML file (--config) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A mistake in the settings; the message is one line, printed without a traceback."""


def _f(default, help: str, group: str, choices=None, *, ge=None, gt=None, le=None, lt=None, **extra):
    """A field with its help, form group, allowed values and, for numbers, its allowed range (ge/gt/le/lt):
    the range is checked in TrainConfig.validate, so the flags, the YAML file and the web form all get it.
    `extra` metadata: label (the setting's name for people: the web form's label), form_default (the form's
    starting value where diffusers' command-line default would surprise a newcomer; the CLI keeps diffusers'),
    form_note (what an empty box means in the web form), aliases, hidden, secret, transient, case_insensitive."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "group": group, "choices": choices, "bounds": bounds, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


# Flags of diffusers' train_dreambooth_lora.py / train_dreambooth_lora_sdxl.py (and older versions) that mean
# nothing for SD / SDXL DreamBooth here: accepted, so that a diffusers command line runs unchanged, with a
# one-line warning. name -> (what it takes: "bool", "value" or "list"; why it is ignored).
IGNORED_FLAGS = {
    "class_labels_conditioning": ("value", "it conditions DeepFloyd IF's UNet on timesteps; SD and SDXL UNets take no class labels"),
    "tokenizer_max_length": ("value", "it is for T5 tokenizers (DeepFloyd IF); CLIP prompts here are 77 tokens"),
    "text_encoder_use_attention_mask": ("bool", "it is for T5 text encoders (DeepFloyd IF); SD's CLIP encoders were trained without a mask"),
    "validation_images": ("list", "it is for image-conditioned pipelines (the DeepFloyd IF upscaler); validation here is text-to-image"),
    "do_edm_style_training": ("bool", "EDM-style training is for EDM models (Playground v2.5); training here is DDPM-style"),
    "crops_coords_top_left_h": ("value", "(an older SDXL script's flag) the crop coordinates here are each image's own crop"),
    "crops_coords_top_left_w": ("value", "(an older SDXL script's flag) the crop coordinates here are each image's own crop"),
}

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class TrainConfig:
    # --- model ---------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _f(
        None, "Base model: a hub id, a local diffusers folder, a single-file .safetensors/.ckpt checkpoint, or "
        "'toyworld' (the built-in tiny toy-world model).", "model", label="Base model"
    )
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "Optional separate VAE (hub id, folder or single file), e.g. the fp16-fix SDXL VAE.", "model", label="Separate VAE"
    )
    revision: str | None = _f(None, "Model revision on the hub.", "model", label="Model revision")
    variant: str | None = _f(None, "Model file variant, e.g. fp16.", "model", label="Model file variant")
    cache_dir: str | None = _f(None, "Where downloaded models are cached.", "model", label="Download cache folder")
    tokenizer_name: str | None = _f(None, "Tokenizer to use instead of the model's own (SD 1.x).", "model", label="Tokenizer")
    single_file_config: str | None = _f(
        None, "For a single-file checkpoint: a diffusers folder or hub id with the matching configs "
        "(default: diffusers picks one, which needs the hub or its cache).", "model", label="Configs for a single-file model",
    )

    # --- data ----------------------------------------------------------------------------------------------
    instance_data_dir: str | None = _f(
        None, "Folder of training images (same-name .txt captions; kohya-style 'N_token' subfolders repeat N times).",
        "data", label="Training image folder",
    )
    dataset_name: str | None = _f(None, "A datasets-library dataset (hub id or local folder) instead of a folder.", "data", label="Dataset")
    dataset_config_name: str | None = _f(None, "The dataset's configuration name.", "data", label="Dataset configuration")
    image_column: str = _f("image", "Dataset column holding the images.", "data", label="Dataset image column")
    caption_column: str | None = _f(None, "Dataset column holding per-image captions.", "data", label="Dataset caption column")
    caption_extension: str = _f(".txt", "Extension of per-image caption files.", "data", label="Caption file extension")
    instance_prompt: str | None = _f(
        None, "Prompt for images without a caption file, e.g. 'a photo of sks dog'.", "data", label="Instance prompt"
    )
    repeats: int = _f(1, "How many times to repeat the training data.", "data", le=10_000, ge=1, label="Repeats")
    resolution: int | None = _f(None, "Training resolution in pixels (default 512 for SD 1.x, 1024 for SDXL).", "data", ge=8, le=8192, label="Resolution (px)")
    center_crop: bool = _f(False, "Center-crop images instead of cropping at random.", "data", label="Center crop")
    random_flip: bool = _f(False, "Flip images horizontally at random.", "data", label="Random horizontal flip")
    image_interpolation_mode: str = _f(
        "lanczos", "Resize filter.", "data", choices=["lanczos", "bilinear", "bicubic", "nearest", "nearest_exact", "box", "hamming"], label="Resize filter"
    )
    dataloader_num_workers: int = _f(0, "Data-loading worker processes (0 = main process).", "data", ge=0, le=256, label="Data-loading workers")
    aspect_ratio_buckets: bool = _f(False, "Group images into aspect-ratio buckets instead of square crops (kohya).", "data", label="Aspect-ratio buckets")
    bucket_reso_steps: int = _f(64, "Bucket side step in pixels.", "data", ge=8, le=1024, label="Bucket side step (px)")
    min_bucket_reso: int | None = _f(None, "Smallest bucket side (default: kohya's).", "data", ge=64, le=8192, label="Smallest bucket side (px)")
    max_bucket_reso: int | None = _f(None, "Largest bucket side (default: kohya's).", "data", ge=64, le=8192, label="Largest bucket side (px)")
    bucket_no_upscale: bool = _f(False, "Never upscale an image to fill a bucket.", "data", label="Never upscale into a bucket")

    # --- prior preservation --------------------------------------------------------------------------------
    with_prior_preservation: bool = _f(False, "Train with prior-preservation loss on class images.", "prior", label="Prior preservation")
    class_data_dir: str | None = _f(None, "Folder of class images (missing ones are generated).", "prior", label="Class image folder")
    class_prompt: str | None = _f(None, "Prompt of the class images, e.g. 'a photo of a dog'.", "prior", label="Class prompt")
    num_class_images: int = _f(100, "Number of class images; fewer existing ones are topped up by generation.", "prior", ge=1, le=1_000_000, label="Number of class images")
    sample_batch_size: int = _f(4, "Batch size for generating class images (and validation images, across prompts).",
                                "prior", ge=1, le=1024, label="Class-image generation batch size")
    prior_generation_precision: str | None = _f(
        None, "Precision for generating class images (default fp16 on GPU, fp32 on CPU).", "prior",
        choices=["no", "fp32", "fp16", "bf16"], label="Class-image generation precision",
    )
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.", "prior", ge=0, le=1000, label="Prior loss weight")

    # --- LoRA ----------------------------------------------------------------------------------------------
    rank: int = _f(4, "LoRA rank.", "lora", ge=1, le=1024, label="LoRA rank")
    lora_alpha: float | None = _f(None, "LoRA alpha (default: equal to rank).", "lora", gt=0, le=100_000, label="LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout.", "lora", ge=0, lt=1, label="LoRA dropout")
    use_dora: bool = _f(False, "Use DoRA (weight-decomposed LoRA).", "lora", label="DoRA")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).", "lora", label="Rank-stabilised LoRA (rsLoRA)")
    init_lora_weights: str = _f(
        "gaussian", "LoRA initialisation; pissa starts from the principal components of the weight.", "lora",
        choices=["gaussian", "default", "pissa"], label="LoRA initialisation",
    )
    lora_target_modules: list[str] = _f(list(ATTENTION_TARGETS), "UNet modules that get LoRA.", "lora", label="UNet modules with LoRA")
    text_encoder_target_modules: list[str] = _f(list(TEXT_ENCODER_TARGETS), "Text-encoder modules that get LoRA.", "lora", label="Text-encoder modules with LoRA")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s).", "lora", label="Train the text encoder too")

    # --- Flat-LoRA -----------------------------------------------------------------------------------------
    flat_sigma: float = _f(0.1, "Flat-LoRA noise level sigma (0 = plain LoRA; the paper uses 0.1 for SDXL).", "flat", ge=0, le=1, label="Flat-LoRA sigma (noise level)")
    flat_schedule: str = _f("cosine", "How sigma grows over training.", "flat", choices=["cosine", "linear", "constant"], label="Flat-LoRA sigma schedule")
    flat_per_microbatch: bool = _f(
        False, "Draw fresh noise for every micro-batch of gradient accumulation (default: one draw per step).", "flat", label="Fresh noise per micro-batch"
    )
    flat_targets: list[str] = _f(
        ["unet", "text_encoder"], "Which LoRA-trained models Flat-LoRA perturbs.", "flat", choices=["unet", "text_encoder"], label="Models Flat-LoRA perturbs"
    )
    flat_share_noise_across_ranks: bool = _f(
        False, "Under multi-GPU, all processes draw the same noise (default: independent draws).", "flat", label="Same noise on every GPU"
    )
    flat_backend: str = _f(
        "auto", "Flat-LoRA implementation: auto uses the fused CUDA path on GPUs when available.", "flat",
        choices=["auto", "reference", "cuda"], label="Flat-LoRA implementation",
    )

    # --- optimisation --------------------------------------------------------------------------------------
    optimizer: str = _f("AdamW", "Optimizer (any case, as diffusers: AdamW, adamw, Prodigy...).", "optim",
                        choices=["AdamW", "prodigy"], case_insensitive=True, label="Optimizer")
    use_8bit_adam: bool = _f(False, "Use 8-bit AdamW from bitsandbytes.", "optim", label="8-bit AdamW")
    learning_rate: float | None = _f(None, "Learning rate (default 5e-4 for SD 1.x, 1e-4 for SDXL).", "optim", gt=0, le=10, label="Learning rate")
    text_encoder_lr: float | None = _f(
        None, "Learning rate of the text-encoder LoRA (default: the learning rate for SD 1.x, 5e-6 for SDXL).", "optim",
        gt=0, le=10, label="Text-encoder learning rate")
    scale_lr: bool = _f(False, "Scale the lr by GPUs x accumulation x batch size.", "optim", label="Scale the learning rate")
    adam_beta1: float = _f(0.9, "Adam beta1.", "optim", ge=0, lt=1, label="Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2.", "optim", ge=0, lt=1, label="Adam beta2")
    adam_weight_decay: float | None = _f(
        None, "Weight decay of the UNet LoRA (default 1e-2 for SD 1.x, 1e-4 for SDXL, as diffusers' scripts).", "optim",
        ge=0, le=1, label="Weight decay",
    )
    adam_weight_decay_text_encoder: float = _f(1e-3, "Weight decay of the text-encoder LoRA.", "optim", ge=0, le=1, label="Text-encoder weight decay")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.", "optim", gt=0, le=1, label="Adam epsilon")
    prodigy_beta3: float | None = _f(None, "Prodigy beta3.", "optim", ge=0, lt=1, label="Prodigy beta3")
    prodigy_decouple: bool = _f(True, "Prodigy decoupled weight decay.", "optim", label="Prodigy: decoupled weight decay")
    prodigy_use_bias_correction: bool = _f(True, "Prodigy bias correction.", "optim", label="Prodigy: bias correction")
    prodigy_safeguard_warmup: bool = _f(True, "Prodigy safeguard warmup.", "optim", label="Prodigy: safeguard warm-up")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (a huge value: no clipping).", "optim", gt=0, label="Gradient clipping norm")
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", "optim", choices=LR_SCHEDULERS, label="Learning-rate schedule")
    lr_warmup_steps: int = _f(500, "Warm-up steps of the lr schedule.", "optim", ge=0, le=10**12, label="Warm-up steps")
    lr_num_cycles: int = _f(1, "Hard restarts of cosine_with_restarts.", "optim", ge=1, le=100_000, label="Cosine restarts")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.", "optim", gt=0, le=100, label="Polynomial schedule power")
    snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (5.0 is typical).", "optim", gt=0, label="Min-SNR gamma")
    noise_offset: float = _f(0.0, "Noise offset.", "optim", ge=0, le=1, label="Noise offset")

    # --- steps ---------------------------------------------------------------------------------------------
    train_batch_size: int = _f(4, "Batch size per device.", "steps", ge=1, le=4096, label="Batch size")
    num_train_epochs: int = _f(1, "Epochs (ignored when max_train_steps is set).", "steps", ge=1, le=1_000_000, label="Epochs")
    max_train_steps: int | None = _f(
        None, "Total optimizer steps.", "steps", ge=1, le=10**12, label="Training steps",
        # diffusers' default (empty: one epoch) makes 2 steps of 5 images at batch 4: a run that "completes" untrained
        form_default=500, form_note="Empty: epochs x steps per epoch when Epochs > 1, else 500.",
    )
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", "steps", ge=1, le=4096, label="Gradient accumulation steps")
    seed: int | None = _f(None, "Seed of everything random (data order, noise, timesteps, Flat-LoRA).", "steps", ge=0, le=2**32 - 1, label="Seed")

    # --- speed and memory ----------------------------------------------------------------------------------
    mixed_precision: str | None = _f(None, "Mixed precision (default: accelerate's config).", "speed", choices=["no", "fp16", "bf16"], label="Mixed precision")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory.", "speed", label="Gradient checkpointing")
    enable_xformers_memory_efficient_attention: bool = _f(False, "Use xformers attention (CUDA only).", "speed", label="Xformers attention")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.", "speed", label="Allow TF32")
    cuda_graph: str = _f(
        "auto", "Replay each step's forward+backward from a CUDA graph (no CPU launch overhead). auto: on a single "
        "CUDA GPU without gradient accumulation.", "speed", choices=["auto", "on", "off"], label="CUDA graph",
    )
    bf16_norms: bool = _f(
        True, "Under bf16 mixed precision the UNet's GroupNorm and LayerNorm return bf16 (statistics still fp32 "
        "inside the kernel) instead of autocast's fp32, which every consumer casts back, in the training steps and "
        "validation sampling: SDXL's step 12 to 16 percent faster and up to 5.9 GiB smaller on an H100. "
        "--no_bf16_norms keeps autocast's fp32 norms (diffusers' numerics).",
        "speed", label="Norms in bf16",
    )
    fused_lora: bool = _f(
        False, "Under bf16 or fp16 mixed precision each LoRA layer adds its up projection onto the base layer's "
        "output inside one GEMM (scaling and sum included) in the training steps and validation sampling, instead "
        "of peft's matmul, multiply and add: the same result to within one rounding, fewer activation-sized passes. "
        "SDXL's training step 2 to 3.4 percent faster on an H100; off by default until its effect on validation "
        "sampling is measured.",
        "speed", label="Fused LoRA layers",
    )
    torch_compile: bool = _f(
        False, "Compile the UNet's transformer and ResNet blocks with torch.compile for the training steps (regional "
        "compilation, kohya's flag name): faster steps after compiling at the first step; for long runs. The compiled "
        "code is kept in ~/.cache/flatlora-diffusion/torchinductor (or TORCHINDUCTOR_CACHE_DIR) for later runs.",
        "speed",
        label="Compile the UNet blocks (torch.compile)",
    )
    cache_latents: bool = _f(
        False, "Encode every image with the VAE once, before training (both orientations with --random_flip; each "
        "image's crop is then the first epoch's).", "speed", label="Cache VAE latents",
        # 1.8x (batch 1) to 2x (batch 4) the SDXL steps per second on an H100 (PERFORMANCE.md): the form starts
        # with it on; the command line keeps diffusers' default, so that a diffusers command line trains the same.
        form_default=True,
    )
    cache_text_embeddings: bool = _f(
        True, "When the text encoders are frozen, encode each distinct prompt once.", "speed",
        aliases=["pre_compute_text_embeddings"], label="Cache text embeddings",  # diffusers' SD script's name for the same thing
    )
    low_memory: bool = _f(
        False, "Low-memory mode: the UNet's frozen weights stored in float8 and computed in bf16, with gradient "
        "checkpointing, cached latents and text embeddings, bf16 mixed precision, no CUDA graph; the text encoders "
        "stay frozen.", "speed", label="Low-memory mode (fp8 base weights)",
    )

    # --- checkpoints ---------------------------------------------------------------------------------------
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N steps.", "state", ge=1, le=10**12, label="Checkpoint every N steps")
    checkpoints_total_limit: int | None = _f(None, "Keep at most N checkpoints.", "state", ge=1, le=100_000, label="Keep at most N checkpoints")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint folder, or 'latest'.", "state", label="Resume from checkpoint")

    # --- validation ----------------------------------------------------------------------------------------
    validation_prompt: list[str] = _f([], "Prompt(s) for validation images.", "validation", label="Validation prompts",
                                      form_note="Empty: the instance prompt.")
    num_validation_images: int = _f(4, "Validation images per prompt (one per seed).", "validation", ge=1, le=1000, label="Validation images per prompt")
    validation_seeds: list[int] = _f([], "Seeds of the validation images (default: 0..N-1).", "validation", ge=-(2**63), le=2**64 - 1, label="Validation seeds")
    validation_steps: int | None = _f(
        None, "Validate every N steps (and at the end, and at step 0 unless --validate_at_start is off).", "validation", ge=1, le=10**12,
        label="Validate every N steps",
        form_note="Empty, with Validate every N epochs empty too: a quarter of the run (5 validations in all).",
    )
    validation_epochs: int | None = _f(
        50, "Validate every N completed epochs (diffusers' flag and default).", "validation", ge=1, le=1_000_000,
        label="Validate every N epochs",
        form_default=None,  # a 5-image run at batch 4 validates every 100 steps otherwise: steps decide in the form
    )
    validate_at_start: bool = _f(
        True, "Also validate the untrained model at step 0: the base model's pictures, the baseline the trained steps "
        "are compared with. Off: a run that shares its base model, prompts and seeds with another run can leave them to "
        "that run (the app's comparison takes the baseline from any such run).", "validation",
        label="Validate at step 0 (the base model)",
    )
    validation_inference_steps: int = _f(25, "Denoising steps of validation images.", "validation", ge=1, le=1000, label="Validation denoising steps")
    validation_guidance_scale: float = _f(7.0, "Guidance scale of validation images.", "validation", ge=0, le=100, label="Validation guidance scale")

    # --- output --------------------------------------------------------------------------------------------
    output_dir: str = _f("lora-dreambooth-model", "The run directory.", "output", label="Run folder")
    overwrite: bool = _f(
        False, "Replace the run already in --output_dir (its config, status, metrics, samples, checkpoints and LoRA "
        "files). Without it, a folder holding a different run is refused.", "output", transient=True, label="Overwrite",
    )
    output_name: str | None = _f(None, "Name of the kohya file and of the LoRA in the UIs (default: the folder name).", "output", label="LoRA name")
    output_kohya_format: bool = _f(True, "Also write the kohya-format file for ComfyUI / AUTOMATIC1111.", "output", label="Also write the kohya file")
    save_precision: str = _f("fp16", "Precision of the kohya file.", "output", choices=["fp16", "bf16", "fp32"], label="Kohya file precision")
    report_to: str | None = _f(None, "Extra tracker for accelerate (tensorboard, wandb); metrics.jsonl is always written.", "output", label="Extra tracker")
    logging_dir: str = _f("logs", "Tracker log folder inside the run directory.", "output", label="Tracker log folder")
    push_to_hub: bool = _f(False, "Upload the run's LoRA files to the hub at the end.", "output", label="Upload to the hub")
    hub_token: str | None = _f(None, "Hub token.", "output", secret=True, label="Hub token")
    hub_model_id: str | None = _f(None, "Hub repository to upload to.", "output", label="Hub repository")
    local_rank: int = _f(-1, "Set by launchers; accepted for compatibility.", "output", hidden=True, ge=-1, le=100_000, label="Local rank")

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("secret")}

    def validate(self) -> "TrainConfig":
        """Checks that need no files and no models. Raises ConfigError with one line."""
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required (a hub id, a diffusers folder or a .safetensors file)")
        if not self.instance_data_dir and not self.dataset_name:
            raise ConfigError("give the training images with --instance_data_dir (a folder) or --dataset_name")
        if not str(self.output_dir).strip():
            raise ConfigError("--output_dir must name a folder, got an empty string")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            lower = max(8, self.resolution - self.resolution % 8)
            raise ConfigError(f"--resolution must be a positive multiple of 8, got {self.resolution} (try {lower})")
        if self.rank <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not (self.flat_sigma >= 0) or self.flat_sigma != self.flat_sigma or self.flat_sigma == float("inf"):
            raise ConfigError(f"--flat_sigma must be a number >= 0 (0 = plain LoRA), got {self.flat_sigma}")
        if self.with_prior_preservation and not self.class_prompt:
            raise ConfigError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
        if self.with_prior_preservation and not self.class_data_dir:
            raise ConfigError("--with_prior_preservation needs --class_data_dir (a folder; missing images are generated)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "repeats",
                     "checkpointing_steps", "num_validation_images", "sample_batch_size", "validation_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "validation_steps", "validation_epochs", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.noise_offset < 0:
            raise ConfigError(f"--noise_offset must be >= 0, got {self.noise_offset}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.output_name is not None and (not self.output_name.strip() or any(c in self.output_name for c in "/\\")):
            raise ConfigError(f"--output_name must be a plain file name without slashes, got {self.output_name!r}")
        self._check_ranges()
        self._check_low_memory()
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None:
                for item in value if isinstance(value, list) else [value]:
                    if item not in choices:
                        raise ConfigError(f"--{f.name} must be one of {', '.join(choices)}; got {item!r}")
        return self

    def _check_low_memory(self) -> None:
        """--low_memory with a setting it cannot honour: one line naming the conflict (resolve_low_memory then
        turns on what the mode implies)."""
        if not self.low_memory:
            return
        conflicts = [
            (self.train_text_encoder, "--train_text_encoder (the mode keeps the text encoders frozen and their "
                                      "prompts cached)"),
            (self.mixed_precision in ("no", "fp16"), f"--mixed_precision {self.mixed_precision} (the mode computes "
                                                      "in bf16; leave it out or give bf16)"),
            (not self.cache_text_embeddings, "--no_cache_text_embeddings (the mode needs the prompts encoded once)"),
            (self.cuda_graph == "on", "--cuda_graph on (the mode turns the CUDA graph off: its private memory "
                                      "pool would keep the step's peak)"),
            (self.use_dora, "--use_dora (DoRA reads the base weight outside the layer, where it is float8)"),
            (self.torch_compile, "--torch_compile (compiling the float8-stored layers is not built)"),
        ]
        for conflict, what in conflicts:
            if conflict:
                raise ConfigError(f"--low_memory cannot be combined with {what}")

    def resolve_low_memory(self) -> list[str]:
        """Turn on what --low_memory implies (after validate); returns the settings it changed, for the log.
        Written into config.yaml, so the saved config says how the run really trained."""
        if not self.low_memory:
            return []
        implied = {"mixed_precision": "bf16", "gradient_checkpointing": True, "cache_latents": True,
                   "cuda_graph": "off"}
        changed = [name for name, value in implied.items() if getattr(self, name) != value]
        for name in changed:
            setattr(self, name, implied[name])
        return changed

    def _check_ranges(self) -> None:
        """Every number within its field's range (metadata "bounds"), and finite: nan and inf are never settings."""
        for f in fields(self):
            bounds = f.metadata.get("bounds") or {}
            elem, is_list = field_type(f.name)
            if elem not in (int, float):
                continue
            value = getattr(self, f.name)
            for item in (value if is_list else [value]) if value is not None else []:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"--{f.name} must be a finite number, got {item}")
                ok = all((
                    "ge" not in bounds or item >= bounds["ge"],
                    "gt" not in bounds or item > bounds["gt"],
                    "le" not in bounds or item <= bounds["le"],
                    "lt" not in bounds or item < bounds["lt"],
                ))
                if not ok:
                    raise ConfigError(f"--{f.name} must be {describe_range(bounds)}, got {item}")

    def resolve_arch_defaults(self, arch: str) -> "TrainConfig":
        """Fill the defaults that depend on the architecture (as diffusers' two scripts differ)."""
        if self.resolution is None:
            self.resolution = 1024 if arch == "sdxl" else 512
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if arch == "sdxl" else 5e-4
        if self.text_encoder_lr is None:
            # As diffusers' scripts: train_dreambooth_lora.py trains the text encoder at --learning_rate (it has
            # no --text_encoder_lr); train_dreambooth_lora_sdxl.py at --text_encoder_lr, whose default is 5e-6.
            self.text_encoder_lr = 5e-6 if arch == "sdxl" else self.learning_rate
        if self.adam_weight_decay is None:
            self.adam_weight_decay = 1e-4 if arch == "sdxl" else 1e-2
        if self.lora_alpha is None:
            self.lora_alpha = float(self.rank)
        if self.validation_seeds:  # explicit seeds decide how many images per prompt
            self.num_validation_images = len(self.validation_seeds)
        else:
            self.validation_seeds = list(range(self.num_validation_images))
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(4), "little")  # recorded in config.yaml so the run can be repeated
        if self.output_name is None:
            self.output_name = Path(self.output_dir).resolve().name
        return self


def field_label(name: str) -> str:
    """The setting's name for people (e.g. "Learning rate" for learning_rate)."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    return meta.get("label") or name.replace("_", " ").capitalize()


def describe_range(bounds: dict) -> str:
    """{"ge": 0, "lt": 1} -> "in [0, 1)"; one-sided -> ">= 0"."""
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    def num(x):
        return str(x) if isinstance(x, int) else f"{x:g}"

    if lo and hi:
        return f"in {lo[0]}{num(lo[1])}, {num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {num(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {num(hi[1])}"
    return "a number"


# --- types and parsing ------------------------------------------------------------------------------------
def _base_type(tp) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


_TYPES = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, bool]:
    return _base_type(_TYPES[name])


def _coerce(name: str, value):
    """Convert a YAML value to the field's type, with a one-line error."""
    elem, is_list = field_type(name)
    if value is None:
        return [] if is_list else None
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(name, elem, v) for v in items]
    return _coerce_scalar(name, elem, value)


def parse_bool(value) -> bool:
    """true/false, yes/no, on/off, 1/0 in any case (diffusers' `--flag=True`); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _canonical_choice(name: str, value):
    """A case-insensitive setting (--optimizer adamw) in the spelling of its choices (AdamW)."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    if not meta.get("case_insensitive") or not isinstance(value, str):
        return value
    return next((c for c in meta["choices"] if c.lower() == value.lower()), value)


def _coerce_scalar(name, elem, value):
    try:
        if elem is bool:
            return parse_bool(value)
        if elem is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if elem is float:
            return float(value)
        return _canonical_choice(name, str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} must be {elem.__name__}, got {value!r}") from None


def closest_key(name: str) -> str | None:
    match = difflib.get_close_matches(name, TrainConfig.field_names(), n=1, cutoff=0.5)
    return match[0] if match else None


MAX_YAML_BYTES = 1024 * 1024  # a config is a few KB; the bound keeps a hostile upload from costing memory


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors' aliases: a config never needs them, and nested aliases ("billion laughs")
    expand a 1 KB file into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a config file",
                                              event.start_mark)
        return super().compose_node(parent, index)


def safe_load_yaml_text(text: str):
    """yaml.safe_load that refuses aliases (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"config file {p} is larger than {MAX_YAML_BYTES // 1024} KB; a config is a few KB")
    try:
        data = safe_load_yaml_text(raw.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of setting: value")
    known = set(TrainConfig.field_names())
    out = {}
    for key, value in data.items():
        if key in IGNORED_FLAGS:
            warn_ignored(str(key))
            continue
        if key not in known:
            hint = closest_key(str(key))
            raise ConfigError(
                f"unknown config key {key!r} in {p}" + (f"; did you mean {hint!r}?" if hint else "")
            )
        out[key] = _coerce(key, value)
    return out


def warn_ignored(name: str) -> None:
    """One line on stderr (before logging is set up): the flag was accepted and has no effect here."""
    print(f"warning: --{name} is ignored: {IGNORED_FLAGS[name][1]}", file=sys.stderr)


def _bool_arg(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _default_of(f) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _with_default(help_text: str, default) -> str:
    """--help shows each default (argparse cannot: defaults are SUPPRESSed so a YAML file can be overridden)."""
    if default is None or default == [] or "default" in help_text.lower():
        return help_text
    shown = " ".join(map(str, default)) if isinstance(default, list) else str(default).lower() if isinstance(default, bool) else default
    return f"{help_text} [default: {shown}]"


def _version() -> str:
    from . import __version__

    return f"flatlora-diffusion {__version__}"


# The full list of flags would be a 150-line usage block; --help lists them by group below it.
USAGE = "%(prog)s [--config FILE.yaml] [--<setting> VALUE ...]  (the flags of diffusers' DreamBooth LoRA scripts)"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The diffusers-compatible flags, one per TrainConfig field. Only flags actually given end up in the
    namespace (default=SUPPRESS), so they can override a YAML file. Booleans take an optional value, as
    diffusers' `--prodigy_decouple=False` does; a default-on boolean also has --no_<name>."""
    parser = parser or argparse.ArgumentParser(
        prog="flatlora-diffusion train", description="DreamBooth LoRA / Flat-LoRA training for SD 1.x and SDXL.",
        allow_abbrev=False, usage=USAGE,
    )
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of settings (every flag is a key).")
    parser.add_argument("--version", action="version", version=_version())
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        elem, is_list = field_type(f.name)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        default = _default_of(f)
        help_text = _with_default(meta["help"], default) if not meta.get("hidden") else argparse.SUPPRESS
        names = [f"--{f.name}", *(f"--{a}" for a in meta.get("aliases", ()))]
        if elem is bool:
            group.add_argument(*names, nargs="?", const=True, type=_bool_arg, metavar="true|false",
                               help=help_text, **kwargs)
            if default is True:
                group.add_argument(f"--no_{f.name}", action="store_false", help=f"Disable {f.name}.", **kwargs)
            continue
        kwargs["type"] = elem
        if meta.get("choices") and not meta.get("case_insensitive"):
            kwargs["choices"] = meta["choices"]
        elif meta.get("choices"):
            kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        if is_list:
            kwargs["nargs"] = "+"
        group.add_argument(*names, help=help_text, **kwargs)
    ignored = parser.add_argument_group("accepted for diffusers compatibility, ignored (with a warning)")
    for name, (takes, why) in IGNORED_FLAGS.items():
        shape = {"bool": {"nargs": "?", "const": True}, "list": {"nargs": "+"}, "value": {}}[takes]
        ignored.add_argument(f"--{name}", dest=f"{_IGNORED_PREFIX}{name}", default=argparse.SUPPRESS,
                             help=f"Ignored: {why}.", **shape)
    return parser


_IGNORED_PREFIX = "ignored:"


class _OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, with the closest valid flag) instead of exiting."""

    def error(self, message):
        unknown = [w for w in message.split() if w.startswith("--")]
        if message.startswith("unrecognized arguments") and unknown:
            hint = closest_key(unknown[0][2:])
            raise ConfigError(f"unknown flag {unknown[0]}" + (f"; did you mean --{hint}?" if hint else ""))
        raise ConfigError(message)


def config_from_args(argv: list[str] | None) -> TrainConfig:
    """CLI flags (+ optional --config YAML) -> validated TrainConfig. Raises ConfigError."""
    parser = build_parser(_OneLineParser(prog="flatlora-diffusion train", allow_abbrev=False, usage=USAGE))
    ns = vars(parser.parse_args(argv))
    for key in [k for k in ns if k.startswith(_IGNORED_PREFIX)]:
        del ns[key]
        warn_ignored(key[len(_IGNORED_PREFIX):])
    values: dict[str, Any] = {}
    if "config" in ns:
        values.update(load_yaml(ns.pop("config")))
    values.update(ns)
    return make_config(values)


def check_setting_name(key: str) -> None:
    """A ConfigError naming the closest setting unless `key` is one of TrainConfig's."""
    if key not in TrainConfig.field_names():
        hint = closest_key(key)
        raise ConfigError(f"unknown setting {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))


def make_config(values: dict[str, Any]) -> TrainConfig:
    for key in values:
        check_setting_name(key)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        cfg.local_rank = env_rank
    return cfg.validate()


def save_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically; `train --config` on it repeats the run."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    data = cfg.to_dict()
    for f in fields(cfg):  # one-off instructions (--overwrite) are not settings of the run
        if f.metadata.get("transient") and f.name in data:
            data[f.name] = f.default
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, p)
