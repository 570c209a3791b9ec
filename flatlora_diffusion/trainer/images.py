"""The images a run generates with its own pipeline: prior-preservation class images before the first step,
validation images during the run (samples/step_<N>/, published whole by one rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import compiled_blocks, faults
from ..data.class_images import FAST_PNG
from .errors import Cancelled


def _bar(total: int, desc: str):
    """A progress bar on stderr like the steps bar (log lines go through tqdm.write and stay off it)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def sampling_pipeline(components):
    """The pipeline a run samples with (class images, validation images): its own models, DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
    pipe = components.pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)  # one bar per image set (ours), not one per image
    return pipe


def validation_images(pipe, cfg, pipeline_inputs=lambda prompts: {"prompt": list(prompts)},
                      autocast=contextlib.nullcontext, on_step_end=None):
    """Yields (prompt index, seed, image) for every validation (prompt, seed) of `cfg`, prompt by prompt.

    --sample_batch_size images at a time across prompts, one generator per image, so each image starts from its
    seed's noise as if it were made alone, at a fraction of the launches (on a CPU the demo's ten 64 px pictures
    take 0.7x the time in one batch that they take in five batches of two). The one definition of a run's
    validation images: the trainer's rounds, and the demo's base-model pictures drawn beside its runs."""
    seeds = [int(s) for s in cfg.validation_seeds]
    images_to_make = [(p, prompt, seed) for p, prompt in enumerate(cfg.validation_prompt) for seed in seeds]
    for start in range(0, len(images_to_make), cfg.sample_batch_size):
        chunk = images_to_make[start:start + cfg.sample_batch_size]
        with autocast():
            images = pipe(**pipeline_inputs([prompt for _, prompt, _ in chunk]),
                          num_inference_steps=cfg.validation_inference_steps,
                          guidance_scale=cfg.validation_guidance_scale,
                          generator=[torch.Generator(device="cpu").manual_seed(seed) for _, _, seed in chunk],
                          height=cfg.resolution, width=cfg.resolution, callback_on_step_end=on_step_end).images
        for (p, _, seed), image in zip(chunk, images):
            yield p, seed, image


class ImagesMixin:
    """Part of Trainer (see trainer.py for the state it shares)."""

    def _sampling_pipeline(self):
        return sampling_pipeline(self.components)

    def _generate_class_images(self) -> None:
        """--with_prior_preservation: the images --class_data_dir lacks of --num_class_images, made before the
        first step (main process; the others wait)."""
        from ..data import generate_class_images

        cfg = self.cfg
        self._status("generating class images")
        if self.acc.is_main_process:
            bars: list = []

            def progress(done: int, missing: int) -> None:  # a bar for what generation really makes
                if not bars:
                    bars.append(_bar(missing, "Class images"))
                bars[0].update(done - bars[0].n)

            try:
                with self._unet_on_device_for_sampling():
                    generate_class_images(self._sampling_pipeline(), cfg.class_data_dir, cfg.class_prompt,
                                          cfg.num_class_images, cfg.sample_batch_size, seed=cfg.seed,
                                          progress=progress,
                                          pipeline_kwargs={"num_inference_steps": cfg.validation_inference_steps})
            finally:
                for bar in bars:
                    bar.close()
        self.acc.wait_for_everyone()

    def _validate(self) -> None:
        """Validation images of the current step (main process; the others wait), unless already made."""
        cfg, acc = self.cfg, self.acc
        out = self.run_dir.sample_dir(self.global_step)
        if cfg.validation_prompt and acc.is_main_process and not (out / ".complete").exists():
            self._make_validation_images(out)
        acc.wait_for_everyone()

    @torch.no_grad()
    def _encode_validation_prompts(self) -> None:
        """Frozen text encoders: each validation prompt's embeddings (and its unconditional ones), made once, by the
        pipeline's own encode_prompt under the same autocast as sampling, while the encoders are still on the device.
        Validation then leaves them parked: SDXL's 1.9 GB of encoders no longer travel to the GPU and back for every
        set of images, nor add to the peak while the UNet samples (what --low_memory's budget cannot afford)."""
        cfg = self.cfg
        if not cfg.validation_prompt or not self.acc.is_main_process:
            return
        pipe = self._sampling_pipeline()
        guided = cfg.validation_guidance_scale > 1  # the pipelines' own test for classifier-free guidance
        names = (["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
                 if self.is_sdxl else ["prompt_embeds", "negative_prompt_embeds"])
        with self.acc.autocast():
            for prompt in dict.fromkeys(cfg.validation_prompt):
                encoded = pipe.encode_prompt(prompt, device=self.acc.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=guided)
                self.validation_embeds[prompt] = {n: e for n, e in zip(names, encoded) if e is not None}

    def _validation_inputs(self, prompts: list[str]) -> dict:
        """The pipeline's prompt arguments for one image per entry of `prompts`: cached embeddings when every one
        of them has some."""
        cached = [self.validation_embeds.get(prompt) for prompt in prompts]
        if any(c is None for c in cached):
            return {"prompt": list(prompts)}
        return {name: torch.cat([c[name] for c in cached]) for name in cached[0]}

    def _make_validation_images(self, out: Path) -> None:
        self._status(f"validation images at step {self.global_step}")
        models = [self.components.unet, *self.components.text_encoders]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        # with every validation prompt encoded, the text encoders can stay where they are parked
        needed = ["vae"] if self.validation_embeds else None
        # compiled UNet blocks (--torch_compile) would compile again for sampling without gradients
        with (self._parked_models_on_device(needed), compiled_blocks.eager(), self.validation_norms(),
              self.validation_lora()):
            self._sample_validation_images(out)
        for m, mode in zip(models, modes):
            m.train(mode)

    @torch.no_grad()
    def _sample_validation_images(self, out: Path) -> None:
        cfg, acc = self.cfg, self.acc
        pipe = self._sampling_pipeline()
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

        def stop_if_cancelled(pipe, i, t, kwargs):  # Cancel while sampling: between denoising steps
            if self.cancelled["flag"]:
                raise Cancelled()
            return kwargs

        bar = _bar(len(cfg.validation_prompt) * len(cfg.validation_seeds), f"Validation images (step {self.global_step})")
        for p, seed, image in validation_images(pipe, cfg, self._validation_inputs, acc.autocast, stop_if_cancelled):
            image.save(tmp / f"{p}_{seed}.png", **FAST_PNG)
            bar.update(1)
            faults.hit("validation")
            if self.cancelled["flag"]:
                bar.close()
                raise Cancelled()
        bar.close()
        (tmp / ".complete").write_text("")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
