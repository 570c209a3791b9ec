"""Regional compilation of the UNet (`--torch_compile`): torch.compile of each transformer block and ResNet block
alone, for the training step.

Compiling the whole SDXL UNet took 301 s before the first step (one H200; benchmarks/HISTORY.md) and bought 27 % of
the step at batch 4, mostly by fusing elementwise work and layout copies, which live inside these blocks. Blocks of
one shape share one compiled code (SDXL repeats a few shapes 70 times), so compiling them one by one costs a
fraction of that. Flat-LoRA's perturbed layers are excluded from compilation (flat/fused.py): the compiled code
breaks around them.

Validation sampling stays eager (`eager()`): it runs without gradients, so compiled blocks would compile a second
time for it.
"""

from __future__ import annotations

import torch
from torch import nn

# diffusers' class names of the regions in SD 1.x and SDXL UNets
REGIONS = ("BasicTransformerBlock", "ResnetBlock2D")

# All compiled regions share one code object (nn.Module._call_impl), with one cache entry per distinct shape and
# configuration: SDXL's ResNet blocks alone have about 15 (channels in and out, resolution), past dynamo's default
# limit of 8, beyond which it would run the rest eagerly without a word.
RECOMPILE_LIMIT = 128

BACKEND = "inductor"  # torch.compile's default; the tests trace with a counting backend instead of compiling


def compile_unet_blocks(unet: nn.Module, regions: tuple[str, ...] = REGIONS) -> int:
    """Mark every module of `unet` whose class is named in `regions` for compilation on its first call (nothing
    compiles here); returns how many."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    regions = [m for m in unet.modules() if type(m).__name__ in regions]
    for module in regions:
        module.compile(backend=BACKEND, dynamic=False)
    return len(regions)


def eager():
    """Within the block, compiled regions run their eager code (neither compiling nor running compiled code)."""
    return torch.compiler.set_stance("force_eager")


def uncompile_unet_blocks(unet: nn.Module) -> None:
    """Undo compile_unet_blocks (benchmarks time variants one after another on one UNet)."""
    for module in unet.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()

