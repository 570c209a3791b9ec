"""benchmarks/mfu_candidates.py's candidate changes: each is in force inside `applied` and undone after it, so the
variants timed one after another on one UNet do not leak into each other."""

import json
import sys
from pathlib import Path

import pytest
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


# --- LoRA's matmuls (lora_matmul_ms / lora_matmul_ops) -----------------------------------------------------------


def _tiny_sdxl():
    """bench_flat's tiny SDXL (64 px) as the script builds it: rank-16 LoRA, and 16 tokens (4x4 latents) in its
    transformer blocks, so that the UNet's own GEMMs there have the rank as a dimension too."""
    from accelerate import Accelerator

    from bench_flat import build

    unet, _, sched = build("sdxl", torch.device("cpu"), tiny=True)
    return unet, sched, Accelerator(mixed_precision="bf16", cpu=True)


def _count_lora_calls(unet):
    """Hooks recording, per LoRA layer call, whether its input needs a gradient; and their handles."""
    needs_grad = []
    handles = [m.register_forward_pre_hook(lambda mod, args: needs_grad.append(args[0].requires_grad))
               for m in mfu_candidates.lora_layers(unet)]
    return needs_grad, handles


def _run(variant, unet, sched, acc, flat_sigma=0.0, lora_figures=True):
    """One run_variant row at batch 1 on the CPU: a first step, one timed step and (with lora_figures) one profiled
    eager step."""
    return mfu_candidates.run_variant(variant, "sdxl", unet, sched, acc, torch.device("cpu"), True, 1, n=1, warm=0,
                                      flops=None, flat_sigma=flat_sigma, lora_figures=lora_figures)


@pytest.mark.parametrize("variant", ["baseline", "fused_lora"])
def test_lora_matmuls_of_an_eager_step_are_exactly_the_lora_layers_gemms(variant):
    """Per LoRA layer call: x A^T and h B^T forward; g B, g^T h and dh^T x backward, and dh A when the layer's input
    needs a gradient (not in the first attention's q, k, v nor in the cross-attention's k, v: prompt embeddings).
    fused_lora computes them in an autograd function of its own, without calling lora_A and lora_B."""
    unet, sched, acc = _tiny_sdxl()
    assert mfu_candidates.lora_ranks(unet) == {16}
    needs_grad, handles = _count_lora_calls(unet)
    row = _run(variant, unet, sched, acc)
    for handle in handles:
        handle.remove()
    steps = 3  # run_variant's first, timed and profiled steps: the same layers called the same way in each
    assert len(needs_grad) == steps * 96  # 12 transformer blocks x 2 attentions x q, k, v, out
    per_step = needs_grad[-96:]
    assert row["lora_matmul_ops"] == sum(5 + grad for grad in per_step) == 549
    assert row["lora_matmul_ms"] > 0


def test_lora_gemm_events_have_the_rank_where_shapes_alone_would_also_take_the_unet_s_own():
    unet, sched, acc = _tiny_sdxl()
    step, batch, _ = mfu_candidates.lora_step("sdxl", unet, sched, acc, torch.device("cpu"), True, 1)
    step(batch, 1)
    with mfu_candidates.lora_ranges(unet):
        events = mfu_candidates.profiled(lambda: step(batch, 2), cuda=False).events()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())  # the ranges are removed
    gemms = mfu_candidates.lora_gemm_events(events, {16})
    assert len(gemms) == 549 and all(mfu_candidates._has_rank(evt, {16}) for evt in gemms)
    with_rank = [evt for evt in events if evt.name in mfu_candidates.GEMM_OPS and mfu_candidates._has_rank(evt, {16})]
    assert len(with_rank) > len(gemms)  # the base layers' GEMMs over 16 tokens
    none = {"lora_matmul_ms": 0.0, "lora_matmul_ops": 0}
    assert mfu_candidates.lora_matmuls(events, {4}, cuda=False) == none  # another rank than the layers'


