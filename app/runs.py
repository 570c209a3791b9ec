"""Reading run folders: the web app's whole view of training is the run directory contract.

A run folder under the runs folder holds what the trainer writes (config.yaml, status.json, metrics.jsonl,
samples/, the LoRA files) plus two files of the app's own: train.log (the child's stdout and stderr) and
app.json (when the run was created, and its A/B group). Everything here tolerates half-written files: the
trainer is writing while the app reads.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flatlora_diffusion.config import safe_load_yaml_text
from flatlora_diffusion.run_dir import RunDir
from flatlora_diffusion.run_dir import DIFFUSERS_WEIGHTS, write_json_atomic  # the run-directory contract
from flatlora_diffusion.safetensors_io import read_metadata

TERMINAL = ("completed", "failed", "cancelled")
ACTIVE = ("queued", "running")
APP_META = "app.json"
LOG_FILE = "train.log"
RUN_MARKERS = ("config.yaml", "status.json", APP_META)
_META_CACHE: dict[Path, tuple[int, dict]] = {}
_STEP_DIR = re.compile(r"step_(\d+)$")
_SAMPLE = re.compile(r"(\d+)_(-?\d+)\.png$")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")  # published ones only: checkpoint-N.partial is being written


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    # --- the trainer's files ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        status = _read_json(self.path / "status.json", {})
        return status if isinstance(status, dict) else {}

    @property
    def state(self) -> str:
        return str(self.status().get("state") or "unknown")

    def config(self) -> dict[str, Any]:
        try:
            data = safe_load_yaml_text((self.path / "config.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def metrics(self) -> list[dict[str, Any]]:
        """The logged steps; a torn last line (the trainer is appending) is skipped."""
        try:
            return RunDir(self.path).read_metrics()
        except OSError:
            return []

    def prompts(self) -> dict[int, str]:
        data = _read_json(self.path / "samples" / "prompts.json", {})
        out = {}
        for key, value in (data.items() if isinstance(data, dict) else []):
            if str(key).isdigit():
                out[int(key)] = str(value)
        return out

    def sample_steps(self) -> list[int]:
        folder = self.path / "samples"
        if not folder.is_dir():
            return []
        steps = []
        for p in folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and any(p.glob("*.png")):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def samples_at(self, step: int) -> dict[tuple[int, int], Path]:
        """(prompt index, seed) -> image of one validation step."""
        folder = self.path / "samples" / f"step_{int(step):06d}"
        out = {}
        if folder.is_dir():
            for p in folder.iterdir():
                m = _SAMPLE.match(p.name)
                if m and p.stat().st_size > 0:
                    out[(int(m.group(1)), int(m.group(2)))] = p
        return dict(sorted(out.items()))

    def exports(self) -> dict[str, Path | None]:
        """The finished LoRA files: "kohya" (<output_name>.safetensors) and "diffusers"."""
        diffusers = self.path / DIFFUSERS_WEIGHTS
        name = self.config().get("output_name") or self.name
        kohya = self.path / f"{name}.safetensors"
        if not kohya.is_file():
            others = sorted(p for p in self.path.glob("*.safetensors") if p.name != DIFFUSERS_WEIGHTS)
            kohya = others[0] if len(others) == 1 else None
        return {"kohya": kohya, "diffusers": diffusers if diffusers.is_file() else None}

    def final_lora_step(self) -> int | None:
        """The training step of the finished LoRA files (a cancelled run's are of the step it stopped at): their
        metadata's ss_steps, else, for files without it, the step of a run that ended."""
        files = self.exports()
        for path in (files["diffusers"], files["kohya"]):
            try:
                steps = read_metadata(path).get("ss_steps") if path else None
            except (OSError, ValueError):
                continue
            if steps and steps.isdigit():
                return int(steps)
        step = self.status().get("step")
        if any(files.values()) and self.state in ("completed", "cancelled") and isinstance(step, int):
            return step
        return None

    def lora_steps(self) -> dict[int, dict[str, Path]]:
        """step -> {format: file} for every step with a LoRA file: each checkpoint's diffusers file, and the
        finished files (both formats) at their step."""
        out: dict[int, dict[str, Path]] = {}
        folder = self.path / "checkpoints"
        for p in (folder.iterdir() if folder.is_dir() else []):
            m = _CHECKPOINT.match(p.name)
            if m and (p / DIFFUSERS_WEIGHTS).is_file():
                out[int(m.group(1))] = {"diffusers": p / DIFFUSERS_WEIGHTS}
        final = {fmt: path for fmt, path in self.exports().items() if path}
        step = self.final_lora_step() if final else None
        if step is not None:
            out[step] = final
        return dict(sorted(out.items()))

    # --- the app's files ----------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """app.json; it is written once when the run is created, so it is read once (pages poll every second)."""
        path = self.path / APP_META
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return {}
        cached = _META_CACHE.get(path)
        if cached is None or cached[0] != stamp:
            data = _read_json(path, {})
            cached = (stamp, data if isinstance(data, dict) else {})
            _META_CACHE[path] = cached
        return dict(cached[1])

    @property
    def ab_group(self) -> str | None:
        return self.meta().get("ab_group")

    def created_at(self) -> float:
        meta = self.meta()
        if isinstance(meta.get("created_at"), (int, float)):
            return float(meta["created_at"])
        started = self.status().get("started_at")
        if isinstance(started, (int, float)):
            return float(started)
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def log_tail(self, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
        path = self.path / LOG_FILE
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                data = f.read()
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        # tqdm redraws one line with carriage returns: keep what the line shows last
        shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        if size > max_bytes:
            shown = shown[1:]  # the first line is cut
        return "\n".join(shown[-lines:]).rstrip("\n")

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Change status.json on behalf of a trainer that cannot (queued, or dead). Atomic."""
        status = self.status() or {"step": 0, "total": 0, "message": ""}
        now = time.time()
        status.update(fields, updated_at=now)
        if fields.get("state") in TERMINAL and not status.get("finished_at"):
            status["finished_at"] = now
        write_json_atomic(self.path / "status.json", status)
        return status

    # --- summaries ----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Settings and metrics the Runs and Compare tabs show."""
        status, cfg, metrics = self.status(), self.config(), self.metrics()
        losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        its = [m["it_per_s"] for m in metrics if isinstance(m.get("it_per_s"), (int, float))]
        started, finished = status.get("started_at"), status.get("finished_at")
        out = {
            "run": self.name,
            "state": status.get("state", "unknown"),
            "step": status.get("step", 0),
            "total": status.get("total", 0),
            "message": status.get("message", ""),
            "ab_group": self.ab_group,
            "flat_sigma": cfg.get("flat_sigma"),
            "flat_schedule": cfg.get("flat_schedule"),
            "seed": cfg.get("seed"),
            "rank": cfg.get("rank"),
            "learning_rate": cfg.get("learning_rate"),
            "resolution": cfg.get("resolution"),
            "base_model": cfg.get("pretrained_model_name_or_path"),
            "first_loss": round(losses[0], 5) if losses else None,
            "final_loss": round(losses[-1], 5) if losses else None,
            "mean_loss_last_10pct": round(sum(tail) / len(tail), 5) if tail else None,
            "it_per_s": round(its[-1], 3) if its else None,
            "duration_s": round(finished - started, 1)
            if isinstance(started, (int, float)) and isinstance(finished, (int, float)) else None,
            "validation_steps": self.sample_steps(),
        }
        return out


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any((path / m).is_file() for m in RUN_MARKERS)


def list_runs(runs_dir: str | os.PathLike) -> list[Run]:
    """Every run folder directly under runs_dir, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: (r.created_at(), r.name), reverse=True)


def get_run(runs_dir: str | os.PathLike, name: str) -> Run:
    """The run called `name`; refuses anything that is not a plain folder name under runs_dir."""
    if not name or not isinstance(name, str) or name != Path(name).name or name.startswith("."):
        raise KeyError(f"no run named {name!r}")
    run = Run(Path(runs_dir) / name)
    if not is_run_dir(run.path):
        raise KeyError(f"no run named {name!r}")
    return run


def group_runs(runs: list[Run], name: str) -> list[Run]:
    """The run and its A/B partner(s), LoRA (sigma 0) first."""
    by_name = {r.name: r for r in runs}
    run = by_name.get(name)
    if run is None:
        return []
    group = run.ab_group
    members = [r for r in runs if group and r.ab_group == group] or [run]
    return sorted(members, key=lambda r: (r.meta().get("ab_variant") != "lora", r.name))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str | None, default: str = "run", max_len: int = 48) -> str:
    """A folder name made only of letters, digits, '.', '_' and '-', not starting with '.' or '-'."""
    name = _UNSAFE.sub("-", (text or "").strip()).strip(".-_")[:max_len].strip(".-_")
    return name or default


def unique_name(runs_dir: Path, base: str, suffixes: tuple[str, ...] = ("",)) -> str:
    """`base`, or base-2, base-3, ... so that no base+suffix exists yet."""
    candidate, n = base, 1
    while any((runs_dir / f"{candidate}{s}").exists() for s in suffixes):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def format_eta(seconds: float | None) -> str:
    if seconds is None or not isinstance(seconds, (int, float)) or seconds < 0 or seconds != seconds:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
