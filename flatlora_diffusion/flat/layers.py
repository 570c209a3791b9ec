"""Which layers Flat-LoRA perturbs: every peft LoRA Linear / zero-padded Conv2d layer, with its frozen base
layer, its noise identity and its merged weight W' = W + s B A (what the noise scale is taken from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .keys import stable_id


@dataclass(frozen=True)
class FlatLayer:
    """One perturbed layer: the peft LoRA layer, its innermost frozen base layer, and its noise identity."""

    name: str  # "<model index>.<module path>", unique across the models handed to FlatLoRA
    lora_layer: nn.Module
    base: nn.Module
    layer_id: int

    @property
    def fan_in(self) -> int:
        return self.base.weight[0].numel()

    def merged_weight(self) -> torch.Tensor:
        """W' = W + sum of the active adapters' scaling * B @ A, in fp32 (what the noise scale is taken from).
        W is the weight as stored: a float8-stored W (--low_memory) enters ||W'_i|| as its float8 value, upcast
        exactly, the same W that W + eps is formed from."""
        layer = self.lora_layer
        weight = self.base.weight.detach().float()
        if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
            return weight  # merged adapters are already inside W; disabled ones contribute nothing
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).detach().float()
        return weight


def find_lora_layers(models: Iterable[nn.Module]) -> list[FlatLayer]:
    """Every peft LoRA Linear/Conv2d layer in `models` (deduplicated), in a stable order."""
    from peft.tuners.lora.layer import LoraLayer

    layers: list[FlatLayer] = []
    seen: set[int] = set()
    for model_index, model in enumerate(models):
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or id(module) in seen:
                continue
            base = module.get_base_layer()
            if type(base) not in (nn.Linear, nn.Conv2d):
                continue  # embeddings, Conv1d/3d, quantised layers: Flat-LoRA perturbs Linear and Conv2d only
            if isinstance(base, nn.Conv2d) and (base.padding_mode != "zeros" or isinstance(base.padding, str)):
                raise ValueError(
                    f"Flat-LoRA supports zero-padded Conv2d with numeric padding; {module_name} has "
                    f"padding={base.padding!r}, padding_mode={base.padding_mode!r}"
                )
            seen.add(id(module))
            name = f"{model_index}.{module_name}"
            layers.append(FlatLayer(name=name, lora_layer=module, base=base, layer_id=stable_id(name)))
    return layers
