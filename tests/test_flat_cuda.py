"""The fast Flat-LoRA engine (flat_cuda.py) against the specification of tests/test_flat.py, on the CPU.

The engine runs here with kernels="torch": the same chunks, keys, noise scales, buffers and autograd
functions as on the GPU, with the Philox generator emulated in torch ops. The Triton kernel itself is
compared with this emulation by the GPU benchmark (benchmarks/bench_flat.py, which fails loudly on any
difference) and, where Triton is installed, by the interpreter test at the end of this file.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from flatlora_diffusion import flat_cuda as fc
from flatlora_diffusion.flat import FlatLoRA, noise_key, sigma_at


def _fast(flat, **kw):
    """Force the fast engine (torch kernels) onto a FlatLoRA, as backend='cuda' does on a GPU."""
    flat._fast = fc.FastFlat(flat, kernels="torch", **kw)
    return flat


def _lora(model, targets, r=4, alpha=8, adapter="default", seed=0, rslora=False):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights="gaussian")
    model = inject_adapter_in_model(cfg, model, adapter_name=adapter)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _freeze_base(model):
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _expected_std(layer, sigma_t, adapters):
    w = layer.base_layer.weight.detach().double()
    for a in adapters:
        w = w + layer.get_delta_weight(a).detach().double()
    return (w.reshape(w.shape[0], -1).norm(dim=1) * sigma_t / math.sqrt(w[0].numel())).float()


def _row_stats_within_bounds(eps, expected_std):
    n = eps.shape[1]
    z = eps / expected_std[:, None]
    assert z.mean(1).abs().max() < 6.0 / math.sqrt(n)
    assert (z.std(1) - 1).abs().max() < 6.0 / math.sqrt(2 * n)
    assert abs(z.std().item() - 1) < 6.0 / math.sqrt(2 * z.numel())


# --- device-independent pieces -------------------------------------------------------------------------------


def test_device_keys_equal_noise_key():
    rng = random.Random(0)
    ids = [rng.getrandbits(64) for _ in range(64)]
    for _ in range(50):
        seed, step, micro, rank = rng.randint(-(2**63), 2**63 - 1), rng.randint(0, 10**7), rng.randint(0, 9), rng.randint(0, 63)
        keys = fc.device_noise_keys(torch.tensor(seed), torch.tensor(step), torch.tensor(micro),
                                    torch.tensor([fc._i64(i) for i in ids]), rank)
        assert keys.tolist() == [noise_key(seed, step, micro, i, rank) for i in ids]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_device_sigma_equals_sigma_at(schedule):
    for step in [0, 1, 7, 50, 99, 100, 250]:
        got = fc.device_sigma_at(torch.tensor(step), 0.1, schedule, 100).item()
        assert got == pytest.approx(sigma_at(step, 0.1, schedule, 100), rel=1e-6, abs=1e-9)
    assert fc.device_sigma_at(torch.tensor(5), 0.0, schedule, 100).item() == 0.0


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox-4x32-10 (counter 0 / key 0, and all ones)."""
    out = fc.philox4x32(torch.tensor(0), torch.tensor([0]), torch.tensor([0]))
    assert [int(x) for x in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # counters (ffffffff, ffffffff, 0, 0) are not a published vector; check the word operations instead:
    # one round by hand
    c0, c1, k0, k1 = 0x12345678, 0x9ABCDEF0, 0x0BADBEEF, 0x00C0FFEE
    key = torch.tensor((k1 << 32) | k0)
    r = fc.philox4x32(key, torch.tensor([c0]), torch.tensor([c1]), rounds=1)
    p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * 0
    expect = [((p2 >> 32) ^ c1 ^ k0) & 0xFFFFFFFF, p2 & 0xFFFFFFFF, ((p0 >> 32) ^ 0 ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
    assert [int(x) for x in r] == expect


def test_standard_normal_grid_law_and_layout():
    z = fc.standard_normal_grid(12345, 256, 1000)
    assert z.shape == (256, 1000)
    assert abs(z.mean().item()) < 6 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 6 / math.sqrt(2 * z.numel())
    kurt = (z**4).mean().item() / z.var().item() ** 2
    assert abs(kurt - 3) < 0.05
    # a row's numbers depend on (key, row, column) only: not on how many rows or columns are drawn
    assert torch.equal(fc.standard_normal_grid(12345, 5, 1000, row_start=100), z[100:105])
    assert torch.equal(fc.standard_normal_grid(12345, 256, 300), z[:, :300])
    # neighbouring columns / rows / keys are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1]) < 0.01
    other = fc.standard_normal_grid(12346, 256, 1000)
    assert abs(torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1]) < 0.01


def test_chunk_prefix():
    assert fc.chunk_prefix("0.down_blocks.1.attentions.0.transformer_blocks.3.attn1.to_q") == \
        "0.down_blocks.1.attentions.0.transformer_blocks.3"
    assert fc.chunk_prefix("0.down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_out.0") == \
        "0.down_blocks.1.attentions.0.transformer_blocks.3"
    assert fc.chunk_prefix("1.text_model.encoder.layers.7.self_attn.q_proj") == "1.text_model.encoder.layers.7"


# --- the specification of tests/test_flat.py, run by the fast engine ---------------------------------------------


@pytest.mark.parametrize("shape", [(512, 64), (300, 96), (384, 16)])
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_noise_follows_the_formula(shape, rslora):
    fan_in, fan_out = shape
    model = _lora(nn.Sequential(nn.Linear(fan_in, fan_out)), ["0"], r=4, alpha=12, rslora=rslora)
    flat = _fast(FlatLoRA(model, sigma=0.2, schedule="constant", seed=3))
    eye = torch.eye(fan_in)
    with torch.no_grad():
        clean = model(eye)
        with flat.perturb(step=5):
            noisy = model(eye)
    eps = (noisy - clean).T
    _row_stats_within_bounds(eps, _expected_std(model[0], 0.2, ["default"]))
    torch.testing.assert_close(eps, flat.noise(flat.layers[0], 5), rtol=0, atol=1e-5)
    # the in-kernel noise scale (W + s BA formed tile by tile) is the reference's
    eng = flat._fast
    eng.begin_step(5, 0)
    torch.testing.assert_close(eng.row_std(eng.fast_layers[0]), flat.row_std(flat.layers[0], 0.2), rtol=1e-5, atol=0)


def test_noise_scale_uses_all_active_adapters():
    fan_in, fan_out = 768, 48
    model = _lora(nn.Sequential(nn.Linear(fan_in, fan_out)), ["0"], r=2, alpha=6, adapter="a", seed=0)
    model = _lora(model, ["0"], r=3, alpha=3, adapter="b", seed=7)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["b"].weight.mul_(20)
    layer.set_adapter(["a", "b"])
    flat = _fast(FlatLoRA(model, sigma=0.1, schedule="constant"))
    eye = torch.eye(fan_in)
    with torch.no_grad():
        clean = model(eye)
        with flat.perturb(step=0):
            noisy = model(eye)
    eps = (noisy - clean).T
    _row_stats_within_bounds(eps, _expected_std(layer, 0.1, ["a", "b"]))
    assert flat._fast.fast_layers[0].simple is None  # two adapters: scaled by the reference formula


@pytest.mark.parametrize("in_ch,out_ch,k", [(16, 24, 3), (64, 8, 1), (8, 40, 5)])
def test_conv2d_noise_follows_the_formula(in_ch, out_ch, k):
    model = _lora(nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=0)), ["0"], r=4, alpha=2)
    flat = _fast(FlatLoRA(model, sigma=0.15, schedule="constant", seed=11))
    n = in_ch * k * k
    probes = torch.eye(n).reshape(n, in_ch, k, k)
    with torch.no_grad():
        clean = model(probes).reshape(n, out_ch)
        with flat.perturb(step=2):
            noisy = model(probes).reshape(n, out_ch)
    eps = (noisy - clean).T
    _row_stats_within_bounds(eps, _expected_std(model[0], 0.15, ["default"]))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_gradients_equal_a_materialised_fp32_reference(kind):
    torch.manual_seed(0)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 16))
        x = torch.randn(5, 7, 40)
    else:
        net = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(10, 5, 3, padding=1))
        x = torch.randn(2, 6, 9, 9)
    model = _freeze_base(_lora(net, ["0", "2"], r=3, alpha=5))
    flat = _fast(FlatLoRA(model, sigma=0.3, schedule="constant", seed=2))
    target = torch.randn_like(model(x))
    with flat.perturb(step=4):
        F.mse_loss(model(x), target).backward()
    got = _grads(model)
    leaves = {}

    def reference_layer(index, h):
        layer, flat_layer = model[index], flat.layers[index // 2]
        A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
        B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
        leaves[index] = (A, B)
        W = layer.base_layer.weight.detach()
        weight = W + layer.scaling["default"] * (B.flatten(1) @ A.flatten(1)).reshape(W.shape) + flat.noise(flat_layer, 4)
        if kind == "linear":
            return F.linear(h, weight, layer.base_layer.bias)
        base = layer.base_layer
        return F.conv2d(h, weight, base.bias, stride=base.stride, padding=base.padding)

    out = reference_layer(2, torch.tanh(reference_layer(0, x)))
    F.mse_loss(out, target).backward()
    for index, (A, B) in leaves.items():
        torch.testing.assert_close(got[f"{index}.lora_A.default.weight"], A.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[f"{index}.lora_B.default.weight"], B.grad, rtol=1e-4, atol=1e-5)


def _mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Conv2d(1, 4, 3, padding=1)).to(dtype)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2", "3"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return _freeze_base(model)


