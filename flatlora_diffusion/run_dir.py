"""The run directory: the contract between training, the web app, export and comparison.

    <output_dir>/config.yaml            resolved TrainConfig (train --config config.yaml repeats the run)
    <output_dir>/status.json           state, step, total, message, times, ETA, pid (written atomically)
    <output_dir>/metrics.jsonl         one JSON object per optimizer step
    <output_dir>/samples/step_<NNNNNN>/<p>_<seed>.png, samples/prompts.json
    <output_dir>/checkpoints/checkpoint-<N>/
    <output_dir>/pytorch_lora_weights.safetensors   diffusers format
    <output_dir>/<output_name>.safetensors          kohya format (ComfyUI / AUTOMATIC1111)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "completed", "failed", "cancelled")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "config.yaml"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.status_file = self.path / "status.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.samples = self.path / "samples"
        self.checkpoints = self.path / "checkpoints"
        self._status: dict[str, Any] = {}

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # --- status ---------------------------------------------------------------------------------------------
    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def set_status(self, state: str | None = None, **fields: Any) -> None:
        if not self._status:
            self._status = self.read_status() or {"state": "queued", "step": 0, "total": 0, "message": ""}
        if state is not None:
            assert state in STATES, state
            self._status["state"] = state
            if state == "running" and not self._status.get("started_at"):
                self._status["started_at"] = time.time()
            if state in ("completed", "failed", "cancelled"):
                self._status["finished_at"] = time.time()
        self._status.update(fields, updated_at=time.time(), pid=os.getpid())
        write_json_atomic(self.status_file, self._status)

    # --- metrics and samples --------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop the records of steps that the resumed run will do again."""
        if not self.metrics_file.exists():
            return
        kept = [line for line in self.metrics_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.metrics_file.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_file)

    def sample_dir(self, step: int) -> Path:
        return self.samples / f"step_{step:06d}"

    def write_prompts(self, prompts: list[str]) -> None:
        self.samples.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.samples / "prompts.json", {str(i): p for i, p in enumerate(prompts)})

    # --- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit():
                if (p / "training_state.json").exists():  # complete checkpoints only
                    found.append((int(p.name.split("-", 1)[1]), p))
        return sorted(found)
