"""What every entry point (train, demo, evaluate, export, the app) prints: our story on stderr with the
libraries quiet, and a user's mistake as one `error: ...` line.

Its own module so that the CLI, the demo, the evaluation and the app import it without importing each other.
"""

from __future__ import annotations

import logging
import os
import sys


def fail(message: str) -> int:
    """Print a user mistake as one line and return the exit code for it (2, as argparse uses)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def quiet_libraries() -> None:
    """Loading bars of every pipeline component and library notes drown our own progress and log."""
    for noisy in ("diffusers", "transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


class TqdmLogHandler(logging.StreamHandler):
    """Log lines through tqdm.write: it lifts the progress bar, prints the line and redraws the bar below,
    so a log line is never glued to the bar's text."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    # Several processes (accelerate launch / torchrun): the main one tells the story, the others only warn.
    main = os.environ.get("RANK", "0") == "0"
    level = logging.INFO if main else logging.WARNING
    handler = TqdmLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
    quiet_libraries()
