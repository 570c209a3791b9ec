"""PiSSA initialisation, and turning a PiSSA-trained LoRA back into one for the ORIGINAL base model.

PiSSA (Meng et al. 2024) starts A, B from the principal singular vectors of W and trains on the residual
base W_res = W - s*B0@A0 (peft writes W_res into the frozen weight). A LoRA file applied by ComfyUI,
AUTOMATIC1111 or diffusers is added to the original W, so the delta to ship is

    W_res + s*B@A - W = s*(B@A - B0@A0) = s * [B, -B0] @ [A; A0],

a LoRA of rank 2r with the same scale (kohya alpha doubles so that alpha / rank is unchanged). This is
what peft's `path_initial_model_for_weight_conversion` does, built here on the export's own LoRA records.
Flat-LoRA composes with it unchanged: the noise scale is taken from W' = W_res + s*B@A.
"""

from __future__ import annotations

import torch

from .export import Lora, LoraModule


def snapshot(lora: Lora) -> Lora:
    """A detached copy of the initial (A0, B0) of every module, taken right after initialisation."""
    return {
        component: {
            path: LoraModule(down=m.down.detach().clone(), up=m.up.detach().clone(), alpha=m.alpha)
            for path, m in modules.items()
        }
        for component, modules in lora.items()
    }


def to_original_base(trained: Lora, initial: Lora) -> Lora:
    """The rank-2r LoRA that moves the ORIGINAL base weight exactly as training moved the residual one."""
    out: Lora = {}
    for component, modules in trained.items():
        out[component] = {}
        for path, m in modules.items():
            m0 = initial[component][path]
            if m.dora_scale is not None:
                raise ValueError("PiSSA with DoRA cannot be converted to a plain LoRA file")
            down = torch.cat([m.down, m0.down.to(m.down)], dim=0)
            up = torch.cat([m.up, -m0.up.to(m.up)], dim=1)
            out[component][path] = LoraModule(down=down, up=up, alpha=2 * m.alpha)
    return out