def test_a_node_is_attributed_to_the_op_that_made_it_not_to_one_that_recorded_its_number_before():
    """The LoRA layer's last op, a no-op .to(), records the sequence number that the next layer's addmm then takes
    for its node; that addmm's backward GEMM (batch 3 = the rank) is not the LoRA layer's."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(12, 6))
    model = inject_adapter_in_model(LoraConfig(r=3, target_modules=["0"], init_lora_weights="gaussian"), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    x = torch.randn(3, 8)
    with mfu_candidates.lora_ranges(model):
        events = mfu_candidates.profiled(lambda: model(x).sum().backward(), cuda=False).events()
    gemms = mfu_candidates.lora_gemm_events(events, {3})
    # forward x A^T, h B^T; backward g B, g^T h, dh^T x (x needs no gradient)
    assert sorted(evt.input_shapes for evt in gemms) == sorted([[[3, 8], [8, 3]], [[3, 3], [3, 12]], [[3, 12], [12, 3]],
                                                                [[12, 3], [3, 3]], [[3, 3], [3, 8]]])
    addmm_backward = [evt for evt in events if evt.name.endswith("AddmmBackward0") and evt.cpu_children]
    assert addmm_backward and any(evt.sequence_nr == addmm_backward[0].sequence_nr and evt.name == "aten::to"
                                  for evt in events)  # the case this test is about does arise

    events = mfu_candidates.profiled(lambda: model(x).sum().backward(), cuda=False).events()
    assert mfu_candidates.lora_gemm_events(events, {3}) == []  # without the LoRA ranges, shapes alone count nothing
    plain = torch.nn.Sequential(torch.nn.Linear(16, 16))
    assert mfu_candidates.lora_layers(plain) == [] and mfu_candidates.lora_ranks(plain) == set()


def test_the_default_run_profiles_no_eager_step():
    unet, sched, acc = _tiny_sdxl()
    row = _run("baseline", unet, sched, acc, lora_figures=False)
    assert "median_ms" in row and not {"lora_matmul_ms", "lora_matmul_ops", "eager_op_table"} & set(row)


# --- --table -------------------------------------------------------------------------------------------------------

RECORD = {"rows": [
    {"variant": "baseline", "batch": 4, "first_step_s": 2.1, "median_ms": 257.16, "mfu": 0.2292, "peak_gib": 32.72,
     "kernel_classes_ms": {"elementwise/other": 68.6, "gemm": 69.42, "copy": 42.34, "convolution": 28.19,
                           "attention": 28.18, "norm": 14.18, "optimizer": 0.98, "flat_lora": 0.01},
     "lora_matmul_ms": 6.5, "lora_matmul_ops": 840},
    {"variant": "norms_bf16", "batch": 1, "first_step_s": 0.1, "median_ms": 74.5},  # a CPU row: no GPU figures
    {"variant": "compile", "batch": 1, "skipped": "time limit"},
    {"variant": "fused_lora", "batch": 1, "error": "RuntimeError('no')"},
]}


def _table_rows(text):
    lines = text.splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]


def test_table_classes_are_e2e_profile_s():
    from e2e_profile import KERNEL_CLASSES

    assert set(mfu_candidates.TABLE_CLASSES) == {cls for cls, _ in KERNEL_CLASSES} | {"elementwise/other"}


def test_table_has_one_row_per_timed_row_in_fixed_columns_and_lists_the_others():
    text = mfu_candidates.markdown_table([("run", RECORD)])
    header, rule, gpu, cpu = _table_rows(text)
    assert header == ["variant", "batch", "median ms", "MFU %", "peak GiB", "first step s", "gemm ms", "attention ms",
                      "convolution ms", "norm ms", "copy ms", "elementwise/other ms", "optimizer ms", "flat_lora ms",
                      "LoRA matmuls ms (eager)"]
    assert set(rule) == {"---"} and len(rule) == len(header)
    assert gpu == ["baseline", "4", "257.16", "22.9", "32.72", "2.1", "69.42", "28.18", "28.19", "14.18", "42.34",
                   "68.6", "0.98", "0.01", "6.5"]
    assert cpu == ["norms_bf16", "1", "74.5", "", "", "0.1"] + [""] * 9
    assert text.splitlines()[-2:] == ["- compile, batch 1: skipped (time limit)",
                                      "- fused_lora, batch 1: error: RuntimeError('no')"]
    several = _table_rows(mfu_candidates.markdown_table([("a", RECORD), ("b", RECORD)]))
    assert several[0][0] == "results" and [row[:2] for row in several[2:]] == [["a", "baseline"], ["a", "norms_bf16"],
                                                                               ["b", "baseline"], ["b", "norms_bf16"]]


def test_table_cli_prints_only_the_table(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RECORD))
    assert mfu_candidates.main(["--table", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == mfu_candidates.markdown_table([("results", RECORD)]) + "\n" and err == ""


@pytest.mark.parametrize("argv", [["--table", "missing.json"], ["--table", "not_json.json"], []])
def test_table_cli_errors_are_one_line_and_exit_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_json.json").write_text("{")
    assert mfu_candidates.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ")
