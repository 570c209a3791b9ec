"""LoRA export on tiny real pipelines: kohya files diffusers loads exactly, conversions, metadata, bad input.

Each LoRA gets random weights (B != 0), lora_alpha != r, so a wrong scale, a dropped module or a
misnamed text encoder changes the outputs the tests compare.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from flatlora_diffusion.export import (
    ExportError,
    add_export_arguments,
    build_metadata,
    diffusers_state_dict,
    diffusers_to_kohya,
    export_lora,
    kohya_state_dict,
    kohya_to_diffusers,
    load_any_lora,
    run_export,
    save_kohya_lora,
    save_safetensors_atomic,
    sshs_model_hash,
)
from flatlora_diffusion.export.names import KOHYA_KEY_RE
from flatlora_diffusion.safetensors_io import read_metadata
from flatlora_diffusion.tiny import make_subject_images, make_tiny_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _pipeline_class(arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_pipeline(root / arch, arch) for arch in ("sd15", "sdxl")}


def _load(pipeline_dirs, arch):
    return _pipeline_class(arch).from_pretrained(pipeline_dirs[arch])


def _text_encoders(pipe):
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def _components(pipe):
    out = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


def _randomize_lora(models, seed):
    g = torch.Generator().manual_seed(seed)
    for model in models:
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.data = param.data * (1 + 0.2 * torch.rand(param.shape, generator=g))
            elif "lora_" in name:
                param.data = 0.2 * torch.randn(param.shape, generator=g)


def _trained(pipeline_dirs, arch, unet_config, te_config=None, seed=1):
    pipe = _load(pipeline_dirs, arch)
    pipe.unet.add_adapter(unet_config)
    if te_config is not None:
        for te in _text_encoders(pipe):
            te.add_adapter(te_config)
    _randomize_lora([pipe.unet, *_text_encoders(pipe)], seed)
    return pipe


def _lora(r, alpha, targets, **kw):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian", **kw)


@torch.no_grad()
def _outputs(pipe, seed=0):
    """Every text encoder's last and penultimate hidden states and the UNet's noise prediction."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (1, 77), generator=g)
    outs = []
    for te in _text_encoders(pipe):
        hidden = te(ids, output_hidden_states=True).hidden_states
        outs += [hidden[-1], hidden[-2]]
    unet = pipe.unet
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    outs.append(unet(sample, torch.tensor([500]), context, **kwargs).sample)
    return outs


