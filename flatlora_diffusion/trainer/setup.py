"""The Trainer's set-up, in the order it runs: models with LoRA, optimizer and lr schedule (and the step and
epoch counts), Flat-LoRA, accelerate's wrapping and the training step, with or without a CUDA graph."""

from __future__ import annotations

import logging
import math

import torch

from ..config import ConfigError, save_yaml
from ..flat import FlatLoRA
from ..fused_lora import fused_lora_switch
from ..norms import compute_dtype_norms

logger = logging.getLogger("flatlora_diffusion")


def _available_trackers(report_to: str | None) -> list[str] | None:
    """accelerate trackers that are installed; a missing one is a warning, not a crash (metrics.jsonl is always
    written). diffusers' scripts default to tensorboard, so their command lines often name it."""
    import importlib.util

    if not report_to or report_to == "none":
        return None
    names = ["tensorboard", "wandb", "comet_ml"] if report_to == "all" else [report_to]
    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}
    found = []
    for name in names:
        if importlib.util.find_spec(modules.get(name, name)) is None:
            logger.warning("--report_to %s: %s is not installed; metrics go to metrics.jsonl only", name, name)
        else:
            found.append(name)
    return found or None


def load_run_components(cfg, source):
    """A run's frozen models, as the config asks for them: fp32 on the CPU, no gradients, the VAE one picture at a
    time (SetupMixin._load_models casts, moves and adds the LoRA; the demo draws its base-model pictures with them
    as they are)."""
    from ..models import load_components

    c = load_components(
        source,
        revision=cfg.revision,
        variant=cfg.variant,
        cache_dir=cfg.cache_dir,
        vae_path=cfg.pretrained_vae_model_name_or_path,
        tokenizer_name=cfg.tokenizer_name,
        single_file_config=cfg.single_file_config,
    )
    for model in [c.unet, c.vae, *c.text_encoders]:
        model.requires_grad_(False)
    # The VAE encodes and decodes one picture at a time, whatever the batch: SDXL's fp32 VAE at 1024 px holds ~3 GB
    # of activations per picture, and decoding 4 validation images at once raised a 100-step job's peak from 19.9
    # to 31.8 GB on an H100 (benchmarks/results/sdxl_job_batched_validation_h100.json). Always on, so that a run
    # encodes its pictures the same way with or without validation images; the time is about the same.
    c.vae.enable_slicing()
    return c


class SetupMixin:
    """Part of Trainer (see trainer.py for the state it shares)."""

    def _make_accelerator(self) -> None:
        """accelerate's Accelerator (CPU, one GPU or `accelerate launch`), trackers, seeds, precision."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg = self.cfg
        trackers = _available_trackers(cfg.report_to)
        project = ProjectConfiguration(project_dir=str(self.run_dir.path), logging_dir=str(self.run_dir.path / cfg.logging_dir))
        self.acc = acc = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=trackers,
            project_config=project,
        )
        # LoRA initialisation and LoRA dropout use the global RNGs: seed them (the step's own noise does not).
        set_seed(cfg.seed)
        if trackers:
            acc.init_trackers("flatlora-diffusion", config={k: v for k, v in cfg.to_dict().items()
                                                            if isinstance(v, (int, float, str, bool))})
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)

    def _load_models(self) -> None:
        from ..models import add_lora, lora_config

        cfg, acc = self.cfg, self.acc
        c = self.components = load_run_components(cfg, self.plan.source)
        self.is_sdxl = c.arch == "sdxl"
        # --bf16_norms and --fused_lora hold for validation sampling too, which runs under the steps' autocast (class
        # images sample without autocast, in the weights' bf16, before any LoRA training: their norms already
        # compute in bf16)
        self.validation_norms = compute_dtype_norms(c.unet, cfg.bf16_norms, acc.mixed_precision)
        self.validation_lora = fused_lora_switch([c.unet, *c.text_encoders], cfg.fused_lora, acc.mixed_precision)
        # The SDXL VAE overflows in fp16; it encodes in fp32 (cheap next to the UNet).
        vae_dtype = torch.float32 if self.is_sdxl else self.weight_dtype
        c.vae.to(acc.device, dtype=vae_dtype)
        # --low_memory: the UNet reaches the device only once its frozen weights are float8 (below) and the latent
        # cache is full (parking.py's _unet_to_device). Moved there in bf16 first, SDXL's 5.1 GB UNet sat beside the text encoders
        # while converting: 8.6 GB on an H100 (PERFORMANCE.md).
        c.unet.to(None if cfg.low_memory else acc.device, dtype=self.weight_dtype)
        for te in c.text_encoders:
            te.to(acc.device, dtype=self.weight_dtype)
        if cfg.enable_xformers_memory_efficient_attention:
            c.unet.enable_xformers_memory_efficient_attention()
        add_lora(c.unet, lora_config(cfg.rank, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout,
                                     cfg.use_dora, cfg.use_rslora, cfg.init_lora_weights))
        if cfg.train_text_encoder:
            for te in c.text_encoders:
                add_lora(te, lora_config(cfg.rank, cfg.lora_alpha, cfg.text_encoder_target_modules, cfg.lora_dropout,
                                         cfg.use_dora, cfg.use_rslora, cfg.init_lora_weights))
        trained = [c.unet] + (c.text_encoders if cfg.train_text_encoder else [])
        self.pissa_initial = None
        if cfg.init_lora_weights == "pissa":  # the files must apply to the original base: keep (A0, B0)
            from ..export import lora_from_models
            from ..pissa import snapshot

            self.pissa_initial = snapshot(lora_from_models(self._lora_parts(c, unwrap=False)))
        for model in trained:  # LoRA parameters train in fp32 whatever the mixed precision
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.low_memory:
            from ..fp8_storage import STORAGE_DTYPE, store_frozen_weights_in_fp8

            stored = store_frozen_weights_in_fp8(c.unet, self.weight_dtype)  # still on the CPU: see _unet_to_device
            logger.info("--low_memory: %.1f M UNet weights stored in %s", stored / 1e6, str(STORAGE_DTYPE).split(".")[-1])
        if cfg.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in c.text_encoders:
                    te.gradient_checkpointing_enable()
        self.trained_models = trained

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, acc = self.cfg, self.acc
        c = self.components
        lr = cfg.learning_rate
        te_lr = cfg.text_encoder_lr
        if cfg.scale_lr:
            factor = cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
            lr, te_lr = lr * factor, te_lr * factor
        groups = [{"params": [p for p in c.unet.parameters() if p.requires_grad], "lr": lr,
                   "weight_decay": cfg.adam_weight_decay}]
        if cfg.train_text_encoder:
            for te in c.text_encoders:
                groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": te_lr,
                               "weight_decay": cfg.adam_weight_decay_text_encoder})
        self.params = [p for g in groups for p in g["params"]]
        if cfg.optimizer == "prodigy":
            import prodigyopt

            self.optimizer = prodigyopt.Prodigy(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), beta3=cfg.prodigy_beta3,
                                                eps=cfg.adam_epsilon, decouple=cfg.prodigy_decouple,
                                                use_bias_correction=cfg.prodigy_use_bias_correction,
                                                safeguard_warmup=cfg.prodigy_safeguard_warmup)
        else:
            if cfg.use_8bit_adam:
                import bitsandbytes as bnb

                opt_cls = bnb.optim.AdamW8bit
            else:
                opt_cls = torch.optim.AdamW
            extra = {}
            if opt_cls is torch.optim.AdamW and self.params and all(p.is_cuda for p in self.params):
                # One fused kernel per step instead of the for-each path, whose per-parameter step counters
                # cost ~2,000 host-side scalar reads per SDXL step (measured: benchmarks/trainer_end_to_end.py).
                extra["fused"] = True
            self.optimizer = opt_cls(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **extra)

        # accelerate gives each process every num_processes-th batch (padded to equal counts): count per process.
        batches_per_process = math.ceil(len(self.dataloader) / acc.num_processes)
        steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        if cfg.max_train_steps is None:
            cfg.max_train_steps = cfg.num_train_epochs * steps_per_epoch
        self.num_epochs = math.ceil(cfg.max_train_steps / steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        # accelerate steps a prepared scheduler once per process per optimizer step (as diffusers counts).
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
                                          num_training_steps=cfg.max_train_steps * acc.num_processes,
                                          num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
        if acc.is_main_process:
            save_yaml(cfg, self.run_dir.config_file)  # now with max_train_steps resolved

    def _build_flat(self) -> None:
        cfg, c = self.cfg, self.components
        targets = []
        if "unet" in cfg.flat_targets:
            targets.append(c.unet)
        if "text_encoder" in cfg.flat_targets and cfg.train_text_encoder:
            targets += c.text_encoders
        self.flat = None
        # Built for sigma = 0 too: its steps then patch nothing, so "--flat_sigma 0" is plain LoRA bit for bit
        # through the very same code path (tested).
        if targets:
            self.flat = FlatLoRA(targets, sigma=cfg.flat_sigma, schedule=cfg.flat_schedule,
                                 total_steps=cfg.max_train_steps, seed=cfg.seed,
                                 per_microbatch=cfg.flat_per_microbatch,
                                 share_noise_across_ranks=cfg.flat_share_noise_across_ranks,
                                 backend=cfg.flat_backend)
            logger.info("Flat-LoRA: sigma %.3g (%s) on %d layers", cfg.flat_sigma, cfg.flat_schedule, len(self.flat.layers))

    def _prepare_accelerate(self) -> None:
        from ..step import StepModels, StepOptions, TrainStep

        acc, c, cfg = self.acc, self.components, self.cfg
        prepared = acc.prepare(*self.trained_models, self.optimizer, self.dataloader, self.lr_scheduler)
        n = len(self.trained_models)
        wrapped = list(prepared[:n])
        self.optimizer, self.dataloader, self.lr_scheduler = prepared[n:]
        unet = wrapped[0]
        tes = wrapped[1:] if cfg.train_text_encoder else c.text_encoders
        self._register_checkpoint_hooks()
        self.step = TrainStep(
            StepModels(unet=unet, text_encoders=list(tes), noise_scheduler=c.noise_scheduler, arch=c.arch),
            self.optimizer, self.params, acc,
            StepOptions(seed=cfg.seed, noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma,
                        prior_loss_weight=cfg.prior_loss_weight, max_grad_norm=cfg.max_grad_norm,
                        train_text_encoder=cfg.train_text_encoder, bf16_norms=cfg.bf16_norms,
                        fused_lora=cfg.fused_lora),
            flat=self.flat, lr_scheduler=self.lr_scheduler,
        )
        if cfg.torch_compile:
            from ..compiled_blocks import compile_unet_blocks

            regions = compile_unet_blocks(acc.unwrap_model(unet))
            logger.info("torch.compile: %d UNet blocks, compiled at the first step", regions)
        self._maybe_graph_the_step()
        self._log_flat_path()
        self.global_step = 0
        self.first_epoch = 0

    def _graph_blockers(self) -> list[str]:
        """Why the step cannot be replayed from a CUDA graph here (empty: it can)."""
        cfg, acc = self.cfg, self.acc
        if acc.device.type != "cuda":
            return ["no CUDA device"]
        reasons = []
        if acc.num_processes > 1:
            reasons.append("several processes (DDP hooks cannot be captured)")
        if cfg.gradient_accumulation_steps != 1:
            reasons.append("gradient accumulation")
        if self.flat is not None and self.flat.layers and self.flat.fast_engine() is None:
            reasons.append("the Flat-LoRA fast engine is unavailable (Triton, or --flat_backend reference)")
        return reasons

    def _maybe_graph_the_step(self) -> None:
        cfg = self.cfg
        if cfg.cuda_graph == "off":
            return
        blockers = self._graph_blockers()
        if blockers:
            if cfg.cuda_graph == "on":
                raise ConfigError("--cuda_graph on is not possible here: " + "; ".join(blockers))
            logger.info("CUDA graph off: %s", "; ".join(blockers))
            return
        from ..graphed_step import GraphedTrainStep

        self.step = GraphedTrainStep(self.step)
        logger.info("CUDA graph on: each step's forward and backward replay from a captured graph")

    def _log_flat_path(self) -> None:
        """Which Flat-LoRA implementation the steps use and, with several processes, whether they draw one noise
        or one each: a fingerprint per process of the first layer's noise at step 1 (the sign bits of its first
        32 values; gathered, so every process takes part). A log reader (benchmarks/multi_gpu.py) checks both."""
        flat, cfg, acc = self.flat, self.cfg, self.acc
        if flat is None or not flat.layers or not cfg.flat_sigma:
            return
        if flat.fast_engine() is not None:
            logger.info("Flat-LoRA path: fused (Triton kernels)")
        else:
            from ..flat.fused import unreadable_weights

            why = ("--flat_backend reference" if cfg.flat_backend == "reference"
                   else "the layers are not on a CUDA device" if acc.device.type != "cuda"
                   else unreadable_weights(flat.layers) or "Triton is not installed")
            logger.info("Flat-LoRA path: reference (%s)", why)
        if acc.num_processes > 1:
            eps = flat.noise(flat.layers[0], 1).flatten()[:32]
            bits = (eps > 0).long() << torch.arange(eps.numel(), device=eps.device)
            prints = acc.gather(bits.sum().reshape(1)).tolist()
            logger.info("Flat-LoRA noise per process (layer %s, step 1): %s (%s)", flat.layers[0].name,
                        " ".join(f"{p:08x}" for p in prints),
                        "shared" if cfg.flat_share_noise_across_ranks else "independent draws")
