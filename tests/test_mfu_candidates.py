"""benchmarks/mfu_candidates.py's candidate changes: each is in force inside `applied` and undone after it, so the
variants timed one after another on one UNet do not leak into each other."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.flat_helpers import tiny_unet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mfu_candidates  # noqa: E402


def test_variants_combine_with_plus_and_unknown_parts_are_named():
    assert mfu_candidates.unknown_variants(["baseline", "compile_blocks+norms_bf16"]) == []
    assert mfu_candidates.unknown_variants(["norms_bf16+fast", "slow"]) == ["fast", "slow"]


def test_norms_bf16_returns_the_compute_dtype_under_autocast_and_is_undone():
    unet = tiny_unet()
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert any(isinstance(m, torch.nn.GroupNorm) for m in norms) and any(isinstance(m, torch.nn.LayerNorm)
                                                                         for m in norms)
    group_norm = next(m for m in norms if isinstance(m, torch.nn.GroupNorm))
    layer_norm = next(m for m in norms if isinstance(m, torch.nn.LayerNorm))
    x = torch.randn(2, group_norm.num_channels, 4, 4)
    tokens = torch.randn(2, 5, layer_norm.normalized_shape[0])
    with mfu_candidates.applied("norms_bf16", unet, batch=None):
        assert all("forward" in m.__dict__ for m in norms)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_tokens = group_norm(x), layer_norm(tokens)
        assert out.dtype == out_tokens.dtype == torch.bfloat16
        expected = F.group_norm(x.bfloat16(), group_norm.num_groups, group_norm.weight.bfloat16(),
                                group_norm.bias.bfloat16(), group_norm.eps)
        assert torch.equal(out, expected)
        expected_tokens = F.layer_norm(tokens.bfloat16(), layer_norm.normalized_shape, layer_norm.weight.bfloat16(),
                                       layer_norm.bias.bfloat16(), layer_norm.eps)
        assert torch.equal(out_tokens, expected_tokens)
        assert group_norm(x).dtype == torch.float32  # outside autocast: the input's dtype, as before
    assert not any("forward" in m.__dict__ for m in norms)
    assert group_norm(x).dtype == torch.float32


def test_regional_compile_marks_each_region_and_is_undone():
    """Setting up the compiled regions only wraps their calls (compiling happens on the first call, not here)."""
    unet = tiny_unet()
    with mfu_candidates.applied("compile_blocks+norms_bf16", unet, batch=None):
        regions = {type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None}
        assert regions == {"BasicTransformerBlock", "ResnetBlock2D"}
        assert torch._dynamo.config.recompile_limit > 8  # SDXL's ResNet blocks alone have ~15 shapes
    assert all(m._compiled_call_impl is None for m in unet.modules())
    with mfu_candidates.applied("compile_transformers", unet, batch=None):
        regions = {type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None}
        assert regions == {"Transformer2DModel", "ResnetBlock2D"}
    assert all(m._compiled_call_impl is None for m in unet.modules())
    with mfu_candidates.applied("compile_geglu", unet, batch=None):
        assert {type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None} == {"GEGLU"}
    assert all(m._compiled_call_impl is None for m in unet.modules())


def test_fused_lora_patches_every_lora_layer_and_is_undone():
    from peft.tuners.lora import Linear

    unet = tiny_unet()
    layers = [m for m in unet.modules() if isinstance(m, Linear)]
    with mfu_candidates.applied("fused_lora", unet, batch=None):
        assert layers and all("forward" in m.__dict__ for m in layers)
    assert not any("forward" in m.__dict__ for m in layers)
