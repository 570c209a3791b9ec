"""kohya names at full size (module trees on the meta device), original-SD name mapping, arch detection."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from peft import LoraConfig

from flatlora_diffusion.export import ExportError, kohya_state_dict, lora_from_state_dict
from flatlora_diffusion.export.names import KOHYA_KEY_RE, ldm_to_diffusers_unet_path, split_underscored

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_act="quick_gelu",
            max_position_embeddings=77,
        )
    )


def _clip_g():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=20,
            intermediate_size=5120,
            hidden_act="gelu",
            max_position_embeddings=77,
            projection_dim=1280,
        )
    )


def _unet(arch):
    from diffusers import UNet2DConditionModel

    if arch == "sdxl":
        return UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


@pytest.fixture(scope="module")
def full_size():
    """Full-size SD 1.5 and SDXL UNet / text-encoder trees with rank-4 LoRA, all on the meta device."""
    models = {}
    with torch.device("meta"):
        for arch in ("sd15", "sdxl"):
            components = {"unet": _unet(arch), "text_encoder": _clip_l()}
            if arch == "sdxl":
                components["text_encoder_2"] = _clip_g()
            components["unet"].add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
            for name in ("text_encoder", "text_encoder_2"):
                if name in components:
                    components[name].add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS))
            models[arch] = components
    return models


EXPECTED = {"sd15": {"unet": 128, "te": 48}, "sdxl": {"unet": 560, "te1": 48, "te2": 128}}
WIDTHS = {"sd15": {"te": 768}, "sdxl": {"te1": 768, "te2": 1280}}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_kohya_names(full_size, arch):
    state = kohya_state_dict(full_size[arch])

    malformed = [k for k in state if not KOHYA_KEY_RE.match(k)]
    assert malformed == []
    modules = Counter()
    suffixes: dict[str, set] = {}
    for key in state:
        name, _, suffix = key.partition(".")
        suffixes.setdefault(name, set()).add(suffix)
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in suffixes.values())
    for name in suffixes:
        modules[re.match(r"lora_(unet|te1|te2|te)_", name).group(1)] += 1
    assert dict(modules) == EXPECTED[arch]

    for name in suffixes:
        if name.startswith("lora_te"):
            assert re.match(r"lora_te[12]?_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj$", name), name
        else:
            assert "_transformer_blocks_" in name and re.search(r"_attn[12]_to_(q|k|v|out_0)$", name), name
    for component, width in WIDTHS[arch].items():
        down = state[f"lora_{component}_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
        assert tuple(down.shape) == (4, width)
    for key, value in state.items():
        if key.endswith(".alpha"):
            assert value.dim() == 0 and value.item() == 8.0
        else:
            assert value.device.type == "meta"
    if arch == "sdxl":
        up_params = sum(v.numel() for k, v in state.items() if k.startswith("lora_unet") and "alpha" not in k)
        assert up_params == 5_806_080  # 5.8 M UNet LoRA parameters at r = 4
        k = state["lora_unet_mid_block_attentions_0_transformer_blocks_9_attn2_to_k.lora_down.weight"]
        assert tuple(k.shape) == (4, 2048)

    # Read back from the names alone: the same modules, recognised as the same architecture.
    lora, detected = lora_from_state_dict(state)
    assert detected == arch
    assert sum(len(m) for m in lora.values()) == sum(EXPECTED[arch].values())


# Pairs from sd-scripts' own SDXL and SD 1.x LoRA files (original-SD "LDM" names).
LDM_SDXL = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
    "input_blocks_8_1_transformer_blocks_9_attn2_to_k": "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
    "middle_block_1_transformer_blocks_3_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.3.attn1.to_out.0",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_1_transformer_blocks_9_ff_net_0_proj": "up_blocks.0.attentions.0.transformer_blocks.9.ff.net.0.proj",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_transformer_blocks_1_attn2_to_v": "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "label_emb_0_0": "add_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
}
LDM_SD15 = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_11_1_proj_out": "up_blocks.3.attentions.2.proj_out",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
}


@pytest.mark.parametrize("arch,table", [("sdxl", LDM_SDXL), ("sd15", LDM_SD15)])
def test_original_sd_names_map_to_diffusers(arch, table):
    for ldm, expected in table.items():
        assert ldm_to_diffusers_unet_path(split_underscored(ldm), arch) == expected, ldm


def _kohya_module(name, d_in, d_out, r=2):
    return {
        f"{name}.lora_down.weight": torch.ones(r, d_in),
        f"{name}.lora_up.weight": torch.ones(d_out, r),
        f"{name}.alpha": torch.tensor(1.0),
    }


def test_sd_scripts_sdxl_file_is_read_with_diffusers_paths():
    state = {}
    state.update(_kohya_module("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 2048, 640))
    state.update(_kohya_module("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0", 1280, 1280))
    state.update(_kohya_module("lora_te1_text_model_encoder_layers_11_mlp_fc2", 3072, 768))
    state.update(_kohya_module("lora_te2_text_model_encoder_layers_31_self_attn_out_proj", 1280, 1280))
    lora, arch = lora_from_state_dict(state)
    assert arch == "sdxl"
    assert sorted(lora["unet"]) == [
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    ]
    assert list(lora["text_encoder"]) == ["text_model.encoder.layers.11.mlp.fc2"]
    assert list(lora["text_encoder_2"]) == ["text_model.encoder.layers.31.self_attn.out_proj"]


ARCH_CASES = {
    # name: (kohya modules [(name, in, out)], expected arch)
    "tiny sd unet only": ([("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 32, 64)], "sd15"),
    "tiny sdxl unet only": (
        [("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q", 64, 64)],
        "sdxl",
    ),
    "sd15 cross width": ([("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 768, 640)], "sd15"),
    "sd2 cross width": ([("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 1024, 1280)], "sd2"),
    "sdxl cross width": ([("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", 2048, 1280)], "sdxl"),
    "sd te only": ([("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)], "sd15"),
    "sdxl te2 only": ([("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 48, 48)], "sdxl"),
    "sdxl add_embedding": ([("lora_unet_add_embedding_linear_1", 80, 128)], "sdxl"),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_architecture_from_keys(case):
    modules, expected = ARCH_CASES[case]
    state = {}
    for name, d_in, d_out in modules:
        state.update(_kohya_module(name, d_in, d_out))
    assert lora_from_state_dict(state)[1] == expected


def test_conflicting_architecture_evidence_is_unknown():
    state = {}
    state.update(_kohya_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280))
    state.update(_kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320))
    with pytest.raises(ExportError, match="unknown architecture"):
        lora_from_state_dict(state)


def test_lycoris_files_are_refused_clearly():
    state = {"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.ones(2, 2)}
    with pytest.raises(ExportError, match="LyCORIS"):
        lora_from_state_dict(state)
