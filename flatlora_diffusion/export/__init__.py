"""LoRA files that ComfyUI, AUTOMATIC1111 and diffusers load: kohya and diffusers formats, metadata.

Everything meets at one normalized form, `Lora`: component ("unet", "text_encoder",
"text_encoder_2") -> canonical module path (names.py) -> `LoraModule` (down [r, in], up
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

The package, one concern per file (each imports only those listed above it):
    names.py        the three spellings of a module: diffusers path, kohya name, original-SD (LDM) UNet path
    lora.py         the normalized form: Lora, LoraModule, ExportError
    arch.py         SD 1.x / 2.x / SDXL from the models or from a LoRA's names and shapes
    writers.py      Lora -> kohya or diffusers tensors
    readers.py      kohya / diffusers / peft state dicts and files (every spelling) -> Lora
    from_models.py  in-memory peft models -> Lora
    metadata.py     ss_* / modelspec.* / flatlora_* metadata and the sshs_model_hash
    run_files.py    export_lora (run directory, checkpoint or file -> file) and the trainer's file writers
    command.py      `flatlora-diffusion export`
"""

from ..safetensors_io import save_safetensors_atomic
from .arch import ArchGuess, detect_arch
from .command import add_export_arguments, main, run_export
from .from_models import diffusers_state_dict, kohya_state_dict, lora_from_models
from .lora import ExportError, Lora, LoraModule
from .metadata import build_metadata, sshs_model_hash
from .readers import diffusers_to_kohya, kohya_to_diffusers, load_any_lora, lora_from_state_dict
from .run_files import DTYPES, FORMATS, diffusers_file_contents, export_lora, save_kohya_lora
from .writers import LORA_ADAPTER_METADATA_KEY, lora_to_diffusers, lora_to_kohya

__all__ = [
    "ArchGuess",
    "DTYPES",
    "ExportError",
    "FORMATS",
    "LORA_ADAPTER_METADATA_KEY",
    "Lora",
    "LoraModule",
    "main",
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
