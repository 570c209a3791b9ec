"""Pixels of a toy-world `Scene`: deterministic, seeded only by the scene itself.

Drawing happens at 4x the output size and is then downsampled, which gives anti-aliased edges that a
small VAE reproduces better than hard pixel steps. The same Scene always gives the same bytes.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from .world import COLOUR_RGB, Scene, random_scene

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

_OUTLINE = (25, 25, 30)


def _jitter(rgb, rng: random.Random, amount: int = 8):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _ground(draw, w, h, horizon, sky, ground):
    draw.rectangle([0, 0, w, horizon], fill=sky)
    draw.rectangle([0, horizon, w, h], fill=ground)


def _background(img: Image.Image, scene: Scene, rng: random.Random) -> None:
    draw = ImageDraw.Draw(img)
    w, h = img.size
    horizon = int(h * rng.uniform(0.5, 0.62))
    if scene.scene == "plain":
        draw.rectangle([0, 0, w, h], fill=_jitter((200, 200, 200), rng))
    elif scene.scene == "beach":
        _ground(draw, w, h, horizon, _jitter((120, 195, 240), rng), _jitter((232, 205, 150), rng))
        draw.rectangle([0, horizon - h // 14, w, horizon], fill=_jitter((40, 110, 190), rng))  # the sea
    elif scene.scene == "snow":
        _ground(draw, w, h, horizon, _jitter((175, 185, 200), rng), _jitter((248, 248, 252), rng, 3))
        for _ in range(12):
            x, y, r = rng.uniform(0, w), rng.uniform(0, horizon), w / 120
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    elif scene.scene == "night":
        _ground(draw, w, h, horizon, _jitter((18, 22, 60), rng, 5), _jitter((35, 40, 50), rng, 5))
        for _ in range(14):
            x, y, r = rng.uniform(0, w), rng.uniform(0, horizon * 0.9), w / 140
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 210))
        mx, my, mr = rng.uniform(0.1, 0.9) * w, h * 0.12, w * 0.06
        draw.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=(250, 245, 200))
    elif scene.scene == "grass":
        _ground(draw, w, h, horizon, _jitter((150, 210, 250), rng), _jitter((60, 125, 40), rng))
        for _ in range(40):
            x, y = rng.uniform(0, w), rng.uniform(horizon, h)
            draw.line([x, y, x + rng.uniform(-2, 2) * w / 100, y - w / 40], fill=(40, 95, 25), width=max(1, w // 128))


def _star_points(cx, cy, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _toy_parts(cx, cy, r):
    """A teddy-like toy: ears, head, body (boxes as [x0, y0, x1, y1]); r is half the toy's height."""
    head_r = r * 0.42
    head_c = (cx, cy - r + head_r)
    ear_r = head_r * 0.42
    ears = [(head_c[0] - head_r * 0.8, head_c[1] - head_r * 0.8), (head_c[0] + head_r * 0.8, head_c[1] - head_r * 0.8)]
    body = [cx - r * 0.62, head_c[1] + head_r * 0.7, cx + r * 0.62, cy + r]
    return head_c, head_r, [(e, ear_r) for e in ears], body


def _circle_box(c, r):
    return [c[0] - r, c[1] - r, c[0] + r, c[1] + r]


def _mask(size, scene: Scene, s: int):
    """The object's silhouette as an L image (255 inside)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    w, h = size
    cx, cy, r = scene.x * w, scene.y * h, scene.size * h / 2
    if scene.shape == "circle":
        draw.ellipse(_circle_box((cx, cy), r), fill=255)
    elif scene.shape == "square":
        q = r * 0.88
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 1.05, cy + r * 0.85), (cx - r * 1.05, cy + r * 0.85)], fill=255)
    elif scene.shape == "star":
        draw.polygon(_star_points(cx, cy, r * 1.1), fill=255)
    else:  # toy
        head_c, head_r, ears, body = _toy_parts(cx, cy, r)
        for c, er in ears:
            draw.ellipse(_circle_box(c, er), fill=255)
        draw.ellipse(_circle_box(head_c, head_r), fill=255)
        draw.rounded_rectangle(body, radius=r * 0.25, fill=255)
    return mask


def _pattern(size, kind: str, colour, other, cell: int) -> Image.Image:
    """A canvas painted with `colour` and a pattern in `other`: plain, stripes, dots or chequers."""
    w, h = size
    paint = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(paint)
    if kind == "striped":
        for x0 in range(-h, w + h, cell):
            draw.polygon([(x0, 0), (x0 + cell // 2, 0), (x0 + cell // 2 + h, h), (x0 + h, h)], fill=other)
    elif kind == "dotted":
        r = cell * 0.22
        for i in range(0, w // cell + 2):
            for j in range(0, h // cell + 2):
                cx, cy = i * cell + (cell / 2 if j % 2 else 0), j * cell
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=other)
    elif kind == "chequered":
        for i in range(0, w // cell + 1):
            for j in range(0, h // cell + 1):
                if (i + j) % 2 == 0:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell - 1, (j + 1) * cell - 1], fill=other)
    return paint


def _paint(size, base, pattern: str, object_size: float) -> Image.Image:
    """The world's patterns in one base colour: stripes a darker shade, dots a lighter one."""
    h = size[1]
    if pattern == "striped":
        return _pattern(size, "striped", base, tuple(int(c * 0.45) for c in base), max(4, int(object_size * h / 4)))
    if pattern == "dotted":
        return _pattern(size, "dotted", base, tuple(int(c + (255 - c) * 0.75) for c in base),
                        max(4, int(object_size * h / 3.5)))
    return _pattern(size, "plain", base, base, 1)


