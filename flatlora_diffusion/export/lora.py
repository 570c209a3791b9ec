"""The one normalized form every LoRA file is read into and written from.

`Lora`: component ("unet", "text_encoder", "text_encoder_2") -> canonical module path (names.py) ->
`LoraModule` (down [r, in], up [out, r], alpha with scale = alpha / r, optional DoRA scale).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


class ExportError(Exception):
    """A LoRA file cannot be read or written; the message is one line meant for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class LoraModule:
    down: torch.Tensor  # lora_A / lora_down: [r, in] (conv: [r, in, kh, kw])
    up: torch.Tensor  # lora_B / lora_up: [out, r] (conv: [out, r, 1, 1])
    alpha: float  # scale = alpha / r, as kohya's .alpha
    dora_scale: torch.Tensor | None = None  # kohya orientation: [out, 1, ...] or [1, in, ...]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def magnitude(self) -> torch.Tensor | None:
        """The DoRA magnitude per output channel, shape [out] (None without DoRA)."""
        if self.dora_scale is None:
            return None
        out = int(self.up.shape[0])
        if self.dora_scale.shape[0] == out and self.dora_scale.numel() == out:
            return self.dora_scale.reshape(out)
        raise ExportError(
            "this DoRA file stores input-axis magnitudes (LyCORIS wd_on_out=False); peft/diffusers DoRA is "
            "per output channel and cannot represent it"
        )


Lora = dict[str, dict[str, LoraModule]]


def most_common(values):
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)  # deterministic on ties
