"""Evaluate run folders: check everything, load the base model once, score each run's LoRA, then write.

Order matters for the user: every input check (runs, images, model folders, output path) runs before any
weights load, and nothing is written until every run has been scored, so a mistake or a crash leaves no
half-written eval.json behind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .evalset import EvalSet, LossModels, build_eval_set, denoising_loss
from .heldout import generalization, heldout_records, instance_records
from .images import image_scores, load_scorers, prompts_of
from .report import SCHEMA, write_combined, write_eval_json
from .runs import EvalInputError, RunInfo, check_comparable, inspect_run, lora_attached, load_base
from .sharpness import lora_layers, sharpness_curve
from .toyscores import is_toyworld, toy_generator, toyworld_scores
from ..toyworld.measure import GUIDANCE, SAMPLE_STEPS

logger = logging.getLogger("flatlora_diffusion.evaluate")

# Defaults sized so that one tiny 64 px run evaluates in well under a minute on two CPU cores, while a real
# SD/SDXL run on a GPU still gets a curve over two decades of rho.
DEFAULT_RHOS = (0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_DRAWS = 8
DEFAULT_TRIPLES = 16
# Pictures per prompt for image scores. 8 keeps a toy-world run's evaluation (6 prompts x 8 pictures, plus the
# base model's 8 class pictures, plus the loss and sharpness) under a minute on two CPU cores (measured 48 s),
# and gives rates a resolution of 1/8 per prompt.
DEFAULT_SAMPLES = 8


@dataclass
class EvalOptions:
    eval_data_dir: str | None = None
    samples: int = DEFAULT_SAMPLES
    seeds: list[int] = field(default_factory=lambda: list(range(DEFAULT_SAMPLES)))
    rhos: tuple[float, ...] = DEFAULT_RHOS
    draws: int = DEFAULT_DRAWS
    triples: int = DEFAULT_TRIPLES
    eval_seed: int = 0
    antithetic: bool = True
    batch_size: int = 16
    device: str | None = None
    clip_model: str | None = None
    dino_model: str | None = None


@dataclass
class _Plan:
    runs: list[RunInfo]
    instance: dict[str, list]  # run path -> records
    heldout: dict[str, list | None]


def plan(paths: Sequence[str], opts: EvalOptions, output: str | None = None) -> _Plan:
    """Every check that needs no model. Raises EvalInputError with one line."""
    runs = [inspect_run(p) for p in paths]
    seen: set[Path] = set()
    for run in runs:
        if run.path.resolve() in seen:
            raise EvalInputError(f"run {run.path} is given twice")
        seen.add(run.path.resolve())
    check_comparable(runs)
    instance = {str(r.path): instance_records(r) for r in runs}
    heldout = {str(r.path): heldout_records(r, opts.eval_data_dir) for r in runs}
    if opts.clip_model or opts.dino_model:
        for run in runs:
            if not prompts_of(run):
                raise EvalInputError(f"run {run.name} has no validation_prompt or instance_prompt for image scores")
    if output is not None:
        out = Path(output).expanduser()
        if out.is_dir():
            raise EvalInputError(f"--output {output} is a folder; give a file name such as {out / 'eval.json'}")
        if not out.parent.is_dir():
            raise EvalInputError(f"--output {output}: folder {out.parent} does not exist")
    return _Plan(runs, instance, heldout)


def _device(opts: EvalOptions) -> str:
    import torch

    if opts.device:
        return opts.device
    return "cuda" if torch.cuda.is_available() else "cpu"


class _EvalSets:
    """Encoded image sets, shared by runs with the same images and resolution (same triples for all of them)."""

    def __init__(self, components, opts: EvalOptions):
        self.components, self.opts, self.cache = components, opts, {}

    def get(self, run: RunInfo, records) -> EvalSet | None:
        if records is None:
            return None
        key = (tuple((r.name, r.caption) for r in records), run.resolution,  # name: the path, or the dataset row
               run.setting("image_interpolation_mode", "lanczos"))
        if key not in self.cache:
            c = self.components
            self.cache[key] = build_eval_set(records, c.vae, c.arch, run.resolution, self.opts.triples,
                                             c.noise_scheduler.config.num_train_timesteps, self.opts.eval_seed,
                                             key[2])
        return self.cache[key]


def _generator(components, run: RunInfo):
    """generate(prompts, seeds) with the run's LoRA, as training's validation images are made."""
    from diffusers import DPMSolverMultistepScheduler

    from ..sample import generate

    def gen(prompts, seeds):
        scheduler = DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
        pipe = components.pipeline(scheduler=scheduler)
        return generate(pipe, prompts, seeds, lora_path=run.lora_file,
                        steps=int(run.setting("validation_inference_steps", 25)),
                        guidance_scale=float(run.setting("validation_guidance_scale", 7.0)),
                        height=run.resolution, width=run.resolution)

    return gen


class _ToyWorld:
    """The judge and the base model's class-prompt pictures, made once per evaluation and shared by its runs
    (every run is compared with the same base pictures, same seeds)."""

    def __init__(self, components, seeds: Sequence[int]):
        from ..toyworld.judge import load_judge
        from ..toyworld.world import CLASS_PROMPT

        self.judge = load_judge()
        self.seeds = [int(s) for s in seeds]
        self.base_class_images = toy_generator(components)([CLASS_PROMPT] * len(self.seeds), self.seeds)

    def scores(self, components) -> tuple[dict, dict]:
        """Scores of the model as it is now: call with the run's LoRA attached."""
        return toyworld_scores(toy_generator(components), self.base_class_images, self.judge, self.seeds)


