"""Trainer features beyond test_train.py, each checked by an effect it must have (not just "it ran"):
single-file checkpoints, a separate VAE, aspect-ratio buckets with SDXL micro-conditioning, prior
preservation with generated class images, bf16 on the CPU, gradient checkpointing, latent and text-embedding
caches, Min-SNR / noise offset / lr schedules, DoRA / rsLoRA / alpha != rank files that diffusers loads,
checkpoint rotation and resume by bare name, the export command on a run, kohya "N_token" folders.

All on tiny offline models at 64 px, a few steps each, on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from flatlora_diffusion import step as step_module
from flatlora_diffusion import train as train_module
from flatlora_diffusion.config import LR_SCHEDULERS
from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline, save_single_file_checkpoint
from tests.training_helpers import lora_weights, metrics, run


def losses(run_dir):
    return [m["loss"] for m in metrics(run_dir)]


def file_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def assert_weights_close(a, b, rtol=1e-5, atol=1e-8):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def assert_weights_differ(a, b):
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.fixture
def capture_trainer(monkeypatch):
    """The _Trainer of the next run(s), kept after its _finish (models, LoRA, components in memory)."""
    seen = []
    original = train_module._Trainer._finish

    def finish(self):
        seen.append(self)
        return original(self)

    monkeypatch.setattr(train_module._Trainer, "_finish", finish)
    return seen


@pytest.fixture
def record_loss_calls(monkeypatch):
    """Every call of step.diffusion_loss the trainer makes: latents shape, time_ids, n_class."""
    calls = []
    original = step_module.diffusion_loss

    def recording(models, latents, prompt_embeds, pooled, time_ids, generator, options, n_class=0):
        calls.append({"latents": tuple(latents.shape), "dtype": latents.dtype, "n_class": n_class,
                      "time_ids": None if time_ids is None else time_ids.detach().clone(),
                      "prior_loss_weight": options.prior_loss_weight})
        return original(models, latents, prompt_embeds, pooled, time_ids, generator, options, n_class)

    monkeypatch.setattr(step_module, "diffusion_loss", recording)
    return calls


# ==========================================================================================================
# 1. single-file checkpoints
# ==========================================================================================================
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_checkpoint_trains_like_its_folder(tiny, tmp_path, arch):
    single = save_single_file_checkpoint(tiny[arch], tmp_path / f"{arch}-model.safetensors")
    # no learning_rate: its default depends on the architecture, which must come from the file
    from_file = run(tiny, tmp_path / "file", arch=arch, learning_rate=None,
                    pretrained_model_name_or_path=str(single), single_file_config=str(tiny[arch]))
    from_folder = run(tiny, tmp_path / "folder", arch=arch, learning_rate=None)
    cfg = yaml.safe_load((from_file.path / "config.yaml").read_text())
    assert cfg["learning_rate"] == {"sd15": 5e-4, "sdxl": 1e-4}[arch]
    assert cfg["pretrained_model_name_or_path"] == str(single)
    kohya_md = file_metadata(from_file.path / "file.safetensors")
    assert kohya_md["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch]
    # the same weights, loaded from one file instead of a folder: the same training
    assert_weights_close(lora_weights(from_file.path), lora_weights(from_folder.path))
    assert losses(from_file.path) == pytest.approx(losses(from_folder.path), rel=1e-5)


# ==========================================================================================================
# 2. a separate VAE
# ==========================================================================================================
def test_separate_vae_folder_is_the_vae_the_run_encodes_with(tiny, tmp_path, capture_trainer):
    other = make_tiny_pipeline(tmp_path / "other", "sd15", seed=1)  # same architecture, other VAE weights
    default = run(tiny, tmp_path / "default", max_train_steps=2)
    same = run(tiny, tmp_path / "same", max_train_steps=2, pretrained_vae_model_name_or_path=str(tiny["sd15"]))
    swapped = run(tiny, tmp_path / "swapped", max_train_steps=2, pretrained_vae_model_name_or_path=str(other))
    subfolder = run(tiny, tmp_path / "sub", max_train_steps=2, pretrained_vae_model_name_or_path=str(other / "vae"))
    # the base model's own VAE given separately changes nothing; another VAE changes the latents, so the loss
    assert losses(same.path) == losses(default.path)
    assert losses(swapped.path)[0] != pytest.approx(losses(default.path)[0], rel=1e-3)
    assert losses(subfolder.path) == losses(swapped.path)  # a pipeline folder means its vae/
    from diffusers import AutoencoderKL

    expected = AutoencoderKL.from_pretrained(other, subfolder="vae").state_dict()
    used = capture_trainer[2].components.vae.state_dict()
    assert all(torch.equal(used[k], expected[k]) for k in expected)


# ==========================================================================================================
# 3. aspect-ratio buckets, SDXL micro-conditioning per image
# ==========================================================================================================
def test_sdxl_buckets_batch_by_bucket_and_time_ids_follow_each_image(tiny, tmp_path, monkeypatch, record_loss_calls):
    images = tmp_path / "mixed"
    sizes = [(96, 64), (96, 64), (64, 96), (64, 96), (80, 80)]  # (w, h): two wide, two tall, one square
    paths = make_subject_images(images, sizes=sizes, seed=3)
    for i, p in enumerate(paths):
        p.with_suffix(".txt").write_text(f"a photo of sks toy number{i}")
    made = []
    original = train_module._Trainer._make_step_batch

    def make_step_batch(self, batch):
        result = original(self, batch)
        made.append((list(batch["prompts"]), result))
        return result

    monkeypatch.setattr(train_module._Trainer, "_make_step_batch", make_step_batch)
    run(tiny, tmp_path / "run", arch="sdxl", instance_data_dir=str(images), instance_prompt=None,
        aspect_ratio_buckets=True, bucket_reso_steps=16, train_batch_size=2, max_train_steps=3)

    # resolution 64, 16 px steps: 96x64 -> bucket 80x48, 64x96 -> 48x80, 80x80 -> 64x64 (w x h)
    bucket = {(96, 64): (80, 48), (64, 96): (48, 80), (80, 80): (64, 64)}
    by_prompt = {f"a photo of sks toy number{i}": wh for i, wh in enumerate(sizes)}
    seen = []
    assert len(made) == 3  # 2 + 2 + 1 images, one epoch
    for prompts, batch in made:
        targets = {bucket[by_prompt[p]] for p in prompts}
        assert len(targets) == 1, prompts  # one bucket per batch
        (tw, th), = targets
        assert batch.latents.shape[-2:] == (th // 8, tw // 8)
        assert batch.time_ids.shape == (len(prompts), 6) and batch.time_ids.dtype == torch.float32
        for prompt, ids in zip(prompts, batch.time_ids.tolist()):
            w, h = by_prompt[prompt]
            assert ids[0:2] == [h, w]  # original size (h, w) of this very image
            assert ids[4:6] == [th, tw]  # target size (h, w) of its bucket
            top, left = ids[2:4]  # a crop of the image resized to cover the bucket
            scale = max(tw / w, th / h)
            assert 0 <= top <= round(h * scale) - th and 0 <= left <= round(w * scale) - tw
            seen.append(prompt)
    assert sorted(seen) == sorted(by_prompt)
    # and these very time_ids are what the UNet was conditioned on
    assert [c["latents"] for c in record_loss_calls] == [tuple(b.latents.shape) for _, b in made]
    assert all(torch.equal(c["time_ids"], b.time_ids) for c, (_, b) in zip(record_loss_calls, made))


# ==========================================================================================================
# 4. prior preservation
# ==========================================================================================================
def test_prior_preservation_generates_class_images_and_adds_the_weighted_prior_loss(tiny, tmp_path, record_loss_calls):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    import numpy as np
    from PIL import Image

    from flatlora_diffusion.data import generate_class_images

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    prior = dict(with_prior_preservation=True, class_data_dir=str(class_dir), class_prompt="a photo of a toy",
                 num_class_images=2, sample_batch_size=2, validation_inference_steps=2, max_train_steps=2)
    w1 = run(tiny, tmp_path / "w1", **prior)
    made = sorted(class_dir.glob("*.png"))
    assert len(made) == 2
    assert all(c["n_class"] == 1 and c["latents"][0] == 2 for c in record_loss_calls)  # instance + class image
    # generated by the base model (the run's LoRA starts as a no-op): a fresh base pipeline makes the same images
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    again = tmp_path / "again"
    generate_class_images(pipe, again, "a photo of a toy", 2, 2, seed=7, pipeline_kwargs={"num_inference_steps": 2})
    for a, b in zip(made, sorted(again.glob("*.png"))):
        diff = np.abs(np.asarray(Image.open(a), np.float32) - np.asarray(Image.open(b), np.float32))
        assert diff.max() <= 2, a.name

    stamps = {p.name: p.stat().st_mtime_ns for p in made}
    w0 = run(tiny, tmp_path / "w0", **prior, prior_loss_weight=0.0)
    w2 = run(tiny, tmp_path / "w2", **prior, prior_loss_weight=2.0)
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == stamps  # enough: none regenerated
    # step 1 sees identical weights, data and noise: the losses differ by exactly weight x prior loss
    l0, l1, l2 = (losses(r.path)[0] for r in (w0, w1, w2))
    prior_loss = l1 - l0
    assert prior_loss > 1e-3
    assert l2 - l0 == pytest.approx(2 * prior_loss, rel=1e-4)
    assert {c["prior_loss_weight"] for c in record_loss_calls} == {1.0, 0.0, 2.0}


# ==========================================================================================================
# 5. bf16 mixed precision on the CPU
# ==========================================================================================================
def test_bf16_trains_fp32_lora_on_an_untouched_bf16_base(tiny, tmp_path, capture_trainer, record_loss_calls):
    from diffusers import UNet2DConditionModel

    out = run(tiny, tmp_path / "bf16", mixed_precision="bf16", train_text_encoder=True)
    trainer = capture_trainer[0]
    assert trainer.weight_dtype == torch.bfloat16
    assert len(record_loss_calls) == 4 and all(c["dtype"] == torch.bfloat16 for c in record_loss_calls)
    assert all(torch.isfinite(torch.tensor(losses(out.path))))
    unet = trainer.acc.unwrap_model(trainer.components.unet)
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    for te in trainer.components.text_encoders:
        assert all(p.dtype == torch.float32 for p in te.parameters() if p.requires_grad)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trained.items())
    # the frozen base: bf16, and bit for bit the bf16 cast of the model's weights (Flat-LoRA restored it)
    base = UNet2DConditionModel.from_pretrained(tiny["sd15"], subfolder="unet").state_dict()
    frozen = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if not p.requires_grad}
    assert frozen.keys() == base.keys()
    for name, p in frozen.items():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, base[name].to(torch.bfloat16)), name
    saved = lora_weights(out.path)
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    assert file_metadata(out.path / "bf16.safetensors")["ss_mixed_precision"] == "bf16"
    # --bf16_norms (the default): the step's UNet norms ran norms.py's forwards, made once for the run
    assert trainer.step.options.bf16_norms and len(trainer.step.norms_in_bf16.forwards) == sum(
        isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in unet.modules())


def test_no_bf16_norms_leaves_autocast_s_norms(tiny, tmp_path, capture_trainer):
    run(tiny, tmp_path / "fp32norms", mixed_precision="bf16", bf16_norms=False, max_train_steps=1)
    step = capture_trainer[0].step
    assert not step.options.bf16_norms and step.norms_in_bf16.forwards is None


def test_fused_lora_layers_train_as_peft_s(tiny, tmp_path, capture_trainer, monkeypatch):
    """--fused_lora under bf16: every LoRA layer of the UNet and the text encoders runs fused_lora.py's forward in
    the steps, and the losses stay within bf16 rounding of the default's (peft's forward). Without mixed precision
    the layers are peft's."""
    from peft.tuners.lora import Linear

    from flatlora_diffusion import fused_lora

    calls = {"n": 0}
    original = fused_lora._LoraSum.apply

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(fused_lora._LoraSum, "apply", counting)
    common = dict(mixed_precision="bf16", train_text_encoder=True, flat_sigma=0.1, max_train_steps=3)
    fused = run(tiny, tmp_path / "fused", fused_lora=True, **common).path
    fused_calls = calls["n"]
    plain = run(tiny, tmp_path / "plain", **common).path  # the default: peft's layers
    fp32 = run(tiny, tmp_path / "fp32", **{**common, "fused_lora": True, "mixed_precision": "no",
                                            "max_train_steps": 1}).path
    on, off, full = (trainer.step for trainer in capture_trainer)
    models = [on.models.unet, *on.models.text_encoders]
    lora_layers = [m for model in models for m in model.modules() if isinstance(m, Linear)]
    assert len(on.fused_lora_layers.forwards) == len(lora_layers) > 0
    fused_layers = dict(on.fused_lora_layers.forwards)
    assert {type(model).__name__ for model in models if any(m in fused_layers for m in model.modules())} == {
        "UNet2DConditionModel", "CLIPTextModel"}
    assert fused_calls >= 3 * len(lora_layers) and calls["n"] == fused_calls  # each step; none in the other runs
    assert off.fused_lora_layers.forwards is None and full.fused_lora_layers.forwards is None
    a, b = losses(fused), losses(plain)
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 0.02 * abs(y) for x, y in zip(a, b)), (a, b)
    assert losses(fp32)


