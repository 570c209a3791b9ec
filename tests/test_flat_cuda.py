"""What only the fast Flat-LoRA engine (flatlora_diffusion/flat/fused*.py) has, on the CPU.

The specification of tests/test_flat.py runs against both engines (its `make_flat` fixture); this file tests
the fast engine's own parts: the device-side keys and schedule, the Philox generator, chunking, the in-kernel
noise scale, tensor steps (graph capture), launch counts, the backward's layer subset and the Triton kernel.

The engine runs here with kernels="torch": the same chunks, keys, noise scales, buffers and autograd
functions as on the GPU, with the Philox generator emulated in torch ops. The Triton kernel itself is
compared with this emulation by the GPU benchmark (benchmarks/bench_flat.py, which fails loudly on any
difference) and, where Triton is installed, by the interpreter test in this file.
"""

import math
import random
import re

import pytest
import torch
from torch import nn

from flatlora_diffusion.flat import FlatLoRA, fused, fused_chunks, fused_kernels, fused_torch, noise_key, sigma_at
from tests.flat_helpers import (
    LINEAR_SHAPES,
    attach_fast,
    grads,
    linear_model,
    lora,
    mlp,
    tiny_unet,
    train,
    two_adapter_model,
    two_layer_net,
    unet_grads,
    unet_inputs,
)


# --- device-independent pieces -------------------------------------------------------------------------------


def test_device_keys_equal_noise_key():
    rng = random.Random(0)
    ids = [rng.getrandbits(64) for _ in range(64)]
    for _ in range(50):
        seed, step = rng.randint(-(2**63), 2**63 - 1), rng.randint(0, 10**7)
        micro, rank = rng.randint(0, 9), rng.randint(0, 63)
        keys = fused_torch.device_noise_keys(torch.tensor(seed), torch.tensor(step), torch.tensor(micro),
                                    torch.tensor([fused_torch.to_int64(i) for i in ids]), rank)
        assert keys.tolist() == [noise_key(seed, step, micro, i, rank) for i in ids]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_device_sigma_equals_sigma_at(schedule):
    for step in [0, 1, 7, 50, 99, 100, 250]:
        got = fused_torch.device_sigma_at(torch.tensor(step), 0.1, schedule, 100).item()
        assert got == pytest.approx(sigma_at(step, 0.1, schedule, 100), rel=1e-6, abs=1e-9)
    assert fused_torch.device_sigma_at(torch.tensor(5), 0.0, schedule, 100).item() == 0.0


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox-4x32-10 (counter 0 / key 0, and all ones)."""
    out = fused_torch.philox4x32(torch.tensor(0), torch.tensor([0]), torch.tensor([0]))
    assert [int(x) for x in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # counters (ffffffff, ffffffff, 0, 0) are not a published vector; check the word operations instead:
    # one round by hand
    c0, c1, k0, k1 = 0x12345678, 0x9ABCDEF0, 0x0BADBEEF, 0x00C0FFEE
    key = torch.tensor((k1 << 32) | k0)
    r = fused_torch.philox4x32(key, torch.tensor([c0]), torch.tensor([c1]), rounds=1)
    p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * 0
    expect = [((p2 >> 32) ^ c1 ^ k0) & 0xFFFFFFFF, p2 & 0xFFFFFFFF, ((p0 >> 32) ^ 0 ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
    assert [int(x) for x in r] == expect


def test_standard_normal_grid_law_and_layout():
    z = fused_torch.standard_normal_grid(12345, 256, 1000)
    assert z.shape == (256, 1000)
    assert abs(z.mean().item()) < 6 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 6 / math.sqrt(2 * z.numel())
    kurt = (z**4).mean().item() / z.var().item() ** 2
    assert abs(kurt - 3) < 0.05
    # the tails: P(|z| > 3) = 0.0027; |z| is capped at sqrt(-2 ln(2^-21)) = 5.39 (20-bit radius uniforms)
    tail = (z.abs() > 3).float().mean().item()
    assert abs(tail - 0.0027) < 6 * math.sqrt(0.0027 / z.numel())
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(2.0**-21)) + 1e-5
    # a row's numbers depend on (key, row, column) only: not on how many rows or columns are drawn
    assert torch.equal(fused_torch.standard_normal_grid(12345, 5, 1000, row_start=100), z[100:105])
    assert torch.equal(fused_torch.standard_normal_grid(12345, 256, 300), z[:, :300])
    # neighbouring columns / rows / keys are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1]) < 0.01
    other = fused_torch.standard_normal_grid(12346, 256, 1000)
    assert abs(torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1]) < 0.01


def test_chunk_prefix():
    assert fused_chunks.chunk_prefix("0.down_blocks.1.attentions.0.transformer_blocks.3.attn1.to_q") == \
        "0.down_blocks.1.attentions.0.transformer_blocks.3"
    assert fused_chunks.chunk_prefix("0.down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_out.0") == \
        "0.down_blocks.1.attentions.0.transformer_blocks.3"
    assert fused_chunks.chunk_prefix("1.text_model.encoder.layers.7.self_attn.q_proj") == \
        "1.text_model.encoder.layers.7"
    assert fused_chunks.chunk_family("0.down_blocks.1.attentions.0.transformer_blocks.3.attn1.to_q") == \
        fused_chunks.chunk_family("0.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k") == \
        "0.down_blocks.attentions.transformer_blocks"
    assert fused_chunks.chunk_family("1.text_model.encoder.layers.7.self_attn.q_proj") == "1.text_model.encoder.layers"
    # two text encoders are two models: their layers never share a chunk
    assert fused_chunks.chunk_family("2.text_model.encoder.layers.0.self_attn.q_proj") == "2.text_model.encoder.layers"
    assert fused_chunks.layer_model("2.text_model.encoder.layers.0.self_attn.q_proj") == "2"


def test_chunks_never_span_models():
    """Layers named "0.0", "1.0" (Sequentials) have no block prefix; the model index still separates them."""
    nets = [two_layer_net("linear")[0] for _ in range(2)]
    flat = attach_fast(FlatLoRA(nets, sigma=0.3, schedule="constant", seed=3))
    flat._fast._build()
    assert [[fl.flat_layer.name for fl in c.layers] for c in flat._fast.chunks] == [["0.0", "0.2"], ["1.0", "1.2"]]


# --- the fast engine's own parts of the specification's cases ------------------------------------------------------


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rslora", [False, True])
def test_in_kernel_row_std_equals_the_reference(shape, rslora):
    """The in-kernel noise scale (W + s BA formed tile by tile) is the reference's."""
    model = linear_model(*shape, rslora)
    flat = attach_fast(FlatLoRA(model, sigma=0.2, schedule="constant", seed=3))
    eng = flat._fast
    eng.begin_step(5, 0)
    assert eng.fast_layers[0].simple is not None  # one plain adapter: scaled in the kernel
    torch.testing.assert_close(eng.row_std(eng.fast_layers[0]), flat.row_std(flat.layers[0], 0.2), rtol=1e-5, atol=0)


def test_several_active_adapters_use_the_reference_formula():
    model = two_adapter_model()
    flat = attach_fast(FlatLoRA(model, sigma=0.1, schedule="constant"))
    eng = flat._fast
    eng.begin_step(0, 0)
    assert eng.fast_layers[0].simple is None  # two adapters: scaled by the reference formula
    torch.testing.assert_close(eng.row_std(eng.fast_layers[0]), flat.row_std(flat.layers[0], 0.1), rtol=1e-5, atol=0)


def test_sigma_zero_with_tensor_steps_is_plain_lora_bitwise():
    """A tensor step (graph capture) cannot skip sigma_t = 0 on the host: the layers add 0 * z, which must leave
    plain LoRA bit for bit."""
    plain = train(mlp(torch.bfloat16), None, steps=8, dtype=torch.bfloat16)
    zero = mlp(torch.bfloat16)
    flat = attach_fast(FlatLoRA(zero, sigma=0.0))
    generations = flat._fast.generations
    train(zero, flat, steps=8, dtype=torch.bfloat16, tensor_step=True)
    assert flat._fast.generations > generations  # the tensor steps really ran the perturbed layers
    for (n, p), (_, q) in zip(plain.named_parameters(), zero.named_parameters()):
        assert torch.equal(p, q), n


def test_tensor_step_equals_int_step():
    runs = []
    for tensor_step in (False, True):
        model = mlp(torch.float32)
        train(model, attach_fast(FlatLoRA(model, sigma=0.3, schedule="cosine", total_steps=5, seed=9)), 4,
              torch.float32, tensor_step=tensor_step)
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_regenerates_the_forward_eps_when_its_chunk_is_gone(kind):
    """In one chunk the backward reuses the live W + eps of the forward (the specification's gradient test checks
    it against the materialised reference); with one layer per chunk the first layer's chunk is gone by its
    backward and is generated again. Both must give the same gradients, bit for bit."""
    runs = []
    for max_chunk_numel in (1 << 24, 1):
        model, x = two_layer_net(kind)
        x.requires_grad_()  # so the first layer's backward needs its W + eps
        flat = attach_fast(FlatLoRA(model, sigma=0.3, schedule="constant", seed=2), max_chunk_numel=max_chunk_numel)
        with flat.perturb(step=4):
            model(x).pow(2).mean().backward()
        runs.append((len(flat._fast.chunks), flat._fast.generations, {"x": x.grad, **grads(model)}))
    (chunks_one, gen_one, one), (chunks_per_layer, gen_per_layer, per_layer) = runs
    assert (chunks_one, gen_one) == (1, 1)  # forward once, backward from the live buffer
    assert (chunks_per_layer, gen_per_layer) == (2, 3)  # forward 0, forward 1, backward 0 generated again
    assert one.keys() == per_layer.keys() and len(one) == 5
    for name in one:
        torch.testing.assert_close(per_layer[name], one[name], rtol=0, atol=0)


def _chunk_blocks(eng):
    """Per chunk: (path, number of blocks, elements)."""
    return [(c.layers[0].flat_layer.name.split(".")[1].split("_")[0],
             len({fused_chunks.chunk_prefix(fl.flat_layer.name) for fl in c.layers}), c.numel) for c in eng.chunks]


def test_unet_chunks_and_one_generation_per_chunk_and_pass():
    """Consecutive transformer blocks of one family (down path, mid, up path) share a chunk up to the size of the
    largest block: with blocks 32 and 64 wide (8192 and 28672 weights), the two 32-wide blocks of the down path
    share one, the three of the up path another; the 64-wide blocks stay alone."""
    unet = tiny_unet(attention_at_both_widths=True)
    flat = attach_fast(FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4))
    eng = flat._fast
    counts = []
    for checkpointing in (False, True):
        before = eng.generations
        unet_grads(unet, flat, 9, checkpointing)
        counts.append(eng.generations - before)
    small, large = 8192, 28672
    assert _chunk_blocks(eng) == [("down", 2, 2 * small), ("down", 1, large), ("down", 1, large)] + \
        [("up", 1, large)] * 3 + [("up", 3, 3 * small), ("mid", 1, large)]
    # one launch per chunk in forward and one in backward (the last chunk's is shared by both); with
    # checkpointing the recomputation shares its launch with the backward
    assert counts == [2 * len(eng.chunks) - 1] * 2, counts


def test_max_chunk_numel_bounds_the_chunks():
    """A cap below the largest block: no blocks merged, the larger blocks split between their layers."""
    unet = tiny_unet(attention_at_both_widths=True)
    flat = attach_fast(FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4), max_chunk_numel=8192)
    eng = flat._fast
    unet_grads(unet, flat, 9, False)
    chunks = _chunk_blocks(eng)
    assert all(n == 1 and numel <= 8192 for _, n, numel in chunks)
    assert sum(numel == 8192 and len(c.layers) == 8 for (_, _, numel), c in zip(chunks, eng.chunks)) == 5
    assert sum(numel for _, _, numel in chunks) == 5 * 8192 + 6 * 28672


