"""Pretrain the toy world from nothing: the VAE, then the text encoder and UNet, then the judge.

    python -m flatlora_diffusion.toyworld.pretrain --out DIR [--device cuda] [--config FILE.json]

writes DIR/model (a StableDiffusionPipeline folder, fp16 weights), DIR/judge (judge.safetensors +
judge.json) and DIR/pretrain.json (the config, the seed, steps done, timings and every weight file's
sha256). The shipped weights (flatlora_diffusion/toyworld/{model,judge,pretrain.json}) came from this
command with the defaults below, on one H100 in 7 minutes (torch 2.11, CUDA 13). GPU kernels are not
bitwise deterministic, so a rerun gives an equally good model, not the same bytes; the recorded sha256 say
which bytes ship.

No subject picture is ever shown to the base model (no green toy at all: a held-out pair); the judge's data
has the subject's look among its toys.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .architecture import Architecture, build_scheduler, build_text_encoder, build_tokenizer, build_unet, build_vae
from .judge import HEADS, Judge, save_judge, to_model_range
from .render import render, render_variety
from .world import SCENES, caption, random_class_toy, random_scene, subject_scene


@dataclass
class PretrainConfig:
    seed: int = 0
    images: int = 60_000  # pretraining pictures (rendered once, captions redrawn every time one is used)
    caption_variants: int = 4
    vae_steps: int = 2500
    vae_batch: int = 256
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # This fraction of the VAE's pictures are render_variety pictures (any colours, patterns and scales, big or
    # small eyes), so that it encodes what the base model never draws, a new subject, as SD's VAE encodes any
    # photo. The base model never sees them.
    vae_variety: float = 0.0
    # Weight of an L1 loss on the pictures' horizontal and vertical pixel differences. A toy's eyes and ears are
    # 2-4 pixels, almost nothing in a per-pixel loss: a VAE trained on that alone smooths them away.
    vae_edge_weight: float = 0.0
    unet_steps: int = 2000
    unet_batch: int = 1024
    unet_lr: float = 6e-4
    unet_warmup: int = 300
    caption_dropout: float = 0.1  # so that classifier-free guidance has an unconditional model
    # Fraction of the base model's (and the judge's) pictures that are toys of the class's own variety
    # (world.random_class_toy: any colour, unnamed; big or small eyes), so that "a toy" is a family the subject
    # belongs to. 0: the shipped world's first design, toys only in the six vocabulary colours.
    class_variety: float = 0.0
    ema_decay: float = 0.999
    # Per phase ("vae", "unet", "judge"): shorten the phase to fit this many minutes (the steps done are recorded).
    minutes: dict = field(default_factory=dict)
    judge_images: int = 30_000
    judge_subject_fraction: float = 0.2
    judge_steps: int = 700
    judge_batch: int = 256
    judge_lr: float = 2e-3
    workers: int = 0  # render processes (0: all cores)
    architecture: dict = field(default_factory=lambda: Architecture().to_dict())


# --------------------------------------------------------------------------------------------------- data


def _render_chunk(args):
    seed, start, count, subject_fraction, class_variety = args
    scenes, pixels = [], []
    for i in range(start, start + count):
        rng = random.Random(f"{seed}:{i}")
        if class_variety and rng.random() < class_variety:  # (no draw at 0: the first design's scenes stay)
            scene = random_class_toy(rng)
        elif subject_fraction == 0:  # the base model's data: pretraining pairs only, never the subject
            scene = random_scene(rng, held_out=False)
        elif rng.random() < subject_fraction:
            scene = subject_scene(rng, rng.choice(SCENES))
        else:  # the judge's data: every combination, so that it reads held-out prompts' pictures too
            scene = random_scene(rng, held_out=None)
        scenes.append(scene)
        pixels.append(np.asarray(render(scene), dtype=np.uint8))
    return scenes, np.stack(pixels)


def render_dataset(seed: int, n: int, workers: int, subject_fraction: float = 0.0, class_variety: float = 0.0):
    """n pictures of seed `seed` (scene i depends only on (seed, i)), as scenes and a uint8 (n, 64, 64, 3) array.

    subject_fraction 0: the base model's data (pretraining pairs, no subject); > 0: the judge's data."""
    chunk = 2000
    jobs = [(seed, s, min(chunk, n - s), subject_fraction, class_variety) for s in range(0, n, chunk)]
    if workers == 1 or len(jobs) == 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers or None) as pool:
            parts = pool.map(_render_chunk, jobs)
    scenes = [s for part in parts for s in part[0]]
    return scenes, np.concatenate([p[1] for p in parts])


def _variety_chunk(args):
    seed, start, count = args
    return np.stack([np.asarray(render_variety(random.Random(f"variety:{seed}:{i}")), dtype=np.uint8)
                     for i in range(start, start + count)])


def render_variety_dataset(seed: int, n: int, workers: int = 0) -> np.ndarray:
    """n render_variety pictures of seed `seed` (picture i depends only on (seed, i)), uint8 (n, 64, 64, 3)."""
    import multiprocessing as mp

    jobs = [(seed, s, min(2000, n - s)) for s in range(0, n, 2000)]
    if workers == 1 or len(jobs) == 1:
        return np.concatenate([_variety_chunk(j) for j in jobs])
    with mp.get_context("fork").Pool(workers or None) as pool:
        return np.concatenate(pool.map(_variety_chunk, jobs))


# --------------------------------------------------------------------------------------------------- phases


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Budget:
    """Fits a phase's whole learning-rate schedule into a time budget: it measures the rate over steps 20-70
    and shortens the phase to what fits. The steps done are recorded, so `--set X_steps=N` (and no minutes)
    repeats a run without a clock. minutes 0: no budget, the configured steps."""

    # The first steps carry cuDNN autotuning and allocator warm-up: a rate measured from step 0 came out 4x
    # too slow on the H100 (3.2 steps/s planned, 13 run), which cut a VAE to a fifth of its steps.
    WARM, MEASURED = 20, 50

    def __init__(self, name: str, steps: int, minutes: float):
        self.name, self.total, self.minutes, self.started = name, steps, minutes, time.time()
        self.warm_at = self.started

    def check(self, step: int) -> int:
        if self.minutes and step == self.WARM:
            self.warm_at = time.time()
        if self.minutes and step == self.WARM + self.MEASURED:
            now = time.time()
            rate = self.MEASURED / (now - self.warm_at)
            left = self.minutes * 60 - (now - self.started)
            self.total = max(100, min(self.total, step + int(rate * left)))
            _log(f"{self.name}: {rate:.1f} steps/s, planning {self.total} steps")
        return self.total


def _edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance of the two pictures' horizontal and vertical pixel differences."""
    return (F.l1_loss(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :])
            + F.l1_loss(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]))


