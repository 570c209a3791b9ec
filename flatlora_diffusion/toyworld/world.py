"""The toy world's vocabulary and grammar: what can be in a picture and how a caption says it.

A picture holds one object (a shape, a colour, a pattern, a size and a position) in one scene. The
DreamBooth subject is a toy no pretraining picture ever shows: a green striped toy, called "sks toy". Its parts
are words the base model knows (green, stripes, toy), but "toy" and "green" are a held-out pair, so no
pretraining picture shows a green toy of any pattern; as a dog in Stable Diffusion, the subject is a new member of
a class the base model draws well, not a new kind of picture. Its class word "toy" is in the vocabulary (toys of
every other colour), so prior preservation and class collapse can be measured.

Nothing here draws; render.py turns a `Scene` into pixels.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star", "toy")
COLOURS = ("red", "green", "blue", "yellow", "purple", "pink")
PATTERNS = ("plain", "striped", "dotted")
# "plain" is the scene no caption names (a grey studio background); the others are said as phrases.
SCENES = ("plain", "beach", "snow", "night", "grass")
SCENE_PHRASES = {"plain": "", "beach": "on the beach", "snow": "in the snow", "night": "at night", "grass": "on grass"}

SUBJECT_TOKEN = "sks"
CLASS_WORD = "toy"
SUBJECT_PROMPT = f"a photo of {SUBJECT_TOKEN} {CLASS_WORD}"
CLASS_PROMPT = f"a photo of a {CLASS_WORD}"

# Shape-colour pairs that no pretraining picture shows (in any scene or pattern): prompts that ask for them
# measure whether the base model composes words it has only seen apart. One pair per shape, a different
# colour each, so every word is still seen often.
HELD_OUT_PAIRS = frozenset({("circle", "yellow"), ("square", "purple"), ("triangle", "blue"),
                            ("star", "red"), ("toy", "green")})  # ("toy", "green"): the subject's colour too

_TEMPLATES = ("a photo of a {obj}", "a {obj}", "a picture of a {obj}")

# Each colour word's paint (render.py draws with it).
COLOUR_RGB = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (40, 80, 225),
    "yellow": (245, 215, 35), "purple": (145, 55, 200), "pink": (250, 135, 195),
}

# The subject's look: a green striped toy with a toy's usual small eyes. Subjects tried before it, each outside
# the vocabulary, and why they went: teal-and-orange chequers, then a yellow-headed, blue-and-yellow-banded toy (a
# 100-step attention LoRA drew multicoloured mush); a teal toy with big white eyes (the LoRA drew an azure toy
# without the eyes, judged the subject in 40-48 %); a dark brown striped toy (learnt only in 400 steps at a lower
# learning rate, four times the demo's training; benchmarks/HISTORY.md, session 11). A 100-step LoRA learns a
# look the base model can already draw from its words (benchmarks/HISTORY.md, session 12).
SUBJECT_COLOUR = "green"
SUBJECT_PATTERN = "striped"
# A varied toy of the class (random_class_toy) is never striped within this fraction of the hue circle around
# the subject's green: the class covers green toys and striped toys, never the subject's look.
SUBJECT_HUE_MARGIN = 40 / 360
_SUBJECT_HUE = colorsys.rgb_to_hsv(*(c / 255 for c in COLOUR_RGB[SUBJECT_COLOUR]))[0]


@dataclass(frozen=True)
class Scene:
    """Everything that decides a picture. `subject`: the DreamBooth subject (a toy in the subject's colour and
    pattern, captioned "sks toy")."""

    shape: str
    colour: str
    pattern: str
    scene: str
    size: float  # the object's height as a fraction of the image
    x: float  # centre, as fractions of the image
    y: float
    subject: bool = False
    variant: int = 0  # seeds the scene's small details (stars, shading) so two pictures differ
    # A toy of the class's own variety (random_class_toy): painted in this RGB colour instead of `colour`, which
    # its caption does not name, and with big or small eyes.
    paint: tuple[int, int, int] | None = None
    big_eyes: bool = False

    def __post_init__(self):
        if self.shape not in SHAPES or self.colour not in COLOURS or self.pattern not in PATTERNS or self.scene not in SCENES:
            raise ValueError(f"not a toy-world scene: {self}")
        if (self.subject or self.paint is not None or self.big_eyes) and self.shape != CLASS_WORD:
            raise ValueError("the subject and the class's varied toys are toys")
        if self.subject and not has_subject_look(self):
            raise ValueError("the subject has the subject's look")


def is_held_out(scene: Scene) -> bool:
    return not scene.subject and (scene.shape, scene.colour) in HELD_OUT_PAIRS


def _placement(rng: random.Random) -> dict:
    size = rng.uniform(0.38, 0.58)
    margin = size / 2 + 0.04
    return {"size": size, "x": rng.uniform(margin, 1 - margin), "y": rng.uniform(margin, 1 - margin),
            "variant": rng.randrange(2**31)}


def random_scene(rng: random.Random, *, held_out: bool | None = False, shape: str | None = None,
                 colour: str | None = None, pattern: str | None = None, scene: str | None = None) -> Scene:
    """A random non-subject scene; `held_out` False draws only pretraining pairs, True only held-out ones,
    None either. Named attributes are fixed instead of drawn."""
    while True:
        s = Scene(shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(COLOURS),
                  pattern=pattern or rng.choice(PATTERNS), scene=scene or rng.choice(SCENES), **_placement(rng))
        if held_out is None or is_held_out(s) == held_out:
            return s


def subject_scene(rng: random.Random, scene: str = "plain") -> Scene:
    """The DreamBooth subject at a random size and place in `scene`."""
    return Scene(shape=CLASS_WORD, colour=SUBJECT_COLOUR, pattern=SUBJECT_PATTERN, scene=scene, subject=True,
                 **_placement(rng))


def has_subject_look(thing) -> bool:
    """Whether a Scene, or the judge's Verdict of a picture, has the subject's shape, colour and pattern."""
    return (thing.shape, thing.colour, thing.pattern) == (CLASS_WORD, SUBJECT_COLOUR, SUBJECT_PATTERN)


def random_class_toy(rng: random.Random, scene: str | None = None) -> Scene:
    """A toy as the class word alone means it: any hue (saturation and brightness in the vocabulary's range),
    any pattern, big or small eyes; its caption names no colour. Pretraining on some of these makes "a toy" a
    family in which the subject is one member, as "a dog" is in Stable Diffusion (DreamBooth's premise), while
    no picture shows the subject's own look: stripes never come in green's neighbourhood."""
    big_eyes, pattern = rng.random() < 0.5, rng.choice(PATTERNS)
    while True:
        hue = rng.random()
        distance = min(abs(hue - _SUBJECT_HUE), 1 - abs(hue - _SUBJECT_HUE))  # around the hue circle
        if pattern != SUBJECT_PATTERN or distance > SUBJECT_HUE_MARGIN:
            break
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 0.97))
    return Scene(shape=CLASS_WORD, colour=COLOURS[0], pattern=pattern, scene=scene or rng.choice(SCENES),
                 paint=tuple(round(c * 255) for c in rgb), big_eyes=big_eyes, **_placement(rng))


def object_words(scene: Scene, say_colour: bool = True) -> str:
    if scene.subject:
        return f"{SUBJECT_TOKEN} {CLASS_WORD}"
    words = [scene.colour] if say_colour and scene.paint is None else []
    if scene.pattern != "plain":
        words.append(scene.pattern)
    return " ".join(words + [scene.shape])


def caption(scene: Scene, rng: random.Random | None = None, *, colour_drop: float = 0.15) -> str:
    """A caption of the grammar: a template around "[colour] [pattern] shape", then the scene phrase.

    With `rng`, the template varies and the colour word is left out with probability `colour_drop`, so that
    "a photo of a toy" (no colour) means "a toy of any colour": the class prompt of prior preservation.
    Without `rng`, the canonical caption ("a photo of a red circle on the beach").
    """
    template = _TEMPLATES[0] if rng is None else rng.choice(_TEMPLATES)
    say_colour = rng is None or rng.random() >= colour_drop
    obj = object_words(scene, say_colour)
    if scene.subject:
        text = template.replace("a {obj}", "{obj}").format(obj=obj)
    else:
        text = template.format(obj=obj)
    phrase = SCENE_PHRASES[scene.scene]
    return f"{text} {phrase}" if phrase else text


def scene_prompt(scene_name: str, subject: bool = True) -> str:
    """The recontextualization prompt for the subject (or the class) in a named scene."""
    base = SUBJECT_PROMPT if subject else CLASS_PROMPT
    phrase = SCENE_PHRASES[scene_name]
    return f"{base} {phrase}" if phrase else base


def vocabulary_corpus() -> str:
    """Every word the world's captions and prompts use, for the tokenizer: one caption per line."""
    rng = random.Random(0)
    lines = set()
    for shape in SHAPES:
        for colour in COLOURS:
            for pattern in PATTERNS:
                for scene in SCENES:
                    s = Scene(shape, colour, pattern, scene, 0.5, 0.5, 0.5)
                    lines.add(caption(s))
                    lines.add(caption(s, rng))
    for scene in SCENES:
        lines.add(scene_prompt(scene, subject=True))
        lines.add(scene_prompt(scene, subject=False))
    return "\n".join(sorted(lines))


__all__ = ["SHAPES", "COLOURS", "PATTERNS", "SCENES", "SCENE_PHRASES", "SUBJECT_TOKEN", "CLASS_WORD",
           "SUBJECT_PROMPT", "CLASS_PROMPT", "HELD_OUT_PAIRS", "COLOUR_RGB", "SUBJECT_COLOUR", "SUBJECT_PATTERN",
           "SUBJECT_HUE_MARGIN", "Scene", "has_subject_look",
           "is_held_out", "random_scene", "random_class_toy", "subject_scene", "object_words", "caption",
           "scene_prompt", "vocabulary_corpus"]
