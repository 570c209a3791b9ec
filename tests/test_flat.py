"""The Flat-LoRA engine's specification: noise law, gradients, exactness, seeding, checkpointing, DDP.

Every specification test takes the `make_flat` fixture and so runs once per engine of
tests/flat_helpers.ENGINES: the reference path (flat/reference.py) and the fast engine (flat/fused.py, kernels="torch",
its algorithm with the Philox generator emulated in torch ops). Any faster implementation must keep every one
of these properties; what only the fast engine has (its in-kernel noise scale, chunks, launch counts, tensor
steps) is tested in tests/test_flat_cuda.py.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlora_diffusion.flat import FlatLoRA, noise_key, sigma_at
from tests.flat_helpers import (
    ENGINES,
    LINEAR_SHAPES,
    build_flat,
    expected_std,
    freeze_base,
    grads,
    linear_model,
    lora,
    materialised_unet_grads,
    mlp,
    row_stats_within_bounds,
    tiny_unet,
    train,
    two_adapter_model,
    two_layer_net,
    unet_grads,
)


@pytest.fixture(params=ENGINES)
def make_flat(request):
    """make_flat(models, **FlatLoRA kwargs): a FlatLoRA run by this test's engine."""
    return lambda models, **kw: build_flat(request.param, models, **kw)


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_noise_follows_the_formula(make_flat, shape, rslora):
    fan_in, fan_out = shape
    model = linear_model(fan_in, fan_out, rslora)
    flat = make_flat(model, sigma=0.2, schedule="constant", seed=3)
    eye = torch.eye(fan_in)
    with torch.no_grad():
        clean = model(eye)
        with flat.perturb(step=5):
            noisy = model(eye)
    eps = (noisy - clean).T  # row i of eps = output channel i
    row_stats_within_bounds(eps, expected_std(model[0], 0.2, ["default"]))
    # and it is exactly the eps the engine reports for that step
    torch.testing.assert_close(eps, flat.noise(flat.layers[0], 5), rtol=0, atol=1e-5)


def test_noise_scale_uses_all_active_adapters(make_flat):
    model = two_adapter_model()
    layer = model[0]
    flat = make_flat(model, sigma=0.1, schedule="constant")
    eye = torch.eye(layer.base_layer.in_features)
    with torch.no_grad():
        clean = model(eye)
        with flat.perturb(step=0):
            noisy = model(eye)
    eps = (noisy - clean).T
    both = expected_std(layer, 0.1, ["a", "b"])
    only_a = expected_std(layer, 0.1, ["a"])
    assert (both / only_a).min() > 1.5  # the two hypotheses really differ
    row_stats_within_bounds(eps, both)


