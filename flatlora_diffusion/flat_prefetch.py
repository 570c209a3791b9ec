"""Prefetch of the fast engine's chunk generations (flat_cuda.FastFlat).

W + eps of the chunk a step asks for next is written on a side CUDA stream while the layers of the current chunk
compute, so the noise kernel runs beside the step's own kernels instead of between them. At batch 1 most of
the GPU waits on small kernels (the SDXL step reaches 14.5 % of the tensor-core peak), and the noise kernel's
integer, MUFU and memory work fits in those gaps.

Which generation comes next is learned from the previous step: a step asks for the same generations in the same
order (the forward's chunks, then the backward's in reverse, or the gradient-checkpoint recomputation's), so the
order is recorded, and when a generation is taken the one that followed it last time is started. A wrong
prediction costs one wasted generation, never a wrong result: a prefetched buffer is used only for exactly the
key (chunk, layer subset, dtype, backward) it was generated for.

Memory: while a prefetch is pending, two chunk temporaries are live instead of one. At the turn from the forward
(chunks visited for the first time in the step) to the backward (chunks visited again), where the step's memory
peaks, nothing is prefetched.

Streams and safety: the side stream first waits for everything the current stream has queued (the noise scales
of begin_step, and any earlier user of the memory the caching allocator hands the buffer from), and the current
stream waits for the side stream's event before it reads the buffer or drops it. The buffer is allocated on the
current stream, so it is freed there, after that wait. The same waits make the side stream part of a CUDA graph
capture and join it back. Without CUDA (the CPU tests), a prefetch is generated at once on the one stream:
the order, the hits and the memory rule are the same, only nothing overlaps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class GenerationKey(NamedTuple):
    chunk: int
    subset: frozenset | None  # the local layers generated (None: all of the chunk)
    dtype: torch.dtype
    backward: bool


class _Pending(NamedTuple):
    key: GenerationKey
    buffer: torch.Tensor
    event: object  # torch.cuda.Event recorded on the side stream, or None without CUDA


class GenerationPrefetcher:
    """take(key) -> the chunk buffer of W + eps for key, generated now or prefetched during the previous one.

    allocate(key) returns an empty buffer for key (called on the current stream); launch(key, buffer) fills it
    (called on the stream it must run on)."""

    def __init__(self, allocate: Callable, launch: Callable, device: torch.device, enabled: bool = True):
        self._allocate = allocate
        self._launch = launch
        self.enabled = enabled
        self._device = device
        self._side = None  # the side stream, made at the first prefetch on CUDA
        self._last: list[GenerationKey] = []  # the previous step's order of generations
        self._order: list[GenerationKey] = []
        self._visited: set[int] = set()  # chunks generated in this step
        self._pending: _Pending | None = None
        self.hits = 0  # prefetched generations that were used (the tests and the benchmark count them)
        self.misses = 0  # prefetched generations that were not

    def begin_step(self) -> None:
        self._drop_pending()
        self._order = []
        self._visited = set()

    def end_step(self) -> None:
        """Joins a prefetch nobody asked for and keeps this step's order for the next (a step that generated
        nothing, such as FastFlat.noise()'s inspection, keeps the previous order)."""
        self._drop_pending()
        if self._order:
            self._last = self._order
        self._order = []

    def take(self, key: GenerationKey) -> torch.Tensor:
        buffer = None
        pending = self._finish_pending()
        if pending is not None and pending.key == key:
            buffer = pending.buffer
            self.hits += 1
        elif pending is not None:
            self.misses += 1
        if buffer is None:
            buffer = self._allocate(key)
            self._launch(key, buffer)
        first_visit = key.chunk not in self._visited
        self._visited.add(key.chunk)
        self._order.append(key)
        upcoming = self._predict()
        if upcoming is not None and not (first_visit and upcoming.chunk in self._visited):
            self._start(upcoming)
        return buffer

    def _predict(self) -> GenerationKey | None:
        """The generation that followed this one in the previous step, when this step has taken the same ones in
        the same order so far (compared at the last position only: a step's order is fixed by its model)."""
        i = len(self._order)
        if not self.enabled or i >= len(self._last) or self._last[i - 1] != self._order[-1]:
            return None
        return self._last[i]

    def _start(self, key: GenerationKey) -> None:
        buffer = self._allocate(key)
        if self._device.type != "cuda":
            self._launch(key, buffer)
            self._pending = _Pending(key, buffer, None)
            return
        if self._side is None:
            self._side = torch.cuda.Stream(self._device)
        current = torch.cuda.current_stream(self._device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self._launch(key, buffer)
        event = torch.cuda.Event()
        event.record(self._side)
        self._pending = _Pending(key, buffer, event)

    def _drop_pending(self) -> None:
        if self._finish_pending() is not None:
            self.misses += 1

    def _finish_pending(self) -> _Pending | None:
        """The pending prefetch, with the current stream made to wait for it (so its buffer may be read, or freed)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.event is not None:
            torch.cuda.current_stream(self._device).wait_event(pending.event)
        return pending