def _assert_same_outputs(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def _assert_differ(a_list, b_list):
    """The LoRA must change every output, or a comparison would prove nothing."""
    for a, b in zip(a_list, b_list):
        assert (a - b).abs().max() > 1e-3


def _comfy_style_outputs(pipeline_dirs, arch, kohya_sd):
    """Apply a kohya state dict the way ComfyUI / AUTOMATIC1111 do and return the outputs.

    The key map is built from the model's own module names, as the UIs build theirs from the
    checkpoint's, with CLIP's ``text_model`` level spelled out; then W += alpha / r * up @ down.
    Every key must be used.
    """
    pipe = _load(pipeline_dirs, arch)
    te_prefixes = ["lora_te1_", "lora_te2_"] if arch == "sdxl" else ["lora_te_"]
    key_map = {}
    for name, module in pipe.unet.named_modules():
        key_map["lora_unet_" + name.replace(".", "_")] = module
    for prefix, te in zip(te_prefixes, _text_encoders(pipe)):
        for name, module in te.named_modules():
            full = name if name.startswith("text_model.") or not hasattr(te, "encoder") else "text_model." + name
            key_map[prefix + full.replace(".", "_")] = module
    used = set()
    with torch.no_grad():
        for key in kohya_sd:
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[: -len(".lora_down.weight")]
            down, up = kohya_sd[key].float(), kohya_sd[name + ".lora_up.weight"].float()
            alpha = kohya_sd[name + ".alpha"].item() if name + ".alpha" in kohya_sd else down.shape[0]
            key_map[name].weight += (alpha / down.shape[0]) * (up @ down)
            used |= {key, name + ".lora_up.weight", name + ".alpha"}
    assert used == set(kohya_sd)
    return _outputs(pipe)


def _loaded_outputs(pipeline_dirs, arch, lora_file):
    fresh = _load(pipeline_dirs, arch)
    fresh.load_lora_weights(str(lora_file))
    return _outputs(fresh)


# ----------------------------------------------------------------------------------------------
# kohya files written from the in-memory model load in diffusers with identical outputs
# ----------------------------------------------------------------------------------------------

CASES = {
    "sd15": ("sd15", dict(r=4, alpha=6), dict(r=2, alpha=5)),
    "sdxl": ("sdxl", dict(r=4, alpha=6), dict(r=2, alpha=5)),
    "sd15-rslora": ("sd15", dict(r=4, alpha=3, use_rslora=True), dict(r=8, alpha=2, use_rslora=True)),
    "sdxl-rslora": ("sdxl", dict(r=8, alpha=5, use_rslora=True), dict(r=4, alpha=7, use_rslora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kohya_file_loads_in_diffusers_with_identical_outputs(pipeline_dirs, tmp_path, case):
    arch, u, t = CASES[case]
    unet_cfg = _lora(u.pop("r"), u.pop("alpha"), UNET_TARGETS, **u)
    te_cfg = _lora(t.pop("r"), t.pop("alpha"), TE_TARGETS, **t)
    pipe = _trained(pipeline_dirs, arch, unet_cfg, te_cfg)
    trained = _outputs(pipe)

    state = kohya_state_dict(_components(pipe))
    assert all(KOHYA_KEY_RE.match(k) for k in state)
    te_prefixes = {k.split("text_model")[0] for k in state if k.startswith("lora_te")}
    assert te_prefixes == ({"lora_te1_", "lora_te2_"} if arch == "sdxl" else {"lora_te_"})
    for key, value in state.items():
        if key.endswith(".alpha"):
            assert value.dim() == 0

    path = tmp_path / "lora.safetensors"
    save_safetensors_atomic(state, path, {"ss_output_name": "lora"})
    loaded = _loaded_outputs(pipeline_dirs, arch, path)
    _assert_same_outputs(trained, loaded)
    _assert_same_outputs(trained, _comfy_style_outputs(pipeline_dirs, arch, state))

    base = _outputs(_load(pipeline_dirs, arch))
    _assert_differ(trained, base)


def test_rank_and_alpha_patterns_are_respected(pipeline_dirs, tmp_path):
    cfg = _lora(
        4,
        6,
        UNET_TARGETS,
        rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"attn1.to_q": 11},
    )
    pipe = _trained(pipeline_dirs, "sd15", cfg)
    state = kohya_state_dict({"unet": pipe.unet})
    scales = {}
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {}):
            key = "lora_unet_" + name.replace(".", "_")
            r = state[key + ".lora_down.weight"].shape[0]
            assert r == module.r["default"]
            scales[key] = state[key + ".alpha"].item() / r
            assert scales[key] == pytest.approx(module.scaling["default"], rel=1e-7)
    assert {round(s, 6) for s in scales.values()} == {1.5, 3.0, 2.75}  # 6/4, 6/2, 11/4

    trained = _outputs(pipe)
    _assert_same_outputs(trained, _comfy_style_outputs(pipeline_dirs, "sd15", state))
    # diffusers' own kohya loader mangles per-module alphas (its alpha_pattern keys keep
    # "processor.to_q_lora.down.weight"), so the diffusers route goes through our diffusers format.
    kohya_file = tmp_path / "patterns.safetensors"
    save_safetensors_atomic(state, kohya_file)
    diffusers_file = export_lora(kohya_file, fmt="diffusers", dtype="fp32")
    _assert_same_outputs(trained, _loaded_outputs(pipeline_dirs, "sd15", diffusers_file))


# ----------------------------------------------------------------------------------------------
# kohya <-> diffusers
# ----------------------------------------------------------------------------------------------


def test_kohya_diffusers_kohya_round_trip_is_lossless(pipeline_dirs, tmp_path):
    pipe = _trained(pipeline_dirs, "sdxl", _lora(4, 3, UNET_TARGETS), _lora(2, 7, TE_TARGETS, use_rslora=True))
    kohya = kohya_state_dict(_components(pipe))
    diffusers_sd, metadata = kohya_to_diffusers(kohya)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in diffusers_sd)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in diffusers_sd)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 3

    # through a file, as a user would
    diffusers_file = tmp_path / "d.safetensors"
    safetensors.torch.save_file(diffusers_sd, str(diffusers_file), metadata=metadata)
    back, arch = diffusers_to_kohya(*_read(diffusers_file))
    assert arch == "sdxl"
    assert back.keys() == kohya.keys()
    for key in kohya:
        assert back[key].dtype == kohya[key].dtype
        assert torch.equal(back[key], kohya[key]), key

    # and the diffusers file keeps lora_alpha: diffusers itself loads it to the trained outputs
    _assert_same_outputs(_outputs(pipe), _loaded_outputs(pipeline_dirs, "sdxl", diffusers_file))


