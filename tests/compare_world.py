"""Run folders as the trainer leaves them, for the Compare tab's tests: validation images of one solid colour
per (run, step), so a test can tell from the grid's pixels which run and step a cell shows; LoRA files with the
step in their metadata and in their bytes, so a download can be traced to the file it came from."""

import json
import time
from pathlib import Path

PROMPT = "a photo of sks toy"
BASE_RED = (230, 20, 20)  # step 0 of every run: the base model (the LoRA starts at zero)
COLOURS = {  # (variant, step) -> colour
    ("lora", 4): (20, 170, 20), ("lora", 8): (20, 20, 230),
    ("flat", 4): (240, 200, 0), ("flat", 8): (200, 0, 200),
}


def lora_file(path: Path, step: int, marker: float) -> None:
    """A small diffusers-style LoRA file whose metadata says its step, as the trainer's files do (ss_steps)."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"unet.down.lora_A.weight": torch.full((2, 2), float(marker))}, str(path),
              metadata={"ss_steps": str(step)})


def make_run(runs_dir: Path, name: str, variant: str, group: str | None, *, state: str = "completed",
             total: int = 8, sample_steps=(0, 4, 8), checkpoints=(4,), final: bool = True,
             created_at: float | None = None, seed: int = 3, extra_config: str = "") -> Path:
    from PIL import Image

    run = runs_dir / name
    run.mkdir(parents=True)
    sigma = 0.0 if variant == "lora" else 0.1
    (run / "config.yaml").write_text(
        f"pretrained_model_name_or_path: org/model\nflat_sigma: {sigma}\nseed: {seed}\nrank: 4\n"
        f"learning_rate: 0.001\nresolution: 32\nmax_train_steps: {total}\noutput_dir: {run}\noutput_name: {name}\n"
        f"instance_data_dir: {run / 'instance_images'}\nvalidation_prompt:\n- {PROMPT}\nvalidation_seeds:\n- 0\n- 1\n"
        + extra_config)
    step = total if state == "completed" else max(sample_steps, default=0)  # where a cancelled run stopped
    (run / "status.json").write_text(json.dumps({"state": state, "step": step, "total": total, "message": state}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n"
                                               for i in range(1, step + 1)))
    meta = {"created_at": created_at if created_at is not None else time.time()}
    if group:
        meta.update(ab_group=group, ab_variant=variant)
    (run / "app.json").write_text(json.dumps(meta))
    if sample_steps:
        (run / "samples").mkdir()
        (run / "samples" / "prompts.json").write_text(json.dumps({"0": PROMPT}))
    for s in sample_steps:
        folder = run / "samples" / f"step_{s:06d}"
        folder.mkdir()
        colour = BASE_RED if s == 0 else COLOURS[(variant, s)]
        for seed_ in (0, 1):
            Image.new("RGB", (32, 32), colour).save(folder / f"0_{seed_}.png")
    marker = 1.0 if variant == "lora" else 2.0
    for c in checkpoints:
        lora_file(run / "checkpoints" / f"checkpoint-{c}" / "pytorch_lora_weights.safetensors", c, marker * 100 + c)
    if final:
        lora_file(run / "pytorch_lora_weights.safetensors", total, marker * 1000 + total)
        lora_file(run / f"{name}.safetensors", total, marker * 10000 + total)
    return run


def make_pair(runs_dir: Path, group: str, **kw) -> tuple[Path, Path]:
    """An A/B pair as the app launches it: LoRA and Flat-LoRA with identical seeds."""
    created = kw.pop("created_at", time.time())
    return (make_run(runs_dir, f"{group}-lora", "lora", group, created_at=created, **kw),
            make_run(runs_dir, f"{group}-flat", "flat", group, created_at=created + 0.001, **kw))


def files_of(folder: Path) -> dict[str, int]:
    """Every file under a run folder with its size: the run-directory contract must not change by a download."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
