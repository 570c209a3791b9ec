"""The command line of `flatlora-diffusion export` (and `python -m flatlora_diffusion.export`)."""

from __future__ import annotations

import argparse
import sys

from . import names
from .lora import ExportError
from .run_files import DTYPES, FORMATS, export_with_status


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="a run directory (pytorch_lora_weights.safetensors + config.yaml) or a LoRA .safetensors file "
        "(diffusers/peft or kohya)",
    )
    parser.add_argument(
        "--format",
        dest="format",
        choices=FORMATS,
        default="kohya",
        help="kohya: the file ComfyUI and AUTOMATIC1111 load (default); diffusers: for pipe.load_lora_weights",
    )
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        default=None,
        help="where to write (default: <output_name>.safetensors in the run directory, or "
        "<input>_<format>.safetensors next to an input file)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="tensor dtype of the file (default fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--arch",
        choices=names.ARCHS,
        default=None,
        help="base model family, when it cannot be told from the file (default: detect)",
    )
    parser.add_argument(
        "--metadata",
        metavar="KEY=VALUE",
        type=_key_value,
        action="append",
        default=[],
        help="set a metadata entry, e.g. --metadata modelspec.author=me (repeatable)",
    )
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run the export for parsed arguments: prints the written path, or `error: ...` and returns 2."""
    try:
        path, written = export_with_status(
            args.input,
            getattr(args, "output", None),
            getattr(args, "format", "kohya"),
            getattr(args, "dtype", "fp16"),
            getattr(args, "overwrite", False),
            dict(getattr(args, "metadata", None) or []),
            getattr(args, "arch", None),
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path if written else f"{path} is up to date (it holds these weights already); nothing written")
    return 0


def main(argv=None) -> int:  # `python -m flatlora_diffusion.export`
    parser = add_export_arguments(argparse.ArgumentParser(prog="flatlora-diffusion export"))
    return run_export(parser.parse_args(argv))
