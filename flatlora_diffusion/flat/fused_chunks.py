"""Which layers of the fused path share one launch (a chunk): whole consecutive blocks of one model.

The engine (fused.py) generates W + eps of a chunk's layers into one temporary buffer with one kernel launch;
these functions decide the chunks from the layers' names, sizes and dtypes, so the plan is the same in every
process.
"""

from __future__ import annotations


def chunk_prefix(name: str) -> str:
    """The block a layer belongs to: its name without the last two non-numeric components
    ("...transformer_blocks.3.attn1.to_out.0" -> "...transformer_blocks.3")."""
    parts = name.split(".")
    removed = 0
    while parts and removed < 2:
        if not parts.pop().isdigit():
            removed += 1
    return ".".join(parts)


def layer_model(name: str) -> str:
    """The model a layer belongs to: the model index FlatLoRA's layer names start with ("1.text_model...")."""
    return name.split(".", 1)[0]


def chunk_family(name: str) -> str:
    """Blocks of one model whose prefixes differ only in their numbers ("0.down_blocks.1.attentions.0.
    transformer_blocks.1", "0.down_blocks.2.attentions.1.transformer_blocks.0"; "1.text_model.encoder.layers.3",
    "1.text_model.encoder.layers.4") run one after the other, so consecutive ones can share a chunk: fewer,
    larger launches."""
    model, _, rest = chunk_prefix(name).partition(".")
    return ".".join([model] + [p for p in rest.split(".") if p and not p.isdigit()])


def chunk_runs(layers: list, max_chunk_numel: int) -> list[list]:
    """The layers of each chunk: whole consecutive blocks of one model, family (chunk_family) and weight dtype,
    at most max_chunk_numel elements and no more than the largest block, so merging never enlarges the temporary
    (the one live at the memory peak is the last forward chunk: SD 1.5 measured 1.012x peak memory when the
    last two levels of its up path shared one). A block larger than max_chunk_numel is split between its
    layers. A layer order that is not the execution order costs regenerations, not results."""
    def same_model_and_dtype(a, b) -> bool:
        return (a.model, a.weight.dtype) == (b.model, b.weight.dtype)

    blocks: list[list] = []
    for fl in layers:
        if blocks and chunk_prefix(blocks[-1][-1].flat_layer.name) == chunk_prefix(fl.flat_layer.name) \
                and same_model_and_dtype(blocks[-1][-1], fl):
            blocks[-1].append(fl)
        else:
            blocks.append([fl])
    sizes = [sum(fl.numel for fl in b) for b in blocks]
    cap = min(max_chunk_numel, max(sizes, default=1))
    runs: list[list] = []
    numel = 0
    for block, size in zip(blocks, sizes):
        if runs and numel + size <= cap and same_model_and_dtype(runs[-1][-1], block[0]) \
                and chunk_family(runs[-1][-1].flat_layer.name) == chunk_family(block[0].flat_layer.name):
            runs[-1].extend(block)
            numel += size
            continue
        runs.append([])
        numel = 0
        for fl in block:
            if runs[-1] and numel + fl.numel > cap:
                runs.append([])
                numel = 0
            runs[-1].append(fl)
            numel += fl.numel
    return runs
