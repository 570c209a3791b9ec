"""LoRA state dicts and files -> Lora: kohya files (diffusers or original-SD UNet names) and every spelling of
diffusers / peft keys that diffusers has written (peft lora_A/B, lora.down/up, lora_linear_layer, processor
names of diffusers < 0.21), each checked against the grammar of module paths (names.py)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..safetensors_io import SafetensorsFormatError, read_header
from . import names
from .arch import ArchGuess, check_arch, detect_arch
from .lora import ExportError, Lora, LoraModule
from .names import SD2, SD15, SDXL, TE1, TE2, UNET
from .writers import LORA_ADAPTER_METADATA_KEY, lora_to_diffusers, lora_to_kohya


_LYCORIS_MARKERS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", "lora_mid", "oft_blocks", "oft_diag", "w_norm", "b_norm")

# Suffixes of diffusers/peft spellings, longest first where they overlap.
_DIFFUSERS_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".dora_scale", "dora"),
    (".alpha", "alpha"),
)
_COMPONENT_PREFIXES = ((TE2 + ".", TE2), (TE1 + ".", TE1), (UNET + ".", UNET))
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")
# Old attention-processor names (diffusers < 0.21) and the modules they stand for.
_OLD_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class _UnknownKey(Exception):
    pass


def _diffusers_module_path(component: str, module: str) -> str:
    """Normalize every diffusers spelling of a module path to the canonical one."""
    module = module.replace(".processor.", ".")
    head, _, last = module.rpartition(".")
    last = last.removesuffix("_lora")
    proj = (_OLD_UNET_PROJ if component == UNET else _OLD_TE_PROJ).get(last)
    if proj is not None and (component == UNET or head.endswith("self_attn")):
        last = proj
    module = f"{head}.{last}" if head else last
    return names.canonical_path(component, module)


def _split_diffusers_key(key: str) -> tuple[str, str, str]:
    for suffix, kind in _DIFFUSERS_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        raise _UnknownKey(key)
    for prefix, component in _COMPONENT_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
            break
    else:
        first = module.split(".", 1)[0]
        if module.startswith(_UNET_ROOTS):
            component = UNET
        elif module.startswith(("text_model.", "encoder.layers.")):
            component = TE1
        elif first in ("transformer", "prior", "decoder", "controlnet") or first.startswith("transformer"):
            raise ExportError(
                f"unknown architecture: the LoRA targets a {first!r} component (not a SD 1.x/2.x or SDXL UNet)"
            )
        else:
            raise _UnknownKey(key)
    return component, _diffusers_module_path(component, module), kind


def _kohya_parts(key: str) -> tuple[str, str, str, str]:
    name, _, suffix = key.partition(".")
    kind = names.KOHYA_SUFFIXES.get(suffix)
    if kind is None:
        raise _UnknownKey(key)
    component, path, prefix = names.parse_kohya_module_name(name)
    return component, path, kind, prefix


def _resolve_pattern(patterns: Mapping, path: str):
    """peft's `get_pattern_key`: a pattern matches the module path or any dotted suffix of it."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return patterns[pattern]
    return None


def _alpha_from_adapter_metadata(config: Mapping, component: str, path: str, rank: int) -> float:
    """The kohya alpha (scale * r) of one module, as peft computes the scale from a LoraConfig dict."""
    model_path = path if component == UNET else names.model_relative_te_path(path)
    alpha = _resolve_pattern(config.get("alpha_pattern") or {}, model_path)
    if alpha is None:
        alpha = config.get("lora_alpha", config.get("r", rank))
    alpha = float(alpha)
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank) * rank
    return alpha


def _parse_adapter_metadata(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise ExportError(f"the file's {LORA_ADAPTER_METADATA_KEY} metadata is not valid JSON") from None
    per_component: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field:
            per_component.setdefault(component, {})[field] = value
    return per_component


def lora_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, arch: str | None = None
) -> tuple[Lora, str]:
    """Read any kohya or diffusers/peft SD 1.x/2.x or SDXL LoRA state dict: (Lora, arch)."""
    lora, guess = read_state_dict(state_dict, metadata, arch)
    return lora, arch or guess.arch