@pytest.mark.parametrize("in_ch,out_ch,k", [(16, 24, 3), (64, 8, 1), (8, 40, 5)])
def test_conv2d_noise_follows_the_formula(make_flat, in_ch, out_ch, k):
    model = lora(nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=0)), ["0"], r=4, alpha=2)
    layer = model[0]
    flat = make_flat(model, sigma=0.15, schedule="constant", seed=11)
    n = in_ch * k * k
    # One-hot inputs of exactly kernel size: the 1x1 output is one weight entry (+ bias) per input.
    probes = torch.eye(n).reshape(n, in_ch, k, k)
    with torch.no_grad():
        clean = model(probes).reshape(n, out_ch)
        with flat.perturb(step=2):
            noisy = model(probes).reshape(n, out_ch)
    eps = (noisy - clean).T
    assert eps.shape == (out_ch, n)
    row_stats_within_bounds(eps, expected_std(layer, 0.15, ["default"]))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_gradients_equal_a_materialised_fp32_reference(make_flat, kind):
    """Two perturbed layers in a row: the first layer's LoRA gradient flows back through the second's W + eps,
    so this also checks that backward regenerates exactly the eps of the forward."""
    model, x = two_layer_net(kind)
    flat = make_flat(model, sigma=0.3, schedule="constant", seed=2)
    target = torch.randn_like(model(x))

    with flat.perturb(step=4):
        F.mse_loss(model(x), target).backward()
    got = grads(model)

    # Reference: each W + s BA + eps materialised by hand in fp32, A and B as leaves.
    leaves = {}

    def reference_layer(index, h):
        layer, flat_layer = model[index], flat.layers[index // 2]
        A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
        B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
        leaves[index] = (A, B)
        W = layer.base_layer.weight.detach()
        delta = (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
        weight = W + layer.scaling["default"] * delta + flat.noise(flat_layer, 4)
        if kind == "linear":
            return F.linear(h, weight, layer.base_layer.bias)
        base = layer.base_layer
        return F.conv2d(h, weight, base.bias, stride=base.stride, padding=base.padding)

    out = reference_layer(2, torch.tanh(reference_layer(0, x)))
    F.mse_loss(out, target).backward()
    for index, (A, B) in leaves.items():
        torch.testing.assert_close(got[f"{index}.lora_A.default.weight"], A.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[f"{index}.lora_B.default.weight"], B.grad, rtol=1e-4, atol=1e-5)
    # eps really mattered: the clean gradient is different
    model.zero_grad()
    F.mse_loss(model(x), target).backward()
    assert not torch.allclose(grads(model)["0.lora_A.default.weight"], leaves[0][0].grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_frozen_weights_bitwise_unchanged_after_many_steps(make_flat, dtype):
    model = mlp(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    flat = make_flat(model, sigma=0.5, schedule="constant", seed=0)
    train(model, flat, steps=60, dtype=dtype)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert p.dtype == dtype
            assert torch.equal(p, before[n]), n
    # training did happen
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_sigma_zero_is_plain_lora_bitwise(make_flat):
    plain = train(mlp(torch.bfloat16), None, steps=8, dtype=torch.bfloat16)
    zero = mlp(torch.bfloat16)
    train(zero, make_flat(zero, sigma=0.0), steps=8, dtype=torch.bfloat16)
    for (n, p), (_, q) in zip(plain.named_parameters(), zero.named_parameters()):
        assert torch.equal(p, q), n
    # the cosine schedule starts at exactly 0: step 0 is plain LoRA as well
    assert sigma_at(0, 0.1, "cosine", 100) == 0.0


def test_flat_training_differs_from_plain(make_flat):
    plain = train(mlp(torch.float32), None, steps=4, dtype=torch.float32)
    flat_model = mlp(torch.float32)
    train(flat_model, make_flat(flat_model, sigma=0.2, schedule="constant"), steps=4, dtype=torch.float32)
    diffs = [not torch.equal(p, q) for p, q in zip(plain.parameters(), flat_model.parameters())]
    assert any(diffs)


def test_schedules():
    assert sigma_at(50, 0.1, "cosine", 100) == pytest.approx(0.05)
    assert sigma_at(100, 0.1, "cosine", 100) == pytest.approx(0.1)
    assert sigma_at(25, 0.1, "cosine", 100) == pytest.approx(0.1 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert sigma_at(25, 0.1, "linear", 100) == pytest.approx(0.025)
    assert sigma_at(0, 0.1, "constant", 100) == 0.1
    assert sigma_at(500, 0.1, "linear", 100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        sigma_at(0, 0.1, "exponential", 10)
    with pytest.raises(ValueError, match="sigma"):
        FlatLoRA(nn.Linear(2, 2), sigma=-0.1)


def test_noise_is_seeded_by_seed_step_layer_and_rank_only(make_flat):
    model = lora(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16)), ["0", "1"])
    flat = make_flat(model, sigma=0.1, schedule="constant", seed=5)
    twin = make_flat(copy.deepcopy(model), sigma=0.1, schedule="constant", seed=5)
    lay0, lay1 = flat.layers
    e = flat.noise(lay0, 3)
    assert torch.equal(e, twin.noise(twin.layers[0], 3))  # same seed, same step, same layer
    assert not torch.allclose(e, flat.noise(lay0, 4))  # another step
    assert not torch.allclose(e, make_flat(model, sigma=0.1, schedule="constant", seed=6).noise(lay0, 3))
    other_rank = make_flat(model, sigma=0.1, schedule="constant", seed=5, process_rank=1)
    assert not torch.allclose(e, other_rank.noise(other_rank.layers[0], 3))
    shared = make_flat(model, sigma=0.1, schedule="constant", seed=5, process_rank=1, share_noise_across_ranks=True)
    assert torch.equal(e, shared.noise(shared.layers[0], 3))
    # another layer of the same shape draws other numbers (compared as standard normals)
    same_shape = lora(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), ["0", "1"])
    pair = make_flat(same_shape, sigma=0.1, schedule="constant", seed=5)
    z0 = pair.noise(pair.layers[0], 3) / pair.row_std(pair.layers[0], 0.1)[:, None]
    z1 = pair.noise(pair.layers[1], 3) / pair.row_std(pair.layers[1], 0.1)[:, None]
    assert not torch.allclose(z0, z1)
    assert len({noise_key(1, s, 0, 7, 0) for s in range(1000)}) == 1000


def test_global_rng_untouched(make_flat):
    model = freeze_base(lora(nn.Sequential(nn.Linear(32, 16)), ["0"]))
    flat = make_flat(model, sigma=0.1, schedule="constant")
    state = torch.get_rng_state()
    with flat.perturb(7):
        model(torch.ones(2, 32)).sum().backward()
    assert torch.equal(state, torch.get_rng_state())


def test_microbatches_share_noise_by_default_and_not_with_option(make_flat):
    model = lora(nn.Sequential(nn.Linear(64, 32)), ["0"])
    x = torch.eye(64)
    outs = {}
    for per_micro in (False, True):
        flat = make_flat(model, sigma=0.1, schedule="constant", per_microbatch=per_micro)
        with torch.no_grad():
            runs = []
            for _ in range(2):  # two micro-batches of step 3
                with flat.perturb(3):
                    runs.append(model(x))
            with flat.perturb(4):  # the next step starts again from micro-batch 0
                runs.append(model(x))
        outs[per_micro] = runs
    assert torch.equal(outs[False][0], outs[False][1])
    assert not torch.allclose(outs[True][0], outs[True][1])
    assert torch.equal(outs[False][0], outs[True][0])  # micro-batch 0 draws the default noise


def test_outside_perturb_the_model_is_clean(make_flat):
    model = freeze_base(lora(nn.Sequential(nn.Linear(32, 16)), ["0"]))
    x = torch.randn(3, 32)
    clean = model(x).detach()
    flat = make_flat(model, sigma=0.5, schedule="constant")
    state = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError):
        with flat.perturb(1):
            model(x).sum().backward()
            assert not torch.allclose(model(x), clean)
            raise ZeroDivisionError  # an exception inside the step must still restore the clean layers
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(model(x), clean)
    assert "forward" not in model[0].base_layer.__dict__
    assert not flat.active


def test_gradient_checkpointing_sees_the_same_noise(make_flat):
    unet = tiny_unet()
    flat = make_flat(unet, sigma=0.2, schedule="constant", seed=4)
    # 4 projections x (self, cross) attention x 6 transformer blocks (2 down, 1 mid, 3 up)
    assert len(flat.layers) == 4 * 2 * 6

    plain = unet_grads(unet, flat, 9, checkpointing=False)
    ckpt = unet_grads(unet, flat, 9, checkpointing=True)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * len(flat.layers)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    # equal to the materialised fp32 reference with the engine's eps
    ref = materialised_unet_grads(unet, flat, 9)
    for name in plain:
        torch.testing.assert_close(plain[name], ref[name], rtol=1e-4, atol=1e-6)
    # and the noise was on: without it the gradients differ
    clean = unet_grads(unet, None, 9, checkpointing=False)
    assert any(not torch.allclose(clean[n], plain[n], rtol=1e-4, atol=1e-6) for n in plain)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cpu_reference_path_keeps_w_plus_eps_for_backward_and_trains_the_same(monkeypatch, checkpointing):
    """On the CPU the reference path keeps each forward's W + eps for its backward instead of drawing it again:
    one draw per layer per forward pass (recomputation included), and gradients bitwise those of drawing again."""
    from flatlora_diffusion.flat import flat_lora, reference

    unet = tiny_unet()
    flat = FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4)
    assert flat.fast_engine() is None
    draws = []
    original_draw = reference.standard_normal

    def counted_draw(key, shape, device):
        draws.append(key)
        return original_draw(key, shape, device)

    monkeypatch.setattr(reference, "standard_normal", counted_draw)
    kept = unet_grads(unet, flat, 9, checkpointing=checkpointing)
    passes = 2 if checkpointing else 1  # the forward, and its recomputation in backward
    assert len(draws) == passes * len(flat.layers) and len(set(draws)) == len(flat.layers)

    class DrawingAgain(reference.ReferenceNoise):
        def __init__(self, weight, row_std, key, keep_for_backward=False):
            super().__init__(weight, row_std, key, keep_for_backward=False)

    monkeypatch.setattr(flat_lora, "ReferenceNoise", DrawingAgain)
    flat = FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4)  # the same draws; its sources are DrawingAgain
    draws.clear()
    drawn_again = unet_grads(unet, flat, 9, checkpointing=checkpointing)
    assert len(draws) > passes * len(flat.layers)  # backward drew W + eps again
    assert kept.keys() == drawn_again.keys() and len(kept) == 2 * len(flat.layers)
    for name in kept:
        assert torch.equal(kept[name], drawn_again[name]), name


