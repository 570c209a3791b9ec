"""Toy-world image scores of a run, read by the toy world's judge: added by `evaluate` without any flag when
the run's base model is the toy world.

Why not an images.py scorer plug-in: a plug-in scores the run's own validation prompts, while these scores
need prompts of their own (the subject in every scene, the class prompt) and the *base model's* pictures of
the class prompt with the same seeds (the colour shift is a difference between two models).

Every picture is made the way every toy-world score is made (measure.SAMPLE_STEPS, measure.GUIDANCE, 64 px,
one CPU generator per picture), with the seeds given (`--seeds`), so two runs see the same starting noise.

The scores (image_scores keys; rates in [0, 1], averaged over prompts and seeds within the run):
    subject               "a photo of sks toy" in the instance scene: the judge sees the subject
    scene / subject_scene the judge reads the plain scene / both at once
    subject_new           "a photo of sks toy <phrase>" for each of NEW_SCENES (scenes the instance images
    scene_new              never show: the distribution-shift split): subject seen, scene read, both
    subject_scene_new
    class_collapse        "a photo of a toy" judged to be the subject (prior preservation lost: lower is better)
    class_toy             "a photo of a toy" judged a toy at all
    class_colour_tv       total-variation distance between the colour histograms of the class prompt's pictures
                          with the run's LoRA and with the base model, same seeds (0: the class kept its colours;
                          a picture judged the subject counts as a category of its own, "subject")
    diversity_subject     mean pairwise pixel distance between pictures of one prompt (mean |a - b| per pixel
    diversity_class       and channel, in [0, 1]), averaged over the subject prompts / for the class prompt.
                          Chosen over distinct-verdict counts because it sees position and size, which the
                          judge does not report, and it needs no judge at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..toyworld.data import INSTANCE_SCENE, NEW_SCENES
from ..toyworld.world import COLOURS, CLASS_PROMPT, scene_prompt

SUBJECT_CATEGORY = "subject"  # the colour histogram's extra bin: a class picture judged to be the subject
CLASS_CATEGORIES = (*COLOURS, SUBJECT_CATEGORY)
SCORE_NAMES = ("subject", "scene", "subject_scene", "subject_new", "scene_new", "subject_scene_new",
               "class_collapse", "class_toy", "class_colour_tv", "diversity_subject", "diversity_class")


def is_toyworld(run) -> bool:
    """The run's base model is the shipped toy world (named `toyworld`, or its folder given as a path)."""
    from ..toyworld import MODEL_NAME, model_dir

    name = str(run.config.get("pretrained_model_name_or_path") or "")
    if name == MODEL_NAME:
        return True
    try:
        return Path(name).expanduser().resolve() == model_dir().resolve()
    except OSError:
        return False


# --- pure functions of verdicts and pictures (what the tests pin down) ----------------------------------------
def _rate(flags) -> float:
    flags = list(flags)
    return float(sum(bool(f) for f in flags) / len(flags)) if flags else float("nan")


def prompt_scores(verdicts: Sequence, wanted_scenes: Sequence[str]) -> dict[str, float]:
    """Subject seen, scene read, and both, over pictures each asked for the subject in wanted_scenes[i]."""
    pairs = list(zip(verdicts, wanted_scenes))
    return {"subject": _rate(v.subject for v, _ in pairs),
            "scene": _rate(v.scene == w for v, w in pairs),
            "subject_scene": _rate(v.subject and v.scene == w for v, w in pairs)}


def class_category(verdict) -> str:
    return SUBJECT_CATEGORY if verdict.subject else verdict.colour


