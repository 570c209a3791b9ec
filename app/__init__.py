"""The flatlora-diffusion web app: launch, follow, queue and cancel trainings; compare runs; download LoRAs.

    flatlora-diffusion app [--host 127.0.0.1] [--port 7860] [--runs-dir DIR] [--auth USER:PASS]
    python -m app ...

The app is a client of run directories (see /work/shared/DESIGN.md): it writes a run folder, starts
`flatlora-diffusion train --config <run>/config.yaml` as a child process, and reads the folder back.
Public API: main(argv) -> int, create_app(runs_dir, ...) -> (gr.Blocks, Launcher).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "create_app", "parse_args"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flatlora-diffusion app",
                                description="The web app: train, follow, queue and compare LoRA / Flat-LoRA runs.")
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 = every interface).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument("--runs-dir", default="runs", help="Folder of the run folders (default ./runs); created if missing.")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="Require this user name and password (or set FLATLORA_APP_AUTH).")
    args = p.parse_args(argv)
    auth = args.auth or os.environ.get("FLATLORA_APP_AUTH")
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            p.error("--auth must be USER:PASS with both parts non-empty")
        args.auth = (user, password)
    if not 0 < args.port < 65536:
        p.error(f"--port must be 1..65535, got {args.port}")
    return args


def create_app(runs_dir, trainer_command: list[str] | None = None, refresh_s: float = 1.0,
               generator=None, start: bool = True):
    """(gr.Blocks, Launcher) for a runs folder; the launcher has adopted/re-queued earlier runs if start."""
    from .launcher import Launcher
    from .ui import build_app

    runs_dir = Path(runs_dir).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(runs_dir, trainer_command=trainer_command)
    if start:
        launcher.start()
    return build_app(runs_dir, launcher, generator=generator, refresh_s=refresh_s), launcher


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs_dir = Path(args.runs_dir).expanduser().resolve()
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --runs-dir {runs_dir}: {e.strerror}", file=sys.stderr)
        return 2
    # Gradio's own upload and output cache lives inside the runs folder too: nothing outside it is written.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(runs_dir / ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        print(f"error: the web app needs gradio: pip install 'flatlora-diffusion[app]' ({e})", file=sys.stderr)
        return 2
    demo, launcher = create_app(runs_dir)
    print(f"runs folder: {runs_dir}")
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, auth=args.auth, allowed_paths=[str(runs_dir)],
            ssr_mode=False, show_error=True, quiet=False)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        launcher.shutdown(cancel_running=False)  # a training outlives the app; the next app adopts it
    return 0
