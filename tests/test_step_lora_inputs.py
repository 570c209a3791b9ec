"""The training step leaves peft LoRA layers' inputs in the autocast dtype (step.TrainStep's
_lora_inputs_left_in_compute_dtype): the same loss and gradients bit for bit, without the cast copies."""

import contextlib

import pytest
import torch

from tests.flat_helpers import tiny_unet


def _one_step(skip_cast: bool, lora_input_dtypes: list, dora: bool = False, checkpointing: bool = False):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from flatlora_diffusion.step import StepBatch, StepModels, StepOptions, TrainStep

    unet = tiny_unet(dora=dora)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    for name, p in unet.named_parameters():
        p.data = p.data.float() if "lora_" in name else p.data.to(torch.bfloat16)  # as the trainer: frozen bf16
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    step = TrainStep(StepModels(unet, [], DDPMScheduler(num_train_timesteps=1000), "sd15"),
                     torch.optim.SGD(params, lr=0.0), params, acc, StepOptions(seed=0, max_grad_norm=None))
    if not skip_cast:
        step._lora_inputs_left_in_compute_dtype = contextlib.nullcontext
    first_lora_a = next(m for n, m in unet.named_modules() if n.endswith("lora_A.default"))
    first_lora_a.register_forward_pre_hook(lambda module, args: lora_input_dtypes.append(args[0].dtype))
    gen = torch.Generator().manual_seed(0)
    batch = StepBatch(latents=torch.randn(2, 4, 8, 8, generator=gen).to(torch.bfloat16),
                      prompt_embeds=torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16))
    loss = step.loss_and_backward(batch, torch.Generator().manual_seed(1))
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_inputs_stay_bf16_and_the_step_is_bitwise_unchanged(checkpointing):
    """With gradient checkpointing the backward recomputes the forward: it must see the same setting (else torch's
    checkpoint finds recomputed tensors of another dtype)."""
    seen_skipped, seen_cast = [], []
    loss_skipped, grads_skipped = _one_step(True, seen_skipped, checkpointing=checkpointing)
    loss_cast, grads_cast = _one_step(False, seen_cast, checkpointing=checkpointing)
    assert seen_skipped and set(seen_skipped) == {torch.bfloat16}  # the up-cast copy is skipped
    assert set(seen_cast) == {torch.float32}  # peft's own behaviour, which the step changes
    assert torch.equal(loss_skipped, loss_cast)
    assert len(grads_skipped) == len(grads_cast) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_skipped, grads_cast))
    assert any(g.abs().sum() > 0 for g in grads_skipped)  # gradients that are compared really flow


def test_dora_layers_keep_peft_s_cast():
    """DoRA's magnitude terms compute on the input outside autocast's matmuls: those layers keep the fp32 cast."""
    seen = []
    _one_step(True, seen, dora=True)
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_bf16_norms_compute_in_bf16_inside_the_step_only(checkpointing, precision):
    """StepOptions.bf16_norms (the trainer's --bf16_norms): under bf16 autocast every UNet norm runs norms.py's
    forward, returning bf16, in the forward and in the backward's recomputation; before and after the step the
    modules are untouched (the trainer's validation sampling has its own switch: test_train_features). Without mixed precision nothing changes.
    (On the CPU autocast leaves norms in bf16 anyway; what fp32 outputs cost on CUDA is in norms.py.)"""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from flatlora_diffusion.step import StepBatch, StepModels, StepOptions, TrainStep

    unet = tiny_unet()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    for name, p in unet.named_parameters():
        p.data = p.data.float() if "lora_" in name else p.data.to(torch.bfloat16)
    acc = Accelerator(mixed_precision=precision, cpu=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    step = TrainStep(StepModels(unet, [], DDPMScheduler(num_train_timesteps=1000), "sd15"),
                     torch.optim.SGD(params, lr=0.0), params, acc,
                     StepOptions(seed=0, max_grad_norm=None, bf16_norms=True))
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert {type(m) for m in norms} == {torch.nn.GroupNorm, torch.nn.LayerNorm}
    calls = []
    for norm in norms:
        norm.register_forward_hook(lambda m, args, out: calls.append(("forward" in m.__dict__, out.dtype)))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen).to(torch.bfloat16)
    embeds = torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16)
    if precision == "no":
        latents, embeds = latents.float(), embeds.float()
        unet.float()
    step.loss_and_backward(StepBatch(latents=latents, prompt_embeds=embeds), torch.Generator().manual_seed(1))
    # with checkpointing the backward recomputes the blocks' norms (not those outside the checkpointed blocks)
    assert len(calls) > len(norms) if checkpointing else len(calls) == len(norms)
    if precision == "bf16":
        assert all(patched and dtype == torch.bfloat16 for patched, dtype in calls)
    else:
        assert not any(patched for patched, _ in calls)
    assert not any("forward" in m.__dict__ for m in norms)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
