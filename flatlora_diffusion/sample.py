"""Generation with a trained LoRA, and labelled side-by-side comparison grids.

Public API:
    load_pipeline(base_model, device="cpu", dtype=None, config=None, vae=None, revision=None, variant=None)
    generate(pipeline, prompts, seeds, lora_path=None, lora_scale=1.0, steps=25, guidance_scale=7.0,
             height=None, width=None, negative_prompt=None) -> list[PIL.Image]
    lora_loaded(pipeline, lora_path, lora_scale=1.0)  (context manager: the LoRA applied inside the block)
    comparison_grid(columns, row_labels=None) -> PIL.Image

`generate` leaves the pipeline as it found it: the LoRA is loaded under a private adapter name for the call
and unloaded afterwards, even when generation fails. So one loaded base pipeline serves many runs' LoRAs
(the web app's "generate now" compares runs on the same base model this way).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SampleError", "load_pipeline", "lora_loaded", "generate", "comparison_grid"]

_ADAPTER = "flatlora_sample"


class SampleError(ValueError):
    """Generation cannot start; the message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_pipeline(
    base_model: str,
    device: str = "cpu",
    dtype=None,
    config: str | None = None,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """A text-to-image pipeline (SD 1.x/2.x or SDXL) from a hub id, a local diffusers folder or a single file.

    Single files (.safetensors/.ckpt) go through diffusers' ``from_single_file``; `config` (a diffusers
    folder or hub id with the same architecture) tells it the component configs without a download.
    `vae` optionally replaces the VAE (hub id, folder or single file). dtype defaults to fp16 on CUDA and
    fp32 elsewhere. The safety checker is not loaded. Loading itself is the trainer's (models.load_pipeline).
    """
    import torch

    from .models import ModelError, inspect_model_source
    from .models import load_pipeline as load_model_pipeline

    if not base_model:
        raise SampleError("no base model given")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    try:
        source = inspect_model_source(str(base_model), revision)
    except ModelError as e:
        raise SampleError(str(e)) from None
    pipe = load_model_pipeline(source, dtype=dtype, revision=revision, variant=variant, vae_path=vae,
                               single_file_config=config)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------


def _load_lora(pipeline, lora_path, tmp: Path) -> None:
    """Load any kohya or diffusers LoRA file into the pipeline under the private adapter name.

    The file goes through the project's own reader (export.load_any_lora) and is rewritten as a diffusers
    file with lora_adapter_metadata: that way kohya files and every diffusers spelling load the same, with
    their alphas, whatever diffusers' own kohya converter would make of them.
    """
    from safetensors.torch import save_file

    from .export import ExportError, load_any_lora, lora_to_diffusers

    try:
        lora, _arch = load_any_lora(lora_path)
    except ExportError as e:
        raise SampleError(str(e)) from None
    state, metadata = lora_to_diffusers(lora)
    name = "lora.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name), metadata=metadata)
    pipeline.load_lora_weights(str(tmp), weight_name=name, adapter_name=_ADAPTER)


@contextlib.contextmanager
def lora_loaded(pipeline, lora_path, lora_scale: float = 1.0):
    """The pipeline with a LoRA file (kohya or diffusers) applied at `lora_scale` inside the block, and
    without it again afterwards, also when the block fails."""
    with tempfile.TemporaryDirectory(prefix="flatlora-sample-") as tmp:
        loaded = False
        try:
            _load_lora(pipeline, lora_path, Path(tmp))
            loaded = True
            pipeline.set_adapters([_ADAPTER], adapter_weights=[float(lora_scale)])
            yield pipeline
        finally:
            if loaded or _ADAPTER in _adapter_names(pipeline):
                pipeline.unload_lora_weights()


def generate(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    lora_path=None,
    lora_scale: float = 1.0,
    steps: int = 25,
    guidance_scale: float = 7.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> list:
    """One image per (prompt, seed), prompt-major: [p0s0, p0s1, ..., p1s0, ...].

    Each image has its own torch.Generator seeded with its seed, so an image depends only on its prompt,
    seed and settings, not on what else is generated in the call. With `lora_path` the LoRA is applied
    at `lora_scale` and removed again before returning.
    """
    import torch

    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(seeds, int):
        seeds = [seeds]
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or not seeds:
        raise SampleError("give at least one prompt and one seed")
    images = []
    with lora_loaded(pipeline, lora_path, lora_scale) if lora_path is not None else contextlib.nullcontext():
        for prompt in prompts:
            for seed in seeds:
                # a CPU generator: the same seed gives the same starting noise on every device,
                # as in the trainer's validation images
                generator = torch.Generator(device="cpu").manual_seed(seed)
                out = pipeline(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=int(steps),
                    guidance_scale=float(guidance_scale),
                    height=height,
                    width=width,
                    generator=generator,
                    output_type="pil",
                )
                images.append(out.images[0])
    return images


def _adapter_names(pipeline) -> set[str]:
    try:
        return {name for names in pipeline.get_list_adapters().values() for name in names}
    except Exception:
        return set()


# ---------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------

_BACKGROUND = (255, 255, 255)
_EMPTY = (225, 225, 225)
_TEXT = (20, 20, 20)
_PAD = 4


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(draw, text: str, font, max_width: int) -> str:
    """`text` shortened with an ellipsis so that it fits in `max_width` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, max_width: int, max_lines: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= max_width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_fit(draw, ln, font, max_width) for ln in lines] or [""]


def _header_lines(draw, label: str, font, max_width: int, max_lines: int = 3) -> list[str]:
    """A column label: its own line breaks kept, each part wrapped, at most `max_lines` in all."""
    lines: list[str] = []
    for part in label.split("\n"):
        lines += _wrap(draw, part, font, max_width, max_lines)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_fit(draw, " ".join(lines[max_lines - 1:]), font, max_width)]
    return lines


def comparison_grid(columns, row_labels: Sequence[str] | None = None, font_size: int = 14):
    """Labelled columns side by side: one column per (label, images), rows = prompt/seed.

    Columns may differ in length and image size; a missing image (None or a short column) is a grey cell,
    and every cell has the size of the largest image, images centred in it. Column labels keep their own
    line breaks and are wrapped to at most three lines. `row_labels`, if given, are written in a left margin
    (wrapped to three lines).
    """
    from PIL import Image, ImageDraw

    columns = [(str(label), list(images)) for label, images in columns]
    if not columns:
        raise ValueError("comparison_grid needs at least one column")
    n_rows = max([len(imgs) for _, imgs in columns] + [len(row_labels or [])])
    if n_rows == 0:
        raise ValueError("comparison_grid needs at least one image")
    present = [im for _, imgs in columns for im in imgs if im is not None]
    cell_w = max([im.width for im in present] + [64])
    cell_h = max([im.height for im in present] + [64])

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font_size * 1.3)
    label_w = 0
    if row_labels:
        label_w = min(max(int(max(probe.textlength(str(t), font=font) for t in row_labels)) + 2 * _PAD, 60), 240)
    headers = [_header_lines(probe, label, font, cell_w - 2 * _PAD) for label, _ in columns]
    header_lines = max(len(h) for h in headers)
    header_h = header_lines * line_h + 2 * _PAD

    width = label_w + len(columns) * (cell_w + _PAD) + _PAD
    height = header_h + n_rows * (cell_h + _PAD) + _PAD
    grid = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(grid)

    for c, (label, images) in enumerate(columns):
        x0 = label_w + _PAD + c * (cell_w + _PAD)
        for i, line in enumerate(headers[c]):
            tw = draw.textlength(line, font=font)
            draw.text((x0 + (cell_w - tw) / 2, _PAD + i * line_h), line, fill=_TEXT, font=font)
        for r in range(n_rows):
            y0 = header_h + r * (cell_h + _PAD)
            image = images[r] if r < len(images) else None
            if image is None:
                draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=_EMPTY)
                continue
            image = image.convert("RGB")
            grid.paste(image, (x0 + (cell_w - image.width) // 2, y0 + (cell_h - image.height) // 2))

    if row_labels:
        max_lines = max(1, min(3, cell_h // line_h))
        for r, text in enumerate(row_labels):
            y0 = header_h + r * (cell_h + _PAD)
            lines = _wrap(draw, str(text), font, label_w - 2 * _PAD, max_lines)
            top = y0 + (cell_h - len(lines) * line_h) / 2
            for i, line in enumerate(lines):
                draw.text((_PAD, top + i * line_h), line, fill=_TEXT, font=font)
    return grid
