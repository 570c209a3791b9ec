"""The DreamBooth LoRA / Flat-LoRA training run, from a validated TrainConfig to a finished run directory.

Read top to bottom: preflight (every cheap check, nothing written) -> models -> data -> optimizer ->
resume -> loop (step, metrics, checkpoints, validation) -> LoRA files. The step itself lives in step.py,
the perturbation in flat/, the files in export/; this module wires them with accelerate, so the same
loop runs on the CPU, one GPU or many (`accelerate launch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import faults
from .config import ConfigError, TrainConfig, save_yaml
from .data import DataError, ImageRecord, validate_data_args
from .flat import FlatLoRA
from .models import ModelError, ModelSource, inspect_model_source
from .run_dir import (DIFFUSERS_WEIGHTS, RunDir, RunLocked, TrainerLock, checkpoint_problem, is_disk_error,
                      lock_holder)

logger = logging.getLogger("flatlora_diffusion")

USER_ERRORS = (ConfigError, DataError, ModelError)

# Settings that make a run what it is: resuming with another value would train a different run (or fail
# to load the checkpoint at all), so a resume with a difference is refused.
IDENTITY = ("seed", "rank", "lora_alpha", "use_dora", "use_rslora", "init_lora_weights", "lora_target_modules",
            "train_text_encoder", "text_encoder_target_modules", "optimizer", "use_8bit_adam")
# Settings that do not make a run another run: an equal config except for these is "the same run".
_NOT_COMPARED = ("overwrite", "resume_from_checkpoint", "local_rank")


class Cancelled(Exception):
    """Cancel (SIGTERM, Ctrl-C) was heard; the message says what of the run was saved."""


class TrainingDiverged(FloatingPointError):
    """The loss or the LoRA weights became NaN/inf; nothing non-finite was saved. One-line message."""


# ==========================================================================================================
# preflight: everything that can be wrong with the user's input, checked before any model loads
# ==========================================================================================================
@dataclass
class Plan:
    cfg: TrainConfig
    source: ModelSource
    records: list[ImageRecord] | None  # None for --dataset_name (loaded later)
    resume_dir: Path | None
    # where to resume from, best first: with "latest", the older complete checkpoints are the fall-backs
    resume_candidates: list[Path] = field(default_factory=list)


def _is_main_process() -> bool:
    """Under `accelerate launch` / torchrun every process runs the trainer; only the main one writes the run
    files. (Read from the launcher's variables: creating accelerate's state here would fix it before the
    Accelerator, with its own CPU / process-group settings, exists.)"""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


def _check_output_writable(output_dir: Path) -> None:
    """The nearest existing folder on the way must accept a new file (a real probe: root ignores modes)."""
    import tempfile

    probe = output_dir.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".flatlora-write-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"--output_dir {output_dir} is not writable ({e.strerror} in {probe})") from None


def _resolve_resume(cfg: TrainConfig, run: RunDir) -> list[Path]:
    """The checkpoints to try, best first. "latest" skips (with a warning) those that are incomplete or
    corrupt and falls back to the previous complete one; an explicit checkpoint must be whole."""
    if not cfg.resume_from_checkpoint:
        return []
    if cfg.resume_from_checkpoint == "latest":
        found = [p for _, p in reversed(run.list_checkpoints())]
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting a new run", run.checkpoints)
            return []
        good = []
        for path in found:
            problem = checkpoint_problem(path)
            if problem:
                logger.warning("%s cannot be resumed from (%s); falling back to an earlier checkpoint", path.name, problem)
            else:
                good.append(path)
        if not good:
            raise ConfigError(f"--resume_from_checkpoint latest: no checkpoint in {run.checkpoints} is whole "
                              f"({found[0].name}: {checkpoint_problem(found[0])})")
        if good[0] != found[0]:
            logger.warning("resuming from %s, the newest whole checkpoint", good[0].name)
        return good
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir():
        path = run.checkpoints / Path(cfg.resume_from_checkpoint).name  # diffusers accepts the bare folder name
    if not (path / "training_state.json").is_file():
        raise ConfigError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no complete checkpoint there")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: the checkpoint is damaged ({problem})")
    return [path]


def _comparable(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in _NOT_COMPARED}


def _check_resume_identity(cfg: TrainConfig, checkpoint: Path, run: RunDir, seed_given: bool) -> None:
    """A resume continues the run that wrote the checkpoint: its identity settings must be the same."""
    try:
        recorded = json.loads((checkpoint / "training_state.json").read_text()).get("settings") or {}
    except (OSError, ValueError):
        recorded = {}
    if not recorded:  # a checkpoint of an older version: the run's config.yaml tells, if it is there
        from .config import safe_load_yaml_text

        try:
            data = safe_load_yaml_text(run.config_file.read_text())
            recorded = {k: data[k] for k in IDENTITY if isinstance(data, dict) and k in data}
        except Exception:
            recorded = {}
    if not seed_given and isinstance(recorded.get("seed"), int):
        cfg.seed = recorded["seed"]  # no --seed given: the run's own
    for key in IDENTITY:
        if key in recorded and recorded[key] != getattr(cfg, key):
            raise ConfigError(
                f"--resume_from_checkpoint {checkpoint.name}: the run was trained with --{key} {recorded[key]}, "
                f"not {getattr(cfg, key)}; resume with the run's own settings (its config.yaml) or train a new run "
                f"in another --output_dir")


def _check_existing_run(cfg: TrainConfig, run: RunDir, given: dict, resuming: bool) -> None:
    """A folder that holds a run is trained into only to resume that run, to start the very run it holds
    (the web app's queued run, or one that failed before its first step), or with --overwrite."""
    holder = lock_holder(run.path)
    if holder is not None:
        raise ConfigError(str(RunLocked(run.path, holder or None)))
    if cfg.overwrite or resuming or not run.path.is_dir() or not run.holds_a_run():
        return
    status = run.read_status()
    where = f"--output_dir {run.path} already holds a run"
    if status.get("state"):
        where += f" ({status.get('state')}, step {status.get('step', 0)} of {status.get('total') or '?'})"
    advice = ("; resume it with --resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite "
              "to replace it")
    if run.has_progress():
        raise ConfigError(where + advice)
    try:
        from .config import safe_load_yaml_text

        recorded = safe_load_yaml_text(run.config_file.read_text())
    except Exception:
        recorded = None
    if not isinstance(recorded, dict):
        raise ConfigError(where + advice)
    recorded = _comparable(recorded)
    if recorded not in (_comparable(given), _comparable(cfg.to_dict())):
        differ = sorted(k for k in set(recorded) | set(_comparable(given))
                        if recorded.get(k) != given.get(k) and recorded.get(k) != getattr(cfg, k, None))
        raise ConfigError(where + f" with other settings ({', '.join(differ[:4])})" + advice)


def preflight(cfg: TrainConfig) -> Plan:
    """Validate everything cheap. Raises ConfigError / DataError / ModelError with one line; writes nothing."""
    cfg.validate()
    given = cfg.to_dict()  # before the architecture's defaults: the form a config file holds them in
    seed_given = cfg.seed is not None
    if cfg.overwrite and cfg.resume_from_checkpoint:
        raise ConfigError("--overwrite starts the run afresh; it cannot be combined with --resume_from_checkpoint")
    if cfg.enable_xformers_memory_efficient_attention and not torch.cuda.is_available():
        logger.warning("--enable_xformers_memory_efficient_attention needs CUDA; using PyTorch SDPA attention")
        cfg.enable_xformers_memory_efficient_attention = False
    if cfg.cuda_graph == "on" and not torch.cuda.is_available():
        raise ConfigError("--cuda_graph on needs a CUDA GPU; use auto or off")
    if cfg.cuda_graph == "on" and cfg.gradient_accumulation_steps != 1:
        raise ConfigError("--cuda_graph on needs --gradient_accumulation_steps 1; use auto or off")
    if cfg.use_8bit_adam:
        _require("bitsandbytes", "--use_8bit_adam needs bitsandbytes: pip install 'flatlora-diffusion[bnb]'")
    if cfg.optimizer == "prodigy":
        _require("prodigyopt", "--optimizer prodigy needs prodigyopt: pip install 'flatlora-diffusion[prodigy]'")
    if cfg.init_lora_weights == "pissa" and cfg.use_dora:
        raise ConfigError("--init_lora_weights pissa cannot be combined with --use_dora; choose one")
    if cfg.push_to_hub:
        _check_hub(cfg)
    _check_output_writable(Path(cfg.output_dir))
    source = inspect_model_source(cfg.pretrained_model_name_or_path, cfg.revision, cfg.cache_dir)
    if cfg.pretrained_vae_model_name_or_path and not (
        Path(cfg.pretrained_vae_model_name_or_path).exists() or cfg.pretrained_vae_model_name_or_path.count("/") == 1
    ):
        raise ModelError(f"--pretrained_vae_model_name_or_path {cfg.pretrained_vae_model_name_or_path} not found")
    cfg.resolve_arch_defaults(source.arch)
    records = validate_data_args(
        cfg.instance_data_dir,
        cfg.dataset_name,
        cfg.instance_prompt,
        cfg.with_prior_preservation,
        cfg.class_data_dir,
        cfg.class_prompt,
        cfg.resolution,
        caption_column=cfg.caption_column,
        caption_extension=cfg.caption_extension,
        interpolation=cfg.image_interpolation_mode,
    )
    run = RunDir(cfg.output_dir)
    candidates = _resolve_resume(cfg, run)
    if candidates:
        _check_resume_identity(cfg, candidates[0], run, seed_given)
    elif cfg.resume_from_checkpoint == "latest" and run.config_file.is_file():
        _check_resume_identity(cfg, run.path, run, seed_given)  # no checkpoint yet: the run's config.yaml decides
    if _is_main_process():
        _check_existing_run(cfg, run, given, resuming=bool(cfg.resume_from_checkpoint))
    return Plan(cfg, source, records, candidates[0] if candidates else None, candidates)


def _hub_repo_id(cfg: TrainConfig) -> str:
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name  # diffusers' default: the folder's name


def _check_hub(cfg: TrainConfig) -> None:
    """--push_to_hub: everything the upload needs is checked before hours of training, not after."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = _hub_repo_id(cfg)
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


def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(message)


# ==========================================================================================================
# the run
# ==========================================================================================================
def train(cfg: TrainConfig) -> RunDir:
    """Run training to completion; returns the run directory. User mistakes raise before anything is written."""
    plan = preflight(cfg)
    main = _is_main_process()
    run = RunDir(cfg.output_dir)
    lock = None
    if main:
        run.create()
        try:  # taken before anything is written: one run folder, at most one trainer
            lock = TrainerLock(run.path).acquire()
        except RunLocked as e:
            raise ConfigError(str(e)) from None
    try:
        if main:
            if cfg.overwrite:
                run.clear_run_files()
            run.remove_leftovers()
            save_yaml(cfg, run.config_file)
            run.set_status("running", step=0, total=cfg.max_train_steps or 0, message="loading models",
                           finished_at=None, eta_seconds=None)
        cancelled = {"flag": False}
        watch = _CancelWatch(cancelled, run if main else None)
        watch.install()
        try:
            _Trainer(plan, run, cancelled).run()
        except (Cancelled, KeyboardInterrupt) as e:
            message = str(e) if isinstance(e, Cancelled) and str(e) else "cancelled"
            if main:
                _final_status(run, "cancelled", message)
            raise Cancelled(message) from None
        except BaseException as e:
            if main:
                _final_status(run, "failed", failure_message(e, run))
            raise
        finally:
            watch.uninstall()
    finally:
        if lock is not None:
            lock.release()
    return run


def _final_status(run: RunDir, state: str, message: str) -> None:
    """Best effort: a status that cannot be written (a full disk) is logged, never a second traceback."""
    try:
        run.set_status(state, message=message, eta_seconds=None)
    except OSError as e:
        logger.error("could not record the run as %s in %s: %s", state, run.status_file, e)


def failure_message(e: BaseException, run: RunDir) -> str:
    """One line for status.json and the terminal."""
    text = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, USER_ERRORS) or isinstance(e, TrainingDiverged):
        return text
    if is_disk_error(e) or _disk_full(run.path):
        what = getattr(e, "strerror", None) or text or type(e).__name__
        good = run.list_checkpoints()
        keep = (f"; the last complete checkpoint is {good[-1][1].name} (free some space, then resume with "
                f"--resume_from_checkpoint latest)") if good else ""
        return f"cannot write the run folder {run.path}: {what}{keep}"
    return f"{type(e).__name__}: {text}"


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 1024 * 1024
    except OSError:
        return False


class _CancelWatch:
    """SIGTERM (the web app's Cancel) and Ctrl-C: set the flag the loop and the validation sampler check.

    A Python signal handler only runs between bytecodes, so a main thread stuck in one long native call (a huge
    allocation, a slow kernel) would ignore it. The C-level handler still writes the signal number to a wakeup
    pipe; a watcher thread reads it and, when the main thread has not stopped within the grace period, records
    the run as cancelled and exits the process (the lock goes with it; half-written files are temporary ones).
    """

    def __init__(self, cancelled: dict, run: RunDir | None):
        self.cancelled, self.run = cancelled, run
        self.grace_s = float(os.environ.get("FLATLORA_CANCEL_GRACE_S", "10"))
        self.done = threading.Event()
        self.installed = False

    def install(self) -> None:
        if not _main_thread():
            return
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
        self.previous_int_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="flatlora-cancel-watch", daemon=True)
        self.thread.start()
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGTERM, self.previous_handler)
        signal.signal(signal.SIGINT, self.previous_int_handler)
        try:
            os.write(self.write_fd, b"\0")  # wake the watcher so that it ends
        except OSError:
            pass
        self.thread.join(2)
        os.close(self.read_fd)
        os.close(self.write_fd)
        self.installed = False

    def _on_signal(self, signum, frame):
        self.cancelled["flag"] = True

    def _on_interrupt(self, signum, frame):
        """The first Ctrl-C cancels like SIGTERM (the step finishes and is saved); a second one interrupts at
        once, as Ctrl-C does everywhere else."""
        self.cancelled["flag"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _watch(self) -> None:
        while not self.done.is_set():
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return
            if self.done.is_set() or not data:
                return
            if signal.SIGTERM in data or signal.SIGINT in data:
                self.cancelled["flag"] = True
                logger.warning("cancel requested: finishing this step, then saving a checkpoint and the LoRA files")
                if self.done.wait(self.grace_s):
                    return
                logger.error("cancelled, and the trainer did not stop within %.0f s: exiting now", self.grace_s)
                if self.run is not None:
                    _final_status(self.run, "cancelled", "cancelled (the trainer was stuck and was stopped)")
                os._exit(130)


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


def _bar(total: int, desc: str):
    """A progress bar on stderr like the steps bar (log lines go through tqdm.write and stay off it)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Trainer:
    def __init__(self, plan: Plan, run: RunDir, cancelled: dict):
        self.plan, self.cfg, self.run_dir, self.cancelled = plan, plan.cfg, run, cancelled

    # --- set-up ----------------------------------------------------------------------------------------------
    def run(self) -> None:
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
        self._load_models()
        self._prepare_data()
        self._build_optimizer()
        self._build_flat()
        self._prepare_accelerate()
        self._resume()
        try:
            self._loop()
            self._finish()
        except Cancelled:
            raise Cancelled(self._save_cancelled_step()) from None

    def _load_models(self) -> None:
        from .models import add_lora, load_components, lora_config

        cfg, acc = self.cfg, self.acc
        c = self.components = load_components(
            self.plan.source,
            revision=cfg.revision,
            variant=cfg.variant,
            cache_dir=cfg.cache_dir,
            vae_path=cfg.pretrained_vae_model_name_or_path,
            tokenizer_name=cfg.tokenizer_name,
            single_file_config=cfg.single_file_config,
        )
        self.is_sdxl = c.arch == "sdxl"
        for model in [c.unet, c.vae, *c.text_encoders]:
            model.requires_grad_(False)
        # The SDXL VAE overflows in fp16; it encodes in fp32 (cheap next to the UNet).
        vae_dtype = torch.float32 if self.is_sdxl else self.weight_dtype
        c.vae.to(acc.device, dtype=vae_dtype)
        c.unet.to(acc.device, dtype=self.weight_dtype)
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
            from .export import lora_from_models
            from .pissa import snapshot

            self.pissa_initial = snapshot(lora_from_models(self._lora_parts(c, unwrap=False)))
        for model in trained:  # LoRA parameters train in fp32 whatever the mixed precision
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in c.text_encoders:
                    te.gradient_checkpointing_enable()
        self.trained_models = trained

    def _prepare_data(self) -> None:
        from .data import (BucketConfig, DreamBoothDataset, generate_class_images, load_class_records,
                           load_hf_dataset_records, make_dataloader)

        cfg = self.cfg
        records = self.plan.records
        if records is None:
            records = load_hf_dataset_records(cfg.dataset_name, cfg.dataset_config_name, cfg.image_column,
                                              cfg.caption_column, cfg.instance_prompt, cfg.cache_dir)
        class_records = None
        if cfg.with_prior_preservation:
            self._status("generating class images")
            if self.acc.is_main_process:
                bars: list = []

                def progress(done: int, missing: int) -> None:  # a bar for what generation really makes
                    if not bars:
                        bars.append(_bar(missing, "Class images"))
                    bars[0].update(done - bars[0].n)

                try:
                    generate_class_images(self._sampling_pipeline(), cfg.class_data_dir, cfg.class_prompt,
                                          cfg.num_class_images, cfg.sample_batch_size, seed=cfg.seed,
                                          progress=progress,
                                          pipeline_kwargs={"num_inference_steps": cfg.validation_inference_steps})
                finally:
                    for bar in bars:
                        bar.close()
            self.acc.wait_for_everyone()
            class_records = load_class_records(cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images,
                                               cfg.caption_extension)
        buckets = None
        if cfg.aspect_ratio_buckets:
            buckets = BucketConfig(min_reso=cfg.min_bucket_reso, max_reso=cfg.max_bucket_reso,
                                   step=cfg.bucket_reso_steps, no_upscale=cfg.bucket_no_upscale)
        self.dataset = DreamBoothDataset(records, class_records, resolution=cfg.resolution, center_crop=cfg.center_crop,
                                         random_flip=cfg.random_flip, interpolation=cfg.image_interpolation_mode,
                                         buckets=buckets, repeats=cfg.repeats, seed=cfg.seed)
        self.num_images = len(records)
        self.num_class_images = len(class_records or [])
        if cfg.cache_latents:
            self._status("caching latents")
            self.dataset = _LatentCache(self.dataset, self._encode_pixels)
        self.dataloader = make_dataloader(self.dataset, cfg.train_batch_size, cfg.seed, cfg.dataloader_num_workers)
        self.embedding_cache: dict[str, tuple] = {}

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
        from .step import StepModels, StepOptions, TrainStep

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
                        train_text_encoder=cfg.train_text_encoder),
            flat=self.flat, lr_scheduler=self.lr_scheduler,
        )
        self._maybe_graph_the_step()
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
        from .graphed_step import GraphedTrainStep

        self.step = GraphedTrainStep(self.step)
        logger.info("CUDA graph on: each step's forward and backward replay from a captured graph")

    # --- checkpoints: LoRA weights only, never the frozen base ------------------------------------------------
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
        self.first_epoch = self.global_step // self.steps_per_epoch
        if main:
            self.run_dir.truncate_metrics_after(self.global_step)
        logger.info("resumed from %s at step %d", path, self.global_step)

    # --- encoding -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        latents = vae.encode(pixel_values.to(self.acc.device, vae.dtype)).latent_dist.sample(
            generator=torch.Generator(device=self.acc.device).manual_seed(0)
        )
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    def _text_inputs(self, prompts: list[str]) -> dict:
        """input_ids (text encoders trained) or cached embeddings (frozen)."""
        from .models import tokenize
        from .step import encode_prompts

        c = self.components
        if self.cfg.train_text_encoder or not self.cfg.cache_text_embeddings:
            return {"input_ids": [tokenize(tok, prompts) for tok in c.tokenizers]}
        missing = [p for p in dict.fromkeys(prompts) if p not in self.embedding_cache]
        if missing:
            with torch.no_grad(), self.acc.autocast():
                embeds, pooled = encode_prompts(c.text_encoders, [tokenize(t, missing) for t in c.tokenizers], c.arch)
            for i, p in enumerate(missing):
                self.embedding_cache[p] = (embeds[i], None if pooled is None else pooled[i])
        embeds = torch.stack([self.embedding_cache[p][0] for p in prompts])
        pooled = torch.stack([self.embedding_cache[p][1] for p in prompts]) if self.is_sdxl else None
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _make_step_batch(self, batch: dict):
        from .step import StepBatch

        if self.cfg.cache_latents:
            latents = batch["pixel_values"].to(self.acc.device)  # _LatentCache put latents there
        else:
            latents = self._encode_pixels(batch["pixel_values"])
        time_ids = batch["time_ids"].to(self.acc.device, self.weight_dtype) if self.is_sdxl else None
        return StepBatch(latents=latents, time_ids=time_ids, n_class=int(batch["is_class"].sum()),
                         **self._text_inputs(batch["prompts"]))

    # --- the loop -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, run = self.cfg, self.acc, self.run_dir
        total = cfg.max_train_steps
        self.started = time.time()
        start_step = self.global_step
        if acc.is_main_process:
            run.write_prompts(cfg.validation_prompt)
        self._log_summary()
        if self.global_step == 0:
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

    def _status(self, message: str) -> None:
        if self.acc.is_main_process:
            self.run_dir.set_status("running", step=getattr(self, "global_step", 0),
                                    total=self.cfg.max_train_steps or 0, message=message)

    # --- validation images --------------------------------------------------------------------------------------
    def _sampling_pipeline(self):
        from diffusers import DPMSolverMultistepScheduler

        c = self.components
        scheduler = DPMSolverMultistepScheduler.from_config(c.noise_scheduler.config)
        pipe = c.pipeline(scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)  # one bar per image set (ours), not one per image
        return pipe

    def _validate(self) -> None:
        """Validation images of the current step (main process; the others wait), unless already made."""
        cfg, acc = self.cfg, self.acc
        out = self.run_dir.sample_dir(self.global_step)
        if cfg.validation_prompt and acc.is_main_process and not (out / ".complete").exists():
            self._make_validation_images(out)
        acc.wait_for_everyone()

    @torch.no_grad()
    def _make_validation_images(self, out: Path) -> None:
        cfg, acc = self.cfg, self.acc
        self._status(f"validation images at step {self.global_step}")
        models = [self.components.unet, *self.components.text_encoders]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        pipe = self._sampling_pipeline()
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        size = cfg.resolution

        def stop_if_cancelled(pipe, i, t, kwargs):  # Cancel while sampling: between denoising steps
            if self.cancelled["flag"]:
                raise Cancelled()
            return kwargs

        bar = _bar(len(cfg.validation_prompt) * len(cfg.validation_seeds), f"Validation images (step {self.global_step})")
        for p, prompt in enumerate(cfg.validation_prompt):
            for seed in cfg.validation_seeds:
                gen = torch.Generator(device="cpu").manual_seed(int(seed))
                with acc.autocast():
                    image = pipe(prompt, num_inference_steps=cfg.validation_inference_steps,
                                 guidance_scale=cfg.validation_guidance_scale, generator=gen,
                                 height=size, width=size, callback_on_step_end=stop_if_cancelled).images[0]
                image.save(tmp / f"{p}_{seed}.png")
                bar.update(1)
                faults.hit("validation")
                if self.cancelled["flag"]:
                    bar.close()
                    raise Cancelled()
        bar.close()
        (tmp / ".complete").write_text("")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        for m, mode in zip(models, modes):
            m.train(mode)

    # --- the end ------------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        cfg, acc, run = self.cfg, self.acc, self.run_dir
        acc.wait_for_everyone()
        self._validate()  # the final step (skipped when it was just made)
        self._check_finite()  # a NaN LoRA is never written
        if acc.is_main_process:
            self._status("writing LoRA files")
            self._write_run_lora_files()
            message = self._push_to_hub() if cfg.push_to_hub else "done"
            run.set_status("completed", step=self.global_step, total=cfg.max_train_steps, message=message, eta_seconds=0)
        acc.end_training()

    def _trained_lora(self):
        """The LoRA of the current step in export's normalized form (for the original base under PiSSA)."""
        from .export import lora_from_models

        lora = lora_from_models(self._lora_parts(self.components))
        if self.pissa_initial is not None:
            from .pissa import to_original_base

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
        from .export import diffusers_file_contents, save_kohya_lora
        from .safetensors_io import save_safetensors_atomic

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

        from .export import diffusers_file_contents

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

    def _push_to_hub(self) -> str:
        """Upload the run's files; returns the status message. The training succeeded whatever the upload
        does, so a failure is one logged line and the run stays "completed" (its files are all there)."""
        import huggingface_hub

        cfg = self.cfg
        self._status("uploading to the hub")
        try:
            repo_id = huggingface_hub.create_repo(_hub_repo_id(cfg), exist_ok=True, token=cfg.hub_token).repo_id
            huggingface_hub.upload_folder(repo_id=repo_id, folder_path=cfg.output_dir, token=cfg.hub_token,
                                          ignore_patterns=["checkpoints/*", "step_*", "*.partial", "trainer.lock",
                                                           ".*.tmp"])
        except Exception as e:  # network, permissions, quota: none of them undoes the training
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            logger.error("the upload to the hub failed (%s); the run's files are in %s", detail, self.run_dir.path)
            return f"done; the upload to the hub failed: {detail}"
        logger.info("uploaded to https://huggingface.co/%s", repo_id)
        return f"done; uploaded to {repo_id}"


class _LatentCache(torch.utils.data.Dataset):
    """The dataset with every item's pixels replaced by its VAE latents, encoded once (--cache_latents).

    As in diffusers' scripts, each image's crop and flip are then those of the first epoch."""

    def __init__(self, dataset, encode):
        self.dataset = dataset
        self.items = []
        for i in range(len(dataset)):
            item = dataset[i]
            examples = list(item) if isinstance(item, (tuple, list)) else [item]
            for e in examples:
                e.pixel_values = encode(e.pixel_values[None])[0].cpu()
            self.items.append(tuple(examples))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def bucket_of(self, i):
        return self.dataset.bucket_of(i)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    @property
    def epoch(self):
        return self.dataset.epoch
