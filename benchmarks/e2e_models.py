"""The model the end-to-end benchmarks train, and the GPU memory a user sees while they do.

build_full_size() writes a pipeline folder with the real SDXL (1024 px) or SD 1.5 (512 px) sizes and random
weights, offline: bench_flat.py's UNet and text-encoder configs, fp16 on disk, tokenizers and scheduler from the
project's tiny pipeline. PeakMemory samples nvidia-smi's `memory.used` of GPU 0 every 50 ms and keeps the peak.
GpuClocks samples its SM clock, temperature and power every 100 ms, so that a slow phase can be told from a
throttled card.
Used by trainer_end_to_end.py and trainer_memory.py (both put benchmarks/ on sys.path, where bench_flat.py is).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

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


def nvidia_smi_every(query: str, interval_ms: int) -> subprocess.Popen:
    """nvidia-smi printing `query` of GPU 0 every `interval_ms`, one CSV line a sample, its errors dropped. Line
    buffered through coreutils' stdbuf where there is one: into a pipe its output may otherwise wait in a block
    buffer, and what is still there when the sampler is stopped (the last seconds of a run) would be lost."""
    cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0", "-lms", str(interval_ms)]
    if shutil.which("stdbuf"):
        cmd = ["stdbuf", "-oL", *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


class NvidiaSmiSampler:
    """A context that runs nvidia_smi_every(QUERY, INTERVAL_MS) while it is open and hands each line of its output
    to `_take`, on a thread of its own; on a machine without CUDA (the --tiny smoke tests) it samples nothing."""

    QUERY: str
    INTERVAL_MS: int

    def _reset(self) -> None:
        """The figures before the first sample."""

    def _take(self, line: str) -> None:
        """One line of nvidia-smi's output."""

    def __enter__(self):
        self._reset()
        self._proc = None
        if torch.cuda.is_available():
            self._proc = nvidia_smi_every(self.QUERY, self.INTERVAL_MS)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            self._take(line)

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        self._thread.join(timeout=5)


class PeakMemory(NvidiaSmiSampler):
    """Peak `memory.used` of GPU 0 as nvidia-smi reports it (what a user sees), sampled every 50 ms."""

    QUERY, INTERVAL_MS = "memory.used", 50

    def _reset(self):
        self.peak = 0

    def _take(self, line):
        if line.strip().isdigit():
            self.peak = max(self.peak, int(line))


def parse_clock_line(line: str, perf_minus_epoch: float) -> tuple[float, float, float, float] | None:
    """(perf_counter time, SM MHz, temperature °C, power W) of one line of GpuClocks' query; None for anything else
    (a header, '[N/A]'). nvidia-smi stamps local wall-clock time with milliseconds."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        mhz, temp, watts = (float(p) for p in parts[1:])
    except ValueError:
        return None
    return stamp + perf_minus_epoch, mhz, temp, watts


def gpu_figures(samples, start: float = float("-inf"), end: float = float("inf")) -> dict:
    """{"gpu": ...} for a results row: GpuClocks' samples between `start` and `end` (perf_counter) summed up; {}
    where none was taken there (a CPU run)."""
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return {}
    mhz = [s[1] for s in inside]
    return {"gpu": {"sm_mhz_median": statistics.median(mhz), "sm_mhz_min": min(mhz),
                    "temp_c_max": max(s[2] for s in inside), "power_w_max": max(s[3] for s in inside)}}


class GpuClocks(NvidiaSmiSampler):
    """GPU 0's SM clock, temperature and power draw, sampled by nvidia-smi every 100 ms, timed on the perf_counter
    clock that e2e_hooks.py times steps and validation rounds with. A process of its own beside PeakMemory's, so
    that a query this driver refuses costs these figures alone. Why: on 2026-12-08 an SDXL job's validation rounds
    grew from 9.4 to 13.3 s through the run with no change of code, and a power- or heat-capped clock would show here.
    Samples carry nvidia-smi's own time stamps, so a sample read late still lands in its window."""

    QUERY, INTERVAL_MS = "timestamp,clocks.sm,temperature.gpu,power.draw", 100

    def _reset(self):
        self.samples: list[tuple[float, float, float, float]] = []
        self._perf_minus_epoch = time.perf_counter() - time.time()

    def _take(self, line):
        sample = parse_clock_line(line, self._perf_minus_epoch)
        if sample is not None:
            self.samples.append(sample)