def _read(path):
    return safetensors.torch.load_file(str(path)), read_metadata(path)


def test_export_kohya_file_to_diffusers_format(pipeline_dirs, tmp_path):
    pipe = _trained(pipeline_dirs, "sd15", _lora(4, 6, UNET_TARGETS), _lora(2, 5, TE_TARGETS))
    kohya_file = tmp_path / "k.safetensors"
    save_safetensors_atomic(kohya_state_dict(_components(pipe)), kohya_file)
    out = export_lora(kohya_file, fmt="diffusers", dtype="fp32")
    assert out == tmp_path / "k_diffusers.safetensors"
    assert "lora_adapter_metadata" in read_metadata(out)
    _assert_same_outputs(_outputs(pipe), _loaded_outputs(pipeline_dirs, "sd15", out))


def test_dora_scale_is_output_axis_and_reproduces_peft(pipeline_dirs, tmp_path):
    pipe = _trained(pipeline_dirs, "sd15", _lora(4, 6, ["to_q", "to_out.0"], use_dora=True))
    state = kohya_state_dict({"unet": pipe.unet})
    checked = 0
    for name, layer in pipe.unet.named_modules():
        if not (hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        down, up = state[key + ".lora_down.weight"], state[key + ".lora_up.weight"]
        scale = state[key + ".alpha"].item() / down.shape[0]
        dora = state[key + ".dora_scale"]
        weight = layer.get_base_layer().weight
        assert dora.shape == (weight.shape[0], 1)  # per output row: [out, 1]
        # LyCORIS wd_on_output: W' = (W + s*up@down) * dora_scale / ||W + s*up@down||_row
        merged = weight + scale * up @ down
        rebuilt = merged * (dora / merged.norm(dim=1, keepdim=True))
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(checked))
        with torch.no_grad():
            expected = layer(x)
        torch.testing.assert_close(torch.nn.functional.linear(x, rebuilt, layer.get_base_layer().bias), expected)
        checked += 1
    assert checked == 24  # 6 transformer blocks x (attn1, attn2) x (to_q, to_out.0)

    # and through the diffusers format (peft DoRA) back into diffusers, outputs unchanged
    kohya_file = tmp_path / "dora.safetensors"
    save_safetensors_atomic(state, kohya_file)
    out = export_lora(kohya_file, fmt="diffusers", dtype="fp32")
    _assert_same_outputs(_outputs(pipe), _loaded_outputs(pipeline_dirs, "sd15", out))
    assert json.loads(read_metadata(export_lora(out, tmp_path / "k.safetensors"))["ss_network_args"]) == {
        "dora_wd": "True",
        "wd_on_output": "True",
    }


