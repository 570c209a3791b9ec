"""LoRA files that ComfyUI, AUTOMATIC1111 and diffusers load: kohya and diffusers formats, metadata.

Everything meets at one normalized form, `Lora`: component ("unet", "text_encoder",
"text_encoder_2") -> canonical module path (lora_names.py) -> `LoraModule` (down [r, in], up
[out, r], alpha with scale = alpha / r, optional DoRA scale). Readers turn in-memory peft models,
diffusers/peft files (all spellings diffusers has written) and kohya files into it; writers turn it
into a kohya file (the one both UIs load) or a diffusers file (what `pipe.load_lora_weights` loads,
with `lora_adapter_metadata` so that lora_alpha survives).

Why not diffusers' own `convert_state_dict_to_kohya`: it writes alpha = rank whatever lora_alpha
was, and it keeps the flattened transformers-5 CLIP paths (``lora_te1_encoder_layers_...``) that
neither UI knows. See /work/shared/facts/lora-files.md.

DoRA: peft's magnitude is per output channel (norm of each row of W + s·BA). It is written as
``.dora_scale`` of shape [out, 1] ([out, 1, 1, 1] for convolutions), LyCORIS' "wd_on_output"
layout, which ComfyUI and Forge tell from the input-axis layout [1, in] by its first dimension.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora_names as names
from .lora_names import SD2, SD15, SDXL, TE1, TE2, UNET
from .run_dir import CONFIG_FILE as RUN_CONFIG
from .run_dir import DIFFUSERS_WEIGHTS as RUN_WEIGHTS
from .safetensors_io import (
    SafetensorsFormatError,
    file_data_sha256,
    read_header,
    save_safetensors_atomic,
    tensors_data_sha256,
)

__all__ = [
    "ExportError",
    "LoraModule",
    "kohya_state_dict",
    "save_kohya_lora",
    "diffusers_file_contents",
    "diffusers_state_dict",
    "kohya_to_diffusers",
    "diffusers_to_kohya",
    "load_any_lora",
    "lora_from_models",
    "lora_from_state_dict",
    "lora_to_kohya",
    "lora_to_diffusers",
    "detect_arch",
    "build_metadata",
    "sshs_model_hash",
    "save_safetensors_atomic",
    "export_lora",
    "add_export_arguments",
    "run_export",
]

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("kohya", "diffusers")


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


# ==============================================================================================
# In-memory peft models -> Lora
# ==============================================================================================


def lora_from_models(components: Mapping[str, torch.nn.Module | None], adapter_name: str = "default") -> Lora:
    """Collect the LoRA layers of peft-wrapped models (``add_adapter`` or ``get_peft_model``).

    alpha is derived from each layer's own settings, so rank_pattern, alpha_pattern and rsLoRA come
    out right: alpha / r equals the layer's peft scaling.
    """
    from peft.tuners.lora import LoraLayer

    lora: Lora = {}
    for component, model in components.items():
        if model is None:
            continue
        model = _unwrap(model)
        if component not in names.COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {names.COMPONENTS}")
        modules: dict[str, LoraModule] = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if adapter_name in getattr(layer, "lora_embedding_A", {}):
                raise ExportError(f"{component}.{name}: LoRA on embeddings cannot be exported")
            if adapter_name not in layer.lora_A:
                continue
            if layer.lora_bias.get(adapter_name, False):
                raise ExportError(f"{component}.{name}: LoRA with a bias (lora_bias=True) cannot be exported")
            down = layer.lora_A[adapter_name].weight.detach()
            up = layer.lora_B[adapter_name].weight.detach()
            r = int(layer.r[adapter_name])
            scaling = float(layer.scaling[adapter_name])
            alpha = float(layer.lora_alpha[adapter_name])
            if layer.use_rslora.get(adapter_name, False):
                alpha = alpha * math.sqrt(r)
            if not math.isclose(alpha / r, scaling, rel_tol=1e-6):  # scale changed after creation
                alpha = scaling * r
            dora = None
            if layer.use_dora.get(adapter_name, False):
                magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach()
                dora = magnitude.reshape(int(up.shape[0]), *([1] * (down.dim() - 1)))
            path = names.canonical_path(component, name)
            modules[path] = LoraModule(down=down, up=up, alpha=alpha, dora_scale=dora)
        if modules:
            lora[component] = modules
    return lora


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers (their names add a prefix)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _arch_from_models(components: Mapping[str, torch.nn.Module | None]) -> str:
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


def _check_arch(arch: str | None) -> None:
    if arch is not None and arch not in names.ARCHS:
        raise ExportError(f"unknown architecture {arch!r}; expected one of {', '.join(names.ARCHS)}")


def kohya_state_dict(
    components: Mapping[str, torch.nn.Module | None], adapter_name: str = "default", arch: str | None = None
) -> dict[str, torch.Tensor]:
    """The kohya state dict (ComfyUI / AUTOMATIC1111) of in-memory peft-wrapped models.

    `components` maps "unet", "text_encoder", "text_encoder_2" to models. SDXL when
    "text_encoder_2" is given, the UNet is SDXL's (text_time added embedding), or `arch` says so.
    Tensors keep the models' dtype (meta tensors stay meta); alphas are float32 scalars.
    """
    _check_arch(arch)
    arch = arch or _arch_from_models(components)
    lora = lora_from_models(components, adapter_name)
    if not lora:
        raise ExportError(f"the models have no LoRA layers for adapter {adapter_name!r}")
    return lora_to_kohya(lora, arch)


def diffusers_state_dict(
    components: Mapping[str, torch.nn.Module | None], adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) in the format `pipe.load_lora_weights` loads, alpha kept."""
    lora = lora_from_models(components, adapter_name)
    if not lora:
        raise ExportError(f"the models have no LoRA layers for adapter {adapter_name!r}")
    return lora_to_diffusers(lora)


