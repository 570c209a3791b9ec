"""--low_memory: frozen UNet weights stored in float8 and computed in bf16, LoRA in fp32, Flat-LoRA's W + eps
formed from the stored float8 W upcast to fp32, the settings the mode implies and the ones it refuses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.utils.checkpoint as tuc
import yaml

from flatlora_diffusion import step as step_module
from flatlora_diffusion.config import ConfigError, make_config
from flatlora_diffusion.flat import FlatLoRA, fused, reference
from flatlora_diffusion.fp8_storage import STORAGE_DTYPE, store_frozen_weights_in_fp8
from tests.flat_helpers import grads, tiny_unet, unet_inputs
from tests.training_helpers import lora_weights, run, settings

F8 = torch.float8_e4m3fn


def _hand_perturbed(flat, layer, step, sigma):
    """W + eps by hand, in fp32, from the stored float8 W: W8.float() + std * z, std from ||W8.float() + s B A||."""
    w = layer.base.weight.detach().float()
    merged = w + layer.lora_layer.get_delta_weight("default").detach().float()
    std = merged.reshape(merged.shape[0], -1).norm(dim=1) * (sigma / math.sqrt(layer.fan_in))
    z = reference.standard_normal(flat.key(layer, step), w.shape, w.device)
    return w + std.view(-1, *([1] * (w.dim() - 1))) * z


def _fp8_unet():
    unet = tiny_unet()
    twin = copy.deepcopy(unet)
    stored = store_frozen_weights_in_fp8(unet, torch.bfloat16)
    return unet, twin, stored


def test_fp8_storage_keeps_lora_fp32_and_stores_the_frozen_weights():
    unet, _, stored = _fp8_unet()
    params = dict(unet.named_parameters())
    assert stored == sum(p.numel() for p in params.values() if p.dtype == F8) > 0
    assert all(p.dtype == torch.float32 for n, p in params.items() if p.requires_grad)
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if "lora_" in n}
    assert params["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"].dtype == F8
    assert params["conv_in.weight"].dtype == F8
    assert params["conv_norm_out.weight"].dtype == torch.float32  # diffusers' skip patterns: norms keep theirs
    assert unet.dtype == torch.bfloat16  # what diffusers' pipelines read: the compute dtype


def test_fp8_unet_computes_exactly_as_its_bf16_twin_holding_the_same_values():
    """Compute is bf16: the float8 model's LoRA gradients equal those of a model that stores the float8 values in
    bf16 (no hook), with gradient checkpointing and with Flat-LoRA on."""
    unet, twin, _ = _fp8_unet()
    fp8_params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if fp8_params[name].dtype == F8:
                p.data = fp8_params[name].to(torch.bfloat16)
    results = []
    for model in (unet, twin):
        flat = FlatLoRA(model, sigma=0.2, schedule="constant", seed=4)
        model.enable_gradient_checkpointing()
        model.train()
        model.zero_grad()
        with flat.perturb(9), torch.autocast("cpu", dtype=torch.bfloat16):
            model(*unet_inputs()).sample.float().pow(2).mean().backward()
        results.append(grads(model))
    assert results[0].keys() == results[1].keys() and len(results[0]) == 2 * len(flat.layers)
    for name in results[0]:
        assert results[0][name].dtype == torch.float32
        assert torch.equal(results[0][name], results[1][name]), name
    assert all(p.dtype == F8 for n, p in unet.named_parameters() if fp8_params[n].dtype == F8)  # still stored so


def test_flat_noise_source_on_fp8_weights_equals_the_fp32_formula(monkeypatch):
    """Every W + eps the noise source hands out (forward, gradient-checkpoint recomputation, backward) is, bit for
    bit, W8.float() + std * z cast to the compute dtype; and the clean float8 weights are untouched."""
    unet, _, _ = _fp8_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.dtype == F8}
    flat = FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4)
    assert flat.fast_engine() is None  # the CPU: the reference path
    seen = []
    original = reference.ReferenceNoise.weight

    def weight(self, dtype, backward=False):
        out = original(self, dtype, backward)
        seen.append((self, self.weight_tensor.dtype, dtype, backward, out))
        return out

    monkeypatch.setattr(reference.ReferenceNoise, "weight", weight)
    unet.enable_gradient_checkpointing()
    unet.train()
    with flat.perturb(9), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(*unet_inputs()).sample.float().pow(2).mean().backward()
    by_tensor = {id(lay.base.weight): lay for lay in flat.layers}
    # each layer: the first forward and its recomputation; backward where the layer's input needs a gradient
    calls = {}
    for s in seen:
        calls[id(s[0].weight_tensor)] = calls.get(id(s[0].weight_tensor), 0) + 1
    assert len(calls) == len(flat.layers) and min(calls.values()) >= 2 and any(s[3] for s in seen)
    for source, stored, dtype, _, out in seen:
        assert stored == F8 and dtype == torch.bfloat16
        layer = by_tensor[id(source.weight_tensor)]
        expected = _hand_perturbed(flat, layer, 9, 0.2)
        assert torch.equal(original(source, torch.float32), expected)  # fp32: bitwise the formula
        assert torch.equal(out, expected.to(torch.bfloat16))
    for name, p in unet.named_parameters():
        if name in before:
            assert p.dtype == F8 and torch.equal(p.view(torch.uint8), before[name].view(torch.uint8)), name


def test_why_not_diffusers_own_hook_it_breaks_gradient_checkpointing():
    """diffusers' LayerwiseCastingHook casts the module back to float8 after each forward; non-reentrant
    checkpointing keeps frozen parameters by reference, so backward finds float8 (torch says so as a CheckpointError
    of "different metadata", or, as in fresh installs since 2026-12-06, as a dtype mismatch in the backward matmul).
    If this ever passes, diffusers' own enable_layerwise_casting can replace fp8_storage's hook."""
    unet = tiny_unet()
    unet.enable_layerwise_casting(storage_dtype=F8, compute_dtype=torch.bfloat16)
    unet.enable_gradient_checkpointing()
    unet.train()
    with pytest.raises(RuntimeError, match="different metadata|found Float8_e4m3fn"):  # CheckpointError is one
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unet(*unet_inputs()).sample.float().pow(2).mean().backward()


def test_the_fused_path_reads_fp8_weights_and_refuses_others_with_a_reason():
    unet, _, _ = _fp8_unet()
    assert fused.unreadable_weights(FlatLoRA(unet, sigma=0.1).layers) is None
    assert fused.unreadable_weights(FlatLoRA(tiny_unet(), sigma=0.1).layers) is None
    wide = tiny_unet().to(torch.float64)
    assert "float64" in fused.unreadable_weights(FlatLoRA(wide, sigma=0.1).layers)


def test_the_fused_engine_on_fp8_weights_forms_w_plus_eps_from_the_stored_w_in_fp32(monkeypatch):
    """The fast engine (its torch emulation, the same algorithm the Triton kernels run; the interpreter test of
    tests/test_flat_cuda.py compares the two on float8 weights) on a float8 UNet with gradient checkpointing: every
    W + eps it hands out (forward, recomputation, backward) is, bit for bit, W8.float() + std * z cast to bf16,
    with z its own generator's draw and std the noise scale of W8.float() + s B A; the LoRA gradients are those
    of a bf16 twin that holds those W + eps as its weights; the float8 weights are untouched."""
    from flatlora_diffusion.flat import fused

    unet, twin, _ = _fp8_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.dtype == F8}
    flat = FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4)
    engine = flat._fast = fused.FastFlat(flat, kernels="torch")
    handed = []
    original = fused.FastFlat.perturbed_weight

    def perturbed_weight(self, fl, dtype, backward=False):
        out = original(self, fl, dtype, backward)
        handed.append((fl, dtype, out.clone()))
        return out

    monkeypatch.setattr(fused.FastFlat, "perturbed_weight", perturbed_weight)
    unet.enable_gradient_checkpointing()
    unet.train()
    inputs = unet_inputs()
    with flat.perturb(9), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(*inputs).sample.float().pow(2).mean().backward()
    monkeypatch.setattr(fused.FastFlat, "perturbed_weight", original)
    assert {id(fl) for fl, _, _ in handed} == {id(fl) for fl in engine.fast_layers}
    assert len(handed) > 2 * len(engine.fast_layers)  # forward, recomputation and backward all asked
    expected = {}
    for fl in engine.fast_layers:
        layer = fl.flat_layer
        w = layer.base.weight.detach().float()
        merged = w + layer.lora_layer.get_delta_weight("default").detach().float()
        std = merged.reshape(merged.shape[0], -1).norm(dim=1) * (0.2 / math.sqrt(layer.fan_in))
        eps = flat.noise(layer, 9)  # the engine's own draw at step 9, in fp32
        torch.testing.assert_close(eps.reshape(fl.rows, -1).std(1) / std, torch.ones_like(std), rtol=0.5, atol=0)
        expected[id(fl)] = (w + eps).to(torch.bfloat16)
    for fl, dtype, out in handed:
        assert dtype == torch.bfloat16 and torch.equal(out, expected[id(fl)])

    # the bf16 twin holding W + eps (and the float8 values elsewhere) trains to the same LoRA gradients
    perturbed = {id(fl.flat_layer.base.weight): expected[id(fl)] for fl in engine.fast_layers}
    fp8_params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            source = fp8_params[name]
            if id(source) in perturbed:
                p.data = perturbed[id(source)].clone()
            elif source.dtype == F8:
                p.data = source.to(torch.bfloat16)
            else:
                p.data = source.detach().clone()
    twin.enable_gradient_checkpointing()
    twin.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twin(*inputs).sample.float().pow(2).mean().backward()
    twin_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for name, p in unet.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, twin_grads[name], rtol=0, atol=0, msg=name)
        if name in before:
            assert p.dtype == F8 and torch.equal(p.view(torch.uint8), before[name].view(torch.uint8)), name


# --- the trainer --------------------------------------------------------------------------------------------
def test_low_memory_run_trains_fp32_lora_on_fp8_weights_and_writes_a_loadable_file(tiny, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {"frozen": set(), "trained": set(), "grads": [], "hooked": False, "checkpoints": 0, "flat_w": set()}
    original_loss = step_module.diffusion_loss
    original_ckpt = tuc.checkpoint
    original_weight = reference.ReferenceNoise.weight

    def loss(models, *args, **kwargs):
        for name, p in models.unet.named_parameters():
            if "to_q.base_layer.weight" in name:
                seen["frozen"].add(p.dtype)
            if p.requires_grad:
                seen["trained"].add(p.dtype)
                if not seen["hooked"]:  # a tensor hook stays: one per parameter is enough
                    p.register_hook(lambda g: seen["grads"].append((g.dtype, bool(g.abs().sum() > 0))))
        seen["hooked"] = True
        return original_loss(models, *args, **kwargs)

    def checkpoint(*args, **kwargs):
        seen["checkpoints"] += 1
        return original_ckpt(*args, **kwargs)

    def weight(self, dtype, backward=False):
        seen["flat_w"].add(self.weight_tensor.dtype)
        return original_weight(self, dtype, backward)

    monkeypatch.setattr(step_module, "diffusion_loss", loss)
    monkeypatch.setattr(tuc, "checkpoint", checkpoint)
    monkeypatch.setattr(reference.ReferenceNoise, "weight", weight)
    out = run(tiny, tmp_path / "low", low_memory=True, max_train_steps=3)

    assert seen["frozen"] == {STORAGE_DTYPE}  # at every step, in storage
    assert seen["trained"] == {torch.float32}
    assert seen["grads"] and {g[0] for g in seen["grads"]} == {torch.float32} and any(g[1] for g in seen["grads"])
    assert seen["checkpoints"] > 0  # gradient checkpointing was on
    assert seen["flat_w"] == {STORAGE_DTYPE}  # Flat-LoRA read the float8 weights
    recorded = yaml.safe_load((out.path / "config.yaml").read_text())
    assert recorded["low_memory"] is True and recorded["mixed_precision"] == "bf16"
    assert recorded["gradient_checkpointing"] is True and recorded["cache_latents"] is True
    assert recorded["cache_text_embeddings"] is True and recorded["cuda_graph"] == "off"

    saved = lora_weights(out.path)
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out.path))
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert loaded and any(p.abs().sum() > 0 for p in loaded.values())


@pytest.fixture
def unet_moves(monkeypatch):
    """A list that gets ("unet", device, weights in float8?) for every move of a UNet to a device."""
    from diffusers import UNet2DConditionModel

    events = []
    original_to = UNet2DConditionModel.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if device is not None and not isinstance(device, torch.dtype):
            events.append(("unet", str(device), any(p.dtype == STORAGE_DTYPE for p in self.parameters())))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "to", to)
    return events


def test_low_memory_unet_reaches_the_device_already_in_float8(tiny, tmp_path, unet_moves):
    """The bf16 UNet must never be moved to the training device: SDXL's would hold 5.1 GB there while converting,
    the peak this mode exists to avoid. Every move of the UNet to a device happens with its weights in float8."""
    run(tiny, tmp_path / "low", low_memory=True, max_train_steps=1)
    assert unet_moves and all(in_float8 for _, _, in_float8 in unet_moves)


def test_low_memory_unet_reaches_the_device_after_the_latent_cache(tiny, tmp_path, monkeypatch, unet_moves):
    """The float8 UNet waits on the CPU while the VAE fills the latent cache: beside the text encoders and the
    fp32 VAE at 1024 px it made SDXL's peak (7.4 GiB allocated while caching, 3.5 GiB in a step, on an H100)."""
    from flatlora_diffusion.trainer.batches import BatchesMixin

    events = unet_moves  # the VAE's encodes go into the same list, in order
    original_encode = BatchesMixin._encode_pixels

    def encode(self, pixel_values):
        events.append(("encode",))
        return original_encode(self, pixel_values)

    monkeypatch.setattr(BatchesMixin, "_encode_pixels", encode)
    run(tiny, tmp_path / "low", low_memory=True, max_train_steps=1)
    moves = [i for i, e in enumerate(events) if e[:2] == ("unet", "cpu")]
    encodes = [i for i, e in enumerate(events) if e == ("encode",)]
    assert encodes and moves and max(encodes) < min(moves), events