def test_compiled_regions_around_perturbed_layers_compile_once_and_train_the_same(make_flat):
    """torch.compile (--torch_compile's compiled UNet blocks) guards on the identity of each patched forward: the
    engine patches in one forward per layer for its whole life, so compiled transformer blocks are traced at the
    first step and not again, and dynamo breaks around the perturbed layers (it cannot trace their noise source),
    leaving their gradients what eager steps give. dynamo's counting backend runs what it traced as is, so the
    gradients must be equal bit for bit. (New forwards at every step made dynamo trace again at every step.)"""
    from torch._dynamo.testing import CompileCounter

    def three_steps(compiled: bool):
        unet = tiny_unet()
        flat = make_flat(unet, sigma=0.1, schedule="constant", seed=0)
        counter = CompileCounter()
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        for block in blocks * compiled:
            block.compile(backend=counter)
        frames, forwards, step_grads = [], [], []
        try:
            for step in range(3):
                step_grads.append(unet_grads(unet, flat, step, checkpointing=False))
                frames.append(counter.frame_count)
                with flat.perturb(step):
                    forwards.append([layer.base.forward for layer in flat.layers])
        finally:
            torch._dynamo.reset()
        return frames, forwards, step_grads

    frames, forwards, compiled_grads = three_steps(compiled=True)
    assert frames[0] > 0 and frames[-1] == frames[0]
    assert all(a is b for a, b in zip(forwards[0], forwards[-1]))
    _, _, eager_grads = three_steps(compiled=False)
    for compiled, eager in zip(compiled_grads, eager_grads):
        assert compiled.keys() == eager.keys() and compiled
        assert all(torch.equal(compiled[n], eager[n]) for n in eager)

