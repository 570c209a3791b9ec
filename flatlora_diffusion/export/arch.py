"""Which base model family a LoRA belongs to: SD 1.x ("sd15"), SD 2.x ("sd2") or SDXL ("sdxl"), from the
models that carry it or from its module names and shapes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import names
from .lora import ExportError, Lora
from .names import SD2, SD15, SDXL, TE1, TE2, UNET


def check_arch(arch: str | None) -> None:
    if arch is not None and arch not in names.ARCHS:
        raise ExportError(f"unknown architecture {arch!r}; expected one of {', '.join(names.ARCHS)}")


def arch_from_models(components: Mapping[str, torch.nn.Module | None]) -> str:
    if components.get(TE2) is not None:
        return SDXL
    unet = components.get(UNET)
    config = getattr(unet, "config", None)
    if config is not None:
        if getattr(config, "addition_embed_type", None) == "text_time":
            return SDXL
        if getattr(config, "cross_attention_dim", None) == 1024:
            return SD2
    text_encoder = components.get(TE1)
    hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    return SD2 if hidden == 1024 else SD15


@dataclass
class ArchGuess:
    arch: str
    confident: bool  # False: nothing but "an SD-1.x-like structure" points at the answer
    weak_family: bool = False  # SD 1.x vs 2.x decided by structure only


def detect_arch(lora: Lora, kohya_te1: bool = False, ldm_hint: str | None = None) -> ArchGuess:
    """SD 1.x ("sd15"), SD 2.x ("sd2") or SDXL ("sdxl") from names and shapes.

    SDXL: a second text encoder (te2 / text_encoder_2, or kohya's te1 naming), the added-condition
    embedding (add_embedding / label_emb), more than one transformer per attention block, or
    cross-attention keys of width 2048. SD 2.x: cross-attention or text-encoder width 1024.
    SD 1.x: width 768, attention at the UNet's full resolution, or a fourth UNet level. Tiny test
    models have none of the widths, so the block structure decides; with no evidence at all the
    single-text-encoder, one-transformer-per-block layout of SD 1.x is assumed (confident=False).
    """
    sdxl: list[str] = []
    sd_family: list[str] = []
    widths: set[int] = set()
    te_widths: set[int] = set()
    if lora.get(TE2):
        sdxl.append("a second text encoder")
    if kohya_te1:
        sdxl.append("lora_te1_ names")
    if ldm_hint == SDXL:
        sdxl.append("SDXL block layout")
    elif ldm_hint in (SD15, SD2):
        sd_family.append("SD block layout")
    for path, module in lora.get(UNET, {}).items():
        if path.startswith("add_embedding."):
            sdxl.append("add_embedding")
        m = re.search(r"transformer_blocks\.(\d+)\.", path)
        if m and int(m.group(1)) >= 1:
            sdxl.append("several transformers per block")
        if re.match(r"down_blocks\.0\.attentions\.|up_blocks\.3\.|down_blocks\.3\.", path):
            sd_family.append("four UNet levels / attention at full resolution")
        if re.search(r"attn2\.(to_k|to_v)$", path):
            widths.add(int(module.down.shape[1]))
    for path, module in lora.get(TE1, {}).items():
        if re.search(r"self_attn\.(q_proj|k_proj|v_proj)$", path):
            te_widths.add(int(module.down.shape[1]))
    if 2048 in widths:
        sdxl.append("cross-attention width 2048")
    if widths & {768, 1024} or (not sdxl and te_widths & {768, 1024}):
        sd_family.append("cross-attention / text width 768 or 1024")
    if sdxl and sd_family:
        raise ExportError(
            f"unknown architecture: {sdxl[0]} points at SDXL, {sd_family[0]} at SD 1.x/2.x"
        )
    if sdxl:
        return ArchGuess(SDXL, True)
    is_sd2 = 1024 in widths or (not widths and 1024 in te_widths)
    if not lora.get(UNET) and not lora.get(TE1):
        raise ExportError("unknown architecture: the LoRA has neither UNet nor text-encoder modules")
    if sd_family:
        return ArchGuess(SD2 if is_sd2 else SD15, True, weak_family=not (widths or te_widths))
    return ArchGuess(SD15, False, weak_family=True)
