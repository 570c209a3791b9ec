"""Tiny random-weight SD 1.x and SDXL pipelines: real diffusers classes and folder layout, weights drawn from a
seed, sizes small enough for a training step in a fraction of a second on one CPU core."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer, load_tokenizer, read_merges, write_vocab_files

ARCHES = ("sd15", "sdxl")

# SD1 and SDXL differ in the VAE's latent scale; everything else in the VAE is the same tiny shape.
_VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}

# SDXL's two text encoders have different widths (768 / 1280 in the real model). Keeping them different
# here matters: diffusers' single-file loader tells the two apart by their width, and code that mixes
# them up fails loudly instead of passing by accident. 16 + 48 = the UNet's cross_attention_dim 64.
_SDXL_TE1_HIDDEN = 16
_SDXL_TE2_HIDDEN = 48
_SDXL_POOLED_DIM = 32  # TE2 projection_dim: the pooled text embedding that feeds the UNet's add_embedding
_SDXL_TIME_DIM = 8  # addition_time_embed_dim; 6 time ids -> 6 * 8 inputs to add_embedding


def _unet(arch: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8,  # 8 latent px x 8 (VAE) = 64 px default generation
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    if arch == "sd15":
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    return UNet2DConditionModel(
        cross_attention_dim=_SDXL_TE1_HIDDEN + _SDXL_TE2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_DIM + _SDXL_POOLED_DIM,
        **common,
    )


def _vae(arch: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # 4 blocks: 8x downscale like the real SD VAE
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=_VAE_SCALING[arch],
    )


def _text_config(tokenizer, hidden: int, act: str, projection_dim: int | None = None, pad_token_id=None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim if projection_dim is not None else hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def make_tiny_pipeline(out_dir, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a complete, loadable diffusers pipeline folder with tiny random weights drawn from `seed`.

    arch "sd15": StableDiffusionPipeline (unet, vae, text_encoder, tokenizer, scheduler).
    arch "sdxl": StableDiffusionXLPipeline, plus text_encoder_2 (with projection) and tokenizer_2.
    tokenizer_2 pads with "!" (id 0), as the real SDXL tokenizer_2 does; tokenizer pads with <|endoftext|>.
    Weights are saved as safetensors. Returns the folder.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_2 = load_tokenizer(Path(tmp) / "tokenizer", pad_token="!") if arch == "sdxl" else None
        merges = read_merges(Path(tmp) / "tokenizer")

    # Draw every weight from a private generator state: the same seed gives the same bytes, and the
    # caller's global torch RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(arch)
        vae = _vae(arch)
        if arch == "sd15":
            text_encoder = CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu"))
        else:
            text_encoder = CLIPTextModel(_text_config(tokenizer, _SDXL_TE1_HIDDEN, "quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(
                    tokenizer_2,
                    _SDXL_TE2_HIDDEN,
                    "gelu",
                    projection_dim=_SDXL_POOLED_DIM,
                    pad_token_id=tokenizer_2.pad_token_id,
                )
            )

    if arch == "sd15":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.save_pretrained(out, safe_serialization=True)

    # Hub folders carry CLIP's own vocab.json / merges.txt next to the transformers files; and the
    # load-time flags that transformers copies into tokenizer_config.json do not belong in a model folder.
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    for sub in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
        write_vocab_files(out / sub, vocab, merges)
        config_file = out / sub / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only"):
            config.pop(key, None)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
