"""The UNet's block numbering: diffusers module paths <-> original Stable Diffusion ("LDM") paths.

One table, read in both directions: kohya LoRA files that sd-scripts writes for SDXL carry LDM names
(``input_blocks.4.1.transformer_blocks.0.attn1.to_q``) that export reads back as diffusers paths, and the
tiny test models are written as single-file checkpoints in the LDM layout (tiny/single_file.py).

The LDM UNet is a flat list of input blocks (conv_in, then per level `layers_per_block` resnet[+attention]
blocks and, except on the last level, a downsampler), a 3-part middle block (resnet, attention, resnet), and
a flat list of output blocks (per level `layers_per_block + 1` resnet[+attention] blocks, the last one of a
level followed, except on the last level, by the upsampler).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# Inside a resnet block (LDM -> diffusers); attention blocks keep their inner names.
LDM_RESNET_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_DIFFUSERS_RESNET_TO_LDM = {d: ldm for ldm, d in LDM_RESNET_TO_DIFFUSERS.items()}

# Modules outside the numbered blocks (LDM -> diffusers).
LDM_TOP_TO_DIFFUSERS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

RESNET, ATTENTION, MODULE = "resnet", "attention", "module"


@dataclass(frozen=True)
class UNetLayout:
    """What the numbering depends on: the number of levels, layers per level, and which levels have attention
    (down levels count from full resolution, up levels in running order)."""

    levels: int
    layers_per_block: int
    down_attention: frozenset[int]
    up_attention: frozenset[int]

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        """The layout of a diffusers UNet2DConditionModel config (one layers_per_block for all levels)."""
        if not isinstance(config.layers_per_block, int):
            raise ValueError("per-level layers_per_block has no original-SD layout")
        return cls(
            levels=len(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_attention=frozenset(i for i, t in enumerate(config.down_block_types) if "CrossAttn" in t),
            up_attention=frozenset(i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t),
        )


# The released architectures (both use layers_per_block = 2).
SD_LAYOUT = UNetLayout(4, 2, frozenset({0, 1, 2}), frozenset({1, 2, 3}))  # SD 1.x and 2.x
SDXL_LAYOUT = UNetLayout(3, 2, frozenset({1, 2}), frozenset({0, 1}))


@lru_cache(maxsize=None)
def block_table(layout: UNetLayout) -> tuple[tuple[str, str, str], ...]:
    """(LDM path, diffusers path, kind) of every block and top-level module. kind: RESNET (inner names mapped
    by LDM_RESNET_TO_DIFFUSERS), ATTENTION (inner names equal) or MODULE (the path is the whole module)."""
    rows = [(ldm, d, MODULE) for ldm, d in LDM_TOP_TO_DIFFUSERS.items()]
    per_level = layout.layers_per_block + 1
    last = layout.levels - 1
    for level in range(layout.levels):
        for k in range(layout.layers_per_block):
            n = 1 + level * per_level + k
            rows.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{k}", RESNET))
            if level in layout.down_attention:
                rows.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{k}", ATTENTION))
        if level != last:
            n = 1 + level * per_level + layout.layers_per_block
            rows.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", MODULE))
    rows += [
        ("middle_block.0", "mid_block.resnets.0", RESNET),
        ("middle_block.1", "mid_block.attentions.0", ATTENTION),
        ("middle_block.2", "mid_block.resnets.1", RESNET),
    ]
    for level in range(layout.levels):
        for k in range(per_level):
            n = level * per_level + k
            rows.append((f"output_blocks.{n}.0", f"up_blocks.{level}.resnets.{k}", RESNET))
            if level in layout.up_attention:
                rows.append((f"output_blocks.{n}.1", f"up_blocks.{level}.attentions.{k}", ATTENTION))
        if level != last:
            n = level * per_level + layout.layers_per_block
            slot = 2 if level in layout.up_attention else 1  # after the attention, where the level has one
            rows.append((f"output_blocks.{n}.{slot}.conv", f"up_blocks.{level}.upsamplers.0.conv", MODULE))
    return tuple(rows)


@lru_cache(maxsize=None)
def _rows(layout: UNetLayout, to_ldm: bool) -> tuple[tuple[str, str, str], ...]:
    """The table as (source prefix, target prefix, kind) for one direction."""
    return tuple((d, ldm, kind) if to_ldm else (ldm, d, kind) for ldm, d, kind in block_table(layout))


def _translate(path: str, layout: UNetLayout, to_ldm: bool) -> str | None:
    inner = _DIFFUSERS_RESNET_TO_LDM if to_ldm else LDM_RESNET_TO_DIFFUSERS
    for source, target, kind in _rows(layout, to_ldm):
        if kind == MODULE:
            if path == source:
                return target
        elif path.startswith(source + "."):
            rest = path[len(source) + 1:]
            if kind == ATTENTION:
                return f"{target}.{rest}"
            mapped = inner.get(rest)
            return f"{target}.{mapped}" if mapped else None
    return None


def ldm_to_diffusers(path: str, layout: UNetLayout) -> str | None:
    """The diffusers module path of an LDM UNet module path, or None where the layout has no such module."""
    return _translate(path, layout, to_ldm=False)


def diffusers_to_ldm(path: str, layout: UNetLayout) -> str | None:
    """The LDM module path of a diffusers UNet module path, or None where the layout has no such module."""
    return _translate(path, layout, to_ldm=True)
