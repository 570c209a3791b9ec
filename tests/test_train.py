"""The trainer end to end on tiny offline models (64 px): both architectures, Flat-LoRA on UNet and text
encoders, learning, sigma 0 == plain LoRA, resume, the run-directory contract, diffusers-style command lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from flatlora_diffusion.config import make_config
from tests.training_helpers import lora_weights, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_both_architectures_train_with_flat_lora_on_unet_and_text_encoders(tiny, tmp_path, arch):
    out = tmp_path / "run"
    run(tiny, out, arch=arch, train_text_encoder=True, gradient_accumulation_steps=2,
        validation_prompt=["a photo of sks toy"], validation_seeds=[0, 1], validation_steps=2,
        validation_inference_steps=2, output_name="my_lora")
    weights = lora_weights(out)
    prefixes = {k.split(".")[0] for k in weights}
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if arch == "sdxl" else set())
    assert prefixes == expected
    assert all(torch.isfinite(v).all() for v in weights.values())
    # B started at zero (gaussian init): a non-zero lora_B means training moved it
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k and k.startswith("unet"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k and k.startswith("text_encoder"))

    # the run-directory contract
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["flat_sigma"] == pytest.approx(0.1) for m in metrics)
    assert {"loss", "lr", "seconds", "it_per_s", "epoch"} <= set(metrics[0])
    assert json.loads((out / "samples" / "prompts.json").read_text()) == {"0": "a photo of sks toy"}
    for step in (0, 2, 4):  # baseline, every validation_steps, and the end
        assert sorted(p.name for p in (out / "samples" / f"step_{step:06d}").glob("*.png")) == ["0_0.png", "0_1.png"]
    kohya = load_file(out / "my_lora.safetensors")
    te_prefix = "lora_te1_" if arch == "sdxl" else "lora_te_"
    assert any(k.startswith(te_prefix) for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    # config.yaml is the resolved config and re-runnable
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["seed"] == 7 and cfg["max_train_steps"] == 4 and cfg["lora_alpha"] == 4.0
    make_config(cfg)


def test_loss_falls_when_overfitting_one_image(tiny, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    import numpy as np
    from PIL import Image

    from flatlora_diffusion.models import tokenize
    from flatlora_diffusion.step import StepModels, StepOptions, diffusion_loss, encode_prompts

    one = tmp_path / "one"
    one.mkdir()
    src = sorted(tiny["images"].glob("*.png"))[0]
    Image.open(src).resize((64, 64)).save(one / "img.png")
    out = tmp_path / "run"
    run(tiny, out, instance_data_dir=str(one), max_train_steps=100, learning_rate=1e-2, center_crop=True,
        flat_sigma=0.05)

    def eval_loss(with_lora):
        pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None, requires_safety_checker=False)
        if with_lora:
            pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
        pixels = torch.from_numpy(np.asarray(Image.open(one / "img.png").convert("RGB"), dtype=np.float32))
        pixels = (pixels / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            embeds, _ = encode_prompts([pipe.text_encoder], [tokenize(pipe.tokenizer, ["a photo of sks toy"])], "sd15")
            models = StepModels(pipe.unet, [pipe.text_encoder], DDPMScheduler.from_config(pipe.scheduler.config), "sd15")
            losses = []
            for k in range(16):  # the same 16 (noise, timestep) draws for both
                gen = torch.Generator().manual_seed(k)
                losses.append(diffusion_loss(models, latents, embeds, None, None, gen, StepOptions()).item())
        return sum(losses) / len(losses)

    before, after = eval_loss(False), eval_loss(True)
    # a random-weight tiny UNet with attention-only LoRA has little capacity: ~7% lower after 100 steps
    assert after < 0.95 * before, (before, after)


def test_flat_sigma_zero_is_plain_lora_bitwise(tiny, tmp_path):
    zero = run(tiny, tmp_path / "zero", flat_sigma=0.0, train_text_encoder=True)
    plain = run(tiny, tmp_path / "plain", flat_targets=[], train_text_encoder=True)  # no Flat-LoRA engine at all
    flat = run(tiny, tmp_path / "flat", flat_sigma=0.1, train_text_encoder=True)
    a, b, c = lora_weights(zero.path), lora_weights(plain.path), lora_weights(flat.path)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and sigma > 0 does change training


def test_leaving_out_the_step_0_validation_changes_nothing_else(tiny, tmp_path):
    """--validate_at_start false (the demo's second run): no step-0 pictures, and the same training and final
    pictures, bitwise: sampling the baseline draws nothing from the training's random streams."""
    val = {"validation_prompt": ["a photo of sks toy"], "validation_seeds": [0], "validation_steps": 2,
           "validation_inference_steps": 2, "train_text_encoder": True}
    with_start = run(tiny, tmp_path / "with", **val)
    without = run(tiny, tmp_path / "without", validate_at_start=False, **val)
    steps = [sorted(int(p.name.split("_")[1]) for p in (r.path / "samples").glob("step_*")) for r in (with_start, without)]
    assert steps == [[0, 2, 4], [2, 4]]
    a, b = lora_weights(with_start.path), lora_weights(without.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in ("step_000002", "step_000004"):
        assert (with_start.path / "samples" / step / "0_0.png").read_bytes() == \
            (without.path / "samples" / step / "0_0.png").read_bytes()


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path):
    full = tmp_path / "full"
    run(tiny, full, max_train_steps=6, checkpointing_steps=3, train_text_encoder=True, gradient_accumulation_steps=2)
    assert (full / "checkpoints" / "checkpoint-3" / "training_state.json").exists()
    # "Interrupt" after the checkpoint: a second run folder holding only what existed at step 3.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(full / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # one step past the checkpoint
    run(tiny, resumed, max_train_steps=6, checkpointing_steps=3, train_text_encoder=True,
        gradient_accumulation_steps=2, resume_from_checkpoint="latest")
    a, b = lora_weights(full), lora_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _cli(args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


def test_diffusers_readme_command_line_runs_unchanged(tiny, tmp_path):
    """The README example of diffusers' train_dreambooth_lora.py, with the tiny model, a 64 px resolution
    and 2 steps, launched through accelerate exactly as users do."""
    out = tmp_path / "out"
    args = [
        "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "train_dreambooth_flat.py",
        f"--pretrained_model_name_or_path={tiny['sd15']}",
        f"--instance_data_dir={tiny['images']}",
        f"--output_dir={out}",
        "--instance_prompt=a photo of sks dog",
        "--resolution=64",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=1",
        "--checkpointing_steps=100",
        "--learning_rate=1e-4",
        "--report_to=tensorboard",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket",
        "--validation_epochs=50",
        "--seed=0",
    ]
    result = _cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "out.safetensors").is_file()  # kohya file named after the folder
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_demo_produces_what_it_promises(tmp_path, monkeypatch):
    """As a user runs it (no OMP_NUM_THREADS, two cores or more): the two runs train side by side in two
    processes, the second one's console in flat-lora.log. (test_demo.py runs them one after the other.)"""
    import os

    from PIL import Image

    from flatlora_diffusion.demo import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "demo"
    assert main(["--output", str(out), "--steps", "4"]) == 0
    runs = {name: out / name for name in ("lora", "flat-lora")}
    if len(os.sched_getaffinity(0)) >= 2:
        assert "Steps" in (out / "flat-lora.log").read_text()  # the Flat-LoRA run's own progress, beside
    import yaml

    cfgs = {n: yaml.safe_load((p / "config.yaml").read_text()) for n, p in runs.items()}
    assert cfgs["lora"]["flat_sigma"] == 0 and cfgs["flat-lora"]["flat_sigma"] == 0.1
    assert cfgs["lora"]["seed"] == cfgs["flat-lora"]["seed"]
    for p in runs.values():
        assert (p / "pytorch_lora_weights.safetensors").is_file()
        assert json.loads((p / "status.json").read_text())["state"] == "completed"
    # the base model's pictures (step 0) once, in the first run: the second would make the same bytes
    assert len(list((runs["lora"] / "samples" / "step_000000").glob("*.png"))) == 10  # 5 prompts x 2 seeds
    assert cfgs["flat-lora"]["validate_at_start"] is False
    assert not (runs["flat-lora"] / "samples" / "step_000000").exists()
    # identical seeds and the same pictures asked for; training made them differ
    final = [sorted((p / "samples" / "step_000004").glob("*.png")) for p in runs.values()]
    assert [f.name for f in final[0]] == [f.name for f in final[1]] and len(final[0]) == 10
    assert any(Image.open(a).tobytes() != Image.open(b).tobytes() for a, b in zip(*final))
    # the judge read both runs' final pictures (8 subject prompts, 2 class prompts each)
    scores = json.loads((out / "scores.json").read_text())
    assert [s["subject"][1] + s["class_is_subject"][1] for s in scores.values()] == [10, 10, 10]
    grid = Image.open(out / "comparison.png")
    assert grid.width > 4 * 160 and grid.height > 10 * 160  # 4 columns (training pictures, base, LoRA, Flat-LoRA) x 10 rows
    # the first column shows the subject's training pictures: the same grid without them is one column narrower
    from flatlora_diffusion.demo import comparison_image

    plain = Image.open(comparison_image([("LoRA", runs["lora"]), ("Flat-LoRA sigma=0.1", runs["flat-lora"])],
                                        tmp_path / "plain.png"))
    assert plain.height == grid.height and grid.width - plain.width >= 160


def test_two_processes_share_the_work_through_accelerate(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP, as accelerate launch --cpu --num_processes 2 sets up):
    each process takes half the batches, only the main one writes the run folder, checkpoints hold both
    processes' states."""
    out = tmp_path / "ddp"
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "train_dreambooth_flat.py",
            f"--pretrained_model_name_or_path={tiny['sd15']}", f"--instance_data_dir={tiny['images']}",
            "--instance_prompt=a photo of sks toy", f"--output_dir={out}", "--resolution=64",
            "--train_batch_size=1", "--num_train_epochs=2", "--seed=0", "--train_text_encoder",
            "--checkpointing_steps=2", "--validation_prompt=a photo of sks toy", "--num_validation_images=1",
            "--validation_steps=2", "--validation_inference_steps=2"]
    result = _cli(args, ACCELERATE_USE_CPU="true")
    assert result.returncode == 0, result.stderr[-3000:]
    # 3 images x 2 epochs, split over 2 processes (padded to equal halves): 2 steps per epoch, 4 in all
    assert json.loads((out / "status.json").read_text())["step"] == 4
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["prompts.json", "step_000000", "step_000002",
                                                                  "step_000004"]
    assert any(v.abs().sum() > 0 for k, v in lora_weights(out).items() if "lora_B" in k)


