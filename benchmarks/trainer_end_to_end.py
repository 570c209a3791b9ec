"""What `flatlora-diffusion train` achieves end to end on a GPU, next to the benchmark's bare step and diffusers.

    python benchmarks/trainer_end_to_end.py --out DIR [--arch sdxl] [--batches 1,4] [--sigmas 0,0.1]
        [--steps 30] [--flags "--cache_latents"] [--code OLD_TREE] [--profile BATCH] [--bare-step]
        [--diffusers-script PATH] [--job [--job-steps 200] [--job-batch 1] [--job-validation-steps 100]
        [--job-checkpointing-steps 100] [--job-sigma 0.1]] [--tiny]

Builds a random-weight full-size pipeline offline (SDXL at 1024 px or SD 1.5 at 512 px, the real configs,
fp16 on disk, the project's own tokenizers) in /tmp/full-ARCH, renders 8 instance pictures, and runs the real
command line (`python -m flatlora_diffusion.cli train`, bf16, rank 16 attention LoRA, no validation, no checkpoint)
once per (batch, sigma): steady-state ms/step from metrics.jsonl (the steps after the first third), images/s, the
job's wall time, and the peak GPU memory nvidia-smi sees (sampled every 50 ms). `--code DIR` runs the trainer
from another source tree (e.g. `git worktree add /tmp/old <commit>`), so a before/after pair is timed on the
same machine in one call. `--profile B` adds one in-process run at batch B with torch.profiler over five
steady steps: time per kernel class, the GPU's busy share of the wall time, and per step the host-side scalar reads
(`.item()`, also of CPU tensors) plus stream synchronisations ("host_syncs_per_step"). The profiler slows SDXL
steps ~3x, so its per-kernel times are inflated; the timed runs above are the figures to quote.
`--bare-step` adds the benchmark's own graphed step (bench_flat.py's step on a pre-made batch) for reference.

`--diffusers-script PATH` also runs diffusers' train_dreambooth_lora_sdxl.py (--arch sdxl) or
train_dreambooth_lora.py (sd15), never committed here, once per batch size (label "diffusers"; Flat-LoRA has no
counterpart there) with the same model, pictures and flags; flags its script lacks (--cache_latents) are left
out and listed in results.json. Its steady ms/step (same rule) comes from outside the script: a sitecustomize.py
written into DIR/hooks and put first on PYTHONPATH registers torch's global optimizer step post-hook, which notes
time.perf_counter() after torch.cuda.synchronize(). `--job` times a standard job, process start to exit, for both
trainers: --job-steps at --job-batch, 4 validation images of one prompt every --job-validation-steps (diffusers:
the --validation_epochs that gives as many validations with a trained LoRA, its final inference included), a
checkpoint every --job-checkpointing-steps, the LoRA files at the end; each row records the validation rounds,
images, denoising steps, checkpoints and LoRA files the trainer really made, and for ours the validation rounds'
time (the same hook times Trainer._make_validation_images) and their share of the job's wall time.
results.json["diffusers"]["differences"] says what else differs between the two.

`--tiny` is a smoke test of all this on any device: the tiny offline models at 64 px (fp32 on a CPU). diffusers'
scripts import torchvision at module level; a CPU-only torch needs a torchvision that imports beside it.
Writes DIR/results.json, DIR/runs/ (each run's folder and log) and DIR/profile_*.txt; prints one line per run.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESOLUTION = {"sdxl": 1024, "sd15": 512}
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SCALING = {"sdxl": 0.13025, "sd15": 0.18215}


def build_full_size(arch: str, out: Path) -> Path:
    """A pipeline folder with the real model sizes and random weights (tokenizers and scheduler from tiny/)."""
    from bench_flat import te_configs, unet_config
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from flatlora_diffusion.tiny import make_tiny_pipeline

    if (out / "model_index.json").exists():
        return out
    t0 = time.time()
    make_tiny_pipeline(out, arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        parts = {"unet": UNet2DConditionModel(**unet_config(arch, tiny=False)),
                 "vae": AutoencoderKL(**VAE, sample_size=RESOLUTION[arch], scaling_factor=SCALING[arch],
                                      force_upcast=arch == "sdxl")}
        cfgs = te_configs(arch, tiny=False)
        parts["text_encoder"] = CLIPTextModel(cfgs[0])
        if arch == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(cfgs[1])
    for name, module in parts.items():
        for f in (out / name).iterdir():
            f.unlink()
        module.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
    print(f"built full-size {arch} in {time.time() - t0:.0f} s", flush=True)
    return out


class PeakMemory:
    """Peak `memory.used` of GPU 0 as nvidia-smi reports it (what a user sees), sampled every 50 ms."""

    def __enter__(self):
        self.peak = 0
        if not torch.cuda.is_available():  # the --tiny smoke test on a CPU
            self._proc = None
            return self
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0", "-lms", "50"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak = max(self.peak, int(line))

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        self._thread.join(timeout=5)


PROMPT = "a photo of sks toy"
VALIDATION_PROMPT = "a photo of sks toy on a beach"
N_PICTURES = 8  # whole batches at batch 1, 2, 4 and 8 (a short last batch would be a step of another size)


def precision() -> str:
    """bf16 on a GPU; fp32 ("no") on the CPU of the --tiny smoke test."""
    return "bf16" if torch.cuda.is_available() else "no"


def shared_args(model: Path, images: Path, out: Path, arch: str, batch: int, steps: int) -> list[str]:
    """The flags both trainers get: every one is a flag of diffusers' script for `arch`."""
    resolution = 64 if "tiny" in model.name else RESOLUTION[arch]
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(resolution),
            "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "16", "--mixed_precision", precision(),
            "--seed", "0"]
    if arch == "sd15":  # ours encodes the one prompt once by default; diffusers' SD script only with this flag
        args.append("--pre_compute_text_embeddings")  # (its SDXL script always does)
    return args