def train_vae(cfg: PretrainConfig, pixels: torch.Tensor, device, gen: torch.Generator):
    arch = Architecture(**cfg.architecture)
    if cfg.vae_variety > 0:
        extra = round(pixels.shape[0] * cfg.vae_variety / (1 - cfg.vae_variety))
        pixels = torch.cat([pixels, torch.from_numpy(render_variety_dataset(cfg.seed + 7, extra, cfg.workers))])
    vae = build_vae(arch).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    budget, step = _Budget("vae", cfg.vae_steps, cfg.minutes.get("vae", 0)), 0
    while step < budget.check(step):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, budget.total, 200, cfg.vae_lr)
        idx = torch.randint(0, pixels.shape[0], (cfg.vae_batch,), generator=gen)
        x = to_model_range(pixels[idx].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
            recon = vae.decode(z).sample
        loss = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x) \
            + cfg.vae_kl_weight * posterior.kl().mean()
        if cfg.vae_edge_weight:
            loss = loss + cfg.vae_edge_weight * _edge_l1(recon.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == budget.total - 1:
            _log(f"vae {step}/{budget.total} loss {loss.item():.4f}")
        step += 1
    return vae.eval(), step


def train_scaled_vae(cfg: PretrainConfig, pixels: torch.Tensor, device, gen: torch.Generator):
    """train_vae, then the latent scale that gives the pretraining pictures' latents unit std (SD's
    scaling_factor): (vae, steps done, latent means, latent stds), latents unscaled."""
    vae, steps = train_vae(cfg, pixels, device, gen)
    means, stds = encode_latents(vae, pixels, device)
    vae.register_to_config(scaling_factor=1.0 / means.std().item())
    return vae, steps, means, stds


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device, batch: int = 1024):
    means, stds = [], []
    for s in range(0, pixels.shape[0], batch):
        d = vae.encode(to_model_range(pixels[s:s + batch].to(device))).latent_dist
        means.append(d.mean.float())
        stds.append(d.std.float())
    return torch.cat(means), torch.cat(stds)


