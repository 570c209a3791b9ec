"""What a multi-process run left in its folder, and how far two runs' LoRA files are apart.

written_once() checks a run folder against what one writer makes: exactly one LoRA file set, one samples/
folder per validation (each with its images), one checkpoint folder per checkpoint step (each with one random
state per process: accelerate writes those from every process, by design), and every step once in metrics.jsonl
(the file is appended to: a second writer would repeat steps). lora_diff() compares two LoRA files tensor by
tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def written_once(out: Path, steps: int, validation_steps: list[int], checkpoint_steps: list[int],
                 images_per_validation: int, processes: int) -> dict:
    """Each check True when the folder holds exactly what one writer makes; the facts beside them."""
    loras = sorted(p.name for p in out.glob("*.safetensors"))
    samples = sorted(p.name for p in (out / "samples").glob("step_*"))
    pngs = {p.name: len(list(p.glob("*.png"))) for p in (out / "samples").glob("step_*")}
    checkpoints = sorted((p.name for p in (out / "checkpoints").glob("checkpoint-*")),
                         key=lambda n: int(n.split("-")[1]))
    states = {name: sorted(p.name for p in (out / "checkpoints" / name).glob("random_states_*.pkl"))
              for name in checkpoints}
    steps_logged = metrics_steps(out)
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
    return {
        "lora_files": loras,
        "one_lora_set": loras == sorted([LORA_FILE, f"{out.name}.safetensors"]),
        "sample_folders": samples,
        "one_sample_folder_per_validation": samples == [f"step_{s:06d}" for s in validation_steps]
        and all(n == images_per_validation for n in pngs.values()),
        "checkpoints": checkpoints,
        "one_checkpoint_per_step": checkpoints == [f"checkpoint-{s}" for s in checkpoint_steps]
        and all(names == [f"random_states_{i}.pkl" for i in range(processes)] for names in states.values()),
        "metrics_steps_once": steps_logged == list(range(1, steps + 1)),
        "completed": status.get("state") == "completed" and status.get("step") == steps,
    }


def all_written_once(checks: dict) -> bool:
    return all(v for k, v in checks.items() if isinstance(v, bool))


def lora_diff(a: Path, b: Path) -> dict:
    """Tensor by tensor: the largest absolute difference, the largest difference relative to the larger of the
    two tensors' largest values (an elementwise ratio explodes where a value is ~0), and the largest relative
    Frobenius norm ||b - a|| / ||a||, with the tensors where each maximum is."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if sorted(ta) != sorted(tb):
        return {"error": f"different tensors: {len(set(ta) ^ set(tb))} names in only one file"}
    worst = {"max_abs": (0.0, None), "max_rel": (0.0, None), "rel_fro": (0.0, None)}
    for name in sorted(ta):
        x, y = ta[name].double(), tb[name].double()
        d = (y - x).abs()
        scale = max(x.abs().max().item(), y.abs().max().item())
        norm = x.norm().item()
        values = {"max_abs": d.max().item(), "max_rel": d.max().item() / scale if scale else 0.0,
                  "rel_fro": (y - x).norm().item() / norm if norm else (0.0 if d.max().item() == 0 else math.inf)}
        for key, v in values.items():
            if v > worst[key][0]:
                worst[key] = (v, name)
    return {"tensors": len(ta), **{k: v for k, (v, _) in worst.items()},
            **{f"{k}_tensor": n for k, (_, n) in worst.items()}}
