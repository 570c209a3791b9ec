"""Second pretraining stage: make the toy world's VAE a general encoder without moving its latent space.

    python -m flatlora_diffusion.toyworld.generalize_vae --model DIR [--steps N] [--device cuda] [--save-every N --copy-to DIR]

Why: the first stage trained the VAE on the vocabulary's pictures only, so it could not encode colours and
patterns it never saw — the subject's teal-and-orange chequers came back as green mush, and no LoRA can learn
what the VAE cannot represent. Here the VAE also learns `render_variety` pictures (random colours, patterns
and scales, never the subject itself), while its encoder keeps giving the vocabulary's pictures the latents
the UNet was trained on (a distillation term against the stage-1 encoder). The UNet and text encoder are
untouched. The stage's settings and the new weights' sha256 are appended to the pretrain.json beside DIR.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .judge import to_model_range
from .pretrain import _cosine_lr, _log, append_stage, render_dataset, render_variety_dataset


@dataclass
class GeneralizeConfig:
    seed: int = 2
    vocabulary_images: int = 20_000
    variety_images: int = 20_000
    steps: int = 2000
    batch: int = 256  # half vocabulary pictures, half variety pictures
    lr: float = 3e-4
    latent_weight: float = 1.0  # keep the vocabulary's (scaled) latents where the UNet knows them


def generalize(vae, cfg: GeneralizeConfig, device, on_checkpoint=None):
    gen = torch.Generator().manual_seed(cfg.seed)
    _, vocab_np = render_dataset(cfg.seed, cfg.vocabulary_images, 0)
    vocab, variety = torch.from_numpy(vocab_np), torch.from_numpy(render_variety_dataset(cfg.seed, cfg.variety_images))
    scale = vae.config.scaling_factor
    teacher = copy.deepcopy(vae).to(device).eval().requires_grad_(False)
    vae = vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    half = cfg.batch // 2
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.steps, 100, cfg.lr)
        xv = to_model_range(vocab[torch.randint(0, vocab.shape[0], (half,), generator=gen)].to(device))
        xn = to_model_range(variety[torch.randint(0, variety.shape[0], (half,), generator=gen)].to(device))
        x = torch.cat([xv, xn])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mean).sample
            with torch.no_grad():
                target = teacher.encode(xv).latent_dist.mean
        recon_loss = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x)
        latent_loss = F.mse_loss(posterior.mean[:half].float() * scale, target.float() * scale)
        loss = recon_loss + cfg.latent_weight * latent_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            _log(f"generalize vae {step}/{cfg.steps} recon {recon_loss.item():.4f} latent {latent_loss.item():.5f}")
        if on_checkpoint and (step + 1) % 500 == 0:
            on_checkpoint(vae, step + 1)
    return vae.eval()


def _save(vae, folder: Path) -> None:
    shipped = copy.deepcopy(vae).to("cpu", torch.float16)
    shipped.save_pretrained(folder, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL

    p = argparse.ArgumentParser(prog="python -m flatlora_diffusion.toyworld.generalize_vae", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="The stage-1 pipeline folder (its vae/ is replaced).")
    p.add_argument("--steps", type=int, default=GeneralizeConfig.steps)
    p.add_argument("--images", type=int, default=GeneralizeConfig.variety_images, help="Pictures of each kind.")
    p.add_argument("--batch", type=int, default=GeneralizeConfig.batch)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--copy-to", help="Also save the VAE here every 500 steps (a folder that outlives a killed run).")
    args = p.parse_args(argv)
    model = Path(args.model)
    cfg = GeneralizeConfig(steps=args.steps, vocabulary_images=args.images, variety_images=args.images, batch=args.batch)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    vae = AutoencoderKL.from_pretrained(str(model / "vae"), dtype=torch.float32)
    started = time.time()

    def checkpoint(v, step):
        if args.copy_to:
            _save(v, Path(args.copy_to) / f"vae-{step}")

    vae = generalize(vae, cfg, dev, checkpoint)
    _save(vae, model / "vae")
    stage = {"command": "python -m flatlora_diffusion.toyworld.generalize_vae", "config": asdict(cfg),
             "device": args.device, "seconds": round(time.time() - started, 1), "torch": torch.__version__}
    append_stage(model.parent, stage, [f"{model.name}/vae/diffusion_pytorch_model.safetensors"])
    print(json.dumps(stage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
