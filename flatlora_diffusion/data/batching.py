"""Batches: a bucket-aware, seeded batch sampler, the collate function (instance examples first, then class
examples), and the DataLoader that puts them together."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .dataset import DreamBoothDataset, TrainExample
from .errors import DataError
from .seeds import derive_seed


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices whose items share one bucket (one target size), shuffled per epoch.

    Indices are shuffled within each bucket, cut into batches (the last one of a bucket may be
    short unless ``drop_last``), and the batches of all buckets shuffled together; the order
    comes from ``(seed, epoch)`` only. With buckets off every item shares one bucket, so this is
    a plain seeded shuffling batch sampler.

    The epoch is the dataset's: ``set_epoch`` here sets it there too, and accelerate's prepared
    loader calls ``dataset.set_epoch`` when it wraps this sampler for several processes.
    """

    def __init__(self, dataset: DreamBoothDataset, batch_size: int, seed: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise DataError(f"--train_batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(dataset)):
            groups.setdefault(dataset.bucket_of(i), []).append(i)
        self._groups = [groups[k] for k in sorted(groups)]

    @property
    def epoch(self) -> int:
        return getattr(self.dataset, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        div = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return sum(div(len(g)) for g in self._groups)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "batches"))
        batches = []
        for group in self._groups:
            order = [group[j] for j in torch.randperm(len(group), generator=gen).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        for j in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[j]


def collate_fn(items: Sequence[TrainExample | Sequence[TrainExample]]) -> dict[str, Any]:
    """Stack dataset items into a batch: all instance examples first, then all class examples.

    Returns ``pixel_values`` [B, C, H, W], ``prompts`` (list of B str), ``original_sizes``,
    ``crop_top_lefts``, ``target_sizes`` (long [B, 2]), ``time_ids`` (float [B, 6]: SDXL's
    add_time_ids, original + crop + target) and ``is_class`` (bool [B]).
    """
    flat: list[TrainExample] = []
    for item in items:
        flat.extend([item] if isinstance(item, TrainExample) else item)
    examples = [e for e in flat if not e.is_class] + [e for e in flat if e.is_class]
    shapes = {tuple(e.pixel_values.shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"images of one batch have different sizes {sorted(shapes)}; "
                         f"with buckets, batch with BucketBatchSampler")
    original = torch.tensor([e.original_size for e in examples], dtype=torch.long)
    crop = torch.tensor([e.crop_top_left for e in examples], dtype=torch.long)
    target = torch.tensor([e.target_size for e in examples], dtype=torch.long)
    return {
        "pixel_values": torch.stack([e.pixel_values for e in examples]).contiguous(),
        "prompts": [e.prompt for e in examples],
        "original_sizes": original,
        "crop_top_lefts": crop,
        "target_sizes": target,
        "time_ids": torch.cat([original, crop, target], dim=1).float(),
        "is_class": torch.tensor([e.is_class for e in examples], dtype=torch.bool),
    }


def make_dataloader(
    dataset: DreamBoothDataset, batch_size: int, seed: int, num_workers: int = 0, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with :class:`BucketBatchSampler` and :func:`collate_fn`.

    It carries its own generator: a DataLoader without one draws its base seed from the global
    torch RNG at every epoch, shifting the loop's noise and timestep draws.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=BucketBatchSampler(dataset, batch_size, seed, drop_last=drop_last),
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(derive_seed(seed, "loader")),
    )