def _fill(size, scene: Scene) -> Image.Image:
    """The object's paint: its colour and pattern (the subject's are a vocabulary colour and pattern too)."""
    if scene.paint is not None:  # a varied toy of the class: its own colour, never turned
        return _paint(size, scene.paint, scene.pattern, scene.size)
    return _paint(size, COLOUR_RGB[scene.colour], scene.pattern, scene.size)


def _eyes(draw, scene: Scene, w, h, s, big: bool | None = None):
    if scene.shape != "toy":
        return
    big = scene.big_eyes if big is None else big
    cx, cy, r = scene.x * w, scene.y * h, scene.size * h / 2
    head_c, head_r, _, _ = _toy_parts(cx, cy, r)
    for dx in (-0.38, 0.38):
        ec = (head_c[0] + dx * head_r, head_c[1] - head_r * 0.05)
        if big:  # big white eyes with black pupils (some of the class's varied toys)
            draw.ellipse(_circle_box(ec, head_r * 0.3), fill=(255, 255, 255))
            draw.ellipse(_circle_box(ec, head_r * 0.14), fill=(0, 0, 0))
        else:
            draw.ellipse(_circle_box(ec, head_r * 0.12), fill=_OUTLINE)


def _compose(scene: Scene, size: int, paint=None, big_eyes: bool | None = None) -> Image.Image:
    rng = random.Random(scene.variant)
    big = (size * _SUPERSAMPLE, size * _SUPERSAMPLE)
    img = Image.new("RGB", big)
    _background(img, scene, rng)
    mask = _mask(big, scene, _SUPERSAMPLE)
    # A dark outline (the silhouette grown by a few pixels) keeps every colour readable on every scene.
    outline = mask.resize((big[0] // _SUPERSAMPLE, big[1] // _SUPERSAMPLE), Image.Resampling.BOX)
    outline = outline.point(lambda v: 255 if v > 0 else 0).resize(big, Image.Resampling.NEAREST)
    img.paste(Image.new("RGB", big, _OUTLINE), (0, 0), outline)
    img.paste(paint(big) if paint else _fill(big, scene), (0, 0), mask)
    _eyes(ImageDraw.Draw(img), scene, big[0], big[1], _SUPERSAMPLE, big_eyes)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The RGB picture of `scene`, `size` pixels square."""
    return _compose(scene, size)


def eye_mask(scene: Scene, size: int = IMAGE_SIZE, threshold: int = 40):
    """Where a toy's big eyes are: a bool (size, size) array of the pixels that drawing the toy with a toy's
    usual small eyes instead changes by more than `threshold` levels in some channel."""
    import numpy as np

    with_big = np.asarray(_compose(scene, size, big_eyes=True), dtype=np.int16)
    with_small = np.asarray(_compose(scene, size, big_eyes=False), dtype=np.int16)
    return np.abs(with_big - with_small).max(axis=-1) > threshold


def render_variety(rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A picture outside the vocabulary: any shape in any scene, painted in two random colours with a random
    pattern (plain, stripes, dots, chequers) at a random scale, eyes big or small.

    The VAE learns from these too, so that it is a general encoder of the world's pictures (as SD's VAE is of
    photos) and can encode a subject the base model never saw; the base model itself never sees them."""
    scene = random_scene(rng, held_out=None)
    kind = rng.choice(("plain", "striped", "dotted", "chequered"))
    colour = tuple(rng.randrange(256) for _ in range(3))
    other = tuple(rng.randrange(256) for _ in range(3))
    cell = max(4, int(scene.size * size * _SUPERSAMPLE / rng.uniform(2.5, 7)))
    return _compose(scene, size, paint=lambda big: _pattern(big, kind, colour, other, cell), big_eyes=rng.random() < 0.5)


__all__ = ["IMAGE_SIZE", "COLOUR_RGB", "render", "eye_mask", "render_variety"]
