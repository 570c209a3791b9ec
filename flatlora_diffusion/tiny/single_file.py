"""A tiny pipeline as one .safetensors file in the original Stable Diffusion ("LDM") key layout, the way
ComfyUI and AUTOMATIC1111 users keep their models: diffusers key -> original key for the UNet, the VAE and the
text encoders (SDXL's second one in OpenCLIP's layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..unet_blocks import UNetLayout, diffusers_to_ldm


def _unet_key_to_ldm(key: str, layout: UNetLayout) -> str:
    """Map one diffusers UNet2DConditionModel parameter name to its name in the original SD UNet."""
    module, _, param = key.rpartition(".")
    ldm = diffusers_to_ldm(module, layout)
    if ldm is None:
        raise KeyError(f"no original-SD name known for UNet parameter {key!r}")
    return f"{ldm}.{param}"


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_ldm(key: str, num_levels: int) -> str:
    """Map one diffusers AutoencoderKL parameter name to its name in the original SD VAE.

    The original decoder numbers its levels from the full-resolution end (up.0 runs last), the diffusers
    decoder in running order; the encoder numbers both the same way.
    """
    fixed = {"conv_norm_out": "norm_out"}
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(\w+)", key)
    if m:
        return f"{m[1]}.{fixed.get(m[2], m[2])}.{m[3]}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        level = num_levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}"
    raise KeyError(f"no original-SD name known for VAE parameter {key!r}")


def _text_model_keys(state_dict: dict) -> dict:
    """transformers >= 5.6 drops the `text_model.` level in CLIPTextModel; the files keep it."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state_dict.items()}


def _open_clip_text(state_dict: dict, prefix: str) -> dict:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (SDXL's second text encoder).

    OpenCLIP keeps q, k, v as one packed in_proj matrix, names the MLP c_fc / c_proj, stores the position
    table as a bare parameter and the projection as (width, proj_dim), i.e. transposed.
    """
    out = {}
    layers: dict[int, dict[str, object]] = {}
    for key, value in _text_model_keys(state_dict).items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t()
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
            if not m:
                raise KeyError(f"no OpenCLIP name known for text encoder parameter {key!r}")
            i, rest = int(m[1]), m[2]
            qkv = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if qkv:
                layers.setdefault(i, {})[f"{qkv[1]}.{qkv[2]}"] = value
                continue
            rest = (rest.replace("self_attn.out_proj", "attn.out_proj")
                    .replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = value
    import torch

    for i, parts in layers.items():
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [parts[f"{p}.{kind}"] for p in ("q", "k", "v")], dim=0
            )
    return out


def _pipeline_arch(pipeline_dir: Path) -> str:
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    return "sdxl" if "text_encoder_2" in index else "sd15"


def ldm_state_dict(pipeline_dir) -> dict:
    """All weights of a diffusers SD1/SDXL pipeline folder, renamed to the original single-file layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipeline_dir = Path(pipeline_dir)
    arch = _pipeline_arch(pipeline_dir)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    layout = UNetLayout.from_config(unet.config)

    out = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + _unet_key_to_ldm(key, layout)] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        ldm = _vae_key_to_ldm(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out["first_stage_model." + ldm] = value

    te = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    te_prefix = "cond_stage_model.transformer." if arch == "sd15" else "conditioner.embedders.0.transformer."
    for key, value in _text_model_keys(te.state_dict()).items():
        out[te_prefix + key] = value
    if arch == "sdxl":
        te2 = CLIPTextModelWithProjection.from_pretrained(pipeline_dir, subfolder="text_encoder_2")
        out.update(_open_clip_text(te2.state_dict(), "conditioner.embedders.1.model."))
    return out


def save_single_file_checkpoint(pipeline_dir, out_file) -> Path:
    """Write the pipeline in `pipeline_dir` as one .safetensors file in the original SD / SDXL key layout.

    That is the layout ComfyUI and AUTOMATIC1111 users keep their models in: model.diffusion_model.*
    (UNet), first_stage_model.* (VAE), cond_stage_model.transformer.text_model.* (SD1 text encoder) or
    conditioner.embedders.0.transformer.text_model.* and conditioner.embedders.1.model.* (SDXL's CLIP-L
    and OpenCLIP-bigG style encoders). Load it back with
    ``StableDiffusion[XL]Pipeline.from_single_file(out_file, config=pipeline_dir)``.
    """
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in ldm_state_dict(pipeline_dir).items()}
    save_file(state, str(out_file), metadata={"format": "pt"})
    return out_file
