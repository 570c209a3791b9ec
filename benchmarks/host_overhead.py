#!/usr/bin/env python3
"""Host (Python) time Flat-LoRA's fast engine adds per LoRA layer in an eager step, measured on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --out results/cpu_host_overhead.json

In eager mode on a GPU a batch-1 step is bound by the host (bench_flat.py: SDXL 5-12x its kernel time), so what
the engine's Python costs per layer adds to the step directly. This measures it apart from any GPU work: a chain
of 200 tiny LoRA Linear layers, forward + backward, plain peft vs FlatLoRA's fast engine with its two launches
stubbed out (the noise-scale launch and the per-block W + eps launch: one Triton launch each on a GPU). The
difference per layer is the engine's own host cost: patched forward, autograd function, W + eps lookup, and the
per-step bookkeeping spread over the layers. Minimum over repeats (the machine may be busy).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlora_diffusion.flat import FlatLoRA, fused  # noqa: E402


def chain(n_layers: int) -> nn.Module:
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n_layers)])
    model.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=[str(i) for i in range(n_layers)])
    return inject_adapter_in_model(cfg, model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file for the result")
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = chain(args.layers)
    x = torch.randn(2, 8, requires_grad=True)
    flat = FlatLoRA(model, sigma=0.1, schedule="constant")
    flat._fast = engine = fused.FastFlat(flat, kernels="torch")
    engine._generate = lambda chunk, buf, add_w, subset=None: None  # the W + eps launch (GPU work)
    engine._compute_norms = lambda: None  # the noise-scale launch (GPU work)

    def plain():
        model(x).sum().backward()

    def flat_lora():
        with flat.perturb(1):
            model(x).sum().backward()

    times: dict[str, list[float]] = {"plain": [], "flat": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("flat", flat_lora)):
            for _ in range(2):
                fn()
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            times[name].append((time.perf_counter() - t0) / 10 / args.layers * 1e6)
    result = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
              "layers": args.layers, "plain_us_per_layer": min(times["plain"]),
              "flat_us_per_layer": min(times["flat"]),
              "flat_extra_us_per_layer": min(times["flat"]) - min(times["plain"]), "all_us": times}
    print(json.dumps({k: v for k, v in result.items() if k != "all_us"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