def test_terminal_shows_the_summary_progress_bars_and_log_lines_on_their_own(tiny, tmp_path):
    """What a terminal user sees (issue 16, item 5): diffusers' "Running training" summary, bars for class
    images and validation images, and log lines that never share a line with a progress bar."""
    import re

    out = tmp_path / "out"
    result = _cli(["-m", "flatlora_diffusion.cli", "train", f"--pretrained_model_name_or_path={tiny['sd15']}",
                   f"--instance_data_dir={tiny['images']}", "--instance_prompt=a photo of sks toy",
                   f"--output_dir={out}", "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=2",
                   "--max_train_steps=4", "--checkpointing_steps=2", "--validation_prompt=a sks toy",
                   "--num_validation_images=2", "--validation_inference_steps=2", "--with_prior_preservation",
                   "--class_prompt=a toy", f"--class_data_dir={tmp_path / 'class'}", "--num_class_images=2",
                   "--sample_batch_size=1", "--seed=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    for line in ("***** Running training *****", "Num examples = 3", "Num batches each epoch = 3", "Num Epochs = 2",
                 "Instantaneous batch size per device = 1",
                 "Total train batch size (w. parallel, distributed & accumulation) = 2",
                 "Gradient Accumulation steps = 2", "Total optimization steps = 4"):
        assert line in err, line
    assert "Class images:" in err and "Validation images (step 0):" in err and "Validation images (step 4):" in err
    logged = [line.split("\r")[-1] for line in err.split("\n") if "saved checkpoint" in line]
    assert logged and all(re.match(r"^\d\d:\d\d:\d\d INFO saved checkpoint ", line) for line in logged), logged
