"""Loading Stable Diffusion 1.x/2.x and SDXL components, and attaching LoRA.

A model is a hub id, a local diffusers folder, or a single-file checkpoint (.safetensors / .ckpt as
ComfyUI and AUTOMATIC1111 users keep them). `inspect_model_source` works out which, and the architecture,
WITHOUT loading weights, so a wrong path fails in a second with one clear line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SD_PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


class ModelError(ValueError):
    """The model path/id is unusable; one line, printed without a traceback."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder" | "single_file" | "hub"
    location: str
    arch: str  # "sd15" (SD 1.x/2.x) | "sdxl"


def _arch_from_model_index(index: dict, where: str) -> str:
    name = index.get("_class_name", "")
    if name in SD_PIPELINES:
        return SD_PIPELINES[name]
    if "unet" in index and "text_encoder" in index:  # another SD-family pipeline class (img2img, inpaint, ...)
        return "sdxl" if "text_encoder_2" in index else "sd15"
    raise ModelError(f"{where} is a {name or 'diffusers'} pipeline, not a Stable Diffusion 1.x/2.x or SDXL pipeline")


def _arch_from_single_file(path: Path) -> str:
    """SDXL checkpoints carry two text encoders under `conditioner.embedders`; SD 1.x/2.x ones do not."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise ModelError(f"{path} is not a readable .safetensors checkpoint ({str(e).splitlines()[0]})") from None
    else:
        keys = list(_torch_load_keys(path))
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(f"{path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    return "sdxl" if any(k.startswith("conditioner.embedders.1") for k in keys) else "sd15"


def _torch_load_keys(path: Path):
    try:
        sd = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0]})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    return sd.keys()


def inspect_model_source(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> ModelSource:
    """Where the model is and which architecture it has; raises ModelError. Loads no weights.

    The built-in name `toyworld` is the project's own pretrained toy-world model (package data), unless a
    folder of that name exists in the current directory."""
    from .toyworld import resolve_model_name

    path = Path(name_or_path).expanduser()
    if not path.exists():
        path = Path(resolve_model_name(name_or_path))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelError(f"{path} is a file but not a checkpoint (.safetensors or .ckpt)")
        return ModelSource("single_file", str(path), _arch_from_single_file(path))
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError:
            raise ModelError(f"{index} is not valid JSON") from None
        arch = _arch_from_model_index(data, str(path))
        _check_folder_components(path, data)
        return ModelSource("folder", str(path), arch)
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model not found: {name_or_path} is neither an existing path nor a hub id (owner/name)")
    return ModelSource("hub", name_or_path, _arch_from_hub(name_or_path, revision, cache_dir))


_NEEDED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")


def _check_folder_components(path: Path, index: dict) -> None:
    """Every part the training needs is a folder with a config, and its weight files are whole: a missing
    unet/ or a truncated download fails here in a second, with one line, not while loading."""
    from .safetensors_io import SafetensorsFormatError, read_header

    for name in _NEEDED:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0]):
            if name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
                raise ModelError(f"{path} is not a complete pipeline folder: model_index.json names no {name}")
            continue
        folder = path / name
        if not folder.is_dir():
            raise ModelError(f"{path} is not a complete pipeline folder: {name}/ is missing")
        if name.startswith(("tokenizer", "scheduler")):
            continue
        if not (folder / "config.json").is_file():
            raise ModelError(f"{path}: {name}/config.json is missing")
        weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
        if not weights:
            raise ModelError(f"{path}: {name}/ holds no weights (.safetensors or .bin)")
        for w in weights:
            if w.suffix == ".safetensors" and not w.name.endswith(".index.json"):
                try:
                    read_header(w)
                except SafetensorsFormatError as e:
                    raise ModelError(f"{path}: {name}/{e}") from None
                except OSError as e:
                    raise ModelError(f"{path}: {name}/{w.name} cannot be read ({e.strerror or e})") from None


def _arch_from_hub(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        index_file = hf_hub_download(repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline and not in the local cache" if offline else type(e).__name__
        raise ModelError(f"unknown model {repo_id!r}: not a local path, and the hub id could not be read ({why})") from None
    return _arch_from_model_index(json.loads(Path(index_file).read_text()), repo_id)


# --- loading -------------------------------------------------------------------------------------------------
@dataclass
class Components:
    arch: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    pipeline_class: type

    def pipeline(self, scheduler=None):
        """A pipeline over these very modules (LoRA included) for sampling and class-image generation."""
        parts = dict(vae=self.vae, unet=self.unet, scheduler=scheduler or self.noise_scheduler)
        parts["text_encoder"], parts["tokenizer"] = self.text_encoders[0], self.tokenizers[0]
        if self.arch == "sdxl":
            parts["text_encoder_2"], parts["tokenizer_2"] = self.text_encoders[1], self.tokenizers[1]
            pipe = self.pipeline_class(**parts, add_watermarker=False)
        else:
            pipe = self.pipeline_class(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def load_pipeline(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    vae_path: str | None = None,
    single_file_config: str | None = None,
):
    """The SD / SDXL pipeline of `source` (without safety checker), with an optional replacement VAE.

    The one loading path of the project: training, class-image generation and "generate now" all use it."""
    from diffusers import AutoencoderKL

    cls = pipeline_class(source.arch)
    extra = {"safety_checker": None, "requires_safety_checker": False} if source.arch == "sd15" else {}
    if source.kind == "single_file":
        kwargs = {"config": single_file_config} if single_file_config else {}
        pipe = cls.from_single_file(source.location, dtype=dtype, **extra, **kwargs)
    else:
        pipe = cls.from_pretrained(
            source.location, revision=revision, variant=variant, cache_dir=cache_dir, dtype=dtype, **extra
        )
    if vae_path:
        vp = Path(vae_path).expanduser()
        if vp.is_file():
            pipe.vae = AutoencoderKL.from_single_file(str(vp), dtype=dtype)
        else:
            sub = "vae" if (vp / "vae").is_dir() else None
            pipe.vae = AutoencoderKL.from_pretrained(vae_path, subfolder=sub, revision=revision, cache_dir=cache_dir,
                                                     dtype=dtype)
    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            _realign_mapped_weights(part)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# torch's CPU allocator gives every tensor 64-byte aligned memory.
_ALIGNMENT = 64


def _realign_mapped_weights(module: nn.Module) -> None:
    """Give every CPU weight that sits at a misaligned address a copy in memory of its own.

    A .safetensors file stored in the dtype it is loaded in comes back without a copy: each weight is a view
    into the memory-mapped file, at whatever address that file's layout puts it (the tiny SD single file's UNet:
    12 bytes past a 16-byte boundary, behind the text encoder's odd-sized biases; its folder's unet/: 16 past a
    64-byte one). MKL's float32 GEMM/GEMV on the CPU (conditional numerical reproducibility off, torch's default)
    rounds differently with the weight's address mod 16, so the same weights read from a single file and from a
    pipeline folder gave losses 1 ulp apart and, after 4 steps, LoRA weights beyond rtol 1e-5 (measured: torch
    2.13.0+cpu, MKL 2024.2, AMD EPYC, AVX2; MKL_CBWR=AUTO makes them equal too). Realigned, a model computes
    the same whichever file it came from. Dtype-converting loads already made copies; the trainer's .to() of the
    frozen models to the GPU or to fp16/bf16 makes new ones anyway.
    """

    def misaligned(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() > 0 and t.data_ptr() % _ALIGNMENT != 0

    for p in module.parameters():  # Parameter objects stay (tied weights stay tied)
        if misaligned(p):
            p.data = p.data.clone()
    for m in module.modules():
        for name, b in list(m.named_buffers(recurse=False)):
            if misaligned(b):
                setattr(m, name, b.clone())


def load_components(
    source: ModelSource,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    vae_path: str | None = None,
    tokenizer_name: str | None = None,
    single_file_config: str | None = None,
) -> Components:
    """Load the pipeline's parts in fp32 on the CPU (the trainer casts and moves them)."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(source, revision=revision, variant=variant, cache_dir=cache_dir, vae_path=vae_path,
                         single_file_config=single_file_config)
    cls = type(pipe)
    vae = pipe.vae
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if source.arch == "sdxl" else [])
    if tokenizer_name:
        from transformers import CLIPTokenizer

        tokenizers[0] = CLIPTokenizer.from_pretrained(tokenizer_name, revision=revision)
    for tok in tokenizers:
        # transformers silently returns a 2-token tokenizer for an empty folder when offline.
        if tok is None or len(tok) <= 2:
            raise ModelError(f"the tokenizer of {source.location} is missing or empty")
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if source.arch == "sdxl" else [])
    return Components(
        arch=source.arch,
        unet=pipe.unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        pipeline_class=cls,
    )


# --- LoRA ----------------------------------------------------------------------------------------------------
def lora_config(rank: int, alpha: float, targets: list[str], dropout: float, use_dora: bool, use_rslora: bool, init: str):
    from peft import LoraConfig

    init_value: Any = {"gaussian": "gaussian", "default": True, "pissa": "pissa"}[init]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=init_value,
        target_modules=list(targets),
        lora_dropout=dropout,
        use_dora=use_dora,
        use_rslora=use_rslora,
    )


def add_lora(model: nn.Module, config) -> None:
    """Freeze the model and attach a LoRA adapter ("default") the way diffusers' scripts do."""
    model.requires_grad_(False)
    model.add_adapter(config)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
