"""fused_lora.py: peft's LoRA Linear with its up projection, scaling and sum in one addmm gives peft's results
(fp32: to fp32 rounding; bf16: within its rounding, and at least as close to exact), leaves every case it does not
cover to peft, runs the base layer as patched (Flat-LoRA), and traces under torch.compile."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from flatlora_diffusion.flat.perturbed_layers import patched_forwards
from flatlora_diffusion.fused_lora import fused_lora_forwards


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(48, 80)
        self.to_k = nn.Linear(48, 80, bias=False)

    def forward(self, x):
        return self.to_q(x) * 1.5 + self.to_k(x)


def lora_model(**config) -> nn.Module:
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k"],
                                               init_lora_weights="gaussian", **config), Attention())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # peft starts B at zero; a non-zero B exercises the up projection
        p.requires_grad_("lora_" in name)
    return model


def forward_backward(model, fused: bool, autocast: bool = False, x=None):
    """(output, input grad, LoRA grads) of one forward + backward, with the fused forwards patched in or not."""
    for p in model.parameters():
        p.grad = None
    x = (torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)) if x is None else x).requires_grad_()
    with patched_forwards() as patch:
        for layer, forward in (fused_lora_forwards([model]) if fused else []):
            patch(layer, forward)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_fp32_gives_peft_s_output_and_gradients():
    model = lora_model()
    assert len(fused_lora_forwards([model])) == 2
    y, gx, grads = forward_backward(model, fused=False)
    fy, fgx, fgrads = forward_backward(model, fused=True)
    assert fy.dtype == y.dtype == torch.float32
    torch.testing.assert_close(fy, y, rtol=1e-5, atol=1e-5)  # one fp32 rounding apart
    torch.testing.assert_close(fgx, gx, rtol=1e-5, atol=1e-5)
    assert fgrads.keys() == grads.keys() and len(grads) == 4
    for name in grads:
        assert fgrads[name].dtype == torch.float32
        torch.testing.assert_close(fgrads[name], grads[name], rtol=1e-5, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())  # undone after the block


def test_bf16_autocast_is_within_peft_s_rounding_and_no_further_from_exact():
    model = lora_model()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.bfloat16()  # the trainer's frozen bf16 base, fp32 LoRA
    exact = model.double()
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1))
    reference, _, _ = forward_backward(exact, fused=False, x=x.double())
    model = lora_model()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.bfloat16()
    y, _, grads = forward_backward(model, fused=False, autocast=True, x=x)
    fy, _, fgrads = forward_backward(model, fused=True, autocast=True, x=x)
    assert fy.dtype == y.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (fy.double() - y.double()).abs().max() <= 2 * 2 ** -8 * scale  # within a bf16 rounding or two
    assert (fy.double() - reference).abs().mean() <= (y.double() - reference).abs().mean()
    for name in grads:
        assert fgrads[name].dtype == torch.float32
        torch.testing.assert_close(fgrads[name], grads[name], rtol=0.05, atol=0.05 * grads[name].abs().max().item())


@pytest.mark.parametrize("config", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_dropout_and_dora_layers_stay_with_peft(config):
    assert fused_lora_forwards([lora_model(**config)]) == []


def test_disabled_adapters_run_peft_s_forward():
    model = lora_model()
    base_only = model.to_k.base_layer(torch.ones(2, 48))
    with patched_forwards() as patch:
        for layer, forward in fused_lora_forwards([model]):
            patch(layer, forward)
        model.to_k.enable_adapters(False)
        assert torch.equal(model.to_k(torch.ones(2, 48)), base_only)
        model.to_k.enable_adapters(True)
        assert not torch.equal(model.to_k(torch.ones(2, 48)), base_only)


def test_the_base_layer_runs_as_patched():
    """Flat-LoRA patches the base layer's forward (W + eps); the fused path calls the base layer, so it sees it."""
    model = lora_model()
    x = torch.randn(2, 48)
    with torch.no_grad():
        plain = model.to_q(x)
    with patched_forwards() as patch, torch.no_grad():
        for layer, forward in fused_lora_forwards([model]):
            patch(layer, forward)
        base = model.to_q.base_layer
        patch(base, lambda inp: nn.functional.linear(inp, base.weight, base.bias) + 1.0)
        torch.testing.assert_close(model.to_q(x), plain + 1.0)


