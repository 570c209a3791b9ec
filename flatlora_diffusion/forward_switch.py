"""A switch that patches replacement forwards into modules for the span of a `with` block: --bf16_norms and
--fused_lora, in the training step and in validation sampling."""

from __future__ import annotations

import contextlib

from .flat.perturbed_layers import patched_forwards


@contextlib.contextmanager
def forwards_patched(forwards: list):
    """Within the block each module of the (module, forward) pairs computes with that forward; after it, exactly as
    before."""
    with patched_forwards() as patch:
        for module, forward in forwards:
            patch(module, forward)
        yield


class ForwardsSwitch:
    """`with switch():` computes each module of `make()`'s (module, forward) pairs with that forward when the switch
    is `on`, and changes nothing otherwise. The pairs are made once, at the first use: torch.compile's guards need
    the same forward objects at every step (--torch_compile), and making them is a walk over the model."""

    def __init__(self, make, on: bool):
        self.make, self.on = make, on
        self.forwards: list | None = None

    @contextlib.contextmanager
    def __call__(self):
        if not self.on:
            yield
            return
        if self.forwards is None:
            self.forwards = self.make()
        with forwards_patched(self.forwards):
            yield