# ==============================================================================================
# Lora -> files
# ==============================================================================================


def lora_to_kohya(lora: Lora, arch: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya keys: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (0-dim float32), ``.dora_scale``."""
    _check_arch(arch)
    out: dict[str, torch.Tensor] = {}
    for component in names.COMPONENTS:
        for path, module in sorted(lora.get(component, {}).items()):
            name = names.kohya_module_name(component, path, arch)
            out[f"{name}.lora_down.weight"] = _cast(module.down, dtype)
            out[f"{name}.lora_up.weight"] = _cast(module.up, dtype)
            # float32 whatever the weights' dtype: alpha / r must equal the trained scale, and fp16
            # cannot hold e.g. lora_alpha * sqrt(r) of rsLoRA. Both UIs read it with .item().
            out[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
            if module.dora_scale is not None:
                out[f"{name}.dora_scale"] = _cast(module.dora_scale, dtype)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _most_common(values):
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)  # deterministic on ties


def _adapter_config(modules: dict[str, LoraModule], component: str) -> dict:
    """A LoraConfig dict (as diffusers stores it) that reproduces every module's rank and scale."""
    target = {}
    for path, module in modules.items():
        key = path if component == UNET else names.model_relative_te_path(path)
        target[key] = module
    r = _most_common(m.rank for m in target.values())
    alpha = _most_common(float(m.alpha) for m in target.values())
    doras = {m.dora_scale is not None for m in target.values()}
    if len(doras) > 1:
        raise ExportError(f"{component}: DoRA on some modules only cannot be written in diffusers format")
    for m in target.values():
        m.magnitude()  # input-axis DoRA cannot be expressed
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: m.rank for k, m in sorted(target.items()) if m.rank != r},
        "alpha_pattern": {k: float(m.alpha) for k, m in sorted(target.items()) if float(m.alpha) != alpha},
        "target_modules": sorted(target),
        "use_dora": doras == {True},
        "use_rslora": False,  # alpha already is the effective alpha: scale = alpha / r
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
    }


