"""flatlora-diffusion: DreamBooth LoRA for Stable Diffusion 1.x / SDXL with Flat-LoRA."""

from .flat import FlatLoRA, sigma_at

__all__ = ["FlatLoRA", "sigma_at"]
__version__ = "0.1.0"