@pytest.mark.parametrize("speedups", [True, False])
def test_validation_samples_with_the_steps_norms_and_lora_layers(tiny, tmp_path, monkeypatch, speedups):
    """Validation sampling (under the steps' bf16 autocast) runs the UNet's norms and LoRA layers as the steps do:
    norms.py's and fused_lora.py's forwards with --bf16_norms --fused_lora, autocast's and peft's own with
    --no_bf16_norms --no_fused_lora; the modules are as before once it is done."""
    from peft.tuners.lora import Linear

    from flatlora_diffusion.trainer import images as images_module

    calls, after = {"norm": [], "lora": []}, []
    kinds = {"norm": (torch.nn.GroupNorm, torch.nn.LayerNorm), "lora": (Linear,)}
    original = images_module.ImagesMixin._sample_validation_images
    original_make = images_module.ImagesMixin._make_validation_images

    def sampling(self, out):
        hooks = [m.register_forward_hook(lambda m, args, y, kind=kind: calls[kind].append("forward" in m.__dict__))
                 for kind, types in kinds.items() for m in self.components.unet.modules() if isinstance(m, types)]
        try:
            return original(self, out)
        finally:
            for hook in hooks:
                hook.remove()

    def made(self, out):
        original_make(self, out)
        after.append(any("forward" in m.__dict__ for m in self.components.unet.modules()
                         if isinstance(m, kinds["norm"] + kinds["lora"])))

    monkeypatch.setattr(images_module.ImagesMixin, "_sample_validation_images", sampling)
    monkeypatch.setattr(images_module.ImagesMixin, "_make_validation_images", made)
    run(tiny, tmp_path / "speedups", mixed_precision="bf16", bf16_norms=speedups, fused_lora=speedups,
        max_train_steps=2, validation_prompt=["a photo of sks toy"], validation_steps=1, validation_inference_steps=2,
        num_validation_images=1)
    assert calls["norm"] and set(calls["norm"]) == {speedups}
    assert calls["lora"] and set(calls["lora"]) == {speedups}
    assert len(after) == 3 and not any(after)  # steps 0, 1 and 2


