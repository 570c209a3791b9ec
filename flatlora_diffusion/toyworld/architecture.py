"""The toy world's base model: a Stable Diffusion 1.x pipeline, only small.

Same classes and folder layout as SD 1.5 (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel with cross-attention, a DDPM scheduler), so the trainer, export and the app treat it
like any SD 1.5 folder. Sizes are chosen for a 64 px world on a CPU: the VAE downsamples 4x (16 x 16 x 4
latents hold the shape, colour, pattern and scene), and one LoRA training step stays well under 0.1 s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..tiny.tokenizer import MODEL_MAX_LENGTH


@dataclass(frozen=True)
class Architecture:
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks: 4x downscale
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    # Cross-attention at the top (16 x 16) level as well: off in the shipped model. Tried on 2026-12-06 (commit
    # 194031b, `pretrain --retrain-unet`): the base model was as good, but after the demo's LoRA the subject was
    # found in 0 % of pictures (52 % without it): the LoRA's change went into the unconditional prediction (the
    # empty prompt drew teal shapes), so classifier-free guidance pushed every picture away from teal.
    unet_top_attention: bool = False
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(arch: Architecture, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=arch.vae_channels,
                         layers_per_block=1, latent_channels=arch.latent_channels, norm_num_groups=16,
                         sample_size=64, scaling_factor=scaling_factor)


def build_unet(arch: Architecture):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    top_down, top_up = (("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if arch.unet_top_attention
                        else ("DownBlock2D", "UpBlock2D"))
    down = (top_down,) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + (top_up,)
    return UNet2DConditionModel(sample_size=16, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
                                block_out_channels=arch.unet_channels, layers_per_block=arch.unet_layers_per_block,
                                down_block_types=down, up_block_types=up, attention_head_dim=arch.unet_heads,
                                cross_attention_dim=arch.text_hidden, norm_num_groups=32)


def build_text_encoder(arch: Architecture, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=arch.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_scheduler():
    from diffusers import DDPMScheduler

    # SD 1.5's training scheduler, unchanged.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")


def build_tokenizer(out_dir):
    """A CLIP-style BPE tokenizer whose vocabulary holds every toy-world word (and common prompt words)."""
    from ..tiny.tokenizer import CORPUS, build_clip_tokenizer
    from .world import vocabulary_corpus

    return build_clip_tokenizer(out_dir, corpus=vocabulary_corpus() + "\n" + CORPUS)
