"""The judge: a small image classifier that reads a toy-world picture's attributes.

It answers, for any 64 px RGB image (a render, a validation sample, a generated picture): which shape,
which colour, which pattern, which scene, and so whether the DreamBooth subject is in it (a green striped toy:
world.has_subject_look). Trained on renders (pretrain.py) with noise, blur and VAE round-trips so that it reads
generated pictures too; shipped as package data next to the base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .world import COLOURS, PATTERNS, SCENES, SHAPES, has_subject_look

HEADS = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS, "scene": SCENES}
JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"


class Judge(nn.Module):
    """Five strided conv stages, global pooling, one linear head per attribute."""

    def __init__(self, width: int = 48):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(chans[-1], len(values)) for name, values in HEADS.items()})
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, 64, 64) in [-1, 1]. Returns logits per head."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Verdict:
    shape: str
    colour: str
    pattern: str
    scene: str

    @property
    def subject(self) -> bool:
        """The subject is read as its look, the judge has no head of its own for it."""
        return has_subject_look(self)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (any size, any mode) -> (B, 3, 64, 64) float tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image

    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (64, 64):
            im = im.resize((64, 64), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8))
    return to_model_range(torch.from_numpy(np.stack(arrays)))


def to_model_range(pixels_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) pixels -> (B, 3, H, W) float in [-1, 1], the range the judge and the VAE read."""
    return pixels_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_judge(judge: Judge, folder: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in judge.state_dict().items()},
              str(folder / JUDGE_WEIGHTS))
    config = {"width": judge.width, "heads": {k: list(v) for k, v in HEADS.items()}, **(extra or {})}
    (folder / JUDGE_CONFIG).write_text(json.dumps(config, indent=1) + "\n")


def load_judge(folder: Path | None = None) -> Judge:
    """The shipped judge (or the one saved in `folder`), in fp32 eval mode on the CPU."""
    from safetensors.torch import load_file

    from . import judge_dir

    folder = Path(folder) if folder is not None else judge_dir()
    config = json.loads((folder / JUDGE_CONFIG).read_text())
    if config["heads"] != {k: list(v) for k, v in HEADS.items()}:
        raise ValueError(f"{folder} holds a judge for another vocabulary")
    judge = Judge(width=config["width"])
    # The shipped judge's file also holds a subject logit ("subject.*"), trained for an earlier subject that no
    # vocabulary word described; it is not read since the subject became a vocabulary look (world.py).
    weights = {k: v.float() for k, v in load_file(str(folder / JUDGE_WEIGHTS)).items() if not k.startswith("subject.")}
    judge.load_state_dict(weights)
    return judge.eval()


@torch.no_grad()
def judge_images(images, judge: Judge | None = None, batch_size: int = 64) -> list[Verdict]:
    """What the judge reads in each image."""
    judge = judge or load_judge()
    verdicts: list[Verdict] = []
    images = list(images)
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size])
        out = judge(x)
        picks = {name: out[name].argmax(1).tolist() for name in HEADS}
        for i in range(x.shape[0]):
            verdicts.append(Verdict(**{name: HEADS[name][picks[name][i]] for name in HEADS}))
    return verdicts
