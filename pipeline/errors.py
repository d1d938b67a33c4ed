"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class PipelineError(Exception):
    """An error the user can act on; its message is one line naming the file and record."""


class DataError(PipelineError):
    """A corrupt, truncated or mismatched input file."""