# ----------------------------------------------------------------------------------------------
# files written by diffusers itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("with_metadata", [True, False])
@pytest.mark.parametrize("spelling", ["peft", "diffusers"])
def test_save_lora_weights_files_convert(pipeline_dirs, tmp_path, arch, with_metadata, spelling):
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe = _trained(pipeline_dirs, arch, _lora(4, 6, UNET_TARGETS), _lora(2, 5, TE_TARGETS))
    convert = convert_state_dict_to_diffusers if spelling == "diffusers" else dict
    layers = {"unet_lora_layers": convert(get_peft_model_state_dict(pipe.unet))}
    names = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    for name in names:
        layers[f"{name}_lora_layers"] = convert(get_peft_model_state_dict(getattr(pipe, name)))
        if with_metadata:
            layers[f"{name}_lora_adapter_metadata"] = getattr(pipe, name).peft_config["default"].to_dict()
    if with_metadata:
        layers["unet_lora_adapter_metadata"] = pipe.unet.peft_config["default"].to_dict()
    folder = tmp_path / "run"
    _pipeline_class(arch).save_lora_weights(folder, **layers)
    source = folder / "pytorch_lora_weights.safetensors"

    lora, detected = load_any_lora(source)
    assert detected == arch
    out = export_lora(source, tmp_path / "kohya.safetensors", dtype="fp32")
    assert all(KOHYA_KEY_RE.match(k) for k in safetensors.torch.load_file(str(out)))
    # What the file means is what diffusers makes of it: with metadata the trained model (alpha
    # kept); without, diffusers assumes alpha = r, and so must the export.
    expected = _outputs(pipe) if with_metadata else _loaded_outputs(pipeline_dirs, arch, source)
    _assert_same_outputs(expected, _loaded_outputs(pipeline_dirs, arch, out))
    if not with_metadata:
        _assert_differ(_outputs(pipe), expected)


def test_old_style_diffusers_names_convert(pipeline_dirs):
    """Attention-processor (`processor.to_q_lora.down`) and `lora_linear_layer` spellings of diffusers < 0.21."""
    pipe = _trained(pipeline_dirs, "sd15", _lora(4, 4, UNET_TARGETS), _lora(2, 2, TE_TARGETS))
    unet_sd = get_peft_model_state_dict(pipe.unet)
    te_sd = get_peft_model_state_dict(pipe.text_encoder)
    old = {}
    for key, value in unet_sd.items():
        module, _, kind = key.rpartition(".lora_")
        head, _, proj = module.rpartition(".")
        if proj == "0":  # to_out.0
            head, _, proj = head.rpartition(".")
        direction = "down" if kind.startswith("A") else "up"
        old[f"unet.{head}.processor.{proj}_lora.{direction}.weight"] = value
    for key, value in te_sd.items():
        module, _, kind = key.rpartition(".lora_")
        direction = "down" if kind.startswith("A") else "up"
        old[f"text_encoder.text_model.{module}.lora_linear_layer.{direction}.weight"] = value
    assert any("processor.to_out_lora.up.weight" in k for k in old)

    lora, arch = _lora_from(old)
    assert arch == "sd15"
    kohya = diffusers_to_kohya(old)[0]
    expected = kohya_state_dict(_components(pipe))
    assert kohya.keys() == expected.keys()
    for key in expected:
        assert torch.equal(kohya[key], expected[key]), key  # alpha = r on both sides here


def _lora_from(state):
    from flatlora_diffusion.export import lora_from_state_dict

    return lora_from_state_dict(state)


# ----------------------------------------------------------------------------------------------
# run directory export, metadata, hash
# ----------------------------------------------------------------------------------------------


