"""The training step with its forward + backward captured in a CUDA graph and replayed (`--cuda_graph`).

Host time per step is what a graph removes: the ~600 perturbed layers' launches are replayed, not issued one
by one. Flat-LoRA's fused engine (flat.fused) keeps everything a step reads on the device so that it can be
captured here.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .step import step_generator


class GraphedTrainStep:
    """`step.TrainStep` with its forward + backward (the project's own `TrainStep.loss_and_backward`, Flat-LoRA
    inside) captured in a CUDA graph per batch shape and replayed; clipping, the optimizer
    and the LR schedule run eagerly after the replay, as in TrainStep.__call__. Same call, same result:

        step = GraphedTrainStep(TrainStep(...))
        loss, sigma_t = step(batch, global_step)

    What the graph needs and this class provides: the step number, micro-batch and the diffusion-noise seed
    enter as device state set before each replay (Flat-LoRA's keys and sigma_t are computed on the device
    from them); the gradients live in fixed tensors that the graph zeroes and fills (never set to None);
    batches are copied into static tensors (one graph per shape signature, sharing one memory pool).
    Limits: gradient accumulation 1, the Flat-LoRA fast engine (backend auto/cuda) or no Flat-LoRA.
    """

    def __init__(self, train_step, warmup: int = 2, pool=None):
        acc = train_step.accelerator
        if getattr(acc, "gradient_accumulation_steps", 1) != 1:
            raise ValueError("GraphedTrainStep supports gradient_accumulation_steps = 1")
        flat = train_step.flat
        if flat is not None and flat.layers and flat.fast_engine() is None:
            raise ValueError("GraphedTrainStep needs FlatLoRA's fast engine (backend='auto' or 'cuda' on CUDA)")
        self.ts = train_step
        self.flat = flat
        self.device = torch.device(acc.device)
        self.warmup = int(warmup)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.gen = torch.Generator(device=self.device)
        self.step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.micro_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.graphs: dict = {}

    @staticmethod
    def _tensors(batch):
        names = ["latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids"]
        out = [(n, getattr(batch, n)) for n in names if getattr(batch, n) is not None]
        out += [(f"input_ids{i}", t) for i, t in enumerate(batch.input_ids or [])]
        return out

    def _signature(self, batch):
        return tuple((n, tuple(t.shape), t.dtype) for n, t in self._tensors(batch)) + (batch.n_class,)

    def _body(self, static_batch):
        ts = self.ts
        torch._foreach_zero_([p.grad for p in ts.params])
        ctx = self.flat.perturb(self.step_t, self.micro_t) if self.flat is not None else contextlib.nullcontext()
        with ctx:
            loss = ts.loss_and_backward(static_batch, self.gen)
        return loss.detach()

    def _capture(self, batch):
        static = copy.copy(batch)
        for name, t in self._tensors(batch):
            clone = t.to(self.device, copy=True)
            if name.startswith("input_ids"):
                static.input_ids = list(static.input_ids)
                static.input_ids[int(name[9:])] = clone
            else:
                setattr(static, name, clone)
        for p in self.ts.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._body(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # The warm-up's activations are free now but cached for the side stream; the capture allocates from its
        # own pool and cannot reuse them. Hand them back so the two are not held at once.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)
        # Captured on the warm-up's stream: a capture on a fresh stream of its own would give cuBLAS a third
        # workspace on the GPU for the whole run (82 MiB of SD 1.5 batch 4's peak; benchmarks/HISTORY.md).
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            loss = self._body(static)
        # What the capture itself cached outside the graph's pool is not needed again.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return graph, static, loss

    def __call__(self, batch, global_step: int):
        ts, acc = self.ts, self.ts.accelerator
        micro = ts._micro_step(global_step)
        seed = step_generator(self.device, ts.options.seed, global_step, micro, acc.process_index,
                              acc.num_processes).initial_seed()
        key = self._signature(batch)
        entry = self.graphs.get(key)
        if entry is None:
            self.gen.manual_seed(seed)
            self.step_t.fill_(global_step)
            self.micro_t.fill_(micro)
            entry = self.graphs[key] = self._capture(batch)
        graph, static, loss = entry
        for (_, dst), (_, src) in zip(self._tensors(static), self._tensors(batch)):
            dst.copy_(src, non_blocking=True)
        self.gen.manual_seed(seed)
        self.step_t.fill_(global_step)
        self.micro_t.fill_(micro)
        with acc.accumulate(*ts._trained_models()):
            graph.replay()
            ts.update()  # the gradients stay in the graph's fixed tensors: never zeroed to None here
        sigma_t = self.flat.sigma_at(global_step) if self.flat is not None else 0.0
        return loss.clone(), float(sigma_t)