def caption_ids(cfg: PretrainConfig, scenes, tokenizer, seed: int) -> torch.Tensor:
    """(n, variants, 77) token ids: each picture's captions in several wordings (template, colour said or not)."""
    rng = random.Random(f"captions:{seed}")
    texts = [caption(s, rng) for s in scenes for _ in range(cfg.caption_variants)]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.view(len(scenes), cfg.caption_variants, -1)


class _EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_unet(cfg: PretrainConfig, latents, latent_std, ids, empty_ids, tokenizer, device, gen: torch.Generator,
               start=None):
    """Train a UNet and text encoder, new ones or `start` = (unet, text_encoder) further (a fine-tune)."""
    arch = Architecture(**cfg.architecture)
    unet, text_encoder = start or (build_unet(arch), build_text_encoder(arch, tokenizer))
    unet, text_encoder = unet.to(device, torch.float32).train(), text_encoder.to(device, torch.float32).train()
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = _EMA([unet, text_encoder], cfg.ema_decay)
    latents, latent_std, ids, empty_ids = latents.to(device), latent_std.to(device), ids.to(device), empty_ids.to(device)
    started, step = time.time(), 0
    budget = _Budget("unet", cfg.unet_steps, cfg.minutes.get("unet", 0))
    while step < budget.check(step):
        total = budget.total
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, total, cfg.unet_warmup, cfg.unet_lr)
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch,), generator=gen).to(device)
        variant = torch.randint(0, ids.shape[1], (cfg.unet_batch,), generator=gen).to(device)
        drop = (torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout).to(device)
        tokens = torch.where(drop[:, None], empty_ids[None, :], ids[idx, variant])
        eps_z = torch.randn((cfg.unet_batch, *latents.shape[1:]), generator=gen).to(device)
        x0 = latents[idx] + latent_std[idx] * eps_z
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = text_encoder(tokens)[0]
            pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if step % 500 == 0 or step == total - 1:
            _log(f"unet {step}/{total} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
        step += 1
    ema.copy_to_model()
    return unet.eval(), text_encoder.eval(), step


def train_captioned_unet(cfg: PretrainConfig, scenes, latents, latent_std, tokenizer, device, gen: torch.Generator,
                         start=None):
    """train_unet on the scenes' captions (several wordings each) and the empty prompt for caption dropout."""
    ids = caption_ids(cfg, scenes, tokenizer, cfg.seed)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids[0]
    return train_unet(cfg, latents, latent_std, ids, empty_ids, tokenizer, device, gen, start)


def _augment(x: torch.Tensor, gen: torch.Generator, vae=None) -> torch.Tensor:
    """Make renders look like generated pictures: VAE round-trips, blur, noise, small colour shifts."""
    b = x.shape[0]
    dev = x.device
    if vae is not None:
        pick = (torch.rand(b, generator=gen) < 0.5).to(dev)
        with torch.no_grad():
            d = vae.encode(x[pick]).latent_dist
            x = x.clone()
            x[pick] = vae.decode(d.mean).sample.clamp(-1, 1).float()
    blur = (torch.rand(b, generator=gen) < 0.3).to(dev)
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0], device=dev)
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    shift = (torch.rand((b, 3, 1, 1), generator=gen) - 0.5).to(dev) * 0.12
    sigma = torch.rand((b, 1, 1, 1), generator=gen).to(dev) * 0.08
    return (x + shift + sigma * torch.randn(x.shape, generator=gen).to(dev)).clamp(-1, 1)


def judge_labels(scenes) -> dict[str, torch.Tensor]:
    """Targets per head; -100 (ignored) for the colour of the class's varied toys, which is none of the
    vocabulary's. The subject is labelled as what it looks like (a green striped toy)."""
    return {name: torch.tensor([-100 if (s.paint is not None and name == "colour") else values.index(getattr(s, name))
                                for s in scenes])
            for name, values in HEADS.items()}