def _train(model, flat, steps, dtype, tensor_step=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(123)
    for step in range(steps):
        x = torch.randn(4, 64, generator=gen)
        s = torch.tensor(step) if tensor_step else step
        ctx = flat.perturb(s) if flat is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                h = model[2](model[1](model[0](x)))
                out = model[3](h.reshape(4, 1, 8, 8))
            out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_frozen_weights_bitwise_unchanged_after_many_steps(dtype):
    model = _mlp(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    flat = _fast(FlatLoRA(model, sigma=0.5, schedule="constant", seed=0))
    _train(model, flat, steps=30, dtype=dtype)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert p.dtype == dtype and torch.equal(p, before[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_sigma_zero_is_plain_lora_bitwise_also_with_tensor_steps():
    plain = _train(_mlp(torch.bfloat16), None, steps=6, dtype=torch.bfloat16)
    for tensor_step in (False, True):  # a tensor step (graph capture) adds 0 * z instead of skipping
        zero = _mlp(torch.bfloat16)
        _train(zero, _fast(FlatLoRA(zero, sigma=0.0)), steps=6, dtype=torch.bfloat16, tensor_step=tensor_step)
        for (n, p), (_, q) in zip(plain.named_parameters(), zero.named_parameters()):
            assert torch.equal(p, q), (tensor_step, n)


def test_tensor_step_equals_int_step():
    runs = []
    for tensor_step in (False, True):
        model = _mlp(torch.float32)
        _train(model, _fast(FlatLoRA(model, sigma=0.3, schedule="cosine", total_steps=5, seed=9)), 4,
               torch.float32, tensor_step=tensor_step)
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_global_rng_untouched_and_clean_outside():
    model = _freeze_base(_lora(nn.Sequential(nn.Linear(32, 16)), ["0"]))
    flat = _fast(FlatLoRA(model, sigma=0.5, schedule="constant"))
    x = torch.randn(3, 32)
    clean = model(x).detach()
    state = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError):
        with flat.perturb(7):
            model(x).sum().backward()
            assert not torch.allclose(model(x), clean)
            raise ZeroDivisionError
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(model(x), clean)
    assert "forward" not in model[0].base_layer.__dict__
    assert not flat.active


def test_microbatches_share_noise_by_default_and_not_with_option():
    model = _lora(nn.Sequential(nn.Linear(64, 32)), ["0"])
    x = torch.eye(64)
    outs = {}
    for per_micro in (False, True):
        flat = _fast(FlatLoRA(model, sigma=0.1, schedule="constant", per_microbatch=per_micro))
        with torch.no_grad():
            runs = []
            for _ in range(2):
                with flat.perturb(3):
                    runs.append(model(x))
            with flat.perturb(4):
                runs.append(model(x))
        outs[per_micro] = runs
    assert torch.equal(outs[False][0], outs[False][1])
    assert not torch.allclose(outs[True][0], outs[True][1])
    assert torch.equal(outs[False][0], outs[True][0])


def test_noise_is_seeded_by_seed_step_layer_and_rank_only():
    model = _lora(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16)), ["0", "1"])
    flat = _fast(FlatLoRA(model, sigma=0.1, schedule="constant", seed=5))
    lay0 = flat.layers[0]
    e = flat.noise(lay0, 3)
    assert torch.equal(e, _fast(FlatLoRA(model, sigma=0.1, schedule="constant", seed=5)).noise(lay0, 3))
    assert not torch.allclose(e, flat.noise(lay0, 4))
    assert not torch.allclose(e, _fast(FlatLoRA(model, sigma=0.1, schedule="constant", seed=6)).noise(lay0, 3))
    other = _fast(FlatLoRA(model, sigma=0.1, schedule="constant", seed=5, process_rank=1))
    assert not torch.allclose(e, other.noise(other.layers[0], 3))
    shared = _fast(FlatLoRA(model, sigma=0.1, schedule="constant", seed=5, process_rank=1,
                            share_noise_across_ranks=True))
    assert torch.equal(e, shared.noise(shared.layers[0], 3))


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return unet


def test_unet_chunks_checkpointing_and_one_generation_per_block_and_pass():
    unet = _tiny_unet()
    flat = _fast(FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4))
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    t = torch.tensor([10, 500])

    def grads(checkpointing):
        unet.zero_grad()
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        unet.train()
        before = flat._fast.generations
        with flat.perturb(9):
            unet(sample, t, text).sample.pow(2).mean().backward()
        return _grads(unet), flat._fast.generations - before

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    n_blocks = 6  # transformer blocks: one chunk each (8 layers)
    assert len(flat._fast.chunks) == n_blocks and all(len(c.layers) == 8 for c in flat._fast.chunks)
    # one launch per block in forward and one in backward (the last block's is shared by both); with
    # checkpointing the recomputation shares its launch with the block's backward
    assert n_plain <= 2 * n_blocks and n_ckpt <= 2 * n_blocks, (n_plain, n_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * len(flat.layers)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    # equal to the materialised fp32 reference with the fast path's eps
    eps = {lay.name: flat.noise(lay, 9) for lay in flat.layers}
    unet.zero_grad()
    unet.disable_gradient_checkpointing()
    patched = []
    for lay in flat.layers:
        base, e = lay.base, eps[lay.name]
        base.forward = (lambda b, e: (lambda x: F.linear(x, b.weight + e, b.bias)))(base, e)
        patched.append(base)
    try:
        unet(sample, t, text).sample.pow(2).mean().backward()
    finally:
        for base in patched:
            del base.forward
    ref = _grads(unet)
    for name in plain:
        torch.testing.assert_close(plain[name], ref[name], rtol=1e-4, atol=1e-6)


def test_backend_selection_on_cpu():
    model = _lora(nn.Sequential(nn.Linear(8, 8)), ["0"])
    assert FlatLoRA(model, backend="auto").fast_engine() is None  # CPU: the reference path
    assert FlatLoRA(model, backend="reference").fast_engine() is None
    with pytest.raises(RuntimeError, match="CUDA"):
        FlatLoRA(model, backend="cuda").fast_engine()
    with pytest.raises(ValueError, match="backend"):
        FlatLoRA(model, backend="gpu")


def test_triton_kernel_in_the_interpreter_equals_the_torch_emulation(monkeypatch):
    """Needs Triton (not a CI dependency); on the GPU the benchmark runs the same comparison compiled."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here (the test extra installs it on Linux x86-64)")
    code = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from torch import nn
from peft import LoraConfig, inject_adapter_in_model
from flatlora_diffusion.flat import FlatLoRA
from flatlora_diffusion import flat_cuda as fc
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(300, 70), nn.Linear(70, 40), nn.Conv2d(6, 10, 3))
model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2"]), model)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_()
outs = {}
for k in ("torch", "triton"):
    flat = FlatLoRA(model, sigma=0.2, schedule="constant")
    flat._fast = fc.FastFlat(flat, kernels=k)
    eng = flat._fast
    eng.begin_step(5, 0)
    outs[k] = [eng.row_std(fl) for fl in eng.fast_layers] + [eng.perturbed_weight(fl, torch.float32).clone()
                                                             for fl in eng.fast_layers]
for a, b in zip(outs["torch"], outs["triton"]):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_backward_generates_only_layers_that_need_an_input_gradient():
    """Cross-attention to_k / to_v read the (frozen) text embeddings: backward never asks for their W + eps, so
    the backward launch of a block leaves them out (a third of an SDXL block's weights)."""
    unet = _tiny_unet()
    flat = _fast(FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4))
    calls = []
    eng = flat._fast
    original = eng._generate

    def record(chunk, buf, add_w, subset=None):
        calls.append((chunk.index, subset))
        return original(chunk, buf, add_w, subset)

    eng._generate = record
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    with flat.perturb(3):
        unet(sample, torch.tensor([10, 500]), text).sample.pow(2).mean().backward()
    n = len(eng.chunks)
    forward, backward = calls[:n], calls[n:]
    assert sorted(c for c, _ in forward) == list(range(n)) and all(s is None for _, s in forward)
    names = [fl.flat_layer.name.rsplit(".", 2)[-2:] for fl in eng.chunks[1].layers]
    for chunk_index, subset in backward:
        assert subset is not None
        kept = {".".join(names[i]) for i in subset}
        assert not kept & {"attn2.to_k", "attn2.to_v"}, kept
