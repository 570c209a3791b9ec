"""Synthetic photos of one recognisable subject (a red-and-yellow smiling disc), for offline DreamBooth runs."""

from __future__ import annotations

import math
import random
from pathlib import Path


def _background(draw, w: int, h: int, rng: random.Random) -> None:
    """A two-colour vertical gradient with a few soft blobs, different for every image."""
    top = tuple(rng.randint(40, 230) for _ in range(3))
    bottom = tuple(rng.randint(40, 230) for _ in range(3))
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(1, 3)):
        r = rng.uniform(0.05, 0.2) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        colour = tuple(rng.randint(60, 200) for _ in range(3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _subject(draw, cx: float, cy: float, r: float, tilt: float) -> None:
    """The subject: a red disc with a yellow rim, two yellow eyes and a yellow smile."""
    yellow, red, dark = (250, 210, 30), (210, 30, 40), (60, 10, 10)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=yellow)
    ri = 0.82 * r
    draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=red)

    def rotate(dx, dy):
        c, s = math.cos(tilt), math.sin(tilt)
        return cx + c * dx - s * dy, cy + s * dx + c * dy

    er = 0.14 * r
    for side in (-1, 1):
        ex, ey = rotate(side * 0.33 * r, -0.25 * r)
        draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=yellow)
        pr = 0.5 * er
        draw.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=dark)
    smile = [rotate(0.45 * r * math.cos(a), 0.1 * r + 0.3 * r * math.sin(a))
             for a in (math.pi * k / 12 for k in range(1, 12))]
    draw.line(smile, fill=yellow, width=max(1, round(0.1 * r)), joint="curve")


def make_subject_images(out_dir, n: int = 4, size: int = 64, seed: int = 0, sizes=None) -> list[Path]:
    """Draw `n` PNG photos of one recognisable subject (a red-and-yellow smiling disc).

    Each image puts the subject at another position, scale and tilt, on another background; the set is
    a deterministic function of `seed`. `sizes`, if given, is a list of (width, height), one per image:
    it then sets the number of images (and `n` and `size` are not used). Writes no captions.
    Returns the paths, named subject_00.png, subject_01.png, ...
    """
    from PIL import Image, ImageDraw

    if sizes is None:
        if n < 1 or size < 8:
            raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
        sizes = [(size, size)] * n
    else:
        sizes = [(int(w), int(h)) for w, h in sizes]
        if not sizes or min(min(s) for s in sizes) < 8:
            raise ValueError(f"sizes must be a non-empty list of (w, h) with w, h >= 8, got {sizes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    supersample = 4  # draw large and shrink: smooth edges like a photo, not aliased pixel art
    paths = []
    for i, (w, h) in enumerate(sizes):
        big_w, big_h = w * supersample, h * supersample
        image = Image.new("RGB", (big_w, big_h))
        draw = ImageDraw.Draw(image)
        _background(draw, big_w, big_h, rng)
        r = rng.uniform(0.22, 0.38) * min(big_w, big_h)
        cx = rng.uniform(r, big_w - r)
        cy = rng.uniform(r, big_h - r)
        _subject(draw, cx, cy, r, tilt=rng.uniform(-0.4, 0.4))
        image = image.resize((w, h), Image.Resampling.LANCZOS)
        path = out / f"subject_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths
