"""DataError: what every check of the user's data raises."""

from __future__ import annotations


class DataError(ValueError):
    """A mistake in the user's data or data options; the message is one line, shown without a traceback."""
