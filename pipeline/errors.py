"""User-facing errors: the CLI prints them as one line and exits non-zero; and one-line notes that are not
errors."""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """An error the user can act on; its message is one line naming the file and record."""


class DataError(PipelineError):
    """A corrupt, truncated or mismatched input file."""


def note(message: str) -> None:
    """A one-line note on stderr (a damaged resume file discarded, a value capped): not an error."""
    print(f"note: {' '.join(message.split())}", file=sys.stderr, flush=True)
