"""`flatlora-diffusion` subcommands: train, demo, export, evaluate, app, make-tiny-model.

User mistakes end with one line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .console import fail as _fail
from .console import setup_logging

SUBCOMMANDS = ("train", "demo", "export", "evaluate", "app", "make-tiny-model")


def _version() -> str:
    from . import __version__

    return f"flatlora-diffusion {__version__}"


def train_main(argv: list[str]) -> int:
    from .config import ConfigError, config_from_args
    from .train import USER_ERRORS, Cancelled

    if any(a in ("-h", "--help") for a in argv):
        from .config import build_parser

        build_parser().print_help()
        return 0
    if "--version" in argv:
        print(_version())
        return 0
    try:
        cfg = config_from_args(argv)
    except ConfigError as e:
        return _fail(str(e))
    setup_logging()
    from .run_dir import RunDir
    from .train import TrainingDiverged, failure_message, train

    try:
        run = train(cfg)
    except USER_ERRORS as e:
        return _fail(str(e))
    except Cancelled as e:
        print(f"training {e}" if str(e) else "training cancelled", file=sys.stderr)
        return 130
    except TrainingDiverged as e:  # not the user's input: exit 1, but one line all the same
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        message = failure_message(e, RunDir(cfg.output_dir))
        if not message.startswith("cannot write the run folder"):
            raise  # a bug: its traceback is what a report needs
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"done: {run.path}")
    return 0


def make_tiny_model_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flatlora-diffusion make-tiny-model", allow_abbrev=False,
                                     description="Write a tiny random-weight SD 1.5 or SDXL pipeline folder (offline).")
    parser.add_argument("dir")
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .tiny import make_tiny_pipeline

    print(make_tiny_pipeline(args.dir, arch=args.arch, seed=args.seed))
    return 0


def export_main(argv: list[str]) -> int:
    from .export import add_export_arguments, run_export

    parser = argparse.ArgumentParser(prog="flatlora-diffusion export", allow_abbrev=False,
                                     description="Write a kohya (ComfyUI / AUTOMATIC1111) or diffusers LoRA file.")
    add_export_arguments(parser)
    return run_export(parser.parse_args(argv))


def demo_main(argv: list[str]) -> int:
    from .demo import main

    try:
        return main(argv)
    except Exception as e:
        # The trainer's error types are imported only now: importing .train imports torch (2 s), and the demo starts
        # its runs' fork server first thing, before it imports anything heavy itself.
        from .train import USER_ERRORS, Cancelled

        if isinstance(e, USER_ERRORS):  # e.g. --output holding the runs of an earlier demo
            return _fail(str(e))
        if not isinstance(e, Cancelled):
            raise
        return _demo_cancelled(e)
    except KeyboardInterrupt as e:
        return _demo_cancelled(e)


def _demo_cancelled(e: BaseException) -> int:
    # Ctrl-C reaches the runs too: each finishes its step and saves (the process pool waits for them), and its
    # outcome comes up as Cancelled, unless the interrupt reached this process's wait first.
    detail = str(e) or "each run's status.json says what it saved"
    print(f"demo cancelled: {detail}", file=sys.stderr)
    return 130


def evaluate_main(argv: list[str]) -> int:
    from .evaluation.cli import main

    return main(argv)


def app_main(argv: list[str]) -> int:
    try:
        import app
    except ImportError as e:
        return _fail(f"the web app needs gradio: pip install 'flatlora-diffusion[app]' ({e})")
    return app.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: flatlora-diffusion {" + ",".join(SUBCOMMANDS) + "} ...\n\n"
              "  train            DreamBooth LoRA / Flat-LoRA training (diffusers' flags, or --config FILE)\n"
              "  demo             train LoRA and Flat-LoRA on a tiny offline model and compare them\n"
              "  export           write kohya (ComfyUI/AUTOMATIC1111) or diffusers LoRA files\n"
              "  evaluate         score runs: held-out loss, sharpness curve, CLIP/DINO; writes eval.json\n"
              "  app              the web app (Gradio)\n"
              "  make-tiny-model  write a tiny random-weight SD 1.5 / SDXL pipeline folder")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(_version())
        return 0
    command, rest = argv[0], argv[1:]
    handlers = {"train": train_main, "demo": demo_main, "export": export_main, "evaluate": evaluate_main,
                "app": app_main, "make-tiny-model": make_tiny_model_main}
    if command not in handlers:
        import difflib

        hint = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        return _fail(f"unknown command {command!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                     + f" (commands: {', '.join(SUBCOMMANDS)})")
    return handlers[command](rest)


if __name__ == "__main__":
    sys.exit(main())