# ==========================================================================================================
# 6. gradient checkpointing
# ==========================================================================================================
def test_gradient_checkpointing_gives_the_same_weights(tiny, tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = {"n": 0}
    original = tuc.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", counting)
    common = dict(train_text_encoder=True, flat_sigma=0.1, learning_rate=1e-2, max_train_steps=3)
    plain = run(tiny, tmp_path / "plain", **common)
    assert calls["n"] == 0
    ckpt = run(tiny, tmp_path / "ckpt", **common, gradient_checkpointing=True)
    assert calls["n"] > 0  # it really recomputed activations
    a, b = lora_weights(plain.path), lora_weights(ckpt.path)
    assert_weights_close(a, b, rtol=1e-5, atol=1e-7)  # Flat-LoRA's noise is the same in the recomputation
    assert any(k.startswith("text_encoder") and "lora_B" in k and v.abs().sum() > 0 for k, v in b.items())


# ==========================================================================================================
# 7. latent and text-embedding caches
# ==========================================================================================================
def test_latent_and_text_embedding_caches_encode_once_and_train_the_same(tiny, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    counts = {"vae": [], "text": 0}
    original_encode = AutoencoderKL.encode
    original_prompts = step_module.encode_prompts

    def encode(self, x, *args, **kwargs):
        counts["vae"].append(x.shape[0])
        return original_encode(self, x, *args, **kwargs)

    def encode_prompts(*args, **kwargs):
        counts["text"] += 1
        return original_prompts(*args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    monkeypatch.setattr(step_module, "encode_prompts", encode_prompts)
    # center crops, no flips: every epoch sees the same pixels, so caching must not change training at all
    common = dict(center_crop=True, max_train_steps=5, train_batch_size=1)  # 3 images: 1 epoch and 2/3

    cached = run(tiny, tmp_path / "cached", **common, cache_latents=True)  # text embeddings cached by default
    assert counts["vae"] == [1, 1, 1]  # each image once, before training; not per step
    assert counts["text"] == 1  # one prompt, encoded once
    counts.update(vae=[], text=0)
    uncached = run(tiny, tmp_path / "uncached", **common, cache_text_embeddings=False)
    assert counts["vae"] == [1] * 5 and counts["text"] == 5  # per step
    counts.update(vae=[], text=0)
    text_only = run(tiny, tmp_path / "text_only", **common)
    assert len(counts["vae"]) == 5 and counts["text"] == 1

    assert losses(cached.path) == pytest.approx(losses(uncached.path), rel=1e-6)
    assert_weights_close(lora_weights(cached.path), lora_weights(uncached.path), rtol=1e-6, atol=1e-8)
    assert_weights_close(lora_weights(text_only.path), lora_weights(uncached.path), rtol=1e-6, atol=1e-8)

    # random flips stay random under the cache: both orientations encoded once, each epoch takes its own draw
    counts.update(vae=[], text=0)
    flips = dict(common, random_flip=True, max_train_steps=9)  # 3 epochs of 3 images: both sides get drawn
    cached_flips = run(tiny, tmp_path / "cached_flips", **flips, cache_latents=True)
    assert counts["vae"] == [1] * 6  # each image twice, before training
    uncached_flips = run(tiny, tmp_path / "uncached_flips", **flips)
    assert losses(cached_flips.path) == pytest.approx(losses(uncached_flips.path), rel=1e-6)
    assert_weights_close(lora_weights(cached_flips.path), lora_weights(uncached_flips.path), rtol=1e-6, atol=1e-8)
    assert losses(cached_flips.path)[:5] != pytest.approx(losses(cached.path), rel=1e-6)  # and flips did happen

    # a picture met again (--repeats 2: each instance picture twice per epoch) is encoded once, and trains the same
    counts.update(vae=[], text=0)
    repeated = dict(common, repeats=2, max_train_steps=6)
    cached_repeats = run(tiny, tmp_path / "cached_repeats", **repeated, cache_latents=True)
    assert counts["vae"] == [1, 1, 1]  # three pictures, six items
    uncached_repeats = run(tiny, tmp_path / "uncached_repeats", **repeated)
    assert len(losses(cached_repeats.path)) == 6
    assert losses(cached_repeats.path) == pytest.approx(losses(uncached_repeats.path), rel=1e-6)
    assert_weights_close(lora_weights(cached_repeats.path), lora_weights(uncached_repeats.path), rtol=1e-6, atol=1e-8)


def test_idle_frozen_models_are_parked_off_the_device_and_back_for_validation(tiny, tmp_path, monkeypatch):
    """With cached latents and frozen text encoders, the VAE and the encoders leave the GPU after every training
    prompt and every validation prompt is encoded; the VAE comes back for each set of validation images and leaves
    again, the encoders stay parked (they do not run while sampling); training and sampling are those of an
    unparked run. (On this CPU the moves are recorded: _can_park says yes, the target is the CPU.)"""
    from transformers import CLIPTextModel

    from flatlora_diffusion.trainer.parking import ParkingMixin

    events, embedded_before_training, encoder_calls = [], [], [0]
    original_move, original_sample = ParkingMixin._move, train_module._Trainer._sample_validation_images
    original_build = train_module._Trainer._build_optimizer
    original_encoder_forward = CLIPTextModel.forward

    def move(self, names, device):  # parking passes "cpu"; the way back passes the accelerator's torch.device
        events.append(("park" if device == "cpu" else "unpark", tuple(names)))
        return original_move(self, names, device)

    def sample(self, out):
        before = encoder_calls[0]
        result = original_sample(self, out)
        events.append(("sample", encoder_calls[0] - before))
        return result

    def encoder_forward(self, *args, **kwargs):
        encoder_calls[0] += 1
        return original_encoder_forward(self, *args, **kwargs)

    def build_optimizer(self):  # right after parking: every prompt a step will see is already encoded
        embedded_before_training.append(sorted(self.embedding_cache))
        return original_build(self)

    monkeypatch.setattr(ParkingMixin, "_can_park", lambda self: True)
    monkeypatch.setattr(ParkingMixin, "_move", move)
    monkeypatch.setattr(train_module._Trainer, "_sample_validation_images", sample)
    monkeypatch.setattr(train_module._Trainer, "_build_optimizer", build_optimizer)
    monkeypatch.setattr(CLIPTextModel, "forward", encoder_forward)
    make_subject_images(tmp_path / "class", n=2)
    common = dict(max_train_steps=2, validation_prompt=["a toy"], validation_seeds=[0], validation_steps=1,
                  validation_inference_steps=2, with_prior_preservation=True, class_data_dir=str(tmp_path / "class"),
                  class_prompt="a photo of a toy", num_class_images=2)
    parked = run(tiny, tmp_path / "parked", **common, cache_latents=True)
    both = ("text_encoder", "vae")
    assert embedded_before_training == [["a photo of a toy", "a photo of sks toy"]]
    # steps 0, 1, 2: only the VAE comes back, and the text encoders never run while sampling
    assert events == [("park", both)] + [("unpark", ("vae",)), ("sample", 0), ("park", ("vae",))] * 3
    assert (parked.path / "samples" / "step_000002" / "0_0.png").exists()

    events.clear()
    embedded_before_training.clear()
    run(tiny, tmp_path / "te", **common, cache_latents=True, train_text_encoder=True)
    assert events[0] == ("park", ("vae",))  # trained text encoders stay; nothing to pre-encode
    assert embedded_before_training == [[]]
    assert events[2][0] == "sample" and events[2][1] > 0  # their prompts are encoded at every validation
    events.clear()
    run(tiny, tmp_path / "pixels", **common)  # the VAE encodes every step: it stays
    assert events[0] == ("park", ("text_encoder",))

    monkeypatch.setattr(ParkingMixin, "_move", original_move)
    monkeypatch.setattr(ParkingMixin, "_can_park", lambda self: False)
    unparked = run(tiny, tmp_path / "unparked", **common, cache_latents=True)
    assert_weights_close(lora_weights(parked.path), lora_weights(unparked.path), rtol=0, atol=0)
    assert losses(parked.path) == losses(unparked.path)
    for step in ("step_000000", "step_000002"):  # the same pictures
        assert ((parked.path / "samples" / step / "0_0.png").read_bytes()
                == (unparked.path / "samples" / step / "0_0.png").read_bytes())


def test_the_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    train_module._use_expandable_segments()
    assert train_module.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    train_module._use_expandable_segments()
    assert train_module.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_cublas_gets_a_4_mib_workspace_unless_the_user_chose(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run(tiny, tmp_path / "run", max_train_steps=1)  # set by train() itself, before any model loads
    assert train_module.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:1"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # e.g. for torch.use_deterministic_algorithms
    train_module._use_small_cublas_workspace()
    assert train_module.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


# ==========================================================================================================
# 7b. --torch_compile: the UNet's blocks compiled for the training steps
# ==========================================================================================================
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_torch_compile_traces_the_blocks_once_trains_the_same_and_samples_eagerly(tiny, tmp_path, monkeypatch,
                                                                                  precision):
    """dynamo's counting backend stands in for inductor (it runs what dynamo traced as is, so the run must equal an
    eager one bit for bit; inductor itself took 83 s to compile the tiny UNet's blocks on one CPU thread and gave the
    same losses, by hand). Flat-LoRA is on (the reference path on the CPU): its layers break the compiled blocks.
    Frames traced: as many for 4 steps with 3 validation rounds as for 2 steps without validation, so nothing is
    traced again after the first step, and sampling (without gradients) runs the blocks eagerly. In bf16 the
    step's norms are patched in at every step (--bf16_norms): the same objects, so no retracing either."""
    from torch._dynamo.testing import CompileCounter

    from flatlora_diffusion import compiled_blocks

    validation = {"validation_prompt": ["a photo of sks toy"], "validation_steps": 2, "validation_inference_steps": 2,
                  "num_validation_images": 1, "mixed_precision": precision}
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    eager = run(tiny, tmp_path / "eager", **validation).path
    assert "TORCHINDUCTOR_CACHE_DIR" not in train_module.os.environ  # only --torch_compile moves inductor's cache
    frames = {}
    for name, over in {"4 steps": validation,
                       "2 steps, no validation": {"max_train_steps": 2, "mixed_precision": precision}}.items():
        counter = CompileCounter()
        monkeypatch.setattr(compiled_blocks, "BACKEND", counter)
        torch._dynamo.reset()
        try:
            run_dir = run(tiny, tmp_path / name.replace(" ", "_").replace(",", ""), torch_compile=True, **over).path
        finally:
            torch._dynamo.reset()
        frames[name] = counter.frame_count
        if name == "4 steps":
            compiled_run = run_dir
    assert frames["4 steps"] == frames["2 steps, no validation"] > 0, frames
    assert train_module.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "flatlora-diffusion"
                                                                      / "torchinductor")
    assert [m["loss"] for m in metrics(compiled_run)] == [m["loss"] for m in metrics(eager)]
    compiled_weights, eager_weights = lora_weights(compiled_run), lora_weights(eager)
    assert compiled_weights.keys() == eager_weights.keys()
    assert all(torch.equal(compiled_weights[k], eager_weights[k]) for k in eager_weights)
    assert (compiled_run / "samples" / "step_000004" / ".complete").exists()


COMPILE_ONE_BLOCK = """
import json, sys, torch
from torch._dynamo.utils import counters
from flatlora_diffusion import train as train_module
from flatlora_diffusion.config import TrainConfig

train_module._use_persistent_compile_cache(TrainConfig(torch_compile=True))

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))

torch.manual_seed(0)
block = Block()
block.compile(backend="inductor", dynamic=False)  # as compiled_blocks does, with inductor itself
block(torch.randn(4, 8, requires_grad=True)).sum().backward()
print(json.dumps(dict(counters["inductor"])))
"""


def test_a_later_torch_compile_run_loads_the_compiled_code_from_the_user_cache_folder(tmp_path):
    """Two processes compile the same block (forward and backward) with inductor after train's cache setting, in
    a home whose cache folder is empty at first: the first compiles its graphs and stores them in
    ~/.cache/flatlora-diffusion/torchinductor, the second finds every graph there and compiles none. (The tiny
    UNet's blocks: 69.7 s cold, 5.2 s warm on one CPU thread; too slow for this suite.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)

    def compile_once() -> dict:
        done = subprocess.run([sys.executable, "-c", COMPILE_ONE_BLOCK], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = compile_once()
    assert first.get("fxgraph_cache_miss", 0) >= 2 and first.get("fxgraph_cache_hit", 0) == 0, first
    assert any((tmp_path / ".cache" / "flatlora-diffusion" / "torchinductor" / "fxgraph").rglob("*"))
    second = compile_once()
    assert second.get("fxgraph_cache_hit", 0) == first["fxgraph_cache_miss"], second
    assert second.get("fxgraph_cache_miss", 0) == 0, second


def test_torch_compile_keeps_a_cache_folder_the_user_chose(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from flatlora_diffusion.config import TrainConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    train_module._use_persistent_compile_cache(TrainConfig(torch_compile=True))
    assert train_module.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo writes there
    train_module._use_persistent_compile_cache(TrainConfig(torch_compile=True))
    assert train_module.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "flatlora-diffusion" / "torchinductor")
    # a cache folder that cannot be made leaves torch's default in place instead of failing the run
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    train_module._use_persistent_compile_cache(TrainConfig(torch_compile=True))
    assert train_module.os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()


# ==========================================================================================================
# 8. Min-SNR, noise offset, lr schedules
# ==========================================================================================================
def test_snr_gamma_weights_the_loss_by_min_snr_over_snr(tiny, tmp_path, monkeypatch):
    snrs = []
    original = step_module.compute_snr

    def compute_snr(scheduler, timesteps):
        snr = original(scheduler, timesteps)
        snrs.append(snr.tolist())
        return snr

    monkeypatch.setattr(step_module, "compute_snr", compute_snr)
    base = run(tiny, tmp_path / "base")
    assert snrs == []
    gamma5 = run(tiny, tmp_path / "g5", snr_gamma=5.0)
    first = [s[0] for s in snrs]
    assert len(first) == 4
    assert first[0] > 5, first  # precondition (seed 7): the weighting bites at step 1, where it is checked exactly
    huge = run(tiny, tmp_path / "huge", snr_gamma=1e9)  # min(snr, gamma) / snr == 1: plain MSE

    lb, l5, lh = losses(base.path), losses(gamma5.path), losses(huge.path)
    assert all(torch.isfinite(torch.tensor(l5)))
    # step 1 sees the same weights and draws: the loss is scaled by exactly min(snr, 5) / snr
    assert l5[0] == pytest.approx(lb[0] * min(first[0], 5.0) / first[0], rel=1e-5)
    assert lh == pytest.approx(lb, rel=1e-5)
    assert_weights_differ(lora_weights(gamma5.path), lora_weights(base.path))
    assert_weights_close(lora_weights(huge.path), lora_weights(base.path), rtol=1e-4, atol=1e-7)


def test_noise_offset_changes_training_and_stays_finite(tiny, tmp_path):
    base = run(tiny, tmp_path / "base", max_train_steps=2)
    offset = run(tiny, tmp_path / "offset", max_train_steps=2, noise_offset=0.1)
    lb, lo = losses(base.path), losses(offset.path)
    assert all(torch.isfinite(torch.tensor(lo)))
    assert lo[0] != pytest.approx(lb[0], rel=1e-4)
    assert all(torch.isfinite(v).all() for v in lora_weights(offset.path).values())
    assert_weights_differ(lora_weights(offset.path), lora_weights(base.path))


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_lr_scheduler_follows_its_schedule(tiny, tmp_path, name):
    from diffusers.optimization import get_scheduler

    out = run(tiny, tmp_path / name, lr_scheduler=name, lr_warmup_steps=1, max_train_steps=3, learning_rate=1e-3,
              lr_num_cycles=2, lr_power=2.0, flat_sigma=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler(name, optimizer=optimizer, num_warmup_steps=1, num_training_steps=3, num_cycles=2,
                             power=2.0)
    expected = []
    for _ in range(3):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    logged = [m["lr"] for m in metrics(out.path)]
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert all(torch.isfinite(torch.tensor(losses(out.path))))


# ==========================================================================================================
# 9. DoRA, rsLoRA, alpha != rank: the files the trainer wrote load into a fresh pipeline and reproduce it
# ==========================================================================================================
def _fresh_sd15(tiny, lora_file=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None, requires_safety_checker=False)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    return pipe


@torch.no_grad()
def _outputs(unet, text_encoder, tokenizer):
    from flatlora_diffusion.models import tokenize

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    unet_out = unet(sample, torch.tensor([100, 700]), context, return_dict=False)[0]
    te_out = text_encoder(tokenize(tokenizer, ["a photo of sks toy", "a red smiling toy"]))[0]
    return unet_out, te_out


LORA_VARIANTS = {
    "lora-alpha8-r4": dict(rank=4, lora_alpha=8.0),
    "rslora-alpha3-r4": dict(rank=4, lora_alpha=3.0, use_rslora=True),
    "dora-alpha2-r4": dict(rank=4, lora_alpha=2.0, use_dora=True),
}


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_trainer_written_files_load_in_diffusers_and_reproduce_the_trained_model(tiny, tmp_path, capture_trainer,
                                                                                 variant):
    from flatlora_diffusion.export import export_lora

    over = LORA_VARIANTS[variant]
    dora = bool(over.get("use_dora"))
    # DoRA on the text encoder: see test_dora_text_encoder_... below; here DoRA trains the UNet only
    out = run(tiny, tmp_path / "run", **over, train_text_encoder=not dora, learning_rate=2e-2, text_encoder_lr=2e-2,
              max_train_steps=3, save_precision="fp32", output_name="lora")
    trainer = capture_trainer[0]
    unet = trainer.acc.unwrap_model(trainer.components.unet).eval()
    te = trainer.acc.unwrap_model(trainer.components.text_encoders[0]).eval()
    parts = ("unet",) if dora else ("unet", "text_encoder")
    trained = _outputs(unet, te, trainer.components.tokenizers[0])
    base_pipe = _fresh_sd15(tiny)
    base = _outputs(base_pipe.unet, base_pipe.text_encoder, base_pipe.tokenizer)
    for part, t, b in zip(("unet", "text_encoder"), trained, base):
        if part in parts:
            assert (t - b).abs().max() > 1e-3, part  # the LoRA does something the comparison can see

    files = {"diffusers": out.path / "pytorch_lora_weights.safetensors", "kohya": out.path / "lora.safetensors"}
    loadable = dict(files)
    if dora:  # diffusers drops kohya dora_scale keys ("not compatible in Diffusers"): go through our converter
        loadable["kohya"] = export_lora(files["kohya"], tmp_path / "kohya-as-diffusers.safetensors",
                                        fmt="diffusers", dtype="fp32")
    for kind, path in loadable.items():
        pipe = _fresh_sd15(tiny, path)
        loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        for part, t, got in zip(("unet", "text_encoder"), trained, loaded):
            if part in parts:
                torch.testing.assert_close(got, t, rtol=1e-4, atol=1e-5, msg=lambda m: f"{kind} file, {part}: {m}")

    # kohya .alpha / rank is the scale peft trained with (rsLoRA: alpha / sqrt(r)), module by module
    kohya = load_file(files["kohya"])
    checked = 0
    for prefix, model in (("lora_unet_", unet), ("lora_te_", te)):
        for name, module in model.named_modules():
            if "default" not in getattr(module, "scaling", {}) or not hasattr(module, "lora_A"):
                continue
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name  # kohya spells CLIP's text_model level out (transformers 5 drops it)
            key = prefix + name.replace(".", "_")
            rank = kohya[key + ".lora_down.weight"].shape[0]
            assert rank == over["rank"]
            assert kohya[key + ".alpha"].item() / rank == pytest.approx(module.scaling["default"], rel=1e-6)
            expected_scale = over["lora_alpha"] / (rank ** 0.5 if over.get("use_rslora") else rank)
            assert module.scaling["default"] == pytest.approx(expected_scale, rel=1e-6)
            assert (key + ".dora_scale" in kohya) == dora
            checked += 1
    assert checked == sum(1 for k in kohya if k.endswith(".alpha")) > 0


def test_dora_text_encoder_diffusers_file_reproduces_the_trained_text_encoder(tiny, tmp_path, capture_trainer):
    run(tiny, tmp_path / "run", rank=4, lora_alpha=2.0, use_dora=True, train_text_encoder=True, learning_rate=2e-2,
        text_encoder_lr=2e-2, max_train_steps=2)
    trainer = capture_trainer[0]
    unet = trainer.acc.unwrap_model(trainer.components.unet).eval()
    te = trainer.acc.unwrap_model(trainer.components.text_encoders[0]).eval()
    trained = _outputs(unet, te, trainer.components.tokenizers[0])
    pipe = _fresh_sd15(tiny, tmp_path / "run" / "pytorch_lora_weights.safetensors")
    loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    torch.testing.assert_close(loaded[0], trained[0], rtol=1e-4, atol=1e-5)  # the UNet part loads fine
    torch.testing.assert_close(loaded[1], trained[1], rtol=1e-4, atol=1e-5)


# ==========================================================================================================
# 10. checkpoint rotation, resume by bare name
# ==========================================================================================================
def test_checkpoints_total_limit_keeps_the_two_newest_and_resume_by_bare_name(tiny, tmp_path, record_loss_calls):
    out = tmp_path / "run"
    common = dict(max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2, train_text_encoder=True)
    run(tiny, out, **common)
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert entries == ["checkpoint-3", "checkpoint-4"]  # 1, 2 rotated out; none at the final step 5
    for name in entries:
        assert (out / "checkpoints" / name / "training_state.json").is_file()
        assert json.loads((out / "checkpoints" / name / "training_state.json").read_text())["global_step"] == int(
            name.split("-")[1])
        assert {"lora_0.safetensors", "lora_1.safetensors"} <= {p.name for p in (out / "checkpoints" / name).iterdir()}
    full = lora_weights(out)
    full_losses = losses(out)

    # resume in the same run folder from the bare folder name, as diffusers' scripts accept
    (out / "pytorch_lora_weights.safetensors").unlink()
    record_loss_calls.clear()
    run(tiny, out, **common, resume_from_checkpoint="checkpoint-3")
    assert len(record_loss_calls) == 2  # steps 4 and 5 only: the state of step 3 was loaded, not retrained
    resumed = lora_weights(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    assert losses(out) == full_losses
    assert len(list((out / "checkpoints").iterdir())) <= 2


# ==========================================================================================================
# 11. the export command on a trainer-made run directory
# ==========================================================================================================
def test_export_command_on_a_run_directory(tiny, tmp_path, capsys):
    from flatlora_diffusion.cli import main

    out = run(tiny, tmp_path / "run", output_name="sks_toy", flat_sigma=0.05, train_text_encoder=True).path
    target = tmp_path / "exported" / "X.safetensors"
    target.parent.mkdir()
    assert main(["export", str(out), "--format", "kohya", "--output", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    md = file_metadata(target)
    assert md["ss_output_name"] == "sks_toy"  # the run's name, not the file's
    assert md["flatlora_sigma"] == "0.05"
    exported = load_file(target)
    written = load_file(out / "sks_toy.safetensors")  # what the trainer wrote itself (fp16 too)
    assert exported.keys() == written.keys()
    assert all(torch.equal(exported[k], written[k]) for k in written)
    assert any(k.startswith("lora_te_") for k in exported) and any(k.startswith("lora_unet_") for k in exported)

    before = (target.read_bytes(), target.stat().st_mtime_ns)
    assert main(["export", str(out), "--format", "kohya", "--output", str(target), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {target} already exists (use --overwrite to replace it)"]
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["X.safetensors"]  # no temporary file left
    assert main(["export", str(out), "--format", "kohya", "--output", str(target), "--overwrite"]) == 0


def test_export_of_an_up_to_date_run_says_so_and_succeeds(tiny, tmp_path, capsys):
    from flatlora_diffusion.cli import main

    out = run(tiny, tmp_path / "run", output_name="sks_toy").path
    kohya = out / "sks_toy.safetensors"
    before = (kohya.read_bytes(), kohya.stat().st_mtime_ns)
    capsys.readouterr()
    assert main(["export", str(out)]) == 0  # the trainer already wrote this very file
    assert capsys.readouterr().out.strip() == f"{kohya} is up to date (it holds these weights already); nothing written"
    assert (kohya.read_bytes(), kohya.stat().st_mtime_ns) == before


# ==========================================================================================================
# 12. kohya "N_token" folders
# ==========================================================================================================
def test_kohya_repeat_folders_repeat_and_caption(tiny, tmp_path, record_loss_calls, monkeypatch):
    data = tmp_path / "data"
    sub = data / "3_sks toy"
    make_subject_images(sub, n=2, size=64, seed=5)  # no captions, and no --instance_prompt below
    prompts = []
    original = train_module._Trainer._make_step_batch

    def make_step_batch(self, batch):
        prompts.extend(batch["prompts"])
        return original(self, batch)

    monkeypatch.setattr(train_module._Trainer, "_make_step_batch", make_step_batch)
    out = run(tiny, tmp_path / "run", instance_data_dir=str(data), instance_prompt=None, max_train_steps=None,
              num_train_epochs=1, output_name="reps").path
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["max_train_steps"] == 6  # 2 images x 3 repeats, batch 1: 6 steps in one epoch
    assert [m["epoch"] for m in metrics(out)] == [0] * 6
    assert prompts == ["sks toy"] * 6  # the folder's tokens are the caption
    assert len(record_loss_calls) == 6


def test_kohya_repeat_folders_in_the_kohya_file_metadata(tiny, tmp_path):
    data = tmp_path / "data"
    make_subject_images(data / "3_sks toy", n=2, size=64, seed=5)
    out = run(tiny, tmp_path / "run", instance_data_dir=str(data), instance_prompt=None, max_train_steps=1,
              output_name="reps").path
    md = file_metadata(out / "reps.safetensors")
    # as sd-scripts writes them: one entry per image folder, by folder name; images counted with repeats
    assert json.loads(md["ss_dataset_dirs"]) == {"3_sks toy": {"n_repeats": 3, "img_count": 2}}
    assert md["ss_num_train_images"] == "6"
    assert json.loads(md["ss_tag_frequency"]) == {"3_sks toy": {"sks toy": 2}}


# ==========================================================================================================
# 13. checkpoints hold a LoRA file: diffusers loads the folder, export converts it (issue 16, item 2)
# ==========================================================================================================
def test_a_checkpoint_folder_loads_in_diffusers_and_exports(tiny, tmp_path, capsys):
    from flatlora_diffusion.cli import main

    out = run(tiny, tmp_path / "run", output_name="sks_toy", train_text_encoder=True, learning_rate=2e-2,
              text_encoder_lr=2e-2, max_train_steps=4, checkpointing_steps=2).path
    checkpoint = out / "checkpoints" / "checkpoint-2"
    # the same two steps trained as a whole run (constant lr and sigma): the checkpoint's LoRA is that run's
    two = run(tiny, tmp_path / "two", output_name="sks_toy", train_text_encoder=True, learning_rate=2e-2,
              text_encoder_lr=2e-2, max_train_steps=2, checkpointing_steps=2).path
    in_checkpoint, two_steps = lora_weights(checkpoint), lora_weights(two)
    assert in_checkpoint.keys() == two_steps.keys()
    assert all(torch.equal(in_checkpoint[k], two_steps[k]) for k in two_steps)
    assert file_metadata(checkpoint / "pytorch_lora_weights.safetensors")["ss_steps"] == "2"

    base_pipe = _fresh_sd15(tiny)
    base = _outputs(base_pipe.unet, base_pipe.text_encoder, base_pipe.tokenizer)
    pipe = _fresh_sd15(tiny, checkpoint)  # load_lora_weights(<folder>), as diffusers users do
    loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    for part, b, got in zip(("unet", "text_encoder"), base, loaded):
        assert (got - b).abs().max() > 1e-3, part

    capsys.readouterr()
    assert main(["export", str(checkpoint)]) == 0
    kohya_file = out / "sks_toy-step00000002.safetensors"
    assert capsys.readouterr().out.strip() == str(kohya_file)
    kohya = load_file(kohya_file)
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    md = file_metadata(kohya_file)
    assert md["ss_steps"] == "2" and md["ss_output_name"] == "sks_toy" and "ss_training_finished_at" not in md
    assert main(["export", str(checkpoint), "--format", "diffusers", "--dtype", "fp32"]) == 0
    diffusers_file = out / "sks_toy-step00000002_diffusers.safetensors"
    exported = load_file(diffusers_file)
    assert exported.keys() == in_checkpoint.keys() and all(torch.equal(exported[k], in_checkpoint[k]) for k in exported)


# ==========================================================================================================
# 14. metadata says exactly what training did (issue 16, item 6)
# ==========================================================================================================
PROVENANCE = ("ss_", "modelspec.", "flatlora_")


def test_plain_lora_metadata_is_exactly_true_and_the_diffusers_file_carries_it_too(tiny, tmp_path):
    out = run(tiny, tmp_path / "run", output_name="plain", flat_sigma=0.0, lr_scheduler="constant",
              lr_warmup_steps=100).path
    kohya = file_metadata(out / "plain.safetensors")
    diffusers = file_metadata(out / "pytorch_lora_weights.safetensors")
    assert "Flat-LoRA" not in kohya["ss_training_comment"]
    assert {k: v for k, v in kohya.items() if k.startswith("flatlora_")} == {
        "flatlora_sigma": "0.0", "flatlora_version": kohya["flatlora_version"]}
    assert "ss_text_encoder_lr" not in kohya  # no text encoder was trained
    assert kohya["ss_lr_warmup_steps"] == "0"  # diffusers' "constant" schedule has no warm-up whatever the flag
    provenance = {k: v for k, v in kohya.items() if k.startswith(PROVENANCE)}
    assert {k: v for k, v in diffusers.items() if k.startswith(PROVENANCE)} == provenance
    assert diffusers["modelspec.trigger_phrase"] == "a photo of sks toy" and diffusers["ss_seed"] == "7"
    assert "lora_adapter_metadata" in diffusers


def test_flat_lora_metadata_lists_only_what_was_perturbed():
    from flatlora_diffusion.export import build_metadata

    base = {"flat_sigma": 0.1, "flat_schedule": "cosine", "flat_targets": ["unet", "text_encoder"],
            "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100, "text_encoder_lr": 5e-6}
    unet_only = build_metadata({**base, "train_text_encoder": False})
    assert unet_only["flatlora_targets"] == '["unet"]' and "ss_text_encoder_lr" not in unet_only
    assert "Flat-LoRA" in unet_only["ss_training_comment"] and unet_only["ss_lr_warmup_steps"] == "100"
    both = build_metadata({**base, "train_text_encoder": True})
    assert both["flatlora_targets"] == '["unet", "text_encoder"]' and both["ss_text_encoder_lr"] == "5e-06"
    nothing_perturbed = build_metadata({**base, "flat_targets": ["text_encoder"]})
    assert "Flat-LoRA" not in nothing_perturbed["ss_training_comment"]
    assert nothing_perturbed["flatlora_sigma"] == "0.0" and "flatlora_targets" not in nothing_perturbed


# ==========================================================================================================
# 15. an upload that fails after training is one line; the run stays completed (issue 16, item 4)
# ==========================================================================================================
def test_a_failed_upload_is_one_line_and_the_run_stays_completed(tiny, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setattr(train_module, "_check_hub", lambda cfg: None)  # the checks before training: test_cli_errors

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(a long traceback-like tail)")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_network)
    out = run(tiny, tmp_path / "run", push_to_hub=True, hub_model_id="me/sks-toy").path
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed"
    assert status["message"] == "done; the upload to the hub failed: Failed to resolve 'huggingface.co'"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "upload to the hub failed" in errors[0]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