def test_several_models_at_once_get_distinct_layers(make_flat):
    a = lora(nn.Sequential(nn.Linear(16, 16)), ["0"])
    b = lora(nn.Sequential(nn.Linear(16, 16)), ["0"])
    flat = make_flat([a, b], sigma=0.1, schedule="constant")
    assert [lay.name for lay in flat.layers] == ["0.0", "1.0"]
    assert len({lay.layer_id for lay in flat.layers}) == 2
    with torch.no_grad():
        with flat.perturb(0):
            ya, yb = a(torch.eye(16)), b(torch.eye(16))
        da, db = ya - a(torch.eye(16)), yb - b(torch.eye(16))
    assert da.abs().sum() > 0 and db.abs().sum() > 0


def _ddp_worker(rank, world, share, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to pick, nothing to collide with a previous test's store.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        model = freeze_base(lora(nn.Sequential(nn.Linear(16, 8)), ["0"]))
        ddp = nn.parallel.DistributedDataParallel(model)
        flat = FlatLoRA(model, sigma=0.3, schedule="constant", share_noise_across_ranks=share)
        with flat.perturb(2):
            ddp(torch.eye(16)).sum().backward()
        torch.save({"eps": flat.noise(flat.layers[0], 2), "rank": flat.rank}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The work is done and saved; skip interpreter teardown, which now and then hung for minutes in a
    # spawned worker after destroy_process_group (seen on this 2-core machine).
    os._exit(0)


@pytest.mark.parametrize("share", [False, True])
def test_ddp_ranks_draw_independent_noise_unless_shared(tmp_path, share):
    import torch.multiprocessing as mp
    import time

    procs = mp.start_processes(_ddp_worker, args=(2, share, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120  # a wedged process group must fail the test, not hang CI
    while not procs.join(timeout=5):  # join returns whenever one process ends; loop until all have
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.terminate()
            pytest.fail("DDP workers did not finish within 120 s")
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    assert (r0["rank"], r1["rank"]) == ((0, 0) if share else (0, 1))
    assert torch.equal(r0["eps"], r1["eps"]) == share