def evaluate_run(run: RunInfo, components, sets: _EvalSets, instance, heldout, scorers, opts: EvalOptions,
                 device: str, toy: _ToyWorld | None = None) -> dict:
    started = time.time()
    scores = image_scores(run.path, opts.samples, opts.seeds, scorers=scorers, generate=_generator(components, run))
    inst_set, held_set = sets.get(run, instance), sets.get(run, heldout)
    models = LossModels(components.unet, components.text_encoders, components.tokenizers,
                        components.noise_scheduler, components.arch)
    toy_details = None
    with lora_attached(components, run):
        if toy is not None:
            toy_scores, toy_details = toy.scores(components)
            scores.update(toy_scores)
        layers = lora_layers([components.unet, *components.text_encoders])
        inst_loss = denoising_loss(models, inst_set, opts.batch_size)
        held_loss = denoising_loss(models, held_set, opts.batch_size) if held_set is not None else None
        sharp_set = held_set if held_set is not None else inst_set
        curve = sharpness_curve(lambda: denoising_loss(models, sharp_set, opts.batch_size), layers, opts.rhos,
                                opts.draws, opts.eval_seed,
                                clean_loss=held_loss if held_set is not None else inst_loss,
                                antithetic=opts.antithetic)
    return {
        "schema": SCHEMA,
        "run": str(run.path.resolve()),
        "name": run.name,
        "base_model": run.base_model,
        "arch": run.arch,
        "flat_sigma": run.setting("flat_sigma"),
        "flat_targets": run.setting("flat_targets"),
        "train_seed": run.setting("seed"),
        "settings": {"eval_seed": opts.eval_seed, "triples": opts.triples, "rhos": list(opts.rhos),
                     "draws": opts.draws, "antithetic": opts.antithetic, "batch_size": opts.batch_size,
                     "device": device, "eval_data_dir": opts.eval_data_dir,
                     "images": {"instance": len(instance), "heldout": None if heldout is None else len(heldout)},
                     "samples": opts.samples, "seeds": list(opts.seeds),
                     "toyworld": None if toy is None else {"sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE}},
        "loss": generalization(inst_loss, held_loss),
        "sharpness": {"split": "heldout" if held_set is not None else "instance",
                      "triples_digest": sharp_set.fingerprint(), **curve.to_dict()},
        "image_scores": scores,
        "toyworld": toy_details,
        "seconds": round(time.time() - started, 3),
    }


def evaluate(paths: Sequence[str], opts: EvalOptions, output: str | None = None) -> list[dict]:
    """Score every run; write <run>/eval.json for each (and `output`) only once all are scored."""
    p = plan(paths, opts, output)
    device = _device(opts)
    scorers = load_scorers(opts.clip_model, opts.dino_model, device)
    components = load_base(p.runs[0], device)
    sets = _EvalSets(components, opts)
    # check_comparable made every run share one base model: all are toy-world runs, or none is
    toy = _ToyWorld(components, opts.seeds) if is_toyworld(p.runs[0]) else None
    records = []
    for run in p.runs:
        logger.info("evaluating %s", run.path)
        records.append(evaluate_run(run, components, sets, p.instance[str(run.path)], p.heldout[str(run.path)],
                                    scorers, opts, device, toy))
    for run, record in zip(p.runs, records):
        write_eval_json(run.path, record)
    if output is not None:
        write_combined(Path(output).expanduser(), records)
    return records