def test_compiles_and_trains_as_eager():
    """dynamo traces the autograd function (forward and hand-written backward) into a compiled graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = lora_model()
    _, gx, grads = forward_backward(model, fused=True)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        model.forward = torch.compile(model.forward, backend=counter)
        _, cgx, cgrads = forward_backward(model, fused=True)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(cgx, gx)
    assert cgrads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(cgrads[name], grads[name])


def _activation_copies(model, autocast: bool) -> tuple[int, list[str]]:
    """(copy_ ops of an activation-sized tensor, autograd nodes named CopySlices) in one fused forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        forward_backward(model, fused=True, autocast=autocast)
    events = prof.events()

    def outside_linear(e) -> bool:  # not nn.Linear's own addmm (its bias broadcast into the output)
        while e is not None:
            if e.name == "aten::linear":
                return False
            e = e.cpu_parent
        return True

    copies = [e for e in events if e.name == "aten::copy_" and [21, 80] in e.input_shapes
              and e.cpu_parent is not None and e.cpu_parent.name == "aten::addmm" and outside_linear(e)]
    return len(copies), [e.name for e in events if "CopySlices" in e.name]


@pytest.mark.parametrize("autocast", [False, True])
def test_the_sum_lands_in_the_base_output_without_copying_it(autocast, monkeypatch):
    """addmm into a new tensor first copies its addend there: one activation-sized copy per layer. The fused layers
    add into the base layer's output in place, through the 2-d tensor nn.Linear's 3-d output views (to_q, with a
    bias) or that output itself (to_k): no copy, and no CopySlices node (whose backward clones the gradient)."""
    from flatlora_diffusion import fused_lora

    model = lora_model()
    assert _activation_copies(model, autocast) == (0, [])
    in_place = forward_backward(model, fused=True, autocast=autocast)
    monkeypatch.setattr(fused_lora, "_sum_target", lambda result: None)  # out of place: the copies are there
    assert _activation_copies(model, autocast)[0] == 2
    out_of_place = forward_backward(model, fused=True, autocast=autocast)
    assert torch.equal(in_place[0], out_of_place[0]) and torch.equal(in_place[1], out_of_place[1])  # the same sums
    assert all(torch.equal(in_place[2][n], out_of_place[2][n]) for n in in_place[2])


class _ShiftedWeight:
    """A noise source for perturbed_layers.noisy_forward: W + 0.01, in the compute dtype."""

    def __init__(self, base):
        self.base = base

    def forward_seen(self, input_needs_grad):
        pass

    def weight(self, dtype, backward=False):
        return (self.base.weight.detach().float() + 0.01).to(dtype)


@pytest.mark.parametrize("autocast", [False, True])
def test_flat_lora_s_perturbed_base_layers_keep_their_gradient(autocast):
    """Flat-LoRA's perturbed forward is a custom autograd function whose output views a tensor of its own, outside
    the graph: the sum must not be written there (the base layer's gradient, hence the input's, would be lost).
    With the base layers perturbed, the fused layers give peft's input gradient and LoRA gradients."""
    from flatlora_diffusion.flat.perturbed_layers import noisy_forward

    from flatlora_diffusion import fused_lora

    results, targets = {}, []
    original = fused_lora._sum_target

    def sum_target(result):
        targets.append(original(result) is result)
        return original(result)

    for fused in (False, True):
        model = lora_model()
        with patched_forwards() as patch, pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_lora, "_sum_target", sum_target)
            for layer in (model.to_q, model.to_k):
                patch(layer.base_layer, noisy_forward(layer.base_layer, _ShiftedWeight(layer.base_layer)))
            results[fused] = forward_backward(model, fused=fused, autocast=autocast)
    assert targets == [True, True]  # the perturbed output is a plain tensor: the sum lands in it, in place
    (y, gx, grads), (fy, fgx, fgrads) = results[False], results[True]

    def close(a, b):  # fp32: one rounding apart; bf16: a few roundings of the largest value (the sums differ there)
        scale = b.abs().max().item()
        tol = 4 * 2**-8 * scale if autocast else 1e-5 * max(scale, 1.0)
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol)

    close(fy, y)
    close(fgx, gx)
    assert fgrads.keys() == grads.keys()
    for name in grads:
        close(fgrads[name], grads[name])


def test_the_sum_target_is_only_ever_a_tensor_autograd_sees_whole():
    from flatlora_diffusion.fused_lora import _sum_target

    class ViewOfItsOwn(torch.autograd.Function):  # an output viewing a tensor made inside the function
        @staticmethod
        def forward(ctx, x):
            return (x.reshape(-1, x.shape[-1]) * 2).view(x.shape)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = torch.randn(3, 7, 48, requires_grad=True)
    with_bias, without_bias = nn.Linear(48, 80), nn.Linear(48, 80, bias=False)
    out = with_bias(x)
    assert out._is_view() and _sum_target(out) is out._base  # the whole 2-d addmm output, which has the graph
    out = without_bias(x)
    assert not out._is_view() and _sum_target(out) is out
    own = ViewOfItsOwn.apply(x)
    assert own._is_view() and not own._base.requires_grad and _sum_target(own) is None  # outside the graph
    assert _sum_target(with_bias(x)[:, :4]) is None  # part of a tensor
    with torch.no_grad():
        out = with_bias(x)
        assert _sum_target(out) is out._base  # sampling: no graph to keep