def _run_dir(tmp_path, pipeline_dirs, arch, output_name="sks_toy"):
    pipe = _trained(pipeline_dirs, arch, _lora(8, 16, UNET_TARGETS), _lora(8, 16, TE_TARGETS))
    run = tmp_path / "runs" / "my-run"
    state, metadata = diffusers_state_dict(_components(pipe))
    run.mkdir(parents=True)
    safetensors.torch.save_file(state, str(run / "pytorch_lora_weights.safetensors"), metadata=metadata)
    data = tmp_path / "data" / "sks toy"
    make_subject_images(data, n=3)
    (data / "subject_01.txt").write_text("a photo of sks toy, red, smiling", encoding="utf-8")
    settings = {
        "output_name": output_name,
        "pretrained_model_name_or_path": str(pipeline_dirs[arch]),
        "instance_data_dir": str(data),
        "instance_prompt": "a photo of sks toy",
        "rank": 8,
        "lora_alpha": 16,
        "learning_rate": 1e-4,
        "text_encoder_lr": 5e-5,
        "train_text_encoder": True,
        "optimizer": "AdamW",
        "seed": 42,
        "max_train_steps": 400,
        "mixed_precision": "fp16",
        "resolution": 512 if arch == "sd15" else 1024,
        "noise_offset": 0.05,
        "snr_gamma": 5.0,
        "prior_loss_weight": 1.0,
        "with_prior_preservation": False,
        "flat_sigma": 0.05,
        "flat_schedule": "cosine",
        "flat_seed": 7,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    return pipe, run


def _addnet_hash(path):
    """sd-scripts' addnet_hash_safetensors, written out independently: sha256 after the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_run_directory_export_metadata_and_hash(pipeline_dirs, tmp_path, arch):
    pipe, run = _run_dir(tmp_path, pipeline_dirs, arch)
    out = export_lora(run)
    assert out == run / "sks_toy.safetensors"
    assert safetensors.torch.load_file(str(out))[
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    ].dtype == torch.float16

    md = read_metadata(out)
    assert all(isinstance(v, str) for v in md.values())
    if arch == "sdxl":
        assert md["ss_base_model_version"].startswith("sdxl_")
        assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert md["modelspec.resolution"] == "1024x1024"
    else:
        assert md["ss_base_model_version"] == "sd_v1"
        assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert md["ss_v2"] == "False"
    assert md["ss_output_name"] == "sks_toy"
    assert md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("8", "16")
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.trigger_phrase"] == "a photo of sks toy"
    assert md["ss_seed"] == "42" and md["ss_max_train_steps"] == "400"
    assert (md["flatlora_sigma"], md["flatlora_schedule"], md["flatlora_seed"]) == ("0.05", "cosine", "7")
    float(md["ss_training_started_at"])
    tags = json.loads(md["ss_tag_frequency"])["sks toy"]
    assert tags == {"a photo of sks toy": 3, "red": 1, "smiling": 1}  # one image has its own caption
    assert json.loads(md["ss_dataset_dirs"]) == {"sks toy": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(md["ss_network_args"]) == {}
    assert md["sshs_model_hash"] == _addnet_hash(out) == sshs_model_hash(out)

    # the exported file still is the trained model
    fp32 = export_lora(run, tmp_path / "fp32.safetensors", dtype="fp32")
    _assert_same_outputs(_outputs(pipe), _loaded_outputs(pipeline_dirs, arch, fp32))


def test_trainer_writes_kohya_file_of_sdxl_unet_only(pipeline_dirs, tmp_path):
    """UNet-only SDXL: the architecture comes from the UNet (text_time embedding), not from a te2."""
    pipe = _trained(pipeline_dirs, "sdxl", _lora(4, 2, UNET_TARGETS))
    path = save_kohya_lora({"unet": pipe.unet}, tmp_path / "xl.safetensors", {"instance_prompt": "sks"})
    md = read_metadata(path)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_output_name"] == "xl"
    assert md["sshs_model_hash"] == _addnet_hash(path)
    written = safetensors.torch.load_file(str(path))
    expected = kohya_state_dict({"unet": pipe.unet})
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(written[key], value if key.endswith(".alpha") else value.half()), key
    assert load_any_lora(path)[1] == "sdxl"
    with pytest.raises(ExportError, match="already exists"):
        save_kohya_lora({"unet": pipe.unet}, path)


def test_build_metadata_tolerates_missing_settings():
    md = build_metadata({}, "sdxl")
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["ss_resolution"] == "(1024, 1024)"
    assert all(isinstance(v, str) for v in md.values())
    json.loads(md["ss_network_args"])
    dora = build_metadata({"use_dora": True, "rank": 4, "lora_alpha": 2, "use_rslora": True}, "sd15")
    assert json.loads(dora["ss_network_args"])["dora_wd"] == "True"
    assert dora["ss_network_alpha"] == "4"  # 2 * sqrt(4): alpha / dim is the rsLoRA scale


def test_metadata_overrides_and_cli_success(pipeline_dirs, tmp_path, capsys):
    _, run = _run_dir(tmp_path, pipeline_dirs, "sd15")
    parser = add_export_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args([str(run), "--dtype", "bf16", "--metadata", "modelspec.author=someone"])
    assert run_export(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [str(run / "sks_toy.safetensors")]
    md = read_metadata(printed[0])
    assert md["modelspec.author"] == "someone"
    assert md["sshs_model_hash"] == _addnet_hash(printed[0])


# ----------------------------------------------------------------------------------------------
# bad input: one clear line, nothing written
# ----------------------------------------------------------------------------------------------


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def _good_kohya(pipeline_dirs, folder):
    pipe = _trained(pipeline_dirs, "sd15", _lora(2, 2, ["to_q"]))
    path = folder / "good.safetensors"
    save_safetensors_atomic(kohya_state_dict({"unet": pipe.unet}), path)
    return path


def _bad_input(kind, folder, pipeline_dirs):
    if kind == "missing":
        return folder / "nope.safetensors", "input not found"
    if kind == "not-safetensors":
        path = folder / "notes.safetensors"
        path.write_text("just some text, not tensors\n")
        return path, "not a safetensors file"
    if kind == "truncated":
        good = _good_kohya(pipeline_dirs, folder)
        path = folder / "cut.safetensors"
        path.write_bytes(good.read_bytes()[:-100])
        good.unlink()
        return path, "truncated"
    if kind == "no-lora":
        path = folder / "weights.safetensors"
        safetensors.torch.save_file({"conv.weight": torch.zeros(2, 2), "conv.bias": torch.zeros(2)}, str(path))
        return path, "not a LoRA file"
    if kind == "unknown-arch":
        path = folder / "flux.safetensors"
        name = "lora_unet_double_blocks_0_img_attn_qkv"
        safetensors.torch.save_file(
            {f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2)}, str(path)
        )
        return path, "unknown architecture"
    if kind == "unknown-arch-peft":
        path = folder / "flux_peft.safetensors"
        key = "transformer.single_transformer_blocks.0.attn.to_q"
        safetensors.torch.save_file(
            {f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(8, 2)}, str(path)
        )
        return path, "unknown architecture"
    raise AssertionError(kind)


BAD = ["missing", "not-safetensors", "truncated", "no-lora", "unknown-arch", "unknown-arch-peft"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_error_and_writes_nothing(pipeline_dirs, tmp_path, capsys, kind):
    path, reason = _bad_input(kind, tmp_path, pipeline_dirs)
    capsys.readouterr()  # progress bars of building the input
    before = _listing(tmp_path)
    with pytest.raises(ExportError) as info:
        export_lora(path)
    message = str(info.value)
    assert reason in message and "\n" not in message
    assert _listing(tmp_path) == before

    args = add_export_arguments(__import__("argparse").ArgumentParser()).parse_args([str(path)])
    assert run_export(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: {message}"]
    assert _listing(tmp_path) == before


def test_existing_output_needs_overwrite(pipeline_dirs, tmp_path, capsys):
    source = _good_kohya(pipeline_dirs, tmp_path)
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    before = _listing(tmp_path)
    with pytest.raises(ExportError, match="already exists"):
        export_lora(source, target)
    capsys.readouterr()
    args = add_export_arguments(__import__("argparse").ArgumentParser()).parse_args([str(source), "-o", str(target)])
    assert run_export(args) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {target} already exists (use --overwrite to replace it)"]
    assert target.read_bytes() == b"keep me" and _listing(tmp_path) == before
    assert export_lora(source, target, overwrite=True) == target
    assert load_any_lora(target)[1] == "sd15"
    assert _listing(tmp_path) == before  # replaced in place, no temporary file left


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    with pytest.raises(TypeError):
        save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors", {"n": 1})
    with pytest.raises(Exception):
        save_safetensors_atomic({"a": torch.zeros(2), "b": "not a tensor"}, tmp_path / "x.safetensors")
    with pytest.raises(RuntimeError, match="hash"):
        save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors", expected_data_sha256="0" * 64)
    assert _listing(tmp_path) == []


def test_cli_subprocess_exit_code_without_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    proc = subprocess.run(
        [sys.executable, "-m", "flatlora_diffusion.export", str(bad)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bad.safetensors is not a safetensors file (only 3 bytes)"]
    assert "Traceback" not in proc.stderr
