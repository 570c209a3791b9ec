"""`flatlora-diffusion evaluate RUN [RUN ...]`: argument parsing and the user-facing error contract.

A user mistake ends with one line `error: ...` on stderr and exit code 2, before any model loads and with
nothing written.
"""

from __future__ import annotations

import argparse
import math

from .evaluate import DEFAULT_DRAWS, DEFAULT_RHOS, DEFAULT_SAMPLES, DEFAULT_TRIPLES, EvalOptions
from .runs import EvalInputError


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise EvalInputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="flatlora-diffusion evaluate",
        description="Score trained runs: denoising loss on instance and held-out images, the sharpness curve "
                    "under Flat-LoRA's filter-wise noise, and optional CLIP-T / CLIP-I / DINO image scores; "
                    "toy-world runs also get the judge's subject, scene, prior-preservation and diversity "
                    "scores and held-out subject renders, without any flag. "
                    "Writes <run>/eval.json and prints a table comparing the runs.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (written by `flatlora-diffusion train`)")
    p.add_argument("--eval_data_dir", help="held-out images of the same subject (captions: .txt files, else the "
                                           "run's instance prompt); without it held-out loss and gap are null")
    p.add_argument("--rhos", nargs="+", metavar="RHO",
                   help=f"relative noise radii (default {' '.join(map(str, DEFAULT_RHOS))})")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help=f"noise draws per radius (default {DEFAULT_DRAWS})")
    p.add_argument("--triples", type=int, default=DEFAULT_TRIPLES,
                   help=f"(image, timestep, noise) triples of the loss (default {DEFAULT_TRIPLES})")
    p.add_argument("--no_antithetic", action="store_true",
                   help="one evaluation per draw instead of the pair W'+eps, W'-eps (noisier, half the cost)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed: triples and noise draws (default 0)")
    p.add_argument("--batch_size", type=int, default=16, help="triples per UNet forward (default 16)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--samples", type=int,
                   help=f"images per prompt for image scores (default {DEFAULT_SAMPLES}): the CLIP/DINO scores' "
                        "validation prompts, and each toy-world prompt")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="their seeds (default 0..samples-1)")
    p.add_argument("--clip_model", metavar="DIR", help="local CLIP model folder: CLIP-T and CLIP-I")
    p.add_argument("--dino_model", metavar="DIR", help="local DINO (or ViT) model folder: DINO score")
    p.add_argument("--output", metavar="FILE", help="also write all runs' records and comparisons to FILE")
    return p


def parse_rhos(values: list[str] | None) -> tuple[float, ...]:
    """Radii from '0.01 0.02' or '0.01,0.02': finite, positive, distinct; returned ascending."""
    if values is None:
        return DEFAULT_RHOS
    items = [v for value in values for v in value.split(",") if v.strip()]
    rhos = []
    for item in items:
        try:
            rho = float(item)
        except ValueError:
            raise EvalInputError(f"--rhos: {item!r} is not a number") from None
        if not (math.isfinite(rho) and rho > 0):
            raise EvalInputError(f"--rhos: every radius must be a finite number > 0, got {item}")
        rhos.append(rho)
    if not rhos:
        raise EvalInputError("--rhos: give at least one radius, e.g. --rhos 0.01 0.05")
    if len(set(rhos)) != len(rhos):
        raise EvalInputError(f"--rhos: a radius is repeated ({' '.join(items)})")
    return tuple(sorted(rhos))


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    for name in ("draws", "triples", "batch_size"):
        if getattr(args, name) < 1:
            raise EvalInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.samples is not None and args.samples < 1:
        raise EvalInputError(f"--samples must be >= 1, got {args.samples}")
    if args.seeds is not None and args.samples is not None and len(args.seeds) != args.samples:
        raise EvalInputError(f"--seeds gives {len(args.seeds)} seed(s) for --samples {args.samples}; "
                             "give one per sample")
    samples = args.samples or (len(args.seeds) if args.seeds else DEFAULT_SAMPLES)
    seeds = list(args.seeds) if args.seeds else list(range(samples))
    return EvalOptions(eval_data_dir=args.eval_data_dir, samples=samples, seeds=seeds, rhos=parse_rhos(args.rhos),
                       draws=args.draws, triples=args.triples, eval_seed=args.seed,
                       antithetic=not args.no_antithetic, batch_size=args.batch_size,
                       device=args.device, clip_model=args.clip_model, dino_model=args.dino_model)


def main(argv: list[str]) -> int:
    from ..console import fail as _fail
    from ..console import setup_logging

    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        opts = options_from_args(args)
    except EvalInputError as e:
        return _fail(str(e))
    setup_logging()
    from ..data import DataError
    from ..models import ModelError
    from .evaluate import evaluate
    from .report import format_table

    try:
        records = evaluate(args.runs, opts, args.output)
    except (EvalInputError, ModelError, DataError) as e:
        return _fail(str(e))
    print(format_table(records))
    return 0
