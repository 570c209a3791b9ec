"""Models, engines and checks shared by the Flat-LoRA tests (tests/test_flat.py and tests/test_flat_cuda.py).

ENGINES names the two implementations the specification in tests/test_flat.py runs against:
- "reference": flat/reference.py's per-layer torch path;
- "fast-torch": flat/fused.py's FastFlat with kernels="torch", the fast engine's chunks, keys, noise scales,
  buffers and autograd functions, with the Philox generator emulated in torch ops (as on the GPU, on the CPU).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from flatlora_diffusion.flat import FlatLoRA, fused

ENGINES = ("reference", "fast-torch")

# (fan_in, fan_out) of the single-Linear noise-law tests; 300 is not a multiple of the kernel's 256-column tiles
LINEAR_SHAPES = [(512, 64), (1024, 96), (300, 96), (384, 16)]


def attach_fast(flat, **kw):
    """Force the fast engine (torch kernels) onto a FlatLoRA, as backend='cuda' does on a GPU."""
    flat._fast = fused.FastFlat(flat, kernels="torch", **kw)
    return flat


def build_flat(engine, models, **kw):
    """FlatLoRA(models, **kw) run by `engine` (one of ENGINES)."""
    if engine == "reference":
        flat = FlatLoRA(models, backend="reference", **kw)
        assert flat.fast_engine() is None
        return flat
    if engine == "fast-torch":
        return attach_fast(FlatLoRA(models, **kw))
    raise ValueError(f"unknown engine {engine!r}")


# --- models ---------------------------------------------------------------------------------------------------


def lora(model, targets, r=4, alpha=8, rslora=False, adapter="default", seed=0):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights="gaussian")
    model = inject_adapter_in_model(cfg, model, adapter_name=adapter)
    randomise_lora(model, seed)
    return model


def randomise_lora(model, seed):
    """peft initialises B = 0; give B real values so W' = W + s BA differs from W."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def freeze_base(model):
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def linear_model(fan_in, fan_out, rslora):
    """One LoRA Linear of the noise-law tests."""
    return lora(nn.Sequential(nn.Linear(fan_in, fan_out)), ["0"], r=4, alpha=12, rslora=rslora)


def two_adapter_model():
    """One Linear with adapters a and b both active; b dominates the row norms of W'."""
    model = lora(nn.Sequential(nn.Linear(768, 48)), ["0"], r=2, alpha=6, adapter="a", seed=0)
    model = lora(model, ["0"], r=3, alpha=3, adapter="b", seed=7)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["b"].weight.mul_(20)
    layer.set_adapter(["a", "b"])
    return model


def two_layer_net(kind):
    """Two perturbed layers with a Tanh between (LoRA on "0" and "2") and an input for them."""
    torch.manual_seed(0)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 16))
        x = torch.randn(5, 7, 40)
    else:
        net = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(10, 5, 3, padding=1))
        x = torch.randn(2, 6, 9, 9)
    return freeze_base(lora(net, ["0", "2"], r=3, alpha=5)), x


def mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Conv2d(1, 4, 3, padding=1))
    model = model.to(dtype)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2", "3"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return freeze_base(model)


def train(model, flat, steps, dtype, tensor_step=False):
    """AdamW steps of the mlp; flat=None is plain LoRA. tensor_step: the step as a 0-d tensor (graph capture)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(123)
    for step in range(steps):
        x = torch.randn(4, 64, generator=gen)
        s = torch.tensor(step) if tensor_step else step
        ctx = flat.perturb(s) if flat is not None else contextlib.nullcontext()
        with ctx:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                h = model[2](model[1](model[0](x)))
                out = model[3](h.reshape(4, 1, 8, 8))
            loss = out.float().pow(2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def tiny_unet(attention_at_both_widths: bool = False, dora: bool = False):
    """A tiny SD-like UNet with LoRA on its attention layers: transformer blocks 64 wide (down, mid, up), and
    with attention_at_both_widths also 32 wide (blocks of two sizes in the down and up paths)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    first = "CrossAttn" if attention_at_both_widths else ""
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=(first + "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", first + "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                   use_dora=dora)
    )
    randomise_lora(unet, 0)
    return unet


def unet_inputs():
    """(sample, timesteps, text embeddings) for tiny_unet."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    return sample, torch.tensor([10, 500]), text


def unet_grads(unet, flat, step, checkpointing):
    """The LoRA gradients of one perturbed training pass of tiny_unet (flat=None: clean)."""
    unet.zero_grad()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    with flat.perturb(step) if flat is not None else contextlib.nullcontext():
        unet(*unet_inputs()).sample.pow(2).mean().backward()
    return grads(unet)


# --- checks ---------------------------------------------------------------------------------------------------


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def row_stats_within_bounds(eps, expected_std):
    """Each row of eps must look like N(0, expected_std_i^2): 6-sigma bounds on its mean and its std."""
    n = eps.shape[1]
    z = eps / expected_std[:, None]
    mean_bound = 6.0 / math.sqrt(n)
    std_bound = 6.0 / math.sqrt(2 * n)
    row_mean = z.mean(1)
    row_std = z.std(1)
    assert row_mean.abs().max() < mean_bound, (row_mean.abs().max(), mean_bound)
    assert (row_std - 1).abs().max() < std_bound, ((row_std - 1).abs().max(), std_bound)
    # Pooled over all rows the bound is much tighter: catches a constant factor error (e.g. a missing 1/sqrt(n)).
    assert abs(z.std().item() - 1) < 6.0 / math.sqrt(2 * z.numel())


def expected_std(layer, sigma_t, adapters):
    w = layer.base_layer.weight.detach().double()
    for a in adapters:
        w = w + layer.get_delta_weight(a).detach().double()
    return (w.reshape(w.shape[0], -1).norm(dim=1) * sigma_t / math.sqrt(w[0].numel())).float()


def materialised_unet_grads(unet, flat, step):
    """The clean LoRA gradients of tiny_unet with every perturbed weight replaced by W + flat.noise(layer, step),
    materialised in fp32 by hand (the reference the engines' gradients must equal)."""
    eps = {lay.name: flat.noise(lay, step) for lay in flat.layers}
    unet.zero_grad()
    unet.disable_gradient_checkpointing()
    patched = []
    for lay in flat.layers:
        base, e = lay.base, eps[lay.name]
        base.forward = (lambda b, e: (lambda x: F.linear(x, b.weight + e, b.bias)))(base, e)
        patched.append(base)
    try:
        unet(*unet_inputs()).sample.pow(2).mean().backward()
    finally:
        for base in patched:
            del base.forward
    return grads(unet)