def colour_histogram(verdicts: Sequence) -> dict[str, float]:
    """Fractions of the class prompt's pictures per colour (and the subject bin); sums to 1."""
    counts = Counter(class_category(v) for v in verdicts)
    return {c: counts[c] / len(verdicts) for c in CLASS_CATEGORIES}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """½ Σ |p - q| over the union of categories: 0 for equal histograms, 1 for disjoint ones."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def class_scores(run_verdicts: Sequence, base_verdicts: Sequence) -> dict[str, float]:
    """Prior preservation of the class prompt: collapse onto the subject, toys at all, colour shift from the base."""
    return {"class_collapse": _rate(v.subject for v in run_verdicts),
            "class_toy": _rate(v.shape == "toy" for v in run_verdicts),
            "class_colour_tv": total_variation(colour_histogram(run_verdicts), colour_histogram(base_verdicts))}


def pixel_diversity(images: Sequence) -> float:
    """Mean over pairs of pictures of the mean absolute pixel difference, scaled to [0, 1]; nan for < 2."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images]
    pairs = list(combinations(arrays, 2))
    if not pairs:
        return float("nan")
    return float(np.mean([np.abs(a - b).mean() for a, b in pairs]))


# --- generation and judging ---------------------------------------------------------------------------------
@dataclass
class ToyPrompts:
    """What is generated per run: the subject prompt in each scene, then the class prompt, seed-minor."""

    seeds: list[int]
    scenes: tuple[str, ...] = (INSTANCE_SCENE, *NEW_SCENES)

    def subject_prompts(self) -> list[str]:
        return [scene_prompt(s) for s in self.scenes]

    def all_prompts(self) -> list[str]:
        return self.subject_prompts() + [CLASS_PROMPT]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def toyworld_scores(generate: Callable[[list[str], list[int]], list], base_class_images: list, judge,
                    seeds: Sequence[int]) -> tuple[dict[str, float], dict]:
    """(image_scores, details) of one run. `generate(prompts, seeds)` makes one picture per (prompt, seed) with
    the run's LoRA, prompt-major; `base_class_images` are the base model's CLASS_PROMPT pictures for `seeds`."""
    from ..toyworld.judge import judge_images

    plan = ToyPrompts(seeds=[int(s) for s in seeds])
    n = len(plan.seeds)
    prompts = plan.all_prompts()
    images = generate([p for p in prompts for _ in plan.seeds], [s for _ in prompts for s in plan.seeds])
    per_prompt = _chunks(images, n)
    verdicts = _chunks(judge_images(images, judge), n)
    base_verdicts = judge_images(base_class_images, judge)

    per_scene = {}
    for scene, vs in zip(plan.scenes, verdicts):
        per_scene[scene] = prompt_scores(vs, [scene] * n)
    inst = per_scene[INSTANCE_SCENE]
    new_verdicts = [v for scene, vs in zip(plan.scenes, verdicts) if scene != INSTANCE_SCENE for v in vs]
    new_wanted = [scene for scene in plan.scenes if scene != INSTANCE_SCENE for _ in range(n)]
    new = prompt_scores(new_verdicts, new_wanted)
    scores = {"subject": inst["subject"], "scene": inst["scene"], "subject_scene": inst["subject_scene"],
              "subject_new": new["subject"], "scene_new": new["scene"], "subject_scene_new": new["subject_scene"],
              **class_scores(verdicts[-1], base_verdicts),
              "diversity_subject": float(np.mean([pixel_diversity(ims) for ims in per_prompt[:-1]])),
              "diversity_class": pixel_diversity(per_prompt[-1])}
    details = {"per_scene": per_scene, "new_scenes": list(NEW_SCENES), "instance_scene": INSTANCE_SCENE,
               "class_colours": {"run": colour_histogram(verdicts[-1]), "base": colour_histogram(base_verdicts)},
               "seeds": plan.seeds, "pictures": len(images) + len(base_class_images)}
    return {k: scores[k] for k in SCORE_NAMES}, details


def toy_generator(components):
    """generate(prompts, seeds) on the loaded base model as it is (with whatever LoRA is attached), made the
    way every toy-world score is made."""
    from ..toyworld.measure import generate_batch

    def gen(prompts, seeds):
        return generate_batch(components.pipeline(), list(prompts), list(seeds))

    return gen