def lora_to_diffusers(lora: Lora, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft keys (``unet.<path>.lora_A.weight`` ...) plus the metadata diffusers reads lora_alpha from.

    Text-encoder keys keep ``text_model.``: diffusers strips it for a flattened CLIPTextModel and
    older transformers need it.
    """
    state: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, object] = {}
    for component in names.COMPONENTS:
        modules = lora.get(component)
        if not modules:
            continue
        for path, module in sorted(modules.items()):
            state[f"{component}.{path}.lora_A.weight"] = _cast(module.down, dtype)
            state[f"{component}.{path}.lora_B.weight"] = _cast(module.up, dtype)
            magnitude = module.magnitude()
            if magnitude is not None:
                if module.down.dim() > 2:  # peft keeps a conv magnitude as [1, out, 1, 1]
                    magnitude = magnitude.reshape(1, -1, *([1] * (module.down.dim() - 2)))
                # Text encoders load through transformers' peft integration, which expects the parameter
                # name "...lora_magnitude_vector.weight" (without it the magnitudes are silently dropped);
                # the UNet loader takes diffusers' bare name.
                suffix = "" if component == UNET else ".weight"
                state[f"{component}.{path}.lora_magnitude_vector{suffix}"] = _cast(magnitude, dtype)
        for key, value in _adapter_config(modules, component).items():
            adapter_metadata[f"{component}.{key}"] = value
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    return state, metadata


# ==============================================================================================
# State dicts / files -> Lora
# ==============================================================================================

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
    lora, guess = _read_state_dict(state_dict, metadata, arch)
    return lora, arch or guess.arch


def _read_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, arch: str | None
) -> tuple[Lora, "ArchGuess"]:
    _check_arch(arch)
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


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    tensors, metadata = _load_file(Path(path))
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


# ==============================================================================================
# Metadata
# ==============================================================================================

_BASE_MODEL_VERSION = {SD15: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}
_DEFAULT_RESOLUTION = {SD15: 512, SD2: 768, SDXL: 1024}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# metadata keys that carry the file's own facts (recomputed on every export, never carried over)
_STRUCTURAL_KEYS = (
    "ss_base_model_version",
    "ss_v2",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.sai_model_spec",
)


def _str(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _present(value) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _resolution(value, arch: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, str):
        nums = [int(x) for x in re.findall(r"\d+", value)]
        if len(nums) == 1:
            return nums[0], nums[0]
        if len(nums) >= 2:
            return nums[0], nums[1]
    if isinstance(value, (int, float)) and value > 0:
        return int(value), int(value)
    size = _DEFAULT_RESOLUTION[arch]
    return size, size


def _timestamp(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _image_files(folder) -> list[Path]:
    try:
        folder = Path(folder)
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    except (OSError, TypeError):
        return []


def _tags(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _image_folders(data_dir, default_prompt, caption_extension) -> dict[str, tuple[int, list[str]]]:
    """{folder name: (repeats, captions)} of an instance folder as the trainer reads it (kohya "N_token"
    subfolders included); empty when the folder is not on this machine (an exported run from elsewhere)."""
    if not data_dir:
        return {}
    from .data import DataError, scan_image_folder

    try:
        records = scan_image_folder(data_dir, default_prompt, caption_extension, warn=lambda *a, **k: None)
    except (DataError, OSError):
        return {}
    folders: dict[str, tuple[int, list[str]]] = {}
    for record in records:
        name = record.path.parent.name
        folders.setdefault(name, (record.repeats, []))[1].append(record.caption)
    return folders


def _dataset_facts(s: Mapping) -> dict[str, str]:
    """ss_tag_frequency / ss_dataset_dirs / image counts the way sd-scripts writes them."""
    out: dict[str, str] = {}
    data_dir = s.get("instance_data_dir")
    repeats = int(s.get("repeats") or 1)
    folders = _image_folders(data_dir, s.get("instance_prompt"), s.get("caption_extension") or ".txt")
    if not folders:
        count = int(s.get("num_train_images") or s.get("num_instance_images") or 0)
        if data_dir or count:
            name = Path(str(data_dir)).name if data_dir else "instance"
            folders = {name: (1, [s.get("instance_prompt") or ""] * count)}
    if folders:
        # One entry per image folder by its name, as sd-scripts writes them ("3_sks toy": n_repeats 3).
        out["ss_tag_frequency"] = json.dumps(
            {name: dict(Counter(tag for caption in captions for tag in _tags(caption)))
             for name, (_, captions) in folders.items()}
        )
        out["ss_dataset_dirs"] = json.dumps(
            {name: {"n_repeats": n * repeats, "img_count": len(captions)} for name, (n, captions) in folders.items()}
        )
        out["ss_num_train_images"] = str(sum(n * repeats * len(captions) for n, captions in folders.values()))
    if s.get("with_prior_preservation"):
        class_dir = s.get("class_data_dir")
        class_count = len(_image_files(class_dir)) if class_dir else 0
        class_count = max(class_count, int(s.get("num_class_images") or 0))
        out["ss_num_reg_images"] = str(class_count)
        if class_dir:
            out["ss_reg_dataset_dirs"] = json.dumps(
                {Path(str(class_dir)).name: {"n_repeats": 1, "img_count": class_count}}
            )
    else:
        out["ss_num_reg_images"] = "0"
    return out


def _model_name(value) -> str | None:
    if not value:
        return None
    text = str(value)
    path = Path(text)
    return path.name if (path.is_absolute() or text.startswith(".") or path.exists()) else text


def _lora_summary(lora: Lora | None) -> tuple[int | None, float | None, bool]:
    if not lora:
        return None, None, False
    modules = [m for mods in lora.values() for m in mods.values()]
    return (
        _most_common(m.rank for m in modules),
        _most_common(float(m.alpha) for m in modules),
        any(m.dora_scale is not None for m in modules),
    )


def _num(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _text_encoder_trained(s: Mapping, lora: Lora | None) -> bool:
    """The file holds text-encoder LoRA (the truth when the weights are at hand), or the run trained one."""
    if lora:
        return any(lora.get(c) for c in (TE1, TE2))
    return bool(s.get("train_text_encoder"))


def _warmup_steps_used(s: Mapping):
    """The warm-up the schedule really had: diffusers' "constant" schedule ignores --lr_warmup_steps."""
    if not _present(s.get("lr_warmup_steps")):
        return None
    return 0 if s.get("lr_scheduler") == "constant" else s["lr_warmup_steps"]


def _flat_settings(s: Mapping, lora: Lora | None) -> dict:
    """The flat_* settings that describe what training did. Plain LoRA (sigma 0, or no perturbed model)
    keeps only flat_sigma = 0; the perturbed targets are those that were trained."""
    flat = {k: v for k, v in s.items() if k.startswith("flat_") and _present(v)}
    if isinstance(s.get("flat_targets"), (list, tuple)):
        trained_te = _text_encoder_trained(s, lora)
        flat["flat_targets"] = [t for t in s["flat_targets"] if t != "text_encoder" or trained_te]
    if "flat_sigma" in flat and (not float(flat["flat_sigma"]) or flat.get("flat_targets") == []):
        return {"flat_sigma": 0.0}
    return flat


def _comment(s: Mapping, flat: Mapping) -> str:
    if "flat_sigma" not in flat:
        return "written by flatlora-diffusion"
    if not float(flat["flat_sigma"]):
        return "DreamBooth LoRA (flatlora-diffusion; plain LoRA, sigma 0)"
    return f"DreamBooth Flat-LoRA (flatlora-diffusion; sigma {flat['flat_sigma']}, {flat.get('flat_schedule', 'cosine')})"


def build_metadata(
    settings: Mapping | None = None,
    arch: str = SD15,
    lora: Lora | None = None,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """safetensors metadata (all str) for ComfyUI / AUTOMATIC1111: ss_*, modelspec.*, flatlora_*.

    `settings` is a plain dict named like the diffusers DreamBooth flags (output_name,
    pretrained_model_name_or_path, rank, lora_alpha, learning_rate, text_encoder_lr, optimizer, seed,
    max_train_steps, mixed_precision, resolution, noise_offset, snr_gamma, prior_loss_weight,
    instance_prompt, instance_data_dir, flat_sigma, flat_schedule, flat_seed, use_dora, ...); missing
    keys are left out. `lora`, when given, is the truth for network dim/alpha and DoRA. The file
    hash (sshs_model_hash) is added by the writer, since it depends on the written tensors.
    """
    _check_arch(arch)
    s = dict(settings or {})
    md: dict[str, str] = {}

    def put(key, value):
        if _present(value):
            md[key] = _str(value)

    started = _timestamp(s.get("training_started_at")) or (now if now is not None else time.time())
    finished = _timestamp(s.get("training_finished_at"))
    width, height = _resolution(s.get("resolution"), arch)
    output_name = s.get("output_name")
    rank, alpha, dora = _lora_summary(lora)
    use_rslora = bool(s.get("use_rslora"))
    if rank is None and _present(s.get("rank")):
        rank = int(s["rank"])
    if alpha is None and _present(s.get("lora_alpha")):
        alpha = float(s["lora_alpha"]) * (math.sqrt(rank) if use_rslora and rank else 1.0)
    if alpha is None and rank is not None:
        alpha = float(rank)
    dora = dora or bool(s.get("use_dora"))

    # --- what AUTOMATIC1111 reads
    put("ss_output_name", output_name)
    put("ss_sd_model_name", _model_name(s.get("pretrained_model_name_or_path")))
    md["ss_base_model_version"] = _BASE_MODEL_VERSION[arch]
    if arch != SDXL:
        md["ss_v2"] = _str(arch == SD2)
    md["ss_network_module"] = "networks.lora"
    if rank is not None:
        md["ss_network_dim"] = str(rank)
    if alpha is not None:
        md["ss_network_alpha"] = _num(alpha)  # the effective alpha: ss_network_alpha / dim = scale
    network_args: dict[str, str] = {}
    if dora:
        network_args.update({"dora_wd": "True", "wd_on_output": "True"})
    if use_rslora:
        network_args.update({"rs_lora": "True"})
        if _present(s.get("lora_alpha")):
            network_args["peft_lora_alpha"] = str(s["lora_alpha"])
    md["ss_network_args"] = json.dumps(network_args)
    md["ss_training_started_at"] = repr(float(started))
    if finished is not None:
        md["ss_training_finished_at"] = repr(float(finished))
    md["ss_resolution"] = f"({width}, {height})"
    md.update(_dataset_facts(s))

    # --- what sd-scripts writes besides
    lr = s.get("learning_rate")
    put("ss_learning_rate", lr)
    put("ss_unet_lr", s.get("unet_lr", lr))
    if _text_encoder_trained(s, lora):  # a text-encoder lr of a run that never trained one is no fact of the file
        put("ss_text_encoder_lr", s.get("text_encoder_lr") if _present(s.get("text_encoder_lr")) else lr)
    optimizer = s.get("optimizer")
    if s.get("use_8bit_adam") and str(optimizer or "adamw").lower() == "adamw":
        optimizer = "AdamW8bit"
    put("ss_optimizer", optimizer)
    put("ss_lr_scheduler", s.get("lr_scheduler"))
    put("ss_lr_warmup_steps", _warmup_steps_used(s))
    put("ss_seed", s.get("seed"))
    steps = next((s[k] for k in ("global_step", "steps", "max_train_steps") if _present(s.get(k))), None)
    put("ss_steps", steps)
    put("ss_max_train_steps", s.get("max_train_steps"))
    put("ss_batch_size_per_device", s.get("train_batch_size"))
    put("ss_gradient_accumulation_steps", s.get("gradient_accumulation_steps"))
    put("ss_gradient_checkpointing", s.get("gradient_checkpointing"))
    put("ss_max_grad_norm", s.get("max_grad_norm"))
    put("ss_mixed_precision", s.get("mixed_precision"))
    put("ss_noise_offset", s.get("noise_offset"))
    put("ss_min_snr_gamma", s.get("snr_gamma"))
    if s.get("with_prior_preservation") or _present(s.get("prior_loss_weight")):
        put("ss_prior_loss_weight", s.get("prior_loss_weight"))
    put("ss_clip_skip", s.get("clip_skip"))
    put("ss_caption_dropout_rate", s.get("caption_dropout_rate"))
    flat = _flat_settings(s, lora)
    md["ss_training_comment"] = _str(s.get("training_comment") or _comment(s, flat))

    # --- ModelSpec (Stability AI), as sd-scripts writes it
    md["modelspec.sai_model_spec"] = "1.0.0"
    base = {SD15: "stable-diffusion-v1", SDXL: "stable-diffusion-xl-v1-base"}.get(arch)
    if arch == SD2:
        v_pred = str(s.get("prediction_type", "")).startswith("v")
        base = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    md["modelspec.architecture"] = f"{base}/lora"
    md["modelspec.implementation"] = (
        "https://github.com/Stability-AI/generative-models" if arch == SDXL else "diffusers"
    )
    put("modelspec.title", s.get("title") or output_name)
    md["modelspec.resolution"] = f"{width}x{height}"
    md["modelspec.date"] = _dt.datetime.fromtimestamp(int(finished or started)).isoformat()
    put("modelspec.trigger_phrase", s.get("instance_prompt"))
    put("modelspec.description", s.get("description"))
    put("modelspec.author", s.get("author"))
    put("modelspec.license", s.get("license"))
    put("modelspec.tags", s.get("tags"))
    pred = s.get("prediction_type")
    if _present(pred):
        md["modelspec.prediction_type"] = "v" if str(pred).startswith("v") else "epsilon"
    put("modelspec.encoder_layer", s.get("clip_skip"))

    # --- Flat-LoRA settings under our own keys
    for key, value in sorted(flat.items()):
        md["flatlora_" + key[len("flat_") :]] = _str(value)
    try:
        from . import __version__

        md["flatlora_version"] = __version__
    except ImportError:  # pragma: no cover - only when the package is half-installed
        pass
    return md


def sshs_model_hash(source) -> str:
    """AUTOMATIC1111's / sd-scripts' LoRA hash: sha256 of a safetensors file's tensor data section.

    `source` is a file path (the written file) or a dict of tensors (the hash the file will have).
    """
    if isinstance(source, Mapping):
        return tensors_data_sha256(source)
    return file_data_sha256(source)


# ==============================================================================================
# export_lora: run directory or file -> kohya / diffusers file
# ==============================================================================================


def _flatten_settings(config) -> dict:
    """config.yaml may group settings in sections; flatten one level (top-level keys win)."""
    if not isinstance(config, Mapping):
        return {}
    flat = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    for section in config.values():
        if isinstance(section, Mapping):
            for k, v in section.items():
                flat.setdefault(k, v)
    return flat


def _read_run_settings(run_dir: Path) -> dict:
    settings: dict = {}
    config_file = run_dir / RUN_CONFIG
    if config_file.is_file():
        import yaml

        try:
            settings = _flatten_settings(yaml.safe_load(config_file.read_text(encoding="utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ExportError(f"{config_file} is not valid YAML: {str(e).splitlines()[0]}") from None
    status_file = run_dir / "status.json"
    if status_file.is_file():
        try:
            status = json.loads(status_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            status = {}
        if isinstance(status, Mapping):
            for ours, theirs in (
                ("training_started_at", "started_at"),
                ("training_finished_at", "finished_at"),
                ("global_step", "step"),
            ):
                if _present(status.get(theirs)):
                    settings.setdefault(ours, status[theirs])
    return settings


def _arch_hint_from_settings(settings: Mapping) -> str | None:
    """The base model's architecture as the run's settings tell it (a local diffusers folder or its name)."""
    explicit = settings.get("arch") or settings.get("model_arch")
    if explicit in names.ARCHS:
        return explicit
    model = settings.get("pretrained_model_name_or_path")
    if not model:
        return None
    folder = Path(str(model))
    index = folder / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (json.JSONDecodeError, OSError):
            cls = ""
        if "XL" in cls:
            return SDXL
        unet_config = folder / "unet" / "config.json"
        try:
            cross = json.loads(unet_config.read_text(encoding="utf-8")).get("cross_attention_dim")
        except (json.JSONDecodeError, OSError):
            cross = None
        return SD2 if cross == 1024 else SD15
    lowered = str(model).lower()
    if "xl" in lowered:
        return SDXL
    if "stable-diffusion-2" in lowered or "sd2" in lowered:
        return SD2
    return None


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a trainer checkpoint folder (checkpoint-N with training_state.json), else None."""
    try:
        step = json.loads((folder / "training_state.json").read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _checkpoint_settings(checkpoint: Path, step: int) -> tuple[dict, Path | None]:
    """The settings of the run a checkpoint belongs to (its config.yaml two levels up, when there), as of
    the checkpoint's step, and that run folder."""
    run_dir = checkpoint.parent.parent
    if not (run_dir / RUN_CONFIG).is_file():
        return {"global_step": step}, None
    settings = _read_run_settings(run_dir)
    settings.pop("training_finished_at", None)  # the run's end is not this file's
    settings["global_step"] = step
    return settings, run_dir


def _default_output(input_path: Path, weights: Path, fmt: str, settings: Mapping, is_run: bool,
                    step: int | None = None, run_dir: Path | None = None) -> Path:
    suffix = ".safetensors" if fmt == "kohya" else "_diffusers.safetensors"
    if step is not None:  # a checkpoint: next to the run's own files, named as sd-scripts names step saves
        name = str(settings.get("output_name") or (run_dir or input_path).name)
        return (run_dir or input_path) / f"{name}-step{step:08d}{suffix}"
    if is_run:
        name = str(settings.get("output_name") or input_path.name)
        return input_path / f"{name}{suffix}"
    return weights.with_name(f"{weights.stem}_{fmt}.safetensors")


def _same_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> bool:
    """An existing file holds exactly these tensors (names, dtypes, shapes, bytes): re-exporting is a no-op."""
    try:
        header, _ = read_header(path)
    except (OSError, SafetensorsFormatError):
        return False
    names = {k for k in header if k != "__metadata__"}
    if names != set(state):
        return False
    for key, tensor in state.items():
        entry = header[key]
        if list(entry.get("shape", [])) != list(tensor.shape) or entry.get("dtype") != _SAFETENSORS_DTYPE.get(tensor.dtype):
            return False
    return file_data_sha256(path) == sshs_model_hash(state)


_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def export_lora(
    input_path,
    output=None,
    fmt: str = "kohya",
    dtype: str = "fp16",
    overwrite: bool = False,
    metadata_overrides: Mapping[str, object] | None = None,
    arch: str | None = None,
) -> Path:
    """Write a kohya (ComfyUI / AUTOMATIC1111) or diffusers LoRA file; return its path.

    `input_path` is a run directory (``pytorch_lora_weights.safetensors`` + ``config.yaml``; the
    kohya file goes to ``<output_name>.safetensors`` there) or any LoRA file `load_any_lora` reads.
    Every check runs before anything is written; a failure raises ExportError and leaves no file.
    """
    return _export(input_path, output, fmt, dtype, overwrite, metadata_overrides, arch)[0]


def _export(input_path, output, fmt, dtype, overwrite, metadata_overrides, arch) -> tuple[Path, bool]:
    """export_lora's work: (the output path, whether it was written; False: it already held these weights).

    A trainer checkpoint folder (checkpoint-N/pytorch_lora_weights.safetensors) exports like its run, as
    of step N; its file's own metadata (written at step N) wins over the run's final settings."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected kohya or diffusers")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected fp16, bf16 or fp32")
    _check_arch(arch)
    input_path = Path(input_path)
    if not input_path.exists():
        raise ExportError(f"input not found: {input_path}")

    is_run = input_path.is_dir()
    step = _checkpoint_step(input_path) if is_run else None
    settings: dict = {}
    run_dir = None
    if is_run:
        weights = input_path / RUN_WEIGHTS
        if not weights.is_file():
            what = ("a checkpoint of an older version: resume the run to get checkpoints with LoRA files"
                    if step is not None else "not a finished run directory or a checkpoint folder")
            raise ExportError(f"{input_path} has no {RUN_WEIGHTS}: {what}")
        if step is not None:
            settings, run_dir = _checkpoint_settings(input_path, step)
        else:
            settings = _read_run_settings(input_path)
    else:
        weights = input_path

    out = Path(output) if output is not None else _default_output(input_path, weights, fmt, settings, is_run,
                                                                  step, run_dir)
    if out.exists() and out.resolve() == weights.resolve():
        raise ExportError(f"the output {out} is the input file itself")
    if out.is_dir():
        raise ExportError(f"the output {out} is a folder")
    if out.exists() and not out.is_file():  # --overwrite replaces files, never /dev/... or a pipe
        raise ExportError(f"the output {out} is not a regular file (a device, pipe or socket); not replacing it")
    if not out.parent.is_dir():
        raise ExportError(f"the output folder {out.parent} does not exist")

    tensors, source_metadata = _load_file(weights)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{weights.name} holds NaN/inf values ({len(bad)} tensors, e.g. {bad[0]}): the training "
                          f"diverged; a LoRA like that breaks every image, so nothing was written")
    lora, guess = _read_state_dict(tensors, source_metadata, arch)
    if arch is None:
        # The keys decide; where they only show "some SD 1.x-like model" (tiny test models, a UNet
        # LoRA without cross-attention widths), the run's base model tells which.
        hint = _arch_hint_from_settings(settings)
        arch = guess.arch
        if hint is not None and (not guess.confident or (guess.weak_family and {hint, arch} <= {SD15, SD2})):
            arch = hint

    settings.setdefault("output_name", out.stem)
    built = build_metadata(settings, arch, lora)
    carried = {
        k: v
        for k, v in source_metadata.items()
        if k.startswith(("ss_", "modelspec.", "flatlora_")) and k not in _STRUCTURAL_KEYS and not k.startswith("sshs_")
    }
    # A run directory's settings describe the training; a bare file's (or a checkpoint's) own metadata does.
    metadata = {**carried, **built} if is_run and step is None else {**built, **carried}
    for key, value in (metadata_overrides or {}).items():
        metadata[str(key)] = _str(value)

    torch_dtype = DTYPES[dtype]
    if fmt == "kohya":
        state = lora_to_kohya(lora, arch, dtype=torch_dtype)
    else:
        state, diffusers_metadata = lora_to_diffusers(lora, dtype=torch_dtype)
        metadata.update(diffusers_metadata)
    if out.exists() and not overwrite:
        if out.is_file() and not metadata_overrides and _same_tensors(out, state):
            return out, False  # e.g. the kohya file the trainer wrote: nothing to do, and not an error
        raise ExportError(f"{out} already exists (use --overwrite to replace it)")
    return _write_with_hash(state, out, metadata, overwrite), True


def _write_with_hash(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str], overwrite: bool) -> Path:
    # The hash covers the tensor data only, so it can be computed first and stored in the file.
    digest = sshs_model_hash(state)
    metadata = {**metadata, "sshs_model_hash": digest}
    try:
        save_safetensors_atomic(state, out, metadata, overwrite=overwrite, expected_data_sha256=digest)
    except FileExistsError:
        raise ExportError(f"{out} already exists (use --overwrite to replace it)") from None
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def diffusers_file_contents(
    lora: Lora, settings: Mapping | None, arch: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a diffusers file (what `pipe.load_lora_weights` reads): the adapter metadata
    that keeps lora_alpha, the same provenance (ss_*, modelspec.*, flatlora_*) as the kohya file, its hash."""
    _check_arch(arch)
    state, adapter_metadata = lora_to_diffusers(lora, dtype)
    metadata = {**build_metadata(dict(settings or {}), arch, lora), **adapter_metadata,
                "sshs_model_hash": sshs_model_hash(state)}
    return state, metadata


def save_kohya_lora(
    components: Mapping[str, torch.nn.Module | None],
    path,
    settings: Mapping | None = None,
    *,
    adapter_name: str = "default",
    arch: str | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    metadata_overrides: Mapping[str, object] | None = None,
    lora: Lora | None = None,
) -> Path:
    """Write the kohya file of in-memory peft models with full metadata and its sshs_model_hash.

    What the trainer calls at the end of a run: `settings` as for `build_metadata`. `lora`, when given,
    is written instead of the models' current adapters (e.g. a PiSSA LoRA converted for the original base).
    """
    _check_arch(arch)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected fp16, bf16 or fp32")
    arch = arch or _arch_from_models(components)
    lora = lora if lora is not None else lora_from_models(components, adapter_name)
    if not lora:
        raise ExportError(f"the models have no LoRA layers for adapter {adapter_name!r}")
    path = Path(path)
    settings = dict(settings or {})
    settings.setdefault("output_name", path.stem)
    metadata = build_metadata(settings, arch, lora)
    for key, value in (metadata_overrides or {}).items():
        metadata[str(key)] = _str(value)
    state = lora_to_kohya(lora, arch, dtype=DTYPES[dtype])
    return _write_with_hash(state, path, metadata, overwrite)


# ==============================================================================================
# Command line: `flatlora-diffusion export`
# ==============================================================================================


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="a run directory (pytorch_lora_weights.safetensors + config.yaml) or a LoRA .safetensors file "
        "(diffusers/peft or kohya)",
    )
    parser.add_argument(
        "--format",
        dest="format",
        choices=FORMATS,
        default="kohya",
        help="kohya: the file ComfyUI and AUTOMATIC1111 load (default); diffusers: for pipe.load_lora_weights",
    )
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        default=None,
        help="where to write (default: <output_name>.safetensors in the run directory, or "
        "<input>_<format>.safetensors next to an input file)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="tensor dtype of the file (default fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--arch",
        choices=names.ARCHS,
        default=None,
        help="base model family, when it cannot be told from the file (default: detect)",
    )
    parser.add_argument(
        "--metadata",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="set a metadata entry, e.g. --metadata modelspec.author=me (repeatable)",
    )
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run the export for parsed arguments: prints the written path, or `error: ...` and returns 2."""
    try:
        path, written = _export(
            args.input,
            getattr(args, "output", None),
            getattr(args, "format", "kohya"),
            getattr(args, "dtype", "fp16"),
            getattr(args, "overwrite", False),
            dict(getattr(args, "metadata", None) or []),
            getattr(args, "arch", None),
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path if written else f"{path} is up to date (it holds these weights already); nothing written")
    return 0


def main(argv=None) -> int:  # `python -m flatlora_diffusion.export`
    parser = add_export_arguments(argparse.ArgumentParser(prog="flatlora-diffusion export"))
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
