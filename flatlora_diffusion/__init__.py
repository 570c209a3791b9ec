"""flatlora-diffusion: DreamBooth LoRA for Stable Diffusion 1.x / SDXL with Flat-LoRA."""

__all__ = ["FlatLoRA", "sigma_at"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Flat-LoRA engine (and torch with it, 2 s) loads on first use, not with the package: the command line
    # answers --help and a mistyped flag at once, and the demo starts its workers before torch is in.
    if name in __all__:
        from . import flat

        return getattr(flat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