def train_judge(cfg: PretrainConfig, scenes, pixels: torch.Tensor, device, gen: torch.Generator, vae=None):
    judge = Judge().to(device).train()
    labels = {k: v.to(device) for k, v in judge_labels(scenes).items()}
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.judge_lr, weight_decay=1e-4)
    budget, step = _Budget("judge", cfg.judge_steps, cfg.minutes.get("judge", 0)), 0
    while step < budget.check(step):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, budget.total, 100, cfg.judge_lr)
        idx = torch.randint(0, pixels.shape[0], (cfg.judge_batch,), generator=gen)
        x = _augment(to_model_range(pixels[idx].to(device)), gen, vae)
        if torch.rand(1, generator=gen).item() < 0.5:  # mirror images are the same scene
            x = x.flip(3)
        out = judge(x)
        idx_d = idx.to(device)
        loss = sum(F.cross_entropy(out[n], labels[n][idx_d], ignore_index=-100) for n in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == budget.total - 1:
            _log(f"judge {step}/{budget.total} loss {loss.item():.4f}")
        step += 1
    return judge.eval(), step


# --------------------------------------------------------------------------------------------------- output


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    for module in (vae, unet, text_encoder):  # fp16 on disk (half the size); loaders upcast to what they ask for
        module.to("cpu", torch.float16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # Keep CLIP's vocab.json / merges.txt as the tokenizer builder wrote them, and no load-time keys.
    for name in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / name).write_bytes((tokenizer_dir / name).read_bytes())
    config_file = out / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _seeded_device(cfg: PretrainConfig, device: str):
    """(torch device, data generator) for a pretraining phase or stage: seeded by cfg.seed, TF32 matmuls and
    cuDNN autotuning on a GPU (the stages redo phases of the first pretraining, with its settings)."""
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev, torch.Generator().manual_seed(cfg.seed)


def pretrain(cfg: PretrainConfig, out: Path, device: str = "cpu") -> dict:
    dev, gen = _seeded_device(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.time()
    scenes, pixels_np = render_dataset(cfg.seed, cfg.images, cfg.workers, class_variety=cfg.class_variety)
    pixels = torch.from_numpy(pixels_np)
    timings["render_s"] = round(time.time() - t0, 1)
    _log(f"rendered {len(scenes)} pictures in {timings['render_s']} s")

    t0 = time.time()
    vae, vae_steps, means, stds = train_scaled_vae(cfg, pixels, dev, gen)
    scaling = vae.config.scaling_factor
    timings["vae_s"] = round(time.time() - t0, 1)
    _log(f"vae done, scaling_factor {scaling:.4f}")

    tokenizer_dir = out / "_tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    t0 = time.time()
    unet, text_encoder, unet_steps = train_captioned_unet(cfg, scenes, means * scaling, stds * scaling, tokenizer, dev, gen)
    timings["unet_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    judge_scenes, judge_pixels = render_dataset(cfg.seed + 1, cfg.judge_images, cfg.workers, cfg.judge_subject_fraction,
                                                cfg.class_variety)
    judge, judge_steps = train_judge(cfg, judge_scenes, torch.from_numpy(judge_pixels), dev, gen, vae=vae)
    timings["judge_s"] = round(time.time() - t0, 1)

    model_dir, judge_dir = out / "model", out / "judge"
    save_pipeline(model_dir, vae.float(), unet.float(), text_encoder.float(), tokenizer_dir)
    save_judge(judge.float().cpu(), judge_dir)
    import shutil

    shutil.rmtree(tokenizer_dir)
    record = {"config": asdict(cfg), "device": device, "steps_done": {"vae": vae_steps, "unet": unet_steps, "judge": judge_steps}, "timings": timings,
              "torch": torch.__version__, "sha256": {}}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors",)):
        record["sha256"][str(path.relative_to(out))] = sha256(path)
    (out / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def append_stage(folder: Path, stage: dict, weights: list[str]) -> None:
    """Record a later stage and the new sha256 of the weight files it rewrote in folder/pretrain.json."""
    record_file = folder / "pretrain.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    record.setdefault("stages", []).append(stage)
    for name in weights:
        record.setdefault("sha256", {})[name] = sha256(folder / name)
    record_file.write_text(json.dumps(record, indent=1) + "\n")


def retrain_vae(folder: Path, cfg: PretrainConfig, device: str) -> dict:
    """Train the VAE of a world folder again from nothing (the configured architecture, variety and edge loss)
    and record how well it keeps a toy's eyes. Its latent space is new: train the UNet again on it
    afterwards (--retrain-unet with the same settings)."""
    from .measure import vae_round_trip

    dev, gen = _seeded_device(cfg, device)
    started = time.time()
    _, pixels_np = render_dataset(cfg.seed, cfg.images, cfg.workers, class_variety=cfg.class_variety)
    vae, steps, _, _ = train_scaled_vae(cfg, torch.from_numpy(pixels_np), dev, gen)
    fidelity = vae_round_trip(vae, device=dev)
    vae.to("cpu", torch.float16).save_pretrained(folder / "model" / "vae", safe_serialization=True)
    stage = {"command": "python -m flatlora_diffusion.toyworld.pretrain --retrain-vae", "device": device,
             "config": {k: getattr(cfg, k) for k in ("seed", "images", "vae_steps", "vae_batch", "vae_lr",
                                                     "vae_kl_weight", "vae_variety", "vae_edge_weight",
                                                     "class_variety", "architecture")},
             "steps_done": steps, "round_trip": fidelity, "seconds": round(time.time() - started, 1),
             "torch": torch.__version__}
    append_stage(folder, stage, ["model/vae/diffusion_pytorch_model.safetensors"])
    return stage


def retrain_unet(folder: Path, cfg: PretrainConfig, device: str, finetune: bool = False) -> dict:
    """Train the UNet and text encoder of a world folder again, on the latents of its (final) VAE; the VAE,
    tokenizer and judge stay. From nothing with the configured architecture (when the UNet's architecture changes:
    the VAE's latent space and the judge do not depend on it), or with `finetune` further from the folder's own
    weights on the configured data: a change of the world's pictures (class_variety) without a GPU (400 steps at
    batch 64: half an hour on two busy CPU cores)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev, gen = _seeded_device(cfg, device)
    model_dir = folder / "model"
    started = time.time()
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae"), dtype=torch.float32).to(dev).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    scenes, pixels_np = render_dataset(cfg.seed, cfg.images, cfg.workers, class_variety=cfg.class_variety)
    means, stds = encode_latents(vae, torch.from_numpy(pixels_np), dev)
    scaling = vae.config.scaling_factor  # the latent space the shipped VAE defines: unchanged
    start = None
    if finetune:
        start = (UNet2DConditionModel.from_pretrained(str(model_dir / "unet"), dtype=torch.float32),
                 CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"), dtype=torch.float32))
    unet, text_encoder, steps = train_captioned_unet(cfg, scenes, means * scaling, stds * scaling, tokenizer, dev, gen,
                                                     start)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        module.to("cpu", torch.float16).save_pretrained(model_dir / name, safe_serialization=True)
    command = "--finetune-unet" if finetune else "--retrain-unet"
    stage = {"command": f"python -m flatlora_diffusion.toyworld.pretrain {command}", "device": device,
             "config": {k: getattr(cfg, k) for k in ("seed", "images", "caption_variants", "unet_steps", "unet_batch",
                                                     "unet_lr", "unet_warmup", "caption_dropout", "ema_decay",
                                                     "class_variety", "architecture")},
             "steps_done": steps, "seconds": round(time.time() - started, 1), "torch": torch.__version__}
    append_stage(folder, stage, ["model/unet/diffusion_pytorch_model.safetensors",
                                  "model/text_encoder/model.safetensors"])
    return stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flatlora_diffusion.toyworld.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Folder for model/, judge/ and pretrain.json.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", help="JSON file of PretrainConfig fields (others keep their defaults).")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override single config fields.")
    p.add_argument("--retrain-unet", action="store_true",
                   help="Only train the UNet and text encoder in --out again (its VAE, tokenizer and judge stay).")
    p.add_argument("--finetune-unet", action="store_true",
                   help="Only train the UNet and text encoder in --out further (e.g. on another class_variety).")
    p.add_argument("--retrain-vae", action="store_true",
                   help="Only train the VAE in --out again (then --retrain-unet: the latent space is new).")
    args = p.parse_args(argv)
    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = json.loads(value)
    unknown = set(fields) - set(PretrainConfig.__dataclass_fields__)
    if unknown:
        print(f"error: unknown pretraining setting(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.retrain_vae:
        print(json.dumps(retrain_vae(Path(args.out), PretrainConfig(**fields), args.device)))
        return 0
    if args.retrain_unet or args.finetune_unet:
        print(json.dumps(retrain_unet(Path(args.out), PretrainConfig(**fields), args.device, args.finetune_unet)))
        return 0
    record = pretrain(PretrainConfig(**fields), Path(args.out), args.device)
    print(json.dumps({k: record[k] for k in ("steps_done", "timings")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