# --- the settings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, fragment", [
    ({"train_text_encoder": True}, "--train_text_encoder"),
    ({"mixed_precision": "fp16"}, "--mixed_precision fp16"),
    ({"mixed_precision": "no"}, "--mixed_precision no"),
    ({"cache_text_embeddings": False}, "--no_cache_text_embeddings"),
    ({"cuda_graph": "on"}, "--cuda_graph on"),
    ({"use_dora": True}, "--use_dora"),
    ({"torch_compile": True}, "--torch_compile"),
])
def test_low_memory_refuses_what_it_cannot_honour(tiny, tmp_path, over, fragment):
    with pytest.raises(ConfigError) as err:
        make_config(settings(tiny, tmp_path, low_memory=True, **over))
    message = str(err.value)
    assert message.startswith("--low_memory cannot be combined with " + fragment) and "\n" not in message


def test_low_memory_turns_on_what_it_implies(tiny, tmp_path):
    cfg = make_config(settings(tiny, tmp_path, low_memory=True))
    assert cfg.resolve_low_memory() == ["mixed_precision", "gradient_checkpointing", "cache_latents", "cuda_graph"]
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.cache_latents, cfg.cuda_graph) == ("bf16", True, True, "off")
    assert cfg.resolve_low_memory() == []  # idempotent: a saved config.yaml re-runs unchanged
    plain = make_config(settings(tiny, tmp_path))
    assert plain.resolve_low_memory() == [] and plain.gradient_checkpointing is False
