"""From the user's images to the StepBatch of each step: the dataset and loader (with class images and the
latent cache), VAE latents, and the text inputs (token ids, or cached embeddings while the encoders are frozen)."""

from __future__ import annotations

import torch


class LatentCache(torch.utils.data.Dataset):
    """The dataset with every item's pixels replaced by its VAE latents, encoded once (--cache_latents).

    As in diffusers' scripts, each image's crop is then that of the first epoch. Its flip is not: with
    --random_flip both orientations are encoded and each epoch takes the one the dataset's own draw picks, so a
    cached run flips exactly as an uncached one (at twice the encoding, once)."""

    def __init__(self, dataset, encode):
        self.dataset = dataset
        self.both_flips = bool(getattr(dataset, "random_flip", False))
        self.items = []  # per item: (examples as drawn) or (unflipped examples, flipped examples)
        # Pixels seen before (an instance picture under --repeats, a class picture again when the instance
        # pictures outnumber them) reuse their latents: `encode` gives the same latents for the same pixels.
        encoded: dict[bytes, torch.Tensor] = {}
        for i in range(len(dataset)):
            views = [dataset.oriented(i, False), dataset.oriented(i, True)] if self.both_flips else [dataset[i]]
            for view in views:
                for e in view:
                    key = _pixels_key(e.pixel_values)
                    if key not in encoded:
                        encoded[key] = encode(e.pixel_values[None])[0].cpu()
                    e.pixel_values = encoded[key]
            self.items.append(tuple(views))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if not self.both_flips:
            return self.items[i][0]
        plain, flipped = self.items[i]
        return tuple(f if self.dataset.flipped(i, e.is_class) else e for e, f in zip(plain, flipped))

    def bucket_of(self, i):
        return self.dataset.bucket_of(i)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    @property
    def epoch(self):
        return self.dataset.epoch


def _pixels_key(pixels: torch.Tensor) -> bytes:
    """A digest of a picture's pixel values, shape and dtype (equal pictures, equal keys)."""
    import hashlib

    digest = hashlib.blake2b(str((tuple(pixels.shape), pixels.dtype)).encode())
    digest.update(pixels.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


class BatchesMixin:
    """Part of Trainer (see trainer.py for the state it shares)."""

    def _prepare_data(self) -> None:
        from ..data import (BucketConfig, DreamBoothDataset, load_class_records, load_hf_dataset_records,
                            make_dataloader)

        cfg = self.cfg
        records = self.plan.records
        if records is None:
            records = load_hf_dataset_records(cfg.dataset_name, cfg.dataset_config_name, cfg.image_column,
                                              cfg.caption_column, cfg.instance_prompt, cfg.cache_dir)
        class_records = None
        if cfg.with_prior_preservation:
            self._generate_class_images()
            class_records = load_class_records(cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images,
                                               cfg.caption_extension)
        buckets = None
        if cfg.aspect_ratio_buckets:
            buckets = BucketConfig(min_reso=cfg.min_bucket_reso, max_reso=cfg.max_bucket_reso,
                                   step=cfg.bucket_reso_steps, no_upscale=cfg.bucket_no_upscale)
        self.dataset = DreamBoothDataset(records, class_records, resolution=cfg.resolution, center_crop=cfg.center_crop,
                                         random_flip=cfg.random_flip, interpolation=cfg.image_interpolation_mode,
                                         buckets=buckets, repeats=cfg.repeats, seed=cfg.seed)
        # Every prompt a step can see, for ParkingMixin to encode before the text encoders leave the GPU.
        self.training_prompts = list(dict.fromkeys(r.caption for r in [*records, *(class_records or [])]))
        self.num_images = len(records)
        self.num_class_images = len(class_records or [])
        if cfg.cache_latents:
            self._status("caching latents")
            self.dataset = LatentCache(self.dataset, self._encode_pixels)
        self.dataloader = make_dataloader(self.dataset, cfg.train_batch_size, cfg.seed, cfg.dataloader_num_workers)
        self.embedding_cache: dict[str, tuple] = {}

    @torch.no_grad()
    def _encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        latents = vae.encode(pixel_values.to(self.acc.device, vae.dtype)).latent_dist.sample(
            generator=torch.Generator(device=self.acc.device).manual_seed(0)
        )
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    def _text_inputs(self, prompts: list[str]) -> dict:
        """input_ids (text encoders trained) or cached embeddings (frozen)."""
        from ..models import tokenize
        from ..step import encode_prompts

        c = self.components
        if self.cfg.train_text_encoder or not self.cfg.cache_text_embeddings:
            return {"input_ids": [tokenize(tok, prompts) for tok in c.tokenizers]}
        missing = [p for p in dict.fromkeys(prompts) if p not in self.embedding_cache]
        if missing:  # (after parking, every training prompt is cached: the encoders come back only for a stranger)
            with torch.no_grad(), self.acc.autocast(), self._parked_models_on_device():
                embeds, pooled = encode_prompts(c.text_encoders, [tokenize(t, missing) for t in c.tokenizers], c.arch)
            for i, p in enumerate(missing):
                self.embedding_cache[p] = (embeds[i], None if pooled is None else pooled[i])
        embeds = torch.stack([self.embedding_cache[p][0] for p in prompts])
        pooled = torch.stack([self.embedding_cache[p][1] for p in prompts]) if self.is_sdxl else None
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _make_step_batch(self, batch: dict):
        from ..step import StepBatch

        if self.cfg.cache_latents:
            latents = batch["pixel_values"].to(self.acc.device)  # LatentCache put latents there
        else:
            latents = self._encode_pixels(batch["pixel_values"])
        time_ids = batch["time_ids"].to(self.acc.device, self.weight_dtype) if self.is_sdxl else None
        return StepBatch(latents=latents, time_ids=time_ids, n_class=int(batch["is_class"].sum()),
                         **self._text_inputs(batch["prompts"]))
