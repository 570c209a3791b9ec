"""Image scores of a run: the plug-in point for image judges, and CLIP-T / CLIP-I / DINO for real models.

The interface `evaluate` calls, once per run:

    image_scores(run_dir, samples, seeds, *, scorers=(), generate=None) -> dict[str, float]

- `samples` images per validation prompt of the run (its config's validation_prompt, else its instance
  prompt), generated with `seeds` (one seed per sample, so len(seeds) == samples).
- `scorers`: objects with `names` (the score keys they return) and
  `score(prompts, images, references) -> dict[str, float]`, where images[p] are the images of prompt p (one
  per seed, as PIL images) and references are the run's instance images. ClipScorer and DinoScorer below
  are two; a judge (such as the toy world's attribute reader) plugs in as one more, with no change here.
- `generate(prompts, seeds)`: images with the run's LoRA on its base model, prompt-major.
- No scorer: {} and nothing is generated (generation is the expensive part).

Every score is averaged over prompts and seeds within the run; runs (training seeds) are the unit of any
comparison across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from .runs import EvalInputError, inspect_run


class ImageScorer(Protocol):
    names: tuple[str, ...]

    def score(self, prompts: list[str], images: list[list], references: list) -> dict[str, float]: ...


def prompts_of(run) -> list[str]:
    prompts = run.setting("validation_prompt") or []
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts and run.setting("instance_prompt"):
        prompts = [run.setting("instance_prompt")]
    return [str(p) for p in prompts]


def image_scores(run_dir, samples: int, seeds: Sequence[int], *, scorers: Sequence[ImageScorer] = (),
                 generate: Callable[[list[str], list[int]], list] | None = None) -> dict[str, float]:
    if not scorers:
        return {}
    if generate is None:
        raise ValueError("image_scores needs `generate` when scorers are given")
    from .heldout import instance_records

    run = inspect_run(run_dir)
    prompts = prompts_of(run)
    if not prompts:
        raise EvalInputError(f"run {run.name} has no validation_prompt or instance_prompt to generate from")
    seeds = [int(s) for s in seeds][:samples]
    flat = generate(prompts, seeds)
    images = [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]
    references = [r.open() for r in instance_records(run)]
    scores: dict[str, float] = {}
    for scorer in scorers:
        scores.update(scorer.score(prompts, images, references))
    return scores


# --- embedding scorers ---------------------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (rows of a) x (rows of b); inputs already unit length."""
    return float((a @ b.T).mean())


class _Embedder:
    def __init__(self, folder: str, device: str):
        from transformers import AutoImageProcessor

        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(folder)

    def _pixels(self, images: list) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"].to(
            self.device)


class ClipScorer(_Embedder):
    """CLIP-T: cosine between each prompt's text embedding and its images' embeddings (prompt fidelity).
    CLIP-I: mean cosine between generated and instance images' embeddings (subject fidelity)."""

    names = ("clip_t", "clip_i")

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        super().__init__(folder, device)
        self.model = CLIPModel.from_pretrained(folder).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if len(self.tokenizer) <= 2:  # offline, transformers returns an empty tokenizer instead of failing
            raise ValueError("its tokenizer is missing or empty")

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        # The projection of the pooled vision output: what CLIPModel compares with text (stable across versions).
        pooled = self.model.vision_model(pixel_values=self._pixels(images)).pooler_output
        return _unit(self.model.visual_projection(pooled))

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return _unit(self.model.text_projection(pooled))

    def score(self, prompts, images, references) -> dict[str, float]:
        texts = self.embed_texts(prompts)
        per_prompt = [self.embed_images(ims) for ims in images]
        clip_t = torch.stack([(emb @ texts[p]).mean() for p, emb in enumerate(per_prompt)]).mean()
        generated = torch.cat(per_prompt)
        return {"clip_t": float(clip_t), "clip_i": _mean_cosine(generated, self.embed_images(references))}


class DinoScorer(_Embedder):
    """DINO: mean cosine between the CLS embeddings of generated and instance images (DreamBooth's preferred
    subject-fidelity score: it separates subjects of one class better than CLIP-I)."""

    names = ("dino",)

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import AutoModel

        super().__init__(folder, device)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        return _unit(self.model(pixel_values=self._pixels(images)).last_hidden_state[:, 0])

    def score(self, prompts, images, references) -> dict[str, float]:
        generated = self.embed_images([im for ims in images for im in ims])
        return {"dino": _mean_cosine(generated, self.embed_images(references))}


def check_model_folder(flag: str, folder: str | None) -> None:
    """The cheap check, before anything loads: the folder exists and holds a model config."""
    if folder is None:
        return
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise EvalInputError(f"{flag} {folder}: no such folder (give a local model folder; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise EvalInputError(f"{flag} {folder} is not a transformers model folder (no config.json)")


def load_scorers(clip_model: str | None, dino_model: str | None, device: str = "cpu") -> list[ImageScorer]:
    """The scorers asked for, loaded now, so an unloadable folder fails before any diffusion model loads."""
    scorers: list[ImageScorer] = []
    for flag, folder, cls, what in (("--clip_model", clip_model, ClipScorer, "a CLIP model"),
                                    ("--dino_model", dino_model, DinoScorer, "a DINO / ViT model")):
        if folder is None:
            continue
        check_model_folder(flag, folder)
        try:
            scorers.append(cls(str(Path(folder).expanduser()), device))
        except Exception as e:  # whatever transformers raises for a wrong or broken folder: one line for the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvalInputError(f"{flag} {folder} cannot be loaded as {what}: {first}") from None
    return scorers
