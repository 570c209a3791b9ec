"""The way into a training run: train(cfg) from a validated TrainConfig to a finished run directory.

preflight() checks everything that can be wrong with the user's input (settings, data, model source, the run
folder, a resume) before anything is written; train() then holds the run folder around the Trainer: the lock,
config.yaml, status.json from "loading models" to the final state, and the one-line message of a failure.
What happens inside the run (models, loop, checkpoints, validation images, LoRA files) is the trainer/ package;
the step itself is step.py, the perturbation flat/, the files export/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig, save_yaml
from .data import DataError, ImageRecord, validate_data_args
from .hub import check_hub as _check_hub  # a name of this module: tests replace it to stay off the network
from .models import ModelError, ModelSource, inspect_model_source
from .run_dir import RunDir, RunLocked, TrainerLock, checkpoint_problem, is_disk_error, lock_holder
from .trainer import CancelWatch, Cancelled, Trainer, TrainingDiverged
from .trainer.checkpoints import IDENTITY

logger = logging.getLogger("flatlora_diffusion")

USER_ERRORS = (ConfigError, DataError, ModelError)

_Trainer = Trainer  # the name tests reach the trainer class by

# Settings that do not make a run another run: an equal config except for these is "the same run".
_NOT_COMPARED = ("overwrite", "resume_from_checkpoint", "local_rank")


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
    implied = cfg.resolve_low_memory()
    if implied:  # the CUDA graph is off too: its private memory pool would keep the step's peak for good
        logger.info("--low_memory: UNet base weights stored in float8_e4m3fn, computed in bf16; set %s",
                    ", ".join(f"{k}={getattr(cfg, k)}" for k in implied))
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



def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(message)



# ==========================================================================================================
# the run
# ==========================================================================================================
def _use_expandable_segments() -> None:
    """Ask torch's CUDA allocator for expandable segments unless the user configured it: measured on SDXL
    (benchmarks/results/trainer_memory_h100.json) it cuts the fragmentation the eager warm-up of the CUDA graph
    leaves behind, 0.9-1.6 GB of peak memory, with no step-time change measured. Read when the allocator starts, so this must
    run before anything touches the GPU; a process that already did keeps its settings."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _use_small_cublas_workspace() -> None:
    """A 4 MiB cuBLAS workspace per stream (CUBLAS_WORKSPACE_CONFIG=:4096:1) unless the user configured it: 200 MiB
    less peak memory, as fast (one H100: SDXL 101.3 / 252.2 ms per step at batch 1 / 4 against 102.6 / 262.9 with
    torch's default, benchmarks/results/trainer_compile_cublas_sdxl_h100.json; SD 1.5 batch 4 50.5 ms both ways on
    an H200, trainer_capture_stream_sd15_b4_h200.json). Read when cuBLAS first runs, so before anything touches the
    GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:1")


def compile_cache_dir() -> Path:
    """Where --torch_compile keeps its compiled code between runs: the user's cache folder (XDG_CACHE_HOME, else
    ~/.cache), not torch's default under /tmp, which containers and reboots wipe."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flatlora-diffusion" / "torchinductor"


def _use_persistent_compile_cache(cfg: TrainConfig) -> None:
    """With --torch_compile, keep inductor's caches (compiled graphs, kernels, autotuning) in compile_cache_dir()
    unless the user set TORCHINDUCTOR_CACHE_DIR. A later run with the same shapes, torch and GPU then loads the
    compiled blocks instead of compiling them again: on one CPU thread the tiny UNet's blocks took 69.7 s to
    compile and 5.2 s from a warm cache (benchmarks/HISTORY.md, session 17); not measured on a GPU, where compiling
    added 23-39 s before the first SDXL step. Read when inductor first compiles, so setting it here is in time."""
    if not cfg.torch_compile or _inductor_cache_dir_chosen():
        return
    try:
        folder = compile_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # no home folder, or not writable: torch's own default under /tmp still works
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _inductor_cache_dir_chosen() -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR holds a choice of the user's. Importing torch._dynamo's package cache (as
    diffusers' imports can) makes torch write its own default (/tmp/torchinductor_<user>) into the variable, so a
    value equal to that default is torch's, not a choice."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(chosen) != os.path.abspath(default_cache_dir())


def train(cfg: TrainConfig) -> RunDir:
    """Run training to completion; returns the run directory. User mistakes raise before anything is written."""
    _use_expandable_segments()
    _use_small_cublas_workspace()
    plan = preflight(cfg)
    _use_persistent_compile_cache(cfg)  # after the checks: a refused run leaves no folder behind
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

        def record_stuck() -> None:  # the watcher exits a trainer stuck past the grace period
            _final_status(run, "cancelled", "cancelled (the trainer was stuck and was stopped)")

        watch = CancelWatch(cancelled, on_stuck=record_stuck if main else None)
        watch.install()
        try:
            Trainer(plan, run, cancelled).run()
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
