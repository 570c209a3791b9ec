"""A LoRA file the trainer wrote, loaded by diffusers into a FRESH copy of the base model, reproduces the
validation images the trained model made in memory — for plain LoRA and for PiSSA (whose adapter was trained
on a modified base and is converted back to one for the original base)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.training_helpers import run


def _regenerate(run_dir: Path, with_lora: bool, seed: int | None = None, prompt: int = 0) -> np.ndarray:
    import torch
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, StableDiffusionPipeline

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = cfg["pretrained_model_name_or_path"]
    if json.loads((Path(model) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline":
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    else:
        pipe = DiffusionPipeline.from_pretrained(model)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if with_lora:
        pipe.load_lora_weights(str(run_dir / "pytorch_lora_weights.safetensors"))
    image = pipe(cfg["validation_prompt"][prompt], num_inference_steps=cfg["validation_inference_steps"],
                 guidance_scale=cfg["validation_guidance_scale"], height=64, width=64,
                 generator=torch.Generator().manual_seed(cfg["validation_seeds"][0] if seed is None else seed)).images[0]
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_trained_file_reproduces_the_validation_image(tiny, tmp_path, init):
    out = tmp_path / init
    run(tiny, out, init_lora_weights=init, max_train_steps=6, learning_rate=2e-2, train_text_encoder=True,
        validation_prompt=["a photo of sks toy"], validation_seeds=[3], validation_inference_steps=4)
    trained = np.asarray(Image.open(out / "samples" / "step_000006" / "0_3.png"), dtype=np.float32)
    with_lora = _regenerate(out, with_lora=True)
    without = _regenerate(out, with_lora=False)
    assert np.abs(with_lora - trained).max() <= 2  # PNG rounding
    assert np.abs(without - trained).mean() > 2  # and the LoRA really changed the image
    meta = json.loads(__import__("safetensors").safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt")
                      .metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == (8 if init == "pissa" else 4)  # PiSSA ships [B, -B0] @ [A; A0]: rank 2r


def test_sdxl_validation_images_from_cached_prompt_embeddings_are_the_pipelines_own(tiny, tmp_path):
    """SDXL's frozen text encoders: validation samples from embeddings encoded once (four of them: prompt, pooled,
    and their unconditional twins); a user's plain StableDiffusionXLPipeline call with the LoRA file gets the same
    pictures."""
    out = tmp_path / "sdxl"
    run(tiny, out, arch="sdxl", max_train_steps=2, learning_rate=2e-2, validation_prompt=["a photo of sks toy"],
        validation_seeds=[3, 5], validation_inference_steps=4, sample_batch_size=2)
    for seed in (3, 5):
        image = np.asarray(Image.open(out / "samples" / "step_000002" / f"0_{seed}.png"), dtype=np.float32)
        assert np.abs(_regenerate(out, with_lora=True, seed=seed) - image).max() <= 2


def test_validation_images_made_in_a_batch_are_each_seeds_own_image(tiny, tmp_path, monkeypatch):
    """A prompt's seeds are sampled together (--sample_batch_size at a time): each image must still be the one its
    seed gives alone, as a user regenerating "seed 5" from the LoRA file gets it. The VAE decodes them one at a
    time (its activations at full size are what a batch would multiply)."""
    from diffusers import AutoencoderKL

    decoded_batches = []
    decode = AutoencoderKL._decode

    def counting_decode(self, z, *args, **kwargs):
        decoded_batches.append(z.shape[0])
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "_decode", counting_decode)
    out = tmp_path / "batched"
    run(tiny, out, max_train_steps=2, learning_rate=2e-2, validation_prompt=["a photo of sks toy"],
        validation_seeds=[3, 5, 7], validation_inference_steps=4, sample_batch_size=2)  # batches [3, 5] and [7]
    assert decoded_batches and set(decoded_batches) == {1}
    assert len(decoded_batches) == 3 * 2  # three images at step 0 and at step 2
    monkeypatch.undo()
    images = {s: np.asarray(Image.open(out / "samples" / "step_000002" / f"0_{s}.png"), dtype=np.float32)
              for s in (3, 5, 7)}
    for seed, image in images.items():
        assert np.abs(_regenerate(out, with_lora=True, seed=seed) - image).max() <= 2
    assert np.abs(images[3] - images[5]).mean() > 2  # different seeds, different images
    # written at zlib level 1 (4x faster than PIL's default for the same pixels): re-saving so gives the same bytes
    import io

    from flatlora_diffusion.data.class_images import FAST_PNG

    written = (out / "samples" / "step_000002" / "0_3.png").read_bytes()
    again = io.BytesIO()
    Image.open(io.BytesIO(written)).save(again, **FAST_PNG)
    assert again.getvalue() == written


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_validation_batches_across_prompts_give_each_prompt_and_seed_its_own_image(tiny, tmp_path, arch):
    """Validation fills its --sample_batch_size batches across prompts (two prompts x two seeds in one batch of
    four here; SDXL through its cached prompt embeddings): each picture must still be the one its prompt and seed
    give alone."""
    out = tmp_path / arch
    prompts = ["a photo of sks toy", "a photo of sks toy on the beach"]
    run(tiny, out, arch=arch, max_train_steps=2, learning_rate=2e-2, validation_prompt=prompts,
        validation_seeds=[3, 5], validation_inference_steps=4, sample_batch_size=4)
    images = {(p, s): np.asarray(Image.open(out / "samples" / "step_000002" / f"{p}_{s}.png"), dtype=np.float32)
              for p in (0, 1) for s in (3, 5)}
    for (p, seed), image in images.items():
        assert np.abs(_regenerate(out, with_lora=True, seed=seed, prompt=p) - image).max() <= 2, (p, seed)
    # the two prompts' pictures of one seed differ by more than the tolerance above: a mix-up would be caught
    assert np.abs(images[0, 3] - images[1, 3]).max() > 2