def read_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, arch: str | None
) -> tuple[Lora, "ArchGuess"]:
    check_arch(arch)
    if not state_dict:
        raise ExportError("the file holds no tensors")
    lycoris = sorted({m for key in state_dict for m in _LYCORIS_MARKERS if f".{m}" in key})
    if lycoris:
        raise ExportError(
            f"this is a LyCORIS file ({', '.join(lycoris)} tensors); only plain LoRA (lora_down/lora_up) is supported"
        )

    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    raw_paths: dict[tuple[str, str], str] = {}
    kohya_prefixes: set[str] = set()
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        try:
            if key.startswith(names.KOHYA_PREFIXES):
                component, path, kind, prefix = _kohya_parts(key)
                kohya_prefixes.add(prefix)
            else:
                component, path, kind = _split_diffusers_key(key)
        except (_UnknownKey, ValueError):
            unknown.append(key)
            continue
        slot = parts.setdefault((component, path), {})
        if kind in slot:
            raise ExportError(f"two tensors in the file name the same LoRA {kind} of {component}.{path}")
        slot[kind] = tensor
        raw_paths[(component, path)] = key

    if not parts:
        example = next(iter(state_dict))
        raise ExportError(f"not a LoRA file: none of its {len(state_dict)} tensors is a LoRA weight (e.g. {example!r})")
    if unknown:
        raise ExportError(f"unrecognised tensor {unknown[0]!r} ({len(unknown)} such) in the LoRA file")

    ldm_paths = [path for (component, path) in parts if component == UNET and names.is_ldm_unet_path(path)]
    hint = names.ldm_arch_hint(ldm_paths) if ldm_paths else None
    if hint == "conflict":
        raise ExportError("unknown architecture: the UNet block layout fits neither SD 1.x/2.x nor SDXL")

    adapter_metadata = _parse_adapter_metadata(metadata)
    modules: dict[tuple[str, str], LoraModule] = {}
    for (component, path), slot in parts.items():
        raw_key = raw_paths[(component, path)]
        if "down" not in slot or "up" not in slot:
            missing = "down/lora_A" if "down" not in slot else "up/lora_B"
            raise ExportError(f"{raw_key!r} has no matching {missing} weight")
        down, up = slot["down"], slot["up"]
        if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
            raise ExportError(
                f"LoRA weights of {component}.{path} do not fit: down {tuple(down.shape)}, up {tuple(up.shape)}"
            )
        rank = int(down.shape[0])
        if "alpha" in slot:
            alpha = float(slot["alpha"].float().item())
        elif component in adapter_metadata:
            alpha = _alpha_from_adapter_metadata(adapter_metadata[component], component, path, rank)
        else:
            alpha = float(rank)  # no alpha stored: diffusers' and the UIs' convention is scale 1
        dora = slot.get("dora")
        if "magnitude" in slot:
            dora = slot["magnitude"].reshape(int(up.shape[0]), *([1] * (down.dim() - 1)))
        if component == UNET and names.is_ldm_unet_path(path):
            ldm_arch = arch or hint
            if ldm_arch is None:
                ldm_arch = SDXL if TE2 in {c for c, _ in parts} or "lora_te1_" in kohya_prefixes else SD15
            mapped = names.ldm_to_diffusers_unet_path(path, ldm_arch)
            if mapped is None:
                raise ExportError(f"unknown architecture: no SD UNet module for {raw_key!r}")
            path = mapped
        if not names.is_valid_path(component, path):
            raise ExportError(
                f"unknown architecture: {raw_key!r} is not a SD 1.x/2.x or SDXL "
                f"{'UNet' if component == UNET else 'text encoder'} module"
            )
        if (component, path) in modules:
            raise ExportError(f"two LoRAs in the file target {component}.{path}")
        modules[(component, path)] = LoraModule(down=down, up=up, alpha=alpha, dora_scale=dora)

    lora: Lora = {}
    for (component, path), module in modules.items():
        lora.setdefault(component, {})[path] = module
    guess = detect_arch(lora, kohya_te1=("lora_te1_" in kohya_prefixes), ldm_hint=hint)
    if arch is not None and guess.confident and guess.arch != arch:
        if not ({arch, guess.arch} == {SD15, SD2} and guess.weak_family):
            raise ExportError(f"the LoRA looks like {guess.arch}, not {arch}")
    return lora, guess


def load_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import safetensors.torch

    if not path.exists():
        raise ExportError(f"input not found: {path}")
    if not path.is_file():
        raise ExportError(f"input is not a file: {path}")
    try:
        header, metadata = read_header(path)
    except SafetensorsFormatError as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}") from None
    if not header:
        raise ExportError(f"not a LoRA file: {path.name} holds no tensors")
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # the library's own complaint about a damaged file
        raise ExportError(f"{path.name} cannot be read as safetensors: {str(e).splitlines()[0]}") from None
    return tensors, metadata


def load_any_lora(path, arch: str | None = None) -> tuple[Lora, str]:
    """Read a kohya or diffusers/peft LoRA safetensors file for SD 1.x/2.x or SDXL: (Lora, arch).

    Understands peft ``lora_A``/``lora_B`` keys (with lora_alpha from diffusers'
    ``lora_adapter_metadata`` when present, else alpha = r as diffusers assumes), the older diffusers
    ``lora.down``/``lora.up``, ``lora_linear_layer`` and ``processor.to_q_lora`` spellings, and kohya
    files with diffusers or original-SD (LDM) UNet names. Raises ExportError with a one-line reason.
    """
    tensors, metadata = load_lora_file(Path(path))
    return lora_from_state_dict(tensors, metadata, arch=arch)


def kohya_to_diffusers(kohya_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya state dict -> (diffusers state dict, safetensors metadata with lora_adapter_metadata)."""
    lora, _ = lora_from_state_dict(kohya_sd)
    return lora_to_diffusers(lora)


def diffusers_to_kohya(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, arch: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """diffusers/peft state dict (+ its file metadata) -> (kohya state dict, arch)."""
    lora, arch = lora_from_state_dict(state_dict, metadata, arch=arch)
    return lora_to_kohya(lora, arch), arch
