"""Naming rules of LoRA files for Stable Diffusion 1.x / 2.x and SDXL.

Three spellings of the same module meet here:

* the diffusers module path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
  (our canonical form; text-encoder paths always carry ``text_model.``, see below),
* the kohya name that ComfyUI and AUTOMATIC1111 load: a prefix (``lora_unet_``, ``lora_te_``,
  ``lora_te1_``, ``lora_te2_``) plus the path with every "." replaced by "_",
* the original-SD ("LDM") UNet path that sd-scripts writes for SDXL, e.g.
  ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.

Replacing "." by "_" is lossy (``to_out_0``, ``transformer_blocks``), so kohya names are read back
with a vocabulary of the multi-word module names that occur in UNet2DConditionModel and CLIP, and
every result is checked against the grammar of module paths below: a name outside it is rejected
instead of guessed.

transformers >= 5.6 dropped the ``.text_model`` level of CLIPTextModel (CLIPTextModelWithProjection
keeps it). Both UIs only know ``lora_te*_text_model_encoder_layers_...``, so the canonical
text-encoder path always starts with ``text_model.``; `model_relative_te_path` strips it again where
a module path of a flattened model is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..unet_blocks import SD_LAYOUT, SDXL_LAYOUT, ldm_to_diffusers

UNET = "unet"
TE1 = "text_encoder"
TE2 = "text_encoder_2"
COMPONENTS = (UNET, TE1, TE2)

SD15, SD2, SDXL = "sd15", "sd2", "sdxl"
ARCHS = (SD15, SD2, SDXL)

# kohya's tensor suffixes -> the part of a LoRA module each holds
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora"}

# ----------------------------------------------------------------------------------------------
# Grammar of module paths (diffusers spelling)
# ----------------------------------------------------------------------------------------------

_N = r"\d+"
_BLOCK = rf"(?:down_blocks\.{_N}|up_blocks\.{_N}|mid_block)"
_TRANSFORMER = (
    rf"transformer_blocks\.{_N}\.(?:norm[123]|attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))"
)
_UNET_PATH = (
    rf"(?:{_BLOCK}\.attentions\.{_N}\.(?:norm|proj_in|proj_out|{_TRANSFORMER})"
    rf"|{_BLOCK}\.resnets\.{_N}\.(?:norm1|norm2|conv1|conv2|time_emb_proj|conv_shortcut)"
    rf"|down_blocks\.{_N}\.downsamplers\.0\.conv|up_blocks\.{_N}\.upsamplers\.0\.conv"
    r"|conv_in|conv_out|conv_norm_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])"
)
_TE_PATH = (
    rf"(?:text_model\.(?:encoder\.layers\.{_N}\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"
    r"|mlp\.fc[12]|layer_norm[12])|embeddings\.(?:token_embedding|position_embedding)|final_layer_norm)"
    r"|text_projection)"
)
UNET_PATH_RE = re.compile(rf"^{_UNET_PATH}$")
TE_PATH_RE = re.compile(rf"^{_TE_PATH}$")

# A complete kohya key: prefix, module path with "_" for ".", and one of the tensor suffixes.
KOHYA_KEY_RE = re.compile(
    r"^(?:lora_unet_{unet}|lora_te[12]?_{te})\.(?:{suffixes})$".format(
        unet=_UNET_PATH.replace(r"\.", "_"), te=_TE_PATH.replace(r"\.", "_"),
        suffixes="|".join(re.escape(suffix) for suffix in KOHYA_SUFFIXES),
    )
)


def is_valid_path(component: str, path: str) -> bool:
    """Whether `path` is a module path that `component` of an SD/SDXL pipeline can have."""
    pattern = UNET_PATH_RE if component == UNET else TE_PATH_RE
    return pattern.match(path) is not None


# ----------------------------------------------------------------------------------------------
# Canonical paths
# ----------------------------------------------------------------------------------------------

_PEFT_WRAPPER_PREFIXES = ("base_model.model.",)
_TE_INNER_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")


def canonical_path(component: str, path: str) -> str:
    """The canonical module path: no peft wrapper prefix, ``text_model.`` restored for text encoders."""
    for prefix in _PEFT_WRAPPER_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix) :]
    if component != UNET and path.startswith(_TE_INNER_ROOTS):
        path = "text_model." + path
    return path


def model_relative_te_path(path: str) -> str:
    """The text-encoder path without ``text_model.``.

    It names the module in a flattened CLIPTextModel and, as a peft target or pattern (matched as a
    suffix), also the module in a CLIP model that still has ``.text_model``.
    """
    return path[len("text_model.") :] if path.startswith("text_model.") else path


# ----------------------------------------------------------------------------------------------
# kohya names
# ----------------------------------------------------------------------------------------------


def kohya_prefix(component: str, arch: str) -> str:
    if component == UNET:
        return "lora_unet_"
    if component == TE1:
        return "lora_te1_" if arch == SDXL else "lora_te_"
    if component == TE2:
        if arch != SDXL:
            raise ValueError("a second text encoder only exists in SDXL")
        return "lora_te2_"
    raise ValueError(f"unknown component {component!r}")


def kohya_module_name(component: str, path: str, arch: str) -> str:
    """``lora_unet_down_blocks_1_...`` / ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``."""
    return kohya_prefix(component, arch) + canonical_path(component, path).replace(".", "_")


# Multi-word module names (longest first when they share a start). Everything else is one word.
_COMPOUNDS = sorted(
    {
        # diffusers UNet
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "add_embedding", "linear_1", "linear_2",
        # CLIP
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
        "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
        # original-SD (LDM) UNet
        "input_blocks", "middle_block", "output_blocks", "in_layers", "emb_layers", "out_layers",
        "skip_connection", "time_embed", "label_emb",
    },
    key=lambda word: -word.count("_"),
)
_COMPOUND_PARTS = [(word, word.split("_")) for word in _COMPOUNDS]


def split_underscored(name: str) -> str:
    """Turn an underscore-joined module name back into a dotted path, using the module vocabulary."""
    words = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(words):
        for word, parts in _COMPOUND_PARTS:
            if words[i : i + len(parts)] == parts:
                out.append(word)
                i += len(parts)
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


_KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_te1_", TE1), ("lora_te2_", TE2), ("lora_te_", TE1))
KOHYA_PREFIXES = tuple(prefix for prefix, _ in _KOHYA_PREFIXES)


def parse_kohya_module_name(name: str) -> tuple[str, str, str]:
    """``lora_te2_text_model_...`` -> (component, dotted path, kohya prefix). Raises ValueError."""
    for prefix, component in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            return component, split_underscored(name[len(prefix) :]), prefix
    raise ValueError(f"not a kohya LoRA module name: {name!r}")


# ----------------------------------------------------------------------------------------------
# Original-SD (LDM) UNet paths -> diffusers paths (the block table is unet_blocks.py)
# ----------------------------------------------------------------------------------------------

_LDM_LAYOUT = {SD15: SD_LAYOUT, SD2: SD_LAYOUT, SDXL: SDXL_LAYOUT}
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")


def is_ldm_unet_path(path: str) -> bool:
    return path.startswith(_LDM_ROOTS)


def ldm_to_diffusers_unet_path(path: str, arch: str) -> str | None:
    """Map an original-SD UNet module path to the diffusers path, or None if it has no counterpart."""
    return ldm_to_diffusers(path, _LDM_LAYOUT[arch])


def ldm_arch_hint(paths: Iterable[str]) -> str | None:
    """SD-family or SDXL from the block layout of original-SD UNet paths (None when undecided)."""
    sd_family = sdxl = False
    for path in paths:
        m = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)$", path)
        if path.startswith("label_emb."):
            sdxl = True
        if not m:
            continue
        kind, n, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if n > 8:  # SDXL has 9 input/output blocks, SD 1.x/2.x 12
            sd_family = True
        is_attn = j == 1 and not rest.startswith("conv")
        if kind == "input_blocks" and is_attn and n in (1, 2):  # attention at full resolution
            sd_family = True
        if kind == "output_blocks" and is_attn and n in (0, 1, 2):  # attention in the lowest level
            sdxl = True
        if re.match(r"transformer_blocks\.[1-9]", rest):
            sdxl = True
    if sd_family and sdxl:
        return "conflict"
    return SDXL if sdxl else (SD15 if sd_family else None)