def test_aligned_promise_only_where_it_holds():
    """The kernels are told (ALIGNED) that every row starts on a 16-byte boundary only when each layer of the
    launch has a fan-in that is a multiple of 16 and 16-byte aligned tensors: a false promise would make the GPU
    load misaligned vectors. SD / SDXL attention layers (fan-ins 320 ... 2048) always keep it."""
    assert fused_kernels.aligned(1280, 4096, 512) and fused_kernels.aligned(48, 16, element_offset=32)
    assert not fused_kernels.aligned(24, 4096) and not fused_kernels.aligned(48, 4100)
    assert not fused_kernels.aligned(48, 16, element_offset=8)

    def chunk_flags(model):
        flat = attach_fast(FlatLoRA(model, sigma=0.1, schedule="constant", seed=1))
        flat._fast.begin_step(0, 0)
        return [c.aligned for c in flat._fast.chunks]

    assert chunk_flags(lora(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16)), ["0", "1"])) == [True]
    assert chunk_flags(lora(nn.Sequential(nn.Linear(32, 48), nn.Linear(24, 16)), ["0", "1"])) == [False]
    shifted = nn.Linear(32, 48)
    with torch.no_grad():  # a contiguous view 4 bytes into its storage: fast path, but not 16-byte aligned
        storage = torch.empty(48 * 32 + 1)
        storage[1:].copy_(shifted.weight.reshape(-1))
        shifted.weight = nn.Parameter(storage[1:].view(48, 32))
    assert chunk_flags(lora(nn.Sequential(shifted), ["0"])) == [False]
    unet_flags = chunk_flags(tiny_unet(attention_at_both_widths=True))
    assert len(unet_flags) > 1 and all(unet_flags)


def test_backend_selection_on_cpu():
    model = lora(nn.Sequential(nn.Linear(8, 8)), ["0"])
    assert FlatLoRA(model, backend="auto").fast_engine() is None  # CPU: the reference path
    assert FlatLoRA(model, backend="reference").fast_engine() is None
    with pytest.raises(RuntimeError, match="CUDA"):
        FlatLoRA(model, backend="cuda").fast_engine()
    with pytest.raises(ValueError, match="backend"):
        FlatLoRA(model, backend="gpu")


def test_triton_kernel_in_the_interpreter_equals_the_torch_emulation(monkeypatch):
    """The noise-scale, noise and keys kernels, with and without the ALIGNED hints (the interpreter ignores the
    hints; it checks the code paths). Needs Triton (the test extra installs it on Linux x86-64); on the GPU the
    benchmark runs the same comparisons compiled."""
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
from flatlora_diffusion.flat import FlatLoRA, fused, fused_kernels, fused_torch
torch.manual_seed(0)
# fan-ins 300, 70, 54: the unhinted kernels; fan-ins 32, 48 (multiples of 16): the ALIGNED ones
unaligned = nn.Sequential(nn.Linear(300, 70), nn.Linear(70, 40), nn.Conv2d(6, 10, 3))
aligned = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16))
# two launch groups (an fp32 and a bf16 weight) whose ranks pad to 32 and 16: their A A^T slots overlap
mixed = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16))
# frozen weights stored in float8 (--low_memory): the kernels widen them to fp32 as they load them
fp8_aligned, fp8_unaligned = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16)), nn.Sequential(nn.Linear(30, 20))
cases = ((unaligned, ["0", "1", "2"], False, 4, {}), (aligned, ["0", "1"], True, 20, {}),
         (mixed, ["0", "1"], True, 20, {"1": 4}), (fp8_aligned, ["0", "1"], True, 20, {}),
         (fp8_unaligned, ["0"], False, 4, {}))