def train_args(model: Path, images: Path, out: Path, arch: str, batch: int, sigma: float, steps: int,
               flags: list[str], job: list[str] | None = None) -> list[str]:
    """Our command line: the shared flags, then ours only (--overwrite, --flat_sigma, --report_to none)."""
    return [*shared_args(model, images, out, arch, batch, steps), *(job or ["--checkpointing_steps", "100000"]),
            "--overwrite", "--flat_sigma", str(sigma), "--report_to", "none", *flags]


def diffusers_args(script: Path, model: Path, images: Path, out: Path, arch: str, batch: int, steps: int,
                   flags: list[str], job: list[str] | None = None) -> tuple[list[str], list[str]]:
    """diffusers' command line, and the flags of `flags` its script lacks (left out). --report_to stays at its
    default, tensorboard: accelerate refuses "none", and without tensorboard installed no tracker is made."""
    known = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', script.read_text()))
    kept, dropped = [], []
    for group in flag_groups(flags):
        (kept if group[0].split("=")[0] in known else dropped).extend(group)
    return [sys.executable, str(script), *shared_args(model, images, out, arch, batch, steps),
            *(job or ["--checkpointing_steps", "100000"]), *kept], dropped


def flag_groups(flags: list[str]) -> list[list[str]]:
    """["--a", "1", "--b"] -> [["--a", "1"], ["--b"]]."""
    groups: list[list[str]] = []
    for token in flags:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def steady_ms_of(seconds: list[float]) -> float:
    """Mean step time over the steps after the first third, from one timestamp per step."""
    late = seconds[len(seconds) // 3:]
    return 1000 * (late[-1] - late[0]) / (len(late) - 1)


def steady_ms(metrics_file: Path) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return steady_ms_of([r["seconds"] for r in rows])


# A sitecustomize.py written into DIR/hooks and put first on PYTHONPATH of one trainer process: timestamps read
# from outside the trainer, without editing diffusers' script.
HOOKS = '''"""Written by benchmarks/trainer_end_to_end.py; first on PYTHONPATH of one training process.

E2E_STEP_TIMES=FILE: one time.perf_counter() per optimizer step (torch's global optimizer step post-hook), after
torch.cuda.synchronize() when E2E_STEP_SYNC=1. E2E_EVENTS=FILE: one JSON line per diffusers pipeline denoising
loop ("denoise": host start and end, steps, the serial number of the pipeline object: a new one per validation
round in both trainers) and per flatlora-diffusion validation round ("validation"). Then the sitecustomize this
one shadows, if any, runs.
"""
import importlib.abc
import itertools
import json
import os
import sys
import time

_STEPS, _EVENTS = os.environ.get("E2E_STEP_TIMES"), os.environ.get("E2E_EVENTS")
_SYNC = os.environ.get("E2E_STEP_SYNC") == "1"


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls patch(module) right after the named module has run, wherever it is first imported from."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
        else:
            return None
        patch, run = self.patches.pop(name), spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _optimizer(mod):
    import torch

    def after_step(optimizer, args, kwargs):
        if _SYNC and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        _append(_STEPS, repr(time.perf_counter()))

    mod.register_optimizer_step_post_hook(after_step)


class _Timed:
    """A pipeline's progress bar (context manager or iterable) that notes when its loop starts and ends."""

    def __init__(self, bar, steps, pipeline):
        self.bar, self.steps, self.pipeline, self.start = bar, steps, pipeline, time.perf_counter()

    def _done(self):
        _append(_EVENTS, json.dumps({"event": "denoise", "start": self.start, "end": time.perf_counter(),
                                     "steps": self.steps, "pipeline": self.pipeline}))

    def __enter__(self):
        return self.bar.__enter__()

    def __exit__(self, *exc):
        self._done()
        return self.bar.__exit__(*exc)

    def __iter__(self):
        yield from self.bar
        self._done()

    def __getattr__(self, name):
        return getattr(self.bar, name)


_serials = itertools.count()


def _pipeline_utils(mod):
    original = mod.DiffusionPipeline.progress_bar

    def progress_bar(self, iterable=None, total=None):
        steps = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
        if "_e2e_serial" not in self.__dict__:
            object.__setattr__(self, "_e2e_serial", next(_serials))
        return _Timed(original(self, iterable=iterable, total=total), steps, self._e2e_serial)

    mod.DiffusionPipeline.progress_bar = progress_bar


def _trainer_images(mod):
    cls = getattr(mod, "ImagesMixin", None)
    original = getattr(cls, "_make_validation_images", None)
    if original is None:
        return

    def make_validation_images(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _append(_EVENTS, json.dumps({"event": "validation", "start": start, "end": time.perf_counter(),
                                         "step": self.global_step}))

    cls._make_validation_images = make_validation_images


_patches = {}
if _STEPS:
    _patches["torch.optim.optimizer"] = _optimizer
if _EVENTS:
    _patches["diffusers.pipelines.pipeline_utils"] = _pipeline_utils
    _patches["flatlora_diffusion.trainer.images"] = _trainer_images
if _patches:
    sys.meta_path.insert(0, _AfterImport(_patches))

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _file = os.path.join(_entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(os.path.dirname(_file)) != _here and os.path.isfile(_file):
        with open(_file) as _f:
            exec(compile(_f.read(), _file, "exec"), {"__name__": "sitecustomize", "__file__": _file})
        break
'''


def hooked_env(args, out: Path, sync: bool) -> tuple[dict, Path, Path]:
    """The environment of a hooked run, and the (emptied) files its step times and events go to."""
    hooks = Path(args.out) / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    times, events = out.with_name(out.name + ".steps"), out.with_name(out.name + ".events")
    for f in (times, events):
        f.unlink(missing_ok=True)
    path = os.pathsep.join(filter(None, [str(hooks), str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, E2E_STEP_TIMES=str(times), E2E_EVENTS=str(events),
               E2E_STEP_SYNC="1" if sync else "0")
    return env, times, events


def timed_run(cmd: list[str], env: dict, log: Path) -> dict:
    """One training process: its wall time from start to exit (perf_counter clock) and nvidia-smi's peak."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with PeakMemory() as mem, log.open("w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    end = time.perf_counter()
    text = log.read_text(errors="replace")
    if proc.returncode:
        print(text[-3000:], flush=True)
    return {"rc": proc.returncode, "start": start, "end": end, "wall": end - start, "peak": mem.peak, "log": text}


def read_floats(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_trainer(args, model, images, batch, sigma, code: str | None, label: str) -> dict:
    out = Path(args.out) / "runs" / f"{label}-b{batch}-s{sigma}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "flatlora_diffusion.cli", "train",
           *train_args(model, images, out, args.arch, batch, sigma, args.steps, args.flags.split())]
    run = timed_run(cmd, env, out.with_name(out.name + ".log"))
    if run["rc"]:
        return {"label": label, "batch": batch, "sigma": sigma, "error": run["log"][-1500:]}
    ms = steady_ms(out / "metrics.jsonl")
    row = {"label": label, "batch": batch, "sigma": sigma, "ms_per_step": round(ms, 1),
           "images_per_s": round(1000 * batch / ms, 2), "job_wall_s": round(run["wall"], 1), "peak_mib": run["peak"],
           "cuda_graph": "CUDA graph on" in run["log"]}
    print(json.dumps(row), flush=True)
    return row


def run_diffusers(args, model, images, batch) -> dict:
    """diffusers' script, same flags: steady ms/step from the optimizer-step timestamps (synchronised)."""
    out = Path(args.out) / "runs" / f"diffusers-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cmd, dropped = diffusers_args(Path(args.diffusers_script), model, images, out, args.arch, batch, args.steps,
                                  args.flags.split())
    env, times_file, _ = hooked_env(args, out, sync=True)
    run = timed_run(cmd, env, out.with_name(out.name + ".log"))
    times = read_floats(times_file)
    if run["rc"] or len(times) < 3:
        return {"label": "diffusers", "batch": batch, "error": run["log"][-1500:], "steps_timed": len(times)}
    ms = steady_ms_of(times)
    row = {"label": "diffusers", "batch": batch, "sigma": None, "ms_per_step": round(ms, 1),
           "images_per_s": round(1000 * batch / ms, 2), "job_wall_s": round(run["wall"], 1), "peak_mib": run["peak"],
           "steps_timed": len(times), "flags_without_counterpart": dropped}
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------- the standard job

def diffusers_validation_epochs(steps: int, batch: int, rounds: int) -> tuple[int, int]:
    """--validation_epochs V for diffusers' scripts so that they validate `rounds` times with a trained LoRA, as ours
    does after step 0. They validate after every epoch e = 0, 1, ... with e % V == 0 (epoch 0 always) and once more
    after training (the final inference: same prompt, same number of images). Returns (V, the rounds it gives)."""
    epochs = math.ceil(steps / math.ceil(N_PICTURES / batch))
    made = {v: (epochs - 1) // v + 1 + 1 for v in range(1, epochs + 1)}
    best = min(made, key=lambda v: (abs(made[v] - rounds), v))
    return best, made[best]


def job_summary(out: Path, run: dict, times: list[float], events: list[dict]) -> dict:
    """What a job run did: its validation rounds (one pipeline object each; after_step: the optimizer steps done
    before it), images, denoising steps, checkpoints and LoRA files, and for ours the time its rounds took."""
    rounds: dict[int, dict] = {}
    for e in (e for e in events if e["event"] == "denoise"):
        r = rounds.setdefault(e["pipeline"], {"after_step": bisect.bisect_right(times, e["start"]), "images": 0,
                                              "denoising_steps": set(), "denoise_s": 0.0})
        r["images"] += 1
        r["denoising_steps"].add(e["steps"])
        r["denoise_s"] += e["end"] - e["start"]
    windows = [e for e in events if e["event"] == "validation"]  # ours: a whole round, pipeline to PNG files
    gaps = [b - a for a, b in zip(times, times[1:])]
    typical = statistics.median(gaps) if gaps else 0.0
    for r in rounds.values():
        r["denoising_steps"] = sorted(r["denoising_steps"])
        r["denoise_s"] = round(r["denoise_s"], 2)
        for e in windows:
            if e["step"] == r["after_step"]:
                r["validation_s"] = round(e["end"] - e["start"], 2)
        step = r["after_step"]
        if not windows and 0 < step < len(times):  # diffusers' in-loop rounds: the step gap they sit in, less a step
            r["validation_s_from_step_gap"] = round(times[step] - times[step - 1] - typical, 2)
    checkpoints = sorted((p for p in [*out.glob("checkpoint-*"), *out.glob("checkpoints/checkpoint-*")] if p.is_dir()),
                         key=lambda p: int(p.name.split("-")[1]))
    summary = {"job_wall_s": round(run["wall"], 1), "peak_mib": run["peak"], "steps_timed": len(times),
               "validation_rounds": [rounds[k] for k in sorted(rounds)],
               "validation_images": sum(r["images"] for r in rounds.values()),
               "validation_pngs_on_disk": len(list(out.glob("samples/step_*/*.png"))),
               "tensorboard_event_files": len(list(out.glob("logs/**/events.out.tfevents*"))),
               "checkpoints": [p.name for p in checkpoints],
               "lora_files": sorted(p.name for p in out.glob("*.safetensors")),
               "after_last_step_s": round(run["end"] - times[-1], 1) if times else None}
    if windows:
        total = sum(e["end"] - e["start"] for e in windows)
        summary["validation_s"] = round(total, 1)
        summary["validation_share"] = round(total / run["wall"], 3)
        summary["validation_s_step0"] = round(sum(e["end"] - e["start"] for e in windows if e["step"] == 0), 1)
    return summary


def run_job(args, model, images, trainer: str) -> dict:
    """The standard job: --job-steps at --job-batch, validation (4 images of one prompt) every
    --job-validation-steps, a checkpoint every --job-checkpointing-steps, the LoRA files at the end."""
    out = Path(args.out) / "runs" / f"job-{trainer}"
    validation = ["--validation_prompt", VALIDATION_PROMPT, "--num_validation_images", "4"]
    checkpoints = ["--checkpointing_steps", str(args.job_checkpointing_steps)]
    row: dict = {"label": trainer, "batch": args.job_batch, "steps": args.job_steps}
    if trainer == "diffusers":
        shutil.rmtree(out, ignore_errors=True)
        wanted = math.ceil(args.job_steps / args.job_validation_steps)
        epochs, rounds = diffusers_validation_epochs(args.job_steps, args.job_batch, wanted)
        row.update(validation_epochs=epochs, validation_rounds_planned=rounds, validation_rounds_wanted=wanted)
        cmd, dropped = diffusers_args(Path(args.diffusers_script), model, images, out, args.arch, args.job_batch,
                                      args.job_steps, args.flags.split(),
                                      job=[*validation, "--validation_epochs", str(epochs), *checkpoints])
        row["flags_without_counterpart"] = dropped
        env, times_file, events_file = hooked_env(args, out, sync=True)
    else:
        row["sigma"] = args.job_sigma
        cmd = [sys.executable, "-m", "flatlora_diffusion.cli", "train",
               *train_args(model, images, out, args.arch, args.job_batch, args.job_sigma, args.job_steps,
                           args.flags.split(),
                           job=[*validation, "--validation_steps", str(args.job_validation_steps), *checkpoints])]
        env, times_file, events_file = hooked_env(args, out, sync=False)  # ours reads its loss one step late
    run = timed_run(cmd, env, out.with_name(out.name + ".log"))
    if run["rc"]:
        row["error"] = run["log"][-1500:]
        return row
    row.update(job_summary(out, run, read_floats(times_file), read_events(events_file)))
    print(json.dumps(row), flush=True)
    return row


def differences(args) -> list[str]:
    """What differs between the two command lines and jobs (the rows record what each did)."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    notes = ["ours only: --overwrite, --flat_sigma (diffusers: plain LoRA), --report_to none (diffusers keeps its "
             f"default tensorboard, accelerate refuses 'none'; tensorboard installed here: {tensorboard})"]
    if args.arch == "sd15":
        notes.append("both: --pre_compute_text_embeddings (ours does so by default, diffusers' SDXL script always)")
    dropped = diffusers_args(Path(args.diffusers_script), Path("m"), Path("i"), Path("o"), args.arch, 1, 1,
                             args.flags.split())[1]
    if dropped:
        notes.append(f"no counterpart in diffusers' script, given to ours only: {' '.join(dropped)}"
                     + (" (diffusers encodes the pictures with the VAE at every step)" if "--cache_latents" in dropped
                        else ""))
    notes.append("steady ms/step: ours from metrics.jsonl; diffusers' from torch's optimizer step post-hook after "
                 "torch.cuda.synchronize() (its loop reads the loss with .item() every step anyway)")
    if args.job:
        notes += ["job: ours validates every --validation_steps, at step 0 (the untrained baseline) and at the last "
                  "step; diffusers' after every --validation_epochs-th epoch (epoch 0 included, none at step 0) and "
                  "once more after training (the final inference, with the saved LoRA)",
                  "job: validation images: ours 25 denoising steps, guidance 7.0, PNG files in samples/; diffusers' "
                  "the pipeline's defaults in the loop (50 steps; guidance 5.0 SDXL, 7.5 SD) and 25 steps at the end, "
                  "kept only by trackers (tensorboard, when installed: tensorboard_event_files)",
                  "job: ours saves no checkpoint at the last step (it writes the LoRA files instead), diffusers' "
                  "does; ours also writes a kohya-format LoRA file by default"]
    return notes


# --------------------------------------------------------------------------------------------------- profile

KERNEL_CLASSES = [  # first match wins; names of Hopper cuBLAS/cuDNN/flash kernels and this project's own
    ("flat_lora", r"_flat|flat_|_noise|_row_norm|philox"),
    ("optimizer", r"multi_tensor_apply|adam|foreach|fused_adam"),
    ("attention", r"flash|fmha|attention|attn|sdpa|cutlass.*kernel.*mem"),  # before conv: cuDNN's SDPA is "cudnn_*"
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|matmul|sm90"),
    ("norm", r"norm"),
    ("copy", r"copy|memcpy|memset|cast"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return cls
    return "elementwise/other"


def profile_run(args, model, images, batch: int, sigma: float) -> dict:
    """One in-process training run with torch.profiler over steps [first, first + 5)."""
    from accelerate.state import AcceleratorState
    from torch.profiler import ProfilerActivity, profile, schedule

    from flatlora_diffusion import run_dir as run_dir_module
    from flatlora_diffusion.config import config_from_args
    from flatlora_diffusion.train import train

    out = Path(args.out) / "runs" / f"profile-b{batch}-s{sigma}"
    first, active = max(5, args.steps // 2), 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities,
                   schedule=schedule(wait=first - 2, warmup=1, active=active, repeat=1))
    original = run_dir_module.RunDir.append_metrics
    marks = []

    def append_and_step(self, record):  # append_metrics runs once per optimizer step: the profiler's clock
        original(self, record)
        marks.append(time.perf_counter())
        prof.step()

    run_dir_module.RunDir.append_metrics = append_and_step
    cfg = config_from_args(train_args(model, images, out, args.arch, batch, sigma, first + active + 2,
                                      args.flags.split()))
    try:
        with prof:
            train(cfg)
    finally:
        run_dir_module.RunDir.append_metrics = original
        AcceleratorState._reset_state(reset_partial_state=True)
    wall_ms = 1000 * (marks[first + active - 1] - marks[first - 1])
    classes: dict[str, float] = {}
    syncs = 0
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.self_device_time_total > 0:
            cls = kernel_class(evt.key)
            classes[cls] = classes.get(cls, 0.0) + evt.self_device_time_total / 1000
        if re.search(r"cudaStreamSynchronize|cudaDeviceSynchronize|aten::_local_scalar_dense|cudaEventSynchronize",
                     evt.key):
            syncs += evt.count
    gpu_ms = sum(classes.values())
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    (Path(args.out) / f"profile_b{batch}_s{sigma}.txt").write_text(table + "\n\n" + cpu_table)
    result = {"batch": batch, "sigma": sigma, "steps": active, "wall_ms_per_step": round(wall_ms / active, 1),
              "gpu_kernel_ms_per_step": round(gpu_ms / active, 1), "gpu_busy_share": round(gpu_ms / wall_ms, 3),
              "host_syncs_per_step": round(syncs / active, 1),
              "kernel_ms_per_step": {k: round(v / active, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])}}
    print(json.dumps(result), flush=True)
    return result


def bare_step(args) -> list[dict]:
    """The benchmark's graphed step on a pre-made batch (bench_flat.py), same card, for reference."""
    out = Path(args.out) / "bare"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_flat.py"), "--out", str(out), "--archs", args.arch,
           "--targets", "unet", "--batches", args.batches, "--ckpt", "off", "--modes", "graph", "--skip-checks"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = []
    if (out / "results.json").exists():
        for r in json.loads((out / "results.json").read_text())["results"]:
            graph = r.get("modes", {}).get("graph", {})
            if "lora" in graph:
                rows.append({"batch": r["batch"], "lora_ms": round(graph["lora"]["median_ms"], 1),
                             "flat_ms": round(graph["flat"]["median_ms"], 1),
                             "peak_gib": round(graph["flat"]["peak_gib"], 2)})
    if not rows:
        print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
    print(json.dumps({"bare_step": rows}), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="sdxl", choices=sorted(RESOLUTION))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sigmas", default="0,0.1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--flags", default="--cache_latents", help="Further train flags, one string.")
    ap.add_argument("--code", default=None, help="Also time the trainer of this source tree (label 'before').")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH")
    ap.add_argument("--bare-step", action="store_true")
    ap.add_argument("--diffusers-script", default=None, metavar="PATH",
                    help="Also run diffusers' train_dreambooth_lora(_sdxl).py with the same flags (label 'diffusers').")
    ap.add_argument("--job", action="store_true", help="Also time the standard job, whole process, both trainers.")
    ap.add_argument("--job-steps", type=int, default=200)
    ap.add_argument("--job-batch", type=int, default=1)
    ap.add_argument("--job-validation-steps", type=int, default=100)
    ap.add_argument("--job-checkpointing-steps", type=int, default=100)
    ap.add_argument("--job-sigma", type=float, default=0.1, help="Our trainer's --flat_sigma in the job (its default).")
    ap.add_argument("--tiny", action="store_true", help="Smoke test of this script: the tiny model, 64 px, any device.")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.diffusers_script:
        script = Path(args.diffusers_script)
        if not script.is_file():
            ap.error(f"--diffusers-script {script}: no such file")
        if ("sdxl" in script.name) != (args.arch == "sdxl"):
            ap.error(f"--diffusers-script {script.name} does not match --arch {args.arch}")
    if args.build_only:
        build_full_size(args.arch, Path("/tmp") / f"full-{args.arch}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flatlora_diffusion.tiny import make_subject_images

    if args.tiny:
        from flatlora_diffusion.tiny import make_tiny_pipeline

        model = make_tiny_pipeline(out / f"tiny-{args.arch}", args.arch)
    else:
        # Built in a process of its own: memory this process held on the GPU would count in every run's peak.
        model = Path("/tmp") / f"full-{args.arch}"
        subprocess.run([sys.executable, __file__, "--out", args.out, "--arch", args.arch, "--build-only"], check=True)
    images = out / "images"
    make_subject_images(images, n=N_PICTURES, size=64 if args.tiny else RESOLUTION[args.arch])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"device": device, "arch": args.arch, "steps": args.steps, "flags": args.flags,
               "precision": precision(), "argv": sys.argv[1:], "runs": []}
    if args.diffusers_script:
        from importlib.metadata import version

        text = Path(args.diffusers_script).read_text()
        found = re.search(r'check_min_version\("([^"]+)"\)', text)
        results["diffusers"] = {"script": Path(args.diffusers_script).name, "version": version("diffusers"),
                                "script_check_min_version": found and found.group(1),
                                "script_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
                                "differences": differences(args)}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    trees = ([("before", args.code)] if args.code else []) + [("after" if args.code else "now", None)]
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:  # --batches "": the job alone
        for sigma in map(float, args.sigmas.split(",")):
            for label, code in trees:
                results["runs"].append(run_trainer(args, model, images, batch, sigma, code, label))
                save()
        if args.diffusers_script:  # Flat-LoRA has no diffusers counterpart: once per batch size
            results["runs"].append(run_diffusers(args, model, images, batch))
            save()
    if args.job:
        results["job"] = {"steps": args.job_steps, "batch": args.job_batch,
                          "validation_steps": args.job_validation_steps, "validation_images": 4,
                          "validation_prompt": VALIDATION_PROMPT, "checkpointing_steps": args.job_checkpointing_steps,
                          "validation_share_from": "our trainer's validation rounds (Trainer._make_validation_images) "
                                                   "timed by the sitecustomize hook, over the job's wall time",
                          "runs": []}
        for trainer in ["now", *(["diffusers"] if args.diffusers_script else [])]:
            results["job"]["runs"].append(run_job(args, model, images, trainer))
            save()
    if args.bare_step:
        results["bare_step"] = bare_step(args)
        save()
    if args.profile:
        results["profile"] = profile_run(args, model, images, args.profile, max(map(float, args.sigmas.split(","))))
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
