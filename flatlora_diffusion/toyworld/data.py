"""Picture folders for a DreamBooth run in the toy world: the subject's instance images, held-out pictures of
the subject (for a generalization gap), and class pictures (plain toys) for prior preservation.

Every folder is a deterministic function of its seed; the instance images show the subject on the plain
background only, so that every other scene in a prompt is a scene the subject was never seen in.
"""

from __future__ import annotations

import random
from pathlib import Path

from .render import render
from .world import SCENES, random_class_toy, random_scene, subject_scene

INSTANCE_SCENE = "plain"
# Scenes the instance images never show: where recontextualization is measured.
NEW_SCENES = tuple(s for s in SCENES if s != INSTANCE_SCENE)


def _write(folder: Path, scenes, prefix: str, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        path = folder / f"{prefix}_{i:03d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        render(scene, size).save(tmp, format="PNG")
        tmp.replace(path)
        paths.append(path)
    return paths


def write_instance_images(folder, n: int = 5, seed: int = 0, size: int = 64) -> list[Path]:
    """n pictures of the subject on the plain background, at different sizes and places."""
    rng = random.Random(f"instance:{seed}")
    return _write(Path(folder), [subject_scene(rng, INSTANCE_SCENE) for _ in range(n)], "sks", size)


def write_heldout_subject_images(folder, n: int = 8, seed: int = 0, size: int = 64) -> list[Path]:
    """n other pictures of the subject, same background as the instance images (a held-out set of the same
    distribution: the generalization gap is the loss on these minus the loss on the instance images)."""
    rng = random.Random(f"heldout:{seed}")
    return _write(Path(folder), [subject_scene(rng, INSTANCE_SCENE) for _ in range(n)], "heldout", size)


def write_class_images(folder, n: int = 20, seed: int = 0, size: int = 64, varied: bool = False) -> list[Path]:
    """n toys on the plain background: the class "toy" as the world draws it (varied: the class's own variety of
    colours, patterns and eyes; else plain toys of the vocabulary's colours)."""
    rng = random.Random(f"class:{seed}")
    if varied:
        scenes = [random_class_toy(rng, scene=INSTANCE_SCENE) for _ in range(n)]
    else:
        scenes = [random_scene(rng, held_out=None, shape="toy", pattern="plain", scene=INSTANCE_SCENE) for _ in range(n)]
    return _write(Path(folder), scenes, "toy", size)