for model, targets, expect_aligned, r, ranks in cases:
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=8, target_modules=targets, rank_pattern=ranks),
                                    model)
    if model is mixed:
        model[1].base_layer.to(torch.bfloat16)
    if model is fp8_aligned or model is fp8_unaligned:
        for t in targets:
            model[int(t)].base_layer.to(torch.float8_e4m3fn)
            model[int(t)].base_layer.requires_grad_(False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    engines = {}
    for k in ("torch", "triton"):
        flat = FlatLoRA(model, sigma=0.2, schedule="constant")
        flat._fast = fused.FastFlat(flat, kernels=k)
        engines[k] = flat._fast
    for step in (5, 6):
        if step == 6 and model[0].weight.dtype != torch.float8_e4m3fn:  # a frozen weight written in place: the
            with torch.no_grad():                                            # cached ||W_i||^2 must follow
                model[0].weight.mul_(1.5)
        outs = {}
        for k, eng in engines.items():
            eng.begin_step(step, 0)
            outs[k] = [eng.row_std(fl) for fl in eng.fast_layers] + [eng.perturbed_weight(fl, torch.float32).clone()
                                                                     for fl in eng.fast_layers]
        for a, b in zip(outs["torch"], outs["triton"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    eng = engines["triton"]
    if model is fp8_aligned or model is fp8_unaligned:  # the kernels read the float8 weights themselves
        assert {c.w_dtype for c in eng.chunks} == {g.w_dtype for g in eng._norm_groups} == {torch.float8_e4m3fn}
    assert all(c.aligned == expect_aligned for c in eng.chunks)
    assert all(g.aligned == expect_aligned for g in eng._norm_groups)
    assert sorted(g.rp for g in eng._norm_groups) == ([16, 32] if ranks else [16 if r == 4 else 32])
# the one-launch keys kernel against flat.noise_key, with and without the micro-batch
import random
from flatlora_diffusion.flat import noise_key
rng = random.Random(1)
ids = [rng.getrandbits(64) for _ in range(1100)]  # more than one program of 1024
cases = ((-(2**63), 0, 3, 0, True), (2**63 - 1, 10**7, 2, 7, False), (5, 1, 1, 1, True))
for seed, step, micro, rank, use_micro in cases:
    t = lambda v: torch.tensor(v, dtype=torch.int64)
    keys = torch.zeros(len(ids), dtype=torch.int64)
    layer_ids = torch.tensor([fused_torch.to_int64(i) for i in ids])
    fused_kernels.flat_keys_kernel[(2,)](layer_ids, t(seed), t(step), t(micro), t(rank), keys, len(ids),
                                         USE_MICRO=use_micro, BLOCK=1024)
    assert keys.tolist() == [noise_key(seed, step, micro if use_micro else 0, i, rank) for i in ids]
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def _sm90_ptx(kernel, signature: dict, constexprs: dict) -> str:
    """The PTX Triton makes of `kernel` for an H100/H200 (sm_90), compiled here without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


def test_compiled_kernels_move_w_and_w_plus_eps_with_evict_first_hints():
    """The engine's default (evict_first=True, what the launches pass as EVICT_FIRST): the noise kernel loads W
    evict-first from L1 and L2 and stores W + eps as streaming (.cs), the noise-scale kernel reads W under an L2
    evict-first policy, so a chunk's 60 MB pass does not evict the step's activations from L2 (benchmarks/HISTORY.md:
    0.2-0.3 % of an SDXL batch-1 step). Without the hint the same kernels use plain accesses, which is what this
    test would see if the hints were lost. Compiled to PTX for sm_90 (no GPU needed); the interpreter test runs
    the hinted path."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here (the test extra installs it on Linux x86-64)")
    import triton.language as tl

    flat = FlatLoRA(mlp(torch.float32), sigma=0.1, schedule="constant")
    assert fused.FastFlat(flat).evict_first is True
    noise_sig = {"prog_ptr": "*i32", "meta_ptr": "*i64", "keys_ptr": "*i64", "std_ptr": "*fp32", "out_ptr": "*bf16"}
    noise_const = {"W_T": tl.bfloat16, "ADD_W": True, "BM": fused_kernels.NOISE_ROWS, "T": fused_kernels.NOISE_CALLS,
                   "ROUNDS": 10, "FAST": True, "WHILE_LOOPS": False, "ALIGNED": True}
    norm_sig = {n: "*fp32" for n in ("scale_ptr", "sigma_ptr", "wsq_ptr", "gram_ptr", "std_ptr")}
    norm_sig = {"prog_ptr": "*i32", "meta_ptr": "*i64", **norm_sig}
    norm_const = {"W_T": tl.bfloat16, "AB_T": tl.float32, "BM": fused_kernels.NORM_ROWS, "BK": fused_kernels.NORM_COLS,
                  "RP": 16, "WHILE_LOOPS": False, "ALIGNED": True, "SPLIT_BF16": True}
    w_load = re.compile(r"ld\.global\.L1::evict_first\.L2::cache_hint\.v4\.b32")
    for evict_first in (True, False):
        noise = _sm90_ptx(fused_kernels.flat_noise_kernel, noise_sig, {**noise_const, "EVICT_FIRST": evict_first})
        norm = _sm90_ptx(fused_kernels.flat_norm_kernel, norm_sig, {**norm_const, "EVICT_FIRST": evict_first})
        assert bool(w_load.search(noise)) is evict_first  # W of the noise kernel
        assert ("st.global.cs.v4.b32" in noise) is evict_first  # W + eps
        assert ("st.global.v4.b32" in noise) is not evict_first
        # W of the noise-scale kernel: copied to shared memory (cp.async) under the L2 evict-first policy
        assert ("cp.async.cg.shared.global.L2::cache_hint" in norm) is evict_first
        assert ("createpolicy.fractional.L2::evict_first" in noise + norm) is evict_first


def test_compiled_kernels_read_float8_weights():
    """--low_memory's float8 (e4m3) weights, compiled for sm_90 without a GPU: the noise kernel loads 8 of them per
    thread at once (8 bytes, still evict-first) and both kernels widen them with the hardware's exact e4m3 -> f16
    conversion; the noise-scale kernel's W A^T stays on the tensor cores (wgmma) with W widened to bf16 (exact)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here (the test extra installs it on Linux x86-64)")
    import triton.language as tl

    assert fused_kernels.tl_dtype(torch.float8_e4m3fn) == tl.float8e4nv
    noise_sig = {"prog_ptr": "*i32", "meta_ptr": "*i64", "keys_ptr": "*i64", "std_ptr": "*fp32", "out_ptr": "*bf16"}
    noise = _sm90_ptx(fused_kernels.flat_noise_kernel, noise_sig, {
        "W_T": tl.float8e4nv, "ADD_W": True, "BM": fused_kernels.NOISE_ROWS, "T": fused_kernels.NOISE_CALLS,
        "ROUNDS": 10, "FAST": True, "WHILE_LOOPS": False, "ALIGNED": True, "EVICT_FIRST": True})
    norm_sig = {n: "*fp32" for n in ("scale_ptr", "sigma_ptr", "wsq_ptr", "gram_ptr", "std_ptr")}
    norm = _sm90_ptx(fused_kernels.flat_norm_kernel, {"prog_ptr": "*i32", "meta_ptr": "*i64", **norm_sig}, {
        "W_T": tl.float8e4nv, "AB_T": tl.float32, "BM": fused_kernels.NORM_ROWS, "BK": fused_kernels.NORM_COLS,
        "RP": 16, "WHILE_LOOPS": False, "ALIGNED": True, "SPLIT_BF16": True, "EVICT_FIRST": True})
    assert "ld.global.L1::evict_first.L2::cache_hint.v2.b32" in noise  # 8 float8 values per load
    assert "cvt.rn.f16x2.e4m3x2" in noise and "cvt.rn.f16x2.e4m3x2" in norm
    assert "wgmma.mma_async" in norm and ".bf16" in norm


def test_backward_generates_only_layers_that_need_an_input_gradient():
    """Cross-attention to_k / to_v read the (frozen) text embeddings: backward never asks for their W + eps, so
    the backward launch of a block leaves them out (a third of an SDXL block's weights)."""
    unet = tiny_unet()
    flat = attach_fast(FlatLoRA(unet, sigma=0.2, schedule="constant", seed=4))
    calls = []
    eng = flat._fast
    original = eng._generate

    def record(chunk, buf, add_w, subset=None):
        calls.append((chunk.index, subset))
        return original(chunk, buf, add_w, subset)

    eng._generate = record
    with flat.perturb(3):
        unet(*unet_inputs()).sample.pow(2).mean().backward()
    n = len(eng.chunks)
    forward, backward = calls[:n], calls[n:]
    assert sorted(c for c, _ in forward) == list(range(n)) and all(s is None for _, s in forward)
    names = [fl.flat_layer.name.rsplit(".", 2)[-2:] for fl in eng.chunks[1].layers]
    for chunk_index, subset in backward:
        assert subset is not None
        kept = {".".join(names[i]) for i in subset}
        assert not kept & {"attn2.to_k", "attn2.to_v"}, kept

